"""What every run shows and writes: progress bars, log lines, ``metrics.jsonl`` and its plots.

The lowest layer of the package beside ``config``: trainers, evaluation, rounds and the demo all use it,
and it imports nothing of saferlhf. Every module logs with ``logging.getLogger(__name__)``; the
package's loggers share the ``saferlhf`` parent that :func:`configure_logging` sets up.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("saferlhf")


def configure_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(level)


def quiet_libraries() -> None:
    """transformers' per-load progress bars and reports off the console (``run.verbose=false``): a load whose
    weights do not fit is still an error, and what saferlhf knows to be unexpected it logs itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep the rows of steps ≤ ``last_step`` (a resumed run recomputes the others); atomic rewrite."""
    path = Path(path)
    rows = [r for r in read_metrics(path, partial_tail=True) if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


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
    width, height = 4.2 * cols, 3.0 * nrows + (0.3 if title else 0.0)  # inches
    top = 0.6 if title else 0.3  # inches above the first row: the title, the panels' titles
    fig, axes = plt.subplots(nrows, cols, figsize=(width, height), squeeze=False)
    # Fixed margins (inches → figure fractions) rather than tight_layout, which draws the figure once
    # more to measure its text: a third of the time of a plot that every run writes.
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - top / height,
                        wspace=0.4, hspace=0.5)
    for ax, (key, points) in zip(axes.flat, series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # short tick labels fit the margins
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, va="top")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, pil_kwargs={"compress_level": 1})  # fast zlib: a little larger, quicker to write
    plt.close(fig)
    return out_png


def progress(iterable: Any = None, *, total: int | None = None, desc: str = "", enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


