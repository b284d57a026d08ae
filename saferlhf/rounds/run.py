"""`run_round`: the stages in order, each skipped when done, resumable; arguments checked before any stage."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from saferlhf.config import build_config, parse_overrides, resolve_preset
from saferlhf.rounds.common import (
    ANNOTATION_FILES,
    ARGUMENTS_FILE,
    BASELINES,
    DONE,
    EVAL_PROMPTS,
    LABEL_SOURCES,
    PPO_PROMPTS,
    ROUND_KEYS,
    STAGES,
    TRAINER_STAGES,
    AwaitingAnnotation,  # noqa: F401  (raised by the labels stage through here)
    RoundArgs,
    RoundError,
    RoundResult,
    _clear,
    _load_report,
    _Round,
    _write_json,
)
from saferlhf.rounds.ranks import _quiet, _Ranks, _run_stage, _wait_for_stage
from saferlhf.rounds.report import build_report, format_report

# ---------------------------------------------------------------------------------------------
# The round


def _resolve_args(
    *, policy: str | Path, round_index: int | None, sft: str | Path | None, prompts: Sequence[str],
    previous_data: Sequence[str | Path], labels: str, judge_url: str | None, judge_model: str | None, preset: str,
    overrides: Sequence[str], previous_report: str | Path | None, eval_prompts: int, ppo_prompts: str,
    reward_model: str | Path | None = None, cost_model: str | Path | None = None, baselines: Sequence[str] = (),
) -> tuple[RoundArgs, Path, dict | None, Path | None]:
    """Check every argument that can be checked before any stage runs."""
    from saferlhf.config import ConfigError
    from saferlhf.data.registry import parse_spec
    from saferlhf.data.schema import DataError

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise RoundError(f"baselines must be among {', '.join(BASELINES)}, got {unknown}")
    if (reward_model is None) != (cost_model is None):
        raise RoundError("give both the reward and the cost model, or neither (then the round trains both)")
    for path, what in ((reward_model, "reward model"), (cost_model, "cost model")):
        if path is not None and not (Path(path) / "score_model.json").is_file():
            raise RoundError(f"{what} {path}: not a score model directory (no score_model.json)")
    if labels not in LABEL_SOURCES:
        raise RoundError(f"labels must be one of {', '.join(LABEL_SOURCES)}, got {labels!r}")
    if labels == "judge" and not (judge_url and judge_model):
        raise RoundError("labels=judge needs the judge's URL and model name (--judge-url, --judge-model)")
    if ppo_prompts not in PPO_PROMPTS:
        raise RoundError(f"ppo_prompts must be one of {', '.join(PPO_PROMPTS)}, got {ppo_prompts!r}")
    if eval_prompts < 1:
        raise RoundError(f"eval_prompts must be >= 1, got {eval_prompts}")
    try:
        preset_path = resolve_preset(preset)
        set_keys = parse_overrides(list(overrides))
    except ConfigError as e:
        raise RoundError(str(e)) from None
    for key in ROUND_KEYS:
        section, name = key.split(".")
        if name in set_keys.get(section, {}):
            raise RoundError(f"override {key}=... : saferlhf round sets {key} itself for each stage "
                             "(use --out, --policy, --sft, --prompts and --data)")
    previous, previous_dir = _load_report(previous_report) if previous_report is not None else (None, None)
    if round_index is None:
        round_index = int(previous.get("round", 0)) + 1 if previous else 1
    if round_index < 1:
        raise RoundError(f"the round number must be >= 1, got {round_index}")
    if sft is None:
        sft = previous.get("sft") if previous and previous.get("sft") else policy
    for path, what in ((policy, "policy"), (sft, "SFT model")):
        if not (Path(path) / "config.json").is_file():
            raise RoundError(f"{what} {path}: not a model directory (no config.json)")
    for spec in [*prompts, *map(str, previous_data)]:
        try:
            parse_spec(spec)
        except DataError as e:
            raise RoundError(str(e)) from None
    data = [str(Path(d).resolve()) if Path(d).is_file() else str(d) for d in previous_data]
    args = RoundArgs(
        round=round_index, policy=str(Path(policy).resolve()), sft=str(Path(sft).resolve()), prompts=list(prompts),
        previous_data=data, labels=labels, judge_url=judge_url, judge_model=judge_model, preset=str(preset_path),
        overrides=list(overrides), previous_report=str(Path(previous_report).resolve()) if previous_report else None,
        eval_prompts=eval_prompts, ppo_prompts=ppo_prompts,
        reward_model=str(Path(reward_model).resolve()) if reward_model else None,
        cost_model=str(Path(cost_model).resolve()) if cost_model else None, baselines=list(baselines))
    try:  # every stage's config resolves with these overrides
        for stage in ("rm", "cm", "ppo_lag", *baselines):
            build_config(stage, preset_path, args.overrides)
    except ConfigError as e:
        raise RoundError(str(e)) from None
    return args, preset_path, previous, previous_dir


def _check_same_arguments(round_dir: Path, args: RoundArgs) -> None:
    path = round_dir / ARGUMENTS_FILE
    new = asdict(args)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{k}: was {old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v]
        if changed:
            raise RoundError(f"{round_dir} holds a round started with other arguments; resume it with the same "
                             "ones, or use a new output directory:\n  " + "\n  ".join(changed))
    else:
        round_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, new)


def run_round(
    round_dir: str | Path, *, policy: str | Path, round_index: int | None = None, sft: str | Path | None = None,
    prompts: Sequence[str] = (), previous_data: Sequence[str | Path] = (), labels: str = "toy",
    judge_url: str | None = None, judge_model: str | None = None, sheet: str | Path | None = None,
    preset: str = "tiny-cpu", overrides: Sequence[str] = (), previous_report: str | Path | None = None,
    eval_prompts: int = EVAL_PROMPTS, ppo_prompts: str = "round", until: str | None = None,
    log: Callable[[str], None] = print, reward_model: str | Path | None = None, cost_model: str | Path | None = None,
    baselines: Sequence[str] = (),
) -> RoundResult:
    """Run (or resume) one Safe RLHF round in ``round_dir``; see the module docstring.

    ``policy`` is the current policy (round 1: the SFT model); ``round_index`` defaults to the previous
    report's round + 1, else 1. ``sft`` is the model the reward and cost
    models start from (default: the previous report's, else ``policy``). ``prompts`` are dataset
    specs or files; ``previous_data`` earlier preference files (or specs) beyond those the previous
    report lists. ``overrides`` (``key=value``) apply to every trainer stage. ``until`` stops after
    that stage. ``reward_model`` and ``cost_model`` (both or neither) are models the round uses instead of
    training its own; ``labels="none"`` collects no new preference data (a first round on the preset's);
    ``baselines`` (``ppo``, ``ppo_rs``) are trained beside PPO-Lag from the same policy for comparison.
    Raises `RoundError` for bad arguments or inputs, `AwaitingAnnotation` when the labels stage waits for a
    filled-in sheet, `saferlhf.annotate.AnnotationError` for a bad sheet.
    """
    out = Path(round_dir)
    if until is not None and until not in STAGES:
        raise RoundError(f"until must be one of {', '.join(STAGES)}, got {until!r}")
    if sheet is not None and not Path(sheet).is_file():
        raise RoundError(f"--sheet {sheet}: no such file")
    args, preset_path, previous, previous_dir = _resolve_args(
        policy=policy, round_index=round_index, sft=sft, prompts=prompts, previous_data=previous_data,
        labels=labels, judge_url=judge_url, judge_model=judge_model, preset=preset, overrides=overrides,
        previous_report=previous_report, eval_prompts=eval_prompts, ppo_prompts=ppo_prompts,
        reward_model=reward_model, cost_model=cost_model, baselines=baselines)
    ranks = _Ranks.start()
    if ranks.main:
        _check_same_arguments(out, args)
    else:
        log = _quiet
    ranks.barrier()
    rnd = _Round(out, args, preset_path, Path(sheet).resolve() if sheet else None, log, previous, previous_dir,
                 ranks.main)
    result = RoundResult(out, {})
    stats: dict[str, dict] = {}
    redo = False  # once a stage runs, every later stage is stale and runs too
    for i, name in enumerate(STAGES, start=1):
        stage_dir = out / name
        tag = f"{rnd.name} [{i}/{len(STAGES)}] {name}"
        # Every rank decides from the same files, read before rank 0 may clear them.
        done = (stage_dir / DONE).is_file()
        ranks.barrier()
        if not redo and done:
            stats[name] = json.loads((stage_dir / "stats.json").read_text(encoding="utf-8"))
            result.skipped.append(name)
            log(f"{tag}: done already, skipped")
        else:
            redo = True
            log(f"{tag}: running" + (f" on {ranks.world_size} ranks" if ranks.world_size > 1 and
                                     name in TRAINER_STAGES else ""))
            if ranks.main:
                _clear(stage_dir, keep=ANNOTATION_FILES if name == "labels" else ())
            ranks.barrier()
            if ranks.main or name in TRAINER_STAGES:
                stats[name] = _run_stage(rnd, name, stage_dir, ranks)
            else:
                stats[name] = _wait_for_stage(stage_dir)
            ranks.barrier()
            if not ranks.main:  # rank 0's numbers, for every rank's report
                stats[name] = json.loads((stage_dir / "stats.json").read_text(encoding="utf-8"))
            result.ran.append(name)
            log(f"{tag}: done in {stats[name]['seconds']:.0f} s: {stats[name]['summary']}")
        if name == until:
            break
    result.report = build_report(rnd, stats)
    if "eval" in stats and ranks.main:
        _write_json(out / "report.json", result.report)
        (out / "report.md").write_text(format_report(result.report), encoding="utf-8")
        log(f"{rnd.name}: report in {out / 'report.md'}")
    ranks.barrier()
    return result

