"""Training checkpoints of every stage: engines, loop state and RNG, written atomically; resume restores them.

A checkpoint is ``<run>/checkpoints/step-<n>/``:

    <engine>/state/...             each trained DeepSpeed engine's own files (``actor``, ``reward_critic``,
                                   ``cost_critic`` for PPO; ``engine`` for the supervised stages): weights,
                                   optimizer and scheduler state (one shard per rank under ZeRO)
    trainer_state_rank<r>.pt       the loop's state (step, λ, ...) and rank r's RNG states
                                   (python, numpy, torch CPU, CUDA)
    model/                         (supervised stages) the model as a Hugging Face checkpoint, which
                                   ``AutoModel*`` / ``ScoreModel.from_pretrained`` load directly

It is written under ``.tmp-step-<n>`` and renamed by rank 0 once every rank has finished, so it appears
whole or not at all: a run killed while writing keeps its previous checkpoint. ``run.keep_checkpoints``
newest ones are kept. The data position is not stored: every stage draws its batches as a pure
function of (seed, step), so the step is enough to continue where the run stopped.

Resuming (``--resume``, ``run.resume=true``) loads the newest checkpoint into the engines, restores the
RNG, drops the rows of later steps from ``metrics.jsonl`` (they are logged again) and returns the loop
state; a run killed at any point and resumed logs what the uninterrupted run logs (tested after a
SIGKILL for SFT, the reward model and PPO-Lag, with ``run.deterministic=true``).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saferlhf import distributed
from saferlhf.trainers.common import Run, logger, prune_checkpoints, truncate_metrics


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def steps(run: Run) -> list[Path]:
    """The complete checkpoints of the run, oldest first."""
    return sorted((p for p in run.checkpoint_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name[5:]))


def save(run: Run, step: int, engines: dict[str, Any], state: dict[str, Any],
         export: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint of ``step``: ``engines`` (name → DeepSpeed engine), the loop's ``state`` and the
    RNG; ``export(dir)`` may add files (every rank calls it: e.g. a gathered HF model). A collective."""
    final = run.checkpoint_dir / f"step-{step}"
    tmp = run.checkpoint_dir / f".tmp-step-{step}"
    if run.is_main and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp / name), tag="state")
    if export is not None:
        export(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / f"trainer_state_rank{run.dist.rank}.pt")
    distributed.barrier()
    if run.is_main:
        if final.exists():  # a resumed run writing a step again
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint appears whole or not at all
        prune_checkpoints(run.checkpoint_dir, run.cfg.run.keep_checkpoints)
    distributed.barrier()
    return final


def resume(run: Run, engines: dict[str, Any]) -> dict[str, Any] | None:
    """Load the newest checkpoint into ``engines`` and restore the RNG; returns the loop state (with
    ``step``), or None when the run has no checkpoint yet (it then starts from step 1)."""
    found = steps(run)
    if not found:
        logger.info("resume: no checkpoint in %s, starting from step 1", run.checkpoint_dir)
        return None
    ckpt = found[-1]
    for name, engine in engines.items():
        engine.load_checkpoint(str(ckpt / name), tag="state")
    state = torch.load(ckpt / f"trainer_state_rank{run.dist.rank}.pt", weights_only=False)
    restore_rng(state["rng"])
    if run.is_main:  # the rows of later steps are logged again
        truncate_metrics(run.out_dir / "metrics.jsonl", state["step"])
    distributed.barrier()
    logger.info("resumed from %s: continuing at step %d", ckpt, state["step"] + 1)
    return state
