"""Fused reward shaping (native and Triton) against ``algorithms.shape_rewards``, three ways."""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import padding_mask

from saferlhf.algorithms import shape_rewards

pytest_plugins = ["kernel_fixtures"]  # the fixtures native, triton_impl, impl, three_way


def _inputs(batch, length, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 6
    logp_ref = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 6
    reward = torch.randn(batch, generator=generator, dtype=torch.float64) * 8
    cost = torch.randn(batch, generator=generator, dtype=torch.float64) * 8
    mask = padding_mask(batch, length, single_token=True)
    # Padding log-probs may be anything, nan and inf included: they must never reach an output.
    logp_old[~mask] = float("nan")
    logp_ref[~mask] = float("-inf")
    tensors = [x.to(dtype).to(device) for x in (logp_old, logp_ref, reward, cost)]
    return (*tensors[:2], mask.to(device), *tensors[2:])


@pytest.mark.parametrize("length", [23, 1500])  # one block; several blocks with the end in each
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_way(impl, dtype, length, three_way):
    logp_old, logp_ref, mask, reward, cost = _inputs(12, length, dtype, impl.device)
    # β·kl reaches ±9 and R, C reach ±20: clip = 10 is active on both ends.
    args = (0.5, 10.0)
    out = impl.shape_rewards(logp_old, logp_ref, mask, reward, cost, *args)
    ref = shape_rewards(logp_old, logp_ref, mask, reward, cost, *args)
    ref64 = shape_rewards(logp_old.double(), logp_ref.double(), mask, reward.double(), cost.double(), *args)
    for got, expected, exact in zip(out, ref, ref64):
        assert torch.isfinite(got).all()
        three_way(got, expected, exact)
        assert (got[~mask] == 0).all()


def test_end_score_lands_on_the_last_real_token(impl):
    # Zero KL: the only non-zero entry of each row is its end score, at its last real position.
    logp, _, mask, reward, cost = _inputs(6, 11, torch.float32, impl.device)
    logp = torch.where(mask, logp, 0.0)
    rewards, costs = impl.shape_rewards(logp, logp, mask, reward, cost, 0.1, 100.0)
    for row in range(6):
        real = mask[row].nonzero().flatten()
        expected_r = torch.zeros(11, device=impl.device)
        expected_c = torch.zeros(11, device=impl.device)
        if len(real):
            expected_r[real[-1]], expected_c[real[-1]] = reward[row], cost[row]
        torch.testing.assert_close(rewards[row], expected_r, rtol=0, atol=0)
        torch.testing.assert_close(costs[row], expected_c, rtol=0, atol=0)


def test_float_mask_is_read_as_nonzero(impl):
    logp_old, logp_ref, mask, reward, cost = _inputs(6, 9, torch.float32, impl.device)
    as_bool = impl.shape_rewards(logp_old, logp_ref, mask, reward, cost, 0.1, 5.0)
    as_float = impl.shape_rewards(logp_old, logp_ref, mask.float(), reward, cost, 0.1, 5.0)
    for a, b in zip(as_bool, as_float):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
