"""Schulman's k1/k2/k3 KL estimators."""

import math

import pytest
import torch

from saferlhf.algorithms import KL_ESTIMATORS, kl_estimate

F64 = torch.float64


def test_values_by_hand():
    # logp = 0, logp_ref = log 2: x = log(π_ref/π) = log 2.
    logp, logp_ref = torch.tensor([0.0], dtype=F64), torch.tensor([math.log(2.0)], dtype=F64)
    torch.testing.assert_close(kl_estimate(logp, logp_ref, "k1"), torch.tensor([-math.log(2.0)], dtype=F64))
    torch.testing.assert_close(
        kl_estimate(logp, logp_ref, "k2"), torch.tensor([0.5 * math.log(2.0) ** 2], dtype=F64)
    )
    torch.testing.assert_close(
        kl_estimate(logp, logp_ref, "k3"), torch.tensor([(2 - 1) - math.log(2.0)], dtype=F64)
    )


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_zero_when_the_policies_agree(kind):
    logp = torch.randn(3, 5)
    assert torch.all(kl_estimate(logp, logp.clone(), kind) == 0)


def test_k2_and_k3_are_non_negative():
    torch.manual_seed(0)
    logp, logp_ref = torch.randn(1000) * 10, torch.randn(1000) * 10
    assert torch.all(kl_estimate(logp, logp_ref, "k2") >= 0)
    assert torch.all(kl_estimate(logp, logp_ref, "k3") >= 0)
    # Close log-probs in float32: expm1 keeps k3 accurate where e^x - 1 - x would cancel
    # (k3 = x²/2 + x³/6 + ... ≈ 5.0002e-9 for x = 1e-4; the naive form is off by ~1e-8).
    x = torch.full((4,), 1e-4)
    k3 = kl_estimate(torch.zeros(4), x, "k3")
    torch.testing.assert_close(k3, torch.full((4,), 1e-8 / 2 + 1e-12 / 6), rtol=1e-2, atol=0)


def test_k1_and_k3_are_unbiased_k2_is_not():
    # Exact expectations over a categorical π (no sampling): E_π[k1] = E_π[k3] = KL(π || π_ref).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=F64)
    kl = (p * (p.log() - q.log())).sum()
    for kind in ("k1", "k3"):
        torch.testing.assert_close((p * kl_estimate(p.log(), q.log(), kind)).sum(), kl)
    assert not torch.isclose((p * kl_estimate(p.log(), q.log(), "k2")).sum(), kl)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
