"""Inputs shared by the kernel tests: padding masks, and the benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import torch


def padding_mask(batch: int, length: int, single_token: bool = False) -> torch.Tensor:
    """Rows: right-padded, left-padded, fully masked, a gap inside, full (and a single real token when
    ``single_token``); repeated down the batch."""
    kinds = 6 if single_token else 5
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row in range(batch):
        kind = row % kinds
        if kind == 0:
            mask[row, length * 2 // 3 :] = False
        elif kind == 1:
            mask[row, : length // 3] = False
        elif kind == 2:
            mask[row] = False
        elif kind == 3:
            mask[row, length // 4 : length // 2] = False
        elif kind == 5:
            mask[row, :] = False
            mask[row, length // 2] = True
    return mask


@contextlib.contextmanager
def script_module(path: Path):
    """The script at ``path`` (e.g. ``benchmarks/gpu_suite.py``) imported as a module named after its file.

    It is registered in ``sys.modules`` while it runs (dataclasses look their module up while it
    executes) and removed afterwards.
    """
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[path.stem]
