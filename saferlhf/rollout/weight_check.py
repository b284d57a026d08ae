"""Does the engine compute with the actor's weights? A cheap check after every weight push.

A generation engine keeps many weights in a *derived* form: q/k/v fused into one ``qkv_proj``,
gate/up into ``gate_up_proj``, each rank's tensor-parallel shard, and on CPU every linear weight
packed for oneDNN (the parameter itself emptied). A tied output head is the worst case: its
parameter *is* the embedding matrix, yet the kernel that computes the logits reads a packed copy
made when the engine loaded. A checksum of the engine's parameters would pass while the engine
serves stale logits, so this check reads what the engine *computes*:

- every linear map of the engine (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``, the
  output head, ...) is applied, through the layer's own kernel, to a few fixed pseudo-random input
  rows ``X`` (seeded by the module's name), and compared with ``X @ Wᵀ`` where ``W`` is built from
  the actor's parameters (the fused projections stacked, this rank's shard sliced out);
- the input embedding is compared the same way on its raw weight (its lookup reads the weight);
- every other parameter (norm weights, biases) is compared as it is.

The error of a module is ``max |y_engine − y_actor| / max |y_actor|``; the error of a *group*
(a decoder layer or a lone parameter, :func:`saferlhf.rollout.sync.group_of`) is the worst of its
modules. Cost: two input rows per module, i.e. about 4·(parameters) flops on each side — far
below one generated token. This module holds the engine-independent half (the probe plan's data
type, the inputs, the expected outputs and the comparison); the vLLM backend builds the plan from
its modules and computes the engine's side.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from saferlhf.rollout.sync import group_of

PROBE_ROWS = 2  # input rows per module


@dataclass(frozen=True)
class Probe:
    """How one engine module's output is checked against the actor's parameters.

    ``kind``: ``linear`` (the engine's kernel applied to X), ``embedding`` (X @ the raw weightᵀ) or
    ``param`` (the tensor itself). ``sources`` are the actor parameters that, row-stacked, make the
    module's full weight (q, k, v for a fused qkv); ``rows[i]`` is the row range of ``sources[i]`` that
    this engine rank holds, ``cols`` the input columns it holds (row-parallel layers), ``out`` how many
    leading output columns of the engine's result are compared (a padded vocabulary has more).
    """

    module: str
    kind: str
    sources: tuple[str, ...]
    rows: tuple[tuple[int, int], ...]
    cols: tuple[int, int] | None = None
    in_features: int = 0
    out: int = 0
    attr: str = "weight"  # the module attribute a ``param`` probe reads

    @property
    def group(self) -> str:
        return group_of(self.sources[0])

    @property
    def key(self) -> str:
        return f"{self.module}/{self.attr}"


def probe_input(probe: Probe, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed input rows of ``probe`` (PROBE_ROWS, in_features): the same on every rank and side."""
    g = torch.Generator().manual_seed(zlib.crc32(probe.module.encode()))
    return torch.randn(PROBE_ROWS, probe.in_features, generator=g).to(device=device, dtype=dtype)


def _actor_weight(probe: Probe, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = [weights[name][start:stop] for name, (start, stop) in zip(probe.sources, probe.rows)]
    w = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if probe.cols is not None:
        w = w[:, probe.cols[0] : probe.cols[1]]
    return w


def expected_output(probe: Probe, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """What the engine module should output given the actor's (full) ``weights``, float32 on the CPU."""
    w = _actor_weight(probe, weights)
    if probe.kind == "param":
        return w.detach().float().cpu().reshape(-1)
    x = probe_input(probe, dtype, w.device).float()  # the input as the engine sees it, in its dtype
    return (x @ w.to(dtype).float().t()).cpu()  # (PROBE_ROWS, out)


def probes_in(plan: list[Probe], names: set[str]) -> list[Probe]:
    """The probes whose sources are all among ``names`` (a bucket of whole groups)."""
    return [p for p in plan if all(s in names for s in p.sources)]


@dataclass
class WeightCheck:
    """The result of comparing an engine with the actor: per-group errors and the worst one."""

    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)  # group → worst relative error
    modules: dict[str, float] = field(default_factory=dict)  # engine module → relative error
    missing: list[str] = field(default_factory=list)  # probes that got no engine or no actor output
    groups: dict[str, list[str]] = field(default_factory=dict)  # group → its engine modules

    @property
    def worst(self) -> tuple[str, float]:
        if not self.errors:
            return "", 0.0
        group = max(self.errors, key=self.errors.get)
        return group, self.errors[group]

    @property
    def ok(self) -> bool:
        return not self.missing and self.worst[1] <= self.tolerance

    def describe(self) -> str:
        group, err = self.worst
        if self.missing:
            return f"no output for {len(self.missing)} engine modules ({', '.join(self.missing[:3])})"
        module = max((m for m in self.modules if m in self.groups.get(group, ())), default="",
                     key=self.modules.get)
        return (f"worst parameter group {group!r} (engine module {module!r}): relative error {err:.3g}, "
                f"tolerance {self.tolerance:.3g}")


def relative_error(engine: torch.Tensor, actor: torch.Tensor) -> float:
    engine, actor = engine.float().reshape(actor.shape), actor.float()
    scale = float(actor.abs().max()) if actor.numel() else 0.0
    diff = float((engine - actor).abs().max()) if actor.numel() else 0.0
    if not (diff == diff):  # NaN in the engine's output
        return float("inf")
    return diff / max(scale, 1e-12)


def compare(plan: list[Probe], engine: dict[str, torch.Tensor], actor: dict[str, torch.Tensor],
            tolerance: float) -> WeightCheck:
    """Compare the engine's probe outputs with the expected ones, module by module."""
    check = WeightCheck(tolerance)
    for probe in plan:
        key = probe.key
        if key not in engine or key not in actor:
            check.missing.append(key)
            continue
        ours = engine[key]
        if probe.kind != "param":
            ours = ours[:, : probe.out]
        err = relative_error(ours, actor[key])
        check.modules[key] = err
        check.groups.setdefault(probe.group, []).append(key)
        check.errors[probe.group] = max(check.errors.get(probe.group, 0.0), err)
    return check


def default_tolerance(dtype: torch.dtype | str) -> float:
    """Relative error accepted for an engine computing in ``dtype``.

    fp32 kernels (oneDNN, cuBLAS with TF32 off) agree with ``x @ wᵀ`` to ~1e-6; in bf16/fp16 the
    engine's output is rounded to 8/11 mantissa bits. A stale weight after one Adam step at lr 1e-5
    moves an output by ~5e-4 relative (fp32), so fp32 is checked tightly.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}.get(dtype, 2e-2)
