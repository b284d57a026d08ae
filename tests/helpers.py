"""Helpers shared by the tests: stage configs on the toy world and the command line in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ToyModels:
    root: Path
    base: Path
    sft: Path
    rm: Path
    cm: Path
    rm_metrics: dict
    cm_metrics: dict


def stage_config(stage: str, out_dir: Path, model: Path, *overrides: str):
    from saferlhf.config import build_config, resolve_preset

    return build_config(stage, resolve_preset("tiny-cpu"),
                        [f"run.out_dir={out_dir}", f"model.name_or_path={model}", "run.progress=false",
                         "run.tensorboard=false", *overrides])


def two_tiny_policies(a: Path, b: Path) -> tuple[Path, Path]:
    """Two untrained tiny toy-world policies with one tokenizer and different weights, saved to ``a``, ``b``."""
    from saferlhf.models.hf import load_tokenizer, save_causal_lm
    from saferlhf.models.tiny import make_tiny_model
    from saferlhf.pipeline import build_base_model

    build_base_model(a, seed=0)
    tokenizer = load_tokenizer(str(a))
    save_causal_lm(make_tiny_model(tokenizer, seed=1), b, tokenizer=tokenizer)
    return a, b


def cli_env(nproc: int = 1) -> dict[str, str]:
    """The environment of a fresh ``saferlhf`` process: this one's, without the process-group
    variables an in-process stage set here (a child would otherwise try to join that group)."""
    from saferlhf.distributed import child_env

    env = child_env()
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else env.get("OMP_NUM_THREADS", "2")
    return env


def run_cli(args: list[str], *, nproc: int = 1, timeout: int = 600, cwd: Path | None = None,
            env: dict[str, str] | None = None):
    """Run ``saferlhf ARGS`` in a fresh process (under torchrun when nproc > 1).

    On timeout the launcher gets SIGTERM first: torchrun forwards it to its workers (they run in
    their own sessions, so a SIGKILL of torchrun alone would leave them hanging in a collective).
    """
    from saferlhf.distributed import free_port

    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "saferlhf", *args]
    else:
        cmd = [sys.executable, "-m", "saferlhf", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**cli_env(nproc), **(env or {})}, cwd=cwd or REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


WALL_CLOCK_SUFFIXES = ("/seconds", "/tokens_per_second")


def comparable(row: dict) -> dict:
    """A metrics row without the values that depend on wall-clock time or the machine (phase times, throughput,
    resident memory)."""
    return {k: v for k, v in row.items()
            if not k.startswith(("time", "memory/")) and not k.endswith(WALL_CLOCK_SUFFIXES)}
