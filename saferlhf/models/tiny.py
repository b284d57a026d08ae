"""Tiny Llama models and tokenizers built in-process, so tests and the toy world need no download.

The tokenizer is a BPE over Metaspace pre-tokens (the Llama / SentencePiece convention: a space
becomes `▁` and starts the next word). Its base alphabet is every printable ASCII character plus
the characters of the training texts, so:
- a word of the training texts becomes one token `▁word` once the vocabulary is large enough
  (512 covers a few hundred short words), and punctuation `▁,` likewise;
- an unseen word still tokenizes, into shorter pieces down to single characters;
- any ASCII text round-trips through encode/decode exactly, except a leading space (dropped, as in
  Llama); a non-ASCII character absent from the training texts becomes `<unk>` (lossy but visible:
  no byte fallback, which would spend 256 of the 512 ids on bytes).
Encoding prepends `<s>` (like Llama); `decode(..., skip_special_tokens=True)` gives the text back.

The chat template renders the paper's prompt format: one user turn with a generation prompt is
exactly `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:`.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from saferlhf.models.hf import save_causal_lm

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

# Role names follow the paper's template; an assistant turn ends with eos, as SFT targets do.
CHAT_TEMPLATE = (
    "{{ 'BEGINNING OF CONVERSATION:' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ ' ' + message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ ' ASSISTANT:' }}{%- endif %}"
)

_SPACE = "▁"
_BASE_ALPHABET = [c for c in string.printable if c != " "] + [_SPACE]

# Llama shapes, vocabulary excluded (it comes from the tokenizer): the one definition the toy world, the
# benchmarks and the memory model share. Head size 32 in "tiny" (not 16) because vLLM's CPU attention supports
# head sizes >= 32 only. "gpu": 16 layers of width 1024 (~0.5B parameters with Llama 3's vocabulary, half
# of them the embedding and LM head).
TINY_SIZES: dict[str, dict[str, int]] = {
    # ≈ 0.48M parameters with a 512-token vocabulary
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=320,
    ),
    # ≈ 19.8M parameters with a 512-token vocabulary
    "20m": dict(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1408,
    ),
    "gpu": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=4096,
    ),
}
# The vocabulary each shape is benchmarked with (the toy world's tokenizer has 512 tokens; "gpu": Llama 3's).
BENCHMARK_VOCAB = {"tiny": 512, "20m": 512, "gpu": 128256}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on `texts` (deterministic: same texts → same vocabulary and merges).

    The vocabulary holds at most `vocab_size` tokens: fewer when the texts run out of pairs to merge.
    Ids 0–3 are `<unk> <s> </s> <pad>`.
    """
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=_BASE_ALPHABET,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        padding_side="right",
        # The clean-up of older transformers deletes the space in "word ,", which the toy language
        # has (5.x skips it for BPE but warns unless it is off).
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        **SPECIAL_TOKENS,
    )


def tiny_config(tokenizer: PreTrainedTokenizerBase, size: str = "tiny") -> LlamaConfig:
    """The Llama config of `size` (a key of TINY_SIZES) for `tokenizer`'s vocabulary and special ids."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; expected one of {sorted(TINY_SIZES)}")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(512, tokenizer.model_max_length),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_SIZES[size],
    )


def make_tiny_model(
    tokenizer: PreTrainedTokenizerBase, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A randomly initialised Llama; the same seed gives the same weights, and the global RNG is untouched."""
    config = tiny_config(tokenizer, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # initialised in float32, then cast: same values for every dtype
    return model.to(dtype)


def build_tiny_checkpoint(
    out_dir: str | os.PathLike, texts: Iterable[str], size: str = "tiny", seed: int = 0, vocab_size: int = 512
) -> Path:
    """Train a tokenizer on `texts`, build a tiny model and save both as a standard HF Llama checkpoint."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = make_tiny_model(tokenizer, size=size, seed=seed)
    return save_causal_lm(model, out_dir, tokenizer=tokenizer)
