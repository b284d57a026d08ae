"""Compiled decoder layers (saferlhf.models.compiled): the same numbers as eager, one compilation for
every layer, generation left eager, and the trainer's ``model.compile_layers`` switch.

On this CPU-only machine torch.compile generates C++ (inductor's CPU backend); on a GPU the same
code path generates Triton kernels (benchmarks/RESULTS.md has the H100 figures).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from saferlhf.models.compiled import compile_layers, decoder_layers, resolve_compile_layers, uncompile_layers
from saferlhf.models.fused import use_fused_layers
from saferlhf.models.score_model import ScoreModel

CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    use_fused_layers(model)  # as the trainer does: inside a compiled layer they compute the plain math
    return model


def _batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CONFIG["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    mask[-1, -2:] = 0  # right padding in another
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_layers_match_eager_values_and_gradients_with_one_compilation_for_all_layers():
    eager, compiled, other = _llama(), _llama(), _llama(seed=1)
    assert compile_layers(compiled) == compile_layers(other) == CONFIG["num_hidden_layers"]
    ids, mask = _batch(4, 24)
    want_logits, want_grads = _loss_and_grads(eager, ids, mask)
    got_logits, got_grads = _loss_and_grads(compiled, ids, mask)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    _loss_and_grads(other, ids, mask)  # another model, same layer class: no new compilation
    assert counters["stats"]["unique_graphs"] == 1
    # A new sequence length compiles once more (dynamic shapes); later lengths reuse it.
    for length in (31, 17):
        ids, mask = _batch(2, length, seed=length)
        got, _ = _loss_and_grads(compiled, ids, mask)
        torch.testing.assert_close(got, _loss_and_grads(eager, ids, mask)[0], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    with torch.no_grad():  # evaluation passes: one more graph, the same values
        eager.eval(), compiled.eval()
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   eager(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)


def test_score_model_layers_compile_and_score_as_eager():
    torch.manual_seed(0)
    eager = ScoreModel.from_config(LlamaConfig(**CONFIG), kind="cost")
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == CONFIG["num_hidden_layers"]
    ids, mask = _batch(3, 20)
    want, got = eager(ids, mask), compiled(ids, mask)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.end_scores, want.end_scores, rtol=1e-4, atol=1e-5)


def test_generation_with_a_kv_cache_runs_eagerly_and_gives_the_same_tokens():
    eager, compiled = _llama(), _llama()
    compile_layers(compiled)
    ids, mask = _batch(2, 8)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = eager.generate(input_ids=ids, **kwargs)
        got = compiled.generate(input_ids=ids, **kwargs)
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 0  # every call carried a cache: nothing was compiled


def test_uncompile_restores_the_eager_forward_and_a_model_without_layers_is_refused():
    model = _llama()
    compile_layers(model)
    compile_layers(model)  # idempotent
    assert all("forward" in vars(layer) for layer in decoder_layers(model))
    assert uncompile_layers(model) == CONFIG["num_hidden_layers"]
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))
    assert uncompile_layers(model) == 0
    model(input_ids=_batch(2, 8)[0], use_cache=False)
    assert counters["stats"]["unique_graphs"] == 0
    with pytest.raises(ValueError, match="no module whose class name ends in 'DecoderLayer'"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_compiler_failure_names_the_switch_that_turns_compilation_off(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from saferlhf.models import compiled

    def failing(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("backend exploded")

    monkeypatch.setitem(compiled._COMPILED, LlamaDecoderLayer, failing)
    model = _llama()
    compile_layers(model)
    with pytest.raises(RuntimeError, match="LlamaDecoderLayer failed .*model.compile_layers=false"):
        model(input_ids=_batch(2, 8)[0], use_cache=False)


@pytest.mark.parametrize("setting,device,zero_stage,expected", [
    ("auto", "cuda", 0, True), ("auto", "cuda", 2, True), ("auto", "cuda", 3, False), ("auto", "cpu", 0, False),
    ("true", "cpu", 1, True), ("True", "cuda", 2, True), ("false", "cuda", 0, False),
])  # fmt: skip
def test_resolve_compile_layers(setting, device, zero_stage, expected):
    assert resolve_compile_layers(setting, device, zero_stage) is expected


def test_resolve_compile_layers_rejects_zero_3_and_unknown_settings():
    with pytest.raises(ValueError, match="zero_stage=3"):
        resolve_compile_layers("true", "cuda", 3)
    with pytest.raises(ValueError, match="model.compile_layers must be auto, true or false, got 'yes'"):
        resolve_compile_layers("yes", "cpu", 0)


@pytest.mark.slow
def test_ppo_lag_with_compiled_layers_trains_as_the_eager_run(toy_models, tmp_path, caplog):
    """Two toy-world PPO-Lag steps with ``model.compile_layers=true`` match the eager run step by step."""
    from helpers import stage_config

    from saferlhf.trainers.common import read_metrics
    from saferlhf.trainers.ppo_lag import train_ppo

    def run(name: str, setting: str) -> list[dict]:
        cfg = stage_config("ppo_lag", tmp_path / name, toy_models.sft, f"ppo.reward_model={toy_models.rm}",
                           f"ppo.cost_model={toy_models.cm}", "run.log_every=1", "ppo.rollout_batch_size=16",
                           "ppo.mini_batch_size=8", "rollout.max_new_tokens=16", "run.max_steps=2",
                           f"model.compile_layers={setting}")
        train_ppo(cfg)
        return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/reward" in r]

    eager = run("eager", "false")
    with caplog.at_level(logging.INFO, logger="saferlhf"):
        compiled = run("compiled", "true")
    assert "decoder layers compiled (model.compile_layers=true)" in caplog.text
    assert counters["stats"]["unique_graphs"] >= 1
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2]
    for a, b in zip(eager, compiled):
        for key, value in a.items():
            if "clip_fraction" in key:  # a count: a token or two at the clip boundary may fall either way
                assert b[key] == pytest.approx(value, abs=0.05), (a["step"], key)
            elif key.startswith("train/"):
                assert b[key] == pytest.approx(value, rel=2e-3, abs=1e-4), (a["step"], key)
