"""Steps shared by every trainer, as functions (no trainer base class).

- :func:`setup_run` starts the process group, seeds, creates the run directory
  (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``plots/``) and returns a :class:`Run`.
- :class:`MetricsLogger` writes scalars to JSONL and TensorBoard (and W&B when asked), rank 0 only.
- :func:`global_batches` yields each rank's micro-batches of one optimizer step, in a seeded order
  that is the same for any world size (so world size 1 and 2 see the same global batches).
- :func:`plot_metrics` turns ``metrics.jsonl`` into PNG curves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
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

logger = logging.getLogger("saferlhf")


def configure_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(level)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class MetricsLogger:
    """Scalars to ``metrics.jsonl`` (one JSON object per line) and TensorBoard, on rank 0."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(project="saferlhf", dir=str(out_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def read_metrics(path: str | Path, *, partial_tail: bool = False) -> list[dict]:
    """The rows of a ``metrics.jsonl``; [] when there is none.

    ``partial_tail=True`` drops a last line cut short (a process killed while writing it); any other
    malformed line is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if partial_tail and i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {n}: not a JSON object ({err})") from err
    return rows


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


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep the rows of steps ≤ ``last_step`` (a resumed run recomputes the others); atomic rewrite."""
    path = Path(path)
    rows = [r for r in read_metrics(path, partial_tail=True) if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


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


def quiet_libraries() -> None:
    """transformers' per-load progress bars and reports off the console (``run.verbose=false``): a load whose
    weights do not fit is still an error, and what saferlhf knows to be unexpected it logs itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def plot_metrics(metrics_path: Path, keys: Sequence[str], out_png: Path, title: str = "") -> Path | None:
    """Plot each key of ``metrics.jsonl`` against the step (one panel per key) as a PNG."""
    rows = read_metrics(metrics_path)
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    nrows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, points) in zip(axes.flat, series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def progress(iterable: Any = None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def check_finite(name: str, value: torch.Tensor, step: int) -> None:
    """Stop the step with an error naming the tensor when it holds NaN/inf (never a silent update).

    This is a host-device sync point: call it on the scalar loss once per micro-batch only.
    """
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {name} at step {step}: {value.detach().flatten()[:8].tolist()}")


def train_ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of the stage's trained model, from the optim and deepspeed sections."""
    # The loop marks the accumulation boundary itself (a step's passes depend on the token budget) and
    # normalises the loss over the whole step, so DeepSpeed counts one micro-batch of the step's size.
    o, d = cfg.optim, cfg.deepspeed
    return distributed.ds_config(
        micro_batch_size=o.micro_batch_size * o.gradient_accumulation, gradient_accumulation=1,
        world_size=world_size, zero_stage=d.zero_stage, offload=d.offload, bf16=d.bf16, fp16=d.fp16,
        max_grad_norm=o.max_grad_norm, lr=o.lr, betas=tuple(o.adam_betas), eps=o.adam_eps,
        weight_decay=o.weight_decay,
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
