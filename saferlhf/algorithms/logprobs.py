"""Token log-probabilities and entropies from logits — the reference the fused kernels are tested against.

Notation: B sequences, T positions, V vocabulary; ``...`` is any number of leading dimensions.
``logits[..., t, :]`` is the model's distribution for ``labels[..., t]``: the caller does the causal
shift (``gather_logprobs(logits[:, :-1], input_ids[:, 1:])`` gives log p(token t+1 | tokens <= t)).

Precision: the softmax is always computed in at least float32 (bf16/fp16 logits are upcast; float64
stays float64, which the kernel tests use as ground truth). The full (..., V) log-softmax is
materialised — this module is the readable specification, not the fast path (see ``saferlhf.ops``).

Sampling temperature τ divides the logits before the softmax, so the log-probs are those of the
distribution the tokens were actually sampled from.

Deviations from the original safe-rlhf code: none in the formula (log-softmax + gather). Here the
softmax is taken in at least float32 whatever dtype the model returns its logits in, and the sampling
temperature is applied (the original scored with the raw logits whatever the sampling temperature).
"""

from __future__ import annotations

import torch


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dtype) / temperature


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / τ)[label] for every position.

    Args:
        logits: (..., V), any floating dtype.
        labels: (...), int64 token ids in [0, V). Padding positions must hold a valid id (mask the
            result instead); negative ids such as -100 are rejected by ``gather``.
        temperature: τ > 0.
    Returns:
        (...), float32 (float64 for float64 logits).
    """
    log_probs = torch.log_softmax(_scaled_logits(logits, temperature), dim=-1)  # (..., V)
    return log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H = logsumexp(z) - Σ_v p_v z_v of softmax(z), z = logits / τ, for every position.

    Tokens with probability exactly 0 (logit -inf, e.g. a masked-out vocabulary entry) contribute 0;
    they are selected out so that neither the value nor the gradient becomes 0·inf = nan.

    Args:
        logits: (..., V), any floating dtype.
        temperature: τ > 0.
    Returns:
        (...), float32 (float64 for float64 logits).
    """
    z = _scaled_logits(logits, temperature)  # (..., V)
    probs = torch.softmax(z, dim=-1)  # (..., V)
    expected_logit = (probs * torch.where(probs > 0, z, 0.0)).sum(dim=-1)  # (...)
    return torch.logsumexp(z, dim=-1) - expected_logit
