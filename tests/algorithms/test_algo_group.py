"""Critic-free advantages (saferlhf.algorithms.group) on hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from saferlhf.algorithms import kl_loss
from saferlhf.algorithms.group import broadcast_to_tokens, constrained_group_advantages, group_advantages

R3 = torch.tensor([0.0, 3.0, 6.0])  # one group of three: mean 3, sample std √((9 + 0 + 9)/2) = 3
C3 = torch.tensor([1.0, 1.0, 4.0])  # mean 2, centred [−1, −1, 2], sample std √((1 + 1 + 4)/2) = √3
S3 = 1 / math.sqrt(3)


def test_grpo_divides_the_centred_scores_by_the_group_s_sample_std():
    assert group_advantages(R3, 3, "grpo", eps=0.0).tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert group_advantages(C3, 3, "grpo", eps=0.0).tolist() == pytest.approx([-S3, -S3, 2 * S3])
    # Two groups of two, normalised each on its own: ±0.5/√0.5 and ±1.5/√4.5 are both ±1/√2.
    pairs = group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2, "grpo", eps=0.0)
    assert pairs.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)] * 2)


def test_rloo_subtracts_the_mean_of_the_other_answers():
    # 0 − (3 + 6)/2, 3 − (0 + 6)/2, 6 − (0 + 3)/2
    assert group_advantages(R3, 3, "rloo").tolist() == pytest.approx([-4.5, 0.0, 4.5])
    assert group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2, "rloo").tolist() == [-1.0, 1.0, -3.0, 3.0]


def test_a_group_that_scores_alike_learns_nothing():
    same = torch.tensor([2.0, 2.0, 2.0, 5.0, 5.0, 5.0])
    for estimator in ("grpo", "rloo"):
        assert group_advantages(same, 3, estimator).abs().max().item() == 0.0


def test_several_streams_are_normalised_independently():
    both = group_advantages(torch.stack([R3, C3]), 3, "grpo", eps=0.0)
    assert both.shape == (2, 3)
    assert both[0].tolist() == pytest.approx([-1.0, 0.0, 1.0]) and both[1].tolist() == pytest.approx([-S3, -S3, 2 * S3])


def test_the_costs_are_normalised_before_lambda_combines_them():
    adv_r, adv_c, adv = constrained_group_advantages(R3, C3, 1.0, 3, "grpo", eps=0.0)
    # (Â_r − λ·Â_c)/(1 + λ) with λ = 1: ([−1, 0, 1] − [−1/√3, −1/√3, 2/√3]) / 2
    assert adv.tolist() == pytest.approx([(-1 + S3) / 2, S3 / 2, (1 - 2 * S3) / 2])
    assert adv_r.tolist() == pytest.approx([-1.0, 0.0, 1.0]) and adv_c.tolist() == pytest.approx([-S3, -S3, 2 * S3])
    # The other order — normalising R − λ·C = [−1, 2, 2] — gives another advantage: the order matters.
    other = group_advantages(R3 - C3, 3, "grpo", eps=0.0) / 2
    assert not torch.allclose(adv, other, atol=1e-3)
    # λ = 0 is GRPO on the reward; no costs at all is the same.
    assert torch.allclose(constrained_group_advantages(R3, C3, 0.0, 3, "grpo")[2], group_advantages(R3, 3, "grpo"))
    assert constrained_group_advantages(R3, None, 0.0, 3, "grpo")[1] is None


def test_several_constraints_subtract_each_lambda_and_divide_by_one_plus_their_sum():
    costs = torch.stack([C3, R3])  # constraint 1: Â = [−1/√3, −1/√3, 2/√3]; constraint 2: Â = [−1, 0, 1]
    _, adv_c, adv = constrained_group_advantages(R3, costs, [1.0, 2.0], 3, "grpo", eps=0.0)
    assert adv_c.shape == (2, 3)
    # ([−1, 0, 1] − 1·[−1/√3, −1/√3, 2/√3] − 2·[−1, 0, 1]) / (1 + 1 + 2)
    assert adv.tolist() == pytest.approx([(1 + S3) / 4, S3 / 4, (-1 - 2 * S3) / 4])
    with pytest.raises(ValueError, match="2 constraints need λ of shape"):
        constrained_group_advantages(R3, costs, 1.0, 3, "grpo")


def test_every_response_token_carries_its_episode_s_advantage():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask).tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]


def test_bad_groups_are_errors():
    with pytest.raises(ValueError, match="at least 2 answers"):
        group_advantages(R3, 1, "grpo")
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        group_advantages(R3, 2, "rloo")
    with pytest.raises(ValueError, match="unknown group estimator 'ppo'"):
        group_advantages(R3, 3, "ppo")


def test_kl_loss_is_the_per_sequence_mean_k3_to_the_reference_and_moves_the_policy_towards_it():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    logp_ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # Row 1: x = logp_ref − logp = [−0.5, 1.0], k3 = e^x − 1 − x; row 2 equals the reference (k3 = 0).
    k3 = [math.expm1(-0.5) + 0.5, math.expm1(1.0) - 1.0]
    loss = kl_loss(logp, logp_ref, mask)
    assert loss.item() == pytest.approx((sum(k3) / 2 + 0.0) / 2)
    loss.backward()
    # d k3 / d logp = 1 − e^x: towards the reference on every real token, nothing on padding or at the reference.
    grad = logp.grad
    assert grad[0, 0] > 0 > grad[0, 1] and grad[0, 2] == 0 and grad[1].abs().max() == 0
