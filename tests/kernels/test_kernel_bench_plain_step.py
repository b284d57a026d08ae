"""benchmarks/bench_plain_step.py: the baseline (reference ops) and the fused ops compute the same PPO step.

Tiny Llama on CPU; the fused configuration runs the native ops, and the Triton kernels through the
interpreter (on CUDA where there is a GPU), and once with its decoder layers compiled (inductor's CPU
backend here). Timings mean nothing here; what is asserted is that both
configurations, started from the same weights on the same rollout, reach the same log-probs,
entropy and first losses, so that the GPU figures compare like with like.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_inputs import script_module

pytest_plugins = ["kernel_fixtures"]  # switches the Triton interpreter on where there is no GPU

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_plain_step.py"


@pytest.fixture(scope="module")
def bench_step():
    with script_module(SCRIPT) as module:
        yield module


@pytest.mark.parametrize("fused,compile", [("native", "auto"), ("triton", "auto"), ("native", "true")])
def test_baseline_and_fused_compute_the_same_step(bench_step, fused, compile):
    if fused == "triton":
        pytest.importorskip("triton")
    device = "cuda" if fused == "triton" and torch.cuda.is_available() else "cpu"
    ablation = fused == "native"  # the levers one at a time, on the cheaper backend
    # One round: the timings are not asserted, only that both configurations compute the same step.
    result = bench_step.measure("tiny", device, steps=1, fused=fused, rounds=1, ablation=ablation, compile=compile)
    base, fast = result["configs"]["baseline"], result["configs"]["saferlhf"]
    assert (base["ops"], fast["ops"]) == ("reference", fused)
    compiled = compile == "true" or device == "cuda"  # auto compiles on CUDA only
    assert result["compile_layers"] is fast["compile_layers"] is compiled and base["compile_layers"] is False
    names = ["fused-ops", "+response-logits", *(["+fused-layers"] if compiled else []), "saferlhf"]
    assert list(result["training_speedup"]) == (names if ablation else ["saferlhf"])
    for other in (result["configs"][name] for name in result["training_speedup"]):
        assert other["logp_old_mean"] == pytest.approx(base["logp_old_mean"], rel=1e-5)
        assert other["entropy"] == pytest.approx(base["entropy"], rel=1e-5)
        for name, loss in base["first_step_losses"].items():
            assert other["first_step_losses"][name] == pytest.approx(loss, rel=1e-4, abs=1e-6), name
    for phase in bench_step.PHASES:
        assert base[f"{phase}_s"] > 0 and fast[f"{phase}_s"] > 0
    table = bench_step.format_table(result)
    assert "training" in table and fused in table
    json.dumps(result)  # the JSON line is serialisable
