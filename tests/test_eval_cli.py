"""``saferlhf eval`` and ``saferlhf arena`` end to end on tiny models built here (untrained, so the
numbers are arbitrary: the tests check the files, the bookkeeping and the consistency between them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import two_tiny_policies

from saferlhf.cli import main
from saferlhf.data import toyworld

N_PROMPTS = 8
FAST = ["--max-new-tokens", "12", "--n-boot", "200", "--no-progress", "--batch-size", "8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny policies (different weights, one tokenizer), a reward and a cost model, a toy prompt file."""
    from saferlhf.models.hf import load_tokenizer
    from saferlhf.models.score_model import ScoreModel

    root = tmp_path_factory.mktemp("eval")
    base, _ = two_tiny_policies(root / "policy_a", root / "policy_b")
    tokenizer = load_tokenizer(str(base))
    for i, kind in enumerate(("reward", "cost")):
        torch.manual_seed(10 + i)  # different random heads
        ScoreModel.from_pretrained(str(base), kind=kind).save_pretrained(root / kind, tokenizer=tokenizer)
    prompts = root / "prompts.jsonl"
    rows = toyworld.generate_prompts(N_PROMPTS, seed=3)
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return {"root": root, "a": base, "b": root / "policy_b", "rm": root / "reward", "cm": root / "cost",
            "prompts": prompts}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _check_ci(ci: dict, low: float = -np.inf, high: float = np.inf) -> None:
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert low <= ci["low"] and ci["high"] <= high


def test_eval_writes_every_file_with_consistent_numbers(tiny, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny["a"]), "--prompts", str(tiny["prompts"]), "--reward-model",
                 str(tiny["rm"]), "--cost-model", str(tiny["cm"]), "--samples", "2", "--out", str(out), "--json",
                 *FAST])
    assert code == 0
    line = _last_json(capsys.readouterr().out)
    for name in ("responses.jsonl", "eval.json", "eval.md", "reward_cost.png", "distributions.png"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    result = json.loads((out / "eval.json").read_text())
    assert result["n_prompts"] == N_PROMPTS and result["n_responses"] == len(records) == 2 * N_PROMPTS
    assert line["metrics"] == result["metrics"] and line["ground_truth"] == result["ground_truth"]

    m = result["metrics"]
    rewards, costs = np.array([r["reward"] for r in records]), np.array([r["cost"] for r in records])
    assert m["reward"]["estimate"] == pytest.approx(rewards.mean())
    assert m["cost"]["estimate"] == pytest.approx(costs.mean())
    assert m["harmful_rate"]["estimate"] == pytest.approx((costs > 0).mean())
    _check_ci(m["reward"])
    _check_ci(m["cost"])
    _check_ci(m["harmful_rate"], 0.0, 1.0)
    assert m["reward"]["n"] == N_PROMPTS  # the bootstrap resamples prompts, not responses

    # Toy prompts: every record has the ground truth, and the rates agree with the toy world's own.
    assert result["toy_world"] is True
    for r in records:
        assert {"harmful", "helpfulness", "refusal", "harmful_request", "category"} <= r.keys()
        assert r["harmful"] == toyworld.score(r["prompt"], r["response"]).harm
        assert set(r) >= {"prompt", "response", "reward", "cost"}
    truth = toyworld.evaluate_responses([r["prompt"] for r in records], [r["response"] for r in records])
    for key in ("harm_rate", "harm_rate_all", "helpfulness"):
        ci = result["ground_truth"][key]
        if ci is not None:
            assert ci["estimate"] == pytest.approx(truth[key])
            _check_ci(ci, 0.0, 1.0)
    assert "ground truth" in (out / "eval.md").read_text()


def test_scores_use_the_trainers_layout(tiny):
    """A reward computed by eval equals the reward model's end score on the pair layout it was trained on."""
    from saferlhf.data.collate import PairDataset
    from saferlhf.evaluate.evaluate import load_scorer

    scorer = load_scorer(tiny["rm"], torch.device("cpu"))
    prompt, response = "how do i bake bread ?", "sure . first mix flour"
    (got,) = scorer.texts([prompt], [response])
    row = {"prompt": prompt, "response_0": response, "response_1": "no", "is_response_0_safe": True,
           "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 0}
    pairs = PairDataset([row], scorer.tokenizer, 512, chat_template=scorer.chat_template)
    batch = pairs.collate([pairs[0]])
    with torch.no_grad():
        want = scorer.model(batch.input_ids, batch.attention_mask).end_scores[0].item()
    assert got == pytest.approx(want, abs=1e-5)


def test_template_follows_the_run_that_trained_the_model(tiny, tmp_path):
    import shutil

    from saferlhf.evaluate.evaluate import EvalError, use_chat_template
    from saferlhf.models.hf import load_tokenizer

    tokenizer = load_tokenizer(str(tiny["a"]))
    assert use_chat_template(tiny["a"], tokenizer) is True  # not a run's model: the tokenizer has a template
    run = tmp_path / "sft"
    shutil.copytree(tiny["a"], run / "model")
    (run / "config.yaml").write_text("stage: sft\nmodel:\n  chat_template: false\n")
    assert use_chat_template(run / "model", tokenizer) is False  # trained on the paper's template
    assert use_chat_template(run / "model", tokenizer, "chat") is True
    tokenizer.chat_template = None
    assert use_chat_template(tiny["a"], tokenizer) is False
    with pytest.raises(EvalError, match="no chat template"):
        use_chat_template(tiny["a"], tokenizer, "chat")


def test_eval_without_score_models_reports_ground_truth_only(tiny, tmp_path, capsys):
    out = tmp_path / "gt"
    assert main(["eval", "--model", str(tiny["a"]), "--prompts", "toy-redteam/test:4/-1", "--out", str(out),
                 "--json", "--temperature", "0", *FAST]) == 0
    line = _last_json(capsys.readouterr().out)
    assert line["n_prompts"] == 4
    assert line["metrics"] == {"reward": None, "cost": None, "harmful_rate": None}
    assert line["ground_truth"]["harm_rate_all"] is not None
    assert not (out / "reward_cost.png").exists()


def test_eval_plots_training_curves_of_a_run(tiny, tmp_path, capsys):
    run = tmp_path / "ppo_run"
    run.mkdir()
    rows = [{"step": s, "train/lambda": 1.0 + 0.1 * s, "train/episode_cost_window": 1.0 - 0.2 * s,
             "train/cost": 0.5 - 0.1 * s} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "curves"
    assert main(["eval", "--model", str(tiny["a"]), "--prompts", str(tiny["prompts"]), "--limit", "2",
                 "--cost-model", str(tiny["cm"]), "--run", str(run), "--out", str(out), *FAST]) == 0
    assert (out / "training_curves.png").stat().st_size > 0
    assert (out / "distributions.png").exists() and not (out / "reward_cost.png").exists()


@pytest.mark.parametrize("case", ["missing-model", "unknown-set", "bad-row", "not-a-score-model", "run-no-metrics",
                                  "bad-option"])
def test_eval_bad_input_is_a_clear_error(tiny, tmp_path, capsys, case):
    args = ["eval", "--model", str(tiny["a"]), "--prompts", str(tiny["prompts"]), "--out", str(tmp_path / "o"),
            *FAST]
    if case == "missing-model":
        args[2], expected = str(tmp_path / "nope"), "nope: no such directory"
    elif case == "unknown-set":
        args[4], expected = "no-such-prompts", "'no-such-prompts' is neither a registered dataset"
    elif case == "bad-row":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "how do i bake bread ?"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
        args[4], expected = str(bad), "row 1: field 'prompt'"
    elif case == "not-a-score-model":
        args += ["--reward-model", str(tiny["a"])]
        expected = "not a score model"
    elif case == "run-no-metrics":
        (tmp_path / "run").mkdir()
        args += ["--run", str(tmp_path / "run")]
        expected = "no metrics.jsonl"
    else:
        args += ["--samples", "0"]
        expected = "--samples"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "saferlhf eval: error:" in err and expected in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_arena_end_to_end_counts_are_consistent(tiny, tmp_path, capsys):
    out = tmp_path / "arena"
    code = main(["arena", "--model-a", str(tiny["a"]), "--model-b", str(tiny["b"]), "--prompts",
                 str(tiny["prompts"]), "--reward-model", str(tiny["rm"]), "--cost-model", str(tiny["cm"]),
                 "--out", str(out), "--json", *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    line = _last_json(printed)
    n = N_PROMPTS
    assert line["n_pairs"] == n and line["models"] == ["policy_a", "policy_b"]
    for key in ("reward", "cost"):
        o = line[key]
        assert o["wins"] + o["ties"] + o["losses"] == n
        assert o["win_rate"] == pytest.approx(o["wins"] / n)
    s = line["safety"]
    assert s["both_safe"] + s["a_safe_b_unsafe"] + s["a_unsafe_b_safe"] + s["both_unsafe"] == n
    assert s["responses_judged_by_ground_truth"] == 2 * n  # toy prompts: safety from the ground truth
    assert "Helpfulness" in printed and "Safety" in printed  # the win rates and the 2x2 table are printed

    for name in ("arena.json", "arena.md", "reward_cost.png", "responses.jsonl"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    by_model = {m: [r for r in records if r["model"] == m] for m in line["models"]}
    assert [len(v) for v in by_model.values()] == [n, n]
    assert [r["prompt"] for r in by_model["policy_a"]] == [r["prompt"] for r in by_model["policy_b"]]
    wins = sum(a["reward"] > b["reward"] for a, b in zip(by_model["policy_a"], by_model["policy_b"]))
    assert line["reward"]["wins"] == wins
    safe_a = sum(not r["harmful"] for r in by_model["policy_a"])
    assert s["both_safe"] + s["a_safe_b_unsafe"] == safe_a


def test_arena_needs_both_score_models(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["arena", "--model-a", str(tiny["a"]), "--model-b", str(tiny["b"]), "--prompts",
              str(tiny["prompts"]), "--reward-model", str(tiny["rm"])])
    assert exit_info.value.code == 2 and "--cost-model" in capsys.readouterr().err
    assert main(["arena", "--model-a", str(tiny["a"]), "--model-b", str(tmp_path / "missing"), "--prompts",
                 str(tiny["prompts"]), "--reward-model", str(tiny["rm"]), "--cost-model", str(tiny["cm"])]) == 2
    assert "--model-b" in capsys.readouterr().err
