"""DeepSpeed glue: the only module that imports deepspeed.

It starts the process group (gloo on CPU, nccl on GPU), builds the DeepSpeed config of a stage,
wraps a model into an engine (AdamW + warm-up/decay schedule), gathers ZeRO-3 partitioned
parameters into a full state dict for Hugging Face saving, and reduces metric vectors.

On CPU two DeepSpeed behaviours are turned off deliberately:
- the shared-memory all-reduce op (``deepspeed_shm_comm``) is JIT-compiled on every fresh machine
  (1–2 minutes of C++ on 2 cores) the first time a process group starts; plain gloo is used instead;
- the optimizer is torch's AdamW (``torch_adam``) instead of the C++ ``fused_adam``/``cpu_adam``
  builds, so that a cold start takes seconds. On GPU the fused CUDA Adam is used.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_ON_CPU = not torch.cuda.is_available()
if _ON_CPU:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set before the import)
import torch.distributed as dist  # noqa: E402


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def child_env() -> dict[str, str]:
    """This process's environment without the process-group variables, for a launcher started from it.

    An in-process stage sets RANK, MASTER_PORT, ... for its world of one; a child launcher (torchrun, a
    fresh ``saferlhf`` process) inheriting them would try to join that group.
    """
    return {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARIABLES}


def disable_cpu_shm_allreduce() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op incompatible so it is never JIT-built.

    ``deepspeed.ops.__compatible_ops__`` is a private, lazily probed dict; DeepSpeed consults it in
    ``deepspeed.comm.torch.build_shm_op``. Touching it here, in one place, keeps the dependency on a
    private name visible (and tested in tests/test_distributed.py).
    """
    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False


def default_backend(cuda: bool) -> str:
    """The process-group backend the package creates: ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` on GPUs.

    On GPUs DeepSpeed's collectives (gradients, ZeRO partitions) are CUDA tensors and go to NCCL.
    The package's own collectives reduce *host* values — stacked metric vectors, the Lagrange
    multiplier's (sum, count) of episode costs, flags every rank must agree on, pickled objects —
    which are read on the host right after; a gloo backend beside NCCL serves them where they are,
    so no collective of the package depends on which device a tensor happens to live on (an
    NCCL-only group fails on the first CPU tensor, which is how the trainer used to stop at its first
    step's metrics on several GPUs). Every collective of the package goes through this module.
    """
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def backend_devices(backend: str) -> set[str]:
    """The tensor device types a backend string serves: ``nccl`` → {cuda}, ``cpu:gloo,cuda:nccl`` → both."""
    served: set[str] = set()
    for part in backend.lower().split(","):
        device, _, name = part.rpartition(":")
        if device:
            served.add(device)
        else:  # a bare backend name serves its own device types
            served.update({"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"},
                           "ccl": {"cpu", "xpu"}}.get(name, set()))
    return served


def init_distributed(backend: str = "") -> DistInfo:
    """Start (or join) the process group; works under torchrun / the deepspeed launcher or alone."""
    if "RANK" not in os.environ:  # a plain `python -m saferlhf ...`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _ON_CPU:
        disable_cpu_shm_allreduce()
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or default_backend(cuda=not _ON_CPU), verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cpu_threads(requested: int = 0) -> int:
    """Threads one rank should use on the CPU: ``requested`` (0: automatic), never more than its share.

    The share is the cores this process may run on (its affinity, which cgroups and launchers narrow)
    divided by the ranks on this machine (``LOCAL_WORLD_SIZE``), at least 1, and no more than
    ``OMP_NUM_THREADS`` where that is set (several jobs sharing a machine). More threads than cores
    make every parallel region wait for a descheduled thread at its barrier; a loaded machine then
    collapses instead of slowing down.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        share = min(share, int(omp))
    return min(requested, share) if requested > 0 else share


def set_cpu_threads(requested: int = 0) -> int:
    """Apply :func:`cpu_threads` to torch (and with it the native ops' OpenMP regions); returns the count."""
    threads = cpu_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    """``values`` reduced over ranks (a new tensor on the same device; ``values`` itself is untouched)."""
    values = values.clone()
    if _world() > 1:
        dist.all_reduce(values, op=op)
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a stacked vector over ranks: one collective (e.g. the Lagrange multiplier's (sum, count))."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a stacked metric vector over ranks: one collective for all metrics."""
    return _all_reduce(values, dist.ReduceOp.SUM) / _world()


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise max of a stacked vector over ranks (e.g. failure flags that every rank must act on)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_gather_objects(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# config, schedule, engine


def ds_config(
    *,
    micro_batch_size: int,
    gradient_accumulation: int,
    world_size: int,
    zero_stage: int,
    offload: str = "none",
    bf16: bool = False,
    fp16: bool = False,
    max_grad_norm: float = 1.0,
    lr: float = 1e-5,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    train: bool = True,
) -> dict:
    """The DeepSpeed JSON config of one engine (``train=False`` for frozen inference models)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {zero_stage}")
    if offload not in ("none", "optimizer", "all"):
        raise ValueError(f"deepspeed.offload must be none, optimizer or all, got {offload!r}")
    if offload == "all" and zero_stage != 3:
        raise ValueError("deepspeed.offload=all (parameter offload) needs deepspeed.zero_stage=3")
    if bf16 and fp16:
        raise ValueError("deepspeed.bf16 and deepspeed.fp16 are exclusive")
    if not train and zero_stage in (1, 2):
        # ZeRO-1/2 partition optimizer states and gradients, which a frozen model (reference, reward and
        # cost models) does not have; DeepSpeed refuses them without an optimizer. ZeRO-3 partitions the
        # parameters themselves and stays.
        zero_stage = 0
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_prefetch_bucket_size=5e7)
    if offload in ("optimizer", "all") and train:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not _ON_CPU}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": not _ON_CPU}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation,
        "train_batch_size": micro_batch_size * gradient_accumulation * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        # torch's AdamW on CPU (no C++ build); DeepSpeed's fused/CPU Adam on GPU or with offload.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                       "torch_adam": _ON_CPU and offload == "none"},
        }
        if _ON_CPU and offload != "none":
            config["zero_force_ds_cpu_optimizer"] = False
            config["optimizer"]["params"]["torch_adam"] = True
    return config


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (linear warm-up first)."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.lr_scheduler must be cosine, linear or constant, got {kind!r}")
    total_steps = max(total_steps, 1)

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_engine(
    model: torch.nn.Module,
    config: dict,
    *,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int = 1,
):
    """Wrap ``model`` in a DeepSpeed engine; a training engine gets AdamW and the LR schedule."""
    if "optimizer" not in config:  # inference engine (reference, reward, cost models)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    weight_decay = config["optimizer"]["params"]["weight_decay"]
    schedule = lr_lambda(scheduler, warmup_steps, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, weight_decay),
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine


def unwrap(engine_or_module: Any) -> torch.nn.Module:
    return getattr(engine_or_module, "module", engine_or_module)


def full_state_dict(engine_or_module: Any, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """A full, CPU state dict of the module on rank 0 (None elsewhere): parameters and persistent buffers.

    Under ZeRO-3 parameters are gathered one at a time, so no rank ever holds the whole model
    twice; all ranks must call this (the gathers are collectives).
    """
    module = unwrap(engine_or_module)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    from saferlhf.models.hf import is_zero3_partitioned

    zero3 = is_zero3_partitioned(module)
    for name, param in module.named_parameters():
        if zero3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    state[name] = param.detach().to("cpu", dtype or param.dtype).clone()
        elif rank == 0:
            state[name] = param.detach().to("cpu", dtype or param.dtype).clone()
    if rank != 0:
        return None
    # Non-persistent buffers (e.g. rotary inv_freq) are rebuilt at load and are no part of a checkpoint.
    transient = {f"{prefix}.{b}" if prefix else b for prefix, sub in module.named_modules()
                 for b in sub._non_persistent_buffers_set}
    for name, buf in module.named_buffers():
        if name not in state and name not in transient:
            state[name] = buf.detach().cpu().clone()
    return state


def gathered_parameters(params: list[torch.nn.Parameter]):
    """Context manager that materialises ZeRO-3 partitioned parameters (a no-op otherwise)."""
    enabled = bool(params) and hasattr(params[0], "ds_id")
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=enabled)
