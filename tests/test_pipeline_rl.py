"""The demo's RL comparison: PPO, PPO-Lag and reward shaping from one SFT model, scored by ground truth."""

from __future__ import annotations

import json
import math

from saferlhf.config import resolve_preset
from saferlhf.pipeline import DemoResult, format_table, run_rl_comparison, summary, write_report


def test_rl_comparison_trains_scores_and_reports_every_policy(toy_models, tmp_path):
    result = DemoResult(tmp_path)
    result.policies["sft"] = {"harm_rate": 0.5, "helpfulness": 0.5}
    overrides = ["run.progress=false", "run.tensorboard=false", "run.max_steps=2", "ppo.rollout_batch_size=8",
                 "ppo.mini_batch_size=4", "rollout.max_new_tokens=8"]
    run_rl_comparison(result, toy_models.sft, toy_models.rm, toy_models.cm, resolve_preset("tiny-cpu"), overrides)
    assert list(result.policies) == ["sft", "ppo", "ppo_lag", "ppo_rs"]
    for name in ("ppo", "ppo_lag", "ppo_rs"):
        metrics = result.policies[name]
        assert 0.0 <= metrics["harm_rate"] <= 1.0 and 0.0 <= metrics["helpfulness"] <= 1.0
        assert (tmp_path / name / "model" / "config.json").is_file()
        assert [r["step"] for r in result.traces[name]] == [1, 2]
    lam = [r["train/lambda"] for r in result.traces["ppo_lag"]]
    assert all(math.isfinite(v) and v > 0 for v in lam)
    table = format_table(result)
    assert "| ppo_lag |" in table and "PPO-Lag multiplier: λ" in table
    write_report(result)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary(result)))
    assert set(saved) >= {"sft", "ppo", "ppo_lag", "ppo_rs", "ppo_lag_lambda"}
    assert saved["ppo_lag_lambda"]["last_step"] == 2
