"""benchmarks/gpu_trainer.py: the GPU run of the real stages, exercised on the CPU with the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, cli_env

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_trainer  # noqa: E402


def test_wheels_map_to_the_modules_they_provide():
    assert gpu_trainer._module("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl") == "yaml"
    assert gpu_trainer._module("pillow-12.2.0-cp312-cp312-manylinux2014_x86_64.whl") == "PIL"
    assert gpu_trainer._module("deepspeed-0.19.8-py3-none-any.whl") == "deepspeed"
    assert gpu_trainer.missing_modules() == []  # this machine has every module the stages import


@pytest.mark.slow
def test_the_script_runs_every_stage_packed_and_padded_and_compares_with_the_plain_torch_step(tmp_path):
    out = tmp_path / "gpu-trainer"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_trainer.py"), "run", "--model", "tiny", "--device", "cpu",
         "--zero", "2", "--steps", "3", "--rollout", "8", "--mini-batch", "4", "--answer", "24",
         "--lengths", "uniform:4:24", "--out", str(out), "--json", str(tmp_path / "report.json")],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["runs"]) == {"zero2-packed", "zero2-padded"}
    for run in report["runs"].values():
        for stage in ("sft", "rm"):
            assert run[stage]["step_s"] > 0 and run[stage]["tokens_per_s"] > 0
        for phase in ("generate", "score", "actor", "critics"):
            assert run["ppo-lag"][phase] > 0
    assert report["zero2_packed_speedup"] > 0
    assert report["plain_step"]["ratio"] > 0 and report["plain_step"]["prompt_len"] > 0
    assert "trainer vs plain torch" in result.stdout
