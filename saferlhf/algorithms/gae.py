"""Generalised advantage estimation and the Lagrangian advantage of PPO-Lagrangian (DESIGN §3).

Notation: B sequences, T response tokens, K constraints; ``mask`` is 1 on real response tokens;
r_t a per-token reward (or cost) signal, V_t the critic's value, γ the discount, λ_gae the GAE
parameter, λ (or λ_k) the Lagrange multiplier(s).

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", eq. 16), one stream at a time, over the real tokens of each row:

    δ_t = r_t + γ·V_{t+1} - V_t,      A_t = δ_t + γ·λ_gae·A_{t+1},      G_t = A_t + V_t

with V = 0 and A = 0 after a row's last real token (the episode ends there). No whitening.

Masked positions are *skipped*: the recurrence runs over the real tokens only, and "t + 1" is the
next real token of the row. A masked position's reward and value are ignored (``nan`` there is
harmless) and its advantage and return are 0. For the usual layouts this is exactly the plain reverse
loop of the paper with rewards and values zeroed on padding:
- right padding (real tokens first): positions after the end carry V = 0, A = 0, as in the paper;
- left padding (padding first): the padding lies *before* the real tokens, and a reverse recurrence
  never carries anything from an earlier position to a later one, so padding cannot leak into real
  tokens; its own advantages, which the plain loop would leave non-zero, are set to 0.
Only a gap inside a row behaves differently: the plain loop would bootstrap the token before the
gap from V = 0, while here it bootstraps from the next real token, as if the gap were not there.

Safe RLHF combines the reward and cost advantages into one actor advantage (the Lagrangian of
Dai et al. 2023, arXiv 2310.12773, §3.3; the division by 1 + λ, which keeps the advantage's scale
independent of λ, comes from its reference implementation):

    A = (A_r - λ·A_c) / (1 + λ),      with K constraints:  A = (A_r - Σ_k λ_k·A_c,k) / (1 + Σ_k λ_k)

``dual_gae`` composes both GAEs and this combination: it is the reference the fused dual-GAE kernels
are tested against.

Deviations from the original safe-rlhf code:
- masked positions are skipped (above) and their advantages and returns are 0; the original ran the
  plain loop over every position of the padded response and relied on the loss mask afterwards.
- several constraints (K cost streams, one λ_k each) are an extension.
- advantages are not detached here (a pure function); the trainer passes rollout tensors that carry
  no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of one stream by GAE over each row's real tokens (module docstring).

    Args:
        rewards: (B, T) per-token reward (or cost) signal r_t.
        values: (B, T) critic values V_t of the rollout.
        mask: (B, T) 1 on real response tokens.
        gamma: discount γ.
        lam: GAE parameter λ_gae.
    Returns:
        (advantages, returns), each (B, T) in float32 (float64 for float64 inputs); 0 where mask = 0.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    real = mask.bool()  # (B, T)
    rewards = torch.where(real, rewards.to(dtype), 0.0)  # (B, T)
    values = torch.where(real, values.to(dtype), 0.0)  # (B, T)
    batch, length = rewards.shape
    # State carried backwards: the value and the advantage of the next real token (0 past the end).
    next_value = rewards.new_zeros(batch)  # (B,)
    next_advantage = rewards.new_zeros(batch)  # (B,)
    advantages_reversed = []
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        advantages_reversed.append(torch.where(real[:, t], advantage, 0.0))
        # A masked position leaves the carried state untouched: it is skipped.
        next_value = torch.where(real[:, t], values[:, t], next_value)
        next_advantage = torch.where(real[:, t], advantage, next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = advantages + values  # (B, T); both are 0 on masked positions
    return advantages, returns


def lagrangian_advantage(
    adv_r: torch.Tensor, adv_c: torch.Tensor, lam: float | Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Safe RLHF's actor advantage (A_r - Σ_k λ_k·A_c,k) / (1 + Σ_k λ_k).

    Args:
        adv_r: (B, T) reward advantages.
        adv_c: (B, T) cost advantages for one constraint, or (K, B, T) for K constraints.
        lam: λ >= 0 — a python float or a 0-d / one-element tensor for one constraint; a (K,) tensor
            or a sequence of K floats for K constraints. A tensor λ stays in the graph (no host sync).
    Returns:
        (B, T) in the dtype of ``adv_r``.
    """
    lam = torch.as_tensor(lam, dtype=adv_r.dtype, device=adv_r.device)  # differentiable cast of a tensor λ
    if adv_c.dim() == adv_r.dim():
        if lam.numel() != 1:
            raise ValueError(f"one constraint needs one λ, got λ of shape {tuple(lam.shape)}")
        lam = lam.reshape(())  # ()
        return (adv_r - lam * adv_c) / (1 + lam)
    if adv_c.dim() == adv_r.dim() + 1:
        num_constraints = adv_c.shape[0]
        if lam.shape != (num_constraints,):
            raise ValueError(
                f"{num_constraints} constraints need λ of shape ({num_constraints},), got {tuple(lam.shape)}"
            )
        lam_b = lam.reshape(num_constraints, *([1] * adv_r.dim()))  # (K, 1, 1)
        return (adv_r - (lam_b * adv_c).sum(dim=0)) / (1 + lam.sum())
    raise ValueError(
        f"adv_c must have the shape of adv_r {tuple(adv_r.shape)} or (K, *that), got {tuple(adv_c.shape)}"
    )


def dual_gae(
    rewards: torch.Tensor,
    costs: torch.Tensor,
    values_r: torch.Tensor,
    values_c: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    lagrange_lambda: float | Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both GAEs and the Lagrangian advantage: the reference for the fused ``ops.dual_gae``.

    Args:
        rewards: (B, T) shaped reward signal; values_r: (B, T) reward-critic values.
        costs: (B, T) shaped cost signal, or (K, B, T) for K constraints; values_c: same shape.
        mask: (B, T) 1 on real response tokens.
        gamma: discount γ; lam: GAE parameter λ_gae (the same for both streams).
        lagrange_lambda: λ as in ``lagrangian_advantage``.
    Returns:
        (adv_r, ret_r, adv_c, ret_c, adv): (B, T) each, except adv_c and ret_c which have the shape
        of ``costs``.
    """
    adv_r, ret_r = gae(rewards, values_r, mask, gamma, lam)
    if costs.dim() == rewards.dim() + 1:
        streams = [gae(c, v, mask, gamma, lam) for c, v in zip(costs, values_c)]
        adv_c = torch.stack([a for a, _ in streams])  # (K, B, T)
        ret_c = torch.stack([g for _, g in streams])  # (K, B, T)
    else:
        adv_c, ret_c = gae(costs, values_c, mask, gamma, lam)
    return adv_r, ret_r, adv_c, ret_c, lagrangian_advantage(adv_r, adv_c, lagrange_lambda)
