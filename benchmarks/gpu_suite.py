"""GPU suite: correctness and speed of every fused kernel on CUDA, in a few minutes, one JSON line.

Usage (needs only torch and triton; saferlhf need not be installed):

    python benchmarks/gpu_suite.py [--json FILE]   # prints tables, then one JSON line

What it measures (issue 4 targets, H100):
- the device-to-device copy bandwidth (read + write bytes / time): the roofline for the rest;
- ``logprobs`` forward at N = 16384, V = 128256, bf16 logits read once: achieved bandwidth as a
  fraction of the copy bandwidth (target ≥ 0.8);
- ``logprobs`` forward + backward against the reference (upcast to fp32, log_softmax, gather,
  autograd): speed-up (target ≥ 3×) and peak extra memory in units of the logits (target ≤ 1.1),
  out of place and with ``inplace_backward``;
- ``shape_rewards`` and ``dual_gae`` (scan and loop) at B = 64, T = 1024 against the references
  (target for dual_gae ≥ 100×);
- the decoder's fused layers, forward + backward against the references: ``rms_norm`` on the
  (20480, 1024) activations and ``swiglu`` on the (20480, 4096) gate of the step benchmark's model
  (32 sequences × 640 tokens);
- then one PPO-Lagrangian step of a ~0.5B Llama with a 128k vocabulary, phase by phase, the
  original design's computation against the trainer's (fused ops, response-only LM head, fused and
  compiled decoder layers), each lever also alone (``benchmarks/bench_plain_step.py --model gpu
  --ablation``; it needs transformers too; skip with ``--no-step``).
Before timing, every kernel is checked against its reference three ways (kernel, reference in the
same dtype, reference in float64: err(kernel) ≤ 2·err(reference) + a few roundings).

The functions take the device and the sizes, so that tests run them on tiny shapes on CPU tensors
in the Triton interpreter (timings there mean nothing; peak memory is CUDA-only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


def _import_project():
    """(algorithms, dual_gae, logprobs, shape_rewards, rms_norm, swiglu) modules, installed or from this checkout."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from checkout import import_saferlhf

    import_saferlhf()
    from saferlhf.kernels import dual_gae, logprobs, rms_norm, shape_rewards, swiglu

    from saferlhf import algorithms

    return algorithms, dual_gae, logprobs, shape_rewards, rms_norm, swiglu


algorithms, dual_gae_kernel, logprobs_kernel, shape_rewards_kernel, rms_norm_kernel, swiglu_kernel = _import_project()


@dataclass(frozen=True)
class Sizes:
    """The shapes the suite runs at."""

    copy_numel: int = 1 << 30  # bf16 elements copied for the bandwidth roofline (2 GiB)
    rows: int = 16384  # N for logprobs
    vocab: int = 128256  # V for logprobs
    check_rows: int = 256  # rows of the big logprobs case checked against float64
    batch: int = 64  # B for shaping and GAE
    length: int = 1024  # T for shaping and GAE
    long_length: int = 3000  # T of the GAE check whose rows span several scan blocks
    tokens: int = 20480  # rows of the layer benchmarks (32 sequences × 640 tokens)
    hidden: int = 1024  # rms_norm width
    intermediate: int = 4096  # swiglu width
    reps: int = 10
    reference_reps: int = 3  # the reference GAE loop takes ~0.1 s a call


FULL = Sizes()


# --- measurement ----------------------------------------------------------------------------------


def time_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms; CUDA events on GPU (the queue is drained before and after)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()  # host-device sync: time this call only
            start.record()
            fn()
            end.record()
            end.synchronize()  # host-device sync: wait for the result
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory allocated by ``fn()`` beyond what was allocated before it (CUDA only, else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def three_way_ok(impl: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, ulps: float = 4.0) -> tuple[bool, str]:
    """err(impl) ≤ 2·err(ref) + ``ulps`` roundings of the largest value, errors against ``ref64``."""
    err_impl = (impl.double() - ref64).abs().max().item()
    err_ref = (ref.double() - ref64).abs().max().item()
    atol = ulps * torch.finfo(impl.dtype).eps * max(1.0, ref64.abs().max().item())
    return err_impl <= 2 * err_ref + atol, f"err {err_impl:.2e} vs reference {err_ref:.2e} (+{atol:.1e})"


# --- checks ---------------------------------------------------------------------------------------


def _logprobs_value_and_grad(fn, logits, labels, temperature, upstream, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    logp = fn(leaf, labels, temperature, **kwargs)
    (grad,) = torch.autograd.grad(logp, leaf, upstream)
    return logp.detach(), grad


def check_logprobs(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype, temperature: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(*shape, generator=generator) * 4).to(dtype).to(device)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator).to(device)
    upstream = torch.randn(shape[:-1], generator=generator).to(device)
    results = {}
    for name, inplace in (("", False), ("inplace ", True)):
        kernel = _logprobs_value_and_grad(
            logprobs_kernel.logprobs, logits, labels, temperature, upstream, inplace_backward=inplace
        )
        same = _logprobs_value_and_grad(algorithms.gather_logprobs, logits, labels, temperature, upstream)
        exact = _logprobs_value_and_grad(algorithms.gather_logprobs, logits.double(), labels, temperature, upstream)
        for what, k, s, e in zip(("logp", "grad"), kernel, same, exact):
            results[f"logprobs {name}{what} {tuple(shape)} {str(dtype)[6:]} τ={temperature}"] = three_way_ok(k, s, e)
    return results


def _rollout(device: torch.device, batch: int, length: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0::4, length * 2 // 3 :] = False  # right padding
    mask[1::4, : length // 3] = False  # left padding
    mask[2::8] = False  # fully masked rows
    tensors = dict(
        logp_old=-torch.rand(batch, length, generator=generator) * 4,
        logp_ref=-torch.rand(batch, length, generator=generator) * 4,
        reward=torch.randn(batch, generator=generator) * 4,
        cost=torch.randn(batch, generator=generator) * 4,
        rewards=torch.randn(batch, length, generator=generator),
        costs=torch.randn(batch, length, generator=generator),
        values_r=torch.randn(batch, length, generator=generator),
        values_c=torch.randn(batch, length, generator=generator),
        mask=mask,
    )
    return {name: x.to(device) for name, x in tensors.items()}


def _float64(args: tuple) -> tuple:
    """The same arguments with every floating-point tensor in float64."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check_shape_rewards(device: torch.device, batch: int, length: int) -> dict:
    x = _rollout(device, batch, length)
    args = (x["logp_old"], x["logp_ref"], x["mask"], x["reward"], x["cost"])
    kernel = shape_rewards_kernel.shape_rewards(*args, 0.1, 5.0)
    same = algorithms.shape_rewards(*args, 0.1, 5.0)
    exact = algorithms.shape_rewards(*_float64(args), 0.1, 5.0)
    return {
        f"shape_rewards {name} ({batch}, {length})": three_way_ok(k, s, e)
        for name, k, s, e in zip(("rewards", "costs"), kernel, same, exact)
    }


def check_dual_gae(device: torch.device, batch: int, length: int) -> dict:
    x = _rollout(device, batch, length)
    args = (x["rewards"], x["costs"], x["values_r"], x["values_c"], x["mask"], 1.0, 0.95)
    same = algorithms.dual_gae(*args, 1.5)
    exact = algorithms.dual_gae(*_float64(args), 1.5)
    results = {}
    # λ as a device tensor (read by the kernel) and as a python float (passed by value).
    for method, lam in (("scan", torch.tensor(1.5, device=device)), ("loop", 1.5), ("scan", 1.5)):
        kernel = dual_gae_kernel.dual_gae(*args, lam, method=method)
        for name, k, s, e in zip(("adv_r", "ret_r", "adv_c", "ret_c", "adv"), kernel, same, exact):
            results[f"dual_gae {method} λ {type(lam).__name__} {name} ({batch}, {length})"] = three_way_ok(k, s, e)
    return results


def _layer_cases(device: torch.device, rows: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 0):
    """(name, kernel, reference, inputs) of the two layer ops on random activations."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=generator) * 2 + 0.5).to(dtype).to(device)
    weight = (torch.rand(hidden, generator=generator) + 0.5).to(dtype).to(device)
    gate = (torch.randn(rows, intermediate, generator=generator) * 3).to(dtype).to(device)
    up = torch.randn(rows, intermediate, generator=generator).to(dtype).to(device)
    return [
        ("rms_norm", lambda a, w: rms_norm_kernel.rms_norm(a, w, 1e-5), lambda a, w: algorithms.rms_norm(a, w, 1e-5),
         (x, weight)),
        ("swiglu", swiglu_kernel.swiglu, algorithms.swiglu, (gate, up)),
    ]  # fmt: skip


def _value_and_grads(fn, inputs, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, upstream))


def check_layers(device: torch.device, rows: int, hidden: int, intermediate: int, dtype: torch.dtype) -> dict:
    results = {}
    for name, kernel, reference, inputs in _layer_cases(device, rows, hidden, intermediate, dtype):
        upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        got = _value_and_grads(kernel, inputs, upstream)
        same = _value_and_grads(reference, inputs, upstream)
        exact = _value_and_grads(reference, [x.double() for x in inputs], upstream.double())
        for what, k, s, e in zip(("out", "grad 0", "grad 1"), got, same, exact):
            results[f"{name} {what} ({rows}, {inputs[0].shape[-1]}) {str(dtype)[6:]}"] = three_way_ok(k, s, e)
    return results


# --- benchmarks -----------------------------------------------------------------------------------


def bench_copy(device: torch.device, numel: int, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def bench_logprobs(device: torch.device, rows: int, vocab: int, reps: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16, generator=generator)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    upstream = torch.randn(rows, device=device, generator=generator)
    logits_bytes = logits.numel() * logits.element_size()
    leaf = logits.requires_grad_()

    def kernel_fwd():
        with torch.no_grad():
            logprobs_kernel.logprobs(logits, labels)

    def reference_fwd():
        with torch.no_grad():
            algorithms.gather_logprobs(logits, labels)

    def full(fn, **kwargs):
        return lambda: torch.autograd.grad(fn(leaf, labels, 1.0, **kwargs), leaf, upstream)

    kernel_full = full(logprobs_kernel.logprobs)
    # Overwrites the logits with gradients: later calls read gradients as logits (same cost).
    inplace_full = full(logprobs_kernel.logprobs, inplace_backward=True)
    reference_full = full(algorithms.gather_logprobs)
    result = {
        "rows": rows,
        "vocab": vocab,
        "fwd_ms": time_ms(kernel_fwd, device, reps),
        "reference_fwd_ms": time_ms(reference_fwd, device, reps),
        "full_ms": time_ms(kernel_full, device, reps),
        "reference_full_ms": time_ms(reference_full, device, reps),
        "full_inplace_ms": time_ms(inplace_full, device, reps),
    }
    result["fwd_gbps"] = logits_bytes / result["fwd_ms"] / 1e6
    result["full_speedup"] = result["reference_full_ms"] / result["full_ms"]
    result["full_inplace_speedup"] = result["reference_full_ms"] / result["full_inplace_ms"]
    for name, fn in (("full", kernel_full), ("full_inplace", inplace_full), ("reference_full", reference_full)):
        peak = peak_extra_bytes(fn, device)
        result[f"{name}_peak_extra_x_logits"] = None if peak is None else peak / logits_bytes
    return result


def bench_layers(device: torch.device, rows: int, hidden: int, intermediate: int, reps: int) -> dict:
    """Forward + backward of each layer op, kernel vs reference, bf16; peak extra memory of each."""
    result: dict = {"rows": rows, "hidden": hidden, "intermediate": intermediate}
    for name, kernel, reference, inputs in _layer_cases(device, rows, hidden, intermediate, torch.bfloat16):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        upstream = torch.randn_like(inputs[0])
        for label, fn in (("", kernel), ("reference_", reference)):
            def full(fn=fn, leaves=leaves, upstream=upstream):
                return torch.autograd.grad(fn(*leaves), leaves, upstream)

            def forward(fn=fn, inputs=inputs):
                with torch.no_grad():
                    fn(*inputs)

            result[f"{name}_{label}ms"] = time_ms(full, device, reps)
            result[f"{name}_{label}fwd_ms"] = time_ms(forward, device, reps)
            peak = peak_extra_bytes(full, device)
            result[f"{name}_{label}peak_extra_mb"] = None if peak is None else peak / 1e6
        result[f"{name}_speedup"] = result[f"{name}_reference_ms"] / result[f"{name}_ms"]
        if name == "rms_norm":
            result["rms_norm_backward_variants"] = _rms_norm_variants(leaves, upstream, device, reps)
    return result


def _rms_norm_variants(leaves, upstream, device, reps) -> dict[str, float]:
    """Forward + backward ms of rms_norm for other backward tilings (tile elements, programs per SM)."""
    saved = rms_norm_kernel.BACKWARD_TILE, rms_norm_kernel.BACKWARD_PROGRAMS_PER_SM
    times = {}
    try:
        for tile in (1024, 2048, 4096, 8192):
            for per_sm in (4, 8, 16):
                rms_norm_kernel.BACKWARD_TILE, rms_norm_kernel.BACKWARD_PROGRAMS_PER_SM = tile, per_sm
                times[f"tile {tile}, {per_sm}/SM"] = time_ms(
                    lambda: torch.autograd.grad(rms_norm_kernel.rms_norm(leaves[0], leaves[1], 1e-5), leaves, upstream),
                    device, reps)
    finally:
        rms_norm_kernel.BACKWARD_TILE, rms_norm_kernel.BACKWARD_PROGRAMS_PER_SM = saved
    return times


def bench_rollout_ops(device: torch.device, batch: int, length: int, reps: int, reference_reps: int) -> dict:
    x = _rollout(device, batch, length)
    shaping = (x["logp_old"], x["logp_ref"], x["mask"], x["reward"], x["cost"], 0.1, 5.0)
    gae = (x["rewards"], x["costs"], x["values_r"], x["values_c"], x["mask"], 1.0, 0.95)
    lam = torch.tensor(1.0, device=device)
    result = {
        "batch": batch,
        "length": length,
        "shape_rewards_ms": time_ms(lambda: shape_rewards_kernel.shape_rewards(*shaping), device, reps),
        "shape_rewards_reference_ms": time_ms(lambda: algorithms.shape_rewards(*shaping), device, reps),
        "dual_gae_scan_ms": time_ms(lambda: dual_gae_kernel.dual_gae(*gae, lam, method="scan"), device, reps),
        "dual_gae_loop_ms": time_ms(lambda: dual_gae_kernel.dual_gae(*gae, lam, method="loop"), device, reps),
        "dual_gae_reference_ms": time_ms(lambda: algorithms.dual_gae(*gae, lam), device, reference_reps, warmup=1),
    }
    result["shape_rewards_speedup"] = result["shape_rewards_reference_ms"] / result["shape_rewards_ms"]
    for method in ("scan", "loop"):
        result[f"dual_gae_{method}_speedup"] = result["dual_gae_reference_ms"] / result[f"dual_gae_{method}_ms"]
    return result


# --- the suite ------------------------------------------------------------------------------------


def run_checks(device: torch.device, sizes: Sizes) -> dict[str, tuple[bool, str]]:
    checks = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        checks.update(check_logprobs(device, (3, 17, 1000), dtype, 0.7))
    checks.update(check_logprobs(device, (sizes.check_rows, sizes.vocab), torch.bfloat16, 1.0))
    checks.update(check_shape_rewards(device, sizes.batch, sizes.length))
    checks.update(check_dual_gae(device, sizes.batch, sizes.length))
    checks.update(check_dual_gae(device, 2, sizes.long_length))
    for dtype in (torch.float32, torch.bfloat16):
        checks.update(check_layers(device, 37, 1000, 700, dtype))
    return checks


def run(device: torch.device, sizes: Sizes) -> dict:
    """The whole suite; returns the summary that is printed as the JSON line."""
    begin = time.perf_counter()
    checks = run_checks(device, sizes)
    copy_gbps = bench_copy(device, sizes.copy_numel, sizes.reps)
    logprobs = bench_logprobs(device, sizes.rows, sizes.vocab, sizes.reps)
    logprobs["fwd_fraction_of_copy"] = logprobs["fwd_gbps"] / copy_gbps
    rollout = bench_rollout_ops(device, sizes.batch, sizes.length, sizes.reps, sizes.reference_reps)
    layers = bench_layers(device, sizes.tokens, sizes.hidden, sizes.intermediate, sizes.reps)
    peak = logprobs["full_peak_extra_x_logits"]
    import triton

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "correct": all(ok for ok, _ in checks.values()),
        "failed_checks": {name: detail for name, (ok, detail) in checks.items() if not ok},
        "copy_gbps": copy_gbps,
        "logprobs": logprobs,
        "rollout_ops": rollout,
        "layers": layers,
        "targets": {
            "logprobs_fwd_fraction_of_copy>=0.8": logprobs["fwd_fraction_of_copy"] >= 0.8,
            "logprobs_full_speedup>=3": logprobs["full_speedup"] >= 3,
            "logprobs_full_peak_extra<=1.1x_logits": None if peak is None else peak <= 1.1,
            "dual_gae_speedup>=100": max(rollout["dual_gae_scan_speedup"], rollout["dual_gae_loop_speedup"]) >= 100,
        },
        "seconds": time.perf_counter() - begin,
    }


def format_table(summary: dict) -> str:
    """The human-readable part of the output."""
    lp, ro, ly = summary["logprobs"], summary["rollout_ops"], summary["layers"]

    def memory(key):
        value = lp[f"{key}_peak_extra_x_logits"]
        return "n/a" if value is None else f"{value:.2f}× logits"

    rows = [
        ("device", summary["device"]),
        ("checks", "all pass" if summary["correct"] else f"FAILED: {sorted(summary['failed_checks'])}"),
        ("copy bandwidth", f"{summary['copy_gbps']:.0f} GB/s (read + write)"),
        (f"logprobs fwd N={lp['rows']} V={lp['vocab']} bf16",
         f"{lp['fwd_ms']:.3f} ms, {lp['fwd_gbps']:.0f} GB/s = {lp['fwd_fraction_of_copy']:.0%} of copy "
         f"(reference {lp['reference_fwd_ms']:.3f} ms)"),
        ("logprobs fwd+bwd", f"{lp['full_ms']:.3f} ms, {lp['full_speedup']:.1f}× reference, {memory('full')}"),
        ("logprobs fwd+bwd in place",
         f"{lp['full_inplace_ms']:.3f} ms, {lp['full_inplace_speedup']:.1f}× reference, {memory('full_inplace')}"),
        ("reference fwd+bwd", f"{lp['reference_full_ms']:.3f} ms, {memory('reference_full')}"),
        (f"shape_rewards B={ro['batch']} T={ro['length']}",
         f"{ro['shape_rewards_ms']:.3f} ms, {ro['shape_rewards_speedup']:.1f}× reference"),
        ("dual_gae scan", f"{ro['dual_gae_scan_ms']:.3f} ms, {ro['dual_gae_scan_speedup']:.0f}× reference"),
        ("dual_gae loop", f"{ro['dual_gae_loop_ms']:.3f} ms, {ro['dual_gae_loop_speedup']:.0f}× reference"),
        ("dual_gae reference", f"{ro['dual_gae_reference_ms']:.1f} ms"),
        *((f"{op} fwd+bwd ({ly['rows']}, {ly[width]}) bf16",
           f"{ly[op + '_ms']:.3f} ms, {ly[op + '_speedup']:.1f}× reference ({ly[op + '_reference_ms']:.3f} ms); "
           f"fwd {ly[op + '_fwd_ms']:.3f} ms (reference {ly[op + '_reference_fwd_ms']:.3f} ms)")
          for op, width in (("rms_norm", "hidden"), ("swiglu", "intermediate"))),
        ("rms_norm fwd+bwd, other tilings",
         ", ".join(f"{k}: {v:.3f}" for k, v in ly["rms_norm_backward_variants"].items())),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the summary to this file")
    parser.add_argument("--no-step", action="store_true", help="skip the PPO step benchmark (bench_plain_step.py)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_suite needs a CUDA device")
    summary = run(torch.device("cuda"), FULL)
    print(format_table(summary), flush=True)
    if args.json is not None:  # the kernel results are kept even if the step benchmark fails
        args.json.write_text(json.dumps(summary) + "\n")
    if not args.no_step:
        import bench_plain_step as bench_step

        step = bench_step.measure("gpu", "cuda", steps=2, rounds=3, ablation=True)
        print(bench_step.format_table(step))
        summary["step"] = step
        summary["seconds"] += step["seconds"]
        if args.json is not None:
            args.json.write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
