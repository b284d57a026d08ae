"""Per-phase wall time, peak memory and (optionally) a torch.profiler trace of the PPO loop.

The trainer wraps each phase of a step in ``with phases("score"):``. For each phase the timer adds up
the wall time within the step (a phase may be entered several times: the actor and critic updates
alternate over the mini-batches), waits for the device at both ends so the time is the phase's
own, and on CUDA records the peak memory allocated inside the phase. Each phase is also a
``torch.profiler.record_function`` range named ``phase/<name>``, so a trace shows the phases and
:func:`top_ops_by_phase` can attribute operators to them.

With ``run.profile`` the trainer profiles rank 0 from the second step on (the first one warms up
compilation, caches and the generation engine) and writes ``profile/trace.json`` (Chrome trace: open
it in https://ui.perfetto.dev or chrome://tracing) and ``profile/top_ops.md`` into the run directory;
``run.memory_snapshot`` (CUDA) records the allocator's history and writes
``profile/memory_snapshot.pickle`` (drag it into https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import torch


class PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        import time

        cuda = self.device.type == "cuda"
        self._sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with torch.profiler.record_function(f"phase/{name}"):
            yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start
        if cuda:
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), torch.cuda.max_memory_allocated(self.device))

    def collect(self) -> dict[str, float]:
        """This step's metrics (``time/<phase>`` seconds, ``memory/<phase>_peak_gb`` on CUDA); resets."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out.update({f"memory/{k}_peak_gb": v / 1e9 for k, v in self.peak_bytes.items()})
        self.seconds.clear()
        self.peak_bytes.clear()
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
            table.write_text(format_top_ops(top_ops_by_phase(self.profiler.events())))
            written += [trace, table]
            self.profiler = None
        if self.memory and self.started:
            snapshot = self.out_dir / "memory_snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        return written
