"""SFT, reward-model and cost-model stages on the toy world, end to end on real DeepSpeed engines."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, stage_config
from transformers import AutoModel, AutoModelForCausalLM

from saferlhf.config import load_config_file
from saferlhf.models.score_model import ScoreModel
from saferlhf.trainers.common import read_metrics


def test_reward_model_learns_helpfulness(toy_models):
    assert toy_models.rm_metrics["eval/accuracy"] >= 0.90


def test_cost_model_learns_harmlessness(toy_models):
    assert toy_models.cm_metrics["eval/accuracy"] >= 0.90
    assert toy_models.cm_metrics["eval/sign_accuracy"] >= 0.90


def test_run_directories_hold_config_metrics_checkpoints_plots(toy_models):
    for stage in ("sft", "rm", "cm"):
        run = toy_models.root / stage
        assert load_config_file(run / "config.yaml").stage == stage  # the resolved config of this run
        assert list((run / "plots").glob("*.png")), stage
        rows = read_metrics(run / "metrics.jsonl")
        assert any("train/loss" in r for r in rows) and any("eval/loss" in r for r in rows)
        # The final model records the step it was saved at: the run's last logged step.
        state = json.loads((run / "model" / "trainer_state.json").read_text())
        assert state == {"step": max(r["step"] for r in rows), "stage": stage}
    losses = [r["train/loss"] for r in read_metrics(toy_models.root / "sft" / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]  # SFT learned the toy language


def test_sft_checkpoint_loads_with_auto_model(toy_models):
    model = AutoModelForCausalLM.from_pretrained(toy_models.sft)
    ids = torch.tensor([[1, 5, 6, 7]])
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_score_model_checkpoint_loads_back_with_identical_scores(toy_models, tmp_path):
    from saferlhf.data.collate import PairDataset
    from saferlhf.data.toyworld import generate_preference
    from saferlhf.models.hf import load_tokenizer

    tokenizer = load_tokenizer(str(toy_models.cm))
    data = PairDataset(generate_preference(4, seed=7), tokenizer, 64, target="cost")
    batch = data.collate([data[i] for i in range(4)])
    first = ScoreModel.from_pretrained(toy_models.cm)
    first.save_pretrained(tmp_path / "again", tokenizer=tokenizer)
    second = ScoreModel.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        a = first(batch.input_ids, batch.attention_mask).end_scores
        b = second(batch.input_ids, batch.attention_mask).end_scores
    assert torch.equal(a, b)
    # The backbone alone loads with AutoModel too.
    assert AutoModel.from_pretrained(toy_models.cm).config.hidden_size == first.config.hidden_size


def _loss_curve(run_dir):
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_world_size_two_matches_world_size_one(toy_models, tmp_path, zero_stage):
    """Same global batches: world size 1 with 2 micro-batches per step vs world size 2 with 1."""
    common = ["--config", "tiny-cpu", f"model.name_or_path={toy_models.sft}", "run.max_steps=6", "run.log_every=1",
              "run.progress=false", "run.tensorboard=false", "optim.micro_batch_size=8", "data.eval=[]",
              f"deepspeed.zero_stage={zero_stage}"]
    one = run_cli(["rm", *common, f"run.out_dir={tmp_path / 'ws1'}", "optim.gradient_accumulation=2"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(["rm", *common, f"run.out_dir={tmp_path / 'ws2'}", "optim.gradient_accumulation=1"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    curve_one, curve_two = _loss_curve(tmp_path / "ws1"), _loss_curve(tmp_path / "ws2")
    assert len(curve_one) == len(curve_two) == 6
    assert curve_one == pytest.approx(curve_two, rel=1e-4, abs=1e-5)
    assert curve_one[0] != pytest.approx(curve_one[-1])  # it trained
    # The ZeRO-sharded model was gathered into one checkpoint that loads back.
    model = ScoreModel.from_pretrained(tmp_path / "ws2" / "model")
    assert json.loads((tmp_path / "ws2" / "model" / "score_model.json").read_text())["kind"] == "reward"
    assert model.score_head.weight.shape[-1] == model.config.hidden_size


def test_stage_stops_with_a_clear_error_on_too_little_data(toy_models, tmp_path):
    from saferlhf.trainers.sft import train_sft

    cfg = stage_config("sft", tmp_path / "sft", toy_models.base, "data.train=[toy-sft/train:4/-1]", "data.eval=[]")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_sft(cfg)
