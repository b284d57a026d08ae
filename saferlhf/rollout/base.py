"""The generation interface every backend implements (DESIGN.md §5).

Layout: prompts are LEFT-padded ``(B, P)``; responses are RIGHT-padded ``(B·n, T)`` with
``response_mask`` 1 on real tokens (the eos that ends a response included) and 0 after it. Row
``i·n + j`` of the responses is sample ``j`` of prompt ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    repetition_penalty: float = 1.0
    n: int = 1  # samples per prompt
    greedy: bool = False
    seed: int | None = None
    logprobs: bool = False  # return the engine's log-probs of the sampled tokens (backends that have them)


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # (B·n, P) left-padded, each prompt repeated n times
    prompt_mask: torch.Tensor  # (B·n, P)
    response_ids: torch.Tensor  # (B·n, T) right-padded with pad_token_id
    response_mask: torch.Tensor  # (B·n, T) 1 on real response tokens
    logprobs: torch.Tensor | None = None  # (B·n, T) the engine's log-probs of the sampled tokens

    @property
    def sequences(self) -> torch.Tensor:
        """Prompt and response side by side: (B·n, P + T)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


class Generator(Protocol):
    """What the trainer needs of a generation backend.

    ``needs_sync``: the backend generates with weights of its own (an engine), which the trainer must push
    after every update (``load_weights``) and may ``verify`` against the actor; False for a backend that
    generates with the actor itself.
    """

    needs_sync: bool

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams) -> Generation: ...

    def load_weights(self, buckets) -> object:
        """New actor weights: an iterable of buckets, each a list of (name, tensor) of complete groups."""

    def verify(self, actor, probes: list[list[int]], max_new_tokens: int = 16) -> tuple[bool, float]:
        """(greedy tokens equal to the actor's, max |log-prob difference|) on ``probes``."""

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...

    def shutdown(self) -> None: ...


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int
) -> torch.Tensor:
    """1 up to and including the first eos of each row, 0 after it (and on trailing padding).

    Rows that never emit eos (length-capped) are real up to the end. ``pad_token_id`` may equal an
    eos id (as in many chat tokenizers); only the first eos counts, so that is unambiguous.
    """
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    is_eos = torch.isin(response_ids, eos_ids.to(response_ids.device))  # (B, T)
    # Positions strictly after the first eos: cumulative eos count, shifted right by one.
    after_eos = torch.cumsum(is_eos.int(), dim=1) - is_eos.int() > 0
    mask = ~after_eos
    if pad_token_id not in eos_ids.tolist():
        mask &= response_ids != pad_token_id
    return mask.long()


def parse_lengths(spec: str) -> tuple[str, int, int]:
    """``uniform:LOW:HIGH`` or ``fixed:N`` → (kind, low, high); a clear error naming the setting otherwise."""
    parts = spec.split(":")
    try:
        if parts[0] == "uniform" and len(parts) == 3:
            low, high = int(parts[1]), int(parts[2])
        elif parts[0] == "fixed" and len(parts) == 2:
            low = high = int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"rollout.synthetic_lengths must be uniform:LOW:HIGH or fixed:N, got {spec!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"rollout.synthetic_lengths {spec!r}: need 1 <= LOW <= HIGH")
    return parts[0], low, high


def cut_to_lengths(gen: Generation, spec: str, generator: torch.Generator, pad_token_id: int) -> Generation:
    """Responses cut to lengths drawn from ``spec`` (a benchmark's synthetic workload, see
    ``rollout.synthetic_lengths``): rows keep min(drawn, own) tokens, the rest becomes padding."""
    _, low, high = parse_lengths(spec)
    n, width = gen.response_ids.shape
    drawn = torch.randint(low, high + 1, (n,), generator=generator)  # (N,)
    keep = torch.arange(width) < drawn.unsqueeze(1)  # (N, T)
    mask = gen.response_mask * keep.to(gen.response_mask.dtype)
    ids = gen.response_ids.masked_fill(mask == 0, pad_token_id)
    logprobs = None if gen.logprobs is None else gen.logprobs.masked_fill(mask == 0, 0.0)
    return Generation(gen.prompt_ids, gen.prompt_mask, ids, mask, logprobs)
