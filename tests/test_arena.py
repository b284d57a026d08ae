"""Arena numbers (saferlhf.evaluate.arena): a hand-counted fixture, bootstrap intervals, Elo
symmetry and ordering, the report files, and clear errors for mismatched or invalid records."""

import json

import numpy as np
import pytest

from saferlhf.evaluate.arena import ArenaError, arena, bootstrap_ci, elo, markdown_report, write_report

# Six prompts answered by model A and model B. Safety is cost <= 0 unless `harmful` is given (p5).
#
#  prompt | A reward  A cost | B reward  B cost | reward (A) | cost (A; lower wins) | A safe | B safe
#  p1     |   2.0     -1.0   |   1.0     -2.0   | win        | loss                 | yes    | yes
#  p2     |   0.5      0.5   |   0.5      1.5   | tie        | win                  | no     | no
#  p3     |  -1.0     -0.5   |   3.0      2.0   | loss       | win                  | yes    | no
#  p4     |   1.0      0.0   |   0.0      0.0   | win        | tie                  | yes    | yes   (cost 0 is safe)
#  p5     |   1.0      1.0   |   2.0     -1.0   | loss       | loss                 | yes*   | no*   (* ground truth)
#  p6     |   4.0      3.0   |   1.5     -3.0   | win        | loss                 | no     | yes
A = [
    {"prompt": "p1", "reward": 2.0, "cost": -1.0},
    {"prompt": "p2", "reward": 0.5, "cost": 0.5},
    {"prompt": "p3", "reward": -1.0, "cost": -0.5},
    {"prompt": "p4", "reward": 1.0, "cost": 0.0},
    {"prompt": "p5", "reward": 1.0, "cost": 1.0, "harmful": False},
    {"prompt": "p6", "reward": 4.0, "cost": 3.0},
]
B = [  # in another order: records are paired by prompt
    {"prompt": "p6", "reward": 1.5, "cost": -3.0},
    {"prompt": "p5", "reward": 2.0, "cost": -1.0, "harmful": True},
    {"prompt": "p4", "reward": 0.0, "cost": 0.0},
    {"prompt": "p3", "reward": 3.0, "cost": 2.0},
    {"prompt": "p2", "reward": 0.5, "cost": 1.5},
    {"prompt": "p1", "reward": 1.0, "cost": -2.0},
]


def flat(a=A, b=B) -> list[dict]:
    return [{"model": "sft", **r} for r in a] + [{"model": "ppo-lag", **r} for r in b]


def test_arena_matches_the_hand_count():
    result = arena(flat(), n_boot=200)
    assert result["models"] == ["sft", "ppo-lag"]
    assert result["n_pairs"] == 6
    reward, cost = result["reward"], result["cost"]
    assert (reward["wins"], reward["ties"], reward["losses"]) == (3, 1, 2)
    assert (cost["wins"], cost["ties"], cost["losses"]) == (2, 1, 3)
    assert reward["win_rate"]["estimate"] == pytest.approx(3 / 6)
    assert reward["tie_rate"]["estimate"] == pytest.approx(1 / 6)
    assert cost["loss_rate"]["estimate"] == pytest.approx(3 / 6)
    assert result["safety"] == {
        "both_safe": 2,  # p1, p4
        "a_safe_b_unsafe": 2,  # p3, p5
        "a_unsafe_b_safe": 1,  # p6
        "both_unsafe": 1,  # p2
        "responses_judged_by_ground_truth": 2,
        "responses_judged_by_cost": 10,
    }
    sft, ppo = result["per_model"]["sft"], result["per_model"]["ppo-lag"]
    assert sft["harmful_rate"]["estimate"] == pytest.approx(2 / 6)  # p2, p6
    assert ppo["harmful_rate"]["estimate"] == pytest.approx(3 / 6)  # p2, p3, p5
    assert sft["mean_reward"]["estimate"] == pytest.approx(7.5 / 6)
    assert ppo["mean_reward"]["estimate"] == pytest.approx(8.0 / 6)
    assert sft["mean_cost"]["estimate"] == pytest.approx(3.0 / 6)
    assert ppo["mean_cost"]["estimate"] == pytest.approx(-2.5 / 6)
    for ci in (reward["win_rate"], sft["harmful_rate"], ppo["mean_cost"]):
        assert ci["low"] <= ci["estimate"] <= ci["high"]
    p5 = next(p for p in result["pairs"] if p["prompt"] == "p5")
    assert p5 == {"prompt": "p5", "reward_a": 1.0, "cost_a": 1.0, "safe_a": True,
                  "reward_b": 2.0, "cost_b": -1.0, "safe_b": False}


def test_arena_from_a_mapping_and_with_the_sides_swapped():
    by_name = arena({"sft": A, "ppo-lag": B}, n_boot=50)
    assert by_name["reward"] == arena(flat(), n_boot=50)["reward"]
    swapped = arena(flat(), model_a="ppo-lag", model_b="sft", n_boot=50)
    assert (swapped["reward"]["wins"], swapped["reward"]["ties"], swapped["reward"]["losses"]) == (2, 1, 3)
    assert swapped["safety"]["a_safe_b_unsafe"] == 1 and swapped["safety"]["a_unsafe_b_safe"] == 2


def test_tie_tolerance():
    result = arena({"x": [{"prompt": "q", "reward": 1.0, "cost": 0.0}],
                    "y": [{"prompt": "q", "reward": 1.05, "cost": 0.3}]}, n_boot=10, tie_tol=0.1)
    assert (result["reward"]["ties"], result["cost"]["wins"]) == (1, 1)  # 0.05 apart is a tie; 0.3 is not


def test_repeated_prompts_are_paired_in_order():
    a = [{"prompt": "q", "reward": 1.0, "cost": 0.0}, {"prompt": "q", "reward": 0.0, "cost": 0.0}]
    b = [{"prompt": "q", "reward": 0.5, "cost": 0.0}, {"prompt": "q", "reward": 0.5, "cost": 0.0}]
    result = arena({"a": a, "b": b}, n_boot=10)
    assert (result["reward"]["wins"], result["reward"]["losses"]) == (1, 1)


def test_mismatched_prompts_are_a_clear_error():
    b = [r for r in B if r["prompt"] != "p3"] + [{"prompt": "p7", "reward": 0.0, "cost": 0.0}]
    with pytest.raises(ArenaError) as info:
        arena(flat(b=b))
    message = str(info.value)
    assert "models 'sft' and 'ppo-lag' must answer the same prompts" in message
    assert "1 prompts answered only by 'sft' ('p3')" in message
    assert "1 prompts answered only by 'ppo-lag' ('p7')" in message

    with pytest.raises(ArenaError, match=r"answered a different number of times \('p1': 1 vs 2\)"):
        arena(flat(b=B + [B[-1]]))


def test_invalid_records_are_all_reported():
    a = [dict(A[0], reward="high"), dict(A[1], cost=float("nan")), dict(A[2], harmful="yes"), *A[3:]]
    with pytest.raises(ArenaError) as info:
        arena({"a": a, "b": B})
    message = str(info.value)
    assert "a record 0: field 'reward': expected a finite number, got 'high'" in message
    assert "a record 1: field 'cost': expected a finite number, got nan" in message
    assert "a record 2: field 'harmful': expected true, false or null" in message
    with pytest.raises(ArenaError, match="expected records of exactly two models, got 3"):
        arena(flat() + [{"model": "third", **A[0]}])


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, size=30), rng.normal(2.0, 1.0, size=3000)
    est_s, low_s, high_s = bootstrap_ci(small)
    est_l, low_l, high_l = bootstrap_ci(large)
    assert est_s == pytest.approx(small.mean()) and est_l == pytest.approx(large.mean())
    assert low_s < est_s < high_s and low_l < est_l < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5  # width shrinks like 1/sqrt(n): about 10x here
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci([0.5] * 8) == (0.5, 0.5, 0.5)
    med, low, high = bootstrap_ci(small, stat=np.median, n_boot=200)
    assert med == pytest.approx(np.median(small)) and low <= med <= high
    narrow = bootstrap_ci(small, alpha=0.5)
    assert low_s < narrow[1] <= narrow[2] < high_s  # a 50% interval sits inside the 95% one
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_elo_equal_wins_give_equal_ratings():
    result = elo([("A", "B"), ("B", "A")] * 10, n_boot=400)
    a, b = result["ratings"]["A"], result["ratings"]["B"]
    assert a["rating"] + b["rating"] == pytest.approx(2000.0)  # zero-sum updates
    assert abs(a["rating"] - b["rating"]) < 1.0
    assert a["low"] < a["rating"] < a["high"] and b["low"] < b["rating"] < b["high"]
    assert (a["wins"], a["losses"], a["ties"], a["games"]) == (10, 10, 0, 20)

    ties = elo([{"winner": "A", "loser": "B", "tie": True}] * 6, n_boot=50)["ratings"]
    assert ties["A"]["rating"] == ties["B"]["rating"] == 1000.0
    assert ties["A"]["ties"] == 6


def test_elo_orders_models_by_strength():
    always = elo([{"winner": "A", "loser": "B"}] * 30, n_boot=300)
    a, b = always["ratings"]["A"], always["ratings"]["B"]
    assert a["rating"] > 1000 > b["rating"]
    assert a["low"] > b["high"]  # the intervals separate
    assert list(always["ratings"]) == ["A", "B"]

    chain = elo([("B", "C")] * 10 + [("A", "B")] * 10 + [("A", "C")] * 10, n_boot=200, seed=5)
    assert list(chain["ratings"]) == ["A", "B", "C"]
    assert sum(r["rating"] for r in chain["ratings"].values()) == pytest.approx(3000.0)


def test_elo_rejects_bad_comparisons():
    with pytest.raises(ArenaError) as info:
        elo([("A", "A"), {"winner": "A"}, ("A", "B", "maybe"), "A>B"])
    message = str(info.value)
    for i in range(4):
        assert f"comparison {i}:" in message
    with pytest.raises(ArenaError, match="no comparisons"):
        elo([])


def test_write_report(tmp_path):
    result = arena(flat(), n_boot=50)
    ratings = elo([("sft", "ppo-lag"), ("ppo-lag", "sft"), ("ppo-lag", "sft")], n_boot=50)
    paths = write_report(result, tmp_path / "report", elo_result=ratings)
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["arena"]["reward"]["wins"] == 3 and data["elo"]["n_comparisons"] == 3
    text = paths["markdown"].read_text(encoding="utf-8")
    assert text == markdown_report(result, ratings)
    assert "| wins | 3 | 50.0% |" in text
    assert "| sft safe | 2 | 2 |" in text and "| sft unsafe | 1 | 1 |" in text
    assert "| sft | 33.3% |" in text
    assert "## Elo" in text and "| ppo-lag |" in text
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
