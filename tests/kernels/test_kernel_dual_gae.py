"""Fused dual GAE (native, Triton scan, Triton loop) against ``algorithms.dual_gae``, three ways."""

from __future__ import annotations

import functools

import pytest
import torch
from kernel_inputs import padding_mask

from saferlhf.algorithms import dual_gae

pytest_plugins = ["kernel_fixtures"]  # the fixtures native, triton_impl, impl, three_way


@pytest.fixture(params=["native", "triton-scan", "triton-loop"])
def fused(request):
    """(dual_gae function, device) of each implementation."""
    if request.param == "native":
        native = request.getfixturevalue("native")
        return native.dual_gae, native.device
    triton_impl = request.getfixturevalue("triton_impl")
    method = request.param.removeprefix("triton-")
    return functools.partial(triton_impl.dual_gae, method=method), triton_impl.device


def _inputs(batch, length, device, constraints=None, seed=0):
    """rewards, costs, values_r, values_c, mask; costs and values_c get a leading K if given."""
    generator = torch.Generator().manual_seed(seed)
    cost_shape = (batch, length) if constraints is None else (constraints, batch, length)
    rewards = torch.randn(batch, length, generator=generator)
    costs = torch.randn(*cost_shape, generator=generator)
    values_r = torch.randn(batch, length, generator=generator) * 3
    values_c = torch.randn(*cost_shape, generator=generator) * 3
    mask = padding_mask(batch, length)
    # Masked positions may hold anything: they are skipped.
    rewards[~mask] = float("nan")
    values_r[~mask] = float("inf")
    return [x.to(device) for x in (rewards, costs, values_r, values_c, mask)]


def _check(fused_fn, inputs, gamma, lam, lagrange_lambda, three_way):
    rewards, costs, values_r, values_c, mask = inputs
    out = fused_fn(rewards, costs, values_r, values_c, mask, gamma, lam, lagrange_lambda)
    ref = dual_gae(rewards, costs, values_r, values_c, mask, gamma, lam, lagrange_lambda)
    lambda64 = lagrange_lambda.double() if isinstance(lagrange_lambda, torch.Tensor) else lagrange_lambda
    ref64 = dual_gae(rewards.double(), costs.double(), values_r.double(), values_c.double(), mask, gamma, lam, lambda64)
    for got, expected, exact in zip(out, ref, ref64):
        assert torch.isfinite(got).all()
        three_way(got, expected, exact)
    adv_r, ret_r, adv_c, ret_c, _ = out
    padding = ~mask
    assert (adv_r[padding] == 0).all() and (ret_r[padding] == 0).all()
    assert (adv_c[..., padding] == 0).all() and (ret_c[..., padding] == 0).all()


@pytest.mark.parametrize("lagrange_lambda", [0.7, "tensor"])
def test_three_way(fused, lagrange_lambda, three_way):
    fused_fn, device = fused
    if lagrange_lambda == "tensor":
        lagrange_lambda = torch.tensor(2.5, device=device)
    _check(fused_fn, _inputs(10, 37, device), 0.99, 0.95, lagrange_lambda, three_way)


def test_several_constraints(fused, three_way):
    fused_fn, device = fused
    lambdas = torch.tensor([0.1, 0.5, 2.0], device=device)
    _check(fused_fn, _inputs(5, 29, device, constraints=3), 1.0, 0.9, lambdas, three_way)


def test_rows_longer_than_one_block(fused, three_way):
    # T = 1500 > the scan's block of 1024: the state crosses a block boundary (with the padding of
    # the left-padded row straddling it).
    fused_fn, device = fused
    _check(fused_fn, _inputs(2, 1500, device), 1.0, 0.95, 1.0, three_way)


def test_by_hand(fused):
    # γ = 1, λ_gae = 1: A_t = Σ_{s ≥ t} r_s - V_t over the real tokens; with λ = 1, A = (A_r - A_c)/2.
    fused_fn, device = fused
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]], device=device)
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]], device=device)
    mask = torch.tensor([[1, 1, 1, 0]], device=device)
    costs = torch.zeros_like(rewards)
    adv_r, ret_r, adv_c, ret_c, adv = fused_fn(rewards, costs, values, torch.zeros_like(values), mask, 1.0, 1.0, 1.0)
    expected_adv = torch.tensor([[5.5, 4.5, 2.5, 0.0]], device=device)
    torch.testing.assert_close(adv_r, expected_adv)
    torch.testing.assert_close(ret_r, torch.tensor([[6.0, 5.0, 3.0, 0.0]], device=device))
    torch.testing.assert_close(adv_c, torch.zeros_like(adv_c))
    torch.testing.assert_close(adv, expected_adv / 2)


def test_lambda_count_must_match_the_constraints(fused):
    fused_fn, device = fused
    inputs = _inputs(2, 5, device, constraints=2)
    with pytest.raises(ValueError, match="cost streams"):
        fused_fn(*inputs, 1.0, 0.95, torch.tensor([1.0], device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["scan", "loop"])
def test_cuda_training_shape(triton_impl, method, three_way):
    fn = functools.partial(triton_impl.dual_gae, method=method)
    _check(fn, _inputs(64, 1024, "cuda"), 1.0, 0.95, torch.tensor(1.0, device="cuda"), three_way)
