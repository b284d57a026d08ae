"""The main job on the embedded default: the Safe RLHF pipeline on the toy world, on CPU.

``saferlhf demo`` builds a tiny Llama and a tokenizer for the toy language, fine-tunes it (SFT),
trains the reward model (helpfulness) and the cost model (harmlessness) on decoupled toy-world
preferences, then runs the paper's comparison from that one SFT model with the same seed and
budget — PPO (reward only), PPO-Lagrangian (learned λ, d = 0) and reward shaping (R − λC, fixed λ)
— and scores every policy with the toy world's ground truth. Every stage writes its own run
directory under ``--out``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from saferlhf.config import build_config, resolve_preset
from saferlhf.trainers.common import logger

DEMO_SEED = 42
EVAL_PROMPTS = 256


@dataclass
class DemoResult:
    out_dir: Path
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    policies: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    traces: dict[str, list[dict]] = field(default_factory=dict)  # per RL stage: λ, J_C, R, C per step


def build_base_model(out_dir: Path, seed: int = DEMO_SEED, size: str = "tiny") -> Path:
    """A randomly initialised tiny Llama with a tokenizer trained on the toy language."""
    from saferlhf.data import toyworld
    from saferlhf.models.tiny import build_tiny_checkpoint

    if not (out_dir / "config.json").exists():
        build_tiny_checkpoint(out_dir, toyworld.corpus(seed), size=size, seed=seed)
    return out_dir


def evaluate_policy(model_dir: Path, n_prompts: int = EVAL_PROMPTS, seed: int = DEMO_SEED) -> dict[str, float]:
    """Ground-truth metrics of a policy checkpoint on held-out toy prompts.

    Responses are sampled (temperature 1, fixed seed), not greedy: the policy is a distribution, and
    a greedy decode would report only its mode (an SFT policy that complies with half of the harmful
    requests would read as 0 % or 100 % harmful).
    """
    from saferlhf.data.registry import mix_datasets
    from saferlhf.evaluate.generation import evaluate_toyworld_policy
    from saferlhf.models.hf import load_causal_lm, load_tokenizer
    from saferlhf.rollout.base import SamplingParams

    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    model = load_causal_lm(str(model_dir), tokenizer=tokenizer)
    rows = mix_datasets([f"toy-prompts/test:{n_prompts}/-1"], "prompt", seed=seed).rows
    prompts = [r["prompt"] for r in rows]
    return evaluate_toyworld_policy(model, tokenizer, prompts, SamplingParams(max_new_tokens=48, n=2, seed=seed),
                                    max_length=64)


def run_demo(
    out_dir: str | Path = "runs/demo", preset: str = "tiny-cpu", overrides: list[str] | None = None,
    rl: bool = True,
) -> DemoResult:
    from saferlhf.trainers.preference import train_preference
    from saferlhf.trainers.sft import train_sft

    out = Path(out_dir)
    preset_path = resolve_preset(preset)
    result = DemoResult(out)
    extra = list(overrides or [])

    t0 = time.perf_counter()
    base = build_base_model(out / "base")
    result.seconds["base"] = time.perf_counter() - t0

    def stage(name: str, model_path: Path, runner) -> Path:
        start = time.perf_counter()
        cfg = build_config(name, preset_path,
                           [f"run.out_dir={out / name}", f"model.name_or_path={model_path}", *extra])
        logger.info("demo: stage %s → %s", name, cfg.out_dir)
        result.stages[name] = runner(cfg)
        result.seconds[name] = time.perf_counter() - start
        return cfg.out_dir / "model"

    sft_model = stage("sft", base, train_sft)
    rm_model = stage("rm", sft_model, train_preference)
    cm_model = stage("cm", sft_model, train_preference)

    start = time.perf_counter()
    result.policies["sft"] = evaluate_policy(sft_model)
    result.seconds["eval"] = time.perf_counter() - start
    if rl:
        run_rl_comparison(result, sft_model, rm_model, cm_model, preset_path, extra)
    write_report(result)
    return result


RL_STAGES = ("ppo", "ppo_lag", "ppo_rs")


def run_rl_comparison(result: DemoResult, sft_model: Path, rm_model: Path, cm_model: Path, preset_path: Path,
                      overrides: list[str] | None = None, stages: tuple[str, ...] = RL_STAGES) -> DemoResult:
    """PPO, PPO-Lag and reward shaping from one SFT model, same seed and budget; ground truth of each."""
    from saferlhf.trainers.common import read_metrics
    from saferlhf.trainers.ppo_lag import train_ppo

    for name in stages:
        start = time.perf_counter()
        cfg = build_config(name, preset_path, [f"run.out_dir={result.out_dir / name}",
                                               f"model.name_or_path={sft_model}", f"ppo.reward_model={rm_model}",
                                               f"ppo.cost_model={cm_model}", *(overrides or [])])
        logger.info("demo: stage %s → %s", name, cfg.out_dir)
        result.stages[name] = train_ppo(cfg)
        result.policies[name] = evaluate_policy(cfg.out_dir / "model")
        result.traces[name] = [{k: r[k] for k in ("step", "train/lambda", "train/episode_cost_window",
                                                  "train/reward", "train/cost") if k in r}
                               for r in read_metrics(cfg.out_dir / "metrics.jsonl") if "train/reward" in r]
        result.seconds[name] = time.perf_counter() - start
    return result


def summary(result: DemoResult) -> dict:
    """The JSON line of ``saferlhf demo --json``: ground-truth metrics per policy, plus model metrics."""
    out = {name: {k: round(v, 4) for k, v in m.items() if k in ("harm_rate", "helpfulness")}
           for name, m in result.policies.items()}
    out["reward_model"] = {k.removeprefix("eval/"): round(v, 4) for k, v in result.stages.get("rm", {}).items()
                           if k in ("eval/accuracy",)}
    out["cost_model"] = {k.removeprefix("eval/"): round(v, 4) for k, v in result.stages.get("cm", {}).items()
                         if k in ("eval/accuracy", "eval/sign_accuracy")}
    if result.traces.get("ppo_lag"):
        out["ppo_lag_lambda"] = {k: round(v, 4) for k, v in lambda_summary(result.traces["ppo_lag"]).items()}
    return out


def format_table(result: DemoResult) -> str:
    lines = ["", "Preference models (held-out toy pairs)", "| model | accuracy | sign accuracy |", "|---|---|---|"]
    rm, cm = result.stages.get("rm", {}), result.stages.get("cm", {})
    lines.append(f"| reward | {rm.get('eval/accuracy', float('nan')):.3f} | - |")
    nan = float("nan")
    lines.append(f"| cost | {cm.get('eval/accuracy', nan):.3f} | {cm.get('eval/sign_accuracy', nan):.3f} |")
    lines += ["", "Policies, toy-world ground truth (sampled, held-out prompts)",
              "| policy | harmful rate on harmful requests | helpfulness on benign requests |", "|---|---|---|"]
    for name, m in result.policies.items():
        lines.append(f"| {name} | {m['harm_rate']:.3f} | {m['helpfulness']:.3f} |")
    trace = result.traces.get("ppo_lag")
    if trace:
        lam = lambda_summary(trace)
        lines += ["", f"PPO-Lag multiplier: λ {lam['first']:.3f} at step 1, peak {lam['peak']:.3f} at step "
                      f"{lam['peak_step']}, {lam['last']:.3f} at step {lam['last_step']}; J_C (cost window) "
                      f"{lam['first_cost']:+.2f} at step 1, {lam['last_cost']:+.2f} at the end"]
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items())]
    return "\n".join(lines)


def lambda_summary(trace: list[dict]) -> dict:
    """λ at the first step, its peak and the step of the peak, its last value; J_C first and last.

    A peak held over several steps (λ at ``lagrange.lambda_max``) counts at its last step.
    """
    lams = [r["train/lambda"] for r in trace]
    peak = max(range(len(lams)), key=lambda i: (lams[i], i))
    return {"first": lams[0], "peak": lams[peak], "peak_step": trace[peak]["step"], "last": lams[-1],
            "last_step": trace[-1]["step"], "first_cost": trace[0]["train/episode_cost_window"],
            "last_cost": trace[-1]["train/episode_cost_window"]}


def write_report(result: DemoResult) -> Path:
    path = result.out_dir / "report.md"
    path.write_text("# saferlhf demo report\n" + format_table(result) + "\n")
    with open(result.out_dir / "summary.json", "w") as fh:
        json.dump(summary(result), fh, indent=2)
    return path
