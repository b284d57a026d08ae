"""The SwiGLU gate of Llama's MLP in Triton: ``silu(gate) · up`` in one pass, its backward in one more.

Reference: ``saferlhf.algorithms.layers.swiglu``.

    forward:   s = round(a·σ(a)),   c = s·b                       (a = gate, b = up, σ the sigmoid)
    backward:  db = dc·s,   da = dc·b·σ(a)·(1 + a·(1 − σ(a)))

``round`` is the rounding to the inputs' dtype that the reference's separate ``silu`` does. The
backward recomputes σ(a) from ``gate`` instead of keeping silu's output: autograd of the reference
keeps gate, silu(gate) and up for the backward — three (N, I) tensors — this keeps two. All
arithmetic is float32; one program per block of elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    a = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    s = (a * tl.sigmoid(a)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (s * b).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_backward_kernel(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    s = (a * sig).to(grad_up_ptr.dtype.element_ty).to(tl.float32)
    tl.store(grad_up_ptr + offsets, (grad * s).to(grad_up_ptr.dtype.element_ty), mask=inside)
    grad_a = grad * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(grad_gate_ptr + offsets, grad_a.to(grad_gate_ptr.dtype.element_ty), mask=inside)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n > 0:
            _swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n > 0:
            _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](grad, gate, up, grad_gate, grad_up, n, BLOCK=BLOCK,
                                                              num_warps=4)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, differentiable w.r.t. both.

    Args:
        gate, up: tensors of one shape and one dtype (float32, bfloat16 or float16).
    Returns:
        the same shape and dtype.
    """
    if gate.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"gate must be float32, bfloat16 or float16, got {gate.dtype}")
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} must match gate {tuple(gate.shape)} {gate.dtype}")
    return _SwiGLUFunction.apply(gate, up)
