"""The model passes of a PPO step, free of DeepSpeed so that benchmarks can run them on bare torch.

Each takes a module (a DeepSpeed engine or a plain ``nn.Module``: both are called the same way) and
the rollout layout of ``saferlhf.rollout``: ``sequences`` (N, L) = prompt (left-padded, P tokens) +
response (right-padded, T tokens), ``attention_mask`` (N, L). With ``packed=True`` the pass runs
padding-free (:mod:`saferlhf.models.packing`: the model must have been switched with
``packing.enable``) and its results come back in the same (N, T) layout, zero on padding; the
log-prob pass then runs the LM head only over the positions that predict a real response token and
hands the fused log-prob op those packed (K, V) logits directly.

:class:`Rows` cuts a pass's rows out of a rollout and trims them to their own padding: a micro-batch
of short answers does not compute on the rollout's longest prompt and response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saferlhf import ops
from saferlhf.algorithms import entropy_from_logits, sft_loss
from saferlhf.models.packing import pack, pack_labels

# Positions per chunk of the entropy pass: bounds its float32 temporaries to a few of these rows of V.
ENTROPY_CHUNK = 1024


@dataclass
class Rows:
    """Some rows of a rollout, trimmed to the longest prompt and response among them."""

    index: torch.Tensor  # (n,) rows of the rollout
    sequences: torch.Tensor  # (n, P' + T')
    attention_mask: torch.Tensor  # (n, P' + T')
    prompt_len: int  # P'
    width: int  # T': response columns kept (the rollout's are [0, T'))

    @classmethod
    def take(cls, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
             index: torch.Tensor) -> Rows:
        seq, attn = sequences[index], attention_mask[index]  # (n, L)
        prompt_real, response_real = attn[:, :prompt_len], attn[:, prompt_len:]
        # Longest prompt: the first column any row uses (prompts are left-padded); longest response: the last.
        used = prompt_real.any(0).nonzero()
        start = int(used[0]) if used.numel() else prompt_len - 1
        used = response_real.any(0).nonzero()
        width = int(used[-1]) + 1 if used.numel() else 1
        cols = slice(start, prompt_len + width)
        return cls(index, seq[:, cols], attn[:, cols], prompt_len - start, width)

    def response(self, values: torch.Tensor) -> torch.Tensor:
        """This pass's rows and columns of a rollout's (N, T) response tensor: (n, T')."""
        return values[self.index, : self.width]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as HF generation uses them: (N, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _response_positions(attention_mask: torch.Tensor, prompt_len: int, packed):
    """Real response tokens (rows, cols) and the packed positions that predict them, (K,) each."""
    rows, cols = attention_mask[:, prompt_len:].bool().nonzero(as_tuple=True)  # (K,), (K,)
    n, length = attention_mask.shape
    where = packed.packed_position().view(n, length)  # (N, L) → packed position, −1 on padding
    return rows, cols, where[rows, prompt_len + cols - 1]


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float, *,
                      packed: bool = False, full_head: bool = False):
    """Log-probs of the response tokens, (N, T), and the logits they came from.

    Only the positions that predict response tokens go through the LM head (``logits_to_keep``): the
    response's tokens are predicted from positions P - 1 … L - 2, and the prompt's logits are never
    needed. At a 128k vocabulary the head is a quarter of a small model's work and its output the
    largest tensor of the pass. No KV cache is built (``use_cache=False``: a training pass never reads
    it, and it keeps every layer's keys and values alive to the end of the pass).

    Padded: the logits are (N, T, V) (the last T + 1 positions through the head), log-probs on padding
    are whatever the model gives there (callers mask them). Packed: the logits are (K, V), one row per
    real response token, and the log-probs on padding are 0. ``full_head`` (``model.response_logits=false``)
    makes a padded pass compute the logits of every position and keep the model's default cache, as the
    original safe-rlhf code does (the same numbers, more work).
    """
    if packed:
        pk = pack(sequences, attention_mask)
        rows, cols, predictors = _response_positions(attention_mask, prompt_len, pk)
        logits = model(**pk.model_kwargs(), logits_to_keep=predictors, use_cache=False).logits[0]  # (K, V)
        token_logp = ops.logprobs(logits, sequences[rows, prompt_len + cols], temperature)  # (K,)
        logp = token_logp.new_zeros(sequences.shape[0], sequences.shape[1] - prompt_len)  # (N, T)
        logp[rows, cols] = token_logp
        return logp, logits
    n_keep = sequences.shape[1] - prompt_len + 1
    keep = {} if full_head else {"logits_to_keep": n_keep, "use_cache": False}
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask), **keep).logits
    logits = logits[:, -n_keep:-1]  # (N, T, V)
    return ops.logprobs(logits, sequences[:, prompt_len:], temperature), logits


def response_values(critic, sequences, attention_mask, prompt_len: int, *, packed: bool = False) -> torch.Tensor:
    """Per-token values of the response positions, (N, T) float32 (the critic's score at each state)."""
    if packed:
        pk = pack(sequences, attention_mask)
        rows, cols, predictors = _response_positions(attention_mask, prompt_len, pk)
        scores = critic(**pk.model_kwargs()).scores[0]  # (S,)
        values = scores.new_zeros(sequences.shape[0], sequences.shape[1] - prompt_len)  # (N, T)
        values[rows, cols] = scores[predictors].float()
        return values
    out = critic(input_ids=sequences, attention_mask=attention_mask)  # positions from the mask inside
    return out.scores[:, prompt_len - 1 : -1].float()  # (N, T)


def end_scores(model, sequences, attention_mask, *, packed: bool = False) -> torch.Tensor:
    """A score model's end score of every sequence, (N,) float32."""
    if packed:
        return model(**pack(sequences, attention_mask).model_kwargs()).end_scores.float()
    return model(input_ids=sequences, attention_mask=attention_mask).end_scores.float()


def sft_pass(model, input_ids, attention_mask, labels, *, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ next-token cross-entropy over the labelled tokens, their count) of a right-padded SFT batch.

    ``labels`` (N, L) are aligned with the inputs, −100 where nothing is trained (prompt, padding).
    Packed, the LM head runs only over the positions that predict a label, and the fused log-prob op
    gives the cross-entropy; padded, it is :func:`saferlhf.algorithms.sft_loss` over every position.
    """
    if packed:
        pk = pack(input_ids, attention_mask)
        targets = pack_labels(labels, pk)[0, 1:]  # (S - 1,) the label each position predicts
        positions = (targets != -100).nonzero().squeeze(1)  # (K,)
        logits = model(**pk.model_kwargs(), logits_to_keep=positions, use_cache=False).logits[0]  # (K, V)
        token_logp = ops.logprobs(logits, targets[positions])  # (K,)
        return -token_logp.sum(), torch.tensor(float(positions.numel()), device=token_logp.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    count = (labels[:, 1:] != -100).sum().float()
    return sft_loss(logits, labels) * count, count


def trim_right(input_ids, attention_mask, *others):
    """A right-padded batch without the columns no row uses."""
    used = attention_mask.any(0).nonzero()
    width = int(used[-1]) + 1 if used.numel() else 1
    return (input_ids[:, :width], attention_mask[:, :width], *(x[:, :width] for x in others))


@torch.no_grad()
def entropy_sum(logits: torch.Tensor, mask: torch.Tensor | None,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ token entropy, token count) of (N, T, V) logits under ``mask`` (N, T), or of packed (K, V)
    logits (``mask`` None: every row is a real token), ENTROPY_CHUNK positions at a time."""
    if mask is None:
        total = torch.zeros((), device=logits.device)
        for start in range(0, logits.shape[0], ENTROPY_CHUNK):
            total += entropy_from_logits(logits[start : start + ENTROPY_CHUNK], temperature).sum()
        return total, torch.tensor(float(logits.shape[0]), device=logits.device)
    n, t = mask.shape
    total = torch.zeros((), device=logits.device)
    seqs = max(1, ENTROPY_CHUNK // max(t, 1))  # whole sequences per chunk
    for start in range(0, n, seqs):
        rows = slice(start, start + seqs)
        chunk = logits[rows].reshape(-1, logits.shape[-1])  # (≤ ENTROPY_CHUNK, V) copy of this chunk only
        total += (entropy_from_logits(chunk, temperature) * mask[rows].reshape(-1).float()).sum()
    return total, mask.float().sum()


@torch.no_grad()
def mean_entropy(logits: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Masked mean token entropy of (N, T, V) ``logits`` (or of packed (K, V) ones, ``mask`` None)."""
    total, count = entropy_sum(logits, mask, temperature)
    return total / count.clamp(min=1.0)


__all__ = ["ENTROPY_CHUNK", "Rows", "end_scores", "entropy_sum", "mean_entropy", "position_ids", "response_logprobs",
           "response_values", "sft_pass", "trim_right"]
