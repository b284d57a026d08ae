"""The stages of a round, each a function ``(round, stage directory) -> stats`` (see ``saferlhf.rounds``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from saferlhf.rounds.common import (
    ANNOTATION_FILES,
    AwaitingAnnotation,
    RoundError,
    _data_list,
    _file_spec,
    _read_jsonl,
    _Round,
    _write_jsonl,
)

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

        cfg = self.cfg
        sampling = SamplingParams(n=2, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens, seed=seed)  # + batch index per batch
        texts = generate_responses(self.model, self.tokenizer, prompts, sampling, batch_size=self.batch_size,
                                   max_length=cfg.model.max_length, chat_template=cfg.model.chat_template,
                                   generator=self.generator, show_progress=cfg.run.progress, desc=desc)
        return list(zip(texts[0::2], texts[1::2]))  # rows i·n + j: sample j of prompt i

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
    if rnd.args.labels == "none":  # no new preference data this round: nothing to sample for it
        _write_jsonl(out / "pairs.jsonl", [])
        return {"n_prompts": len(rows), "n_pairs": 0, "summary": "labels=none: no answer pairs sampled"}
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
    from saferlhf.monitor import progress

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
    if source == "none":
        files, stats = {}, {}
    elif source == "toy":
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
    if not any(counts.values()) and source != "none":
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
    if rnd.args.reward_model and rnd.args.cost_model:  # given: nothing to train
        stats.update({"given": {"rm": rnd.args.reward_model, "cm": rnd.args.cost_model}, "rm": {}, "cm": {},
                      "summary": f"given: reward model {rnd.args.reward_model}, cost model {rnd.args.cost_model}"})
        return stats
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


def _rl_keys(rnd: _Round, stage: str, out: Path) -> list[str]:
    """The keys the round sets for an RL stage: its reward and cost models and (ppo_prompts=round) its prompts."""
    keys = [f"ppo.reward_model={rnd.model('rm')}", f"ppo.cost_model={rnd.model('cm')}"]
    if rnd.args.ppo_prompts == "round":
        prompts = rnd.path("prompts/prompts.jsonl")
        n = len(_read_jsonl(prompts))
        batch = rnd.config(stage, out, rnd.args.policy).ppo.rollout_batch_size
        # Fewer prompts than one step takes are repeated (an exact count, "-N"), as a mix would.
        proportion = "1" if n >= batch else str(-batch)
        keys.append(f"data.train={_data_list([_file_spec(f'round-{rnd.args.round}-prompts', prompts, proportion)])}")
    return keys


def _final(final: dict) -> dict:
    return {k: v for k, v in final.items() if k.startswith("train/") and isinstance(v, (int, float))}


def stage_ppo_lag(rnd: _Round, out: Path) -> dict:
    from saferlhf.evaluate.groundtruth import lambda_summary, read_trace
    from saferlhf.trainers.ppo_lag import train_ppo

    cfg = rnd.config("ppo_lag", out, rnd.args.policy, *_rl_keys(rnd, "ppo_lag", out))
    final = train_ppo(cfg)
    if not rnd.main:  # rank 0 writes the stage's stats, from the run's metrics once it has written them all
        return {}
    trace = read_trace(out)
    stats = {"data": list(cfg.data.train), "steps": len(trace), "final": _final(final)}
    if trace:
        stats["lambda"] = lambda_summary(trace)
    f = stats["final"]
    stats["summary"] = (f"{len(trace)} steps; final λ {f.get('train/lambda', float('nan')):.3f}, J_C "
                        f"{f.get('train/episode_cost_window', float('nan')):+.3f}, reward "
                        f"{f.get('train/reward', float('nan')):+.3f}, cost {f.get('train/cost', float('nan')):+.3f}")
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 6: baselines


def stage_baselines(rnd: _Round, out: Path) -> dict:
    """The round's baselines (``baselines``: PPO with the reward only, reward shaping R − λ·C with a fixed
    λ) from the same policy, with the same models, prompts, seed and budget as PPO-Lag — the paper's
    comparison — each judged by the toy world's ground truth on held-out prompts."""
    from saferlhf.evaluate.groundtruth import evaluate_policy, read_trace
    from saferlhf.trainers.ppo_lag import train_ppo

    stats: dict = {"trained": list(rnd.args.baselines)}
    for name in rnd.args.baselines:
        cfg = rnd.config(name, out / name, rnd.args.policy, *_rl_keys(rnd, name, out / name))
        rnd.log(f"{rnd.name}: baseline {name} → {out / name}")
        final = train_ppo(cfg)
        if rnd.main:
            stats[name] = {"steps": len(read_trace(out / name)), "final": _final(final)}
            if _is_toy([r["prompt"] for r in _read_jsonl(rnd.path("prompts/prompts.jsonl"))]):
                stats[name]["held_out"] = evaluate_policy(out / name / "model", rnd.args.eval_prompts)
    held = [f"{n}: harm {stats[n]['held_out']['harm_rate']:.3f}" for n in rnd.args.baselines
            if rnd.main and "held_out" in stats.get(n, {})]
    stats["summary"] = (f"{', '.join(rnd.args.baselines)} trained" + (f" ({'; '.join(held)})" if held else "")
                        if rnd.args.baselines else "none asked for")
    return stats if rnd.main else {}


# ---------------------------------------------------------------------------------------------
# Stage 7: eval


def _estimate(ci: dict | None) -> float | None:
    return None if ci is None else ci["estimate"]


def stage_eval(rnd: _Round, out: Path) -> dict:
    from saferlhf.evaluate.evaluate import evaluate
    from saferlhf.evaluate.groundtruth import evaluate_policy

    cfg = rnd.config("ppo_lag", out, rnd.args.policy)
    policy = rnd.path("ppo_lag/model")
    prompts = rnd.path("prompts/prompts.jsonl")
    result = evaluate(policy, str(prompts), out, reward_model=rnd.model("rm"), cost_model=rnd.model("cm"),
                      samples=1,
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
    "ppo_lag": stage_ppo_lag, "baselines": stage_baselines, "eval": stage_eval,
}

