"""The demo's round 1 through `saferlhf.rounds.run_round`: PPO-Lag and the PPO and reward-shaping baselines from
one SFT model with given reward and cost models, scored by the ground truth, and the demo's report of it."""

from __future__ import annotations

import json
import math

import pytest

from saferlhf.config import build_config, resolve_preset
from saferlhf.pipeline import DemoResult, DemoSettings, format_table, run_round_one, summary, write_report


def test_round_one_trains_scores_and_reports_every_policy(toy_models, tmp_path):
    result = DemoResult(tmp_path, settings=DemoSettings(eval_prompts=16, red_team_prompts=16))
    overrides = ["run.progress=false", "run.tensorboard=false", "run.max_steps=2", "ppo.rollout_batch_size=8",
                 "ppo.mini_batch_size=4", "rollout.max_new_tokens=8"]
    report = run_round_one(result, toy_models.sft, resolve_preset("tiny-cpu"), overrides,
                           reward_model=toy_models.rm, cost_model=toy_models.cm)
    assert list(result.policies) == ["sft", "ppo_lag", "ppo", "ppo_rs"]
    round_dir = tmp_path / "round_1"
    for name, run in (("ppo_lag", round_dir / "ppo_lag"), ("ppo", round_dir / "baselines" / "ppo"),
                      ("ppo_rs", round_dir / "baselines" / "ppo_rs")):
        metrics = result.policies[name]
        # 16 held-out prompts × 2 samples, each answer harmful or not: a rate of whole answers, in its interval.
        assert metrics["n"] == 32 and metrics["n_harmful"] + metrics["n_benign"] == 32 and metrics["n_harmful"] > 0
        harmful = metrics["harm_rate"] * metrics["n_harmful"]
        assert harmful == pytest.approx(round(harmful), abs=1e-9), metrics
        assert metrics["harm_rate_low"] <= metrics["harm_rate"] <= metrics["harm_rate_high"], metrics
        assert (run / "model" / "config.json").is_file()
        assert [r["step"] for r in result.traces[name]] == [1, 2]
    # Given models: the round trains none and every RL stage used them.
    given = {"rm": str(toy_models.rm.resolve()), "cm": str(toy_models.cm.resolve())}
    assert report["stages"]["models"]["given"] == given
    assert not (round_dir / "models" / "rm").exists()
    assert report["stages"]["samples"]["n_pairs"] == 0 and report["stages"]["labels"]["n_rows"] == 0  # labels=none
    # Round 1's eval stage red-teams its policy on the preset's prompts.
    assert report["metrics"]["prompts"] == 16 and report["stages"]["eval"]["n_responses"] == 16
    # λ moved from lambda_init with the sign of J_C − d at each step (the preset's constraint and threshold).
    lag = build_config("ppo_lag", resolve_preset("tiny-cpu"), overrides)
    lam = [lag.lagrange.lambda_init] + [r["train/lambda"] for r in result.traces["ppo_lag"]]
    for prev, cur, row in zip(lam, lam[1:], result.traces["ppo_lag"]):
        violation = row["train/episode_cost_window"] - lag.lagrange.threshold
        assert math.isfinite(cur) and (cur - prev) * violation > 0, (prev, cur, row)
    assert [r["train/lambda"] for r in result.traces["ppo_rs"]] == [1.0, 1.0]  # reward shaping: fixed λ
    table = format_table(result)
    assert "| ppo_lag |" in table and "PPO-Lag multiplier: λ" in table
    write_report(result)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary(result)))
    assert set(saved) >= {"sft", "round_1", "ppo", "ppo_lag", "ppo_rs", "ppo_lag_lambda"}
    assert saved["ppo_lag_lambda"]["last_step"] == 2
