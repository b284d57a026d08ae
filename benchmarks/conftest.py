"""Shared measurement for the op benchmarks: peak memory, copy bandwidth, speed-up summary.

Run with ``pytest benchmarks/ --benchmark-only``: files named ``bench_*.py`` are collected here
(pytest's own pattern is ``test_*.py``, and the project's test run never enters this directory).
After the pytest-benchmark tables, a summary prints, per benchmark group, each provider's median
time, its speed-up over the reference, its peak extra memory and (CUDA) its fraction of the copy
bandwidth.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_results: dict[str, dict[str, tuple[float, dict]]] = {}  # group -> provider -> (median s, extra_info)


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def peak_extra_bytes(fn, device: torch.device = DEVICE) -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond what was allocated before.

    CUDA: the caching allocator's peak statistic. CPU: torch has no allocator statistics, so the
    profiler's record of every allocation and free (with its size and time) is replayed and the
    highest running total taken.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="session")
def peak_memory():
    """``peak_extra_bytes`` as a fixture (benchmark modules do not import this conftest)."""
    return peak_extra_bytes


@pytest.fixture(scope="session")
def copy_gbps() -> float | None:
    """Device-to-device copy bandwidth (read + write bytes), the roofline of the GPU kernels; None on CPU."""
    if DEVICE.type != "cuda":
        return None
    src = torch.ones(1 << 28, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()  # host-device sync: wait for the timed copies
    seconds = start.elapsed_time(end) / 1e3 / 10
    return 2 * src.numel() * src.element_size() / seconds / 1e9


@pytest.fixture
def record_median():
    """Call with (group, provider, benchmark) after a benchmark ran, for the summary."""

    def record(group: str, provider: str, benchmark) -> None:
        if benchmark.stats is not None:  # None under --benchmark-disable
            _results.setdefault(group, {})[provider] = (benchmark.stats.stats.median, dict(benchmark.extra_info))

    return record


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    terminalreporter.section(f"speed-up over the reference ({DEVICE.type})")
    terminalreporter.write_line(f"{'group':<34} {'provider':<12} {'median':>12} {'speed-up':>9} {'peak extra':>12}")
    for group, providers in sorted(_results.items()):
        reference = providers.get("reference", (None,))[0]
        for provider, (median, info) in sorted(providers.items(), key=lambda item: item[1][0]):
            speedup = f"{reference / median:8.1f}x" if reference else f"{'-':>9}"
            line = f"{group:<34} {provider:<12} {median * 1e3:9.3f} ms {speedup} {info['peak_extra_mb']:9.1f} MB"
            if "fraction_of_copy_bandwidth" in info:
                line += f"  {info['gbps']:.0f} GB/s = {info['fraction_of_copy_bandwidth']:.0%} of copy"
            terminalreporter.write_line(line)
