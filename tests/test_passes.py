"""The shared forward passes of the PPO trainer."""

from __future__ import annotations

import pytest
import torch

from saferlhf.trainers import passes


@pytest.mark.parametrize("chunk", [1, 5, 7, 1024])
def test_mean_entropy_in_chunks_equals_the_masked_mean_of_the_whole(monkeypatch, chunk):
    monkeypatch.setattr(passes, "ENTROPY_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 9, 11, generator=g)  # (N, L, V) model output
    logits = full[:, 2:-1]  # (N, T=6, V): a non-contiguous slice, as the trainer passes it
    assert not logits.is_contiguous()
    mask = (torch.rand(6, 6, generator=g) > 0.3).long()
    mask[3] = 0  # an empty response
    temperature = 0.7
    p = torch.softmax(logits.double() / temperature, -1)
    expected = (-(p * p.log()).sum(-1) * mask).sum() / mask.sum()
    got = passes.mean_entropy(logits, mask, temperature)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert passes.mean_entropy(logits, torch.zeros_like(mask), temperature).item() == 0.0
