"""CPU work under load: does it slow down with the machine, or collapse?

    python benchmarks/bench_load.py [--steps 6] [--json FILE]

Two measurements, each idle and with a load beside it (``--load N`` busy processes, default one per
core, i.e. another job keeping every core busy):

1. ``dual_gae`` at B = 64, T = 1024 (float32): the native op with 1 and 2 torch threads and the
   reference (the per-token Python loop over T of ``saferlhf.algorithms.dual_gae``), median of 30
   calls each, in this process;
2. a toy PPO-Lag step as ``saferlhf demo`` runs it (the ``tiny-cpu`` preset, hf generation, world size 1),
   once with ``run.threads=1`` (the preset's setting) and once with two threads: the mean seconds of
   steps 2..N (step 1 warms up) from ``metrics.jsonl``.

Prints a table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(10_000):
            x += 1


class Load:
    """``n`` busy processes while inside the block."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.stop = mp.Event()
        self.procs = [mp.Process(target=_spin, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.procs:
            p.join(timeout=5)


def time_dual_gae(threads: int, provider: str, calls: int = 30) -> float:
    from saferlhf import algorithms, csrc

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    b, t = 64, 1024
    r, c, vr, vc = (torch.randn(b, t, generator=g) for _ in range(4))
    mask = torch.ones(b, t)
    fn = csrc.dual_gae if provider == "native" else algorithms.dual_gae
    args = (r, c, vr, vc, mask, 1.0, 0.95, torch.tensor(1.5))
    fn(*args)  # warm up (and build the native ops once)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def toy_step_seconds(work: Path, threads: int, steps: int) -> float:
    from saferlhf.bench import build_models

    models = build_models(work / "models", "tiny")
    out = work / f"ppo-threads{threads}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "saferlhf", "ppo-lag", "--config", "tiny-cpu",
           f"model.name_or_path={models['actor']}", f"ppo.reward_model={models['reward']}",
           f"ppo.cost_model={models['cost']}", f"run.out_dir={out}", f"run.max_steps={steps}", "run.log_every=1",
           "run.progress=false", "run.tensorboard=false", "rollout.backend=hf", f"run.threads={threads}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [sum(v for k, v in r.items() if k.startswith("time/") and k != "time/learn") for r in rows
               if r["step"] > 1 and "time/generate" in r]
    return statistics.mean(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes of the load")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for condition in ("idle", "loaded"):
            block = Load(args.load) if condition == "loaded" else None
            if block:
                block.__enter__()
            try:
                row = {
                    "dual_gae_native_1t_ms": time_dual_gae(1, "native"),
                    "dual_gae_native_2t_ms": time_dual_gae(2, "native"),
                    "dual_gae_reference_ms": time_dual_gae(1, "reference"),
                    "toy_step_1_thread_s": toy_step_seconds(Path(tmp), 1, args.steps),
                    "toy_step_2_threads_s": toy_step_seconds(Path(tmp), 2, args.steps),
                }
            finally:
                if block:
                    block.__exit__(None, None, None)
            results[condition] = row
    keys = list(results["idle"])
    print(f"{'':28} {'idle':>10} {'loaded':>10} {'loaded/idle':>12}")
    for key in keys:
        idle, loaded = results["idle"][key], results["loaded"][key]
        print(f"{key:28} {idle:10.3f} {loaded:10.3f} {loaded / idle:12.2f}")
    for condition in ("idle", "loaded"):
        row = results[condition]
        ratio = row["dual_gae_reference_ms"] / row["dual_gae_native_2t_ms"]
        print(f"{condition}: native dual_gae (2 threads) is {ratio:.0f}x the per-token loop")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
