"""`saferlhf round` (saferlhf.rounds): one Safe RLHF round on the toy world, stage by stage — a round
interrupted inside PPO-Lag resumes there without redoing the earlier stages, a second round carries
the first one's unsafe prompts and preference data over, and the labels come from the toy world's
ground truth, from an LLM judge (a real HTTP server on 127.0.0.1 that judges by the ground truth), or
from a filled-in annotation sheet."""

from __future__ import annotations

import csv
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_cli

from saferlhf.cli import main
from saferlhf.config import build_config, resolve_preset
from saferlhf.data import toyworld
from saferlhf.data.schema import validate_rows
from saferlhf.rounds import DONE, STAGES, STOPPED, AwaitingAnnotation, RoundError, _wait_for_stage, run_round

# Tiny budgets: two optimizer steps per trainer, short answers, a small held-out set for the models.
OVERRIDES = ["run.progress=false", "run.tensorboard=false", "run.max_steps=2", "rollout.max_new_tokens=16",
             "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "data.eval=[toy-preference/test:64/-1]"]
HF = [*OVERRIDES, "rollout.backend=hf"]  # the label-stage tests: no engine start-up for 16 prompts
PROMPTS = ["toy-redteam/train:16/-1"]
EVAL_PROMPTS = 16


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def risk(s: toyworld.ToyScore) -> tuple:
    return toyworld.risk_order(s, refusal_safer=False)


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """A briefly fine-tuned toy policy: it answers in the toy language, imperfectly."""
    from saferlhf.config import build_config, resolve_preset
    from saferlhf.pipeline import build_base_model
    from saferlhf.trainers.sft import train_sft

    root = tmp_path_factory.mktemp("round-sft")
    base = build_base_model(root / "base")
    train_sft(build_config("sft", resolve_preset("tiny-cpu"), [
        f"run.out_dir={root / 'sft'}", f"model.name_or_path={base}", "run.progress=false", "run.tensorboard=false",
        "run.max_steps=40", "data.eval=[toy-sft/test:32/-1]"]))
    return root / "sft" / "model"


class Interrupted(RuntimeError):
    pass


def stage_files(out: Path, stages) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for stage in stages for p in (out / stage).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def round_one(sft, tmp_path_factory):
    """Round 1, killed inside PPO-Lag (after the trainer wrote a file), then run again to the end."""
    out = tmp_path_factory.mktemp("rounds") / "round-1"
    kwargs = dict(policy=sft, prompts=PROMPTS, overrides=OVERRIDES, eval_prompts=EVAL_PROMPTS)

    def killed(cfg):
        (cfg.out_dir / "metrics.jsonl").write_text('{"step": 1, "train/lambda"')  # cut short
        raise Interrupted("killed during PPO-Lag")

    first_log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("saferlhf.trainers.ppo_lag.train_ppo", killed)
        with pytest.raises(Interrupted):
            run_round(out, **kwargs, log=first_log.append)
    done_after_kill = {stage: (out / stage / DONE).is_file() for stage in STAGES}
    before = stage_files(out, STAGES[:4])
    log: list[str] = []
    result = run_round(out, **kwargs, log=log.append)
    return SimpleNamespace(out=out, kwargs=kwargs, result=result, done_after_kill=done_after_kill, before=before,
                           first_log=first_log, log=log)


@pytest.mark.slow
def test_round_writes_every_stage_and_a_report(round_one):
    out, report = round_one.out, round_one.result.report
    for stage in STAGES:
        assert (out / stage / DONE).is_file() and (out / stage / "stats.json").is_file()
    prompts = read_jsonl(out / "prompts" / "prompts.jsonl")
    assert len(prompts) == 16 and {p["prompt_source"] for p in prompts} == set(PROMPTS)

    from saferlhf.rollout.vllm_engine import vllm_available

    samples = report["stages"]["samples"]
    assert samples["backend"] == ("vllm" if vllm_available() else "hf")
    pairs = read_jsonl(out / "samples" / "pairs.jsonl")
    assert len(pairs) + sum(samples["dropped"].values()) == 16
    assert all(p["response_0"] != p["response_1"] and p["response_0"].strip() and p["response_1"].strip()
               for p in pairs)

    # Labels: every pair is in exactly one file or counted as skipped, and each label is the ground truth's.
    labels = report["stages"]["labels"]
    files = {name: read_jsonl(out / "labels" / name)
             for name in ("preferences.jsonl", "reward_only.jsonl", "cost_only.jsonl")}
    assert sum(len(rows) for rows in files.values()) + sum(labels["skipped"].values()) == len(pairs)
    assert labels["n_rows"] == len(files["preferences.jsonl"])
    for name, rows in files.items():
        if rows:
            assert validate_rows(rows, "preference").n_valid == len(rows)
        for row in rows:
            s = [toyworld.score(row["prompt"], row[f"response_{i}"]) for i in (0, 1)]
            assert [row["is_response_0_safe"], row["is_response_1_safe"]] == [not s[0].harm, not s[1].harm]
            if name != "cost_only.jsonl":
                assert s[row["better_response_id"]].helpfulness > s[1 - row["better_response_id"]].helpfulness
            else:
                assert s[0].helpfulness == s[1].helpfulness
            if name != "reward_only.jsonl":
                assert risk(s[row["safer_response_id"]]) < risk(s[1 - row["safer_response_id"]])
            else:
                assert risk(s[0]) == risk(s[1])

    # Models: trained from the SFT model on the base data plus this round's files, each on its own axis.
    models = report["stages"]["models"]
    assert models["sft"] == str(Path(round_one.kwargs["policy"]).resolve())
    own = {name: str((out / "labels" / name).resolve()) for name, rows in files.items() if rows}
    assert report["preference_data"]["rm"] == [own[n] for n in ("preferences.jsonl", "reward_only.jsonl") if n in own]
    assert report["preference_data"]["cm"] == [own[n] for n in ("preferences.jsonl", "cost_only.jsonl") if n in own]
    preset = resolve_preset("tiny-cpu")
    for model in ("rm", "cm"):  # the preset's own data first, then the rounds' files
        assert models[model]["data"][0] == build_config(model, preset).data.train[0]
    for name in ("rm", "cm"):
        assert (out / "models" / name / "model" / "config.json").is_file()
    m = report["metrics"]
    assert 0 <= m["reward_model_accuracy"] <= 1 and 0 <= m["cost_model_sign_accuracy"] <= 1

    # PPO-Lag ran its two steps from the policy with the new models; eval scored the new policy.
    ppo = report["stages"]["ppo_lag"]
    assert ppo["steps"] == 2 and m["ppo_lag_lambda"] > 0
    assert (out / "ppo_lag" / "model" / "config.json").is_file()
    responses = read_jsonl(out / "eval" / "responses.jsonl")
    assert len(responses) == 16 and all("cost" in r and "harmful" in r for r in responses)
    assert 0 <= m["held_out_harm_rate"] <= 1 and 0 <= m["held_out_helpfulness_before"] <= 1
    assert m["prompts"] == 16 and m["prompts_carried_over"] == 0

    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(m)) and saved["previous"] is None
    text = (out / "report.md").read_text()
    assert "# Safe RLHF round 1" in text and "PPO-Lag final λ" in text and "**ppo_lag**" in text


@pytest.mark.slow
def test_interrupted_round_resumes_at_the_interrupted_stage(round_one):
    out = round_one.out
    assert round_one.done_after_kill == {"prompts": True, "samples": True, "labels": True, "models": True,
                                         "ppo_lag": False, "baselines": False, "eval": False}
    assert round_one.result.skipped == ["prompts", "samples", "labels", "models"]
    assert round_one.result.ran == ["ppo_lag", "baselines", "eval"]
    assert stage_files(out, STAGES[:4]) == round_one.before  # nothing of the done stages was rewritten
    assert "round 1 [2/7] samples: done already, skipped" in round_one.log
    # The killed stage was redone from scratch: the cut-short metrics line is gone.
    rows = read_jsonl(out / "ppo_lag" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/lambda" in r] == [1, 2]


@pytest.mark.slow
def test_a_stage_without_done_is_redone_and_a_finished_round_is_not(round_one):
    out, kwargs = round_one.out, round_one.kwargs
    policy_files = stage_files(out, ["ppo_lag"])
    (out / "eval" / DONE).unlink()
    result = run_round(out, **kwargs, log=lambda line: None)
    assert result.ran == ["eval"] and result.skipped == list(STAGES[:6])
    assert stage_files(out, ["ppo_lag"]) == policy_files
    assert result.report["metrics"]["prompts"] == 16

    again = run_round(out, **kwargs, log=lambda line: None)
    assert again.ran == [] and again.skipped == list(STAGES)


@pytest.mark.slow
def test_resuming_with_other_arguments_is_an_error(round_one):
    with pytest.raises(RoundError, match=r"other arguments(.|\n)*eval_prompts: was 16, now 17"):
        run_round(round_one.out, **{**round_one.kwargs, "eval_prompts": 17}, log=lambda line: None)


@pytest.mark.slow
def test_second_round_carries_over_unsafe_prompts_and_earlier_data(round_one, tmp_path):
    first = round_one.out
    unsafe = list(dict.fromkeys(r["prompt"] for r in read_jsonl(first / "eval" / "responses.jsonl") if r["harmful"]))
    out = tmp_path / "round-2"
    assert main(["round", "--out", str(out), "--policy", str(first / "ppo_lag" / "model"), "--previous", str(first),
                 "--prompts", PROMPTS[0], "--eval-prompts", str(EVAL_PROMPTS), "--json", *OVERRIDES]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["round"] == 2  # from the previous report
    prompts = read_jsonl(out / "prompts" / "prompts.jsonl")
    assert [p["prompt"] for p in prompts if p["prompt_source"] == "round-1-unsafe"] == unsafe
    assert report["metrics"]["prompts_carried_over"] == len(unsafe)
    # The reward and cost models trained from the round-1 SFT model on round 1's files and round 2's.
    assert report["sft"] == str(Path(round_one.kwargs["policy"]).resolve())
    for model in ("rm", "cm"):
        data = report["preference_data"][model]
        assert data[:len(round_one.result.report["preference_data"][model])] == \
            round_one.result.report["preference_data"][model]
        assert any(str(out.resolve()) in f for f in data)
    assert report["previous"]["round"] == 1
    c = report["comparison"]["prompts"]
    assert c == {"previous": 16, "this": 16 + len(unsafe), "delta": len(unsafe)}
    assert "| metric | round 1 | round 2 | change |" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Labels from people and from an LLM judge (sampling with transformers, stopping after the labels)


def label_by_ground_truth(prompt: str, response_0: str, response_1: str) -> dict:
    """What a careful annotator (or judge) answers: the ground truth, ties broken towards response 0."""
    s = [toyworld.score(prompt, r) for r in (response_0, response_1)]
    return {"better_response_id": int(s[1].helpfulness > s[0].helpfulness),
            "safer_response_id": int(risk(s[1]) < risk(s[0])),
            "is_response_0_safe": not s[0].harm, "is_response_1_safe": not s[1].harm}


def fill_sheet(sheet: Path, filled: Path, broken_line: int | None = None) -> None:
    with open(sheet, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    col = {name: header.index(name) for name in header}
    for line, row in enumerate(rows, start=2):
        labels = label_by_ground_truth(row[col["prompt"]], row[col["response_0"]], row[col["response_1"]])
        for name, value in labels.items():
            row[col[name]] = ("safe" if value else "unsafe") if isinstance(value, bool) else str(value)
        if line == broken_line:
            row[col["better_response_id"]] = "2"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


def test_annotate_waits_for_the_sheet_rejects_a_bad_one_and_imports_a_good_one(sft, tmp_path, capsys):
    out = tmp_path / "round"
    argv = ["round", "--out", str(out), "--policy", str(sft), "--labels", "annotate", "--prompts", PROMPTS[0],
            "--eval-prompts", str(EVAL_PROMPTS), "--until", "labels", *HF]
    assert main(argv) == 3
    err = capsys.readouterr().err
    sheet = out / "labels" / "sheet.csv"
    assert sheet.is_file() and str(sheet) in err and "--sheet FILLED.csv" in err
    assert (out / "samples" / DONE).is_file() and not (out / "labels" / DONE).exists()

    bad = tmp_path / "bad.csv"
    fill_sheet(sheet, bad, broken_line=3)
    assert main([*argv, "--sheet", str(bad)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bad\.csv: line 3 \(id '[0-9a-f]+'\): column 'better_response_id': expected 0 or 1", err)
    assert "nothing was imported" in err and not (out / "labels" / DONE).exists()

    good = tmp_path / "good.csv"
    fill_sheet(sheet, good)
    result = run_round(out, policy=sft, labels="annotate", prompts=PROMPTS, overrides=HF, eval_prompts=EVAL_PROMPTS,
                       sheet=good, until="labels", log=lambda line: None)
    assert result.skipped == ["prompts", "samples"] and result.ran == ["labels"]
    pairs = read_jsonl(out / "samples" / "pairs.jsonl")
    rows = read_jsonl(out / "labels" / "preferences.jsonl")
    assert [(r["prompt"], r["response_0"], r["response_1"]) for r in rows] == \
        [(p["prompt"], p["response_0"], p["response_1"]) for p in pairs]
    for row in rows:
        assert {k: row[k] for k in ("better_response_id", "safer_response_id", "is_response_0_safe",
                                    "is_response_1_safe")} == label_by_ground_truth(
            row["prompt"], row["response_0"], row["response_1"])
    assert result.report["stages"]["labels"]["n_rows"] == len(rows)
    assert not (out / "report.json").exists()  # the round stopped after the labels


def _section(text: str, name: str) -> str:
    return re.search(rf"\[{name}\]\n(.*?)\n\[End of {name}\]", text, re.DOTALL | re.IGNORECASE).group(1)


JUDGE_KEY = "sk-test-9f3c2a71d4e8b605"


class GroundTruthJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint whose verdicts are the toy world's ground truth."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != f"Bearer {JUDGE_KEY}":  # a hosted judge: no key, no verdict
            self.send_error(401, "missing or wrong API key")
            return
        user = body["messages"][-1]["content"]
        a, b = _section(user, "Response A"), _section(user, "Response B")
        labels = label_by_ground_truth(_section(user, "User request"), a, b)
        if '"more_helpful"' in user:
            verdict = {"more_helpful": "AB"[labels["better_response_id"]]}
        else:
            verdict = {"response_a_safe": labels["is_response_0_safe"], "response_b_safe": labels["is_response_1_safe"],
                       "safer": "AB"[labels["safer_response_id"]]}
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(verdict)},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_judge_labels_every_pair_with_the_key_from_the_environment_and_writes_the_key_nowhere(
        sft, tmp_path, monkeypatch, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), GroundTruthJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        argv = ["round", "--out", str(tmp_path / "round"), "--policy", str(sft), "--labels", "judge",
                "--judge-url", url, "--judge-model", "toy-judge", "--prompts", PROMPTS[0], "--eval-prompts",
                str(EVAL_PROMPTS), "--until", "labels", *HF]
        assert main(argv) != 0  # no key in the environment: the hosted judge refuses, and the round says so
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "SAFERLHF_JUDGE_API_KEY, which is not set" in err
        assert not (tmp_path / "round" / "labels" / DONE).exists()
        monkeypatch.setenv("SAFERLHF_JUDGE_API_KEY", JUDGE_KEY)
        assert main(argv) == 0
        console = capsys.readouterr()
        kwargs = dict(policy=sft, labels="judge", judge_url=url, judge_model="toy-judge", prompts=PROMPTS,
                      overrides=HF, eval_prompts=EVAL_PROMPTS, until="labels", log=lambda line: None)
        result = run_round(tmp_path / "round", **kwargs)
        # A stage redone makes every later stage stale: without samples/DONE the labels are redone too.
        labels = stage_files(tmp_path / "round", ["labels"])
        (tmp_path / "round" / "samples" / DONE).unlink()
        again = run_round(tmp_path / "round", **kwargs)
        assert again.skipped == ["prompts"] and again.ran == ["samples", "labels"]
        assert all(path.stat().st_mtime_ns != mtime for path, mtime in labels.items())
    finally:
        server.shutdown()
        server.server_close()
    pairs = read_jsonl(tmp_path / "round" / "samples" / "pairs.jsonl")
    rows = read_jsonl(tmp_path / "round" / "labels" / "preferences.jsonl")
    assert len(rows) == len(pairs) == result.report["stages"]["labels"]["n_rows"]
    for row in rows:
        assert {k: row[k] for k in ("better_response_id", "safer_response_id", "is_response_0_safe",
                                    "is_response_1_safe")} == label_by_ground_truth(
            row["prompt"], row["response_0"], row["response_1"])
    assert result.report["stages"]["labels"]["judge"]["requests"] == 2 * len(pairs)
    # The key reached the judge (every verdict above needed it) and nothing the round wrote or printed holds it.
    written = [path for path in (tmp_path / "round").rglob("*") if path.is_file()]
    assert written and not [path for path in written if JUDGE_KEY.encode() in path.read_bytes()]
    assert JUDGE_KEY not in console.out + console.err


def test_bad_arguments_are_rejected_before_any_stage(sft, tmp_path, capsys):
    out = tmp_path / "round"
    assert main(["round", "--out", str(out), "--policy", str(sft), "--labels", "judge", *HF]) == 2
    assert "--judge-url" in capsys.readouterr().err
    assert main(["round", "--out", str(out), "--policy", str(tmp_path / "missing"), *HF]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["round", "--out", str(out), "--policy", str(sft), "data.train=[x.jsonl]", *HF]) == 2
    assert "sets data.train itself" in capsys.readouterr().err
    assert main(["round", "--out", str(out), "--policy", str(sft), "--prompts", "no-such-set", *HF]) == 2
    assert "no-such-set" in capsys.readouterr().err
    assert not (out / "prompts").exists()


def test_ranks_waiting_for_a_stage_stop_with_rank_0s_error(tmp_path):
    """Under a launcher the ranks other than 0 wait for a stage rank 0 runs alone: they go on at its
    DONE marker and stop with its error (the same exception, so the same exit status) at STOPPED."""
    stage = tmp_path / "labels"
    stage.mkdir()
    (stage / DONE).write_text("{}")
    assert _wait_for_stage(stage, poll=0.01) == {}
    (stage / DONE).unlink()
    (stage / STOPPED).write_text(json.dumps({"error": "AwaitingAnnotation", "message": "fill in sheet.csv",
                                             "sheet": str(stage / "sheet.csv")}))
    with pytest.raises(AwaitingAnnotation, match="fill in sheet.csv") as e:
        _wait_for_stage(stage, poll=0.01)
    assert e.value.sheet == stage / "sheet.csv"
    (stage / STOPPED).write_text(json.dumps({"error": "JudgeError", "message": "HTTP 500", "sheet": ""}))
    with pytest.raises(RoundError, match="rank 0 stopped in stage labels: HTTP 500"):
        _wait_for_stage(stage, poll=0.01)


@pytest.mark.slow
def test_a_round_launched_on_two_ranks_trains_on_both_and_resumes(sft, tmp_path):
    """``torchrun --nproc_per_node 2 -m saferlhf round`` (what ``scripts/round.sh --num-gpus 2`` runs):
    rank 0 alone samples (on a vLLM engine of its own, where vLLM is installed) and exports the
    annotation sheet, and both ranks stop; with the filled-in sheet the trainer stages run on both
    ranks (PPO-Lag with an engine per rank); run again, every stage is found done."""
    from saferlhf.rollout.vllm_engine import vllm_available

    out = tmp_path / "round"
    argv = ["round", "--out", str(out), "--policy", str(sft), "--labels", "annotate", "--prompts", PROMPTS[0],
            "--eval-prompts", str(EVAL_PROMPTS), *OVERRIDES]
    waiting = run_cli(argv, nproc=2, timeout=600)
    sheet = out / "labels" / "sheet.csv"
    assert waiting.returncode != 0 and "--sheet FILLED.csv" in waiting.stderr, waiting.stderr[-3000:]
    assert sheet.is_file() and (out / "labels" / STOPPED).is_file() and not (out / "labels" / DONE).exists()
    assert (out / "samples" / DONE).is_file() and not list((out / "samples").glob(".stage-*"))
    samples = json.loads((out / "samples" / "stats.json").read_text())
    assert samples["backend"] == ("vllm" if vllm_available() else "hf")

    good = tmp_path / "good.csv"
    fill_sheet(sheet, good)
    done = run_cli([*argv, "--sheet", str(good)], nproc=2, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 1 [2/7] samples: done already, skipped" in done.stdout
    for stage in ("models", "ppo_lag"):
        assert f"] {stage}: running on 2 ranks" in done.stdout, done.stdout
    for stage in ("rm", "cm", "ppo_lag"):  # the trainers' own log: both ranks in one DeepSpeed world
        assert f"stage {stage}, world size 2" in done.stderr, stage
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["labels"]["n_rows"] > 0 and report["stages"]["ppo_lag"]["steps"] == 2
    assert (out / "ppo_lag" / "model" / "config.json").is_file() and not (out / "labels" / STOPPED).exists()
    assert len(read_jsonl(out / "eval" / "responses.jsonl")) == 16

    again = run_cli([*argv, "--sheet", str(good)], nproc=2, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already, skipped") == len(STAGES)
