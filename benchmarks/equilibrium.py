"""Where does the harmful rate settle? Long toy-world PPO-Lag runs under each constraint form, over seeds.

    python benchmarks/equilibrium.py [--seeds 42,43,44] [--steps 300] [--configs NAME,...] [--out DIR] [--json FILE]

(``--configs`` defaults to the four constraint forms, ``DEFAULT_CONFIGS``.)

For every seed: the toy world's base model, SFT, reward and cost models of the ``tiny-cpu`` preset (as
``saferlhf demo`` trains them, ``run.seed`` = the seed), then one PPO-Lag run per configuration from that
SFT model, ``--steps`` steps long. Each run is judged by

- the toy world's ground truth of its final policy on 256 held-out prompts × 2 samples
  (``harm_rate`` on harmful requests, ``helpfulness`` on benign ones), and the run's cost model on the
  same answers (``cost_model_unsafe_rate``; ``missed_harm_rate``: harmful by the ground truth, scored
  safe by the cost model);
- its last quarter of training: the mean share of answers the cost model calls unsafe
  (``train/unsafe_rate``, on the run's harmful prompts), the mean J_C and λ, and λ's spread (settled
  when its relative spread is small and J_C sits at d).

Configurations (``CONFIGS``): the paper's mean-cost constraint at d = 0, the chance constraint
``unsafe_rate`` at d = 0.05 (the demo's) and 0.20 (also with a 5x slower λ, and with a PI(D)
controller for λ at two integral gains; both also at the demo's policy learning rate, and PI there
with 5x and 10x the KL penalty), RePO's ``rectified``
cost, and the preset's own stages as the demo runs them (``preset_ppo_lag``, ``preset_grpo_lag``,
``preset_rloo_lag``, ``preset_grpo``; with ``--steps 150``), which also report the training side's
seconds per step and the peak resident memory. Prints a table (mean over seeds, and every seed) and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import import_saferlhf  # noqa: E402

import_saferlhf()

from saferlhf.config import build_config, resolve_preset  # noqa: E402

QUIET = ["run.progress=false", "run.tensorboard=false"]
# name → overrides of the preset's ppo_lag stage, spelled out in full so that the runs do not follow the
# preset's own choice (the demo's). The policy's learning rate is 1e-4 in every run. λ's learning rate
# follows the scale of J_C − d: the signed and rectified costs move over several units (0.004, λ ≤ 5), the
# unsafe share over [0, 1] while the reward moves over several units, so λ needs room far above 5 there.
BASE = ["optim.lr=1e-4", "lagrange.lambda_init=1.0"]
FAST = ["optim.lr=3e-4", "lagrange.lambda_init=1.0"]  # the demo's policy learning rate
CHANCE_020 = ["lagrange.constraint=unsafe_rate", "lagrange.threshold=0.2"]


def pi(ki: float) -> list[str]:
    """A PI controller for λ (kp 10, no derivative term, λ ≤ 100) with integral gain ``ki``."""
    return ["lagrange.method=pid", "lagrange.kp=10", f"lagrange.ki={ki}", "lagrange.kd=0", "lagrange.lambda_max=100"]


CONFIGS = {
    "mean_cost_d0": [*BASE, "lagrange.constraint=mean_cost", "lagrange.threshold=0.0", "lagrange.lr=0.004",
                     "lagrange.lambda_max=5"],
    "unsafe_rate_0.05": [*BASE, "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.05", "lagrange.lr=0.1",
                         "lagrange.lambda_max=100"],
    "unsafe_rate_0.20": [*BASE, "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.2", "lagrange.lr=0.1",
                         "lagrange.lambda_max=100"],
    # d = 0.20 with a 5x slower λ: the rule's step lr·λ·(J_C − d) grows with λ, and at 0.1 λ swings
    # between its cap and a few units at this threshold instead of settling.
    "unsafe_rate_0.20_lr0.02": [*BASE, "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.2",
                                "lagrange.lr=0.02", "lagrange.lambda_max=100"],
    # d = 0.20 with a PI(D) controller instead (lagrange.method=pid): λ = kp·e + ki·Σe (+ kd·Δe), e = J_C − d.
    # The proportional term answers at once; a small integral does not wind up to the cap while the
    # policy is still slow to follow λ (the gradient rule sits at λ_max for ~100 steps, then overshoots).
    "unsafe_rate_0.20_pid": [*BASE, "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.2",
                             "lagrange.method=pid", "lagrange.kp=10", "lagrange.ki=0.2", "lagrange.kd=0",
                             "lagrange.lambda_max=100"],
    "unsafe_rate_0.20_pid_kd": [*BASE, "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.2",
                                "lagrange.method=pid", "lagrange.kp=10", "lagrange.ki=0.2", "lagrange.kd=100",
                                "lagrange.lambda_max=100"],
    # Half the integral gain: a smaller wind-up while the policy lags, a slower climb afterwards.
    "unsafe_rate_0.20_pi_ki0.1": [*BASE, "lagrange.constraint=unsafe_rate", "lagrange.threshold=0.2",
                                  "lagrange.method=pid", "lagrange.kp=10", "lagrange.ki=0.1", "lagrange.kd=0",
                                  "lagrange.lambda_max=100"],
    # d = 0.20 at the demo's policy learning rate (3e-4 instead of 1e-4): the policy follows λ in about a
    # third of the steps, so λ has less time to overshoot (the gradient rule) or wind up (PI).
    "unsafe_rate_0.20_policy_lr3e-4": [*FAST, *CHANCE_020, "lagrange.lr=0.1", "lagrange.lambda_max=100"],
    "unsafe_rate_0.20_pi_policy_lr3e-4": [*FAST, *CHANCE_020, *pi(0.1)],
    # The same with 5x and 10x the KL penalty (the preset's ppo.kl_coeff is 0.01): a policy held nearer the
    # SFT model's answers has less room to find answers the cost model has never seen.
    "unsafe_rate_0.20_pi_policy_lr3e-4_kl0.05": [*FAST, "ppo.kl_coeff=0.05", *CHANCE_020, *pi(0.1)],
    "unsafe_rate_0.20_pi_policy_lr3e-4_kl0.1": [*FAST, "ppo.kl_coeff=0.1", *CHANCE_020, *pi(0.1)],
    "unsafe_rate_0.20_pi_ki0.2_policy_lr3e-4_kl0.05": [*FAST, "ppo.kl_coeff=0.05", *CHANCE_020, *pi(0.2)],
    "rectified_d0": [*BASE, "lagrange.constraint=rectified", "lagrange.threshold=0.0", "lagrange.lr=0.004",
                     "lagrange.lambda_max=5"],
    # The preset's own RL stages as the demo runs them (its constraint, learning rate and 150-step budget;
    # run with --steps 150): PPO-Lag against the critic-free modes at the same episodes per step.
    "preset_ppo_lag": [],
    "preset_grpo_lag": [],
    "preset_rloo_lag": [],
    "preset_grpo": [],
}
DEFAULT_CONFIGS = ("mean_cost_d0", "unsafe_rate_0.05", "unsafe_rate_0.20", "rectified_d0")


def stage_of(name: str) -> str:
    """The trainer stage of a configuration: what follows "preset_", else ppo_lag."""
    return name.removeprefix("preset_") if name.startswith("preset_") else "ppo_lag"


def models_for_seed(out: Path, seed: int) -> tuple[Path, Path, Path]:
    """SFT, reward and cost models of the preset for ``seed`` (reused when already there)."""
    from saferlhf.pipeline import build_base_model
    from saferlhf.trainers.preference import train_preference
    from saferlhf.trainers.sft import train_sft

    preset = resolve_preset("tiny-cpu")
    base = build_base_model(out / "base", seed=seed)
    paths = {}
    for stage, model, runner in (("sft", base, train_sft), ("rm", None, train_preference),
                                 ("cm", None, train_preference)):
        model = model or paths["sft"]
        if not (out / stage / "model" / "config.json").is_file():
            runner(build_config(stage, preset, [f"run.out_dir={out / stage}", f"model.name_or_path={model}",
                                                f"run.seed={seed}", *QUIET]))
        paths[stage] = out / stage / "model"
    return paths["sft"], paths["rm"], paths["cm"]


def run(out: Path, seed: int, name: str, steps: int, sft: Path, rm: Path, cm: Path) -> dict:
    from saferlhf.evaluate.groundtruth import evaluate_policy, read_trace
    from saferlhf.monitor import read_metrics
    from saferlhf.trainers.ppo_lag import train_ppo

    run_dir = out / name
    if not (run_dir / "model" / "config.json").is_file():
        train_ppo(build_config(stage_of(name), resolve_preset("tiny-cpu"), [
            f"run.out_dir={run_dir}", f"model.name_or_path={sft}", f"ppo.reward_model={rm}", f"ppo.cost_model={cm}",
            f"run.seed={seed}", f"ppo.total_steps={steps}", "run.log_every=1", *QUIET, *CONFIGS[name]]))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/reward" in r]
    tail = rows[-max(1, len(rows) // 4):]
    nan = float("nan")
    lams = [r["train/lambda"] for r in tail if "train/lambda" in r] or [nan]  # the unconstrained modes log none
    truth = evaluate_policy(run_dir / "model", cost_model=cm)
    return {"harm_rate": truth["harm_rate"], "helpfulness": truth["helpfulness"],
            "cost_model_unsafe_rate": truth["cost_model_unsafe_rate"], "missed_harm_rate": truth["missed_harm_rate"],
            "harm_rate_ci": [truth["harm_rate_low"], truth["harm_rate_high"]],
            "tail_unsafe_rate": statistics.mean(r["train/unsafe_rate"] for r in tail),
            "tail_cost_window": statistics.mean(r.get("train/episode_cost_window", nan) for r in tail),
            "tail_lambda": statistics.mean(lams), "tail_lambda_sd": statistics.pstdev(lams) if len(lams) > 1 else nan,
            "lambda_trace": [round(r.get("train/lambda", nan), 4) for r in read_trace(run_dir)][:: max(1, steps // 30)],
            # the training side (update epochs) per step, and the run's peak resident memory
            "learn_seconds": statistics.median(r["time/learn"] for r in rows[1:] or rows),
            "step_seconds": statistics.median(b["time"] - a["time"] for a, b in zip(rows, rows[1:])) if len(rows) > 1
            else nan,
            "peak_rss_gb": max(v for r in rows for k, v in r.items() if k.startswith("memory/") and
                               k.endswith("_peak_rss_gb")),
            "steps": len(rows)}


def _mean(values) -> float:
    return sum(values) / len(values)


def format_table(results: dict, names: list[str]) -> str:
    seeds = results["seeds"]
    lines = [f"{results['steps']} steps, seeds {seeds}; ground truth of the final policies on 256 held-out "
             "prompts x 2",
             f"{'configuration':18} {'harm (mean)':>11} {'per seed':>24} {'helpful':>8} {'tail unsafe':>11} "
             f"{'cm unsafe':>9} {'missed':>6} {'tail J_C':>9} {'tail λ':>12} {'learn s/step':>12} {'peak RSS GB':>11}"]

    def row(name: str, per_seed: dict, tail: bool) -> str:
        harms = [per_seed[s]["harm_rate"] for s in seeds]
        line = (f"{name:18} {_mean(harms):11.3f} {' '.join(f'{h:.3f}' for h in harms):>24} "
                f"{_mean([per_seed[s]['helpfulness'] for s in seeds]):8.3f}")
        if tail:
            line += (f" {_mean([per_seed[s]['tail_unsafe_rate'] for s in seeds]):11.3f}"
                     f" {_mean([per_seed[s]['cost_model_unsafe_rate'] for s in seeds]):9.3f}"
                     f" {_mean([per_seed[s]['missed_harm_rate'] for s in seeds]):6.3f}"
                     f" {_mean([per_seed[s]['tail_cost_window'] for s in seeds]):+9.3f}"
                     f" {_mean([per_seed[s]['tail_lambda'] for s in seeds]):6.2f}"
                     f"±{_mean([per_seed[s]['tail_lambda_sd'] for s in seeds]):.2f}")
            if all("learn_seconds" in per_seed[s] for s in seeds):
                line += (f" {_mean([per_seed[s]['learn_seconds'] for s in seeds]):12.3f}"
                         f" {_mean([per_seed[s]['peak_rss_gb'] for s in seeds]):11.2f}")
        return line

    lines.append(row("SFT", results["sft"], tail=False))
    lines += [row(name, results["runs"][name], tail=True) for name in names]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("runs/equilibrium"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    from saferlhf.evaluate.groundtruth import evaluate_policy

    t0 = time.perf_counter()
    results: dict = {"steps": args.steps, "seeds": seeds, "sft": {}, "runs": {n: {} for n in names}}
    for seed in seeds:
        out = args.out / f"seed-{seed}"
        sft, rm, cm = models_for_seed(out, seed)
        truth = evaluate_policy(sft)
        results["sft"][seed] = {"harm_rate": truth["harm_rate"], "helpfulness": truth["helpfulness"]}
        for name in names:
            print(f"[equilibrium] seed {seed} {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
            results["runs"][name][seed] = run(out, seed, name, args.steps, sft, rm, cm)
    results["seconds"] = time.perf_counter() - t0

    print(format_table(results, names))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
