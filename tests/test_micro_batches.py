"""Token-budget micro-batches and packed passes in the trainers: a step cut into many passes, or run packed,
logs what the uncut padded step logs; memory follows the budget, not the rollout; bad budgets are errors."""

from __future__ import annotations

import math

import pytest
from helpers import comparable, stage_config

from saferlhf.trainers.common import read_metrics

RTOL = 1e-4
CLIP_KEYS = ("clip_fraction",)


def _ppo_cfg(toy_models, out_dir, *extra):
    return stage_config("ppo_lag", out_dir, toy_models.sft, f"ppo.reward_model={toy_models.rm}",
                        f"ppo.cost_model={toy_models.cm}", "rollout.backend=hf", "ppo.rollout_batch_size=16",
                        "ppo.mini_batch_size=8", "rollout.max_new_tokens=16", "run.deterministic=true", *extra)


def _one_step(cfg, gen=None, record=None):
    """Generate (unless ``gen`` is given), score and update once; returns (metrics, generation)."""
    from saferlhf.trainers.ppo_lag import PPOLagTrainer

    t = PPOLagTrainer(cfg)
    try:
        if record is not None:
            original = t._passes

            def counting(*args, **kwargs):
                out = original(*args, **kwargs)
                record.append([len(index) for index, _ in out])  # sequences per pass
                return out

            t._passes = counting
        if gen is None:
            batch = t.prompts.collate([t.prompts[i] for i in t.prompt_indices(1)])
            gen = t.generator.generate(batch.input_ids, batch.attention_mask, t.sampling)
        exp, stats = t.make_experience(gen, 1)
        stats.update(t.update(exp, 1))
        return stats, gen
    finally:
        t.close()


def _assert_same(a: dict, b: dict, label: str) -> None:
    a, b = comparable(a), comparable(b)
    assert a.keys() == b.keys(), label
    for key in a:
        if any(k in key for k in CLIP_KEYS):
            assert abs(a[key] - b[key]) <= 0.02, (label, key, a[key], b[key])
        else:
            assert math.isclose(a[key], b[key], rel_tol=RTOL, abs_tol=1e-6), (label, key, a[key], b[key])


def test_a_ppo_lag_step_cut_into_passes_or_packed_logs_the_uncut_padded_step(toy_models, tmp_path):
    # The uncut padded step: one pass over the rollout, one over each mini-batch, as before the budget.
    base, gen = _one_step(_ppo_cfg(toy_models, tmp_path / "base", "model.packing=false"))
    assert gen.response_mask.sum(-1).unique().numel() > 3  # responses of mixed lengths
    lengths = gen.attention_mask.sum(-1)
    # Room for two sequences, not for two long ones: a mini-batch (8 sequences) needs at least 4 passes.
    budget = 2 * int(lengths.max()) - 6  # the two longest do not fit together, shorter ones do
    cut = [f"ppo.micro_batch_tokens={budget}", "optim.micro_batch_tokens=64"]  # PTX rows are up to ~50 tokens
    for name, extra in [("packed", ["model.packing=true"]),
                        ("cut packed", ["model.packing=true", *cut]),
                        ("cut padded", ["model.packing=false", *cut])]:
        passes: list[list[int]] = []
        stats, _ = _one_step(_ppo_cfg(toy_models, tmp_path / name.replace(" ", "-"), *extra), gen, passes)
        if "cut" in name:
            assert all(len(p) >= 4 for p in passes), (name, passes)  # the rollout and both mini-batches were cut
            if "padded" in name:  # passes of different sizes: a mean of pass means would not be the mean
                assert all(len(set(p)) > 1 for p in passes[1:]), (name, passes)
        else:
            assert passes == [[16], [8], [8]], passes
        assert "train/ptx_loss" in stats
        _assert_same(base, stats, name)


@pytest.mark.parametrize("zero", [2, 3])
def test_under_zero_2_and_3_a_cut_packed_step_logs_the_uncut_padded_step(toy_models, tmp_path, zero):
    """ZeRO-2 reduces and ZeRO-3 gathers at every pass: the accumulation boundary must still be the last one
    (and the frozen models, which have no optimizer, run without ZeRO-1/2)."""
    stage = f"deepspeed.zero_stage={zero}"
    base, gen = _one_step(_ppo_cfg(toy_models, tmp_path / "base", stage, "model.packing=false"))
    budget = 2 * int(gen.attention_mask.sum(-1).max()) - 6
    passes: list[list[int]] = []
    stats, _ = _one_step(_ppo_cfg(toy_models, tmp_path / "cut", stage, "model.packing=true",
                                  f"ppo.micro_batch_tokens={budget}", "optim.micro_batch_tokens=64"), gen, passes)
    assert all(len(p) >= 4 for p in passes), passes
    _assert_same(base, stats, f"zero {zero}")


def _supervised(stage, toy_models, out, *extra):
    from saferlhf.trainers.preference import train_preference
    from saferlhf.trainers.sft import train_sft

    model = toy_models.base if stage == "sft" else toy_models.sft
    cfg = stage_config(stage, out, model, "run.max_steps=3", "run.log_every=1", "optim.micro_batch_size=16",
                       "run.deterministic=true", *extra)
    (train_sft if stage == "sft" else train_preference)(cfg)
    return [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_reward_model_steps_cut_into_passes_log_the_uncut_step(toy_models, tmp_path, stage):
    base = _supervised(stage, toy_models, tmp_path / "base", "model.packing=false")
    budget = 60 if stage == "sft" else 140  # a toy sequence is < 40 tokens: 16 items need several passes
    for name, extra in [("packed", ["model.packing=true"]),
                        ("cut packed", ["model.packing=true", f"optim.micro_batch_tokens={budget}"]),
                        ("cut padded", ["model.packing=false", f"optim.micro_batch_tokens={budget}"])]:
        rows = _supervised(stage, toy_models, tmp_path / name.replace(" ", "-"), *extra)
        assert [r["step"] for r in rows] == [r["step"] for r in base] == [1, 2, 3]
        for a, b in zip(base, rows):
            _assert_same({k: v for k, v in a.items() if k != "train/lr"}, {k: v for k, v in b.items()
                                                                            if k != "train/lr"}, f"{stage} {name}")


def test_gradient_accumulation_is_a_mean_over_the_whole_step_not_of_micro_batch_means(toy_models, tmp_path):
    """Two micro-batches of 8 accumulated give the 16-item step exactly (token means of SFT included)."""
    one = _supervised("sft", toy_models, tmp_path / "one", "model.packing=false")
    two = _supervised("sft", toy_models, tmp_path / "two", "model.packing=false", "optim.micro_batch_size=8",
                      "optim.gradient_accumulation=2")
    for a, b in zip(one, two):
        _assert_same({k: v for k, v in a.items() if k != "train/lr"},
                     {k: v for k, v in b.items() if k != "train/lr"}, "gas")


def test_a_budget_below_the_longest_sequence_is_an_error_naming_key_and_length(toy_models, tmp_path):
    from saferlhf.config import ConfigError
    from saferlhf.trainers.ppo_lag import PPOLagTrainer
    from saferlhf.trainers.sft import train_sft

    with pytest.raises(ValueError, match=r"ppo\.micro_batch_tokens=8 is smaller than the longest sequence .*\d+ tok"):
        PPOLagTrainer(_ppo_cfg(toy_models, tmp_path / "ppo", "ppo.micro_batch_tokens=8"))
    with pytest.raises(ValueError, match=r"optim\.micro_batch_tokens=5 is smaller than the longest training item"):
        train_sft(stage_config("sft", tmp_path / "sft", toy_models.base, "optim.micro_batch_tokens=5"))
    with pytest.raises(ConfigError, match="ppo.micro_batch_tokens"):
        _ppo_cfg(toy_models, tmp_path / "neg", "ppo.micro_batch_tokens=-1")


def _wide_vocabulary_models(toy_models, root):
    """The toy models with an 8192-row vocabulary: the logits, not the process, dominate a pass's memory."""
    from transformers import AutoModelForCausalLM

    from saferlhf.models.hf import load_tokenizer, save_causal_lm
    from saferlhf.models.score_model import ScoreModel

    tokenizer = load_tokenizer(str(toy_models.sft))
    lm = AutoModelForCausalLM.from_pretrained(toy_models.sft)
    lm.resize_token_embeddings(8192)
    actor = save_causal_lm(lm, root / "actor", tokenizer=tokenizer)
    paths = {}
    for kind, source in (("reward", toy_models.rm), ("cost", toy_models.cm)):
        model = ScoreModel.from_pretrained(source)
        model.backbone.resize_token_embeddings(8192)
        paths[kind] = model.save_pretrained(root / kind, tokenizer=tokenizer)
    return actor, paths["reward"], paths["cost"]


PEAKS = """
import gc, json, sys, torch
from saferlhf.config import build_config, resolve_preset
from saferlhf.rollout.base import Generation
from saferlhf.trainers.ppo_lag import PPOLagTrainer

out = {}
for name, rollout, overrides in json.loads(sys.argv[1]):  # in this order: the smallest run first
    t = PPOLagTrainer(build_config("ppo_lag", resolve_preset("tiny-cpu"), overrides))
    batch = t.prompts.collate([t.prompts[i % len(t.prompts)] for i in range(rollout)])
    ids = torch.randint(4, 400, (rollout, 64), generator=torch.Generator().manual_seed(0))
    exp, _ = t.make_experience(Generation(batch.input_ids, batch.attention_mask, ids, torch.ones_like(ids)), 1)
    t.update(exp, 1)
    timings = t.phases.collect()
    t.close()
    del t, exp, batch
    gc.collect()
    out[name] = {p: timings[f"memory/{p}_peak_rss_gb"] for p in ("score", "actor", "critics")}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_memory_follows_the_token_budget_not_the_rollout(toy_models, tmp_path):
    """Peak resident memory of the score and update phases, measured in a fresh process (this one's resident set
    holds whatever earlier tests left behind): 8x the rollout at the same budget, and in one pass."""
    import json
    import subprocess
    import sys

    from helpers import cli_env

    from saferlhf.trainers.phases import reset_rss_peak

    if not reset_rss_peak():
        pytest.skip("the peak resident set cannot be reset on this system")
    actor, reward, cost = _wide_vocabulary_models(toy_models, tmp_path / "models")

    def overrides(name, rollout, budget):
        return [f"run.out_dir={tmp_path / name}", f"model.name_or_path={actor}", f"ppo.reward_model={reward}",
                f"ppo.cost_model={cost}", "rollout.backend=hf", f"ppo.rollout_batch_size={rollout}",
                f"ppo.mini_batch_size={rollout}", "data.ptx=[]", f"ppo.micro_batch_tokens={budget}",
                "rollout.max_new_tokens=64", "run.progress=false", "run.tensorboard=false"]

    runs = [("small", 16, overrides("small", 16, 1024)), ("large", 128, overrides("large", 128, 1024)),
            ("unbounded", 128, overrides("unbounded", 128, 0))]
    result = subprocess.run([sys.executable, "-c", PEAKS, json.dumps(runs)], capture_output=True, text=True,
                            env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    small, large, unbounded = peaks["small"], peaks["large"], peaks["unbounded"]  # 8x the rollout: large, unbounded
    for phase in small:
        assert large[phase] <= 1.3 * small[phase], (phase, small, large)
        # Without a budget the 8x rollout does need more: the test could fail.
        assert unbounded[phase] > 1.3 * small[phase], (phase, small, unbounded)
