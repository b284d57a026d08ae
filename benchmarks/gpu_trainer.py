"""The trainer itself on one GPU: the real CLI stages through DeepSpeed, timed phase by phase.

    # on a machine with PyPI: the wheels a bare GPU image lacks (DeepSpeed as a pure-Python wheel, ...)
    python benchmarks/gpu_trainer.py prepare --wheels benchmarks/wheels
    # on the GPU (a checkout, torch + triton + transformers installed, nothing else needed)
    python benchmarks/gpu_trainer.py run --wheels benchmarks/wheels [--model gpu] [--zero 2,3] [--json FILE]

``run`` installs what is missing from ``--wheels`` (``pip --no-index``, into ``<out>/site``), builds a
randomly initialised Llama of ``benchmarks/bench_plain_step.py``'s shape (``gpu``: 16 layers of width 1024,
the 128,256-token vocabulary of Llama 3, ~0.5B parameters) with the toy world's tokenizer, reward and
cost score models on the same backbone, and then, for every ZeRO stage of ``--zero`` and with packed
and padded passes, runs ``saferlhf sft``, ``saferlhf rm`` and ``saferlhf ppo-lag`` (``rollout.backend=hf``:
no vLLM on the image) for ``--steps`` steps each, in bf16, as fresh processes. It reports per stage the
median seconds per step after the first, tokens per second and peak memory, per PPO phase the
median seconds and peak memory, and ``packed_speedup`` (training side of PPO-Lag, padded / packed).

Last, the plain-torch step benchmark (``bench_plain_step.py``) runs the same model on the trainer's batch
(rollout, mini-batch, prompt and answer lengths, fixed answers of ``--answer`` tokens) and the ratio of
the trainer's training-side time per step (ZeRO-2, padded) to it says whether the trainer is as fast
as its plain-torch benchmark. Everything is printed as one table and one JSON line.

``--model tiny`` with ``--device cpu`` runs the same flow on a CPU in a minute (the test of this script).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Modules saferlhf needs beyond torch, triton and transformers (the image's), and the PyPI package of each.
NEEDED = {"deepspeed": "deepspeed==0.19.8", "hjson": "hjson", "pydantic": "pydantic>=2", "yaml": "pyyaml",
          "matplotlib": "matplotlib", "msgpack": "msgpack", "cpuinfo": "py-cpuinfo", "ninja": "ninja",
          "tqdm": "tqdm", "psutil": "psutil", "einops": "einops"}
# What those need in turn (numpy, packaging and typing-extensions come with torch and transformers).
DEPENDENCIES = ["pydantic-core", "annotated-types", "typing-inspection", "contourpy", "cycler", "fonttools",
                "kiwisolver", "pillow", "pyparsing", "python-dateutil", "six"]
# Wheel (distribution) name → the module it provides, where they differ.
MODULE_OF = {"pyyaml": "yaml", "py_cpuinfo": "cpuinfo", "python_dateutil": "dateutil", "pillow": "PIL",
             "fonttools": "fontTools"}
PPO_PHASES = ("generate", "score", "experience", "actor", "critics")
TRAINING = ("score", "experience", "actor", "critics")


def missing_modules() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def prepare(wheels: Path, python_version: str) -> None:
    """Download (PyPI) the wheels of NEEDED and DEPENDENCIES for the GPU image's Python; DeepSpeed is built."""
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), NEEDED["deepspeed"]],
                   check=True)
    others = [spec for module, spec in NEEDED.items() if module != "deepspeed"] + DEPENDENCIES
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), *others], check=True)
    total = sum(f.stat().st_size for f in wheels.iterdir()) / 2**20
    print(f"{len(list(wheels.iterdir()))} wheels, {total:.1f} MiB in {wheels}")


def _module(wheel: str) -> str:
    name = wheel.split("-")[0].lower()
    return MODULE_OF.get(name, name)


def install_missing(wheels: Path | None, site: Path) -> None:
    """Install the wheels of modules this Python lacks into ``site`` (no index, no dependency resolution)."""
    missing = missing_modules()
    if not missing:
        return
    if wheels is None:
        raise SystemExit(f"missing modules {missing}: run `prepare --wheels DIR` where PyPI is reachable and pass "
                         f"--wheels DIR")
    chosen = [f for f in sorted(os.listdir(wheels)) if f.endswith(".whl")
              and importlib.util.find_spec(_module(f)) is None]
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
                    *chosen], check=True, cwd=wheels)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    still = missing_modules()
    if still:
        raise SystemExit(f"still missing after installing the wheels: {still}")


def build_models(out: Path, model: str) -> dict[str, Path]:
    """Actor, reward and cost checkpoints of bench_plain_step.py's ``model`` shape with the toy tokenizer."""
    sys.path.insert(0, str(HERE))
    from bench_plain_step import MODELS as SHAPES  # noqa: E402
    from transformers import LlamaConfig, LlamaForCausalLM

    from saferlhf.data import toyworld
    from saferlhf.models.hf import save_causal_lm
    from saferlhf.models.score_model import ScoreModel
    from saferlhf.models.tiny import train_tokenizer

    paths = {k: out / k for k in ("actor", "reward", "cost")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    import torch

    tokenizer = train_tokenizer(toyworld.corpus(0), vocab_size=512)
    config = LlamaConfig(**SHAPES[model], max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    save_causal_lm(LlamaForCausalLM(config), paths["actor"], tokenizer=tokenizer)
    for i, kind in enumerate(("reward", "cost")):
        torch.manual_seed(1 + i)
        ScoreModel.from_pretrained(paths["actor"], kind=kind).save_pretrained(paths[kind], tokenizer=tokenizer)
    return paths


def run_stage(stage: str, overrides: list[str], env: dict[str, str], log: Path) -> None:
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from checkout import import_saferlhf; "
            "import_saferlhf(); from saferlhf.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, stage, "--config", str(REPO / "configs" / "tiny-cpu.yaml"), *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        result = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"saferlhf {stage} failed (exit {result.returncode}); {log}:\n{log.read_text()[-3000:]}")


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarize_supervised(run_dir: Path) -> dict[str, float]:
    rows = [r for r in read_rows(run_dir) if "time/step" in r][1:]  # the first step warms up
    return {"step_s": statistics.median(r["time/step"] for r in rows),
            "tokens_per_s": statistics.median(r["train/tokens_per_second"] for r in rows),
            "peak_gb": max(r.get("memory/peak_gb", 0.0) for r in rows)}


def summarize_ppo(run_dir: Path) -> dict[str, float]:
    rows = [r for r in read_rows(run_dir) if "time/score" in r][1:]
    out = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in rows) for p in PPO_PHASES}
    out["train"] = sum(out[p] for p in TRAINING)
    out["generate_tokens_per_s"] = statistics.median(r["rollout/tokens_per_second"] for r in rows)
    for key in sorted({k for r in rows for k in r if k.startswith("memory/")}):
        out[key.removeprefix("memory/")] = max(r.get(key, 0.0) for r in rows)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download the wheels a bare GPU image lacks")
    prep.add_argument("--wheels", type=Path, required=True)
    prep.add_argument("--python-version", default="3.12", help="the GPU image's Python (3.12)")
    run = sub.add_parser("run", help="the stages on this machine's GPU")
    run.add_argument("--wheels", type=Path, default=None)
    run.add_argument("--model", default="gpu", choices=("tiny", "20m", "gpu"))
    run.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    run.add_argument("--zero", default="2,3", help="ZeRO stages (2,3)")
    run.add_argument("--steps", type=int, default=4, help="steps per stage, the first a warm-up (4)")
    run.add_argument("--rollout", type=int, default=32, help="PPO prompts per step (32)")
    run.add_argument("--mini-batch", type=int, default=8, help="PPO sequences per update (8)")
    run.add_argument("--answer", type=int, default=512, help="answer length cap (512)")
    run.add_argument("--lengths", default="", help="answer lengths (default uniform:64:<answer>)")
    run.add_argument("--out", type=Path, default=Path("runs/gpu-trainer"))
    run.add_argument("--no-plain-step", action="store_true", help="skip the plain-torch comparison")
    run.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.wheels, args.python_version)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    install_missing(args.wheels, args.out / "site")
    sys.path.insert(0, str(HERE))
    from checkout import import_saferlhf

    import_saferlhf()
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for the CPU smoke run)")
    models = build_models(args.out / "models", args.model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.out / "site"), str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    lengths = args.lengths or f"uniform:{min(64, args.answer)}:{args.answer}"
    precision = ["model.dtype=bfloat16", "deepspeed.bf16=true"] if cuda else ["model.dtype=float32"]
    common = [f"run.max_steps={args.steps}", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
              "run.save_every=0", "model.max_length=512", *precision]
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                    "steps": args.steps, "rollout": args.rollout, "mini_batch": args.mini_batch, "lengths": lengths,
                    "torch": torch.__version__, "runs": {}}
    t0 = time.perf_counter()
    for zero in [int(z) for z in args.zero.split(",")]:
        for packing in ("true", "false"):
            name = f"zero{zero}-{'packed' if packing == 'true' else 'padded'}"
            base = [*common, f"deepspeed.zero_stage={zero}", f"model.packing={packing}"]
            result = {}
            for stage, model_path, extra in (
                ("sft", models["actor"], ["optim.micro_batch_size=16"]),
                ("rm", models["actor"], ["optim.micro_batch_size=16"]),
                ("ppo-lag", models["actor"], [
                    f"ppo.reward_model={models['reward']}", f"ppo.cost_model={models['cost']}", "rollout.backend=hf",
                    f"rollout.max_new_tokens={args.answer}", f"ppo.rollout_batch_size={args.rollout}",
                    f"ppo.mini_batch_size={args.mini_batch}", "data.ptx=[]", f"rollout.synthetic_lengths={lengths}"])):
                run_dir = args.out / name / stage
                print(f"[gpu trainer] {name} {stage} ({time.perf_counter() - t0:.0f} s)", flush=True)
                run_stage(stage, [f"model.name_or_path={model_path}", f"run.out_dir={run_dir}", *base, *extra], env,
                          args.out / name / f"{stage}.log")
                result[stage] = summarize_ppo(run_dir) if stage == "ppo-lag" else summarize_supervised(run_dir)
            report["runs"][name] = result
    for zero in [int(z) for z in args.zero.split(",")]:
        runs = report["runs"]
        report[f"zero{zero}_packed_speedup"] = (runs[f"zero{zero}-padded"]["ppo-lag"]["train"]
                                                / runs[f"zero{zero}-packed"]["ppo-lag"]["train"])
    if not args.no_plain_step:
        # The trainer at ZeRO-2 with fixed answers against the plain-torch benchmark on the same batch.
        from bench_plain_step import SHAPES as STEP_SHAPES
        from bench_plain_step import measure

        name = "bench-fixed"
        run_dir = args.out / name
        run_stage("ppo-lag", [f"model.name_or_path={models['actor']}", f"run.out_dir={run_dir}", *common,
                              "deepspeed.zero_stage=2", "model.packing=false", f"ppo.reward_model={models['reward']}",
                              f"ppo.cost_model={models['cost']}", "rollout.backend=hf",
                              f"rollout.max_new_tokens={args.answer}", f"ppo.rollout_batch_size={args.rollout}",
                              f"ppo.mini_batch_size={args.mini_batch}", "data.ptx=[]",
                              f"rollout.synthetic_lengths=fixed:{args.answer}"], env, args.out / f"{name}.log")
        trainer = summarize_ppo(run_dir)
        from dataclasses import replace

        prompt = max(len(row) for row in _prompt_lengths(run_dir))
        shape = replace(STEP_SHAPES[args.model], rollout=args.rollout, mini_batch=args.mini_batch,
                        prompt_len=prompt, response_len=args.answer)
        plain = measure(args.model, args.device, steps=2, rounds=1, shape=shape)
        plain_train = plain["configs"]["saferlhf"]["training_s"]
        report["plain_step"] = {"trainer_train_s": trainer["train"], "plain_torch_train_s": plain_train,
                                "ratio": trainer["train"] / plain_train, "prompt_len": prompt}
    report["seconds"] = time.perf_counter() - t0
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0


def _prompt_lengths(run_dir: Path) -> list[list[int]]:
    """The prompt rows the PPO run used (its prompt set), for the plain-torch step's prompt length."""
    from saferlhf.config import load_config_file
    from saferlhf.data.collate import PromptDataset
    from saferlhf.models.hf import load_tokenizer
    from saferlhf.trainers.data import load_splits

    cfg = load_config_file(run_dir / "config.yaml")
    prompts, _ = load_splits(cfg.data, "prompt", cfg.run.seed)
    dataset = PromptDataset(prompts[:256], load_tokenizer(cfg.model.name_or_path), cfg.model.max_length)
    return [dataset[i].input_ids.tolist() for i in range(len(dataset))]


def format_report(report: dict) -> str:
    lines = [f"{report['device']}, model {report['model']}, answers {report['lengths']}", ""]
    lines.append(f"{'run':18} {'stage':8} {'s/step':>8} {'tok/s':>10} {'peak GB':>8}")
    for name, result in report["runs"].items():
        for stage in ("sft", "rm"):
            r = result[stage]
            lines.append(f"{name:18} {stage:8} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['peak_gb']:8.2f}")
        r = result["ppo-lag"]
        phases = " ".join(f"{p} {r[p]:.3f}" for p in PPO_PHASES)
        peaks = " ".join(f"{k.removesuffix('_peak_gb')} {v:.2f}" for k, v in r.items() if k.endswith("_peak_gb"))
        lines.append(f"{name:18} ppo-lag  train {r['train']:.3f} s ({phases}); peak GB {peaks or '-'}")
    for key, value in report.items():
        if key.endswith("_packed_speedup"):
            lines.append(f"{key}: {value:.2f}x (PPO-Lag training side, padded / packed)")
    if "plain_step" in report:
        b = report["plain_step"]
        lines.append(f"trainer vs plain torch (ZeRO-2, padded, fixed answers): {b['trainer_train_s']:.3f} s / "
                     f"{b['plain_torch_train_s']:.3f} s = {b['ratio']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
