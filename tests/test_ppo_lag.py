"""The PPO-Lagrangian trainer on the toy-world models: it runs, logs, and resumes exactly."""

from __future__ import annotations

import shutil

import pytest
from helpers import comparable, stage_config

from saferlhf.rollout.vllm_engine import vllm_available
from saferlhf.trainers.common import read_metrics
from saferlhf.trainers.ppo_lag import train_ppo


def _cfg(toy_models, out_dir, stage="ppo_lag", *extra):
    return stage_config(stage, out_dir, toy_models.sft, f"ppo.reward_model={toy_models.rm}",
                        f"ppo.cost_model={toy_models.cm}", "run.log_every=1", "ppo.rollout_batch_size=16",
                        "ppo.mini_batch_size=8", "rollout.max_new_tokens=16", "run.deterministic=true", *extra)


BACKENDS = ["vllm", "hf"] if vllm_available() else ["hf"]


@pytest.mark.parametrize("stage,backend", [("ppo_lag", b) for b in BACKENDS] + [("ppo", BACKENDS[0]),
                                                                                ("ppo_rs", BACKENDS[0])])
def test_every_mode_runs_and_logs_its_metrics(toy_models, tmp_path, stage, backend):
    final = train_ppo(_cfg(toy_models, tmp_path / stage, stage, "run.max_steps=2", f"rollout.backend={backend}",
                           "rollout.verify_sync=true", "rollout.sync_bucket_mb=1"))
    rows = [r for r in read_metrics(tmp_path / stage / "metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("train/reward", "train/cost", "train/kl", "train/actor_loss", "train/reward_critic_loss",
                "train/entropy", "train/response_length", "time/generate", "time/score", "time/learn",
                "rollout/tokens_per_second"):
        assert key in final, key
    for r in rows:  # the engine took every update, checked against the actor on probe prompts
        assert ("sync/seconds" in r) == (backend == "vllm")
        if backend == "vllm":
            assert r["sync/verified"] == 1.0 and r["sync/max_logprob_diff"] <= 1e-4
            assert r["sync/seconds"] > 0 and r["time/sync"] >= r["sync/seconds"]
            assert r["sync/buckets"] >= 2  # 1 MiB buckets: the ~2 MB model goes in several calls
    assert ("train/cost_critic_loss" in final) == (stage == "ppo_lag")
    assert ("train/lambda" in final) == (stage != "ppo")
    assert (tmp_path / stage / "model" / "config.json").is_file()
    assert list((tmp_path / stage / "plots").glob("*.png"))


def test_resume_from_a_checkpoint_reproduces_the_following_steps(toy_models, tmp_path):
    full = tmp_path / "full"
    train_ppo(_cfg(toy_models, full, "ppo_lag", "run.max_steps=4", "run.save_every=2"))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    train_ppo(_cfg(toy_models, resumed, "ppo_lag", "run.max_steps=4", "run.save_every=2", "run.resume=true"))
    after = lambda d: [comparable(r) for r in read_metrics(d / "metrics.jsonl") if r["step"] > 2]  # noqa: E731
    assert after(resumed) == after(full)
    assert len(after(full)) == 2


def test_reference_ops_and_the_default_ops_train_the_same(toy_models, tmp_path, monkeypatch):
    """The toy-world PPO-Lag run with SAFERLHF_OPS=reference matches the default (native) ops, step by step.

    Both sides are counted: the default run must actually reach the native operators (without a C++ compiler
    both sides would be the reference and the comparison would prove nothing), the reference run none."""
    from collections import Counter

    from saferlhf import csrc, ops

    if csrc.load() is None:
        pytest.skip("the native ops did not build here: both runs would use the reference")
    calls: Counter = Counter()
    original = ops.backend_for

    def counting(tensor):
        backend = original(tensor)
        calls[backend] += 1
        return backend

    monkeypatch.setattr(ops, "backend_for", counting)
    # A gentle run (the signed cost, slow λ, lr 1e-4): the comparison is of the ops, and a fast-moving policy
    # would turn the float-rounding differences of three steps into different clip counts.
    steps = ["run.max_steps=3", "optim.lr=1e-4", "lagrange.constraint=mean_cost", "lagrange.lr=0.004",
             "lagrange.lambda_max=5"]
    fused = train_ppo(_cfg(toy_models, tmp_path / "default", "ppo_lag", *steps))
    assert calls["native"] > 0 and calls["reference"] == 0, calls
    calls.clear()
    monkeypatch.setenv("SAFERLHF_OPS", "reference")
    plain = train_ppo(_cfg(toy_models, tmp_path / "reference", "ppo_lag", *steps))
    assert calls["reference"] > 0 and calls["native"] == 0, calls
    rows = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/reward" in r]
            for name in ("default", "reference")}
    assert [r["step"] for r in rows["reference"]] == [r["step"] for r in rows["default"]] == [1, 2, 3]
    for a, b in zip(rows["default"], rows["reference"]):
        for key, value in a.items():
            if "clip_fraction" in key:  # a count: one token at the clip boundary may fall either way
                assert b[key] == pytest.approx(value, abs=0.02), (a["step"], key)
            elif key.startswith("train/"):
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (a["step"], key)
    assert plain["train/lambda"] == pytest.approx(fused["train/lambda"], rel=1e-5)


@pytest.mark.parametrize("constraint,backend", [("unsafe_rate", BACKENDS[0]), ("rectified", BACKENDS[-1]),
                                                ("unsafe_rate", BACKENDS[-1])])
def test_constraint_forms_drive_lambda_with_their_own_episode_costs(toy_models, tmp_path, constraint, backend):
    """unsafe_rate: J_C is the share of answers the cost model calls unsafe (the logged unsafe rate); rectified:
    J_C is the mean positive part of the cost, never below 0. λ's first step follows from that J_C."""
    import math

    threshold = 0.1 if constraint == "unsafe_rate" else 0.0
    train_ppo(_cfg(toy_models, tmp_path / "run", "ppo_lag", "run.max_steps=2", f"rollout.backend={backend}",
                   f"lagrange.constraint={constraint}", f"lagrange.threshold={threshold}", "lagrange.lr=0.5",
                   "lagrange.window=16", "lagrange.lambda_max=100"))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/reward" in r]
    first = rows[0]
    if constraint == "unsafe_rate":
        assert first["train/episode_cost_window"] == pytest.approx(first["train/unsafe_rate"], abs=1e-6)
        assert 0 <= first["train/episode_cost_window"] <= 1
    else:
        assert first["train/episode_cost_window"] >= 0
        assert first["train/episode_cost_window"] >= first["train/cost"] - 1e-6  # [C]_+ ≥ C on average
    expected = math.exp(0.5 * 1.0 * (first["train/episode_cost_window"] - threshold))  # λ_init = 1, one step
    assert first["train/lambda"] == pytest.approx(expected, rel=1e-5)


def test_a_resumed_unsafe_rate_run_reproduces_the_following_steps(toy_models, tmp_path):
    extra = ["run.max_steps=4", "run.save_every=2", "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.05"]
    full = tmp_path / "full"
    train_ppo(_cfg(toy_models, full, "ppo_lag", *extra))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    train_ppo(_cfg(toy_models, resumed, "ppo_lag", *extra, "run.resume=true"))
    after = lambda d: [comparable(r) for r in read_metrics(d / "metrics.jsonl") if r["step"] > 2]  # noqa: E731
    assert after(resumed) == after(full) and len(after(full)) == 2
