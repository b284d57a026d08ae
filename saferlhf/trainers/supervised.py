"""The supervised training loop shared by the SFT, reward-model, cost-model and DPO stages.

A stage supplies the loss of a pass, an evaluation pass and a model saver, and how a batch counts
(:class:`Units`); :func:`train_supervised` runs the visible loop: DeepSpeed forward/backward over
seeded global batches, one optimizer step per step, logging, periodic evaluation and atomic
checkpoints.

A step's batch (``optim.micro_batch_size × optim.gradient_accumulation`` items on each rank) runs
in passes: the ``gradient_accumulation`` micro-batches, or — with ``optim.micro_batch_tokens`` — passes
of at most that many tokens (:mod:`saferlhf.trainers.batching`). Each pass's loss is a mean over its
own units (trained tokens for SFT, pairs for the preference losses) and is weighted by its share of
the step's units, so the step's loss and gradient are the mean over the whole batch however it was
cut (not a mean of micro-batch means). Every rank runs the same number of passes.
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
from saferlhf.trainers import checkpoint
from saferlhf.trainers.batching import longest, split_by_tokens
from saferlhf.trainers.common import (
    Run,
    check_finite,
    global_batches,
    logger,
    progress,
    steps_per_epoch,
)

# loss_fn(engine, batch) -> (loss, {metric name: 0-d tensor}): means over the batch's units; the dict is
# logged after reduction.
LossFn = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[Any, int], dict[str, float]]
SaveFn = Callable[[Any, Path], None]


@dataclass
class SupervisedPlan:
    total_steps: int
    warmup_steps: int
    dropped_per_epoch: int


@dataclass
class Units:
    """How a stage's batches count, for the token budget and the loss weights.

    ``count(batch)``: the units the stage's loss averages over (trained tokens, pairs). ``lengths(i)``:
    the token lengths of item i's sequences. ``side_by_side``: the layout of those lengths
    (:mod:`saferlhf.trainers.batching`). ``packed``: whether the stage's passes run packed.
    """

    count: Callable[[Any], float]
    lengths: Callable[[int], tuple[int, ...]]
    side_by_side: bool = True
    packed: bool = False


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


def check_budget(cfg, n_items: int, units: Units) -> None:
    """``optim.micro_batch_tokens`` must hold the costliest single item (error naming the key and length)."""
    budget = cfg.optim.micro_batch_tokens
    if budget <= 0 or n_items == 0:
        return
    items = [units.lengths(i) for i in range(n_items)]
    most = longest(items, units.packed, units.side_by_side)
    if budget < most:
        raise ValueError(f"optim.micro_batch_tokens={budget} is smaller than the longest training item "
                         f"({most} tokens{'' if units.packed else ', padded'}); raise it to at least {most}")


def step_passes(items: list[int], micros: list[list[int]], cfg, units: Units) -> list[tuple[list[int], bool]]:
    """This rank's passes of one step: (item indices, real). Every rank gets the same number of passes."""
    budget = cfg.optim.micro_batch_tokens
    if budget <= 0:
        return [(m, True) for m in micros]
    lengths = [units.lengths(i) for i in items]
    parts = split_by_tokens(lengths, budget, packed=units.packed, side_by_side=units.side_by_side)
    count = int(distributed.all_reduce_max(torch.tensor([len(parts)]))[0])
    if count > len(parts):
        parts = split_by_tokens(lengths, budget, packed=units.packed, side_by_side=units.side_by_side,
                                min_parts=count)
    # An empty part keeps this rank in step with the others: a zero-weight pass over one item.
    return [([items[j] for j in part], True) if part else ([items[0]], False) for part in parts]


def train_supervised(
    run: Run,
    engine: Any,
    train_set: Any,
    plan: SupervisedPlan,
    loss_fn: LossFn,
    eval_fn: EvalFn,
    save_fn: SaveFn,
    units: Units,
) -> dict[str, float]:
    """Train ``engine`` on ``train_set`` (a dataset with ``collate``) and return the final metrics."""
    cfg = run.cfg
    o = cfg.optim
    if plan.dropped_per_epoch:
        logger.info("%d items per epoch do not fill a last global batch and are not trained on",
                    plan.dropped_per_epoch)
    check_budget(cfg, len(train_set), units)
    start = 1
    if cfg.run.resume:
        state = checkpoint.resume(run, {"engine": engine})
        start = 1 if state is None else state["step"] + 1
    batches = global_batches(
        len(train_set), micro_batch_size=o.micro_batch_size, gradient_accumulation=o.gradient_accumulation,
        rank=run.dist.rank, world_size=run.dist.world_size, seed=cfg.run.seed, epochs=o.epochs,
    )
    for _ in range(start - 1):  # the data position: batches are a pure function of (seed, step)
        next(batches)
    bar = progress(total=plan.total_steps, desc=cfg.stage, enabled=cfg.run.progress and run.is_main)
    bar.update(start - 1)
    engine.train()
    final: dict[str, float] = {}
    t0 = time.perf_counter()
    cuda = run.device.type == "cuda"
    for step in range(start, plan.total_steps + 1):
        step_start = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        micros = next(batches)
        passes = step_passes([i for m in micros for i in m], micros, cfg, units)
        collated = [(train_set.collate([train_set[i] for i in part]), real) for part, real in passes]
        total = sum(units.count(batch) for batch, real in collated if real)
        sums: dict[str, torch.Tensor] = {}
        for k, (batch, real) in enumerate(collated):
            mean_loss, metrics = loss_fn(engine, batch)
            weight = units.count(batch) / max(total, 1e-12) if real else 0.0  # this pass's share of the step
            loss = mean_loss * weight
            check_finite("loss", loss.detach(), step)  # sync point: one per pass
            engine.set_gradient_accumulation_boundary(k == len(collated) - 1)
            engine.backward(loss, scale_wrt_gas=False)  # already normalised over the step
            for key, value in {"loss": mean_loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() * weight
        engine.step()
        if step % cfg.run.log_every == 0 or step == plan.total_steps:
            keys = sorted(sums)
            # One all-reduce for the stacked metric vector of this step (host sync: logging steps only).
            reduced = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]))
            logged = {f"train/{k}": v for k, v in zip(keys, reduced.tolist())}
            logged["train/lr"] = engine.get_lr()[0]
            logged["train/seconds"] = time.perf_counter() - t0
            if cuda:
                torch.cuda.synchronize(run.device)  # host sync: the step's time includes its GPU work
                logged["memory/peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 1e9
            seconds = time.perf_counter() - step_start
            tokens = sum(float(batch.attention_mask.sum()) for batch, real in collated if real)
            logged["time/step"] = seconds
            logged["train/tokens_per_second"] = tokens * run.dist.world_size / seconds
            run.metrics.log(step, logged)
            bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
            final.update(logged)
        if cfg.run.eval_every > 0 and step % cfg.run.eval_every == 0 and step != plan.total_steps:
            run.metrics.log(step, eval_fn(engine, step))
            engine.train()
        if cfg.run.save_every > 0 and step % cfg.run.save_every == 0 and step != plan.total_steps:
            def export(directory: Path, step=step) -> None:  # a loadable HF model beside the engine state
                save_fn(engine, directory / "model")
                _write_state(run, directory / "model", step)

            checkpoint.save(run, step, {"engine": engine}, {"stage": cfg.stage}, export)
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
