"""Packed (padding-free) passes against padded ones: the same log-probs, values, end scores, SFT loss and
gradients on sequences of mixed lengths with left- and right-padding, for the model shapes users bring
(grouped-query attention, a tied head, llama3 rope scaling)."""

from __future__ import annotations

import logging

import pytest
import torch

from saferlhf.models import packing
from saferlhf.models.passes import Rows, end_scores, response_logprobs, response_values, sft_pass
from saferlhf.models.score_model import ScoreModel
from saferlhf.models.tiny import tiny_config, train_tokenizer

ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["how do i bake bread ? mix flour water yeast and bake", "tell me how to make a bomb . no"] * 50
    return train_tokenizer(texts, vocab_size=256)


def _config(tokenizer, variant: str):
    config = tiny_config(tokenizer)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA in every variant
    if variant == "tied":
        config.tie_word_embeddings = True
    if variant == "rope-scaled":
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16}
    return config


def _rollout(vocab: int, seed: int = 0):
    """Six sequences: left-padded prompts of 3-9 tokens beside right-padded responses of 0-11 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [3, 9, 5, 7, 4, 9], [11, 2, 0, 7, 11, 5]
    p, t = max(prompts), max(responses)
    ids = torch.randint(4, vocab, (len(prompts), p + t), generator=g)
    attn = torch.zeros_like(ids)
    for i, (a, b) in enumerate(zip(prompts, responses)):
        attn[i, p - a : p + b] = 1
    return ids, attn, p


def _models(tokenizer, variant):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(_config(tokenizer, variant)).eval()
    score = ScoreModel.from_config(_config(tokenizer, variant)).eval()
    return lm, score


@pytest.mark.parametrize("variant", ["untied", "tied", "rope-scaled"])
def test_packed_passes_equal_padded_passes(tokenizer, variant):
    lm, score = _models(tokenizer, variant)
    ids, attn, p = _rollout(len(tokenizer))
    real = attn[:, p:].bool()
    with torch.no_grad():
        logp_pad, _ = response_logprobs(lm, ids, attn, p, 0.7)
        values_pad = response_values(score, ids, attn, p)
        ends_pad = end_scores(score, ids, attn)
    assert packing.enable(lm) and packing.enable(score)
    with torch.no_grad():
        logp_pack, logits = response_logprobs(lm, ids, attn, p, 0.7, packed=True)
        values_pack = response_values(score, ids, attn, p, packed=True)
        ends_pack = end_scores(score, ids, attn, packed=True)
        again, _ = response_logprobs(lm, ids, attn, p, 0.7)  # padded passes still work after enable()
    assert logits.shape == (int(real.sum()), len(tokenizer))  # the head ran over real response tokens only
    torch.testing.assert_close(logp_pack[real], logp_pad[real], rtol=0, atol=ATOL)
    assert (logp_pack[~real] == 0).all() and (values_pack[~real] == 0).all()
    torch.testing.assert_close(values_pack[real], values_pad[real], rtol=0, atol=ATOL)
    torch.testing.assert_close(ends_pack, ends_pad, rtol=0, atol=ATOL)
    torch.testing.assert_close(again, logp_pad, rtol=0, atol=ATOL)


def test_packed_gradients_equal_padded_gradients(tokenizer):
    lm, score = _models(tokenizer, "tied")
    ids, attn, p = _rollout(len(tokenizer), seed=1)
    real = attn[:, p:].float()
    weights = torch.randn(real.shape, generator=torch.Generator().manual_seed(2))  # a non-unit upstream gradient

    def grads(packed):
        lm.zero_grad()
        score.zero_grad()
        logp, _ = response_logprobs(lm, ids, attn, p, 1.0, packed=packed)
        values = response_values(score, ids, attn, p, packed=packed)
        ((logp * weights * real).sum() + (values * weights * real).sum()).backward()
        return {n: q.grad.clone() for n, q in [*lm.named_parameters(), *score.named_parameters()] if q.grad is not None}

    padded = grads(False)
    packing.enable(lm)
    packing.enable(score)
    packed = grads(True)
    assert padded.keys() == packed.keys() and len(padded) > 10
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=ATOL, msg=name)


def test_packed_sft_loss_equals_padded(tokenizer):
    lm, _ = _models(tokenizer, "untied")
    g = torch.Generator().manual_seed(3)
    lengths, prompt = [12, 5, 9], [4, 2, 6]
    ids = torch.randint(4, len(tokenizer), (3, 12), generator=g)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, q) in enumerate(zip(lengths, prompt)):
        attn[i, :n] = 1
        labels[i, q:n] = ids[i, q:n]
    sum_pad, count_pad = sft_pass(lm, ids, attn, labels)
    sum_pad.backward()
    grad_pad = lm.model.layers[0].mlp.up_proj.weight.grad.clone()
    lm.zero_grad()
    packing.enable(lm)
    sum_pack, count_pack = sft_pass(lm, ids, attn, labels, packed=True)
    sum_pack.backward()
    assert float(count_pack) == float(count_pad) == sum(n - q for n, q in zip(lengths, prompt))
    torch.testing.assert_close(sum_pack, sum_pad, rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(lm.model.layers[0].mlp.up_proj.weight.grad, grad_pad, rtol=1e-4, atol=ATOL)


def test_rows_trim_a_micro_batch_to_its_own_padding(tokenizer):
    ids, attn, p = _rollout(len(tokenizer))
    rows = Rows.take(ids, attn, p, torch.tensor([0, 3]))  # prompts 3 and 7, responses 11 and 7
    assert rows.prompt_len == 7 and rows.width == 11 and rows.sequences.shape == (2, 18)
    assert torch.equal(rows.attention_mask.sum(-1), torch.tensor([14, 14]))
    short = Rows.take(ids, attn, p, torch.tensor([2]))  # an empty response keeps one column
    assert short.width == 1 and short.prompt_len == 5 and short.attention_mask[:, short.prompt_len:].sum() == 0
    values = torch.arange(6 * 11).reshape(6, 11)
    assert torch.equal(rows.response(values), values[[0, 3], :11])


def test_pack_and_unpack_round_trip():
    ids = torch.arange(1, 13).reshape(3, 4)
    attn = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    pk = packing.pack(ids, attn)
    assert pk.input_ids.tolist() == [[2, 3, 5, 6, 7, 8, 11]]
    assert pk.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 0]]
    assert pk.cu_seqlens.tolist() == [0, 2, 6, 7] and pk.max_len == 4 and pk.ends.tolist() == [1, 5, 6]
    assert torch.equal(pk.unpack(pk.input_ids[0], fill=0), ids * attn)
    labels = torch.where(attn.bool(), ids, -100)
    assert packing.pack_labels(labels, pk).tolist() == [[-100, 3, -100, 6, 7, 8, -100]]
    with pytest.raises(ValueError, match="empty row"):
        packing.pack(ids, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))


def test_a_model_that_cannot_pack_says_so_once_and_stays_padded(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    packing._warned.clear()
    with caplog.at_level(logging.WARNING, logger="saferlhf.models.packing"):
        assert packing.enable(model) is False
        assert packing.enable(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))) is False
    assert "model type 'gpt2'" in caplog.text and "run padded" in caplog.text
    assert caplog.text.count("cannot run packed passes") == 1
    assert not packing.is_enabled(model)
    ok, why = packing.packing_support(type("Cfg", (), {"config": _mistral_window()})())
    assert not ok and "sliding-window" in why


def _mistral_window():
    from transformers import MistralConfig

    return MistralConfig(sliding_window=64, max_position_embeddings=4096)


def test_the_cpu_kernel_is_sdpa_per_sequence():
    assert packing.varlen_kernel(torch.device("cpu")) == "sdpa-per-sequence"
