"""The shared forward passes of the PPO trainer."""

from __future__ import annotations

import pytest
import torch

from saferlhf.models import passes


@pytest.mark.parametrize("chunk", [1, 5, 7, 1024])
def test_mean_entropy_in_chunks_equals_the_masked_mean_of_the_whole(monkeypatch, chunk):
    monkeypatch.setattr(passes, "ENTROPY_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 9, 11, generator=g)  # (N, L, V) model output
    logits = full[:, 2:-1]  # (N, T=6, V): a non-contiguous slice, as the trainer passes it
    assert not logits.is_contiguous()
    mask = (torch.rand(6, 6, generator=g) > 0.3).long()
    mask[3] = 0  # an empty response
    temperature = 0.7
    p = torch.softmax(logits.double() / temperature, -1)
    expected = (-(p * p.log()).sum(-1) * mask).sum() / mask.sum()
    got = passes.mean_entropy(logits, mask, temperature)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert passes.mean_entropy(logits, torch.zeros_like(mask), temperature).item() == 0.0


def test_response_logprobs_keeps_only_the_response_logits():
    # The LM head runs on the last T + 1 positions only; the log-probs and logits are those of the
    # full pass (model.response_logits=false, the original's) sliced to the response.
    from transformers import LlamaConfig, LlamaForCausalLM

    from saferlhf.models.passes import response_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    seq = torch.randint(3, 97, (3, 12))
    attn = torch.ones_like(seq)
    attn[0, :2] = 0  # left padding of the first prompt
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        logp, logits = response_logprobs(model, seq, attn, prompt_len=5, temperature=0.8)
        logp_full, logits_full = response_logprobs(model, seq, attn, prompt_len=5, temperature=0.8, full_head=True)
    assert shapes == [(3, 8, 32), (3, 12, 32)]  # T + 1 = 8 positions, then all 12
    assert logits.shape == logits_full.shape == (3, 7, 97)
    torch.testing.assert_close(logits, logits_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp, logp_full, rtol=1e-5, atol=1e-6)
