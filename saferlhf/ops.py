"""The one place that picks an implementation of each hot op, per call (DESIGN §4).

Each op exists three times and they agree (tests/kernels):
- ``"triton"``: the fused kernels of ``saferlhf.kernels`` — for CUDA tensors (and for CPU tensors
  under ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU);
- ``"native"``: the C++/OpenMP operators of ``saferlhf.csrc`` — for CPU tensors, built on first use;
- ``"reference"``: the plain torch math of ``saferlhf.algorithms`` — the spec.

Default per call: CUDA tensors → triton (reference if triton is not installed); CPU tensors → native
if it built, else reference (the reason is logged once). ``SAFERLHF_OPS=reference|native|triton``
forces one backend; a forced backend that cannot serve the call is an error, not a silent fallback.

Two kinds of call always take the reference, whatever the backend:
- float64 inputs (the tests' ground truth; no kernel serves float64);
- ``shape_rewards`` and ``dual_gae`` calls where an input (λ included) requires grad: the fused
  versions have no backward, and rollout tensors carry no gradient, so the trainer never hits this.

The ops: ``logprobs``, ``shape_rewards``, ``dual_gae`` (the RL hot path) and ``rms_norm``, ``swiglu``
(the decoder's elementwise layers, which ``saferlhf.models.fused`` swaps into transformers models).
``SAFERLHF_OPS`` chooses the implementation of these ops and nothing else: how a model pass runs (the
LM head over the response only, packed sequences, fused or compiled layers) is a setting of its own
(``model.*``; the pass functions take it as an argument).

Nothing is chosen at import: importing this module imports neither triton nor builds the C++ ops.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence

import torch

from saferlhf import algorithms, csrc

BACKENDS = ("reference", "native", "triton")
_log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        _log.warning(message)


def _forced() -> str | None:
    """The backend named by SAFERLHF_OPS (read at every call, so a test can set it), or None."""
    name = os.environ.get("SAFERLHF_OPS", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"SAFERLHF_OPS must be one of {BACKENDS}, got {name!r}")
    return name


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(tensor: torch.Tensor) -> str:
    """The backend that serves an op whose main input is ``tensor``: "triton", "native" or "reference".

    Raises RuntimeError when SAFERLHF_OPS forces a backend that cannot serve this tensor. The first
    CPU call builds the native ops (10–30 s, once per machine).
    """
    forced = _forced()
    if tensor.dtype == torch.float64:
        return "reference"
    if forced == "native":
        if tensor.device.type != "cpu":
            raise RuntimeError(f"SAFERLHF_OPS=native serves CPU tensors only, got {tensor.device}")
        if csrc.load() is None:
            raise RuntimeError("SAFERLHF_OPS=native but the native ops did not build (see the log)")
        return "native"
    if forced == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if not _triton_installed():
            raise RuntimeError("SAFERLHF_OPS=triton but triton is not installed")
        if tensor.device.type != "cuda" and not interpreted:
            raise RuntimeError(
                "SAFERLHF_OPS=triton on non-CUDA tensors needs TRITON_INTERPRET=1 set before "
                "saferlhf.kernels is imported"
            )
        return "triton"
    if forced == "reference":
        return "reference"
    if tensor.device.type == "cuda":
        if _triton_installed():
            return "triton"
        _log_once("triton is not installed: CUDA tensors use the reference ops")
        return "reference"
    if tensor.device.type == "cpu" and csrc.load() is not None:
        return "native"
    return "reference"


def _reference_only(*inputs: object) -> bool:
    """Whether a fused op without backward cannot serve these inputs: one is float64 or needs grad."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return needs_grad or any(t.dtype == torch.float64 for t in tensors)


def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, inplace_backward: bool = False
) -> torch.Tensor:
    """log softmax(logits / τ)[label] per position; differentiable w.r.t. the logits on every backend.

    Args:
        logits: (..., V), any floating dtype.
        labels: (...) token ids in [0, V).
        temperature: τ > 0.
        inplace_backward: let the fused backward write d(logits) into ``logits`` instead of a new
            buffer (saves one logits-sized allocation) — only when nothing else reads those logits
            after this call. Ignored by the reference.
    Returns:
        (...) float32 (float64 for float64 logits).
    """
    backend = backend_for(logits)
    if backend == "triton":
        from saferlhf.kernels.logprobs import logprobs as triton_logprobs

        return triton_logprobs(logits, labels, temperature, inplace_backward)
    if backend == "native":
        return csrc.logprobs(logits, labels, temperature, inplace_backward)
    return algorithms.gather_logprobs(logits, labels, temperature)


def shape_rewards(
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    cost: torch.Tensor,
    beta: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-shaped per-token (rewards, costs), each (B, T); see ``saferlhf.algorithms.shape_rewards``."""
    backend = backend_for(logp_old)
    if backend == "reference" or _reference_only(logp_old, logp_ref, reward, cost):
        return algorithms.shape_rewards(logp_old, logp_ref, mask, reward, cost, beta, clip)
    if backend == "triton":
        from saferlhf.kernels.shape_rewards import shape_rewards as triton_shape_rewards

        return triton_shape_rewards(logp_old, logp_ref, mask, reward, cost, beta, clip)
    return csrc.shape_rewards(logp_old, logp_ref, mask, reward, cost, beta, clip)


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
    """(adv_r, ret_r, adv_c, ret_c, adv): both GAEs and the Lagrangian advantage in one call.

    Arguments and shapes as ``saferlhf.algorithms.dual_gae`` (``costs`` (B, T) or (K, B, T)); a tensor
    λ on the GPU is read by the kernel, so the call does not synchronise with the host.
    """
    backend = backend_for(rewards)
    if backend == "reference" or _reference_only(rewards, costs, values_r, values_c, lagrange_lambda):
        return algorithms.dual_gae(rewards, costs, values_r, values_c, mask, gamma, lam, lagrange_lambda)
    if backend == "triton":
        from saferlhf.kernels.dual_gae import dual_gae as triton_dual_gae

        return triton_dual_gae(rewards, costs, values_r, values_c, mask, gamma, lam, lagrange_lambda)
    return csrc.dual_gae(rewards, costs, values_r, values_c, mask, gamma, lam, lagrange_lambda)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension as ``LlamaRMSNorm``; see ``saferlhf.algorithms.rms_norm``.

    The fused versions serve a weight of the activations' dtype; any other call (a float32 weight on
    bfloat16 activations, float64) takes the reference. Differentiable w.r.t. ``x`` and ``weight``.
    """
    backend = backend_for(x)
    if backend == "reference" or weight.dtype != x.dtype:
        return algorithms.rms_norm(x, weight, eps)
    if backend == "triton":
        from saferlhf.kernels.rms_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return csrc.rms_norm(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up (Llama's MLP gate); see ``saferlhf.algorithms.swiglu``. Differentiable."""
    backend = backend_for(gate)
    if backend == "reference" or up.dtype != gate.dtype or up.shape != gate.shape:
        return algorithms.swiglu(gate, up)
    if backend == "triton":
        from saferlhf.kernels.swiglu import swiglu as triton_swiglu

        return triton_swiglu(gate, up)
    return csrc.swiglu(gate, up)
