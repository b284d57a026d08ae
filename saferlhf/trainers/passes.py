"""The model passes of a PPO step, free of DeepSpeed so that benchmarks can run them on bare torch.

Each takes a module (a DeepSpeed engine or a plain ``nn.Module``: both are called the same way) and
the rollout layout of ``saferlhf.rollout``: ``sequences`` (N, L) = prompt (left-padded, P tokens) +
response (right-padded, T tokens), ``attention_mask`` (N, L).
"""

from __future__ import annotations

import torch

from saferlhf import ops
from saferlhf.algorithms import entropy_from_logits

# Positions per chunk of the entropy pass: bounds its float32 temporaries to a few of these rows of V.
ENTROPY_CHUNK = 1024


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as HF generation uses them: (N, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float):
    """Log-probs of the response tokens, (N, T), and the logits slice they came from, (N, T, V).

    Only the last T + 1 positions go through the LM head (``logits_to_keep``): the response's
    tokens are predicted from positions P - 1 … L - 2, and the prompt's logits are never needed. At
    a 128k vocabulary the head is a quarter of a small model's work and its (N, L, V) output the
    largest tensor of the pass. No KV cache is built (``use_cache=False``: a training pass never reads
    it, and it keeps every layer's keys and values alive to the end of the pass). Under
    ``SAFERLHF_OPS=reference`` the logits of every position are computed and sliced and the model's
    default cache is kept, as the original safe-rlhf code does (the same numbers, more work).
    """
    n_keep = sequences.shape[1] - prompt_len + 1
    keep = {} if ops.reference_forced() else {"logits_to_keep": n_keep, "use_cache": False}
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask), **keep).logits
    logits = logits[:, -n_keep:-1]  # (N, T, V)
    return ops.logprobs(logits, sequences[:, prompt_len:], temperature), logits


def response_values(critic, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """Per-token values of the response positions, (N, T) float32 (the critic's score at each state)."""
    out = critic(input_ids=sequences, attention_mask=attention_mask)  # positions from the mask inside
    return out.scores[:, prompt_len - 1 : -1].float()  # (N, T)


@torch.no_grad()
def mean_entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Masked mean token entropy of (N, T, V) ``logits``, computed ENTROPY_CHUNK positions at a time.

    The entropy needs the whole softmax; in chunks its float32 temporaries stay a few chunks of V
    instead of several copies of the (N, T, V) logits (which at a 128k vocabulary are gigabytes).
    """
    # Chunks are cut from the (N, T, V) tensor itself: ``logits`` is usually a non-contiguous slice of
    # the model's output, and flattening it whole first would copy all of it.
    n, t = mask.shape
    total = torch.zeros((), device=logits.device)
    seqs = max(1, ENTROPY_CHUNK // max(t, 1))  # whole sequences per chunk
    for start in range(0, n, seqs):
        rows = slice(start, start + seqs)
        chunk = logits[rows].reshape(-1, logits.shape[-1])  # (≤ ENTROPY_CHUNK, V) copy of this chunk only
        total += (entropy_from_logits(chunk, temperature) * mask[rows].reshape(-1).float()).sum()
    return total / mask.float().sum().clamp(min=1.0)


__all__ = ["ENTROPY_CHUNK", "mean_entropy", "position_ids", "response_logprobs", "response_values"]
