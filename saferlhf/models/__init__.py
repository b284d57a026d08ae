"""Loading/saving HF models and tokenizers, the score model (reward, cost, critics), tiny models."""

from saferlhf.models.hf import (
    atomic_directory,
    dtype_from_str,
    load_causal_lm,
    load_tokenizer,
    resize_embeddings,
    save_causal_lm,
    sync_special_tokens,
)
from saferlhf.models.score_model import ScoreModel, ScoreOutput, end_positions
from saferlhf.models.tiny import (
    CHAT_TEMPLATE,
    TINY_SIZES,
    build_tiny_checkpoint,
    make_tiny_model,
    tiny_config,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "TINY_SIZES",
    "ScoreModel",
    "ScoreOutput",
    "atomic_directory",
    "build_tiny_checkpoint",
    "dtype_from_str",
    "end_positions",
    "load_causal_lm",
    "load_tokenizer",
    "make_tiny_model",
    "resize_embeddings",
    "save_causal_lm",
    "sync_special_tokens",
    "tiny_config",
    "train_tokenizer",
]
