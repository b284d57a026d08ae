"""KL-shaped reward/cost signals and the end index."""

import torch

from saferlhf.algorithms import end_index, shape_rewards

F64 = torch.float64
NAN = float("nan")


def test_end_index_under_every_padding():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [0, 1, 0, 1, 0],  # padding on both sides and a gap
            [0, 0, 0, 0, 0],  # no token
        ]
    )
    assert end_index(mask).tolist() == [2, 4, 3, -1]
    assert end_index(mask.bool()).tolist() == [2, 4, 3, -1]


def test_shape_rewards_by_hand():
    # β = 0.5, kl_t = logp_old - logp_ref.
    # Row 0, right padding, kl = [0.2, -0.4, 1.0 | pad], R = 3, C = -2:
    #   r = [-0.1, 0.2, -0.5 + 3 = 2.5, 0],  c = [0.1, -0.2, 0.5 - 2 = -1.5, 0]
    # Row 1, left padding, kl = [pad | 0.2, -0.4, 1.0], R = 1, C = 4:
    #   r = [0, -0.1, 0.2, -0.5 + 1 = 0.5],  c = [0, 0.1, -0.2, 0.5 + 4 = 4.5]
    # Row 2, no token: zeros whatever the inputs.
    logp_ref = torch.full((3, 4), -1.0, dtype=F64)
    logp_old = logp_ref + torch.tensor(
        [[0.2, -0.4, 1.0, 9.0], [9.0, 0.2, -0.4, 1.0], [1.0, 2.0, 3.0, 4.0]], dtype=F64
    )
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    rewards, costs = shape_rewards(
        logp_old, logp_ref, mask, torch.tensor([3.0, 1.0, 5.0]), torch.tensor([-2.0, 4.0, 5.0]), 0.5, 50.0
    )
    expected_r = torch.tensor([[-0.1, 0.2, 2.5, 0.0], [0.0, -0.1, 0.2, 0.5], [0.0] * 4], dtype=F64)
    expected_c = torch.tensor([[0.1, -0.2, -1.5, 0.0], [0.0, 0.1, -0.2, 4.5], [0.0] * 4], dtype=F64)
    torch.testing.assert_close(rewards, expected_r)
    torch.testing.assert_close(costs, expected_c)


def test_end_score_lands_on_the_last_real_token_of_a_gapped_row():
    mask = torch.tensor([[1, 0, 1, 0]])
    zeros = torch.zeros(1, 4)
    rewards, costs = shape_rewards(zeros, zeros, mask, torch.tensor([2.0]), torch.tensor([-3.0]), 0.1, 50.0)
    assert rewards.tolist() == [[0.0, 0.0, 2.0, 0.0]]
    assert costs.tolist() == [[0.0, 0.0, -3.0, 0.0]]


def test_clip_applies_after_the_end_score_is_added():
    # End token: -β·kl + R = -0.1·1 + 100 = 99.9 → 5; other token: -β·kl = -0.1·80 = -8 → -5.
    # Cost: 0.1·1 + 4.95 = 5.05 → 5 at the end; 0.1·80 = 8 → 5.
    logp_old, logp_ref = torch.tensor([[80.0, 1.0]], dtype=F64), torch.zeros(1, 2, dtype=F64)
    rewards, costs = shape_rewards(
        logp_old, logp_ref, torch.ones(1, 2), torch.tensor([100.0]), torch.tensor([4.95]), 0.1, 5.0
    )
    torch.testing.assert_close(rewards, torch.tensor([[-5.0, 5.0]], dtype=F64))
    torch.testing.assert_close(costs, torch.tensor([[5.0, 5.0]], dtype=F64))
    # Just inside the range nothing is clipped: 0.1·1 + 4.85 = 4.95.
    _, costs = shape_rewards(
        logp_old, logp_ref, torch.ones(1, 2), torch.tensor([0.0]), torch.tensor([4.85]), 0.1, 5.0
    )
    torch.testing.assert_close(costs[0, 1], torch.tensor(4.95, dtype=F64))


def test_padding_garbage_never_reaches_the_outputs():
    logp_old = torch.tensor([[NAN, -1.0, float("-inf")]])
    logp_ref = torch.tensor([[0.0, -1.5, 0.0]])
    mask = torch.tensor([[0, 1, 0]])
    rewards, costs = shape_rewards(
        logp_old, logp_ref, mask, torch.tensor([1.0]), torch.tensor([2.0]), 0.2, 50.0
    )
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1 + 1.0, 0.0]]))
    torch.testing.assert_close(costs, torch.tensor([[0.0, 0.1 + 2.0, 0.0]]))


def test_bf16_inputs_give_float32_and_agree_with_float64():
    torch.manual_seed(0)
    logp_old, logp_ref = -torch.rand(8, 33, dtype=F64) * 5, -torch.rand(8, 33, dtype=F64) * 5
    mask = (torch.arange(33) < torch.randint(0, 34, (8, 1))).long()
    reward, cost = torch.randn(8, dtype=F64), torch.randn(8, dtype=F64)
    r64, c64 = shape_rewards(logp_old, logp_ref, mask, reward, cost, 0.05, 10.0)
    r32, c32 = shape_rewards(
        logp_old.float(), logp_ref.float(), mask, reward.float(), cost.float(), 0.05, 10.0
    )
    assert r32.dtype == c32.dtype == torch.float32
    torch.testing.assert_close(r32.double(), r64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c32.double(), c64, atol=1e-6, rtol=1e-6)
    r16, _ = shape_rewards(
        logp_old.bfloat16(), logp_ref.bfloat16(), mask, reward.bfloat16(), cost, 0.05, 10.0
    )
    assert r16.dtype == torch.float32
