"""The critic-free modes (grpo-lag, rloo-lag, grpo, rloo) on the toy-world models: they run with either
generation backend, hold no critic, resume exactly, keep each prompt's answers together, and refuse bad
settings naming the key."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import comparable, stage_config

from saferlhf.config import ConfigError
from saferlhf.rollout.vllm_engine import vllm_available
from saferlhf.trainers.common import read_metrics
from saferlhf.trainers.ppo_lag import PPOLagTrainer, _check_groups, train_ppo

GROUP_STAGES = ["grpo_lag", "rloo_lag", "grpo", "rloo"]
BACKENDS = ["vllm", "hf"] if vllm_available() else ["hf"]
G = 4  # answers per prompt


def _cfg(toy_models, out_dir, stage, *extra):
    # The unconstrained baselines need no cost model: they are run without one.
    cost = [f"ppo.cost_model={toy_models.cm}"] if stage.endswith("_lag") else []
    return stage_config(stage, out_dir, toy_models.sft, f"ppo.reward_model={toy_models.rm}", *cost,
                        "run.log_every=1", "ppo.rollout_batch_size=4", f"rollout.samples_per_prompt={G}",
                        "ppo.mini_batch_size=8", "rollout.max_new_tokens=16", "run.deterministic=true", *extra)


def _rows(out_dir):
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "train/reward" in r]


@pytest.mark.parametrize("stage,backend", [(s, b) for s in GROUP_STAGES for b in BACKENDS])
def test_every_group_mode_runs_without_critics_and_logs_its_metrics(toy_models, tmp_path, stage, backend):
    out = tmp_path / stage
    trainer = PPOLagTrainer(_cfg(toy_models, out, stage, "run.max_steps=2", "run.save_every=1",
                                 f"rollout.backend={backend}"))
    # Four models at most: actor, reference, reward model, cost model (the baselines: not even that one).
    assert trainer.critic_r is None and trainer.critic_c is None
    assert list(trainer._engines()) == ["actor"]
    assert len(trainer.costs) == (1 if stage.endswith("_lag") else 0)
    final = trainer.train()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("train/reward", "train/cost", "train/kl", "train/kl_loss", "train/actor_loss", "train/approx_kl",
                "train/entropy", "train/response_length", "train/reward_group_std", "time/generate", "time/score",
                "time/learn", "rollout/tokens_per_second"):
        assert key in final, key
    assert not any("critic" in key for key in final), sorted(final)
    assert ("train/lambda" in final) == stage.endswith("_lag")
    assert ("train/cost_group_std" in final) == stage.endswith("_lag")
    assert all(r["train/actor_loss"] != 0.0 for r in rows)  # the group advantages moved the actor
    for r in rows:
        assert ("sync/seconds" in r) == (backend == "vllm")
    # The checkpoint holds the actor's engine and the loop state, nothing of a critic.
    saved = {p.name for p in (out / "checkpoints" / "step-1").iterdir()}
    assert saved == {"actor", "trainer_state_rank0.pt"}, saved
    state = torch.load(out / "checkpoints" / "step-1" / "trainer_state_rank0.pt", weights_only=False)
    assert (state["lagrange"] is not None) == stage.endswith("_lag")
    assert (out / "model" / "config.json").is_file()
    assert list((out / "plots").glob("*.png"))


@pytest.mark.parametrize("stage", GROUP_STAGES)
def test_a_resumed_group_run_reproduces_the_following_steps(toy_models, tmp_path, stage):
    extra = ["run.max_steps=4", "run.save_every=2", "rollout.backend=hf"]
    full = tmp_path / "full"
    train_ppo(_cfg(toy_models, full, stage, *extra))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    train_ppo(_cfg(toy_models, resumed, stage, *extra, "run.resume=true"))
    after = lambda d: [comparable(r) for r in read_metrics(d / "metrics.jsonl") if r["step"] > 2]  # noqa: E731
    assert after(resumed) == after(full) and len(after(full)) == 2


@pytest.mark.parametrize("stage,kl_in", [("grpo_lag", "reward"), ("ppo_lag", "loss")])
def test_the_kl_goes_where_ppo_kl_in_puts_it(toy_models, tmp_path, stage, kl_in):
    """reward: the PPO modes' KL shaping inside the episode scores, no KL term in the loss; loss: a k3 term
    beside the policy loss (the PPO modes take it too)."""
    final = train_ppo(_cfg(toy_models, tmp_path / "run", stage, "run.max_steps=1", "rollout.backend=hf",
                           f"ppo.kl_in={kl_in}", "ppo.kl_coeff=0.1", "ppo.mini_batch_size=16"))
    assert ("train/kl_loss" in final) == (kl_in == "loss")
    assert ("train/reward_critic_loss" in final) == (stage == "ppo_lag")
    if kl_in == "loss":  # one update (a mini-batch of the whole rollout), from the reference: KL(π ‖ π_ref) = 0
        assert final["train/kl_loss"] == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_do_not_depend_on_how_the_rollout_is_cut_into_passes(toy_models, tmp_path):
    """A token budget cuts the rollout into passes that scatter each prompt's answers (the passes sort rows
    by length); the advantages are computed over the whole scored rollout, so each row still carries its own
    group's advantage: the same as without a budget, and summing to zero over every group of G."""
    trainer = PPOLagTrainer(_cfg(toy_models, tmp_path / "run", "grpo_lag", "rollout.backend=hf",
                                 "ppo.micro_batch_tokens=64", "model.packing=false"))
    try:
        batch = trainer.prompts.collate([trainer.prompts[i] for i in trainer.prompt_indices(1)])
        gen = trainer.generator.generate(batch.input_ids, batch.attention_mask, trainer.sampling)
        n = gen.sequences.shape[0]
        assert n == 4 * G
        passes = trainer._passes(gen.attention_mask, gen.prompt_ids.shape[1])
        group_of = {int(row): int(row) // G for index, real in passes if real for row in index}
        assert sorted(group_of) == list(range(n))
        split = [g for g in range(n // G)
                 if len({k for k, (index, _) in enumerate(passes) for row in index if int(row) // G == g}) > 1]
        assert len(passes) > 1 and split, "the budget must cut at least one group over several passes"
        lagrange = trainer.penalty.state_dict()
        cut, _ = trainer.make_experience(gen, 1)
        trainer.penalty.load_state_dict(lagrange)  # the same λ for the second scoring
        trainer.cfg.ppo.micro_batch_tokens = 0
        whole, _ = trainer.make_experience(gen, 1)
    finally:
        trainer.close()
    assert torch.allclose(cut.adv, whole.adv, atol=1e-5)
    episode = cut.adv.sum(-1) / cut.mask.sum(-1).clamp(min=1)  # (N,) every token of a row carries its A
    assert episode.abs().max() > 0
    # Â_r and Â_c are both centred within each group, so their λ-combination is too.
    assert episode.view(-1, G).sum(-1).abs().max() < 1e-4


def test_answers_that_are_not_grouped_by_prompt_are_refused():
    prompts = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]])
    _check_groups(prompts, 2)  # two groups of two: fine
    with pytest.raises(RuntimeError, match="not grouped by prompt"):
        _check_groups(prompts[[0, 2, 1, 3]], 2)
    with pytest.raises(RuntimeError, match="rollout.samples_per_prompt=3"):
        _check_groups(prompts, 3)


@pytest.mark.parametrize("stage", GROUP_STAGES)
def test_fewer_than_two_answers_per_prompt_is_an_error_naming_the_key(stage, capsys):
    from saferlhf.cli import main
    from saferlhf.config import build_config, resolve_preset

    for count in (1, 0):
        with pytest.raises(ConfigError, match=r"rollout\.samples_per_prompt"):
            build_config(stage, resolve_preset("tiny-cpu"), [f"rollout.samples_per_prompt={count}"])
    # The command line refuses it before any model loads (the model path does not even exist).
    command = stage.replace("_", "-")
    assert main([command, "--config", "tiny-cpu", "model.name_or_path=/nonexistent",
                 "rollout.samples_per_prompt=1"]) == 2
    assert "rollout.samples_per_prompt" in capsys.readouterr().err


def test_a_bad_kl_placement_is_an_error_naming_the_key():
    from saferlhf.config import build_config, resolve_preset

    with pytest.raises(ConfigError, match=r"ppo\.kl_in.*auto, loss, reward"):
        build_config("grpo_lag", resolve_preset("tiny-cpu"), ["ppo.kl_in=critic"])
    cfg = build_config("grpo", resolve_preset("tiny-cpu"), ["ppo.kl_in=reward"])
    assert cfg.ppo.kl_in == "reward" and cfg.rollout.samples_per_prompt == 4  # the preset's group size


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_group_modes_train_under_zero(toy_models, tmp_path, zero_stage):
    out = tmp_path / "run"
    final = train_ppo(_cfg(toy_models, out, "grpo_lag", "run.max_steps=2", "run.save_every=1", "rollout.backend=hf",
                           f"deepspeed.zero_stage={zero_stage}"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("train/actor_loss", "train/kl_loss", "train/lambda"))
    assert "train/reward_critic_loss" not in final
    assert {p.name for p in (out / "checkpoints" / "step-1").iterdir()} == {"actor", "trainer_state_rank0.pt"}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("command,backend", [("grpo-lag", BACKENDS[0]), ("rloo-lag", "hf")])
def test_constrained_group_modes_zero3_on_two_ranks_pool_lambda_and_resume(toy_models, tmp_path, command, backend):
    """Two ranks (torchrun, gloo): each generates all G answers of its own prompts, λ pools both ranks'
    episode costs, the checkpoint holds per-rank actor shards and no critic, and a resumed run repeats
    the uninterrupted one's last step. Both modes, and both generation backends (one each)."""
    from helpers import run_cli

    def run(out_dir, *extra):
        args = [command, "--config", "tiny-cpu", f"model.name_or_path={toy_models.sft}",
                f"ppo.reward_model={toy_models.rm}", f"ppo.cost_model={toy_models.cm}", f"run.out_dir={out_dir}",
                "run.max_steps=3", "run.save_every=2", "run.log_every=1", "run.progress=false",
                "run.tensorboard=false", "run.deterministic=true", "deepspeed.zero_stage=3",
                "rollout.max_new_tokens=16", "ppo.rollout_batch_size=2", f"rollout.samples_per_prompt={G}",
                "ppo.mini_batch_size=4", "lagrange.constraint=mean_cost", "lagrange.threshold=0.0",
                "lagrange.lambda_init=1.0", "lagrange.lr=0.1", "lagrange.lambda_max=1000",
                f"rollout.backend={backend}", *extra]
        result = run_cli(args, nproc=2, timeout=480)
        assert result.returncode == 0, result.stderr[-4000:]
        return [r for r in read_metrics(out_dir / "metrics.jsonl") if "train/reward" in r]

    rows = run(tmp_path / "full")
    assert [r["step"] for r in rows] == [1, 2, 3]
    first = rows[0]  # the window holds both ranks' 16 costs: J_C is their all-reduced mean
    assert first["train/episode_cost_window"] == pytest.approx(first["train/cost"], rel=1e-5, abs=1e-6)
    assert first["train/lambda"] == pytest.approx(math.exp(0.1 * first["train/cost"]), rel=1e-5)
    assert not any("critic" in k for k in first)
    saved = {p.name for p in (tmp_path / "full" / "checkpoints" / "step-2").iterdir()}
    assert saved == {"actor", "trainer_state_rank0.pt", "trainer_state_rank1.pt"}, saved
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    again = run(resumed, "run.resume=true")
    assert [comparable(r) for r in again if r["step"] == 3] == [comparable(r) for r in rows if r["step"] == 3]
