"""Runs killed with SIGKILL at a random step, then resumed, log what uninterrupted runs log: PPO-Lag, its
critic-free counterparts GRPO-Lag and RLOO-Lag (no critic engines; their groups of answers are drawn
again after the resume), SFT and the reward model.

The killed process gets no chance to clean up: it may die while writing a checkpoint (a ``.tmp-step-N``
directory is left behind) or a metrics line (the file ends in half a line). ``--resume`` must start
from the newest whole checkpoint and recompute every later step bit for bit (CPU, deterministic).
The kill step is drawn from a seed that the test prints (``KILL_SEED`` replays a failure).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, cli_env, comparable, run_cli

from saferlhf.trainers.common import read_metrics

STEPS = 6


# Per stage: the same episodes per step (PPO-Lag 8 prompts x 1 answer, the group modes 2 prompts x 4 answers).
GROUP = ["ppo.rollout_batch_size=2", "rollout.samples_per_prompt=4", "ppo.mini_batch_size=4"]
BATCH = {"ppo-lag": ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4"], "grpo-lag": GROUP, "rloo-lag": GROUP}


def _args(toy_models, out_dir, stage: str = "ppo-lag") -> list[str]:
    return [stage, "--config", "tiny-cpu", f"run.out_dir={out_dir}", f"model.name_or_path={toy_models.sft}",
            f"ppo.reward_model={toy_models.rm}", f"ppo.cost_model={toy_models.cm}", "run.progress=false",
            "run.tensorboard=false", "run.deterministic=true", "run.log_every=1", "run.save_every=1",
            "run.keep_checkpoints=2", f"run.max_steps={STEPS}", *BATCH[stage], "rollout.max_new_tokens=12"]


def _comparable(rows: list[dict]) -> list[dict]:
    return [comparable(r) for r in rows]


def _logged_steps(path) -> int:
    rows = read_metrics(path, partial_tail=True)
    return max((r["step"] for r in rows), default=0)


def _kill_step(low: int, high: int) -> int:
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(2**31)))
    step = random.Random(seed).randint(low, high)
    print(f"kill step {step} (KILL_SEED={seed})")
    return step


def _kill_and_resume(args: list[str], killed, log, kill_after: int, steps: int) -> list[int]:
    """Start ``saferlhf ARGS``, SIGKILL it once step ``kill_after`` is logged, then resume; returns the checkpoints
    found after the kill."""
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "saferlhf", *args], cwd=REPO, env=cli_env(),
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while _logged_steps(killed / "metrics.jsonl") < kill_after:
            assert proc.poll() is None, (f"the run ended before step {kill_after} (exit {proc.returncode}): "
                                         f"{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    checkpoints = sorted(int(d.name.split("-")[1]) for d in (killed / "checkpoints").glob("step-*"))
    assert checkpoints and checkpoints[-1] < steps, f"killed after step {kill_after}: checkpoints {checkpoints}"
    resumed = run_cli([*args, "--resume"], timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    return checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo-lag", "grpo-lag", "rloo-lag"])
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(toy_models, tmp_path, stage):
    full = tmp_path / "full"
    done = run_cli(_args(toy_models, full, stage), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _comparable(read_metrics(full / "metrics.jsonl"))
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))

    kill_after = _kill_step(2, STEPS - 2)  # the step whose metrics line triggers the kill
    killed = tmp_path / "killed"
    checkpoints = _kill_and_resume(_args(toy_models, killed, stage), killed, tmp_path / "killed.log", kill_after,
                                   STEPS)
    got = _comparable(read_metrics(killed / "metrics.jsonl"))
    assert got == expected, f"{stage}: killed after step {kill_after}, resumed from step {checkpoints[-1]}"
    assert "train/lambda" in expected[-1] and ("train/reward_critic_loss" in expected[-1]) == (stage == "ppo-lag")
    assert (killed / "model" / "config.json").is_file()
    assert json.loads((killed / "model" / "config.json").read_text())["model_type"] == "llama"


SUPERVISED_STEPS = 8


def _supervised_args(stage: str, toy_models, out_dir) -> list[str]:
    model = toy_models.base if stage == "sft" else toy_models.sft
    return [stage, "--config", "tiny-cpu", f"run.out_dir={out_dir}", f"model.name_or_path={model}",
            "run.progress=false", "run.tensorboard=false", "run.deterministic=true", "run.log_every=1",
            "run.save_every=2", "run.keep_checkpoints=2", f"run.max_steps={SUPERVISED_STEPS}",
            "optim.micro_batch_size=8", "optim.micro_batch_tokens=120"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_supervised_stages_killed_and_resumed_match_an_uninterrupted_run(toy_models, tmp_path, stage):
    """Engines with optimizer and scheduler, the data position and the RNG come back; no step is logged
    twice; the step checkpoints hold a loadable model beside the engine state."""
    full = tmp_path / "full"
    done = run_cli(_supervised_args(stage, toy_models, full), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = [comparable(r) for r in read_metrics(full / "metrics.jsonl")]
    train_steps = [r["step"] for r in expected if "train/loss" in r]
    assert train_steps == list(range(1, SUPERVISED_STEPS + 1))

    kill_after = _kill_step(3, SUPERVISED_STEPS - 2)
    killed = tmp_path / "killed"
    checkpoints = _kill_and_resume(_supervised_args(stage, toy_models, killed), killed, tmp_path / "killed.log",
                                   kill_after, SUPERVISED_STEPS)
    got = [comparable(r) for r in read_metrics(killed / "metrics.jsonl")]
    assert got == expected, f"{stage}: killed after step {kill_after}, resumed from step {checkpoints[-1]}"
    newest = sorted((killed / "checkpoints").glob("step-*"), key=lambda d: int(d.name.split("-")[1]))[-1]
    assert (newest / "model" / "config.json").is_file()  # a loadable model
    assert (newest / "engine" / "state").is_dir() and (newest / "trainer_state_rank0.pt").is_file()
