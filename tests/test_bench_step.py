"""``saferlhf bench step``: both configurations run the real trainer; the summary, the JSON line and
the profile are what the README promises."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from saferlhf import bench
from saferlhf.rollout.vllm_engine import vllm_available


def _write_metrics(path, rows):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_summary_leaves_out_the_warm_up_step_and_sums_the_phases(tmp_path):
    step = lambda i, g, s: {"step": i, "train/reward": 0.0, "time/generate": g, "time/score": s,  # noqa: E731
                            "time/experience": 0.1, "time/actor": 0.2, "time/critics": 0.3, "time/learn": 0.5,
                            "rollout/tokens_per_second": 100.0 * i}
    _write_metrics(tmp_path / "run", [step(1, 50.0, 9.0), step(2, 1.0, 2.0), step(3, 3.0, 4.0)])
    out = bench.summarize(tmp_path / "run", rollout_per_step=16)
    assert out["steps"] == 2
    assert out["generate"] == pytest.approx(2.0) and out["score"] == pytest.approx(3.0)
    assert out["sync"] == 0.0  # the hf backend has no sync phase
    assert out["step"] == pytest.approx(2.0 + 3.0 + 0.1 + 0.2 + 0.3)  # time/learn is not counted twice
    assert out["tokens_per_second"] == pytest.approx(250.0)
    assert out["sequences_per_second"] == pytest.approx(16 / out["step"])
    # Several rounds: the timed steps of every run, pooled (medians).
    _write_metrics(tmp_path / "run-2", [step(1, 50.0, 9.0), step(2, 5.0, 6.0), step(3, 7.0, 8.0)])
    pooled = bench.summarize([tmp_path / "run", tmp_path / "run-2"], rollout_per_step=16)
    assert pooled["steps"] == 4 and pooled["generate"] == pytest.approx(4.0) and pooled["score"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least 2 logged steps"):
        _write_metrics(tmp_path / "short", [step(1, 1.0, 1.0)])
        bench.summarize(tmp_path / "short", rollout_per_step=16)


def test_bad_flags_are_usage_errors(capsys):
    for argv, message in ((["--steps", "1"], "--steps"), (["--configs", "fast"], "--configs"),
                          (["--nproc", "0"], "--nproc"), (["--rounds", "0"], "--rounds"),
                          (["--lengths", "normal:3"], "--lengths"),
                          (["--lengths", "uniform:16:512", "--new-tokens", "64"], "longer than --new-tokens"),
                          (["--configs", "saferlhf,grpo_lag", "--rollout", "6"], "must be a multiple of 4")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="the saferlhf configuration generates on vLLM")
def test_bench_step_runs_both_configurations_and_profiles_them(tmp_path):
    out = tmp_path / "bench"
    result = run_cli(["bench", "step", "--model", "tiny", "--nproc", "1", "--zero-stage", "0", "--steps", "3",
                      "--rollout", "4", "--mini-batch", "4", "--new-tokens", "16", "--lengths", "uniform:2:16",
                      "--max-length", "64", "--rounds", "1", "--configs", "baseline,saferlhf,padded,grpo_lag",
                      "--out", str(out), "--profile", "--json"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lengths"] == "uniform:2:16"
    assert report["packing_speedup"] == pytest.approx(report["padded"]["train"] / report["saferlhf"]["train"])
    assert "packing speedup (training side" in result.stdout
    from saferlhf.trainers.common import read_metrics

    for name in ("baseline", "saferlhf", "padded"):  # the same drawn answer lengths in every configuration
        lengths = [r["train/response_length"] for r in read_metrics(out / name / "metrics.jsonl")
                   if "train/response_length" in r]
        assert lengths == [r["train/response_length"] for r in read_metrics(out / "saferlhf" / "metrics.jsonl")
                           if "train/response_length" in r]
        assert all(2 <= x <= 16 for x in lengths) and len(set(lengths)) > 1
    for name in ("baseline", "saferlhf"):
        assert report[name]["steps"] == 2
        for phase in ("generate", "score", "experience", "actor", "critics"):
            assert report[name][phase] > 0, (name, phase)
        assert report[name]["tokens_per_second"] > 0
        top = (out / name / "profile" / "top_ops.md").read_text()
        for phase in ("generate", "score", "actor", "critics"):
            assert f"## {phase}" in top, (name, phase)
        assert (out / name / "profile" / "phases.png").stat().st_size > 0
        trace = json.loads((out / name / "profile" / "trace.json").read_text())
        assert any(e.get("name") == "phase/score" for e in trace["traceEvents"])
    assert report["baseline"]["sync"] == 0.0 and report["saferlhf"]["sync"] > 0  # only the engine needs a push
    assert report["speedup"] == pytest.approx(report["baseline"]["step"] / report["saferlhf"]["step"])
    assert "overall speedup" in result.stdout
    # The critic-free configuration: the same sequences per step (1 prompt x 4 answers), no critic phase.
    free = read_metrics(out / "grpo_lag" / "metrics.jsonl")
    assert report["grpo_lag"]["steps"] == 2 and any("train/response_length" in r for r in free)
    assert report["grpo_lag"]["critics"] == 0.0 and report["grpo_lag"]["actor"] > 0
    assert not any("train/reward_critic_loss" in r for r in free) and any("train/lambda" in r for r in free)
    assert report["critic_free_speedup"] == pytest.approx(report["saferlhf"]["train"] / report["grpo_lag"]["train"])
    assert set(report["critic_free_peak"]) == {"saferlhf", "grpo_lag"} and min(report["critic_free_peak"].values()) > 0
    assert "critic-free speedup (training side" in result.stdout


def test_synthetic_lengths_cut_responses_and_bad_specs_are_errors():
    import torch

    from saferlhf.config import ConfigError, build_config
    from saferlhf.rollout.base import Generation, cut_to_lengths

    ids = torch.arange(1, 25).reshape(3, 8)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # a row that ended by itself after 5 tokens
    gen = Generation(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long), ids, mask)
    cut = cut_to_lengths(gen, "uniform:2:7", torch.Generator().manual_seed(0), pad_token_id=0)
    lengths = cut.response_mask.sum(-1)
    assert ((lengths >= 2) & (lengths <= 7)).all() and lengths[2] <= 5
    assert torch.equal(cut.response_ids, ids * cut.response_mask)
    assert cut_to_lengths(gen, "fixed:3", torch.Generator(), 0).response_mask.sum(-1).tolist() == [3, 3, 3]
    for spec in ("uniform:9:2", "gamma:2", "fixed:0"):
        with pytest.raises(ConfigError, match="rollout.synthetic_lengths"):
            build_config("ppo_lag", None, [f"rollout.synthetic_lengths={spec}"])
