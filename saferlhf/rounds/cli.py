"""``saferlhf round``: the command line of `run_round`."""

from __future__ import annotations

import json
from pathlib import Path

from saferlhf.config import build_config, parse_overrides, resolve_preset
from saferlhf.rounds.common import EVAL_PROMPTS, LABEL_SOURCES, PPO_PROMPTS, STAGES, AwaitingAnnotation, RoundError
from saferlhf.rounds.run import run_round

# ---------------------------------------------------------------------------------------------
# Command line

EXIT_BAD_INPUT = 2
EXIT_AWAITING_ANNOTATION = 3


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="saferlhf round",
        description="One Safe RLHF round: red-team prompts → two responses each → helpfulness/harmlessness labels "
                    "→ reward and cost models → PPO-Lag → evaluation. Resumable: run the same command again and "
                    "it goes on at the first unfinished stage.",
        epilog=f"stages: {', '.join(STAGES)}; each writes DIR/<stage>/ and DIR/<stage>/DONE. Exit status: 0 done, "
               f"{EXIT_BAD_INPUT} bad arguments or inputs (a bad sheet included), {EXIT_AWAITING_ANNOTATION} waiting "
               "for a filled-in annotation sheet, 1 any other failure.")
    parser.add_argument("--out", metavar="DIR",
                        help="round directory (default: a run.out_dir=DIR override, else runs/round)")
    parser.add_argument("--policy", metavar="MODEL_DIR",
                        help="the current policy (round 1: the SFT model); default: a model.name_or_path=DIR override")
    parser.add_argument("--round", type=int, default=None, dest="round_index", metavar="K",
                        help="round number (default: the previous report's + 1, else 1)")
    parser.add_argument("--sft", metavar="MODEL_DIR",
                        help="the SFT model the reward and cost models start from (default: the previous report's, "
                             "else --policy)")
    parser.add_argument("--prompts", action="append", default=[], metavar="SPEC",
                        help="red-team prompt set, NAME[:PROPORTION[:PATH]] or a file; repeatable "
                             "(default: the preset's PPO prompts)")
    parser.add_argument("--previous", metavar="REPORT", help="the previous round's report.json (or its directory): "
                        "its unsafe prompts are carried over and its preference files reused")
    parser.add_argument("--data", action="append", default=[], metavar="PREV.jsonl",
                        help="earlier preference data (a file or a dataset spec); repeatable")
    parser.add_argument("--labels", default="toy", choices=LABEL_SOURCES,
                        help="label source (default: toy; none: no new preference data this round)")
    parser.add_argument("--judge-url", help="labels=judge: the judge's OpenAI-compatible API root (…/v1)")
    parser.add_argument("--judge-model", help="labels=judge: the judge's model name (an API key, if the judge needs "
                                              "one, is read from the environment variable SAFERLHF_JUDGE_API_KEY)")
    parser.add_argument("--sheet", metavar="FILLED.csv", help="labels=annotate: the filled-in annotation sheet")
    parser.add_argument("--config", default="tiny-cpu", metavar="PRESET",
                        help="preset of every stage (default: tiny-cpu)")
    parser.add_argument("--eval-prompts", type=int, default=EVAL_PROMPTS, metavar="N",
                        help=f"held-out toy prompts of the ground-truth evaluation (default: {EVAL_PROMPTS})")
    parser.add_argument("--ppo-prompts", default="round", choices=PPO_PROMPTS,
                        help="PPO-Lag prompts: the round's red-team set or the preset's (default: round)")
    parser.add_argument("--reward-model", metavar="DIR", help="use this reward model (with --cost-model) instead of "
                                                              "training one in the models stage")
    parser.add_argument("--cost-model", metavar="DIR", help="use this cost model (with --reward-model)")
    parser.add_argument("--baselines", default="", metavar="LIST",
                        help="comma-separated baselines trained beside PPO-Lag from the same policy: ppo, ppo_rs")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the report's metrics")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of every stage, e.g. run.max_steps=20")
    return parser


def _take_override(overrides: list[str], key: str) -> tuple[list[str], str | None]:
    """Remove ``key=VALUE`` from the overrides (the stage launchers pass the run directory and model so)."""
    value, rest = None, []
    for item in overrides:
        if item.split("=", 1)[0].strip() == key:
            value = parse_overrides([item])[key.split(".")[0]][key.split(".")[1]]
        else:
            rest.append(item)
    return rest, None if value is None else str(value)


def main(argv: list[str]) -> int:
    import sys

    from saferlhf.config import ConfigError
    from saferlhf.data.schema import DataError
    from saferlhf.evaluate.evaluate import EvalError
    from saferlhf.judge import JudgeError

    args = _parser().parse_args(argv)
    err = lambda message: print(f"saferlhf round: {message}", file=sys.stderr)  # noqa: E731
    try:
        overrides, out_dir = _take_override(list(args.overrides), "run.out_dir")
        overrides, model = _take_override(overrides, "model.name_or_path")
        for flag, value, key in (("--out", args.out, out_dir), ("--policy", args.policy, model)):
            if value is not None and key is not None and Path(value).resolve() != Path(key).resolve():
                raise RoundError(f"{flag} {value} and the override {key} disagree; give one")
        out = args.out or out_dir or build_config("round", resolve_preset(args.config)).run.out_dir or "runs/round"
        policy = args.policy or model
        if policy is None:
            raise RoundError("--policy MODEL_DIR is required (the current policy; round 1: the SFT model)")
        result = run_round(
            out, policy=policy, round_index=args.round_index, sft=args.sft, prompts=args.prompts,
            previous_data=args.data, labels=args.labels, judge_url=args.judge_url, judge_model=args.judge_model,
            sheet=args.sheet, preset=args.config, overrides=overrides, previous_report=args.previous,
            eval_prompts=args.eval_prompts, ppo_prompts=args.ppo_prompts, until=args.until,
            log=lambda line: print(line, flush=True), reward_model=args.reward_model, cost_model=args.cost_model,
            baselines=[b.strip() for b in args.baselines.split(",") if b.strip()])
    except AwaitingAnnotation as e:
        err(str(e))
        return EXIT_AWAITING_ANNOTATION
    except (RoundError, ConfigError, DataError, EvalError) as e:  # DataError covers AnnotationError
        err(str(e))
        return EXIT_BAD_INPUT
    except JudgeError as e:
        err(f"the judge failed: {e}\n(run the same command again to redo the labels stage)")
        return 1
    if args.json and result.report.get("metrics"):
        print(json.dumps(result.report["metrics"]))
    return 0
