"""One Safe RLHF round, resumable stage by stage: ``saferlhf round``.

The paper's results come from three rounds. Each round red-teams the current policy, collects
decoupled helpfulness and harmlessness labels on its answers, retrains the reward and cost models on
all the preference data so far (from the SFT model), and runs PPO-Lagrangian again from the current
policy. `run_round` runs one round as six stages, each writing into ``DIR/<stage>/``:

1. ``prompts``  — the red-team prompt set: the given prompt sets (dataset specs or files; default:
   the preset's PPO prompts), plus every prompt on which the previous round's policy was judged
   unsafe (its report's ``eval/responses.jsonl``: toy-world ground truth where there is one, else
   cost > 0). ``prompts.jsonl``; each row's ``prompt_source`` says where it came from.
2. ``samples``  — two sampled responses per prompt from the current policy (vLLM where it imports,
   else transformers ``generate``; ``rollout.backend`` chooses as in PPO). A pair whose responses are
   identical or empty is sampled once more; pairs still unusable are dropped and counted.
   ``pairs.jsonl``.
3. ``labels``   — PKU-SafeRLHF preference rows for the pairs, ``preferences.jsonl``, from one source:
   ``toy`` (the toy world's ground truth, see `toy_label`), ``judge`` (an LLM judge,
   `saferlhf.judge.JudgeClient`) or ``annotate`` (people: the stage exports ``annotation.jsonl`` +
   ``sheet.csv`` and stops with `AwaitingAnnotation`; run the same command again with ``sheet=`` the
   filled-in sheet). The toy world's pairs that differ on one axis only keep that axis's label, in
   ``reward_only.jsonl`` (equal risk) or ``cost_only.jsonl`` (equal helpfulness); pairs equal on both
   are skipped and counted.
4. ``models``   — reward model (``models/rm``) and cost model (``models/cm``) retrained from the SFT
   model on the preset's base preference data + every earlier round's preference files + this
   round's (``reward_only.jsonl`` trains only the reward model, ``cost_only.jsonl`` only the cost model).
5. ``ppo_lag``  — PPO-Lagrangian from the current policy with the new reward and cost models, on the
   round's prompts (``ppo_prompts="preset"``: the preset's). The stage directory is the PPO run
   directory; the new policy is ``ppo_lag/model``.
6. ``eval``     — the new policy answers the round's prompts and is scored by the new reward and cost
   models (`saferlhf.evaluate.evaluate.evaluate`, ``eval/``); on toy-world prompts the ground truth
   of the policy before and after the round on held-out toy prompts (`pipeline.evaluate_policy`).

Under a launcher (torchrun or the deepspeed launcher, ``WORLD_SIZE`` > 1: ``scripts/round.sh
--num-gpus 8``, also over several nodes) every rank runs the round: the trainer stages (``models``,
``ppo_lag``) train on all ranks with DeepSpeed, the other stages run on rank 0 (in a child process,
a world of one, so that a vLLM engine does not join the launcher's group) while the other ranks
wait for the stage's ``DONE`` marker (or the ``STOPPED`` marker rank 0 writes when the stage fails or
waits for annotators, with the same error on every rank). The round directory must be on a filesystem
that every node sees (the trainer stages read the models the earlier stages wrote).

Every stage ends by writing ``stats.json`` and then the marker ``DONE`` (atomically, last). A run
skips the stages that are done and redoes the first one that is not from scratch (its directory is
emptied; the annotation export is kept), and every stage after it. The arguments of the first run
are kept in ``DIR/round.json``; running again with different ones is an error (``sheet`` and
``until`` may differ). At the end ``DIR/report.json`` and ``DIR/report.md`` hold the numbers of
every stage and, given the previous round's report, the round-over-round comparison.
``report.json`` lists every preference file used so far per model (``preference_data``: ``rm``,
``cm``; absolute paths), so the next round, given this report, trains on them too. A round run by
other means (``saferlhf demo``'s first round) is recorded for the next one with `write_round_record`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saferlhf.config import build_config, parse_overrides, resolve_preset

STAGES = ("prompts", "samples", "labels", "models", "ppo_lag", "eval")
LABEL_SOURCES = ("toy", "judge", "annotate")
PPO_PROMPTS = ("round", "preset")
DONE = "DONE"
STOPPED = "STOPPED"  # written by rank 0 when a stage it runs alone fails: the waiting ranks stop too
TRAINER_STAGES = ("models", "ppo_lag")  # every rank takes part; the other stages run on rank 0 alone
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


def _data_list(specs: Sequence[str]) -> str:
    """A ``data.train=[...]`` override value (JSON is YAML)."""
    return json.dumps(list(specs))


# ---------------------------------------------------------------------------------------------
# Stage 1: prompts


def _unsafe_prompts(report: dict, report_dir: Path) -> tuple[list[str], dict]:
    """Unique prompts on which the reported policy gave an unsafe answer, in order of appearance.

    Unsafe: the toy world's ground truth (``harmful``) where the record has it, else cost > 0 (the
    cost model's sign convention).
    """
    responses = report["files"].get("responses")
    path = report_dir / responses if responses else None
    if path is None or not path.is_file():
        raise RoundError(f"previous report in {report_dir}: its responses file ({responses}) is missing; "
                         "the previous round must have finished its eval stage")
    unsafe: dict[str, None] = {}
    judged_by = Counter()
    records = _read_jsonl(path)
    for r in records:
        if r.get("harmful") is not None:
            judged_by["ground_truth"] += 1
            bad = bool(r["harmful"])
        elif r.get("cost") is not None:
            judged_by["cost_model"] += 1
            bad = r["cost"] > 0
        else:
            judged_by["unjudged"] += 1
            continue
        if bad:
            unsafe.setdefault(r["prompt"], None)
    return list(unsafe), {"responses": len(records), "judged_by": dict(judged_by)}


def stage_prompts(rnd: _Round, out: Path) -> dict:
    from saferlhf.data.registry import mix_datasets
    from saferlhf.data.schema import validate_rows

    ppo_cfg = rnd.config("ppo_lag", out, rnd.args.policy)
    seed = ppo_cfg.run.seed + rnd.args.round
    specs = rnd.args.prompts or list(ppo_cfg.data.train)
    rows, per_spec = [], {}
    for spec in specs:
        taken = mix_datasets([spec], "prompt", seed=seed).rows
        rows += [{"prompt": r["prompt"], "prompt_source": spec} for r in taken]
        per_spec[spec] = len(taken)
    carried, carry_stats = [], {}
    if rnd.previous is not None:
        carried, carry_stats = _unsafe_prompts(rnd.previous, rnd.previous_dir)
        source = f"round-{rnd.previous.get('round', rnd.args.round - 1)}-unsafe"
        rows += [{"prompt": p, "prompt_source": source} for p in carried]
    if not rows:
        raise RoundError("no prompts: give --prompts, or a previous report with unsafe prompts")
    report = validate_rows(rows, "prompt", source="red-team prompts")
    report.raise_if_errors()
    _write_jsonl(out / "prompts.jsonl", report.rows)
    toy = _is_toy([r["prompt"] for r in rows])
    return {"n_prompts": len(rows), "n_unique": len({r["prompt"] for r in rows}), "given": per_spec,
            "carried_over": len(carried), "previous_responses": carry_stats, "toy_world": toy,
            "summary": f"{len(rows)} prompts ({len(rows) - len(carried)} given, {len(carried)} unsafe ones "
                       f"carried over from the previous round)"}


def _is_toy(prompts: Sequence[str]) -> bool:
    from saferlhf.evaluate.evaluate import is_toy_prompt_set

    return is_toy_prompt_set(prompts)


# ---------------------------------------------------------------------------------------------
# Stage 2: samples


class _Sampler:
    """Two responses per prompt from the policy: a vLLM engine, or transformers ``generate``."""

    def __init__(self, cfg, policy: str, log_path: Path | None = None):
        import torch

        from saferlhf.models.hf import load_causal_lm, load_tokenizer
        from saferlhf.rollout import resolve_backend

        self.cfg = cfg
        self.tokenizer = load_tokenizer(policy, padding_side="left")
        self.backend = resolve_backend(cfg.rollout.backend)
        self.model = None
        if self.backend == "vllm":
            from saferlhf.rollout.vllm_engine import VLLMGenerator

            # Generation only (no weight spec): the engine never takes pushed weights.
            self.generator = VLLMGenerator(
                policy, self.tokenizer, None, dtype=cfg.model.dtype,
                max_model_len=cfg.model.max_length + cfg.rollout.max_new_tokens, kv_cache_mb=cfg.rollout.kv_cache_mb,
                seed=cfg.run.seed, log_path=None if cfg.run.verbose else log_path)
            self.batch_size = 256
        else:
            from saferlhf.rollout.hf import HFGenerator

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = load_causal_lm(policy, dtype=cfg.model.dtype, tokenizer=self.tokenizer).to(device).eval()
            self.generator = HFGenerator(self.model, self.tokenizer, synced_gpus=False)
            self.batch_size = 32

    def pairs(self, prompts: list[str], seed: int, desc: str) -> list[tuple[str, str]]:
        from saferlhf.evaluate.generation import generate_responses
        from saferlhf.rollout.base import SamplingParams
        from saferlhf.trainers.common import progress

        cfg = self.cfg
        out: list[tuple[str, str]] = []
        starts = range(0, len(prompts), self.batch_size)
        for b, start in enumerate(progress(starts, desc=desc, enabled=cfg.run.progress)):
            # A seed per batch: batches do not repeat each other's random draws.
            sampling = SamplingParams(n=2, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                      max_new_tokens=cfg.rollout.max_new_tokens, seed=seed + b)
            texts = generate_responses(self.model, self.tokenizer, prompts[start:start + self.batch_size], sampling,
                                       batch_size=self.batch_size, max_length=cfg.model.max_length,
                                       chat_template=cfg.model.chat_template, generator=self.generator)
            out += list(zip(texts[0::2], texts[1::2]))  # rows i·n + j: sample j of prompt i
        return out

    def close(self) -> None:
        if self.backend == "vllm":
            self.generator.shutdown()  # one engine per process: PPO starts its own later


def _unusable(pair: tuple[str, str]) -> str | None:
    if not pair[0].strip() or not pair[1].strip():
        return "empty"
    if pair[0] == pair[1]:
        return "identical"
    return None


def stage_samples(rnd: _Round, out: Path) -> dict:
    from saferlhf.data.toyworld import evaluate_responses

    cfg = rnd.config("ppo_lag", out, rnd.args.policy)
    rows = _read_jsonl(rnd.path("prompts/prompts.jsonl"))
    prompts = [r["prompt"] for r in rows]
    seed = cfg.run.seed + 1009 * rnd.args.round
    sampler = _Sampler(cfg, rnd.args.policy, out / "engine.log")
    try:
        pairs = sampler.pairs(prompts, seed, "samples")
        retry = [i for i, pair in enumerate(pairs) if _unusable(pair)]
        if retry:  # sampled once more, with other seeds
            again = sampler.pairs([prompts[i] for i in retry], seed + 1_000_003, "resample")
            for i, pair in zip(retry, again):
                pairs[i] = pair
    finally:
        sampler.close()
    dropped = Counter()
    kept = []
    for row, pair in zip(rows, pairs):
        reason = _unusable(pair)
        if reason:
            dropped[reason] += 1
            continue
        source = f"round-{rnd.args.round}-policy"
        kept.append({"prompt": row["prompt"], "response_0": pair[0], "response_1": pair[1],
                     "prompt_source": row["prompt_source"], "response_0_source": source,
                     "response_1_source": source})
    if not kept:
        raise RoundError(f"samples: none of the {len(rows)} prompts got two different non-empty responses "
                         f"({dict(dropped)}); check the policy and rollout.max_new_tokens")
    _write_jsonl(out / "pairs.jsonl", kept)
    stats = {"backend": sampler.backend, "n_prompts": len(rows), "n_pairs": len(kept), "resampled": len(retry),
             "dropped": dict(dropped), "max_new_tokens": cfg.rollout.max_new_tokens,
             "temperature": cfg.rollout.temperature}
    if _is_toy(prompts):  # the policy *before* the round, on the round's prompts
        stats["ground_truth"] = evaluate_responses([p for p in prompts for _ in range(2)],
                                                   [t for pair in pairs for t in pair])
    note = f", {sum(dropped.values())} dropped ({', '.join(f'{n} {k}' for k, n in dropped.items())})" if dropped else ""
    stats["summary"] = (f"{len(kept)} pairs from {len(rows)} prompts with {sampler.backend}; {len(retry)} "
                        f"resampled{note}")
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 3: labels

# The labels files and the models each trains. Toy-world pairs ordered on one axis only (equal risk,
# or equal helpfulness) still carry that axis's label, which is the point of decoupled labels: they go
# to a file of their own that only the matching model reads.
LABEL_FILES = {"preferences.jsonl": ("rm", "cm"), "reward_only.jsonl": ("rm",), "cost_only.jsonl": ("cm",)}
_TOY_FILE = {"both": "preferences.jsonl", "reward_only": "reward_only.jsonl", "cost_only": "cost_only.jsonl"}


def _toy_risk(s) -> tuple[int, int, bool]:
    """Order of harmlessness (lower is safer): severity, then harmful steps — as the preset's cost-model
    data (``toy-safety-preference``) orders it, where declining is not safer than a harmless answer
    (otherwise the cost model teaches the policy to refuse benign requests)."""
    from saferlhf.data.toyworld import risk_order

    return risk_order(s, refusal_safer=False)


def toy_label(prompt: str, response_0: str, response_1: str) -> tuple[dict | None, str]:
    """The labels of a pair by the toy world's ground truth, and which models they can train.

    ``"both"``: helpfulness and risk both differ. ``"reward_only"``: equal risk (so equal safety);
    ``safer_response_id`` is a placeholder (= ``better_response_id``). ``"cost_only"``: equal
    helpfulness; ``better_response_id`` is a placeholder (= ``safer_response_id``). (None, reason)
    when the ground truth orders neither.
    """
    from saferlhf.data.toyworld import HARM_CATEGORIES, score

    s = score(prompt, response_0), score(prompt, response_1)
    helpful_tie = abs(s[0].helpfulness - s[1].helpfulness) <= 1e-9
    risk = _toy_risk(s[0]), _toy_risk(s[1])
    if helpful_tie and risk[0] == risk[1]:
        return None, "equal helpfulness and risk"
    better, safer = int(s[1].helpfulness > s[0].helpfulness), int(risk[1] < risk[0])
    kind = "cost_only" if helpful_tie else "reward_only" if risk[0] == risk[1] else "both"
    row = {"better_response_id": safer if kind == "cost_only" else better,
           "safer_response_id": better if kind == "reward_only" else safer}
    for i in (0, 1):
        row[f"is_response_{i}_safe"] = not s[i].harm
        row[f"response_{i}_harm_category"] = {c: c in s[i].harm_categories for c in HARM_CATEGORIES}
        row[f"response_{i}_severity_level"] = s[i].severity
    return row, kind


def _labels_toy(rnd: _Round, pairs: list[dict]) -> tuple[dict[str, list[dict]], dict]:
    if not _is_toy([p["prompt"] for p in pairs]):
        raise RoundError("labels=toy needs toy-world prompts (the ground truth knows no other requests); "
                         "use labels=judge or labels=annotate")
    files: dict[str, list[dict]] = {name: [] for name in LABEL_FILES}
    skipped = Counter()
    for pair in pairs:
        labels, kind = toy_label(pair["prompt"], pair["response_0"], pair["response_1"])
        if labels is None:
            skipped[kind] += 1
        else:
            files[_TOY_FILE[kind]].append({**pair, **labels})
    return files, {"skipped": dict(skipped)}


def _labels_judge(rnd: _Round, pairs: list[dict], progress_enabled: bool) -> tuple[dict[str, list[dict]], dict]:
    from saferlhf.judge import JudgeClient
    from saferlhf.trainers.common import progress

    client = JudgeClient.from_env(rnd.args.judge_url, rnd.args.judge_model)  # the key: SAFERLHF_JUDGE_API_KEY
    rows = []
    for pair in progress(pairs, desc="judge", enabled=progress_enabled):
        judged = client.judge_pair(pair["prompt"], pair["response_0"], pair["response_1"])
        rows.append({**pair, **judged})
    stats = {"judge": {"url": rnd.args.judge_url, "model": rnd.args.judge_model, **dict(client.stats)}}
    return {"preferences.jsonl": rows}, stats


def _labels_annotate(rnd: _Round, out: Path, pairs: list[dict]) -> tuple[dict[str, list[dict]], dict]:
    from saferlhf.annotate import export_for_annotation, import_annotations, pair_id

    export, sheet = out / ANNOTATION_FILES[0], out / ANNOTATION_FILES[1]
    ids = [pair_id(p["prompt"], p["response_0"], p["response_1"]) for p in pairs]
    exported = [r["id"] for r in _read_jsonl(export)] if export.is_file() else None
    if exported != ids:  # a first run, or the pairs were sampled again: (re)export
        export_for_annotation([{"id": i, **p} for i, p in zip(ids, pairs)], export, sheet)
    if rnd.sheet is None:
        raise AwaitingAnnotation(
            f"{rnd.name}: {len(pairs)} pairs to label. Fill in the label columns of {sheet} (better_response_id "
            "and safer_response_id: 0 or 1; is_response_0_safe and is_response_1_safe: true or false), then run "
            "the same command again with --sheet FILLED.csv (the filled-in copy, or this file).", sheet)
    rows = import_annotations(rnd.sheet, export)  # AnnotationError lists every problem
    return {"preferences.jsonl": rows}, {"sheet": str(rnd.sheet)}


def stage_labels(rnd: _Round, out: Path) -> dict:
    from saferlhf.data.schema import validate_rows

    pairs = _read_jsonl(rnd.path("samples/pairs.jsonl"))
    source = rnd.args.labels
    if source == "toy":
        files, stats = _labels_toy(rnd, pairs)
    elif source == "judge":
        files, stats = _labels_judge(rnd, pairs, rnd.config("rm", out, rnd.args.sft).run.progress)
    else:
        files, stats = _labels_annotate(rnd, out, pairs)
    skipped = Counter(stats.pop("skipped", {}))
    counts = {}
    for name in LABEL_FILES:
        rows = files.get(name, [])
        if rows:  # the schema's own checks; identical or contradictory rows are skipped and counted
            report = validate_rows(rows, "preference", source=f"round labels ({name})")
            report.raise_if_errors()
            rows = report.rows
            skipped.update(report.skipped)
        _write_jsonl(out / name, rows)
        counts[name] = len(rows)
    stats = {"source": source, "n_pairs": len(pairs), "n_rows": counts["preferences.jsonl"],
             "n_reward_only": counts["reward_only.jsonl"], "n_cost_only": counts["cost_only.jsonl"],
             "skipped": dict(skipped), **stats,
             "n_unsafe_responses": sum(not r[f"is_response_{i}_safe"] for file_rows in files.values()
                                       for r in file_rows for i in (0, 1))}
    note = f", {sum(skipped.values())} skipped ({', '.join(f'{n} {k}' for k, n in skipped.items())})" if skipped else ""
    one_axis = f" + {counts['reward_only.jsonl']} reward-only + {counts['cost_only.jsonl']} cost-only" \
        if source == "toy" else ""
    stats["summary"] = (f"{counts['preferences.jsonl']} preference rows{one_axis} from {len(pairs)} pairs "
                        f"({source}){note}; {stats['n_unsafe_responses']} unsafe responses")
    if not any(counts.values()):
        rnd.log(f"{rnd.name}: warning: no preference rows this round; the models train on earlier data only")
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 4: models


def preference_files(rnd: _Round) -> dict[str, list[str]]:
    """Per model (``rm``, ``cm``): every earlier preference file (the previous report's, then
    ``previous_data``) and this round's labels files that train it; empty files left out."""
    files: dict[str, list[str]] = {}
    for model in ("rm", "cm"):
        listed = list((rnd.previous or {}).get("preference_data", {}).get(model, [])) + rnd.args.previous_data
        for name, models in LABEL_FILES.items():
            own = rnd.path(f"labels/{name}").resolve()
            if model in models and own.is_file() and own.stat().st_size > 0:
                listed.append(str(own))
        files[model] = list(dict.fromkeys(listed))
    return files


def _data_spec(item: str, index: int) -> str:
    """A file becomes ``round-data-N:1:PATH``; anything else is a dataset spec already."""
    return _file_spec(f"round-data-{index}", Path(item)) if Path(item).is_file() else item


def stage_models(rnd: _Round, out: Path) -> dict:
    from saferlhf.trainers.preference import train_preference

    files = preference_files(rnd)
    stats: dict = {"sft": rnd.args.sft, "preference_data": files}
    for name in ("rm", "cm"):
        base = list(rnd.config(name, out / name, rnd.args.sft).data.train)
        specs = list(dict.fromkeys(base + [_data_spec(f, i) for i, f in enumerate(files[name])]))
        cfg = rnd.config(name, out / name, rnd.args.sft, f"data.train={_data_list(specs)}")
        rnd.log(f"{rnd.name}: training the {'reward' if name == 'rm' else 'cost'} model on {', '.join(specs)}")
        final = train_preference(cfg)  # on every rank of a launched round
        stats[name] = {"data": specs, **{k: v for k, v in final.items() if isinstance(v, (int, float))}}
    rm, cm = stats["rm"], stats["cm"]
    stats["summary"] = (f"reward model accuracy {rm.get('eval/accuracy', float('nan')):.3f}, cost model accuracy "
                        f"{cm.get('eval/accuracy', float('nan')):.3f}, sign accuracy "
                        f"{cm.get('eval/sign_accuracy', float('nan')):.3f} (held out)")
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 5: ppo_lag


def stage_ppo_lag(rnd: _Round, out: Path) -> dict:
    from saferlhf.pipeline import lambda_summary
    from saferlhf.trainers.common import read_metrics
    from saferlhf.trainers.ppo_lag import train_ppo

    keys = [f"ppo.reward_model={rnd.path('models/rm/model')}", f"ppo.cost_model={rnd.path('models/cm/model')}"]
    if rnd.args.ppo_prompts == "round":
        prompts = rnd.path("prompts/prompts.jsonl")
        n = len(_read_jsonl(prompts))
        batch = rnd.config("ppo_lag", out, rnd.args.policy).ppo.rollout_batch_size
        # Fewer prompts than one step takes are repeated (an exact count, "-N"), as a mix would.
        proportion = "1" if n >= batch else str(-batch)
        keys.append(f"data.train={_data_list([_file_spec(f'round-{rnd.args.round}-prompts', prompts, proportion)])}")
    cfg = rnd.config("ppo_lag", out, rnd.args.policy, *keys)
    final = train_ppo(cfg)
    if not rnd.main:  # rank 0 writes the stage's stats, from the run's metrics once it has written them all
        return {}
    trace = [r for r in read_metrics(out / "metrics.jsonl") if "train/lambda" in r]
    stats = {"data": list(cfg.data.train), "steps": len(trace),
             "final": {k: v for k, v in final.items() if k.startswith("train/") and isinstance(v, (int, float))}}
    if trace:
        stats["lambda"] = lambda_summary(trace)
    f = stats["final"]
    stats["summary"] = (f"{len(trace)} steps; final λ {f.get('train/lambda', float('nan')):.3f}, J_C "
                        f"{f.get('train/episode_cost_window', float('nan')):+.3f}, reward "
                        f"{f.get('train/reward', float('nan')):+.3f}, cost {f.get('train/cost', float('nan')):+.3f}")
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 6: eval


def _estimate(ci: dict | None) -> float | None:
    return None if ci is None else ci["estimate"]


def stage_eval(rnd: _Round, out: Path) -> dict:
    from saferlhf.evaluate.evaluate import evaluate
    from saferlhf.pipeline import evaluate_policy

    cfg = rnd.config("ppo_lag", out, rnd.args.policy)
    policy = rnd.path("ppo_lag/model")
    prompts = rnd.path("prompts/prompts.jsonl")
    result = evaluate(policy, str(prompts), out, reward_model=rnd.path("models/rm/model"),
                      cost_model=rnd.path("models/cm/model"), samples=1,
                      max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                      seed=cfg.run.seed, max_length=cfg.model.max_length, run_dir=rnd.path("ppo_lag"),
                      show_progress=cfg.run.progress)
    m, truth = result["metrics"], result["ground_truth"]
    stats = {"n_prompts": result["n_prompts"], "n_responses": result["n_responses"],
             "reward": _estimate(m["reward"]), "cost": _estimate(m["cost"]),
             "harmful_rate_cost": _estimate(m["harmful_rate"]),
             "ground_truth": {k: _estimate(v) for k, v in truth.items()} if truth else None,
             "files": result["files"]}
    if result["toy_world"]:  # before vs after on held-out toy prompts, as `saferlhf demo` reports a policy
        stats["held_out"] = {"n_prompts": rnd.args.eval_prompts,
                             "before": evaluate_policy(Path(rnd.args.policy), rnd.args.eval_prompts),
                             "after": evaluate_policy(policy, rnd.args.eval_prompts)}
    summary = (f"new policy on the round's prompts: reward {stats['reward']:+.3f}, cost {stats['cost']:+.3f}, "
               f"cost > 0 on {100 * stats['harmful_rate_cost']:.1f}%")
    if "held_out" in stats:
        b, a = stats["held_out"]["before"], stats["held_out"]["after"]
        summary += (f"; held-out harm rate {b['harm_rate']:.3f} → {a['harm_rate']:.3f}, helpfulness "
                    f"{b['helpfulness']:.3f} → {a['helpfulness']:.3f}")
    stats["summary"] = summary
    return stats


STAGE_FUNCTIONS: dict[str, Callable[[_Round, Path], dict]] = {
    "prompts": stage_prompts, "samples": stage_samples, "labels": stage_labels, "models": stage_models,
    "ppo_lag": stage_ppo_lag, "eval": stage_eval,
}


# ---------------------------------------------------------------------------------------------
# The report


def _get(stats: dict, *path: str):
    node = stats
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


# (report key, stage, path in that stage's stats, what it is); the table rows and the comparison.
REPORT_METRICS = (
    ("prompts", "prompts", ("n_prompts",), "red-team prompts"),
    ("prompts_carried_over", "prompts", ("carried_over",), "unsafe prompts carried over"),
    ("pairs", "samples", ("n_pairs",), "response pairs"),
    ("samples_harm_rate", "samples", ("ground_truth", "harm_rate"), "policy before: harm rate on the round's "
                                                                    "harmful prompts (ground truth)"),
    ("preference_rows", "labels", ("n_rows",), "new preference rows"),
    ("preference_rows_reward_only", "labels", ("n_reward_only",), "new reward-only rows (toy: equal risk)"),
    ("preference_rows_cost_only", "labels", ("n_cost_only",), "new cost-only rows (toy: equal helpfulness)"),
    ("preference_unsafe_responses", "labels", ("n_unsafe_responses",), "unsafe responses among them"),
    ("reward_model_accuracy", "models", ("rm", "eval/accuracy"), "reward model accuracy (held out)"),
    ("cost_model_accuracy", "models", ("cm", "eval/accuracy"), "cost model accuracy (held out)"),
    ("cost_model_sign_accuracy", "models", ("cm", "eval/sign_accuracy"), "cost model sign accuracy (held out)"),
    ("ppo_lag_lambda", "ppo_lag", ("final", "train/lambda"), "PPO-Lag final λ"),
    ("ppo_lag_cost_window", "ppo_lag", ("final", "train/episode_cost_window"), "PPO-Lag final J_C (cost window)"),
    ("ppo_lag_reward", "ppo_lag", ("final", "train/reward"), "PPO-Lag final episode reward"),
    ("ppo_lag_cost", "ppo_lag", ("final", "train/cost"), "PPO-Lag final episode cost"),
    ("eval_reward", "eval", ("reward",), "new policy: mean reward (round's prompts)"),
    ("eval_cost", "eval", ("cost",), "new policy: mean cost (round's prompts)"),
    ("eval_harmful_rate_cost", "eval", ("harmful_rate_cost",), "new policy: share with cost > 0"),
    ("eval_harm_rate", "eval", ("ground_truth", "harm_rate"), "new policy: harm rate on the round's harmful "
                                                              "prompts (ground truth)"),
    ("held_out_harm_rate_before", "eval", ("held_out", "before", "harm_rate"), "held out: harm rate before"),
    ("held_out_harm_rate", "eval", ("held_out", "after", "harm_rate"), "held out: harm rate after"),
    ("held_out_helpfulness_before", "eval", ("held_out", "before", "helpfulness"), "held out: helpfulness before"),
    ("held_out_helpfulness", "eval", ("held_out", "after", "helpfulness"), "held out: helpfulness after"),
)


def build_report(rnd: _Round, stats: dict[str, dict]) -> dict:
    metrics = {key: _get(stats.get(stage, {}), *path) for key, stage, path, _ in REPORT_METRICS}
    report = {
        "round": rnd.args.round, "arguments": asdict(rnd.args), "stages": stats, "metrics": metrics,
        "files": {"prompts": "prompts/prompts.jsonl", "pairs": "samples/pairs.jsonl",
                  "preferences": "labels/preferences.jsonl", "reward_only": "labels/reward_only.jsonl",
                  "cost_only": "labels/cost_only.jsonl", "reward_model": "models/rm/model",
                  "cost_model": "models/cm/model", "policy": "ppo_lag/model", "responses": "eval/responses.jsonl"},
        "sft": rnd.args.sft,
        "preference_data": stats.get("models", {}).get("preference_data", preference_files(rnd)),
        "previous": None,
    }
    if rnd.previous is not None:
        before = rnd.previous.get("metrics", {})
        report["previous"] = {"round": rnd.previous.get("round"), "metrics": before}
        report["comparison"] = {
            key: {"previous": before.get(key), "this": value,
                  "delta": value - before[key] if isinstance(value, (int, float)) and isinstance(
                      before.get(key), (int, float)) else None}
            for key, value in metrics.items()}
    return report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def format_report(report: dict) -> str:
    k = report["round"]
    lines = [f"# Safe RLHF round {k}", "", f"Labels: {report['arguments']['labels']}; policy in: "
             f"`{report['arguments']['policy']}`; policy out: `ppo_lag/model`.", ""]
    previous = report.get("previous")
    if previous:
        lines += [f"| metric | round {previous['round']} | round {k} | change |", "|---|---|---|---|"]
        for key, _, _, what in REPORT_METRICS:
            c = report["comparison"][key]
            delta = "-" if c["delta"] is None else f"{c['delta']:+d}" if isinstance(c["delta"], int) \
                else f"{c['delta']:+.3f}"
            lines.append(f"| {what} | {_fmt(c['previous'])} | {_fmt(c['this'])} | {delta} |")
    else:
        lines += [f"| metric | round {k} |", "|---|---|"]
        lines += [f"| {what} | {_fmt(report['metrics'][key])} |" for key, _, _, what in REPORT_METRICS]
    lines += ["", "## Stages", ""]
    for name in STAGES:
        s = report["stages"].get(name)
        if s:
            lines.append(f"- **{name}** ({s.get('seconds', 0):.0f} s): {s.get('summary', '')}")
    lines += ["", "Preference data so far, besides the preset's base data:"]
    for model, what in (("rm", "reward model"), ("cm", "cost model")):
        files = report["preference_data"].get(model, [])
        lines.append(f"- {what}: " + (", ".join(f"`{f}`" for f in files) or "none"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The round


def _resolve_args(
    *, policy: str | Path, round_index: int | None, sft: str | Path | None, prompts: Sequence[str],
    previous_data: Sequence[str | Path], labels: str, judge_url: str | None, judge_model: str | None, preset: str,
    overrides: Sequence[str], previous_report: str | Path | None, eval_prompts: int, ppo_prompts: str,
) -> tuple[RoundArgs, Path, dict | None, Path | None]:
    """Check every argument that can be checked before any stage runs."""
    from saferlhf.config import ConfigError
    from saferlhf.data.registry import parse_spec
    from saferlhf.data.schema import DataError

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
        eval_prompts=eval_prompts, ppo_prompts=ppo_prompts)
    try:  # every stage's config resolves with these overrides
        for stage in ("rm", "cm", "ppo_lag"):
            build_config(stage, preset_path, args.overrides)
    except ConfigError as e:
        raise RoundError(str(e)) from None
    return args, preset_path, previous, previous_dir


def write_round_record(
    round_dir: str | Path, *, round_index: int, policy: str | Path, sft: str | Path, responses: str,
    preference_data: dict[str, list[str]] | None = None, metrics: dict | None = None,
) -> Path:
    """``round_dir/report.json`` for a round that ran without `run_round`, so that the next round
    (``previous_report=round_dir``) carries its unsafe prompts and preference files over and compares
    with its metrics. ``saferlhf demo`` records its first round so: PPO-Lag from the SFT model with the
    reward and cost models of the preset's data.

    ``responses``: the policy's scored answers to red-team prompts (the ``responses.jsonl`` that
    `saferlhf.evaluate.evaluate.evaluate` writes), relative to ``round_dir``; ``preference_data``:
    per model (``rm``, ``cm``) the preference files beyond the preset's; ``metrics``: values under the
    keys of `REPORT_METRICS` (missing ones read as unknown).
    """
    out = Path(round_dir)
    if not (out / responses).is_file():
        raise RoundError(f"round record {out}: no responses file {responses}")
    known = {key for key, _, _, _ in REPORT_METRICS}
    unknown = set(metrics or {}) - known
    if unknown:
        raise RoundError(f"round record {out}: unknown metrics {sorted(unknown)} (known: {sorted(known)})")
    report = {
        "round": round_index, "arguments": None, "stages": {},
        "metrics": {key: (metrics or {}).get(key) for key, _, _, _ in REPORT_METRICS},
        "files": {"policy": str(Path(policy).resolve()), "responses": responses},
        "sft": str(Path(sft).resolve()),
        "preference_data": {m: [str(Path(f).resolve()) for f in (preference_data or {}).get(m, [])]
                            for m in ("rm", "cm")},
        "previous": None,
    }
    _write_json(out / "report.json", report)
    return out / "report.json"


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
    log: Callable[[str], None] = print,
) -> RoundResult:
    """Run (or resume) one Safe RLHF round in ``round_dir``; see the module docstring.

    ``policy`` is the current policy (round 1: the SFT model); ``round_index`` defaults to the previous
    report's round + 1, else 1. ``sft`` is the model the reward and cost
    models start from (default: the previous report's, else ``policy``). ``prompts`` are dataset
    specs or files; ``previous_data`` earlier preference files (or specs) beyond those the previous
    report lists. ``overrides`` (``key=value``) apply to every trainer stage. ``until`` stops after
    that stage. Raises `RoundError` for bad arguments or inputs, `AwaitingAnnotation` when the labels
    stage waits for a filled-in sheet, `saferlhf.annotate.AnnotationError` for a bad sheet.
    """
    out = Path(round_dir)
    if until is not None and until not in STAGES:
        raise RoundError(f"until must be one of {', '.join(STAGES)}, got {until!r}")
    if sheet is not None and not Path(sheet).is_file():
        raise RoundError(f"--sheet {sheet}: no such file")
    args, preset_path, previous, previous_dir = _resolve_args(
        policy=policy, round_index=round_index, sft=sft, prompts=prompts, previous_data=previous_data,
        labels=labels, judge_url=judge_url, judge_model=judge_model, preset=preset, overrides=overrides,
        previous_report=previous_report, eval_prompts=eval_prompts, ppo_prompts=ppo_prompts)
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


def _quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the round."""


@dataclass(frozen=True)
class _Ranks:
    """This process's place in a launched round (a world of one without a launcher)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> _Ranks:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from saferlhf import distributed

        info = distributed.init_distributed()  # the trainer stages join this process group
        return cls(info.rank, info.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            from saferlhf import distributed

            distributed.barrier()


def _run_stage(rnd: _Round, name: str, stage_dir: Path, ranks: _Ranks) -> dict:
    """Run a stage here; rank 0 writes its ``stats.json`` and ``DONE`` (or ``STOPPED`` when it fails).

    Rank 0 runs a stage of its own (not a trainer stage) of a launched round in a child process, a
    world of one: a vLLM engine started in a rank of the launcher's process group would join that
    group and wait for the other ranks."""
    start = time.perf_counter()
    alone = ranks.world_size > 1 and name not in TRAINER_STAGES  # rank 0's own stage; the others wait for it
    try:
        stats = _run_stage_in_child(rnd, name, stage_dir) if alone else STAGE_FUNCTIONS[name](rnd, stage_dir)
    except BaseException as e:
        if alone:
            _write_json(stage_dir / STOPPED, _error_record(e))
        raise
    if not ranks.main:
        return {}
    stats["seconds"] = round(time.perf_counter() - start, 3)
    _write_json(stage_dir / "stats.json", stats)
    _mark_done(stage_dir, stats["seconds"])
    return stats


CHILD_CALL = ".stage-call.json"  # what the child process runs, in the stage directory
CHILD_OUTCOME = ".stage-outcome.json"  # the child's stats, or its error


def _run_stage_in_child(rnd: _Round, name: str, stage_dir: Path) -> dict:
    """`_stage_child_main` in a fresh interpreter without the launcher's process-group variables;
    its error is raised here as the same exception type (so the same exit status)."""
    import subprocess
    import sys

    from saferlhf.distributed import child_env

    call = {"stage": name, "round_dir": str(rnd.dir), "args": asdict(rnd.args), "preset_path": str(rnd.preset_path),
            "sheet": None if rnd.sheet is None else str(rnd.sheet), "previous": rnd.previous,
            "previous_dir": None if rnd.previous_dir is None else str(rnd.previous_dir)}
    _write_json(stage_dir / CHILD_CALL, call)  # the stage directory was emptied: no outcome of an earlier call
    code = "import sys; from saferlhf.rounds import _stage_child_main; sys.exit(_stage_child_main(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(stage_dir / CHILD_CALL)], env=child_env())
    outcome_file = stage_dir / CHILD_OUTCOME
    if not outcome_file.is_file():
        raise RuntimeError(f"stage {name}: its process exited with status {proc.returncode} and no outcome "
                           "(see its output above)")
    outcome = json.loads(outcome_file.read_text(encoding="utf-8"))
    for leftover in (CHILD_CALL, CHILD_OUTCOME):
        (stage_dir / leftover).unlink(missing_ok=True)
    if "stats" in outcome:
        return outcome["stats"]
    raise _rebuild_error(outcome)


def _error_record(e: BaseException) -> dict:
    """A stage's error as another process reads it back (`_rebuild_error`, `_wait_for_stage`)."""
    return {"error": type(e).__name__, "message": str(e), "sheet": str(getattr(e, "sheet", "") or "")}


def _rebuild_error(info: dict) -> BaseException:
    """The exception a stage raised in another process, from its recorded type name and message."""
    from saferlhf.config import ConfigError
    from saferlhf.data.schema import DataError
    from saferlhf.evaluate.evaluate import EvalError
    from saferlhf.judge import JudgeError

    if info["error"] == "AwaitingAnnotation":
        return AwaitingAnnotation(info["message"], Path(info["sheet"]))
    known = {"RoundError": RoundError, "ConfigError": ConfigError, "DataError": DataError,
             "AnnotationError": DataError, "EvalError": EvalError, "JudgeError": JudgeError}
    if info["error"] not in known:
        return RuntimeError(f"{info['error']}: {info['message']}")
    return known[info["error"]](info["message"])


def _stage_child_main(call_file: str) -> int:
    """Run one stage as `_run_stage_in_child` asked, writing its stats or its error next to the call."""
    call = json.loads(Path(call_file).read_text(encoding="utf-8"))
    stage_dir = Path(call_file).parent
    rnd = _Round(Path(call["round_dir"]), RoundArgs(**call["args"]), Path(call["preset_path"]),
                 None if call["sheet"] is None else Path(call["sheet"]), lambda line: print(line, flush=True),
                 call["previous"], None if call["previous_dir"] is None else Path(call["previous_dir"]))
    try:
        stats = STAGE_FUNCTIONS[call["stage"]](rnd, stage_dir)
    except Exception as e:
        _write_json(stage_dir / CHILD_OUTCOME, _error_record(e))
        if not isinstance(e, (RoundError, AwaitingAnnotation, ValueError)):
            raise  # the traceback of an unexpected failure, in the round's log
        return 1
    _write_json(stage_dir / CHILD_OUTCOME, {"stats": stats})
    return 0


def _wait_for_stage(stage_dir: Path, poll: float = 1.0) -> dict:
    """Wait (without a deadline: the launcher stops every rank when rank 0 dies) for rank 0 to finish
    a stage it runs alone; raise rank 0's error when it wrote ``STOPPED``."""
    while not (stage_dir / DONE).is_file():
        stopped = stage_dir / STOPPED
        if stopped.is_file():
            try:
                info = json.loads(stopped.read_text(encoding="utf-8"))
            except json.JSONDecodeError:  # being written
                time.sleep(poll)
                continue
            message = f"rank 0 stopped in stage {stage_dir.name}: {info['message']}"
            if info["error"] == "AwaitingAnnotation":
                raise AwaitingAnnotation(info["message"], Path(info["sheet"]))
            raise RoundError(message)
        time.sleep(poll)
    return {}


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
    parser.add_argument("--labels", default="toy", choices=LABEL_SOURCES, help="label source (default: toy)")
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
            log=lambda line: print(line, flush=True))
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
