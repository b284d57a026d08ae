"""The dispatcher ``saferlhf.ops``: which backend serves a call, and that every backend agrees."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from saferlhf import algorithms, csrc, ops

pytest_plugins = ["kernel_fixtures"]  # the fixtures native, triton_impl, impl


def _rollout(batch=4, length=9, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :2] = False
    return dict(
        logits=torch.randn(batch, length, vocab, generator=generator) * 3,
        labels=torch.randint(0, vocab, (batch, length), generator=generator),
        logp_old=-torch.rand(batch, length, generator=generator) * 4,
        logp_ref=-torch.rand(batch, length, generator=generator) * 4,
        values_r=torch.randn(batch, length, generator=generator),
        values_c=torch.randn(batch, length, generator=generator),
        reward=torch.randn(batch, generator=generator),
        cost=torch.randn(batch, generator=generator),
        mask=mask,
    )


def _pipeline(x, lagrange_lambda, device):
    """logprobs (with its gradient), then shaping, then the dual GAE, all through ``ops``, on ``device``."""
    x = {name: tensor.to(device) for name, tensor in x.items()}
    if isinstance(lagrange_lambda, torch.Tensor):
        lagrange_lambda = lagrange_lambda.to(device)
    logits = x["logits"].clone().requires_grad_()
    logp = ops.logprobs(logits, x["labels"], 0.8)
    (logp * torch.linspace(-1, 2, logp.shape[-1], device=device)).sum().backward()
    rewards, costs = ops.shape_rewards(logp.detach(), x["logp_ref"], x["mask"], x["reward"], x["cost"], 0.05, 5.0)
    gae = ops.dual_gae(rewards, costs, x["values_r"], x["values_c"], x["mask"], 1.0, 0.95, lagrange_lambda)
    return [out.cpu() for out in (logp.detach(), logits.grad, rewards, costs, *gae)]


@pytest.mark.parametrize("lagrange_lambda", [0.5, torch.tensor(0.5)])
def test_every_backend_agrees_with_the_reference(monkeypatch, native, triton_impl, lagrange_lambda):
    x = _rollout()
    monkeypatch.setenv("SAFERLHF_OPS", "reference")
    expected = _pipeline(x, lagrange_lambda, "cpu")
    for backend, device in (("native", native.device), ("triton", triton_impl.device)):
        monkeypatch.setenv("SAFERLHF_OPS", backend)
        assert ops.backend_for(x["logits"].to(device)) == backend
        for got, want in zip(_pipeline(x, lagrange_lambda, device), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_default_is_native_on_cpu(monkeypatch, native):
    monkeypatch.delenv("SAFERLHF_OPS", raising=False)
    assert ops.backend_for(torch.zeros(2)) == "native"


def test_float64_always_takes_the_reference(monkeypatch, native):
    x = _rollout()
    for backend in ("native", "triton", "reference"):
        monkeypatch.setenv("SAFERLHF_OPS", backend)
        assert ops.backend_for(x["logits"].double()) == "reference"
    logp = ops.logprobs(x["logits"].double(), x["labels"])
    assert logp.dtype == torch.float64


def test_a_gradient_through_shaping_or_gae_takes_the_reference(monkeypatch, native):
    # The fused shaping and GAE have no backward: a call that needs one must not silently drop it.
    monkeypatch.setenv("SAFERLHF_OPS", "native")
    x = _rollout()
    logp_old = x["logp_old"].clone().requires_grad_()
    rewards, _ = ops.shape_rewards(logp_old, x["logp_ref"], x["mask"], x["reward"], x["cost"], 0.1, 5.0)
    rewards.sum().backward()
    assert logp_old.grad is not None
    lam = torch.tensor(0.5, requires_grad=True)
    *_, adv = ops.dual_gae(x["values_r"], x["values_c"], x["values_r"], x["values_c"], x["mask"], 1.0, 0.9, lam)
    adv.sum().backward()
    assert lam.grad is not None


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("SAFERLHF_OPS", "cuda")
    with pytest.raises(ValueError, match="SAFERLHF_OPS"):
        ops.backend_for(torch.zeros(2))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SAFERLHF_OPS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.backend_for(torch.zeros(2))


def test_failed_build_is_logged_once_and_falls_back(monkeypatch, caplog):
    def broken_build():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(csrc, "_state", {})  # forget the real build for this test
    monkeypatch.setattr(csrc, "_build", broken_build)
    monkeypatch.delenv("SAFERLHF_OPS", raising=False)
    x = _rollout()
    with caplog.at_level(logging.WARNING, logger="saferlhf.csrc"):
        assert ops.backend_for(x["logits"]) == "reference"
        logp = ops.logprobs(x["logits"], x["labels"])
        ops.dual_gae(x["values_r"], x["values_c"], x["values_r"], x["values_c"], x["mask"], 1.0, 0.9, 1.0)
    warnings = [r for r in caplog.records if r.name == "saferlhf.csrc"]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    torch.testing.assert_close(logp, algorithms.gather_logprobs(x["logits"], x["labels"]))
    monkeypatch.setenv("SAFERLHF_OPS", "native")
    with pytest.raises(RuntimeError, match="did not build"):
        ops.backend_for(x["logits"])


def test_import_neither_loads_triton_nor_builds():
    code = (
        "import sys, saferlhf.ops\n"
        "from saferlhf import csrc\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert csrc._state == {}, 'native build attempted'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
