"""Steps shared by every trainer, as functions (no trainer base class).

- :func:`setup_run` starts the process group, seeds, creates the run directory
  (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``plots/``) and returns a :class:`Run`.
- :func:`global_batches` yields each rank's micro-batches of one optimizer step, in a seeded order
  that is the same for any world size (so world size 1 and 2 see the same global batches).
Progress bars, logging and the metrics files are :mod:`saferlhf.monitor`'s.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saferlhf import distributed
from saferlhf.config import Config, save_config
from saferlhf.models import packing
from saferlhf.models.compiled import compile_layers, resolve_compile_layers
from saferlhf.models.fused import use_fused_layers
from saferlhf.models.hf import save_causal_lm
from saferlhf.models.score_model import ScoreModel
from saferlhf.monitor import (  # noqa: F401  (re-exported for the trainers)
    MetricsLogger,
    configure_logging,
    logger,
    plot_metrics,
    progress,
    quiet_libraries,
    read_metrics,
    truncate_metrics,
)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def save_model(run: Run, engine, directory: str | Path, tokenizer) -> None:
    """Write an engine's model as a Hugging Face checkpoint in ``directory`` (rank 0 writes).

    Every rank must call it: under ZeRO-3 the full weights are gathered with collectives. A
    :class:`ScoreModel` is written with its own ``save_pretrained``, anything else as a causal LM.
    """
    state = distributed.full_state_dict(engine)
    if run.is_main:
        module = distributed.unwrap(engine)
        if isinstance(module, ScoreModel):
            module.save_pretrained(directory, tokenizer=tokenizer, state_dict=state)
        else:
            save_causal_lm(module, directory, tokenizer, state_dict=state)
    distributed.barrier()


@dataclass
class Run:
    cfg: Config
    dist: distributed.DistInfo
    out_dir: Path
    metrics: MetricsLogger

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def plot_dir(self) -> Path:
        return self.out_dir / "plots"


def setup_run(cfg: Config) -> Run:
    info = distributed.init_distributed(cfg.deepspeed.backend)
    configure_logging(info.rank)
    if not cfg.run.verbose:
        quiet_libraries()
    if info.device.type == "cpu":
        distributed.set_cpu_threads(cfg.run.threads)
    seed_everything(cfg.run.seed, cfg.run.deterministic)
    out_dir = cfg.out_dir
    if info.is_main:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        if not cfg.run.resume and (out_dir / "metrics.jsonl").exists():
            # A fresh run in an old directory starts a fresh metrics file (checkpoints are kept).
            (out_dir / "metrics.jsonl").unlink()
        save_config(cfg, out_dir / "config.yaml")
    distributed.barrier()
    metrics = MetricsLogger(out_dir, info.is_main, cfg.run.tensorboard, cfg.run.wandb,
                            config=None if not cfg.run.wandb else _asdict(cfg))
    logger.info("run %s: stage %s, world size %d, device %s%s", out_dir, cfg.stage, info.world_size, info.device,
                f", {torch.get_num_threads()} threads" if info.device.type == "cpu" else "")
    return Run(cfg, info, out_dir, metrics)


def apply_layer_levers(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """``model`` with the levers of ``cfg.model``: fused RMSNorm/SwiGLU, compiled decoder layers and
    packed passes (``packing.is_enabled(model)`` says whether they took)."""
    if cfg.model.fused_layers:
        use_fused_layers(model)
    if resolve_compile_layers(cfg.model.compile_layers, device, cfg.deepspeed.zero_stage):
        count = compile_layers(model)
        logger.info("%s: %d decoder layers compiled (model.compile_layers=%s)", type(model).__name__, count,
                    str(cfg.model.compile_layers).lower())
    if cfg.model.packing:
        packing.enable(model)
    return model


def _asdict(cfg: Config) -> dict:
    from saferlhf.config import to_dict

    return to_dict(cfg)


def global_batches(
    n_items: int, *, micro_batch_size: int, gradient_accumulation: int, rank: int, world_size: int,
    seed: int, epochs: int,
) -> Iterator[list[list[int]]]:
    """Yield, per optimizer step, this rank's ``gradient_accumulation`` micro-batches of indices.

    Each epoch is a seeded permutation cut into global batches of
    ``micro_batch_size × gradient_accumulation × world_size`` items; the global batch is the same
    whatever the world size, and rank r takes micro-batches r, r + W, r + 2W, ... of it. A final
    partial global batch is not trained on (its size is logged by the caller).
    """
    per_step = micro_batch_size * gradient_accumulation * world_size
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n_items, generator=gen).tolist()
        for start in range(0, n_items - per_step + 1, per_step):
            chunk = order[start : start + per_step]
            micros = [chunk[i : i + micro_batch_size] for i in range(0, per_step, micro_batch_size)]
            yield micros[rank::world_size]


def steps_per_epoch(n_items: int, micro_batch_size: int, gradient_accumulation: int, world_size: int) -> int:
    return n_items // (micro_batch_size * gradient_accumulation * world_size)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank r's strided share of an evaluation set (every item lands on exactly one rank)."""
    return list(items[rank::world_size])


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    steps = sorted(checkpoint_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def check_finite(name: str, value: torch.Tensor, step: int) -> None:
    """Stop the step with an error naming the tensor when it holds NaN/inf (never a silent update).

    This is a host-device sync point: call it on the scalar loss once per micro-batch only.
    """
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {name} at step {step}: {value.detach().flatten()[:8].tolist()}")


def engine_config(cfg: Config, world_size: int, *, train: bool = True, micro_batch_size: int | None = None,
                  lr: float | None = None, weight_decay: float | None = None) -> dict:
    """The DeepSpeed config of one engine of a stage, from the ``optim`` and ``deepspeed`` sections.

    The loops mark the accumulation boundary themselves (a step's passes depend on the token budget) and
    normalise each loss over the whole step, so DeepSpeed counts one micro-batch of the step's size
    (``micro_batch_size``; default the supervised step's, micro-batch × accumulation). ``train=False``:
    a frozen model (no optimizer). ``lr`` and ``weight_decay`` default to ``optim``'s (the critics have
    their own).
    """
    o, d = cfg.optim, cfg.deepspeed
    return distributed.ds_config(
        micro_batch_size=micro_batch_size or o.micro_batch_size * o.gradient_accumulation, gradient_accumulation=1,
        world_size=world_size, zero_stage=d.zero_stage, offload=d.offload, bf16=d.bf16, fp16=d.fp16,
        max_grad_norm=o.max_grad_norm, lr=o.lr if lr is None else lr, betas=tuple(o.adam_betas), eps=o.adam_eps,
        weight_decay=o.weight_decay if weight_decay is None else weight_decay, train=train,
    )


def eval_batches(dataset: Any, micro_batch_size: int, info: distributed.DistInfo) -> Iterator[tuple[Any, int]]:
    """Yield ``(batch, n_valid)`` over this rank's strided share of ``dataset``.

    Every rank runs the same number of forwards — under ZeRO-3 a forward is a collective, so a
    rank whose share runs out first forwards a filler item; the first ``n_valid`` rows are real.
    """
    n = len(dataset)
    mine = list(range(info.rank, n, info.world_size))
    n_batches = math.ceil(math.ceil(n / info.world_size) / micro_batch_size) if n else 0
    for b in range(n_batches):
        idx = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        valid = len(idx)
        if valid == 0:
            idx = [0]  # filler, discarded by the caller
        yield dataset.collate([dataset[i] for i in idx]), valid
