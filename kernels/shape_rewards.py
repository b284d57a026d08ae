"""KL-shaped per-token reward and cost signals in Triton, both streams in one launch.

Reference: ``saferlhf.algorithms.shaping.shape_rewards`` (DESIGN §3).

Notation: B rows, T response tokens, β the KL coefficient, R and C the end scores, ``end`` each
row's last position with mask != 0 (none for an empty row).

    kl_t = logp_old_t - logp_ref_t
    r_t  = clip(-β·kl_t + 1[t = end]·R, -clip, clip),    c_t = clip(+β·kl_t + 1[t = end]·C, -clip, clip)

and 0 where mask = 0 (selected, not multiplied: a padding log-prob of inf or nan never leaks). One
program per row: a first sweep over the row's mask finds ``end``, a second writes both streams.
Inputs may be float32, bfloat16 or float16; math and outputs are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shape_rewards_kernel(
    logp_old_ptr,
    logp_ref_ptr,
    mask_ptr,
    reward_ptr,
    cost_ptr,
    rewards_ptr,
    costs_ptr,
    length,
    beta,
    clip,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = row * length
    cols = tl.arange(0, BLOCK_T)
    end = tl.full((), -1, tl.int32)
    for start in range(0, length, BLOCK_T):
        t = start + cols
        real = tl.load(mask_ptr + row_start + t, mask=t < length, other=0) != 0
        end = tl.maximum(end, tl.max(tl.where(real, t, -1), axis=0))
    reward = tl.load(reward_ptr + row).to(tl.float32)
    cost = tl.load(cost_ptr + row).to(tl.float32)
    for start in range(0, length, BLOCK_T):
        t = start + cols
        in_row = t < length
        real = tl.load(mask_ptr + row_start + t, mask=in_row, other=0) != 0
        logp_old = tl.load(logp_old_ptr + row_start + t, mask=in_row, other=0.0).to(tl.float32)
        logp_ref = tl.load(logp_ref_ptr + row_start + t, mask=in_row, other=0.0).to(tl.float32)
        kl = logp_old - logp_ref
        is_end = t == end
        r = tl.clamp(-beta * kl + tl.where(is_end, reward, 0.0), -clip, clip)
        c = tl.clamp(beta * kl + tl.where(is_end, cost, 0.0), -clip, clip)
        tl.store(rewards_ptr + row_start + t, tl.where(real, r, 0.0), mask=in_row)
        tl.store(costs_ptr + row_start + t, tl.where(real, c, 0.0), mask=in_row)


def shape_rewards(
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    reward: torch.Tensor,
    cost: torch.Tensor,
    beta: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (rewards, costs): a KL penalty on every real token, the end score on the last one.

    Args:
        logp_old, logp_ref: (B, T) log-probs under the rollout policy and the reference model.
        mask: (B, T) 1 (or True) on real response tokens.
        reward, cost: (B,) end scores R and C.
        beta: KL coefficient β; clip: both outputs are clipped to [-clip, clip].
    Returns:
        (rewards, costs), each (B, T) float32; 0 where mask = 0.
    """
    batch, length = logp_old.shape
    logp_old, logp_ref, reward, cost = (x.contiguous() for x in (logp_old, logp_ref, reward, cost))
    mask = mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes, a dtype every Triton version loads
    rewards = torch.empty(batch, length, dtype=torch.float32, device=logp_old.device)
    costs = torch.empty_like(rewards)
    if batch == 0 or length == 0:
        return rewards, costs
    block_t = min(triton.next_power_of_2(length), 1024)  # one block holds a typical response
    _shape_rewards_kernel[(batch,)](
        logp_old, logp_ref, mask, reward, cost, rewards, costs, length, float(beta), float(clip),
        BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip
    return rewards, costs
