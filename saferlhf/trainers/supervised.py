"""The supervised training loop shared by the SFT, reward-model and cost-model stages.

A stage supplies three functions — the loss of a micro-batch, an evaluation pass and a model
saver — and :func:`train_supervised` runs the visible loop: DeepSpeed forward/backward/step over
seeded global batches, logging, periodic evaluation and atomic checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saferlhf import distributed
from saferlhf.trainers.common import (
    Run,
    check_finite,
    global_batches,
    logger,
    progress,
    prune_checkpoints,
    steps_per_epoch,
)

# loss_fn(engine, batch) -> (loss, {metric name: 0-d tensor}); the dict is logged after reduction.
LossFn = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[Any, int], dict[str, float]]
SaveFn = Callable[[Any, Path], None]


@dataclass
class SupervisedPlan:
    total_steps: int
    warmup_steps: int
    dropped_per_epoch: int


def plan_steps(n_items: int, cfg) -> SupervisedPlan:
    """Optimizer steps of a run (epochs or run.max_steps, whichever is smaller) and warm-up."""
    world = distributed.dist.get_world_size() if distributed.dist.is_initialized() else 1
    o = cfg.optim
    per_epoch = steps_per_epoch(n_items, o.micro_batch_size, o.gradient_accumulation, world)
    if per_epoch == 0:
        need = o.micro_batch_size * o.gradient_accumulation * world
        raise ValueError(
            f"{n_items} training items are fewer than one global batch ({need} = optim.micro_batch_size "
            f"× optim.gradient_accumulation × world size); lower the batch size or add data"
        )
    total = per_epoch * o.epochs
    if cfg.run.max_steps > 0:
        total = min(total, cfg.run.max_steps)
    dropped = n_items - per_epoch * o.micro_batch_size * o.gradient_accumulation * world
    return SupervisedPlan(total, int(round(o.warmup_ratio * total)), dropped)


def train_supervised(
    run: Run,
    engine: Any,
    train_set: Any,
    plan: SupervisedPlan,
    loss_fn: LossFn,
    eval_fn: EvalFn,
    save_fn: SaveFn,
) -> dict[str, float]:
    """Train ``engine`` on ``train_set`` (a dataset with ``collate``) and return the final metrics."""
    cfg = run.cfg
    o = cfg.optim
    if plan.dropped_per_epoch:
        logger.info("%d items per epoch do not fill a last global batch and are not trained on",
                    plan.dropped_per_epoch)
    batches = global_batches(
        len(train_set), micro_batch_size=o.micro_batch_size, gradient_accumulation=o.gradient_accumulation,
        rank=run.dist.rank, world_size=run.dist.world_size, seed=cfg.run.seed, epochs=o.epochs,
    )
    bar = progress(total=plan.total_steps, desc=cfg.stage, enabled=cfg.run.progress and run.is_main)
    engine.train()
    final: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(1, plan.total_steps + 1):
        sums: dict[str, torch.Tensor] = {}
        for micro in next(batches):
            batch = train_set.collate([train_set[i] for i in micro])
            loss, metrics = loss_fn(engine, batch)
            check_finite("loss", loss.detach(), step)  # sync point: one per micro-batch
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        if step % cfg.run.log_every == 0 or step == plan.total_steps:
            keys = sorted(sums)
            # One all-reduce for the stacked metric vector of this step.
            reduced = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]) / o.gradient_accumulation)
            logged = {f"train/{k}": v for k, v in zip(keys, reduced.tolist())}
            logged["train/lr"] = engine.get_lr()[0]
            logged["train/seconds"] = time.perf_counter() - t0
            run.metrics.log(step, logged)
            bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
            final.update(logged)
        if cfg.run.eval_every > 0 and step % cfg.run.eval_every == 0 and step != plan.total_steps:
            run.metrics.log(step, eval_fn(engine, step))
            engine.train()
        if cfg.run.save_every > 0 and step % cfg.run.save_every == 0 and step != plan.total_steps:
            save_fn(engine, run.checkpoint_dir / f"step-{step}")
            _write_state(run, run.checkpoint_dir / f"step-{step}", step)
            if run.is_main:
                prune_checkpoints(run.checkpoint_dir, cfg.run.keep_checkpoints)
        bar.update(1)
    bar.close()
    evaluation = eval_fn(engine, plan.total_steps)
    run.metrics.log(plan.total_steps, evaluation)
    final.update(evaluation)
    save_fn(engine, run.out_dir / "model")
    _write_state(run, run.out_dir / "model", plan.total_steps)
    distributed.barrier()
    return final


def _write_state(run: Run, directory: Path, step: int) -> None:
    if run.is_main:
        with open(directory / "trainer_state.json", "w") as fh:
            json.dump({"step": step, "stage": run.cfg.stage}, fh)
