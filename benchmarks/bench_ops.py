"""Micro-benchmarks of the fused ops: providers reference / native / triton, modes fwd / bwd / full.

    pytest benchmarks/ --benchmark-only

Providers run where they are the fast path: native on CPU, triton on CUDA (the CPU interpreter's
timings mean nothing), the reference on either. Each benchmark records its peak extra memory and,
on CUDA, its achieved bandwidth as a fraction of the device-to-device copy bandwidth
(``extra_info``, in the saved JSON). Shapes are the issue's targets: ``logprobs`` at N = 2048,
V = 32000 float32 on CPU (N = 16384, V = 128256 bfloat16 on CUDA); ``shape_rewards`` and
``dual_gae`` at B = 64, T = 1024; the decoder layers ``rms_norm`` at N×H = 4096×384 and 2048×1024
and ``swiglu`` at N×I = 4096×1024, float32 on CPU (16384×4096 and 16384×8192 bfloat16 on CUDA).
"""

from __future__ import annotations

import functools

import pytest
import torch

from saferlhf import algorithms, csrc

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
LOGPROBS_SHAPE = (16384, 128256) if ON_CUDA else (2048, 32000)
LOGPROBS_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
BATCH, LENGTH = 64, 1024
RMS_NORM_SHAPES = [(16384, 4096)] if ON_CUDA else [(4096, 384), (2048, 1024)]  # (N, H)
SWIGLU_SHAPE = (16384, 8192) if ON_CUDA else (4096, 1024)  # (N, I)
LAYER_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()  # host-device sync: the timed call includes the GPU work


def _implementation(op: str, provider: str):
    """The function ``op`` of ``provider``, or a skip where that provider is not the fast path."""
    if provider == "reference":
        return {
            "logprobs": algorithms.gather_logprobs,
            "shape_rewards": algorithms.shape_rewards,
            "dual_gae": algorithms.dual_gae,
            "rms_norm": algorithms.rms_norm,
            "swiglu": algorithms.swiglu,
        }[op]
    if provider == "native":
        if ON_CUDA:
            pytest.skip("the native ops serve CPU tensors")
        if csrc.load() is None:
            pytest.skip("the native ops did not build")
        return getattr(csrc, op)
    if not ON_CUDA:
        pytest.skip("triton is timed on CUDA only (the CPU interpreter is for correctness)")
    from saferlhf.kernels import dual_gae, logprobs, rms_norm, shape_rewards, swiglu

    if provider == "triton-loop":
        return functools.partial(dual_gae.dual_gae, method="loop")
    return {
        "logprobs": logprobs.logprobs,
        "shape_rewards": shape_rewards.shape_rewards,
        "dual_gae": dual_gae.dual_gae,
        "rms_norm": rms_norm.rms_norm,
        "swiglu": swiglu.swiglu,
    }[op]


@pytest.fixture
def record(benchmark, record_median, peak_memory, copy_gbps):
    """After a benchmark: its peak extra memory, its bandwidth on CUDA, its median for the summary."""

    def record_result(provider: str, fn, bytes_moved: int) -> None:
        benchmark.extra_info["peak_extra_mb"] = peak_memory(fn, DEVICE) / 2**20
        record_median(benchmark.group, provider, benchmark)
        if copy_gbps is not None and benchmark.stats is not None:
            gbps = bytes_moved / benchmark.stats.stats.median / 1e9
            benchmark.extra_info["gbps"] = gbps
            benchmark.extra_info["fraction_of_copy_bandwidth"] = gbps / copy_gbps

    return record_result


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["reference", "native", "triton"])
def test_logprobs(benchmark, record, provider, mode):
    fn = _implementation("logprobs", provider)
    rows, vocab = LOGPROBS_SHAPE
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(rows, vocab, device=DEVICE, dtype=LOGPROBS_DTYPE, generator=generator)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE, generator=generator)
    upstream = torch.randn(rows, device=DEVICE, generator=generator)
    leaf = logits.requires_grad_()
    benchmark.group = f"logprobs {mode} {rows}x{vocab} {str(LOGPROBS_DTYPE)[6:]}"

    def forward():
        with torch.no_grad():
            fn(logits, labels)
        _sync()

    def full():
        torch.autograd.grad(fn(leaf, labels), leaf, upstream)
        _sync()

    if mode == "fwd":
        timed, bytes_moved = forward, logits.numel() * logits.element_size()
        benchmark(forward)
    elif mode == "full":
        timed, bytes_moved = full, 3 * logits.numel() * logits.element_size()  # read, read, write
        benchmark(full)
    else:

        def setup():
            return (fn(leaf, labels),), {}

        def backward(logp):
            torch.autograd.grad(logp, leaf, upstream)
            _sync()

        benchmark.pedantic(backward, setup=setup, rounds=5, warmup_rounds=1)
        logp = fn(leaf, labels)  # outside the memory measurement, like the setup above
        timed, bytes_moved = functools.partial(backward, logp), 2 * logits.numel() * logits.element_size()
    record(provider, timed, bytes_moved)


def _rollout():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.bool, device=DEVICE)
    mask[::2, LENGTH * 3 // 4 :] = False  # right padding on half the rows
    return generator, mask


@pytest.mark.parametrize("provider", ["reference", "native", "triton"])
def test_shape_rewards(benchmark, record, provider):
    fn = _implementation("shape_rewards", provider)
    generator, mask = _rollout()
    logp_old, logp_ref = (-torch.rand(BATCH, LENGTH, device=DEVICE, generator=generator) for _ in range(2))
    reward, cost = (torch.randn(BATCH, device=DEVICE, generator=generator) for _ in range(2))
    benchmark.group = f"shape_rewards {BATCH}x{LENGTH}"

    def call():
        fn(logp_old, logp_ref, mask, reward, cost, 0.05, 10.0)
        _sync()

    benchmark(call)
    # Reads two log-prob streams and the mask, writes two streams (float32, bool).
    record(provider, call, BATCH * LENGTH * (4 + 4 + 1 + 8))


@pytest.mark.parametrize("provider", ["reference", "native", "triton", "triton-loop"])
def test_dual_gae(benchmark, record, provider):
    fn = _implementation("dual_gae", provider)
    generator, mask = _rollout()
    rewards, costs, values_r, values_c = (
        torch.randn(BATCH, LENGTH, device=DEVICE, generator=generator) for _ in range(4)
    )
    lagrange_lambda = torch.tensor(1.0, device=DEVICE)
    benchmark.group = f"dual_gae {BATCH}x{LENGTH}"

    def call():
        fn(rewards, costs, values_r, values_c, mask, 1.0, 0.95, lagrange_lambda)
        _sync()

    benchmark(call)
    # Reads four float32 streams and the mask, writes five float32 streams.
    record(provider, call, BATCH * LENGTH * (16 + 1 + 20))


def _bench_layer(benchmark, record, provider: str, mode: str, fn, inputs, stream_bytes: int, streams: tuple):
    """fwd / bwd / full of an elementwise layer; ``streams`` = (fwd, bwd) (N, H)-sized reads plus writes."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    upstream = torch.randn(inputs[0].shape, device=DEVICE, dtype=inputs[0].dtype, generator=generator)

    def forward():
        with torch.no_grad():
            fn(*inputs)
        _sync()

    def full():
        torch.autograd.grad(fn(*leaves), leaves, upstream)
        _sync()

    def backward(out):
        torch.autograd.grad(out, leaves, upstream, retain_graph=True)
        _sync()

    if mode == "fwd":
        timed, bytes_moved = forward, streams[0] * stream_bytes
        benchmark(forward)
    elif mode == "full":
        timed, bytes_moved = full, (streams[0] + streams[1]) * stream_bytes
        benchmark(full)
    else:
        out = fn(*leaves)  # one graph, its backward timed again and again
        timed, bytes_moved = functools.partial(backward, out), streams[1] * stream_bytes
        benchmark(timed)
    record(provider, timed, bytes_moved)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["reference", "native", "triton"])
@pytest.mark.parametrize("shape", RMS_NORM_SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_rms_norm(benchmark, record, provider, mode, shape):
    fn = _implementation("rms_norm", provider)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=LAYER_DTYPE, generator=generator)  # (N, H)
    weight = torch.rand(shape[-1], device=DEVICE, generator=generator).to(LAYER_DTYPE) + 0.5  # (H,)
    benchmark.group = f"rms_norm {mode} {shape[0]}x{shape[1]} {str(LAYER_DTYPE)[6:]}"
    norm = functools.partial(fn, eps=1e-6)
    # fwd reads x and writes y; bwd reads dy and x and writes dx (the weight and its gradient are one row).
    _bench_layer(benchmark, record, provider, mode, norm, [x, weight], x.numel() * x.element_size(), (2, 3))


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["reference", "native", "triton"])
def test_swiglu(benchmark, record, provider, mode):
    fn = _implementation("swiglu", provider)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    gate, up = (torch.randn(SWIGLU_SHAPE, device=DEVICE, dtype=LAYER_DTYPE, generator=generator) for _ in range(2))
    benchmark.group = f"swiglu {mode} {SWIGLU_SHAPE[0]}x{SWIGLU_SHAPE[1]} {str(LAYER_DTYPE)[6:]}"
    # fwd reads gate and up and writes the product; bwd reads dc, gate and up and writes both gradients.
    _bench_layer(benchmark, record, provider, mode, fn, [gate, up], gate.numel() * gate.element_size(), (3, 5))
