"""PPO-Lagrangian under ZeRO-3 with two ranks (torchrun, gloo on CPU), end to end through the CLI.

What a world of two adds over the in-process tests of test_ppo_lag.py: generation on a partitioned
actor (``synced_gpus``, or a rank that finishes early hangs the others), λ pooled over the episode
costs of both ranks, per-rank checkpoint shards, and a final model gathered from the partitions.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_cli
from transformers import AutoModelForCausalLM

from saferlhf.rollout import hf
from saferlhf.rollout.base import SamplingParams
from saferlhf.rollout.vllm_engine import vllm_available
from saferlhf.trainers.common import read_metrics

STEPS = 3
BACKENDS = ["hf", "vllm"] if vllm_available() else ["hf"]
LAMBDA_INIT, LAMBDA_LR = 1.0, 0.1  # and lambda_max far away, so every step follows the unclamped rule
# Long enough that the toy actor ends its responses itself (lengths ~8-30 tokens): one rank's batch
# then finishes before the other's, the case that hangs generation without ``synced_gpus``. At 12
# tokens most responses are cut at the cap, both ranks run all 12 steps and the case is not reached.
MAX_NEW_TOKENS = 48
# A run takes well under a minute; a collective that never completes fails the test at this bound.
TIMEOUT_S = 480
# Per-sample score sd of the toy reward/cost models is about 4.5/6, so the difference of two 16-sample
# means (same prompts, independent sampling) has an sd of about 2: allow ~3 sd.
SCORE_TOLERANCE = 6.5


class _RecordingLM(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` records its keyword arguments and appends two tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 2))
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 2), 3)], dim=1)


class _FakeEngine:
    """The two things the generator reads of a DeepSpeed engine: ``.module`` and its ZeRO stage."""

    def __init__(self, module: torch.nn.Module, stage: int) -> None:
        self.module, self.stage = module, stage

    def zero_optimization_stage(self) -> int:
        return self.stage


class _Tokenizer:
    eos_token_id, pad_token_id = 2, 0


def _fake_world(monkeypatch, world_size: int) -> None:
    monkeypatch.setattr(hf.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(hf.dist, "get_world_size", lambda group=None: world_size)


def _synced_gpus(model) -> bool:
    generator = hf.HFGenerator(model, _Tokenizer())
    generator.generate(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                       SamplingParams(max_new_tokens=2))
    return getattr(model, "module", model).calls[-1]["synced_gpus"]


def test_generation_is_synced_only_for_zero3_with_several_ranks(monkeypatch):
    plain, zero3_engine, zero2_engine = _RecordingLM(), _FakeEngine(_RecordingLM(), 3), _FakeEngine(_RecordingLM(), 2)
    partitioned = _RecordingLM()
    partitioned.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    # No process group: never synced.
    assert hf.needs_synced_gpus(zero3_engine) is False
    assert not _synced_gpus(zero3_engine) and not _synced_gpus(plain)
    # A world of one: nothing to wait for.
    _fake_world(monkeypatch, 1)
    assert not _synced_gpus(zero3_engine) and not _synced_gpus(partitioned)
    # Two ranks: synced exactly when the parameters are partitioned.
    _fake_world(monkeypatch, 2)
    assert _synced_gpus(zero3_engine) and _synced_gpus(partitioned)
    assert not _synced_gpus(plain) and not _synced_gpus(zero2_engine)
    # An explicit choice wins over detection.
    forced = hf.HFGenerator(plain, _Tokenizer(), synced_gpus=True)
    forced.generate(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), SamplingParams())
    assert plain.calls[-1]["synced_gpus"] is True


def _ppo_lag(toy_models, out_dir, *, nproc: int, rollout_batch_size: int, mini_batch_size: int, backend: str):
    args = ["ppo-lag", "--config", "tiny-cpu", f"model.name_or_path={toy_models.sft}",
            f"ppo.reward_model={toy_models.rm}", f"ppo.cost_model={toy_models.cm}", f"run.out_dir={out_dir}",
            f"run.max_steps={STEPS}", "run.save_every=2", "run.log_every=1", "run.progress=false",
            "run.tensorboard=false", "deepspeed.zero_stage=3", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
            f"ppo.rollout_batch_size={rollout_batch_size}", f"ppo.mini_batch_size={mini_batch_size}",
            "lagrange.method=gradient", "lagrange.constraint=mean_cost", f"lagrange.lambda_init={LAMBDA_INIT}",
            f"lagrange.lr={LAMBDA_LR}",
            "lagrange.threshold=0.0", "lagrange.delay=0", "lagrange.window=128", "lagrange.lambda_max=1000",
            f"rollout.backend={backend}",
            "rollout.verify_sync=true"]
    result = run_cli(args, nproc=nproc, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "train/reward" in r]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_lag_zero3_on_two_ranks_trains_pools_lambda_and_saves_full_weights(toy_models, tmp_path, backend):
    """hf: generation on the partitioned actor. vllm: one engine per rank (external_launcher), synced
    from the ZeRO-3 partitions gathered layer by layer, and checked against the actor after every update."""
    # 8 prompts per rank: the same global rollout (16) and global mini-batch (8) as the ws=1 run below.
    rows = _ppo_lag(toy_models, tmp_path / "ws2", nproc=2, rollout_batch_size=8, mini_batch_size=4,
                    backend=backend)
    if backend == "vllm":
        for row in rows:
            assert row["sync/verified"] == 1.0 and row["sync/max_logprob_diff"] <= 1e-4, row

    # One row per step, every scalar finite.
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    keys = ("train/reward", "train/cost", "train/lambda", "train/episode_cost_window", "train/kl",
            "train/actor_loss", "train/reward_critic_loss", "train/cost_critic_loss")
    for row in rows:
        for key in keys:
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["step"], key, row[key])

    # λ: J_C pools both ranks' episodes. At step 1 the window holds exactly this step's 16 costs, so
    # J_C equals the all-reduced mean cost (rank 0's 8 costs alone would give another number), and λ
    # took one gradient step on log λ from lambda_init with it.
    first = rows[0]
    assert first["train/episode_cost_window"] == pytest.approx(first["train/cost"], rel=1e-5, abs=1e-6)
    assert first["train/lambda"] == pytest.approx(
        LAMBDA_INIT * math.exp(LAMBDA_LR * LAMBDA_INIT * first["train/cost"]), rel=1e-5)
    assert first["train/lambda"] != pytest.approx(LAMBDA_INIT)
    lambdas = [r["train/lambda"] for r in rows]
    for prev, row in zip(lambdas, rows[1:]):  # the window keeps every episode so far (16 per step < 128)
        costs = [r["train/cost"] for r in rows if r["step"] <= row["step"]]
        assert row["train/episode_cost_window"] == pytest.approx(sum(costs) / len(costs), rel=1e-5, abs=1e-6)
        assert row["train/lambda"] == pytest.approx(
            prev * math.exp(LAMBDA_LR * prev * row["train/episode_cost_window"]), rel=1e-5)

    # The step-2 checkpoint: three engines with both ranks' ZeRO shards, and one trainer state per rank
    # whose λ agrees while each window holds only that rank's own 2 × 8 episodes.
    ckpt = tmp_path / "ws2" / "checkpoints" / "step-2"
    for engine in ("actor", "reward_critic", "cost_critic"):
        state_dir = ckpt / engine / "state"
        assert state_dir.is_dir(), engine
        for rank in (0, 1):
            assert list(state_dir.glob(f"*zero_pp_rank_{rank}_*optim_states.pt")), (engine, rank)
    states = [torch.load(ckpt / f"trainer_state_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [s["step"] for s in states] == [2, 2]
    lagrange = [s["lagrange"] for s in states]
    assert lagrange[0]["log_lambda"] == lagrange[1]["log_lambda"]
    assert math.exp(lagrange[0]["log_lambda"]) == pytest.approx(rows[1]["train/lambda"], rel=1e-9)
    assert [len(s["window"]) for s in lagrange] == [16, 16]
    assert lagrange[0]["window"] != lagrange[1]["window"]  # different prompts on each rank
    pooled = lagrange[0]["window"] + lagrange[1]["window"]
    assert sum(pooled) / len(pooled) == pytest.approx(rows[1]["train/episode_cost_window"], rel=1e-9)

    # The final model was gathered from the ZeRO-3 partitions into full weights.
    final, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ws2" / "model", output_loading_info=True)
    sft, sft_info = AutoModelForCausalLM.from_pretrained(toy_models.sft, output_loading_info=True)
    assert not info["missing_keys"], info
    # Nothing unexpected beyond what the SFT checkpoint (saved the same way, unpartitioned) holds.
    assert info["unexpected_keys"] <= sft_info["unexpected_keys"], info
    final_state, sft_state = final.state_dict(), sft.state_dict()
    assert {k: v.shape for k, v in final_state.items()} == {k: v.shape for k, v in sft_state.items()}
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in final_state.values())
    assert any(not torch.equal(final_state[k], sft_state[k]) for k in sft_state)  # the actor trained

    # World size 1 on the same global rollout: sampling differs per rank, so only the scale of the
    # first step's scores (same initial policy, same 16 prompts) is compared.
    one = _ppo_lag(toy_models, tmp_path / "ws1", nproc=1, rollout_batch_size=16, mini_batch_size=8,
                   backend=backend)
    assert [r["step"] for r in one] == list(range(1, STEPS + 1))
    for key in ("train/reward", "train/cost"):
        a, b = one[0][key], rows[0][key]
        assert abs(a - b) <= SCORE_TOLERANCE, (key, a, b)
