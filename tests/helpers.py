"""Helpers shared by the tests: stage configs on the toy world and the command line in a subprocess."""

from __future__ import annotations

import os
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(nproc: int = 1) -> dict[str, str]:
    """The environment of a fresh ``saferlhf`` process: this one's, without the process-group
    variables an in-process stage set here (a child would otherwise try to join that group)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else env.get("OMP_NUM_THREADS", "2")
    return env


def run_cli(args: list[str], *, nproc: int = 1, timeout: int = 600, cwd: Path | None = None):
    """Run ``saferlhf ARGS`` in a fresh process (under torchrun when nproc > 1).

    On timeout the launcher gets SIGTERM first: torchrun forwards it to its workers (they run in
    their own sessions, so a SIGKILL of torchrun alone would leave them hanging in a collective).
    """
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "saferlhf", *args]
    else:
        cmd = [sys.executable, "-m", "saferlhf", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(nproc),
                            cwd=cwd or REPO)
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
    """A metrics row without the values that depend on wall-clock time (phase times, throughput)."""
    return {k: v for k, v in row.items() if not k.startswith("time") and not k.endswith(WALL_CLOCK_SUFFIXES)}
