"""The round's vocabulary: its stages and arguments, errors, the stage-directory files and the context
every stage receives."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from saferlhf.config import build_config

STAGES = ("prompts", "samples", "labels", "models", "ppo_lag", "baselines", "eval")
LABEL_SOURCES = ("toy", "judge", "annotate", "none")
BASELINES = ("ppo", "ppo_rs")  # the baselines stage's trainers: PPO (reward only), reward shaping
PPO_PROMPTS = ("round", "preset")
DONE = "DONE"
STOPPED = "STOPPED"  # written by rank 0 when a stage it runs alone fails: the waiting ranks stop too
TRAINER_STAGES = ("models", "ppo_lag", "baselines")  # every rank takes part; the others run on rank 0 alone
ARGUMENTS_FILE = "round.json"
EVAL_PROMPTS = 256  # held-out toy prompts of the ground-truth evaluation (as `saferlhf demo`)
# Config keys the round sets per stage; an override of one would point every stage at the same place.
ROUND_KEYS = ("run.out_dir", "model.name_or_path", "data.train", "ppo.reward_model", "ppo.cost_model")
# Files of the annotation export that survive a redo of the labels stage (annotators may be filling them).
ANNOTATION_FILES = ("annotation.jsonl", "sheet.csv")


class RoundError(ValueError):
    """Arguments or inputs a round cannot run with; the message says what to change."""


class AwaitingAnnotation(Exception):
    """The labels stage exported a sheet for people to fill in; run the round again with it."""

    def __init__(self, message: str, sheet: Path):
        super().__init__(message)
        self.sheet = sheet


@dataclass
class RoundArgs:
    """The arguments that define a round (saved as ``round.json``; a resumed run must repeat them)."""

    round: int
    policy: str
    sft: str
    prompts: list[str]
    previous_data: list[str]
    labels: str
    judge_url: str | None
    judge_model: str | None
    preset: str
    overrides: list[str]
    previous_report: str | None
    eval_prompts: int
    ppo_prompts: str
    reward_model: str | None = None  # given models: the models stage trains none
    cost_model: str | None = None
    baselines: list[str] = field(default_factory=list)  # of BASELINES, trained beside PPO-Lag


@dataclass
class RoundResult:
    round_dir: Path
    report: dict
    ran: list[str] = field(default_factory=list)  # stages run by this call
    skipped: list[str] = field(default_factory=list)  # stages found done


# ---------------------------------------------------------------------------------------------
# Small file helpers


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _mark_done(stage_dir: Path, seconds: float) -> None:
    """Write ``DONE`` last and atomically: a stage is done exactly when the marker exists whole."""
    tmp = stage_dir / f".{DONE}.tmp"
    tmp.write_text(json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 3)}) + "\n")
    os.replace(tmp, stage_dir / DONE)


def _clear(stage_dir: Path, keep: Sequence[str] = ()) -> None:
    """Empty a stage directory for a redo from scratch, keeping the named files."""
    if stage_dir.exists():
        for entry in stage_dir.iterdir():
            if entry.name in keep:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)


def _file_spec(label: str, path: Path, proportion: str = "1") -> str:
    """A dataset spec for a local file; ``NAME:PROPORTION:PATH`` keeps any ':' in the path intact."""
    return f"{label}:{proportion}:{path}"


def _load_report(path: str | Path) -> tuple[dict, Path]:
    """A round's ``report.json`` (given as the file or its round directory) and that directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise RoundError(f"previous report {path}: no such file (expected a round's report.json or its directory)")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RoundError(f"previous report {p}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or "files" not in report:
        raise RoundError(f"previous report {p}: not a report.json of `saferlhf round`")
    return report, p.parent


# ---------------------------------------------------------------------------------------------
# The round's context: arguments, configs, logging


@dataclass
class _Round:
    dir: Path
    args: RoundArgs
    preset_path: Path
    sheet: Path | None
    log: Callable[[str], None]
    previous: dict | None = None  # the previous round's report
    previous_dir: Path | None = None
    main: bool = True  # rank 0 (or the only process): the one that writes the stage's files

    def config(self, stage: str, out_dir: Path, model: str, *round_keys: str):
        """A stage's config: preset → the user's overrides → the keys the round sets (which win)."""
        keys = [f"run.out_dir={out_dir}", f"model.name_or_path={model}", *round_keys]
        return build_config(stage, self.preset_path, [*self.args.overrides, *keys])

    @property
    def name(self) -> str:
        return f"round {self.args.round}"

    def path(self, relative: str) -> Path:
        return self.dir / relative

    def model(self, kind: str) -> Path:
        """The round's reward (``rm``) or cost (``cm``) model: the given one, else the models stage's."""
        given = self.args.reward_model if kind == "rm" else self.args.cost_model
        return Path(given) if given else self.path(f"models/{kind}/model")


def _data_list(specs: Sequence[str]) -> str:
    """A ``data.train=[...]`` override value (JSON is YAML)."""
    return json.dumps(list(specs))

