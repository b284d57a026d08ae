"""Fused RMSNorm and SwiGLU (native and Triton) against ``algorithms.rms_norm`` / ``swiglu``, three ways,
and models patched by ``saferlhf.models.fused`` against the unpatched transformers modules."""

from __future__ import annotations

import copy

import pytest
import torch

from saferlhf import ops
from saferlhf.algorithms import rms_norm, swiglu

pytest_plugins = ["kernel_fixtures"]  # the fixtures native, triton_impl, impl, three_way

DTYPES = [torch.float32, torch.bfloat16]


def _randn(shape, dtype, device, seed, scale=1.0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def _grads(fn, inputs, upstream):
    """fn(*inputs) and the gradient of Σ upstream·fn w.r.t. every input, for fresh leaf copies."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, upstream))


def _check(impl_fn, ref_fn, inputs, three_way, seed=7):
    upstream = _randn(ref_fn(*inputs).shape, inputs[0].dtype, inputs[0].device, seed)
    fast = _grads(impl_fn, inputs, upstream)
    ref = _grads(ref_fn, inputs, upstream)
    ref64 = _grads(ref_fn, [x.double() for x in inputs], upstream.double())
    for got, want, want64 in zip(fast, ref, ref64, strict=True):
        assert got.dtype == want.dtype
        three_way(got, want, want64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 17, 1000), (5, 64), (2, 3, 17)])
def test_rms_norm_three_way(impl, dtype, shape, three_way):
    # An offset makes the rows' mean square far from 1, so the normalisation matters.
    x = _randn(shape, dtype, impl.device, 0, scale=2.0, offset=0.5)
    weight = _randn(shape[-1:], dtype, impl.device, 1, scale=0.3, offset=1.0)
    _check(lambda a, w: impl.rms_norm(a, w, 1e-5), lambda a, w: rms_norm(a, w, 1e-5), [x, weight], three_way)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 17, 1000), (4099,)])
def test_swiglu_three_way(impl, dtype, shape, three_way):
    # gate spans silu's curved region and both tails; 4099 elements leave a ragged last block.
    gate = _randn(shape, dtype, impl.device, 2, scale=3.0)
    up = _randn(shape, dtype, impl.device, 3)
    _check(impl.swiglu, swiglu, [gate, up], three_way)


def test_rms_norm_non_contiguous_and_empty(impl, three_way):
    x = _randn((6, 40), torch.float32, impl.device, 4)[:, ::2]  # (6, 20), stride 2 in H
    weight = _randn((20,), torch.float32, impl.device, 5, offset=1.0)
    _check(lambda a, w: impl.rms_norm(a, w, 1e-6), lambda a, w: rms_norm(a, w, 1e-6), [x, weight], three_way)
    empty = torch.zeros(0, 20, device=impl.device, requires_grad=True)
    out = impl.rms_norm(empty, weight, 1e-6)
    assert out.shape == (0, 20)
    out.sum().backward()
    assert empty.grad.shape == (0, 20)


def test_nan_row_stays_in_its_row(impl):
    x = _randn((3, 64), torch.float32, impl.device, 6)
    x[1, 5] = float("nan")
    out = impl.rms_norm(x, torch.ones(64, device=impl.device), 1e-6)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    gate = _randn((3, 64), torch.float32, impl.device, 7)
    gate[2, 3] = float("nan")
    out = impl.swiglu(gate, torch.ones_like(gate))
    assert torch.isnan(out[2, 3]) and torch.isfinite(out).sum() == out.numel() - 1


def test_bad_inputs_are_named(triton_impl):
    x = torch.randn(2, 8, device=triton_impl.device)
    with pytest.raises(ValueError, match="weight must be"):
        triton_impl.rms_norm(x, torch.ones(7, device=x.device), 1e-6)
    with pytest.raises(ValueError, match="up"):
        triton_impl.swiglu(x, torch.ones(2, 9, device=x.device))
    with pytest.raises(TypeError, match="gate must be"):
        triton_impl.swiglu(x.long(), x.long())


def test_dispatcher_takes_the_reference_for_mixed_dtypes(monkeypatch):
    # A float32 weight on bfloat16 activations is transformers' own promotion rule: float32 out.
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    weight = torch.rand(16) + 0.5
    out = ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm(x, weight, 1e-6), rtol=0, atol=0)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = (logits.float().pow(2).mean())
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_patched_model_matches_the_original(backend, monkeypatch, request):
    from saferlhf.models.fused import use_fused_layers

    if backend == "native":
        request.getfixturevalue("native")
    if backend == "triton":
        request.getfixturevalue("triton_impl")
    original = _tiny_llama()
    patched = copy.deepcopy(original)
    counts = use_fused_layers(patched)
    # 2 blocks × 2 norms + the final norm; one MLP per block.
    assert counts == {"rms_norm": 5, "swiglu": 2, "other_norms": 0}
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _loss_and_grads(original, ids)
    monkeypatch.setenv("SAFERLHF_OPS", backend)
    got_logits, got_grads = _loss_and_grads(patched, ids)
    if backend == "reference":  # the same ops in the same order: bit for bit
        assert torch.equal(got_logits, want_logits)
        assert all(torch.equal(got_grads[name], grad) for name, grad in want_grads.items())
    else:
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_other_architectures_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    from saferlhf.models.fused import use_fused_layers

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    forwards = {name: m.forward for name, m in model.named_modules()}
    counts = use_fused_layers(model)
    assert counts == {"rms_norm": 0, "swiglu": 0, "other_norms": 3}  # ln_1, ln_2, ln_f
    assert all(m.forward == forwards[name] for name, m in model.named_modules())
