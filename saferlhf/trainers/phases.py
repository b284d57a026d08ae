"""Per-phase wall time, peak memory and (optionally) a torch.profiler trace of the PPO loop.

The trainer wraps each phase of a step in ``with phases("score"):``. For each phase the timer adds up
its time within the step (a phase may be entered several times: the actor and critic updates
alternate over the mini-batches) — device events on CUDA, read once per step, so that measuring adds
no host-device sync when it is not profiling — and records the phase's peak memory: on CUDA the peak allocated by torch
(``memory/<phase>_peak_gb``), on CPU (Linux) the process's peak resident set, engine and all
(``memory/<phase>_peak_rss_gb``; the kernel's high-water mark is reset at the start of the phase
through ``/proc/self/clear_refs``). Each phase is also a
``torch.profiler.record_function`` range named ``phase/<name>``, so a trace shows the phases and
:func:`top_ops_by_phase` can attribute operators to them.

With ``run.profile`` the trainer profiles rank 0 from the second step on (the first one warms up
compilation, caches and the generation engine) and writes ``profile/trace.json`` (Chrome trace: open
it in https://ui.perfetto.dev or chrome://tracing), ``profile/top_ops.md`` and ``profile/phases.png``
(the phases of each profiled step on a time line) into the run directory;
``run.memory_snapshot`` (CUDA) records the allocator's history and writes
``profile/memory_snapshot.pickle`` (drag it into https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_rss_peak() -> bool:
    """Resets this process's peak resident set (VmHWM) to its current size; False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int | None:
    """This process's peak resident set since start or the last reset (VmHWM), or None."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


class PhaseTimer:
    """Seconds and peak memory per phase of a step (module docstring).

    On CUDA a phase is timed with device events recorded at its entry and exit — no host-device sync
    inside the step, where the mini-batch updates are launch-bound and a sync per phase would drain the
    queue every time; :meth:`collect` synchronises once, when the step's metrics are read. ``sync=True``
    (profiling) also waits for the device at both ends of every phase, so that a trace's phase ranges
    hold exactly their own work. On the CPU the wall clock is the time.
    """

    def __init__(self, device: torch.device, sync: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.sync = sync and self.cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self.peak_bytes: dict[str, int] = {}
        self.peak_rss: dict[str, int] = {}
        self.rss = device.type == "cpu" and reset_rss_peak()

    @contextlib.contextmanager
    def __call__(self, name: str):
        import time

        if self.sync:
            torch.cuda.synchronize(self.device)  # host sync: profiling only
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)  # the allocator's host-side counters: no sync
            start_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
        if self.rss:
            reset_rss_peak()
        start = time.perf_counter()
        with torch.profiler.record_function(f"phase/{name}"):
            yield
        if self.cuda:
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record()
            self.events[name].append((start_event, end_event))
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), torch.cuda.max_memory_allocated(self.device))
            if self.sync:
                torch.cuda.synchronize(self.device)  # host sync: profiling only
        else:
            self.seconds[name] += time.perf_counter() - start
        if self.rss and (peak := rss_peak_bytes()) is not None:
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)

    def collect(self) -> dict[str, float]:
        """This step's metrics (``time/<phase>`` seconds, ``memory/<phase>_peak_gb`` on CUDA,
        ``memory/<phase>_peak_rss_gb`` on CPU); resets."""
        if self.events:
            torch.cuda.synchronize(self.device)  # host sync: once per step, to read the events
            for name, pairs in self.events.items():
                self.seconds[name] += sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out.update({f"memory/{k}_peak_gb": v / 1e9 for k, v in self.peak_bytes.items()})
        out.update({f"memory/{k}_peak_rss_gb": v / 1e9 for k, v in self.peak_rss.items()})
        self.seconds.clear()
        self.events.clear()
        self.peak_bytes.clear()
        self.peak_rss.clear()
        return out


def top_ops_by_phase(events, top: int = 10) -> dict[str, list[tuple[str, float, int]]]:
    """Operators inside each ``phase/<name>`` range: (name, self time in ms, calls), the top ``top``.

    ``events``: ``profiler.events()``. An operator counts for a phase when its interval lies within
    one of that phase's ranges on the same thread; device time is used where the event has it.
    """
    ranges: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    ops = []
    for e in events:
        tr = e.time_range
        if e.name.startswith("phase/"):
            ranges[e.name.removeprefix("phase/")].append((e.thread, tr.start, tr.end))
        elif not e.name.startswith("ProfilerStep"):
            ops.append(e)
    table: dict[str, dict[str, list[float]]] = {}
    for phase, spans in ranges.items():
        acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in ops:
            tr = e.time_range
            if any(e.thread == th and start <= tr.start and tr.end <= end for th, start, end in spans):
                device_us = getattr(e, "self_device_time_total", 0.0) or 0.0
                acc[e.name][0] += (device_us or e.self_cpu_time_total) / 1e3
                acc[e.name][1] += 1
        table[phase] = acc
    return {phase: sorted(((n, ms, int(c)) for n, (ms, c) in acc.items()), key=lambda r: -r[1])[:top]
            for phase, acc in table.items()}


def format_top_ops(top: dict[str, list[tuple[str, float, int]]]) -> str:
    lines = ["# Top operators per phase (self time)", ""]
    for phase, rows in top.items():
        lines += [f"## {phase}", "", "| operator | ms | calls |", "|---|---:|---:|"]
        lines += [f"| `{name}` | {ms:.2f} | {calls} |" for name, ms, calls in rows]
        lines.append("")
    return "\n".join(lines)


def plot_phase_timeline(events, path: Path) -> Path | None:
    """A picture of the trace: one row per phase, a bar for every time the phase ran (rank 0)."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.name.startswith("phase/"):
            spans[e.name.removeprefix("phase/")].append((e.time_range.start / 1e6, e.time_range.elapsed_us() / 1e6))
    if not spans:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(start for bars in spans.values() for start, _ in bars)
    order = [p for p in ("generate", "score", "experience", "actor", "critics", "sync") if p in spans]
    order += sorted(set(spans) - set(order))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(order) + 1.2))
    for row, phase in enumerate(order):
        ax.broken_barh([(start - t0, length) for start, length in spans[phase]], (row - 0.4, 0.8),
                       color=f"C{row}")
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first profiled step")
    ax.set_title("PPO-Lagrangian steps by phase (rank 0)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class StepProfiler:
    """torch.profiler over the steps of a run (rank 0), written out by :meth:`finish`."""

    def __init__(self, out_dir: Path, device: torch.device, *, trace: bool, memory: bool) -> None:
        self.out_dir, self.device = Path(out_dir), device
        self.trace, self.memory = trace, memory and device.type == "cuda"
        self.profiler = None
        self.started = False

    def start(self) -> None:
        self.started = True
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        if self.trace:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self.profiler.__enter__()

    def finish(self) -> list[Path]:
        """Stop and write what was recorded (nothing when neither trace nor memory was asked for)."""
        if self.profiler is not None or self.memory:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            trace = self.out_dir / "trace.json"
            self.profiler.export_chrome_trace(str(trace))
            table = self.out_dir / "top_ops.md"
            events = self.profiler.events()
            table.write_text(format_top_ops(top_ops_by_phase(events)))
            written += [trace, table]
            picture = plot_phase_timeline(events, self.out_dir / "phases.png")
            if picture is not None:
                written.append(picture)
            self.profiler = None
        if self.memory and self.started:
            snapshot = self.out_dir / "memory_snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        return written
