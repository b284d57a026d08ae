"""Training and held-out rows of a stage, from the ``data`` section of the config."""

from __future__ import annotations

import random

from saferlhf.config import DataConfig
from saferlhf.data.registry import mix_datasets
from saferlhf.trainers.common import logger


def load_splits(data: DataConfig, kind: str, seed: int) -> tuple[list[dict], list[dict]]:
    """Validated rows of ``data.train`` and of ``data.eval`` (or an ``eval_split`` share of train)."""
    if not data.train:
        raise ValueError("data.train is empty: give at least one dataset (NAME[:PROPORTION[:PATH]])")
    train = list(mix_datasets(data.train, kind, seed=seed, strict=data.strict).rows)
    if data.eval:
        held_out = list(mix_datasets(data.eval, kind, seed=seed, strict=data.strict).rows)
    elif data.eval_split > 0:
        if not 0 < data.eval_split < 1:
            raise ValueError(f"data.eval_split must be in (0, 1), got {data.eval_split}")
        rows = train[:]
        random.Random(seed).shuffle(rows)
        n_eval = max(1, int(len(rows) * data.eval_split))
        held_out, train = rows[:n_eval], rows[n_eval:]
    else:
        held_out = []
    logger.info("%s data: %d training rows, %d held-out rows", kind, len(train), len(held_out))
    return train, held_out
