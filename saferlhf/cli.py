"""``saferlhf <command>``: the command line of every stage.

    saferlhf sft|rm|cm|ppo-lag|ppo|ppo-rs|grpo-lag|rloo-lag|grpo|rloo|dpo --config FILE [key=value ...]
                                                        one stage (``--help`` lists every key)
    saferlhf data check PATH --kind {preference,sft,prompt} [--json]
    saferlhf demo [--out DIR] [--json] [--no-rl] [--rounds 1|2] [--seeds K] [--preset tiny-cpu|smollm2]
                                                        the main job: two Safe RLHF rounds on the toy world
    saferlhf round --out DIR --policy MODEL_DIR [--round K] [--previous REPORT] [--prompts SPEC ...]
                   [--data PREV.jsonl ...] [--labels toy|judge|annotate] [--sheet FILLED.csv]
                   [--config PRESET] [key=value ...]   one Safe RLHF round, resumable by stage
    saferlhf eval --model DIR --prompts SET_OR_FILE [--reward-model DIR] [--cost-model DIR] [--samples N]
                  [--max-new-tokens N] [--temperature T] [--run DIR] [--out DIR] [--json]
                                                        a policy's reward, cost and harmful rate with 95% CIs
    saferlhf arena --model-a DIR --model-b DIR --prompts SET_OR_FILE --reward-model DIR --cost-model DIR
                   [--out DIR] [--json]                 two policies head to head: win rates, safe/unsafe table
    saferlhf chat MODEL [MODEL_B] [--max-new-tokens N] [--temperature T] [--system TEXT]
                                                        interactive, streaming; two models answer as [A] and [B]
    saferlhf bench memory --model NAME [--zero-stage N] [--world-size N] [--micro-batch N] [--seq-len N] [--json]
                                                        per-GPU memory of a PPO step: does it fit?
    saferlhf bench step [--model tiny|20m|smollm2] [--nproc N] [--zero-stage N] [--profile] [--memory] [--json]
                                                        PPO-Lag steps, the original design vs saferlhf
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from saferlhf.config import Config, ConfigError, build_config, describe, resolve_preset

STAGE_COMMANDS = {"sft": "sft", "rm": "rm", "cm": "cm", "ppo-lag": "ppo_lag", "ppo": "ppo", "ppo-rs": "ppo_rs",
                  "grpo-lag": "grpo_lag", "rloo-lag": "rloo_lag", "grpo": "grpo", "rloo": "rloo", "dpo": "dpo"}
RL_STAGES = ("ppo_lag", "ppo", "ppo_rs", "grpo_lag", "rloo_lag", "grpo", "rloo")  # one trainer loop
USAGE = __doc__


def _stage_parser(command: str) -> argparse.ArgumentParser:
    # The code defaults, unvalidated: a critic-free stage refuses them as they are (samples_per_prompt 1).
    keys = "\n".join(describe(Config()))
    parser = argparse.ArgumentParser(
        prog=f"saferlhf {command}",
        description=f"Run the {command} stage. Settings come from --config, then key=value overrides.",
        epilog="config keys (dotted) and their defaults:\n" + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a preset YAML file, or the name of a shipped preset (tiny-cpu, ...)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint (run.resume=true)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    return parser


def run_stage(command: str, argv: list[str]) -> int:
    args = _stage_parser(command).parse_args(argv)
    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    stage = STAGE_COMMANDS[command]
    try:
        cfg = build_config(stage, resolve_preset(args.config) if args.config else None, overrides)
    except ConfigError as e:
        print(f"saferlhf {command}: {e}", file=sys.stderr)
        return 2
    if stage == "sft":
        from saferlhf.trainers.sft import train_sft as runner
    elif stage == "dpo":
        from saferlhf.trainers.dpo import train_dpo as runner
    elif stage in RL_STAGES:
        from saferlhf.trainers.ppo_lag import train_ppo as runner
    else:
        from saferlhf.trainers.preference import train_preference as runner
    final = runner(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in final.items() if isinstance(v, (int, float))}))
    return 0


def run_demo_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="saferlhf demo",
                                     description="Two Safe RLHF rounds on the toy world, on CPU: SFT, reward and "
                                                 "cost models, PPO / PPO-Lag / reward shaping (round 1), then "
                                                 "red-teaming, new labels, new models and PPO-Lag again (round 2).")
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--preset", default="tiny-cpu",
                        help="preset of every stage: tiny-cpu (default; a tiny Llama trained from scratch), smollm2 "
                             "(from the pretrained SmolLM2-135M-Instruct; installed by scripts/install.sh) or a file")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of ground-truth metrics")
    parser.add_argument("--no-rl", action="store_true", help="stop after the SFT, reward and cost models")
    parser.add_argument("--rounds", type=int, default=2, choices=(1, 2), help="Safe RLHF rounds (default: 2)")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="run the whole demo for K seeds (the preset's seed, +1, ...) and report means with "
                             "95%% intervals across seeds and every seed's value (default: 1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage")
    args = parser.parse_args(argv)
    from saferlhf.pipeline import DemoError, format_table, run_demo, summary

    try:
        result = run_demo(args.out, preset=args.preset, overrides=args.overrides, rl=not args.no_rl,
                          rounds=args.rounds, seeds=args.seeds)
    except DemoError as e:
        print(f"saferlhf demo: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nreport: {result.out_dir / 'report.md'}")
    if args.json:
        print(json.dumps(summary(result)))
    return 0


def _bench_memory(argv: list[str]) -> int:
    from saferlhf.memory import main as memory_main

    return memory_main(argv)


def _bench_step(argv: list[str]) -> int:
    from saferlhf.bench import main as step_main

    return step_main(argv)


BENCH_COMMANDS = {"memory": _bench_memory, "step": _bench_step}


def run_bench_command(argv: list[str]) -> int:
    """``saferlhf bench SUBCOMMAND ...``: dispatch on the subcommand."""
    usage = f"usage: saferlhf bench {{{','.join(BENCH_COMMANDS)}}} [options] (--help after one for its options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in BENCH_COMMANDS:
        print(f"saferlhf bench: unknown subcommand '{argv[0]}'\n{usage}", file=sys.stderr)
        return 2
    return BENCH_COMMANDS[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in STAGE_COMMANDS:
        return run_stage(command, rest)
    if command == "data":
        if not rest or rest[0] != "check":
            print("usage: saferlhf data check PATH --kind {preference,sft,prompt} [--json]", file=sys.stderr)
            return 2
        from saferlhf.data.check import main as check_main

        return check_main(rest[1:])
    if command == "demo":
        return run_demo_command(rest)
    if command == "round":
        from saferlhf.rounds import main as round_main

        return round_main(rest)
    if command in ("eval", "arena"):
        from saferlhf.evaluate.evaluate import arena_main, eval_main

        return (eval_main if command == "eval" else arena_main)(rest)
    if command == "chat":
        from saferlhf.chat import main as chat_main

        return chat_main(rest)
    if command == "bench":
        return run_bench_command(rest)
    print(f"saferlhf: unknown command '{command}'\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
