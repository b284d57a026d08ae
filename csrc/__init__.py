"""Native CPU ops (C++, OpenMP) for the PPO-Lagrangian hot path, JIT-built on first use.

The C++ sources beside this file register torch operators in the ``saferlhf`` namespace:
``logprobs_forward``, ``logprobs_backward``, ``shape_rewards``, ``dual_gae``, ``rms_norm_forward``,
``rms_norm_backward``, ``swiglu_forward`` and ``swiglu_backward`` (``torch.ops.saferlhf.*``).
They are compiled by ``torch.utils.cpp_extension.load`` the first time ``load()`` is called (10–30 s
on two cores; cached in torch's extensions directory and reused by later processes). When no
compiler is available or the build fails, ``load()`` logs why once and returns None, and
``saferlhf.ops`` uses the reference instead.

The functions below take the arguments of their references in ``saferlhf.algorithms`` (they convert
dtypes and layouts, then call the operator); they need a successful ``load()``. Float64 inputs are
not served here: float64 is the tests' ground truth and stays on the reference.

Notation: N rows of logits or activations (all leading dimensions), V vocabulary, H hidden size,
B rows, T tokens, K constraints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

_SOURCES = ("logprobs.cpp", "shape_rewards.cpp", "dual_gae.cpp", "rms_norm.cpp", "swiglu.cpp")
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" once a build was attempted (None when it failed)


def _cpu_fingerprint() -> str:
    """A short hash of the CPU's instruction-set flags.

    The build uses -march=native, so a cached binary is valid only on CPUs with the same flags; the
    fingerprint is part of the extension's name, so a shared cache directory holds one per CPU kind.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _build() -> object:
    """Compile (or reuse from the cache) and load the operators; returns ``torch.ops.saferlhf``."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    here = Path(__file__).parent
    _log.info("building the native ops (first use; cached afterwards)")
    cpp_extension.load(
        name=f"saferlhf_native_{_cpu_fingerprint()}",
        sources=[str(here / source) for source in _SOURCES],
        # -fopenmp turns at::parallel_for into an OpenMP region (it runs serially without it) and
        # enables the `omp simd` loops; the binary links the libgomp torch has already loaded.
        # -ffp-contract=off: no silent FMAs, so the backward recomputes exactly the rounded z = x/τ
        # the forward summed (a fused x·(1/τ) - m would not round z, and 1 - p would lose digits).
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,  # the library only registers torch operators
    )
    return torch.ops.saferlhf


def _reason(error: Exception) -> str:
    """The first line of a build failure and its first compiler error (the full log is pages long)."""
    lines = str(error).splitlines() or [type(error).__name__]
    first_error = next((line.strip() for line in lines if "error" in line.lower() and line != lines[0]), "")
    return f"{lines[0]} {first_error}".strip()


def load() -> object | None:
    """The native operators (``torch.ops.saferlhf``), built on the first call; None if unavailable.

    The first failure is logged once with its reason; later calls return None without retrying.
    """
    with _lock:
        if "ops" not in _state:
            try:
                _state["ops"] = _build()
            except Exception as error:  # any build or load failure means "no native ops"
                _log.warning("native CPU ops unavailable, using the reference instead: %s", _reason(error))
                _state["ops"] = None
        return _state["ops"]


def _require() -> object:
    ops = load()
    if ops is None:
        raise RuntimeError("the native ops did not build (see the log); use the reference")
    return ops


class _Logprobs(torch.autograd.Function):
    """logprobs with the native forward and backward; the backward writes into the logits on request."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, inplace_backward):
        logp, row_max, log_sum = _require().logprobs_forward(logits, labels, temperature)  # (...) each
        ctx.save_for_backward(logits, labels, row_max, log_sum)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, labels, row_max, log_sum = ctx.saved_tensors
        grad_logits = logits.detach() if ctx.inplace_backward else torch.empty_like(logits)
        _require().logprobs_backward(grad_logp, logits, labels, row_max, log_sum, ctx.temperature, grad_logits)
        return grad_logits, None, None, None


def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, inplace_backward: bool = False
) -> torch.Tensor:
    """log softmax(logits / τ)[label], differentiable w.r.t. the logits.

    Args:
        logits: (..., V) float32, bfloat16 or float16; any strides on the leading dimensions.
        labels: (...) token ids in [0, V).
        temperature: τ > 0.
        inplace_backward: the backward overwrites ``logits`` with its gradient instead of allocating
            one; only when nothing else reads those logits afterwards.
    Returns:
        (...) float32.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' shape {tuple(logits.shape)} without V")
    # Checked here rather than only in the operator: an error raised inside a JIT-built extension
    # crashed the process on one machine instead of propagating (see benchmarks/RESULTS.md).
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < logits.shape[-1]:
        bad = labels[(labels < 0) | (labels >= logits.shape[-1])][0].item()
        raise ValueError(f"label {bad} out of range [0, {logits.shape[-1]})")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _Logprobs.apply(logits, labels.long(), float(temperature), inplace_backward)


def shape_rewards(
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    cost: torch.Tensor,
    beta: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-shaped (rewards, costs), each (B, T) float32; see ``saferlhf.algorithms.shape_rewards``."""
    return _require().shape_rewards(
        logp_old.float().contiguous(),
        logp_ref.float().contiguous(),
        mask.bool().contiguous(),
        reward.float().contiguous(),
        cost.float().contiguous(),
        float(beta),
        float(clip),
    )


def dual_gae(
    rewards: torch.Tensor,
    costs: torch.Tensor,
    values_r: torch.Tensor,
    values_c: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    lagrange_lambda: float | Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(adv_r, ret_r, adv_c, ret_c, adv), float32; see ``saferlhf.algorithms.dual_gae``.

    ``costs`` and ``values_c`` are (B, T) for one constraint or (K, B, T) for K, with λ one value or K.
    """
    one_constraint = costs.dim() == rewards.dim()
    if one_constraint:
        costs, values_c = costs.unsqueeze(0), values_c.unsqueeze(0)  # (1, B, T)
    lambdas = torch.as_tensor(lagrange_lambda, dtype=torch.float32).reshape(-1)  # (K,)
    if lambdas.numel() != costs.shape[0]:
        raise ValueError(f"{costs.shape[0]} cost streams need as many λ, got {lambdas.numel()}")
    adv_r, ret_r, adv_c, ret_c, adv = _require().dual_gae(
        rewards.float().contiguous(),
        costs.float().contiguous(),
        values_r.float().contiguous(),
        values_c.float().contiguous(),
        mask.bool().contiguous(),
        float(gamma),
        float(lam),
        lambdas.contiguous(),
    )
    if one_constraint:
        adv_c, ret_c = adv_c.squeeze(0), ret_c.squeeze(0)  # (B, T)
    return adv_r, ret_r, adv_c, ret_c, adv


_LAYER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows(t: torch.Tensor, rows: int, hidden: int) -> torch.Tensor:
    """``t`` as (N, H) rows contiguous in H: a view where one exists (any stride between rows), else a copy."""
    t = t.reshape(rows, hidden)
    return t if t.stride(-1) == 1 or hidden == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    """rms_norm with the native forward and backward; the forward keeps r = 1/rms, one float32 per row."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        hidden = x.shape[-1]
        rows = _rows(x, x.numel() // hidden, hidden)  # (N, H)
        y, rstd = _require().rms_norm_forward(rows, weight, eps)  # (N, H), (N,) float32
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, rstd = ctx.saved_tensors
        grad_rows = _rows(grad_y.to(rows.dtype), *rows.shape)  # (N, H)
        grad_x, grad_w = _require().rms_norm_backward(grad_rows, rows, weight, rstd)  # (N, H), (H,)
        return grad_x.view(grad_y.shape), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (as ``LlamaRMSNorm``), differentiable w.r.t. ``x`` and ``weight``.

    See ``saferlhf.algorithms.rms_norm``; the weight multiply sees the normalised activations rounded
    to x's dtype, as there.

    Args:
        x: (..., H) float32, bfloat16 or float16, H > 0; any strides (a copy is made unless the last
            dimension is contiguous and the leading ones flatten to rows).
        weight: (H,) of x's dtype.
        eps: added to the mean square.
    Returns:
        (..., H) in x's dtype.
    """
    if x.dtype not in _LAYER_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., H) with H > 0, got {tuple(x.shape)}")
    if weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be ({x.shape[-1]},) {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"the native ops serve CPU tensors, got x on {x.device} and weight on {weight.device}")
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))


class _SwiGLU(torch.autograd.Function):
    """swiglu with the native forward and backward; keeps gate and up (σ is recomputed)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _require().swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _require().swiglu_backward(grad.to(gate.dtype).contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, differentiable w.r.t. both; see ``saferlhf.algorithms.swiglu``.

    Args:
        gate, up: CPU tensors of one shape and one dtype (float32, bfloat16 or float16), any strides.
    Returns:
        the same shape and dtype, contiguous.
    """
    if gate.dtype not in _LAYER_DTYPES:
        raise TypeError(f"gate must be float32, bfloat16 or float16, got {gate.dtype}")
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} must match gate {tuple(gate.shape)} {gate.dtype}")
    if gate.device.type != "cpu" or up.device.type != "cpu":
        raise ValueError(f"the native ops serve CPU tensors, got gate on {gate.device} and up on {up.device}")
    return _SwiGLU.apply(gate, up)
