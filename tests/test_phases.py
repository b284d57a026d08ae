"""PhaseTimer: per-phase time and, on CPU, the process's peak resident memory within each phase."""

from __future__ import annotations

import pytest
import torch

from saferlhf.trainers.phases import PhaseTimer


def test_cpu_peak_resident_memory_is_measured_per_phase():
    timer = PhaseTimer(torch.device("cpu"))
    if not timer.rss:
        pytest.skip("this kernel has no /proc/self/clear_refs")
    with timer("small"):
        torch.ones(16).sum()
    with timer("big"):
        block = torch.ones(64 * 2**20)  # 256 MiB, every page written
        block.add_(1.0)
        del block
    with timer("after"):  # the high-water mark was reset: the freed block is not counted again
        torch.ones(16).sum()
    metrics = timer.collect()
    assert metrics["memory/big_peak_rss_gb"] - metrics["memory/small_peak_rss_gb"] >= 0.25
    assert metrics["memory/after_peak_rss_gb"] < metrics["memory/big_peak_rss_gb"] - 0.2
    assert metrics["time/big"] > 0 and timer.collect() == {}  # collect resets
