"""The log-prob and entropy references."""

import math

import pytest
import torch

from saferlhf.algorithms import entropy_from_logits, gather_logprobs

F64 = torch.float64


def test_gather_logprobs_by_hand():
    # logits [0, log 3] → p = [1/4, 3/4].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], dtype=F64)
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=F64)
    torch.testing.assert_close(gather_logprobs(logits, labels), expected)
    # The temperature divides the logits: [0, 2 log 3] / 2 is the same distribution.
    torch.testing.assert_close(gather_logprobs(2 * logits, labels, temperature=2.0), expected)


def test_logprobs_of_every_label_normalise():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    every_label = torch.arange(11).expand(2, 3, 11).permute(2, 0, 1)  # (V, B, T)
    total = torch.stack([gather_logprobs(logits, labels) for labels in every_label]).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(2, 3))


def test_dtypes_and_low_precision_agreement():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 1000, dtype=F64) * 4
    labels = torch.randint(0, 1000, (3, 7))
    reference = gather_logprobs(logits, labels)
    assert reference.dtype == F64
    out32 = gather_logprobs(logits.float(), labels)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference, atol=1e-5, rtol=1e-5)
    # bf16 logits are upcast before the softmax: the only error is the rounding of the logits.
    logits16 = logits.bfloat16()
    out16 = gather_logprobs(logits16, labels)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(
        out16.double(), gather_logprobs(logits16.double(), labels), atol=1e-5, rtol=1e-5
    )


def test_gather_logprobs_gradient():
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda z: gather_logprobs(z, labels, temperature=0.7), (logits,))


def test_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]], dtype=F64)
    torch.testing.assert_close(
        entropy_from_logits(logits), torch.tensor([math.log(4.0), math.log(2.0)], dtype=F64)
    )
    # p = [1/4, 3/4]: H = -(1/4 log 1/4 + 3/4 log 3/4).
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(
        entropy_from_logits(torch.tensor([0.0, math.log(3.0)], dtype=F64)), torch.tensor(h, dtype=F64)
    )
    # τ → large flattens the distribution towards uniform.
    assert entropy_from_logits(torch.tensor([0.0, 5.0]), temperature=1e6).item() == pytest.approx(
        math.log(2.0)
    )


def test_entropy_with_impossible_tokens_has_a_finite_gradient():
    logits = torch.tensor([[1.0, -2.0, float("-inf")], [3.0, float("-inf"), float("-inf")]], dtype=F64)
    logits.requires_grad_(True)
    entropy = entropy_from_logits(logits)
    entropy.sum().backward()
    assert torch.isfinite(entropy).all() and entropy[1].item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gather_logprobs(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), temperature=0.0)
