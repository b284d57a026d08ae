"""Token log-probabilities from logits in Triton: log-softmax + label gather, forward and backward.

Reference: ``saferlhf.algorithms.logprobs.gather_logprobs`` (DESIGN §3, §4).

Notation: N rows (the leading dimensions of the logits, flattened), V vocabulary, τ temperature,
z = x / τ the scaled logits of one row, y its label.

    forward:   m = max_v z_v,   s = log Σ_v exp(z_v - m),   logp = (z_y - m) - s
    backward:  ∂logp/∂x_v = (1[v = y] - p_v) / τ,   p_v = exp((z_v - m) - s)

One program per row streams the row once in blocks of the vocabulary, keeping a running maximum
and a running Σ exp(z - max) (the online log-sum-exp), so any V works and the (N, V) softmax is
never materialised. Only the label's logit is gathered, and (m, s) are saved for the backward, which
recomputes p block by block while it writes d(logits) — into the logits buffer itself when the
caller allows it (``inplace_backward=True``). m and s are kept apart rather than as lse = m + s:
float32 lse at |lse| ~ 20 is off by ~1e-6, which a p close to 1 would carry into 1 - p. Logits may
be float32, bfloat16 or float16; all arithmetic is float32 and the output is float32.

Both kernels are compiled without FMA contraction: the backward must recompute exactly the rounded
z = x·(1/τ) that the forward summed (a fused x·(1/τ) - m would not round z).

Rows are addressed as (r // rows_inner, r % rows_inner) with two strides, so a ``logits[:, :-1]``
view of (B, L, V) logits is read in place instead of being copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(u) = exp2(u·log2 e): exp2 is the hardware instruction


@triton.jit
def _logprobs_forward_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    row_max_ptr,
    log_sum_ptr,
    rows_inner,
    stride_outer,
    stride_inner,
    vocab,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)  # Σ exp(z - running_max) over the blocks seen so far
    for start in range(0, vocab, BLOCK_V):
        offsets = start + cols
        z = tl.load(row_ptr + offsets, mask=offsets < vocab, other=float("-inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # While every logit so far is -inf, shift by 0: -inf - (-inf) would be nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2((running_max - shift) * _LOG2E) + tl.sum(
            tl.exp2((z - shift) * _LOG2E), axis=0
        )
        running_max = new_max
    log_sum = tl.log(running_sum)
    label = tl.load(labels_ptr + row)
    z_label = tl.load(row_ptr + label).to(tl.float32) * inv_temp
    tl.store(row_max_ptr + row, running_max)
    tl.store(log_sum_ptr + row, log_sum)
    tl.store(logp_ptr + row, (z_label - running_max) - log_sum)


@triton.jit
def _logprobs_backward_kernel(
    grad_logp_ptr,
    logits_ptr,
    grad_logits_ptr,
    labels_ptr,
    row_max_ptr,
    log_sum_ptr,
    rows_inner,
    stride_outer,
    stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    vocab,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // rows_inner
    inner = row % rows_inner
    row_ptr = logits_ptr + outer * stride_outer + inner * stride_inner
    grad_row_ptr = grad_logits_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    scale = tl.load(grad_logp_ptr + row) * inv_temp
    row_max = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        offsets = start + cols
        in_vocab = offsets < vocab
        z = tl.load(row_ptr + offsets, mask=in_vocab, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp2(((z - row_max) - log_sum) * _LOG2E)
        grad = scale * (tl.where(offsets == label, 1.0, 0.0) - p)
        # Same addresses as the load above, in the same program: safe when grad_logits is logits.
        tl.store(grad_row_ptr + offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_vocab)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) ``x`` as a 2-D or 3-D tensor contiguous in V, a view whenever the layout allows one."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x.flatten(0, -3) if x.dim() > 3 else x


def _addressing(rows: torch.Tensor) -> tuple[int, int, int]:
    """(rows_inner, stride_outer, stride_inner) of a 2-D or 3-D ``rows``: row r starts at element
    (r // rows_inner)·stride_outer + (r % rows_inner)·stride_inner."""
    if rows.dim() == 2:
        return 1, rows.stride(0), 0
    return rows.shape[1], rows.stride(0), rows.stride(1)


def _block_v(vocab: int) -> int:
    # 4096 columns per step keep 8 warps busy without spilling registers.
    return min(triton.next_power_of_2(vocab), 4096)


def _forward(
    rows: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits from ``_as_rows`` holding N rows, (N,) labels -> (N,) logp, m and s, float32."""
    rows_inner, stride_outer, stride_inner = _addressing(rows)
    n_rows, vocab = labels.numel(), rows.shape[-1]
    logp = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    row_max, log_sum = torch.empty_like(logp), torch.empty_like(logp)
    if n_rows == 0:
        return logp, row_max, log_sum
    block_v = _block_v(vocab)
    _logprobs_forward_kernel[(n_rows,)](
        rows, labels, logp, row_max, log_sum, rows_inner, stride_outer, stride_inner, vocab, 1.0 / temperature,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, enable_fp_fusion=False,
    )  # fmt: skip
    return logp, row_max, log_sum


def _backward(
    grad_logp: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    temperature: float,
    grad_rows: torch.Tensor,
) -> None:
    """Writes d(Σ grad_logp·logp)/d(rows) into ``grad_rows``: the shape of ``rows``, contiguous in V,
    possibly ``rows`` itself."""
    if labels.numel() == 0:
        return
    rows_inner, stride_outer, stride_inner = _addressing(rows)
    _, grad_stride_outer, grad_stride_inner = _addressing(grad_rows)
    block_v = _block_v(rows.shape[-1])
    _logprobs_backward_kernel[(labels.numel(),)](
        grad_logp, rows, grad_rows, labels, row_max, log_sum, rows_inner, stride_outer, stride_inner,
        grad_stride_outer, grad_stride_inner, rows.shape[-1], 1.0 / temperature,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, enable_fp_fusion=False,
    )  # fmt: skip


class _LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, inplace_backward):
        rows = _as_rows(logits)  # (N, V) or (B, T, V)
        flat_labels = labels.reshape(-1).long()  # (N,)
        logp, row_max, log_sum = _forward(rows, flat_labels, temperature)  # (N,) each
        ctx.save_for_backward(rows, flat_labels, row_max, log_sum)
        ctx.logits_shape = logits.shape
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        return logp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        rows, flat_labels, row_max, log_sum = ctx.saved_tensors
        # empty_like keeps a dense layout or makes a contiguous one: contiguous in V either way.
        grad_rows = rows.detach() if ctx.inplace_backward else torch.empty_like(rows)
        grad_flat = grad_logp.reshape(-1).float().contiguous()  # (N,)
        _backward(grad_flat, rows, flat_labels, row_max, log_sum, ctx.temperature, grad_rows)
        return grad_rows.reshape(ctx.logits_shape), None, None, None


def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, inplace_backward: bool = False
) -> torch.Tensor:
    """log softmax(logits / τ)[label] for every position, differentiable w.r.t. the logits.

    Args:
        logits: (..., V) float32, bfloat16 or float16, contiguous in V (any strides before it).
        labels: (...) token ids in [0, V) (not checked on the device: a wrong id reads out of the row).
        temperature: τ > 0.
        inplace_backward: the backward writes d(logits) into ``logits`` instead of a new buffer —
            only when nothing else reads those logits afterwards.
    Returns:
        (...) float32.
    """
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be logits {tuple(logits.shape)} without V")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _LogprobsFunction.apply(logits, labels, float(temperature), inplace_backward)
