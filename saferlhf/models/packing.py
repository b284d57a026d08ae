"""Padding-free ("packed") model passes: the real tokens of a batch as one row, attention per sequence.

Every pass of the trainer sees a padded batch: ``input_ids`` / ``attention_mask`` (N, L), prompts
left-padded, responses right-padded. Packed, its S = Σ lengths real tokens are concatenated into one
row (1, S); positions restart at 0 for every sequence (exactly the positions the padded pass gives
its real tokens, ``cumsum(mask) − 1``); ``cu_seqlens`` (N + 1,) marks where each sequence starts.
Every token-wise layer (embeddings, norms, MLPs, projections, the LM head) then works on S tokens
instead of N·L, and attention runs per sequence through a variable-length kernel:

- CUDA with ``flash-attn`` installed: ``flash_attn_varlen_func``;
- CUDA without it: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (flash kernels inside PyTorch);
- elsewhere (CPU): ``scaled_dot_product_attention`` per sequence, causal — the same computation as
  the padded pass restricted to that sequence, so packed and padded passes agree to float rounding.

How it reaches the model: :func:`enable` registers the attention function :data:`VARLEN` with
transformers' ``AttentionInterface`` (and its mask function as sdpa's) and switches the model to it.
A padded call is forwarded unchanged to transformers' sdpa attention; a packed call carries
``cu_seq_lens_q`` and ``max_length_q`` (the variable-length keyword arguments transformers passes
from the model's ``forward`` down to every attention call) and an all-ones mask (so transformers
builds no (S, S) mask: it sees one unpadded causal row). Nothing else of the model changes: weights,
parameter names, DeepSpeed hooks and checkpoints stay as they are.

Which models: those whose decoder attention is plain causal self-attention through transformers'
attention interface (the Llama family: Llama, Mistral, Qwen2/3, SmolLM) and no sliding window
shorter than the sequence; :func:`packing_support` says why another one runs padded.

Notation: N sequences, L padded length, S packed tokens, H query heads, G key/value heads, D head size.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

VARLEN = "saferlhf_varlen"
_warned: set[str] = set()
# Decoder families whose attention is plain causal self-attention through AttentionInterface.
PACKABLE = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


@dataclass
class Packed:
    """A padded batch's real tokens in one row, and the way back to the padded layout."""

    input_ids: torch.Tensor  # (1, S)
    position_ids: torch.Tensor  # (1, S) restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # (N + 1,) int32: sequence i is packed positions [cu[i], cu[i+1])
    max_len: int  # the longest sequence
    index: torch.Tensor  # (S,) int64: flat index (row · L + column) of each packed token in the padded batch
    shape: tuple[int, int]  # (N, L)

    def model_kwargs(self) -> dict:
        """What a packed forward passes to the model (see the module docstring)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": torch.ones_like(self.input_ids),
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_len,
            "max_length_k": self.max_len,
        }

    @property
    def ends(self) -> torch.Tensor:
        """(N,) packed position of each sequence's last token."""
        return self.cu_seqlens[1:].long() - 1

    def packed_position(self) -> torch.Tensor:
        """(N · L,) packed position of every padded position, −1 on padding."""
        n, length = self.shape
        where = torch.full((n * length,), -1, dtype=torch.long, device=self.index.device)
        where[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        return where

    def unpack(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(S, ...) packed values → (N, L, ...) with ``fill`` on padding."""
        n, length = self.shape
        out = values.new_full((n * length, *values.shape[1:]), fill)
        out[self.index] = values
        return out.reshape(n, length, *values.shape[1:])


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Pack the real tokens (``attention_mask == 1``) of a padded (N, L) batch; left, right or both paddings."""
    real = attention_mask.bool()  # (N, L)
    n, length = real.shape
    lengths = real.sum(-1)  # (N,)
    if bool((lengths == 0).any()):
        raise ValueError("cannot pack a batch with an empty row (no real token)")
    index = real.reshape(-1).nonzero().squeeze(1)  # (S,) row-major: each row's tokens in order, rows in order
    positions = (real.long().cumsum(-1) - 1).reshape(-1)[index]  # (S,) as the padded pass numbers them
    cu = torch.zeros(n + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return Packed(input_ids.reshape(-1)[index].unsqueeze(0), positions.unsqueeze(0), cu, int(lengths.max()),
                  index, (n, length))


def pack_labels(labels: torch.Tensor, packed: Packed) -> torch.Tensor:
    """SFT labels (N, L) (−100 = not trained) in the packed layout, (1, S), for a shifted loss.

    The loss reads the label of position s + 1 at position s; across the border of two sequences that
    would be the next sequence's first token, so every sequence's first label is −100.
    """
    out = labels.reshape(-1)[packed.index].clone()
    out[packed.cu_seqlens[:-1].long()] = -100
    return out.unsqueeze(0)


# -- the attention function ---------------------------------------------------------------------


@functools.cache
def _flash_varlen():
    """flash-attn's varlen kernel where the package is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    """PyTorch's varlen attention (2.10+) and its keyword names, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def varlen_kernel(device: torch.device) -> str:
    """Which kernel a packed attention call uses on ``device``: flash-attn, torch-varlen or sdpa-per-sequence."""
    if device.type == "cuda":
        if _flash_varlen() is not None:
            return "flash-attn"
        if _torch_varlen() is not None:
            return "torch-varlen"
    return "sdpa-per-sequence"


def _repeat_heads(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers attention function: packed calls per sequence, padded calls as sdpa.

    query (1, H, S, D), key/value (1, G, S, D) → (1, S, H, D), None.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a padded pass (or generation with a cache): transformers' own sdpa attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed attention call takes one row, got a batch of {query.shape[0]}")
    max_len = int(kwargs["max_length_q"])
    heads, groups = query.shape[1], query.shape[1] // key.shape[1]
    dropout = dropout if module.training else 0.0
    kernel = varlen_kernel(query.device)
    if kernel != "sdpa-per-sequence":
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (S, H|G, D)
        if kernel == "flash-attn":
            out = _flash_varlen()(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling,
                                  causal=True)
        else:
            varlen_attn, params = _torch_varlen()
            extra = {"scale": scaling}
            extra.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
            if "enable_gqa" in params:
                extra["enable_gqa"] = groups > 1
            else:
                k, v = _repeat_heads(k, groups, 1), _repeat_heads(v, groups, 1)
            out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
        return out.unsqueeze(0), None  # (1, S, H, D)
    # CPU: one causal sdpa per sequence (exactly the padded computation without its padding).
    bounds = cu.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q = query[:, :, start:end]
        k = _repeat_heads(key[:, :, start:end], groups, 1)
        v = _repeat_heads(value[:, :, start:end], groups, 1)
        parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=end - start > 1,
                                                    scale=scaling))
    out = torch.cat(parts, dim=2)  # (1, H, S, D)
    assert out.shape[1] == heads
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _decoder_config(model):
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def packing_support(model) -> tuple[bool, str]:
    """Whether ``model`` (an HF model or a ScoreModel) can run packed passes exactly, and why not."""
    config = _decoder_config(getattr(model, "module", model))
    if config is None:
        return False, "it has no transformers config"
    kind = getattr(config, "model_type", "")
    if kind not in PACKABLE:
        return False, f"model type {kind!r} is not one whose attention saferlhf packs ({', '.join(PACKABLE)})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < getattr(config, "max_position_embeddings",
                                                                                  0):
        return False, f"its sliding-window attention ({window} tokens) is not what the packed kernel computes"
    current = getattr(config, "_attn_implementation", None) or "sdpa"
    if current not in ("sdpa", "eager", "flash_attention_2", VARLEN):
        return False, f"its attention implementation {current!r} is not plain causal attention"
    return True, ""


def enable(model) -> bool:
    """Switch ``model`` to :data:`VARLEN` so that it takes packed calls; False (and one log line) if it cannot."""
    module = getattr(model, "module", model)
    ok, why = packing_support(module)
    if not ok:
        if why not in _warned:  # one line per reason, not one per model of a stage
            _warned.add(why)
            logger.warning("model.packing: %s cannot run packed passes (%s); its passes run padded",
                           type(module).__name__, why)
        return False
    _register()
    target = getattr(module, "backbone", module)  # a ScoreModel's transformer
    target.set_attn_implementation(VARLEN)
    return True


def is_enabled(model) -> bool:
    config = _decoder_config(getattr(getattr(model, "module", model), "backbone", getattr(model, "module", model)))
    return getattr(config, "_attn_implementation", None) == VARLEN


__all__ = ["PACKABLE", "VARLEN", "Packed", "enable", "is_enabled", "pack", "pack_labels", "packing_support",
           "varlen_attention", "varlen_kernel"]
