"""KL-shaped per-token reward and cost signals for PPO-Lagrangian (DESIGN §3).

Notation: B sequences, T response tokens (the log-prob layout: position t holds the action that
produced response token t); ``mask`` is 1 on real response tokens; R, C are the end scores of the
reward and cost models; β the KL coefficient; ``clip`` the score clip range.

Safe RLHF (Dai et al. 2023, arXiv 2310.12773, §3.3 and its reference implementation):

    kl_t = logp_old_t - logp_ref_t                      (k1 estimate of KL(π_old || π_ref))
    r_t  = clip(-β·kl_t + 1[t = end]·R, -clip, clip)
    c_t  = clip(+β·kl_t + 1[t = end]·C, -clip, clip)

The KL term enters the cost with the opposite sign: drifting from the reference model is penalised
in both streams (a lower reward, a higher cost). ``end`` is each row's last position with mask = 1,
so the end score lands on the right token under right padding, left padding, or gaps in the mask.

Deviations from the original safe-rlhf code:
- padding positions are 0 here; the original left -β·kl_t on them and relied on GAE masking later.
- a row with no response token gets all zeros; the original's ``mask.nonzero()[-1]`` raised an
  IndexError on it.
"""

from __future__ import annotations

import torch


def end_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last position where ``mask`` is set, or -1 for a row with no such position.

    Args:
        mask: (B, T), any dtype, read as ``mask != 0``.
    Returns:
        (B,) int64.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), positions, -1).amax(dim=-1)  # (B,)


def shape_rewards(
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    cost: torch.Tensor,
    beta: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward and cost signals: a KL penalty on every token, the end score on the last one.

    Args:
        logp_old: (B, T) log-probs of the sampled tokens under the rollout policy.
        logp_ref: (B, T) log-probs of the same tokens under the reference model.
        mask: (B, T) 1 on real response tokens.
        reward: (B,) reward-model end scores R.
        cost: (B,) cost-model end scores C.
        beta: KL coefficient β >= 0.
        clip: both outputs are clipped to [-clip, clip] after the end score is added.
    Returns:
        (rewards, costs), each (B, T) in float32 (float64 for float64 log-probs); 0 where mask = 0.
    """
    dtype = torch.promote_types(logp_old.dtype, torch.float32)
    real = mask.bool()  # (B, T)
    kl = logp_old.to(dtype) - logp_ref.to(dtype)  # (B, T)
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    is_end = positions == end_index(mask).unsqueeze(-1)  # (B, T); all False for an empty row
    end_reward = torch.where(is_end, reward.to(dtype).unsqueeze(-1), 0.0)  # (B, T)
    end_cost = torch.where(is_end, cost.to(dtype).unsqueeze(-1), 0.0)  # (B, T)
    rewards = torch.clamp(-beta * kl + end_reward, -clip, clip)  # (B, T)
    costs = torch.clamp(beta * kl + end_cost, -clip, clip)  # (B, T)
    return torch.where(real, rewards, 0.0), torch.where(real, costs, 0.0)
