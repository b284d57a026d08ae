"""Lagrange multipliers: update signs, clamps, delay, window, PID behaviour, state round trips."""

import io
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saferlhf.algorithms import LagrangeMultiplier, MultiLagrange, PIDLagrangian, lagrangian_advantage

# ------------------------------------------------------------------------------ LagrangeMultiplier


def test_lambda_rises_while_unsafe_and_falls_once_safe():
    # λ = 1, lr = 0.1, d = 0. J_C = 2: log λ = 0 + 0.1·1·2 = 0.2.
    multiplier = LagrangeMultiplier(lambda_init=1.0, lr=0.1, threshold=0.0)
    assert multiplier.update([2.0]) == pytest.approx(math.exp(0.2), rel=1e-12)
    assert multiplier.last_cost == 2.0
    # The window now holds [2, -4]: J_C = -1, log λ = 0.2 + 0.1·e^0.2·(-1).
    assert multiplier.update(torch.tensor([-4.0])) == pytest.approx(
        math.exp(0.2 - 0.1 * math.exp(0.2)), rel=1e-12
    )
    assert multiplier.last_cost == -1.0


def test_threshold_sets_the_sign_of_the_step():
    below = LagrangeMultiplier(threshold=3.0)
    at = LagrangeMultiplier(threshold=3.0)
    above = LagrangeMultiplier(threshold=3.0)
    assert below.update([2.0]) < 1.0
    assert at.update([3.0]) == 1.0
    assert above.update([4.0]) > 1.0


def test_window_keeps_the_most_recent_costs():
    multiplier = LagrangeMultiplier(window=2, lr=0.0)
    multiplier.update([1.0, 2.0, 3.0])  # window [2, 3]
    assert multiplier.last_cost == 2.5
    multiplier.update([5.0])  # window [3, 5]
    assert multiplier.last_cost == 4.0
    multiplier.update([])  # nothing new: the same window
    assert multiplier.last_cost == 4.0
    assert multiplier.state_dict()["window"] == [3.0, 5.0]


def test_lambda_is_clamped_at_lambda_max():
    multiplier = LagrangeMultiplier(lambda_init=4.0, lr=1.0, lambda_max=5.0, window=1)
    assert multiplier.update([100.0]) == pytest.approx(5.0, rel=1e-12)
    assert multiplier.update([100.0]) == pytest.approx(5.0, rel=1e-12)
    # From the clamp it comes down as soon as the policy is safe: log λ = log 5 + 1·5·(-0.1).
    assert multiplier.update([-0.1]) == pytest.approx(5.0 * math.exp(-0.5), rel=1e-9)


def test_delay_postpones_the_updates_but_records_costs():
    multiplier = LagrangeMultiplier(lambda_init=2.0, lr=0.1, delay=2)
    assert multiplier.update([1.0]) == 2.0
    assert multiplier.update([3.0]) == 2.0
    assert multiplier.last_cost == 2.0
    # Third call: J_C over the three recorded costs = (1 + 3 + 5)/3 = 3; log λ = log 2 + 0.1·2·3.
    assert multiplier.update([5.0]) == pytest.approx(2.0 * math.exp(0.6), rel=1e-12)


def test_value_and_tensor():
    multiplier = LagrangeMultiplier(lambda_init=0.5)
    assert multiplier.value == pytest.approx(0.5, rel=1e-15)
    assert multiplier.tensor.dtype == torch.float32 and multiplier.tensor.shape == ()
    assert multiplier.tensor.item() == pytest.approx(0.5)


def test_non_finite_costs_raise_and_leave_the_state_untouched():
    multiplier = LagrangeMultiplier()
    multiplier.update([1.0])
    before = multiplier.state_dict()
    with pytest.raises(ValueError, match=r"nan at index 1, inf at index 2"):
        multiplier.update(torch.tensor([0.0, float("nan"), float("inf")]))
    with pytest.raises(ValueError, match=r"-inf at index 0"):
        multiplier.update([float("-inf")])
    assert multiplier.state_dict() == before


def test_an_empty_window_is_an_error():
    with pytest.raises(ValueError, match="no episode costs"):
        LagrangeMultiplier().update([])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_init": 6.0, "lambda_max": 5.0}, "must not exceed lambda_max"),
        ({"lambda_init": 0.0}, "lambda_init must be > 0"),
        ({"lambda_init": -1.0}, "lambda_init must be > 0"),
        ({"lr": -0.1}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lambda_max": float("inf")}, "lambda_max must be finite"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"window": 0}, "window must be an int >= 1"),
        ({"delay": -1}, "delay must be an int >= 0"),
        ({"delay": 1.5}, "delay must be an int >= 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LagrangeMultiplier(**kwargs)


def test_lambda_stays_in_range_under_extreme_costs():
    rng = random.Random(0)
    multiplier = LagrangeMultiplier(lr=0.5, lambda_max=5.0, window=4)
    for _ in range(500):
        scale = 10.0 ** rng.uniform(-3, 6)
        multiplier.update([rng.uniform(-scale, scale) for _ in range(3)])
        assert 0.0 <= multiplier.value <= 5.0 * (1 + 1e-12)
        assert not math.isnan(multiplier.value)


def _round_trip_via_torch_save(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_lagrange_state_dict_round_trip_is_exact():
    original = LagrangeMultiplier(lr=0.3, delay=1, window=3)
    for costs in ([0.1, 0.7], [2.0 / 3.0], [-0.25, 1e-3]):
        original.update(costs)
    restored = LagrangeMultiplier(lr=0.3, delay=1, window=3)
    restored.load_state_dict(_round_trip_via_torch_save(original.state_dict()))
    assert restored.state_dict() == original.state_dict()
    for costs in ([0.5], [-1.0, 3.0]):
        assert restored.update(costs) == original.update(costs)


def test_loading_under_a_smaller_lambda_max_clamps():
    saved = LagrangeMultiplier(lambda_init=4.0, lambda_max=5.0).state_dict()
    restored = LagrangeMultiplier(lambda_init=1.0, lambda_max=2.0)
    restored.load_state_dict(saved)
    assert restored.value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"log_lambda": 0.0})
    with pytest.raises(ValueError, match="saved log_lambda"):
        restored.load_state_dict({**saved, "log_lambda": float("nan")})


# ----------------------------------------------------------------------------------- PIDLagrangian


def test_pid_proportional_term():
    # λ = clip(Kp·e, 0, λ_max) with λ_init = 0 and Ki = Kd = 0 (window 1: J_C is the last cost).
    pid = PIDLagrangian(kp=2.0, ki=0.0, kd=0.0, threshold=1.0, window=1, lambda_init=0.0)
    assert pid.update([1.5]) == 1.0  # 2·0.5
    assert pid.update([0.0]) == 0.0  # 2·(-1) clipped at 0
    assert pid.update([100.0]) == 5.0  # clipped at λ_max


def test_pid_integral_is_clamped_at_zero_anti_windup():
    pid = PIDLagrangian(kp=0.0, ki=0.5, kd=0.0, window=1, lambda_init=0.0)
    assert pid.update([1.0]) == 0.5
    assert pid.update([1.0]) == 1.0
    # A large negative error empties the integral but cannot push it below 0 ...
    assert pid.update([-3.0]) == 0.0
    assert pid.state_dict()["integral"] == 0.0
    # ... so the next violation is answered at once (without the clamp: -0.5 + 0.5 = 0).
    assert pid.update([1.0]) == 0.5


def test_pid_integral_does_not_wind_up_above_lambda_max():
    pid = PIDLagrangian(kp=0.0, ki=1.0, kd=0.0, window=1, lambda_max=2.0, lambda_init=0.0)
    for _ in range(10):
        assert pid.update([5.0]) <= 2.0
    assert pid.state_dict()["integral"] == 2.0
    # Safe again: λ drops right away instead of unwinding 50 - 2 of banked integral first.
    assert pid.update([-1.0]) == 1.0


def test_pid_derivative_term():
    pid = PIDLagrangian(kp=0.0, ki=0.0, kd=1.0, window=1, lambda_init=0.0)
    assert pid.update([1.0]) == 0.0  # first update: Δe = 0
    assert pid.update([3.0]) == 2.0  # Δe = 2
    assert pid.update([2.0]) == 0.0  # Δe = -1, clipped at 0
    assert pid.update([2.5]) == 0.5


def test_pid_starts_from_lambda_init_and_respects_the_delay():
    # The integral starts at λ_init: with e = 0 the first update keeps λ = λ_init.
    pid = PIDLagrangian(kp=1.0, ki=0.1, kd=1.0, window=1, lambda_init=1.5, delay=1)
    assert pid.value == 1.5
    assert pid.update([10.0]) == 1.5  # delayed
    assert pid.update([0.0]) == 1.5  # e = 0, Δe = 0 (first real update)
    assert pid.update([1.0]) == pytest.approx(1.0 + 1.6 + 1.0)  # Kp·1 + (1.5 + 0.1·1) + Kd·1


def test_pid_state_dict_round_trip_and_validation():
    original = PIDLagrangian(kp=0.3, ki=0.2, kd=0.1, window=3)
    for costs in ([0.1, 0.7], [2.0 / 3.0], [-0.25]):
        original.update(costs)
    restored = PIDLagrangian(kp=0.3, ki=0.2, kd=0.1, window=3)
    restored.load_state_dict(_round_trip_via_torch_save(original.state_dict()))
    assert restored.state_dict() == original.state_dict()
    assert restored.update([1.25]) == original.update([1.25])
    with pytest.raises(ValueError, match="kp must be >= 0"):
        PIDLagrangian(kp=-1.0, ki=0.0, kd=0.0)
    with pytest.raises(ValueError, match="lambda_init must lie in"):
        PIDLagrangian(kp=1.0, ki=0.0, kd=0.0, lambda_init=6.0)
    with pytest.raises(ValueError, match="finite"):
        PIDLagrangian(kp=1.0, ki=0.0, kd=0.0).update([float("nan")])


# ------------------------------------------------------------------------------------ MultiLagrange


def _two_constraints():
    return [LagrangeMultiplier(threshold=0.0), PIDLagrangian(kp=1.0, ki=0.5, kd=0.0, threshold=1.0)]


def test_multi_lagrange_updates_each_constraint_independently():
    multi, alone = MultiLagrange(_two_constraints()), _two_constraints()
    costs = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.5, 4.0]])
    assert multi.update(costs) == [alone[0].update(costs[0]), alone[1].update(costs[1])]
    assert multi.last_cost == [2.0, 1.5]
    assert multi.update([[-1.0], [9.0, 9.0]]) == [alone[0].update([-1.0]), alone[1].update([9.0, 9.0])]
    assert multi.tensor.shape == (2,) and multi.tensor.dtype == torch.float32
    # (K,) λ feeds lagrangian_advantage with K cost advantages.
    adv = lagrangian_advantage(torch.ones(1, 3), torch.ones(2, 1, 3), multi.tensor)
    assert adv.shape == (1, 3)


def test_multi_lagrange_validates_before_updating():
    multi = MultiLagrange(_two_constraints())
    multi.update([[1.0], [1.0]])
    before = multi.state_dict()
    with pytest.raises(ValueError, match="expected costs for 2 constraints"):
        multi.update([[1.0]])
    with pytest.raises(ValueError, match="nan at index 0"):
        multi.update([[2.0], [float("nan")]])
    assert multi.state_dict() == before
    restored = MultiLagrange(_two_constraints())
    restored.load_state_dict(_round_trip_via_torch_save(before))
    assert restored.state_dict() == before
    with pytest.raises(ValueError, match="saved state has 2 multipliers"):
        MultiLagrange(_two_constraints()[:1]).load_state_dict(before)


# ------------------------------------------------------------------------------------- distributed


def _distributed_worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Rank 0 saw three episodes, rank 1 one: the pooled J_C is (1 + 2 + 3 + 10)/4 = 4, not the
        # mean of the rank means (2 + 10)/2 = 6.
        from saferlhf.distributed import all_reduce_sum

        multiplier = LagrangeMultiplier(lr=0.1, pool=all_reduce_sum)
        value = multiplier.update([1.0, 2.0, 3.0] if rank == 0 else [10.0])
        multi = MultiLagrange([LagrangeMultiplier(lr=0.1), LagrangeMultiplier(lr=0.1)], pool=all_reduce_sum)
        values = multi.update([[1.0, 2.0, 3.0], [0.0]] if rank == 0 else [[10.0], [4.0, 4.0]])
        results[rank] = (multiplier.last_cost, value, multi.last_cost, values)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_costs_are_pooled_over_ranks_and_lambda_agrees(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
    expected = (4.0, math.exp(0.1 * 4.0), [4.0, 8.0 / 3.0], [math.exp(0.4), math.exp(0.1 * 8.0 / 3.0)])
    for rank in range(2):
        last_cost, value, multi_costs, multi_values = results[rank]
        assert last_cost == expected[0] and value == pytest.approx(expected[1], rel=1e-12)
        assert multi_costs == pytest.approx(expected[2], rel=1e-12)
        assert multi_values == pytest.approx(expected[3], rel=1e-12)
    assert results[0] == results[1]
