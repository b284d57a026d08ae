"""The constraint forms of PPO-Lagrangian (saferlhf.algorithms.constraints) on hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from saferlhf.algorithms.constraints import CONSTRAINTS, constraint_costs

COSTS = torch.tensor([-5.0, -0.5, 0.0, 0.5, 3.0])


def test_mean_cost_is_the_paper_s_signed_cost_for_both():
    episode, stream = constraint_costs(COSTS, "mean_cost")
    assert torch.equal(episode, COSTS) and torch.equal(stream, COSTS)
    # J_C over these five episodes: (−5 − 0.5 + 0 + 0.5 + 3)/5 = −0.4, so d = 0 is met with two of five unsafe.
    assert episode.mean().item() == pytest.approx(-0.4)


def test_unsafe_rate_reads_the_verdict_and_follows_its_probability():
    episode, stream = constraint_costs(COSTS, "unsafe_rate", temperature=2.0)
    assert episode.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # C > 0 is unsafe; a score of exactly 0 is not
    assert episode.mean().item() == pytest.approx(0.4)  # J_C: two of five answers unsafe
    expected = [1 / (1 + math.exp(-c / 2.0)) for c in COSTS.tolist()]  # σ(C / τ)
    assert stream.tolist() == pytest.approx(expected)
    assert 0 < stream.min() and stream.max() < 1
    sharp = constraint_costs(COSTS, "unsafe_rate", temperature=1e-3)[1]  # τ → 0 approaches the indicator
    assert sharp.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-6)


def test_rectified_costs_only_what_is_unsafe():
    episode, stream = constraint_costs(COSTS, "rectified")
    assert episode.tolist() == [0.0, 0.0, 0.0, 0.5, 3.0] and torch.equal(episode, stream)
    # No safety compensation: the very safe first answer does not offset the unsafe ones.
    assert episode.mean().item() == pytest.approx(0.7) and COSTS.mean().item() < 0


def test_bad_forms_and_temperatures_are_errors():
    with pytest.raises(ValueError, match="unknown constraint 'median'"):
        constraint_costs(COSTS, "median")
    with pytest.raises(ValueError, match="temperature"):
        constraint_costs(COSTS, "unsafe_rate", temperature=0.0)
    assert CONSTRAINTS == ("mean_cost", "unsafe_rate", "rectified")


def test_the_config_refuses_bad_constraints_before_any_model_loads():
    from saferlhf.config import ConfigError, build_config

    for override, key in (("lagrange.constraint=median", "lagrange.constraint"),
                          ("lagrange.threshold=1.5", "lagrange.threshold"),
                          ("lagrange.threshold=-0.1", "lagrange.threshold"),
                          ("lagrange.cost_temperature=0", "lagrange.cost_temperature")):
        extra = [] if "constraint=" in override or "temperature" in override else ["lagrange.constraint=unsafe_rate"]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config("ppo_lag", None, [override, *extra])
    with pytest.raises(ConfigError, match=r"lagrange\.threshold"):
        build_config("ppo_lag", None, ["lagrange.constraint=rectified", "lagrange.threshold=-1"])
    assert build_config("ppo_lag", None, ["lagrange.constraint=unsafe_rate", "lagrange.threshold=0.05"])
