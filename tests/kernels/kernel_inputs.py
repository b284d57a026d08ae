"""Inputs shared by the kernel tests."""

from __future__ import annotations

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
