"""Where the time of the fused layers goes on a GPU: device time against host (launch) time.

Usage (needs a CUDA device; torch, triton and transformers only):

    python benchmarks/bench_layers.py [--json FILE]

1. Each layer op (``rms_norm`` at H = 1024, ``swiglu`` at I = 4096, bf16), forward + backward, at the
   score phase's size (20480 rows = 32 × 640 tokens) and a mini-batch's (5120 rows = 8 × 640), kernel
   and reference: ``device_ms`` is the median of CUDA-event timings of one call with the queue
   drained first; ``host_us`` is the Python time to issue one call when the device is never waited
   for (200 calls back to back, host clock, no sync inside) — when it exceeds the device time, the
   op is launch-bound at that size.
2. One update (forward + backward + AdamW) of a reward critic of the step benchmark's shape
   (``bench_plain_step.py --model gpu``, 16 layers of width 1024) on a mini-batch of 8 × 640 tokens:
   transformers' own layers (``unfused``), the fused layers (``fused``) and the compiled decoder
   layers (``compiled``, ``saferlhf.models.compiled``), alternating; then a torch.profiler table of
   one update each (top operators by host time) written next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_plain_step as bench_step  # noqa: E402  (imports saferlhf from this checkout)
import gpu_suite  # noqa: E402

from saferlhf.algorithms import value_loss  # noqa: E402
from saferlhf.models.passes import response_values  # noqa: E402


def host_us(fn, calls: int = 200) -> float:
    """Microseconds of host time per call when the device is not waited for inside the loop."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - begin
    torch.cuda.synchronize()
    return issued / calls * 1e6


def layer_ops(device: torch.device) -> dict:
    result = {}
    for rows in (20480, 5120):
        for name, kernel, reference, inputs in gpu_suite._layer_cases(device, rows, 1024, 4096, torch.bfloat16):
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            upstream = torch.randn_like(inputs[0])
            for label, fn in (("kernel", kernel), ("reference", reference)):
                def call(fn=fn, leaves=leaves, upstream=upstream):
                    return torch.autograd.grad(fn(*leaves), leaves, upstream)

                result[f"{name} {rows} {label}"] = {"device_ms": gpu_suite.time_ms(call, device, 20),
                                                    "host_us": host_us(call)}
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def critic_update(device: torch.device, out: Path | None, reps: int = 6, model: str = "gpu") -> dict:
    models = bench_step.Models(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    critic = models.critic_r
    optimizer = models.optimizers["critic_r"]
    n, p, t = 8, 128, 512
    seq = torch.randint(3, models.config.vocab_size, (n, p + t), device=device)
    attn = torch.ones_like(seq)
    returns = torch.randn(n, t, device=device)
    mask = torch.ones(n, t, device=device)

    def update():
        values = response_values(critic, seq, attn, p)
        loss = value_loss(values, values.detach(), returns, mask, 0.2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    configs = {"fused": bench_step.ABLATIONS["+fused-layers"], "unfused": bench_step.ABLATIONS["+response-logits"],
               "compiled": bench_step.CONFIGS["saferlhf"]}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(reps):
        for name, levers in configs.items():
            with bench_step.levers(levers, [critic]):
                update()  # warm-up of this configuration
                _sync(device)
                begin = time.perf_counter()
                update()
                _sync(device)
                times[name].append((time.perf_counter() - begin) * 1e3)
    result = {name: statistics.median(values) for name, values in times.items()}
    for name, levers in configs.items():
        with bench_step.levers(levers, [critic]):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                update()
                _sync(device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        if out is not None:
            (out.parent / f"critic_profile_{name}.txt").write_text(table)
        events = prof.key_averages()
        result[f"{name}_host_ms"] = sum(e.self_cpu_time_total for e in events) / 1e3
        result[f"{name}_device_ms"] = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_layers needs a CUDA device")
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "ops": layer_ops(device)}
    for key, value in result["ops"].items():
        print(f"{key:<28} device {value['device_ms']:.3f} ms   host {value['host_us']:.1f} us/call")
    result["critic_update_ms"] = critic_update(device, args.json)
    print("critic update (8 x 640 tokens):", json.dumps(result["critic_update_ms"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
