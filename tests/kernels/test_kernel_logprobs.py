"""Fused log-softmax + gather (native and Triton) against ``algorithms.gather_logprobs``, three ways."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from saferlhf.algorithms import gather_logprobs

pytest_plugins = ["kernel_fixtures"]  # the fixtures native, triton_impl, impl, three_way

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # A spread of 4 puts the softmax far from uniform, as trained models' logits are.
    logits = torch.randn(*shape, generator=generator, dtype=torch.float64) * 4
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    return logits.to(dtype).to(device), labels.to(device)


def _value_and_grad(fn, logits, labels, temperature, upstream):
    """fn's log-probs and d(Σ upstream·logp)/d(logits), for a fresh leaf copy of ``logits``."""
    leaf = logits.detach().clone().requires_grad_()
    logp = fn(leaf, labels, temperature)
    (grad,) = torch.autograd.grad(logp, leaf, upstream)
    return logp.detach(), grad


def _check_against_reference(impl, logits, labels, temperature, three_way):
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)).to(logits.device) * 3
    logp, grad = _value_and_grad(impl.logprobs, logits, labels, temperature, upstream)
    logp_ref, grad_ref = _value_and_grad(gather_logprobs, logits, labels, temperature, upstream)
    logp_64, grad_64 = _value_and_grad(gather_logprobs, logits.double(), labels, temperature, upstream)
    assert logp.dtype == torch.float32 and grad.dtype == logits.dtype
    three_way(logp, logp_ref, logp_64)
    three_way(grad, grad_ref, grad_64)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shape_three_way(impl, dtype, temperature, three_way):
    logits, labels = _logits((3, 17, 1000), dtype, impl.device)
    _check_against_reference(impl, logits, labels, temperature, three_way)


def test_several_vocabulary_blocks(impl, three_way):
    # V = 5000 spans two Triton blocks and three native chunks; the largest logit of each row sits in
    # the last block, so the running maximum moves and the partial sums must be rescaled.
    logits, labels = _logits((2, 3, 5000), torch.float32, impl.device)
    logits[..., 4500] = 30.0
    labels[0, 0] = 4500
    _check_against_reference(impl, logits, labels, 1.3, three_way)


def test_leading_minus_infinity(impl, three_way):
    # A vocabulary whose first block is masked out (-inf): the running maximum stays -inf for a
    # whole block, where a naive rescale computes -inf - (-inf) = nan.
    logits, labels = _logits((2, 6000), torch.float32, impl.device)
    logits[:, :4500] = float("-inf")
    labels[:] = 5000
    logp = impl.logprobs(logits, labels)
    assert torch.isfinite(logp).all()
    three_way(logp, gather_logprobs(logits, labels), gather_logprobs(logits.double(), labels))


def test_nan_logit_poisons_its_row_only(impl):
    # A diverged model must not be hidden: nan in, nan out — for that row and no other.
    logits, labels = _logits((3, 3000), torch.float32, impl.device)
    logits[1, 2500] = float("nan")
    logits.requires_grad_()
    logp = impl.logprobs(logits, labels)
    logp.sum().backward()
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()
    assert torch.isnan(logits.grad[1]).all() and torch.isfinite(logits.grad[[0, 2]]).all()


def test_large_vocabulary(impl, three_way):
    # Llama-3's vocabulary (128256) on a few rows.
    logits, labels = _logits((2, 128256), torch.bfloat16, impl.device)
    _check_against_reference(impl, logits, labels, 1.0, three_way)


def test_causal_shift_view_is_read_in_place(impl):
    # The trainer passes logits[:, P-1:-1] of (B, L, V) logits and input_ids[:, P:]: strided views.
    full, ids = _logits((2, 9, 300), torch.float32, impl.device)
    logits, labels = full[:, 2:-1], ids[:, 3:]
    assert not logits.is_contiguous() and not labels.is_contiguous()
    upstream = torch.randn(labels.shape).to(impl.device)
    logp, grad = _value_and_grad(impl.logprobs, logits, labels, 0.9, upstream)
    logp_c, grad_c = _value_and_grad(impl.logprobs, logits.contiguous(), labels.contiguous(), 0.9, upstream)
    torch.testing.assert_close(logp, logp_c, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
    torch.testing.assert_close(logp, gather_logprobs(logits, labels, 0.9))


def test_inplace_backward_writes_into_the_logits(impl):
    logits, labels = _logits((4, 700), torch.bfloat16, impl.device)
    upstream = torch.randn(4).to(impl.device)
    _, expected = _value_and_grad(impl.logprobs, logits, labels, 1.0, upstream)
    leaf = logits.clone().requires_grad_()
    hidden = leaf * 1  # the logits buffer, as a model's output would be
    logp = impl.logprobs(hidden, labels, 1.0, inplace_backward=True)
    captured = []
    hidden.register_hook(captured.append)
    logp.backward(upstream)
    (grad_hidden,) = captured
    assert grad_hidden.data_ptr() == hidden.data_ptr()  # no new buffer
    torch.testing.assert_close(grad_hidden, expected, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_one_dimensional_logits(impl):
    logits, labels = _logits((50,), torch.float32, impl.device)
    torch.testing.assert_close(impl.logprobs(logits, labels), gather_logprobs(logits, labels))


def test_no_rows(impl):
    logits = torch.randn(2, 0, 50, device=impl.device, requires_grad=True)
    logp = impl.logprobs(logits, torch.zeros(2, 0, dtype=torch.long, device=impl.device))
    logp.sum().backward()
    assert logp.shape == (2, 0) and logits.grad.shape == (2, 0, 50)


def test_native_forward_has_no_vocabulary_sized_temporary(native):
    rows, vocab = 64, 32000
    logits, labels = _logits((rows, vocab), torch.float32, native.device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        native.logprobs(logits, labels)
    allocations = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert allocations, "the profiler recorded no allocation at all (the outputs are allocations)"
    assert max(allocations) < rows * vocab  # far below even a bf16 (N, V) tensor


def test_native_rejects_labels_outside_the_vocabulary(native):
    logits, labels = _logits((3, 100), torch.float32, native.device)
    labels[1] = -100
    with pytest.raises(ValueError, match="label -100 out of range"):
        native.logprobs(logits, labels)
    labels[1] = 100
    with pytest.raises(ValueError, match="label 100 out of range"):
        native.logprobs(logits, labels)


def test_bad_arguments(triton_impl):
    logits, labels = _logits((3, 100), torch.float32, triton_impl.device)
    with pytest.raises(ValueError, match="temperature"):
        triton_impl.logprobs(logits, labels, 0.0)
    with pytest.raises(ValueError, match="without V"):
        triton_impl.logprobs(logits, labels[:2])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_impl.logprobs(logits.double(), labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_training_shape(triton_impl, dtype, three_way):
    logits, labels = _logits((8, 512, 32000), dtype, "cuda")
    _check_against_reference(triton_impl, logits, labels, 0.8, three_way)
