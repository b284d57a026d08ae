"""benchmarks/gpu_suite.py runs end to end: on tiny shapes, CPU tensors, Triton interpreted.

No GPU run can happen here; this proves the suite's code paths (checks, benchmarks, summary, table,
JSON line) so that its first GPU run measures instead of crashing. Its timings here mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_inputs import script_module

pytest_plugins = ["kernel_fixtures"]  # switches the Triton interpreter on where there is no GPU

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def gpu_suite():
    pytest.importorskip("triton")
    with script_module(SUITE) as module:
        yield module


def test_suite_runs_on_tiny_shapes(gpu_suite):
    tiny = gpu_suite.Sizes(
        copy_numel=4096, rows=4, vocab=300, check_rows=2, batch=5, length=16, long_length=40, tokens=6, hidden=40,
        intermediate=24, reps=1, reference_reps=1,
    )
    summary = gpu_suite.run(DEVICE, tiny)
    assert summary["correct"], summary["failed_checks"]
    assert summary["logprobs"]["rows"] == 4 and summary["rollout_ops"]["length"] == 16
    assert set(summary["targets"]) == {
        "logprobs_fwd_fraction_of_copy>=0.8",
        "logprobs_full_speedup>=3",
        "logprobs_full_peak_extra<=1.1x_logits",
        "dual_gae_speedup>=100",
    }
    assert json.loads(json.dumps(summary)) == summary  # one JSON line, nothing unserialisable
    table = gpu_suite.format_table(summary)
    assert summary["device"] in table and "all pass" in table


def test_a_wrong_kernel_fails_the_checks(gpu_suite, monkeypatch):
    # The checks must be able to fail: a logprobs that ignores the temperature is caught.
    real = gpu_suite.logprobs_kernel.logprobs
    monkeypatch.setattr(
        gpu_suite.logprobs_kernel, "logprobs", lambda logits, labels, temperature, **kw: real(logits, labels, 1.0, **kw)
    )
    checks = gpu_suite.check_logprobs(DEVICE, (2, 3, 50), torch.float32, 0.7)
    assert not any(ok for ok, _ in checks.values())
