"""Per-token estimators of KL(π || π_ref) from tokens sampled from π.

Notation: B sequences, T tokens; ``logp`` = log π(token), ``logp_ref`` = log π_ref(token), both
(B, T) for the *same* sampled tokens. With x = logp_ref - logp = log(π_ref / π) the three estimators
of J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html) are

    k1 = -x              = logp - logp_ref      unbiased, high variance, can be negative
    k2 = x² / 2                                 biased, low variance, >= 0
    k3 = (e^x - 1) - x                          unbiased, low variance, >= 0

Safe RLHF shapes its rewards with k1 (``shaping.py``); k3 is the PPO ``approx_kl`` metric
(``losses.py``). k3 is computed with ``expm1`` so that it stays accurate (and exactly >= 0 in
practice) when the two log-probs are close.

Deviations from the original safe-rlhf code: none (it only used k1).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate of the given ``kind`` (see the module docstring).

    Args:
        logp: (B, T) log-probs under the sampling policy π.
        logp_ref: (B, T) log-probs of the same tokens under π_ref.
        kind: "k1", "k2" or "k3".
    Returns:
        (B, T), no masking (mask the result).
    """
    if kind == "k1":
        return logp - logp_ref
    log_ratio = logp_ref - logp  # (B, T) x = log(π_ref / π)
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")
