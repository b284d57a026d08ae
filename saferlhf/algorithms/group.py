"""Critic-free advantages: each answer scored against the other answers to the same prompt (DESIGN §3).

Notation: N = B·G episodes, B prompts with G ≥ 2 sampled answers each, stored prompt by prompt (the
G answers of prompt b are rows b·G … b·G + G − 1, as the generators return them); s (N,) one
per-episode score (a reward, or a cost); mean_g and std_g the mean and the standard deviation of
the scores of an episode's group; ε a small constant.

- GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, §4.1.2, outcome supervision):
      Â = (s − mean_g) / (std_g + ε)
  with the sample standard deviation (Bessel's correction, as the reference trainers compute it); a
  group whose answers all score alike gets Â = 0.
- RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740, eq. 4): the baseline of each answer
  is the mean of the *other* G − 1 answers,
      Â = s − (Σ_g s − s) / (G − 1) = G / (G − 1) · (s − mean_g).

Safe RLHF without critics (Constrained GRPO, Girgis et al. 2026, arXiv 2602.05863): the reward and
each cost are normalised within their groups *separately*, and only then combined with the
Lagrange multipliers,

      A = (Â_r − Σ_k λ_k·Â_c,k) / (1 + Σ_k λ_k),

so that λ keeps its meaning: normalising the combined score R − λ·C instead would divide λ's
contribution by a group spread that λ itself changes. Every response token of an episode carries
its episode's A (``broadcast_to_tokens``).

Deviations: none from the formulas above; the grouping is by position (the caller guarantees the
layout), not by comparing prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saferlhf.algorithms.gae import lagrangian_advantage

GROUP_ESTIMATORS = ("grpo", "rloo")


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-episode advantages of ``scores`` within groups of ``group_size`` consecutive episodes.

    Args:
        scores: (N,) or (K, N) per-episode scores (K streams are normalised independently).
        group_size: G ≥ 2; N must be a multiple of G.
        estimator: "grpo" (mean and standard-deviation normalisation) or "rloo" (leave-one-out mean).
        eps: ε of GRPO's denominator.
    Returns:
        The shape of ``scores``, in float32 (float64 for float64 scores).
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown group estimator {estimator!r}; expected one of {GROUP_ESTIMATORS}")
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 answers per prompt, got group_size={group_size}")
    n = scores.shape[-1]
    if n % group_size:
        raise ValueError(f"{n} episodes do not split into groups of {group_size}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    grouped = scores.to(dtype).reshape(*scores.shape[:-1], n // group_size, group_size)  # (..., B, G)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)  # (..., B, G)
    if estimator == "rloo":
        adv = centred * (group_size / (group_size - 1))
    else:
        adv = centred / (grouped.std(dim=-1, keepdim=True) + eps)  # sample std (correction = 1)
    return adv.reshape(scores.shape)


def constrained_group_advantages(
    reward: torch.Tensor,
    costs: torch.Tensor | None,
    lagrange_lambda: float | Sequence[float] | torch.Tensor,
    group_size: int,
    estimator: str,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Reward and cost advantages normalised within each group, then combined (module docstring).

    Args:
        reward: (N,) episode rewards (KL already subtracted when the KL is in the reward).
        costs: (N,) episode costs of one constraint, (K, N) of K, or None (reward only: A = Â_r).
        lagrange_lambda: λ, or K values (as ``lagrangian_advantage``).
        group_size, estimator, eps: as ``group_advantages``.
    Returns:
        (Â_r (N,), Â_c (the shape of ``costs``) or None, A (N,)).
    """
    adv_r = group_advantages(reward, group_size, estimator, eps)
    if costs is None:
        return adv_r, None, adv_r
    adv_c = group_advantages(costs, group_size, estimator, eps)
    return adv_r, adv_c, lagrangian_advantage(adv_r, adv_c, lagrange_lambda)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) per-episode advantages on every real response token: (N, T), 0 where ``mask`` is 0."""
    return advantages.unsqueeze(-1).to(torch.promote_types(advantages.dtype, torch.float32)) * mask.bool()


__all__ = ["GROUP_ESTIMATORS", "broadcast_to_tokens", "constrained_group_advantages", "group_advantages"]
