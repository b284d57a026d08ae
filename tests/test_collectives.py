"""Collectives that work on every backend: every collective of the package goes through saferlhf.distributed,
and the process group the package creates on GPUs serves every tensor its collectives see.

An NCCL-only group (what the package created on GPUs before) accepts only CUDA tensors, and the trainer
reduces host values (metric vectors, the multiplier's (sum, count), agreement flags) — so a run on several
GPUs stopped at its first step's metrics. A CPU machine cannot run NCCL; the world-size-2 run below
records every collective its processes issue (a ``sitecustomize`` wraps torch.distributed in the
launched processes) with the caller and the tensor's device, and checks each against the backend the
package would create on GPUs: DeepSpeed's tensors live on the model's device (CUDA there), the package's
own are host tensors.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
from helpers import REPO, run_cli

from saferlhf.distributed import backend_devices, default_backend
from saferlhf.trainers.common import read_metrics

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "all_to_all_single", "barrier", "gather_object", "scatter_object_list"}

SITECUSTOMIZE = '''
import json, os, traceback
import torch.distributed as dist

_LOG = os.environ["SAFERLHF_COLLECTIVE_LOG"]
_NAMES = {names!r}


def _origin():
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" in path:
            continue
        if "/saferlhf/" in path and "/site-packages/" not in path or path.endswith("/saferlhf/distributed.py"):
            return "saferlhf:" + path.rsplit("/saferlhf/", 1)[1]
        return "other:" + path.rsplit("/", 2)[-2]
    return "other:?"


def _wrap(name, fn):
    def wrapper(*args, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if hasattr(a, "device") and hasattr(a, "dtype")]
        with open(_LOG + "." + os.environ.get("RANK", "0"), "a") as fh:
            fh.write(json.dumps({{"op": name, "origin": _origin(),
                                 "devices": sorted({{t.device.type for t in tensors}})}}) + "\\n")
        return fn(*args, **kwargs)
    return wrapper


for _name in _NAMES:
    if hasattr(dist, _name):
        setattr(dist, _name, _wrap(_name, getattr(dist, _name)))
'''


def test_no_collective_outside_the_distributed_module():
    """torch.distributed collectives are called in saferlhf/distributed.py only (the one place that knows the
    backend); everything else calls its helpers."""
    offenders = []
    for path in sorted((REPO / "saferlhf").rglob("*.py")):
        if path == REPO / "saferlhf" / "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVES):
                continue
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    assert not offenders, offenders


def test_backend_strings_and_the_devices_they_serve():
    assert default_backend(cuda=False) == "gloo"
    assert backend_devices("nccl") == {"cuda"}  # what the package created on GPUs before
    assert backend_devices(default_backend(cuda=True)) == {"cpu", "cuda"}
    assert backend_devices("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_rank_zero3_run_with_token_budgets_issues_only_collectives_the_gpu_backend_serves(toy_models, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(names=sorted(COLLECTIVES - {"barrier"})))
    log = tmp_path / "collectives.jsonl"
    out = tmp_path / "run"
    args = ["ppo-lag", "--config", "tiny-cpu", f"model.name_or_path={toy_models.sft}",
            f"ppo.reward_model={toy_models.rm}", f"ppo.cost_model={toy_models.cm}", f"run.out_dir={out}",
            "run.max_steps=2", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            "deepspeed.zero_stage=3", "rollout.backend=hf", "rollout.max_new_tokens=24", "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=8", "ppo.micro_batch_tokens=72", "optim.micro_batch_tokens=96",
            "model.packing=true"]
    env = {"PYTHONPATH": f"{site}:{REPO}", "SAFERLHF_COLLECTIVE_LOG": str(log)}
    result = run_cli(args, nproc=2, timeout=480, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float))

    served = backend_devices(default_backend(cuda=True))
    calls = [json.loads(line) for rank in (0, 1) for line in Path(f"{log}.{rank}").read_text().splitlines()]
    ours = [c for c in calls if c["origin"].startswith("saferlhf:")]
    assert len(calls) > 100 and len(ours) >= 4  # DeepSpeed's ZeRO-3 gathers, and the trainer's reductions
    assert {c["origin"] for c in ours} == {"saferlhf:distributed.py"}
    for call in ours:  # host tensors on a GPU run too: the GPU backend must serve the CPU
        assert set(call["devices"]) <= served, call
    # DeepSpeed's tensors are on the model's device, CUDA on a GPU run: served as well.
    assert "cuda" in served
