"""Compiled decoder layers: each layer of a transformers model through one ``torch.compile``-d forward.

The update passes of a PPO step on a GPU are launch-bound: a mini-batch of a few thousand tokens
gives each of the ~100 kernels per decoder layer (forward and backward) less device time than the
host needs to issue it. ``compile_layers(model)`` replaces the ``forward`` of every decoder layer
(modules whose class name ends in ``DecoderLayer``: Llama, Mistral, Qwen2/3, ...) by one that runs
the class's own forward through ``torch.compile``. The compiler fuses the elementwise work between
the matrix products (RMSNorm, rotary embedding, the SwiGLU gate, residual adds) into a few kernels
and issues them from generated code, which cuts both the launches and their host cost.

It is regional compilation: one compiled function per layer class, shared by every layer of every
model of that class (the layers differ only in their weights, which the compiled code takes as
inputs), so a 16-layer actor, its reference and two critics compile once, not 64 times. The
compiler specialises on grad mode and train/eval mode and, after a second sequence length, on
dynamic shapes: a few compilations in all, each cached for the rest of the run.

Not compiled: calls with a KV cache (generation with HF ``generate`` decodes eagerly: every step
would change the cache's shape and state), and nothing outside the layers (embedding, final norm,
LM or score head, the loss). Inside a compiled layer the RMSNorm and SwiGLU patched by
``saferlhf.models.fused`` compute the plain reference math, which the compiler fuses itself.

Not for ZeRO-3: its parameter gathering runs in hooks of the layers' submodules, inside the compiled
region (``check_compile_layers`` refuses it). The weights, parameter names and checkpoints are
untouched; ``uncompile_layers`` restores the eager forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

LAYER_SUFFIX = "DecoderLayer"
# Compilations per compiled function before torch falls back to eager: grad mode × train/eval ×
# static/dynamic shapes × mask or none, for a few layer configurations (actor and critics may differ).
RECOMPILE_LIMIT = 64
_COMPILED: dict[type, Callable] = {}


def _compiled(cls: type) -> Callable:
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward)  # unbound: the layer is an input like its weights
    return _COMPILED[cls]


def _compiled_layer_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    if kwargs.get("past_key_values") is not None:  # decoding with a KV cache: eager
        return type(self).forward(self, hidden_states, *args, **kwargs)
    try:
        return _compiled(type(self))(self, hidden_states, *args, **kwargs)
    except torch._dynamo.exc.TorchDynamoException as e:  # the compiler failed, not the computation
        raise RuntimeError(f"torch.compile of {type(self).__name__} failed ({type(e).__name__}); "
                           "model.compile_layers=false runs the decoder layers eagerly") from e


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class name ends in ``DecoderLayer``."""
    return [m for m in model.modules() if type(m).__name__.endswith(LAYER_SUFFIX)]


def compile_layers(model: nn.Module) -> int:
    """Runs every decoder layer of ``model`` through the compiled forward of its class; returns how many.

    Idempotent. Raises ValueError when ``model`` has no decoder layer (nothing would be compiled).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no module whose class name ends in {LAYER_SUFFIX!r}; "
                         "model.compile_layers needs a transformers decoder (Llama, Mistral, Qwen, ...)")
    _raise_recompile_limit()
    for layer in layers:
        layer.forward = types.MethodType(_compiled_layer_forward, layer)
    return len(layers)


def uncompile_layers(model: nn.Module) -> int:
    """Restores the eager forward of every decoder layer that ``compile_layers`` changed; returns how many."""
    count = 0
    for layer in decoder_layers(model):
        forward = layer.__dict__.get("forward")
        if getattr(forward, "__func__", None) is _compiled_layer_forward:
            del layer.forward
            count += 1
    return count


def resolve_compile_layers(setting: bool | str, device: torch.device | str, zero_stage: int) -> bool:
    """Whether to compile the decoder layers for ``model.compile_layers`` = auto, true or false.

    ``auto``: on CUDA with ZeRO stage 0-2 (where the update passes are launch-bound); off on CPU, where
    the first compilations cost more than a short run gains, and under ZeRO-3. ``true`` under ZeRO-3
    is an error.
    """
    setting = str(setting).strip().lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"model.compile_layers must be auto, true or false, got {setting!r}")
    if setting == "false":
        return False
    if setting == "true":
        if zero_stage == 3:
            raise ValueError("model.compile_layers=true does not work with deepspeed.zero_stage=3 (its parameter "
                             "gathering runs in hooks inside the compiled layers); use auto or false, or ZeRO 0-2")
        return True
    return torch.device(device).type == "cuda" and zero_stage < 3


__all__ = ["compile_layers", "decoder_layers", "resolve_compile_layers", "uncompile_layers"]
