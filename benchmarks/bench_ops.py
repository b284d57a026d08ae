"""Micro-benchmarks of the fused ops: providers reference / native / triton, modes fwd / bwd / full.

    pytest benchmarks/ --benchmark-only

Providers run where they are the fast path: native on CPU, triton on CUDA (the CPU interpreter's
timings mean nothing), the reference on either. Each benchmark records its peak extra memory and,
on CUDA, its achieved bandwidth as a fraction of the device-to-device copy bandwidth
(``extra_info``, in the saved JSON). Shapes are the issue's targets: ``logprobs`` at N = 2048,
V = 32000 float32 on CPU (N = 16384, V = 128256 bfloat16 on CUDA); ``shape_rewards`` and
``dual_gae`` at B = 64, T = 1024.
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


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()  # host-device sync: the timed call includes the GPU work


def _implementation(op: str, provider: str):
    """The function ``op`` of ``provider``, or a skip where that provider is not the fast path."""
    if provider == "reference":
        return {"logprobs": algorithms.gather_logprobs, "shape_rewards": algorithms.shape_rewards}.get(
            op, algorithms.dual_gae
        )
    if provider == "native":
        if ON_CUDA:
            pytest.skip("the native ops serve CPU tensors")
        if csrc.load() is None:
            pytest.skip("the native ops did not build")
        return getattr(csrc, op)
    if not ON_CUDA:
        pytest.skip("triton is timed on CUDA only (the CPU interpreter is for correctness)")
    from saferlhf.kernels import dual_gae, logprobs, shape_rewards

    if provider == "triton-loop":
        return functools.partial(dual_gae.dual_gae, method="loop")
    return {"logprobs": logprobs.logprobs, "shape_rewards": shape_rewards.shape_rewards}.get(op, dual_gae.dual_gae)


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
