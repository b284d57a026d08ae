"""RMSNorm in Triton: one pass over the activations forward, one backward, weight gradient included.

Reference: ``saferlhf.algorithms.layers.rms_norm`` (transformers' ``LlamaRMSNorm``).

Notation: N rows (the leading dimensions flattened), H the hidden size, w the (H,) weight, x one row.

    forward:   r = 1 / sqrt(mean(x²) + eps),   x̂ = x·r,   y = w · round(x̂)
    backward:  g = dy·w,   dx = r · (g − x̂ · mean(g·x̂)),   dw = Σ_rows dy · round(x̂)

``round`` is the rounding to the activations' dtype that the reference does before the weight
multiply (nothing for float32). The forward keeps r, one float32 per row, for the backward; the
reference keeps float32 copies of the activations instead. All arithmetic is float32.

Forward: each program normalises a tile of whole rows in registers (one row of H ≥ 1024 on CUDA;
several narrower ones; H ≤ 65536). Backward: a fixed number of programs, each taking a contiguous
run of rows tile by tile and keeping its own float32 partial sum of dw, so the weight gradient needs
no atomics; the partial sums, (programs, H), are added up by torch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps, BLOCK_ROWS: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    in_rows = rows < n_rows
    inside = in_rows[:, None] & (cols < n_cols)[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_ROWS,)
    x_hat = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + offsets, (w[None, :] * x_hat).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + rows, rstd, mask=in_rows)


@triton.jit
def _rms_norm_backward_kernel(
    grad_y_ptr, x_ptr, w_ptr, rstd_ptr, grad_x_ptr, grad_w_partial_ptr, n_rows, n_cols, rows_per_program,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    in_cols = cols < n_cols
    w = tl.load(w_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)
    grad_w = tl.zeros((BLOCK_H,), tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_ROWS):  # int64, as its bounds
        rows = start + tl.arange(0, BLOCK_ROWS)
        in_rows = rows < last
        inside = in_rows[:, None] & in_cols[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]
        # Rows past the end load as zeros and add nothing to grad_w.
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=in_rows, other=0.0)
        x_hat = x * rstd[:, None]
        g = grad_y * w[None, :]
        grad_x = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)
        grad_w += tl.sum(grad_y * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(grad_w_partial_ptr + program * n_cols + cols, grad_w, mask=in_cols)


def _launch_settings(hidden: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_H, num_warps) of the forward: whole rows in one block, narrow rows several
    to a block. The interpreter (CPU tensors) runs a program per Python call, so it takes many rows."""
    block = triton.next_power_of_2(hidden)
    rows = max(1, (1024 if device.type == "cuda" else 8192) // block)
    return rows, block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def _backward_settings(n_rows: int, hidden: int, device: torch.device) -> tuple[int, int, int, int]:
    """(programs, BLOCK_ROWS, BLOCK_H, num_warps) of the backward.

    On CUDA, tiles of about 4096 elements (4 rows of H = 1024) and 8 programs per multiprocessor:
    each program runs its rows a tile at a time, and enough tiles are in flight to hide the loads'
    latency. ``BACKWARD_TILE`` and ``BACKWARD_PROGRAMS_PER_SM`` are read at each call (the GPU suite
    times other values).
    """
    block = triton.next_power_of_2(hidden)
    if device.type != "cuda":  # the interpreter: few programs, many rows per tile
        return max(1, min(n_rows, 4)), max(1, 8192 // block), block, 4
    programs = max(1, min(n_rows, BACKWARD_PROGRAMS_PER_SM * _multiprocessors(device.index)))
    rows = max(1, BACKWARD_TILE // block)
    return programs, rows, block, 16 if rows * block >= 16384 else 8 if rows * block >= 2048 else 4


BACKWARD_TILE = 4096
BACKWARD_PROGRAMS_PER_SM = 8


@functools.cache
def _multiprocessors(index: int | None) -> int:
    # Cached: the device query costs tens of microseconds, paid at every call otherwise.
    device = index if index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(device).multi_processor_count


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden).contiguous()  # (N, H)
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block_rows, block, warps = _launch_settings(hidden, x.device)
        n_rows = rows.shape[0]
        if n_rows > 0:
            _rms_norm_forward_kernel[(triton.cdiv(n_rows, block_rows),)](
                rows, weight, y, rstd, n_rows, hidden, eps, BLOCK_ROWS=block_rows, BLOCK_H=block, num_warps=warps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, hidden = rows.shape
        grad_rows = grad_y.reshape(n_rows, hidden).contiguous()
        grad_x = torch.empty_like(rows)
        programs, block_rows, block, warps = _backward_settings(n_rows, hidden, rows.device)
        # Every program writes its row of partial sums (a program past the last row writes zeros).
        partial = torch.empty(programs, hidden, dtype=torch.float32, device=rows.device)
        if n_rows > 0:
            per_program = triton.cdiv(n_rows, programs)
            _rms_norm_backward_kernel[(programs,)](grad_rows, rows, weight, rstd, grad_x, partial, n_rows, hidden,
                                                   per_program, BLOCK_ROWS=block_rows, BLOCK_H=block, num_warps=warps)
        grad_w = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x.view(grad_y.shape), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (as ``LlamaRMSNorm``), differentiable w.r.t. ``x`` and ``weight``.

    Args:
        x: (..., H) float32, bfloat16 or float16, H ≤ 65536.
        weight: (H,) of the same dtype.
        eps: added to the mean square.
    Returns:
        (..., H) in x's dtype.
    """
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if weight.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be ({x.shape[-1]},) {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[-1]} > {MAX_HIDDEN}: one row must fit one block")
    return _RMSNormFunction.apply(x, weight.contiguous(), float(eps))
