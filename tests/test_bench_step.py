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
                          (["--nproc", "0"], "--nproc"), (["--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="the saferlhf configuration generates on vLLM")
def test_bench_step_runs_both_configurations_and_profiles_them(tmp_path):
    out = tmp_path / "bench"
    result = run_cli(["bench", "step", "--model", "tiny", "--nproc", "1", "--zero-stage", "0", "--steps", "3",
                      "--rollout", "4", "--mini-batch", "4", "--new-tokens", "8", "--max-length", "64",
                      "--rounds", "1", "--out", str(out), "--profile", "--json"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
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
