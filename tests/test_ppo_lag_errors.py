"""Bad numbers and bad input in the PPO-Lagrangian trainer: clear errors, no silent updates, no crashes."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import stage_config
from transformers import LlamaConfig

from saferlhf.data import toyworld
from saferlhf.models.hf import load_tokenizer
from saferlhf.models.score_model import ScoreModel
from saferlhf.models.scorer import Scorer
from saferlhf.models.tiny import train_tokenizer
from saferlhf.rollout.hf import HFGenerator
from saferlhf.rollout.vllm_engine import VLLMGenerator
from saferlhf.trainers import ppo_lag
from saferlhf.trainers.common import read_metrics
from saferlhf.trainers.ppo_lag import train_ppo


def _cfg(toy_models, out_dir, *extra):
    return stage_config("ppo_lag", out_dir, toy_models.sft, f"ppo.reward_model={toy_models.rm}",
                        f"ppo.cost_model={toy_models.cm}", "run.log_every=1", "ppo.rollout_batch_size=8",
                        "ppo.mini_batch_size=4", "rollout.max_new_tokens=8", "run.max_steps=1", *extra)


def _no_checkpoint_or_model(out_dir):
    assert not (out_dir / "model").exists()
    assert not [r for r in read_metrics(out_dir / "metrics.jsonl") if "train/reward" in r]


def test_a_nan_score_stops_the_step_with_an_error_naming_it(toy_models, tmp_path, monkeypatch):
    original = Scorer.__call__
    calls = []

    def nan_reward(self, sequences, attention_mask):
        scores = original(self, sequences, attention_mask)
        calls.append(1)
        return torch.full_like(scores, math.nan) if len(calls) == 1 else scores  # the first scorer: reward

    monkeypatch.setattr(Scorer, "__call__", nan_reward)
    with pytest.raises(FloatingPointError, match=r"non-finite reward score at step 1"):
        train_ppo(_cfg(toy_models, tmp_path / "run"))
    _no_checkpoint_or_model(tmp_path / "run")


def test_a_nan_loss_stops_the_step_before_any_optimizer_step(toy_models, tmp_path, monkeypatch):
    original = ppo_lag.policy_loss

    def nan_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        return out._replace(loss=out.loss * math.nan)

    stepped = []
    monkeypatch.setattr(ppo_lag, "policy_loss", nan_loss)
    trainer = ppo_lag.PPOLagTrainer(_cfg(toy_models, tmp_path / "run"))
    before = {k: v.clone() for k, v in trainer.actor.module.state_dict().items()}
    monkeypatch.setattr(trainer.actor, "step", lambda *a, **k: stepped.append(1))
    with pytest.raises(FloatingPointError, match=r"non-finite actor loss at step 1"):
        trainer.train()
    assert not stepped
    after = trainer.actor.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _edit_generations(monkeypatch, edit) -> None:
    """Let ``edit(generation, pad_id)`` change what either backend returns before the trainer sees it."""
    for cls in (HFGenerator, VLLMGenerator):
        original = cls.generate

        def generate(self, prompt_ids, prompt_mask, sampling, _original=original):
            gen = _original(self, prompt_ids, prompt_mask, sampling)
            edit(gen, self.tokenizer.pad_token_id)
            return gen

        monkeypatch.setattr(cls, "generate", generate)


def test_empty_generations_are_scored_and_trained_on_without_index_errors(toy_models, tmp_path, monkeypatch):
    def some_empty(gen, pad):
        gen.response_mask[::2] = 0  # every other response: no token at all
        gen.response_ids[::2] = pad

    _edit_generations(monkeypatch, some_empty)
    final = train_ppo(_cfg(toy_models, tmp_path / "run", "run.max_steps=2"))
    assert final["train/empty_rate"] == pytest.approx(0.5)
    for key in ("train/reward", "train/cost", "train/kl", "train/actor_loss", "train/reward_critic_loss",
                "train/cost_critic_loss", "train/lambda"):
        assert math.isfinite(final[key]), key


def test_all_empty_generations_still_complete_the_step(toy_models, tmp_path, monkeypatch):
    def all_empty(gen, pad):
        gen.response_mask.zero_()
        gen.response_ids.fill_(pad)

    _edit_generations(monkeypatch, all_empty)
    final = train_ppo(_cfg(toy_models, tmp_path / "run"))
    assert final["train/empty_rate"] == 1.0
    assert final["train/response_length"] == 0.0
    assert all(math.isfinite(v) for k, v in final.items() if k.startswith("train/"))


def _other_tokenizer():
    return train_tokenizer(["zebra quokka " * 3, "lorem ipsum dolor sit amet"] * 20, vocab_size=300)


def test_a_critic_with_another_vocabulary_is_an_error_at_start_up(toy_models, tmp_path):
    critic = tmp_path / "critic"
    shutil.copytree(toy_models.rm, critic)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (critic / name).unlink(missing_ok=True)
    _other_tokenizer().save_pretrained(critic)
    with pytest.raises(ValueError, match=r"tokenizer mismatch: actor .* and reward critic"):
        ppo_lag.PPOLagTrainer(_cfg(toy_models, tmp_path / "run", f"ppo.reward_critic={critic}"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_scorer_with_another_tokenizer_re_tokenizes_the_text():
    actor_tok = train_tokenizer(toyworld.corpus(0), vocab_size=512)
    scorer_tok = _other_tokenizer()
    config = LlamaConfig(vocab_size=len(scorer_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=scorer_tok.pad_token_id)
    torch.manual_seed(0)
    model = ScoreModel.from_config(config).eval()
    scorer = Scorer(model, scorer_tok, max_length=64, actor_tokenizer=actor_tok)
    assert not scorer.same_tokenizer
    texts = ["how do i bake bread", "lorem ipsum"]
    actor_tok.padding_side = "left"
    enc = actor_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    scores = scorer(enc.input_ids, enc.attention_mask)
    for text, score in zip(texts, scores):
        own = scorer_tok([text + scorer_tok.eos_token], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = model(own.input_ids, own.attention_mask).end_scores
        assert score.item() == pytest.approx(expected.item(), abs=1e-5)


def test_load_tokenizer_reads_what_train_tokenizer_saved(tmp_path):
    tok = _other_tokenizer()
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).get_vocab() == tok.get_vocab()
