"""Reductions over the real tokens of a padded batch.

Notation: B sequences, T token positions; ``mask`` is 1 (or True) on real tokens and 0 on padding.
Masks are binary: any dtype is accepted and read as ``mask != 0``; fractional weights are not
supported.

Masked positions are *selected out* with ``torch.where`` rather than multiplied by zero, so padding
that holds ``inf`` or ``nan`` (a log-prob of a padding token, say) never reaches a result or a
gradient.

Empty selections: a mean over zero tokens is 0 (not ``nan``). ``per_sequence_mean`` excludes rows
with no tokens from the row average instead of counting them as 0.

Deviations from the original safe-rlhf code:
- its ``masked_mean`` divides by ``mask.sum(-1)`` per row and is ``nan`` for a row with no tokens;
  here such a row is left out of the average (``per_sequence_mean``).
- padding is selected out instead of multiplied by the mask (see above).
"""

from __future__ import annotations

import torch


def _safe_divide(numerator: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """numerator / count, and 0 where count == 0 — without a nan in the backward pass.

    Dividing first and selecting afterwards would give 0/0 = nan in the gradient of the unselected
    branch, so the denominator itself is made safe.
    """
    nonempty = count > 0
    return torch.where(nonempty, numerator / torch.where(nonempty, count, torch.ones_like(count)), 0.0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is set.

    Args:
        x: any shape.
        mask: broadcastable to ``x``.
        dim: dimension to reduce; ``None`` reduces everything to a 0-d tensor.
    """
    selected = torch.where(mask.bool(), x, 0.0)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def _count(x: torch.Tensor, mask: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Number of selected positions, in ``x``'s dtype, with the mask broadcast to ``x``."""
    selected = mask.bool().expand_as(x).to(x.dtype)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is set; 0 where nothing is selected.

    With ``dim=None`` every selected token weighs the same (a token mean over the whole batch).

    Args:
        x: any shape, floating point.
        mask: broadcastable to ``x``.
        dim: dimension to reduce; ``None`` reduces everything to a 0-d tensor.
    """
    return _safe_divide(masked_sum(x, mask, dim), _count(x, mask, dim))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the selected entries of ``x`` (all of them pooled), a 0-d tensor.

    ``unbiased`` applies Bessel's correction n / (n - 1); with fewer than two selected entries the
    variance is 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if not unbiased:
        return var
    n = _count(x, mask, None)
    return _safe_divide(var * n, n - 1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the selected entries of ``x`` to zero mean and unit variance; 0 on padding.

    Statistics are pooled over every selected entry of this tensor (this process only; no
    all-reduce). ``shift_mean=False`` keeps the original mean and only rescales.

    Args:
        x: any shape, floating point.
        mask: broadcastable to ``x``.
    Returns:
        same shape as ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


def per_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of each row, then mean over rows: every sequence weighs the same.

    This is the reduction of the actor and critic losses (``mean_seq mean_tok``). A row with no
    tokens has no mean: it is excluded from the average over rows (it does not count as a 0), and a
    batch with no tokens at all gives 0.

    Args:
        x: (B, T) floating point.
        mask: (B, T).
    Returns:
        0-d tensor.
    """
    row_means = masked_mean(x, mask, dim=-1)  # (B,)
    has_tokens = mask.bool().any(dim=-1)  # (B,)
    return masked_mean(row_means, has_tokens)
