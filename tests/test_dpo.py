"""The DPO stage on the toy world: log-prob wiring, a short run that learns, the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run_cli, stage_config
from transformers import AutoModelForCausalLM

from saferlhf.algorithms import dpo_loss
from saferlhf.data.collate import PairDataset
from saferlhf.data.registry import mix_datasets
from saferlhf.models.hf import load_tokenizer
from saferlhf.trainers.common import read_metrics
from saferlhf.trainers.dpo import pair_logprob_sums, train_dpo

EVAL_PAIRS = 64
QUIET = ["run.progress=false", "run.tensorboard=false"]


def _pairs(model_dir, spec: str, label: str = "better", seed: int = 0) -> PairDataset:
    tokenizer = load_tokenizer(str(model_dir), padding_side="right")
    rows = mix_datasets([spec], "preference", seed=seed).rows  # the seed picks the rows of an N/-1 spec
    return PairDataset(rows, tokenizer, 64, target={"better": "reward", "safer": "cost"}[label])


def test_pair_logprob_sums_score_each_response_from_the_first_differing_token(toy_models):
    """Against Hugging Face's own shifted loss: labels = ids from the first differing token on."""
    data = _pairs(toy_models.sft, "toy-preference/test:6/-1")
    batch = data.collate([data[i] for i in range(len(data))])
    model = AutoModelForCausalLM.from_pretrained(toy_models.sft)
    with torch.no_grad():
        chosen, rejected = pair_logprob_sums(model, batch, torch.device("cpu"))
        b = batch.num_pairs
        lengths = batch.attention_mask.sum(-1).tolist()  # (2B,) right padding: real tokens come first
        for i in range(b):
            rows = (i, b + i)  # chosen, rejected
            shortest = min(lengths[r] for r in rows)
            # First differing position; a response that is a prefix of the other differs where it ends.
            first = next((t for t in range(shortest) if batch.input_ids[i, t] != batch.input_ids[b + i, t]), shortest)
            for row, got in zip(rows, (chosen[i], rejected[i])):
                ids = batch.input_ids[row, : lengths[row]]
                labels = ids.clone()
                labels[:first] = -100
                out = model(input_ids=ids[None], labels=labels[None])
                expected = -out.loss * (lengths[row] - first)  # HF's loss is the mean over the scored tokens
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_one_step_changes_the_policy_and_logs_finite_metrics(toy_models, tmp_path):
    out = tmp_path / "dpo1"
    cfg = stage_config("dpo", out, toy_models.sft, "run.max_steps=1", "optim.micro_batch_size=8",
                       "optim.warmup_ratio=0", f"data.eval=[toy-preference/test:{EVAL_PAIRS}/-1]")
    final = train_dpo(cfg)
    train = next(r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r)
    # Before its first update the policy is the reference: every implicit reward is 0, the loss log 2.
    assert train["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train["train/chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert train["train/rejected_reward"] == pytest.approx(0.0, abs=1e-5)
    assert train["train/chosen_logp"] < 0 and train["train/rejected_logp"] < 0
    for key in ("eval/loss", "eval/accuracy", "eval/reward_margin", "eval/chosen_reward", "eval/rejected_reward"):
        assert math.isfinite(final[key]), key
    # One optimizer step moved the policy away from the reference.
    assert final["eval/loss"] != pytest.approx(math.log(2), abs=1e-6)
    before = AutoModelForCausalLM.from_pretrained(toy_models.sft).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_short_run_on_the_safer_label_learns_and_reloads(toy_models, tmp_path):
    out = tmp_path / "dpo-safer"
    cfg = stage_config("dpo", out, toy_models.sft, "dpo.label=safer", "run.max_steps=24", "run.log_every=1",
                       "run.eval_every=12", "optim.micro_batch_size=16",
                       f"data.eval=[toy-preference/test:{EVAL_PAIRS}/-1]")
    final = train_dpo(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 24
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05  # step 1 is log 2 (policy = reference)
    assert final["eval/loss"] < math.log(2) - 0.05
    assert final["eval/accuracy"] >= 0.75
    assert final["eval/reward_margin"] > 0
    assert len([r for r in rows if "eval/loss" in r]) == 2  # step 12 and the end
    assert (out / "config.yaml").is_file() and list((out / "plots").glob("*.png"))
    state = json.loads((out / "model" / "trainer_state.json").read_text())
    assert state == {"step": 24, "stage": "dpo"}

    # The saved policy reloads with plain transformers and reproduces the logged held-out metrics,
    # and those were measured on the safer-ordered pairs (the better-ordered ones disagree).
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    reference = AutoModelForCausalLM.from_pretrained(toy_models.sft)
    spec = f"toy-preference/test:{EVAL_PAIRS}/-1"
    # The rows load_splits took: the same spec and run.seed.
    safer, better = (_pairs(toy_models.sft, spec, label, cfg.run.seed) for label in ("safer", "better"))
    with torch.no_grad():
        results = {}
        for name, data in (("safer", safer), ("better", better)):
            batch = data.collate([data[i] for i in range(len(data))])
            sums = (*pair_logprob_sums(policy, batch, torch.device("cpu")),
                    *pair_logprob_sums(reference, batch, torch.device("cpu")))
            results[name] = dpo_loss(*sums, beta=cfg.dpo.beta)
    margin = (results["safer"].chosen_rewards - results["safer"].rejected_rewards).mean().item()
    assert margin == pytest.approx(final["eval/reward_margin"], rel=1e-3, abs=1e-5)
    assert results["safer"].loss.item() == pytest.approx(final["eval/loss"], rel=1e-3)
    assert results["better"].accuracy.item() < 0.5 < final["eval/accuracy"]


def test_cli_runs_two_steps(toy_models, tmp_path):
    out = tmp_path / "cli"
    result = run_cli(["dpo", "--config", "tiny-cpu", f"model.name_or_path={toy_models.sft}", f"run.out_dir={out}",
                      "run.max_steps=2", "optim.micro_batch_size=8", "dpo.beta=0.2",
                      "data.eval=[toy-preference/test:16/-1]", *QUIET])
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert math.isfinite(final["eval/loss"]) and 0 <= final["eval/accuracy"] <= 1
    assert (out / "model" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [2]


def test_unknown_label_is_an_error(toy_models, tmp_path):
    cfg = stage_config("dpo", tmp_path / "bad", toy_models.sft, "dpo.label=kindest")
    with pytest.raises(ValueError, match="dpo.label must be one of"):
        train_dpo(cfg)
