"""Masked reductions, including empty rows and garbage on padding."""

import torch

from saferlhf.algorithms import masked_mean, masked_sum, masked_var, masked_whiten, per_sequence_mean

F64 = torch.float64
NAN = float("nan")

X = torch.tensor([[1.0, 2.0, 3.0], [10.0, NAN, float("inf")], [7.0, 8.0, 9.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])


def test_masked_sum_and_mean_ignore_padding_garbage():
    assert masked_sum(X, MASK).item() == 16.0
    assert masked_mean(X, MASK).item() == 4.0  # token mean: (1 + 2 + 3 + 10) / 4
    assert masked_sum(X, MASK, dim=-1).tolist() == [6.0, 10.0, 0.0]
    assert masked_mean(X, MASK, dim=-1).tolist() == [2.0, 10.0, 0.0]  # empty row: 0, not nan
    assert masked_mean(X, MASK, dim=0).tolist() == [5.5, 2.0, 3.0]


def test_masked_mean_of_nothing_is_zero_with_a_finite_gradient():
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    mean = masked_mean(x, torch.zeros(2, 3))
    mean.backward()
    assert mean.item() == 0.0
    assert torch.equal(x.grad, torch.zeros(2, 3, dtype=F64))


def test_per_sequence_mean_weighs_rows_equally_and_skips_empty_rows():
    # Row means 2 and 10; the empty row is excluded: (2 + 10) / 2 = 6 (a token mean would be 4,
    # counting the empty row as 0 would give 4).
    assert per_sequence_mean(X, MASK).item() == 6.0
    assert per_sequence_mean(X, torch.zeros(3, 3)).item() == 0.0


def test_per_sequence_mean_gradient_is_finite_despite_garbage():
    x = X.clone().requires_grad_(True)
    per_sequence_mean(x, MASK).backward()
    # ∂/∂x = 1 / (rows with tokens) / (tokens of the row) on real tokens, 0 elsewhere.
    expected = torch.tensor([[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(x.grad, expected)


def test_masked_var():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=F64)
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_var(x, mask).item() == 1.0  # ((-1)² + 0² + 1²) / (3 - 1)
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(2 / 3, dtype=F64))
    assert masked_var(x, torch.tensor([0, 1, 0, 0])).item() == 0.0  # one entry: no spread
    assert masked_var(x, torch.zeros(4)).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased variance 1 → (x - 2) / 1; padding 0.
    torch.testing.assert_close(
        masked_whiten(x, mask, eps=0.0), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=F64)
    )
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False, eps=0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=F64)
    )
    torch.manual_seed(0)
    y = torch.randn(4, 50, dtype=F64) * 3 + 5
    m = torch.rand(4, 50) < 0.7
    w = masked_whiten(y, m)
    torch.testing.assert_close(masked_mean(w, m), torch.tensor(0.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(masked_var(w, m), torch.tensor(1.0, dtype=F64))
    assert torch.all(w[~m] == 0)


def test_bool_and_float_masks_are_equivalent():
    x = torch.randn(3, 4, dtype=F64)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    for other in (mask.bool(), mask.float()):
        assert masked_mean(x, other) == masked_mean(x, mask)
        assert per_sequence_mean(x, other) == per_sequence_mean(x, mask)
