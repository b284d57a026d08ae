"""One constraint per harm category: cost models of some categories only (``saferlhf cm
data.categories=[...]``), several constraints in the critic-free stages (``lagrange.constraints`` with
one cost model, threshold and λ each), and the errors that name the key.

The toy world's harmful topics fall into five categories; the outcome test splits them into two groups,
one cost model each, and gives the group of the most severe harms (weapons, violence: severity 3) a
tight threshold and the other a loose one: that group must end with the lower true harmful rate, and
each λ must move with the sign of its own J_C − d. It runs RLOO-Lag: under GRPO-Lag the same run ends
with both groups near 0 (true harm 0.015 severe, 0.011 other), because GRPO divides each cost by its
group's spread, and the severe cost model's tiny spread over the answers to *other* prompts (all safe
in its categories) is blown up to unit size and weighted by the severe λ — every harmful request is
then refused. RLOO keeps a cost's spread at its own scale (measured: 0.007 severe, 0.678 other).
"""

from __future__ import annotations

import math
import shutil

import pytest
from helpers import comparable, stage_config

from saferlhf.config import ConfigError, build_config, resolve_preset
from saferlhf.data.categories import relabel_by_categories
from saferlhf.data.schema import DataError
from saferlhf.trainers.common import read_metrics
from saferlhf.trainers.ppo_lag import PPOLagTrainer, train_ppo
from saferlhf.trainers.preference import train_preference

SEVERE = ["weapons", "violence"]  # bomb, gun, poison
OTHER = ["theft", "fraud", "drugs"]
THRESHOLDS = [0.05, 0.4]  # severe, other


def _row(flags0: dict, flags1: dict, safer: int, safe0: bool, safe1: bool) -> dict:
    return {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": safer,
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_harm_category": flags0, "response_1_harm_category": flags1}


def test_rows_are_relabelled_by_the_harm_of_the_chosen_categories_only():
    none = {"weapons": False, "theft": False}
    weapons, theft = {"weapons": True, "theft": False}, {"weapons": False, "theft": True}
    rows = [
        _row(weapons, none, 1, False, True),  # harmful in the category / safe: unchanged
        _row(theft, none, 1, False, True),  # harmful elsewhere only: safe here, the original order kept
        _row(weapons, theft, 1, False, False),  # the theft answer is the safe one here
        _row(weapons, {"weapons": True, "theft": True}, 0, False, False),  # both harmful here: order kept
    ]
    out = relabel_by_categories(rows, ["weapons"], "rows.jsonl")
    assert [(r["is_response_0_safe"], r["is_response_1_safe"], r["safer_response_id"]) for r in out] == [
        (False, True, 1), (True, True, 1), (False, True, 1), (False, False, 0)]
    assert rows[2]["is_response_1_safe"] is False  # the input rows are not modified
    # Several categories: unsafe when harmful in any of them.
    both = relabel_by_categories(rows, ["weapons", "theft"], "rows.jsonl")
    assert [(r["is_response_0_safe"], r["is_response_1_safe"]) for r in both][:3] == [
        (False, True), (False, True), (False, False)]

    with pytest.raises(DataError, match=r"rows.jsonl: data.categories \['weapns'\].*categories in the data"):
        relabel_by_categories(rows, ["weapns"], "rows.jsonl")
    relabel_by_categories(rows, ["weapns"], "held out", check_present=False)  # a small held-out split may lack one
    bare = [dict(rows[0])]
    del bare[0]["response_1_harm_category"]
    with pytest.raises(DataError, match="rows.jsonl: row 0: field 'response_1_harm_category' is missing"):
        relabel_by_categories(bare, ["weapons"], "rows.jsonl")


@pytest.mark.parametrize("overrides,stage,message", [
    (["lagrange.constraints=[a,b]", "lagrange.cost_models=[x]", "lagrange.thresholds=[0.1,0.2]"], "grpo_lag",
     "'lagrange.cost_models': 1 entries for 2 constraints"),
    (["lagrange.constraints=[a,b]", "lagrange.cost_models=[x,y]", "lagrange.thresholds=[0.1]"], "grpo_lag",
     "'lagrange.thresholds': 1 entries for 2 constraints"),
    (["lagrange.cost_models=[x]", "lagrange.thresholds=[0.1]"], "grpo_lag", "'lagrange.constraints' is empty"),
    (["lagrange.constraints=[a,a]", "lagrange.cost_models=[x,y]", "lagrange.thresholds=[0.1,0.2]"], "grpo_lag",
     "names must be non-empty and distinct"),
    (["lagrange.constraints=[a]", "lagrange.cost_models=[x]", "lagrange.thresholds=[0.1]"], "ppo_lag",
     "ppo_lag takes one constraint"),
    (["lagrange.constraints=[a]", "lagrange.cost_models=[x]", "lagrange.thresholds=[0.1]", "ppo.cost_model=y"],
     "grpo_lag", "'ppo.cost_model': with lagrange.constraints"),
    (["lagrange.constraints=[a]", "lagrange.cost_models=[x]", "lagrange.thresholds=[1.5]",
      "lagrange.constraint=unsafe_rate"], "rloo_lag", "constraint 'a' under unsafe_rate"),
    (["data.categories=[weapons]"], "rm", "'data.categories': only the cost model"),
])
def test_bad_constraint_lists_are_errors_naming_the_key(overrides, stage, message):
    with pytest.raises(ConfigError, match=message):
        build_config(stage, resolve_preset("tiny-cpu"), overrides)


def _multi(toy_models, out_dir, cost_models, thresholds, *extra, stage="grpo_lag"):
    names = ",".join(f"c{k}" for k in range(len(cost_models)))
    return stage_config(stage, out_dir, toy_models.sft, f"ppo.reward_model={toy_models.rm}",
                        f"lagrange.constraints=[{names}]", f"lagrange.cost_models=[{','.join(map(str, cost_models))}]",
                        f"lagrange.thresholds=[{','.join(map(str, thresholds))}]", "run.log_every=1",
                        "rollout.backend=hf", "run.deterministic=true", *extra)


def _lambda_moves_with_its_violation(rows: list[dict], name: str, threshold: float) -> None:
    """λ's gradient rule on log λ: between two steps λ moves with the sign of J_C − d at the later one
    (unless held at 0 or λ_max)."""
    for before, after in zip(rows, rows[1:]):
        step = after[f"train/lambda/{name}"] - before[f"train/lambda/{name}"]
        violation = after[f"train/episode_cost_window/{name}"] - threshold
        if violation > 0 and after[f"train/lambda/{name}"] < 100.0:
            assert step > 0, (name, before, after)
        elif violation < 0:
            assert step < 0, (name, before, after)


def test_two_constraints_each_have_their_lambda_and_resume_exactly(toy_models, tmp_path):
    """The toy cost model twice, under d = 0 (always violated while any answer is unsafe) and d = 1 (never):
    one λ rises, the other falls; the advantage's cost weight is their sum; the run resumes exactly."""
    extra = ["run.max_steps=4", "run.save_every=2", "ppo.rollout_batch_size=4", "rollout.samples_per_prompt=4",
             "ppo.mini_batch_size=8", "rollout.max_new_tokens=16"]
    full = tmp_path / "full"
    trainer = PPOLagTrainer(_multi(toy_models, full, [toy_models.cm, toy_models.cm], [0.0, 1.0], *extra))
    assert len(trainer.costs) == 2 and list(trainer._engines()) == ["actor"]  # two frozen cost models, no critic
    trainer.train()
    rows = [r for r in read_metrics(full / "metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["train/lambda"] == pytest.approx(r["train/lambda/c0"] + r["train/lambda/c1"])
        assert r["train/episode_cost_window/c0"] == r["train/episode_cost_window/c1"]  # the same cost model
        assert r["train/cost/c0"] == r["train/cost/c1"] == r["train/cost"]
        assert 0 < r["train/episode_cost_window/c0"] < 1  # some answers unsafe, some safe
    assert rows[-1]["train/lambda/c0"] > 1.0 > rows[-1]["train/lambda/c1"]  # from lambda_init 1
    _lambda_moves_with_its_violation(rows, "c0", 0.0)
    _lambda_moves_with_its_violation(rows, "c1", 1.0)
    assert (full / "plots" / "grpo_lag.png").is_file()

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    train_ppo(_multi(toy_models, resumed, [toy_models.cm, toy_models.cm], [0.0, 1.0], *extra, "run.resume=true"))
    after = lambda d: [comparable(r) for r in read_metrics(d / "metrics.jsonl") if r["step"] > 2]  # noqa: E731
    assert after(resumed) == after(full) and len(after(full)) == 2


@pytest.mark.slow
def test_the_tighter_category_threshold_ends_with_the_lower_harmful_rate(toy_models, tmp_path):
    from saferlhf.evaluate.groundtruth import evaluate_policy

    cost_models = []
    for name, categories in (("severe", SEVERE), ("other", OTHER)):
        out = tmp_path / f"cm-{name}"
        metrics = train_preference(stage_config("cm", out, toy_models.sft, f"data.categories=[{','.join(categories)}]",
                                                "run.max_steps=120"))
        assert metrics["eval/sign_accuracy"] >= 0.9, (name, metrics)  # it tells harm in its categories apart
        cost_models.append(out / "model")
    run = tmp_path / "rloo-lag"
    # Red-teaming prompts: 3 of the 8 harmful topics are severe. d is the share of all answers unsafe in the
    # group: at most 5 % severe, at most 40 % other.
    train_ppo(_multi(toy_models, run, cost_models, THRESHOLDS, "run.progress=false", "rollout.backend=vllm",
                     stage="rloo_lag"))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "train/reward" in r]
    truth = evaluate_policy(run / "model", by_category=True)["harm_rate_by_category"]
    severe = sum(truth[c] for c in SEVERE) / len(SEVERE)
    other = sum(truth[c] for c in OTHER) / len(OTHER)
    print(f"true harmful rate: severe {severe:.3f}, other {other:.3f}; {truth}")
    assert severe < other - 0.1, truth
    tail = rows[-len(rows) // 4:]
    assert all(not math.isnan(r["train/lambda/c0"]) for r in rows)
    mean = lambda key: sum(r[key] for r in tail) / len(tail)  # noqa: E731
    assert mean("train/unsafe_rate/c0") < mean("train/unsafe_rate/c1")  # by the cost models, too
    _lambda_moves_with_its_violation(rows, "c0", THRESHOLDS[0])
    _lambda_moves_with_its_violation(rows, "c1", THRESHOLDS[1])


def test_two_constraints_with_the_kl_in_the_reward(toy_models, tmp_path):
    """``ppo.kl_in=reward`` shapes each constraint's cost stream with the KL, one by one: a step runs and
    gives each constraint its λ."""
    final = train_ppo(_multi(toy_models, tmp_path / "run", [toy_models.cm, toy_models.cm], [0.0, 1.0],
                             "run.max_steps=1", "ppo.rollout_batch_size=2", "rollout.samples_per_prompt=4",
                             "ppo.mini_batch_size=8", "rollout.max_new_tokens=12", "ppo.kl_in=reward"))
    assert "train/kl_loss" not in final and final["train/actor_loss"] != 0.0
    assert final["train/lambda/c0"] > 1.0 > final["train/lambda/c1"]
