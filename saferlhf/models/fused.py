"""Fused layers in transformers models: RMSNorm and the SwiGLU gate through ``saferlhf.ops``.

``use_fused_layers(model)`` replaces, on the module instances of one model, the ``forward`` of

- every RMSNorm of the Llama family (Llama, Mistral, Qwen2/3 — SmolLM is a Llama — whose RMSNorm
  is the same computation, ``saferlhf.algorithms.rms_norm``) by ``ops.rms_norm``;
- every gated MLP of those families with a SiLU activation (``down(silu(gate(x)) · up(x))``) by one
  whose gate is ``ops.swiglu``.

The weights, parameter names, hooks (DeepSpeed ZeRO-3 gathers parameters in forward pre-hooks) and
saved checkpoints are untouched; only the computation between the matrix products changes. The ops
pick their backend per call: Triton kernels on CUDA, native ops on CPU, the reference under
``SAFERLHF_OPS=reference`` — which computes exactly what the unpatched modules compute, so a
patched model run with the reference ops is the original model.

Modules of other architectures (Gemma's RMSNorm scales by 1 + w, GPT-2 has LayerNorm) are left as
they are and counted in the returned summary.
"""

from __future__ import annotations

import types
from collections import Counter

import torch
from torch import nn

from saferlhf import algorithms, ops

# Class names whose forward is exactly ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``.
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# Class names whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU = frozenset({"silu", "swish"})


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # inside a compiled layer the compiler fuses the plain math itself
        return algorithms.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.compiler.is_compiling():
        return self.down_proj(algorithms.swiglu(gate, up))
    return self.down_proj(ops.swiglu(gate, up))


def _is_silu_mlp(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None)
    return (type(module).__name__ in MLP_CLASSES and act in SILU and getattr(config, "pretraining_tp", 1) == 1
            and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")))


def use_fused_layers(model: nn.Module) -> dict[str, int]:
    """Patches ``model``'s Llama-family RMSNorm and SiLU-gated MLP modules in place (see the module doc).

    Returns counts: ``rms_norm`` and ``swiglu`` (modules patched), ``other_norms`` (modules whose class
    name ends in ``Norm`` and that were left alone). Patching twice is harmless.
    """
    counts: Counter[str] = Counter(rms_norm=0, swiglu=0, other_norms=0)
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_silu_mlp(module):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)
            counts["swiglu"] += 1
        elif name.endswith("Norm"):
            counts["other_norms"] += 1
    return dict(counts)


def unuse_fused_layers(model: nn.Module) -> int:
    """Undo :func:`use_fused_layers`: the modules compute with their class's own ``forward`` again."""
    restored = 0
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) in (_rms_norm_forward,
                                                                                        _swiglu_mlp_forward):
            del module.forward
            restored += 1
    return restored


__all__ = ["MLP_CLASSES", "RMS_NORM_CLASSES", "unuse_fused_layers", "use_fused_layers"]
