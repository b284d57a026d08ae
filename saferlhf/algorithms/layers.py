"""The two elementwise layers of a Llama-style decoder — the reference the fused kernels are tested against.

These are not Safe RLHF math, but they run in every model pass of a PPO step (six passes per step
and three updates), and as separate torch ops they dominate the time between the matrix products:

- ``rms_norm(x, weight, eps)``: RMSNorm exactly as transformers' ``LlamaRMSNorm`` computes it (the same
  code serves Mistral, Qwen2/3 and SmolLM): the mean square in float32, the normalised activations
  rounded back to the input's dtype, then multiplied by the weight::

      y = weight · round_dtype(x / sqrt(mean(x², -1) + eps))

  As separate ops this is seven passes over the activations, four of them float32.
- ``swiglu(gate, up)``: the gated activation of Llama's MLP, ``silu(gate) · up``, between the
  ``gate_proj``/``up_proj`` and ``down_proj`` products; as separate ops two passes, and autograd keeps
  three (N, I) tensors for the backward.

Deviations from transformers: none; `saferlhf.models.fused` swaps these in for the modules' own
forwards, and under ``SAFERLHF_OPS=reference`` a patched model computes what the unpatched one does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, as ``LlamaRMSNorm``.

    Args:
        x: (..., H) activations, any floating dtype.
        weight: (H,) scale.
        eps: added to the mean square.
    Returns:
        (..., H) in ``promote(weight.dtype, x.dtype)``.
    """
    dtype = x.dtype
    h = x.to(torch.promote_types(dtype, torch.float32))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, elementwise, in the inputs' dtype (as Llama's MLP computes it)."""
    return F.silu(gate) * up


__all__ = ["rms_norm", "swiglu"]
