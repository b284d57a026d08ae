"""A round's report: its numbers (``report.json``), the table (``report.md``) and the comparison with
the previous round; and the record of a round that ran without `run_round`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from saferlhf.rounds.common import STAGES, RoundError, _Round, _write_json
from saferlhf.rounds.stages import preference_files

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
                  "cost_only": "labels/cost_only.jsonl", "reward_model": str(rnd.model("rm")),
                  "cost_model": str(rnd.model("cm")), "policy": "ppo_lag/model", "responses": "eval/responses.jsonl"},
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


