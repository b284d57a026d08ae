"""GAE, the Lagrangian advantage and their composition dual_gae."""

import pytest
import torch

from saferlhf.algorithms import dual_gae, gae, lagrangian_advantage

F64 = torch.float64
NAN = float("nan")

# The 3-token example, by hand (γ = 0.9, λ_gae = 0.8, so γ·λ_gae = 0.72; V after the end = 0):
#   r = [0, 0, 1],  V = [0.5, 0.2, 0.4]
#   δ_2 = 1 + 0.9·0   - 0.4 =  0.6
#   δ_1 = 0 + 0.9·0.4 - 0.2 =  0.16
#   δ_0 = 0 + 0.9·0.2 - 0.5 = -0.32
#   A_2 = 0.6
#   A_1 = 0.16  + 0.72·0.6   = 0.592
#   A_0 = -0.32 + 0.72·0.592 = 0.10624
#   G = A + V = [0.60624, 0.792, 1.0]
REWARDS = [0.0, 0.0, 1.0]
VALUES = [0.5, 0.2, 0.4]
ADVANTAGES = [0.10624, 0.592, 0.6]
RETURNS = [0.60624, 0.792, 1.0]
GAMMA, LAM = 0.9, 0.8


def t64(rows):
    return torch.tensor(rows, dtype=F64)


def test_three_token_example_by_hand():
    adv, ret = gae(t64([REWARDS]), t64([VALUES]), torch.ones(1, 3), GAMMA, LAM)
    torch.testing.assert_close(adv, t64([ADVANTAGES]))
    torch.testing.assert_close(ret, t64([RETURNS]))


def test_right_padding_ignores_garbage_after_the_end():
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = gae(t64([REWARDS + [NAN, 7.0]]), t64([VALUES + [NAN, 3.0]]), mask, GAMMA, LAM)
    torch.testing.assert_close(adv, t64([ADVANTAGES + [0.0, 0.0]]))
    torch.testing.assert_close(ret, t64([RETURNS + [0.0, 0.0]]))


def test_left_padding_does_not_leak_into_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    adv, ret = gae(t64([[5.0, NAN] + REWARDS]), t64([[NAN, 9.0] + VALUES]), mask, GAMMA, LAM)
    torch.testing.assert_close(adv, t64([[0.0, 0.0] + ADVANTAGES]))
    torch.testing.assert_close(ret, t64([[0.0, 0.0] + RETURNS]))


def test_a_gap_is_skipped_as_if_it_were_not_there():
    mask = torch.tensor([[1, 0, 1, 1]])
    rewards = t64([[REWARDS[0], 4.0, REWARDS[1], REWARDS[2]]])
    values = t64([[VALUES[0], NAN, VALUES[1], VALUES[2]]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close(adv, t64([[ADVANTAGES[0], 0.0, ADVANTAGES[1], ADVANTAGES[2]]]))
    torch.testing.assert_close(ret, t64([[RETURNS[0], 0.0, RETURNS[1], RETURNS[2]]]))


def test_fully_masked_row_is_zero_and_rows_are_independent():
    rewards = t64([REWARDS, [1.0, 2.0, 3.0]])
    values = t64([VALUES, [NAN, NAN, NAN]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    adv, ret = gae(rewards, values, mask, GAMMA, LAM)
    torch.testing.assert_close(adv, t64([ADVANTAGES, [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, t64([RETURNS, [0.0, 0.0, 0.0]]))


def test_gamma_one_lambda_one_is_monte_carlo():
    # With γ = λ_gae = 1 the advantage telescopes to (reward-to-go) - V_t and the return is the
    # reward-to-go itself, whatever the values.
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7, dtype=F64), torch.randn(3, 7, dtype=F64)
    mask = torch.ones(3, 7)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, reward_to_go)
    torch.testing.assert_close(adv, reward_to_go - values)


def test_lambda_zero_is_one_step_td():
    torch.manual_seed(1)
    rewards, values = torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64)
    adv, _ = gae(rewards, values, torch.ones(2, 5), 0.7, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=F64)], dim=1)
    torch.testing.assert_close(adv, rewards + 0.7 * next_values - values)


def test_float32_agrees_with_float64_on_long_rows():
    torch.manual_seed(2)
    rewards, values = torch.randn(4, 1000, dtype=F64), torch.randn(4, 1000, dtype=F64)
    mask = (torch.arange(1000) < torch.tensor([[1000], [517], [1], [0]])).long()
    adv64, ret64 = gae(rewards, values, mask, 1.0, 0.95)
    adv32, ret32 = gae(rewards.float(), values.float(), mask, 1.0, 0.95)
    assert adv32.dtype == torch.float32
    # Each step adds one float32 rounding of an O(1) quantity to an O(20) running sum.
    torch.testing.assert_close(adv32.double(), adv64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ret32.double(), ret64, atol=1e-4, rtol=1e-4)


def test_lagrangian_advantage_by_hand():
    adv_r, adv_c = t64([[1.0, 0.0]]), t64([[2.0, -1.0]])
    # λ = 1: ((1 - 2)/2, (0 + 1)/2); λ = 0: A_r.
    torch.testing.assert_close(lagrangian_advantage(adv_r, adv_c, 1.0), t64([[-0.5, 0.5]]))
    torch.testing.assert_close(lagrangian_advantage(adv_r, adv_c, 0.0), adv_r)
    torch.testing.assert_close(lagrangian_advantage(adv_r, adv_c, torch.tensor(3.0)), t64([[-1.25, 0.75]]))


def test_lagrangian_advantage_keeps_a_tensor_lambda_in_the_graph():
    # d/dλ (A_r - λ A_c)/(1 + λ) = -(A_r + A_c)/(1 + λ)²  =  -(1 + 2)/4 at λ = 1.
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    lagrangian_advantage(t64([1.0]), t64([2.0]), lam).sum().backward()
    torch.testing.assert_close(lam.grad, torch.tensor(-0.75, dtype=F64))


def test_lagrangian_advantage_with_several_constraints():
    adv_r = t64([[1.0, 2.0]])
    adv_c = t64([[[1.0, 0.0]], [[0.0, 1.0]]])  # (K=2, B=1, T=2)
    # λ = (1, 2): ((1 - 1·1 - 2·0)/4, (2 - 1·0 - 2·1)/4) = (0, 0)
    torch.testing.assert_close(lagrangian_advantage(adv_r, adv_c, [1.0, 2.0]), t64([[0.0, 0.0]]))
    # λ = (0.5, 0): (1 - 0.5)/1.5, 2/1.5
    torch.testing.assert_close(
        lagrangian_advantage(adv_r, adv_c, torch.tensor([0.5, 0.0])), t64([[1 / 3, 4 / 3]])
    )
    # One constraint stacked as K = 1 is the single-constraint formula.
    single = lagrangian_advantage(adv_r, adv_c[0], 0.7)
    torch.testing.assert_close(lagrangian_advantage(adv_r, adv_c[:1], [0.7]), single)


def test_lagrangian_advantage_rejects_mismatched_lambda():
    with pytest.raises(ValueError, match="one constraint needs one"):
        lagrangian_advantage(t64([1.0]), t64([1.0]), [1.0, 2.0])
    with pytest.raises(ValueError, match="2 constraints need"):
        lagrangian_advantage(t64([1.0]), t64([[1.0], [2.0]]), 1.0)
    with pytest.raises(ValueError, match="adv_c must have"):
        lagrangian_advantage(t64([1.0]), t64([[[1.0]]]), 1.0)


def _random_batch(seed, *shape):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=F64)


# Right padding, left padding, a gap and an empty row.
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]])


def test_dual_gae_is_two_gaes_and_the_lagrangian_advantage():
    rewards, costs = _random_batch(0, 4, 6), _random_batch(1, 4, 6)
    values_r, values_c = _random_batch(2, 4, 6), _random_batch(3, 4, 6)
    adv_r, ret_r, adv_c, ret_c, adv = dual_gae(rewards, costs, values_r, values_c, MASK, 0.99, 0.95, 1.5)
    expected_r = gae(rewards, values_r, MASK, 0.99, 0.95)
    expected_c = gae(costs, values_c, MASK, 0.99, 0.95)
    torch.testing.assert_close((adv_r, ret_r), expected_r)
    torch.testing.assert_close((adv_c, ret_c), expected_c)
    torch.testing.assert_close(adv, lagrangian_advantage(expected_r[0], expected_c[0], 1.5))
    assert torch.all(adv[MASK == 0] == 0)


def test_dual_gae_with_several_constraints():
    rewards, values_r = _random_batch(4, 4, 6), _random_batch(5, 4, 6)
    costs, values_c = _random_batch(6, 3, 4, 6), _random_batch(7, 3, 4, 6)
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    adv_r, ret_r, adv_c, ret_c, adv = dual_gae(rewards, costs, values_r, values_c, MASK, 1.0, 0.9, lam)
    assert adv_c.shape == ret_c.shape == (3, 4, 6)
    for k in range(3):
        torch.testing.assert_close((adv_c[k], ret_c[k]), gae(costs[k], values_c[k], MASK, 1.0, 0.9))
    torch.testing.assert_close(adv, lagrangian_advantage(adv_r, adv_c, lam))
