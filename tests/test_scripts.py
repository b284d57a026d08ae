"""The launch scripts in scripts/: the command line they build (dry runs), their errors, the log.

Every dry run is parsed with shlex, and the launcher part of it with the real parsers of the
deepspeed and torchrun launchers, so a misspelt launcher flag fails here. One real run trains the
tiny SFT stage for one step under torchrun.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli_env

from saferlhf.config import build_config, parse_overrides

SCRIPTS = {
    "sft.sh": "sft",
    "reward-model.sh": "rm",
    "cost-model.sh": "cm",
    "ppo-lag.sh": "ppo-lag",
    "ppo.sh": "ppo",
    "ppo-reward-shaping.sh": "ppo-rs",
    "dpo.sh": "dpo",
    "round.sh": "round",
}
PPO_SCRIPTS = ("ppo-lag.sh", "ppo.sh", "ppo-reward-shaping.sh")
TINY = str(REPO / "configs" / "tiny-cpu.yaml")


def _env(**extra: str) -> dict[str, str]:
    env = cli_env()
    env["PYTHON"] = sys.executable
    for name in ("DEEPSPEED", "TORCHRUN", "SAFERLHF_LAUNCHER"):
        env.pop(name, None)
    env.update(extra)
    return env


def _script(script: str, *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 60):
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env or _env(), timeout=timeout)


def _dry(script: str, *args: str, **kw) -> list[str]:
    """The command line a dry run prints, split into words (--dry-run first: after -- it is passed on)."""
    result = _script(script, "--dry-run", *args, **kw)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def _split(argv: list[str], command: str) -> tuple[list[str], list[str]]:
    """(launcher words up to and including `saferlhf`, the words after the saferlhf command)."""
    i = argv.index("saferlhf")
    assert argv[i + 1] == command, argv
    return argv[: i + 1], argv[i + 2:]


def _option(words: list[str], name: str) -> str:
    assert words.count(name) == 1, (name, words)
    return words[words.index(name) + 1]


def _stage_config(command: str, stage_args: list[str]):
    """The config tree the trainer would resolve from these saferlhf arguments."""
    assert stage_args[0] == "--config"
    return build_config(command.replace("-", "_"), stage_args[1], stage_args[2:])


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("node-1 slots=8\nnode-2 slots=8\n")
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_deepspeed_command_line_of_every_script(script, tmp_path, hostfile):
    command = SCRIPTS[script]
    out = tmp_path / "run"
    argv = _dry(script, "--config", TINY, "--output-dir", str(out), "--hostfile", str(hostfile),
                "--num-nodes", "2", "--num-gpus", "8", "--zero-stage", "3", "--offload", "optimizer",
                "--master-port", "29511", "optim.lr=1e-5", "--", "run.seed=7", "--resume")
    launcher, stage_args = _split(argv, command)
    assert launcher[0] == "deepspeed"
    assert _option(launcher, "--hostfile") == str(hostfile)
    assert _option(launcher, "--num_nodes") == "2" and _option(launcher, "--num_gpus") == "8"
    assert _option(launcher, "--master_port") == "29511"
    assert launcher[-2:] == ["--module", "saferlhf"] and "--no_local_rank" in launcher
    assert stage_args == ["--config", TINY, f"run.out_dir={out}", "deepspeed.zero_stage=3",
                          "deepspeed.offload=optimizer", "optim.lr=1e-5", "run.seed=7", "--resume"]
    cfg = _stage_config(command, stage_args[:-1])
    assert (cfg.run.out_dir, cfg.deepspeed.zero_stage, cfg.deepspeed.offload) == (str(out), 3, "optimizer")
    assert (cfg.optim.lr, cfg.run.seed) == (1e-5, 7)


def test_deepspeed_accepts_the_launcher_flags(hostfile):
    from deepspeed.launcher.runner import parse_args

    argv = _dry("ppo-lag.sh", "--config", TINY, "--hostfile", str(hostfile), "--num-gpus", "8",
                "--master-port", "29512", "--master-addr", "node-1", "ppo.kl_coeff=0.02")
    args = parse_args(argv[1:])
    assert (args.hostfile, args.num_gpus, args.master_port, args.master_addr) == (str(hostfile), 8, 29512, "node-1")
    assert args.module and args.no_local_rank and args.user_script == "saferlhf"
    assert args.user_args[0] == "ppo-lag" and args.user_args[-1] == "ppo.kl_coeff=0.02"
    args = parse_args(_dry("sft.sh", "--config", TINY, "--include", "node-1:0,1@node-2")[1:])
    assert args.include == "node-1:0,1@node-2" and args.num_gpus == -1 and args.num_nodes == -1


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_torchrun_launcher(how):
    from torch.distributed.run import get_args_parser

    if how == "flag":
        argv = _dry("sft.sh", "--config", TINY, "--launcher", "torchrun", "--num-gpus", "2", "--master-port", "29513")
    else:
        argv = _dry("sft.sh", "--config", TINY, "--num-gpus", "2", "--master-port", "29513",
                    env=_env(SAFERLHF_LAUNCHER="torchrun"))
    assert argv[0] == "torchrun"
    args = get_args_parser().parse_args(argv[1:])
    assert (args.nproc_per_node, args.master_port, args.module) == ("2", 29513, True)
    assert args.training_script == "saferlhf" and args.training_script_args[:3] == ["sft", "--config", TINY]
    one = _dry("sft.sh", "--config", TINY, "--launcher", "torchrun")
    assert _option(one, "--nproc_per_node") == "1"


def test_launcher_executables_come_from_the_environment():
    argv = _dry("dpo.sh", "--config", TINY, env=_env(DEEPSPEED="/opt/ds/bin/deepspeed"))
    assert argv[0] == "/opt/ds/bin/deepspeed"
    argv = _dry("dpo.sh", "--config", TINY, "--launcher", "torchrun",
                env=_env(TORCHRUN="python3 -m torch.distributed.run"))
    assert argv[:4] == ["python3", "-m", "torch.distributed.run", "--nproc_per_node"]


def test_default_master_port_is_a_free_port():
    port = int(_option(_dry("reward-model.sh", "--config", TINY), "--master_port"))
    assert 0 < port < 65536
    with socket.socket() as s:  # free a moment ago, so (barring a race) free now
        s.bind(("", port))


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_default_config_and_output_dir_come_from_the_preset(cwd, tmp_path):
    where = REPO if cwd == "repo" else tmp_path
    for script, out_dir in [("sft.sh", "runs/llama-7b/sft"), ("ppo-reward-shaping.sh", "runs/llama-7b/ppo-rs"),
                            ("round.sh", "runs/round")]:
        _, stage_args = _split(_dry(script, cwd=where), SCRIPTS[script])
        config = Path(stage_args[1])
        assert config.name == "llama-7b-8xgpu.yaml" and (where / config).is_file()
        assert stage_args[2] == f"run.out_dir={out_dir}"
    # The tiny preset names no run directory: runs/<stage>, like the trainer's own default.
    assert _split(_dry("ppo-lag.sh", "--config", "tiny-cpu"), "ppo-lag")[1][2] == "run.out_dir=runs/ppo_lag"


def test_run_out_dir_override_is_the_output_directory(tmp_path):
    argv = _dry("cost-model.sh", "--config", TINY, "--output-dir", str(tmp_path / "a"), f"run.out_dir={tmp_path / 'b'}")
    stage_args = _split(argv, "cm")[1]
    assert [a for a in stage_args if a.startswith("run.out_dir=")] == [f"run.out_dir={tmp_path / 'b'}"]


@pytest.mark.parametrize("script", PPO_SCRIPTS)
def test_ppo_model_and_data_flags(script):
    command = SCRIPTS[script]
    stage_args = _split(_dry(script, "--config", TINY, "--model", "runs/sft/model", "--reward-model", "runs/rm/model",
                             "--cost-model=my models/cm", "--data", "toy-prompts/train",
                             "--data", "prompts:0.5:/data/a b.jsonl", "--ptx-data", "toy-sft/train"), command)[1]
    cfg = _stage_config(command, stage_args)
    assert cfg.model.name_or_path == "runs/sft/model"
    assert (cfg.ppo.reward_model, cfg.ppo.cost_model) == ("runs/rm/model", "my models/cm")
    assert cfg.data.train == ["toy-prompts/train", "prompts:0.5:/data/a b.jsonl"]
    assert cfg.data.ptx == ["toy-sft/train"]


def test_values_keep_their_type_as_config_strings():
    stage_args = _split(_dry("sft.sh", "--config", TINY, "--model", "123", "--data", "true", "--data", 'odd"name\\x',
                             "--eval-data", "toy-sft/test", "--output-dir", "runs/a #1"), "sft")[1]
    tree = parse_overrides(stage_args[2:])
    assert tree["model"]["name_or_path"] == "123" and tree["run"]["out_dir"] == "runs/a #1"
    assert tree["data"] == {"train": ["true", 'odd"name\\x'], "eval": ["toy-sft/test"]}


@pytest.mark.parametrize("flag, key", [("none", "none"), ("optimizer", "optimizer"), ("parameter", "all"),
                                       ("all", "all")])
def test_offload_maps_onto_the_config_key(flag, key):
    stage_args = _split(_dry("sft.sh", "--config", TINY, "--zero-stage", "3", "--offload", flag), "sft")[1]
    assert stage_args[3:] == ["deepspeed.zero_stage=3", f"deepspeed.offload={key}"]
    assert _stage_config("sft", stage_args).deepspeed.offload == key


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown flag '--frobnicate'"),
    (["--reward-model", "x"], "unknown flag '--reward-model'"),  # sft has no reward model
    (["--output-dir"], "--output-dir needs a value"),
    (["--output-dir", "--num-gpus", "2"], "--output-dir needs a value"),
    (["--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3"),
    (["--zero-stage=x"], "--zero-stage must be 0, 1, 2 or 3"),
    (["--offload", "disk"], "--offload must be none, optimizer, parameter or all"),
    (["--zero-stage", "2", "--offload", "parameter"], "--offload parameter/all needs --zero-stage 3"),
    (["--config", "no-such-preset.yaml"], "--config: config file not found: no-such-preset.yaml"),
    (["--num-gpus", "0"], "--num-gpus must be a positive integer"),
    (["--num-nodes", "two"], "--num-nodes must be a positive integer"),
    (["--master-port", "70000"], "--master-port must be a port number"),
    (["--hostfile", "no-such-hostfile"], "--hostfile: no such file"),
    (["--launcher", "mpirun"], "--launcher must be deepspeed or torchrun"),
    (["--launcher", "torchrun", "--num-nodes", "2"], "--num-nodes"),
    (["--include", "node-1", "--num-gpus", "2"], "--include/--exclude cannot be combined"),
    (["--dry-run=yes"], "--dry-run takes no value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_input_exits_2_naming_the_flag(args, message):
    config = [] if any(a.startswith("--config") for a in args) else ["--config", TINY]
    result = _script("sft.sh", "--dry-run", *config, *args)
    assert result.returncode == 2, result
    assert message in result.stderr and result.stdout == ""


def test_help_lists_the_flags_of_the_stage():
    for script, extra in [("ppo-lag.sh", "--reward-model"), ("sft.sh", "--eval-data")]:
        result = _script(script, "--help")
        assert result.returncode == 0
        for flag in ("--config", "--output-dir", "--hostfile", "--num-gpus", "--zero-stage", "--offload",
                     "--master-port", "--dry-run", "--launcher", extra):
            assert flag in result.stdout
    assert "--reward-model" not in _script("sft.sh", "--help").stdout


@pytest.mark.parametrize("status", [0, 3])
def test_log_is_teed_and_the_exit_status_kept(status, tmp_path):
    """A stand-in launcher (prints on both streams, exits STATUS): the log and the status, no training."""
    stub = tmp_path / "launcher"
    stub.write_text(f'#!/usr/bin/env bash\necho "out: $*"\necho "err: launcher failed" >&2\nexit {status}\n')
    stub.chmod(0o755)
    out = tmp_path / "nested" / "run"
    result = _script("dpo.sh", "--config", TINY, "--output-dir", str(out), "dpo.beta=0.2",
                     env=_env(DEEPSPEED=str(stub)))
    assert result.returncode == status
    log = (out / "train.log").read_text()
    assert "out: " in log and "saferlhf dpo --config" in log and "dpo.beta=0.2" in log
    assert "err: launcher failed" in log
    assert ("exited with status 3" in log) == (status == 3)
    assert "out: " in result.stdout  # teed, not only logged


def test_real_sft_run_under_torchrun(tmp_path):
    """One SFT step of the tiny model through scripts/sft.sh and torchrun; then a failing run."""
    from saferlhf.pipeline import build_base_model

    base = build_base_model(tmp_path / "base")
    env = _env(TORCHRUN=f"{sys.executable} -m torch.distributed.run", OMP_NUM_THREADS="1")
    out = tmp_path / "sft"
    result = _script("sft.sh", "--launcher", "torchrun", "--num-gpus", "1", "--config", "tiny-cpu",
                     "--model", str(base), "--output-dir", str(out), "run.max_steps=1", "run.progress=false",
                     "run.tensorboard=false", env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    log = (out / "train.log").read_text()
    assert '"train/loss"' in log and (out / "config.yaml").is_file() and (out / "model" / "config.json").is_file()

    bad = tmp_path / "bad"
    result = _script("sft.sh", "--launcher", "torchrun", "--num-gpus", "1", "--config", "tiny-cpu",
                     "--output-dir", str(bad), "optim.lrr=1", env=env, timeout=300)
    assert result.returncode != 0
    assert "unknown config key 'optim.lrr'" in (bad / "train.log").read_text()
