"""Actor → generation-engine weight sync: gather, convert, bucket and check the actor's parameters.

The trainer's actor lives in a DeepSpeed engine (under ZeRO-3 its parameters are partitioned over the
ranks); the generation engine holds a full copy of the weights. After every actor update the new
weights travel from one to the other:

1. **Gather layer by layer** (:func:`weight_groups`). Parameters are grouped by decoder layer
   (``model.layers.N.…``); every other parameter (embedding, final norm, LM head) is a group of its
   own. Under ZeRO-3 one group at a time is gathered (a collective: every rank takes part), copied
   out in the engine's dtype and released, so no rank ever holds the whole model twice.
2. **Bucket** (:func:`bucketize`): groups are packed into buckets of at most ``bucket_bytes`` (a group
   bigger than that is a bucket of its own). A bucket only ever holds *complete* groups, so the
   projections the engine fuses into one weight — q/k/v into ``qkv_proj``, gate/up into
   ``gate_up_proj`` — always arrive together: a lone ``q_proj`` would be written into the fused
   weight with the other two slices still stale.
3. **Check before sending** (:class:`WeightSpec`): every tensor's name must be a parameter of the
   actor, its shape the full (un-partitioned) shape, its values finite; a bucket must hold whole
   groups; and a push must end with every parameter sent exactly once. The engine side
   (:mod:`saferlhf.rollout.vllm_engine`) sends one call per bucket and rejects a push that fails any
   check, restarting from the last good weights if the engine was already touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")

Bucket = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight push was rejected (bad payload) or failed in the engine."""


def group_of(name: str) -> str:
    """The group a parameter belongs to: its decoder layer (``model.layers.3``) or its own name."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


def _module(engine_or_module) -> torch.nn.Module:
    return getattr(engine_or_module, "module", engine_or_module)


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


@dataclass(frozen=True)
class WeightSpec:
    """What a complete, well-formed push of the actor's weights looks like."""

    shapes: dict[str, tuple[int, ...]]  # parameter name → full shape
    groups: dict[str, tuple[str, ...]]  # group → its parameter names

    @classmethod
    def of(cls, engine_or_module) -> WeightSpec:
        shapes = {name: _full_shape(p) for name, p in _module(engine_or_module).named_parameters()}
        groups: dict[str, list[str]] = {}
        for name in shapes:
            groups.setdefault(group_of(name), []).append(name)
        return cls(shapes, {g: tuple(names) for g, names in groups.items()})

    def check_bucket(self, bucket: Bucket) -> None:
        """Raise :class:`WeightSyncError` naming the first thing wrong with ``bucket``."""
        names = [name for name, _ in bucket]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise WeightSyncError(f"weight bucket sends {dup} more than once")
        for name, tensor in bucket:
            if name not in self.shapes:
                raise WeightSyncError(f"weight bucket holds {name!r}, which is not a parameter of the actor")
            if tuple(tensor.shape) != self.shapes[name]:
                raise WeightSyncError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                      f"the actor's is {self.shapes[name]}")
            if not tensor.is_floating_point():
                raise WeightSyncError(f"weight {name!r} has dtype {tensor.dtype}, expected a floating point type")
            if not bool(torch.isfinite(tensor).all()):
                raise WeightSyncError(f"weight {name!r} holds NaN or inf values")
        sent = set(names)
        for group in {group_of(n) for n in names}:
            missing = [n for n in self.groups[group] if n not in sent]
            if missing:
                raise WeightSyncError(f"weight bucket holds part of {group!r} without {missing}: fused "
                                      f"projections must arrive together")

    def check_complete(self, sent: Iterable[str]) -> None:
        missing = sorted(set(self.shapes) - set(sent))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightSyncError(f"weight push ended without {shown}")


def weight_groups(engine_or_module, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> Iterator[Bucket]:
    """The actor's parameters, one decoder layer (or one lone parameter) at a time, as full tensors.

    Under ZeRO-3 each group is gathered on entry and released on exit (every rank must iterate the
    whole generator: the gathers are collectives). The yielded tensors are copies in ``dtype`` on
    ``device``, independent of the actor's storage.
    """
    from saferlhf.distributed import gathered_parameters

    module = _module(engine_or_module)
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in module.named_parameters():
        groups.setdefault(group_of(name), []).append((name, param))
    for members in groups.values():
        with gathered_parameters([p for _, p in members]):
            yield [(name, p.detach().to(device=device, dtype=dtype or p.dtype, copy=True)) for name, p in members]


def bucketize(groups: Iterable[Bucket], bucket_bytes: int) -> Iterator[Bucket]:
    """Pack whole groups into buckets of at most ``bucket_bytes`` (a larger group goes alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    bucket: Bucket = []
    size = 0
    for group in groups:
        group_bytes = sum(t.numel() * t.element_size() for _, t in group)
        if bucket and size + group_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += group_bytes
    if bucket:
        yield bucket
