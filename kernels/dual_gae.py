"""Reward GAE, K cost GAEs, their returns and the Lagrangian advantage in Triton, in one launch.

Reference: ``saferlhf.algorithms.gae.dual_gae`` (DESIGN §3).

Notation: B rows, T response tokens, K cost streams (constraints), γ discount, λ_gae the GAE
parameter, λ_k the Lagrange multipliers.

Per stream and row, over the real tokens only (a masked position is skipped: its reward and value
are not read into the state and its advantage and return are 0):

    A_t = r_t + γ·V_next - V_t + γ·λ_gae·A_next,    G_t = A_t + V_t

where V_next, A_next belong to the next real token of the row (0 past the end), then

    A = (A_r - Σ_k λ_k·A_c,k) / (1 + Σ_k λ_k).

Two ways to run the reverse recurrence:

- ``"scan"`` (default): one program per row. Walking the row backwards, the state (A, V) after
  position t is an affine map of the state after t + 1:

      real t:    (A, V) <- (γλ_gae·A + γ·V + r_t - V_t,  V_t)
      masked t:  (A, V) <- (A, V)

  Every such map has the matrix [[p, q], [0, s]] (s is 1 for a run of masked positions, else 0),
  and maps of this form compose into one of the same form, so the state at every t is an inclusive
  ``tl.associative_scan`` over the time-reversed row. The row is loaded reversed and scanned forward
  (``reverse=True`` scans are reported wrong on GPU for non-commutative combines, triton#4362); long
  rows go in blocks, each block's last state carried into the next.
- ``"loop"``: one program per block of rows, one row per lane, a sequential loop over t.

The scan has depth log T where the loop has T dependent steps, each waiting on its loads; the scan
is the default (the GPU suite times both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(p1, q1, s1, a1, v1, p2, q2, s2, a2, v2):
    # Element 1 holds a later time than element 2: apply map 1, then map 2.
    # [[p2, q2], [0, s2]] @ ([[p1, q1], [0, s1]] @ x + (a1, v1)) + (a2, v2)
    return p2 * p1, p2 * q1 + q2 * s1, s2 * s1, p2 * a1 + q2 * v1 + a2, s2 * v1 + v2


@triton.jit
def _gae_row_scan(rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, length, gamma, gamma_lam, BLOCK_T: tl.constexpr):
    """Advantages and returns of one stream of one row; the pointers point at the row's start."""
    i = tl.arange(0, BLOCK_T)
    carry_adv = tl.zeros((), tl.float32)  # the state after the previous (later) block
    carry_value = tl.zeros((), tl.float32)
    for start in range(0, length, BLOCK_T):
        t = length - 1 - (start + i)  # this block, latest time first
        in_row = t >= 0
        real = tl.load(mask_ptr + t, mask=in_row, other=0) != 0
        r = tl.load(rewards_ptr + t, mask=in_row, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + t, mask=in_row, other=0.0).to(tl.float32)
        # Masked positions (and positions before the row) are the identity map.
        p = tl.where(real, gamma_lam, 1.0)
        q = tl.where(real, gamma, 0.0)
        s = tl.where(real, 0.0, 1.0)
        a = tl.where(real, r - v, 0.0)
        b = tl.where(real, v, 0.0)
        p, q, s, a, b = tl.associative_scan((p, q, s, a, b), 0, _compose)
        adv = p * carry_adv + q * carry_value + a  # (A, V) after t, from the carried state
        value = s * carry_value + b
        tl.store(adv_ptr + t, tl.where(real, adv, 0.0), mask=in_row)
        tl.store(ret_ptr + t, tl.where(real, adv + v, 0.0), mask=in_row)
        # The last element composes the whole block: it is the state handed to the next block.
        last = i == BLOCK_T - 1
        carry_adv = tl.sum(tl.where(last, adv, 0.0), axis=0)
        carry_value = tl.sum(tl.where(last, value, 0.0), axis=0)


@triton.jit
def _lagrange_lambda(lam_ptr, lam_value, k, LAMBDA_FROM_PTR: tl.constexpr):
    if LAMBDA_FROM_PTR:
        return tl.load(lam_ptr + k).to(tl.float32)
    else:
        return lam_value


@triton.jit
def _dual_gae_scan_kernel(
    rewards_ptr,
    costs_ptr,
    values_r_ptr,
    values_c_ptr,
    mask_ptr,
    lam_ptr,
    adv_r_ptr,
    ret_r_ptr,
    adv_c_ptr,
    ret_c_ptr,
    adv_ptr,
    length,
    plane,
    num_costs,
    gamma,
    gamma_lam,
    lam_value,
    LAMBDA_FROM_PTR: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * length
    mask_row = mask_ptr + row_start
    _gae_row_scan(
        rewards_ptr + row_start, values_r_ptr + row_start, mask_row, adv_r_ptr + row_start,
        ret_r_ptr + row_start, length, gamma, gamma_lam, BLOCK_T,
    )  # fmt: skip
    offset = row_start  # of this row in cost stream k (int64: K·B·T may pass 2^31)
    for _ in range(num_costs):
        _gae_row_scan(
            costs_ptr + offset, values_c_ptr + offset, mask_row, adv_c_ptr + offset, ret_c_ptr + offset,
            length, gamma, gamma_lam, BLOCK_T,
        )  # fmt: skip
        offset += plane
    lambda_sum = tl.zeros((), tl.float32)
    for k in range(num_costs):
        lambda_sum += _lagrange_lambda(lam_ptr, lam_value, k, LAMBDA_FROM_PTR)
    # The advantages written above are read back by other threads of this program.
    tl.debug_barrier()
    i = tl.arange(0, BLOCK_T)
    for start in range(0, length, BLOCK_T):
        t = start + i
        in_row = t < length
        penalty = tl.zeros((BLOCK_T,), tl.float32)  # Σ_k λ_k·A_c,k
        offset = row_start
        for k in range(num_costs):
            lam_k = _lagrange_lambda(lam_ptr, lam_value, k, LAMBDA_FROM_PTR)
            penalty += lam_k * tl.load(adv_c_ptr + offset + t, mask=in_row, other=0.0)
            offset += plane
        adv_r = tl.load(adv_r_ptr + row_start + t, mask=in_row, other=0.0)
        tl.store(adv_ptr + row_start + t, (adv_r - penalty) / (1.0 + lambda_sum), mask=in_row)


@triton.jit
def _gae_rows_loop(rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, starts, in_batch, length, gamma, gamma_lam):
    """Advantages and returns of one stream for a block of rows (``starts``: their offsets)."""
    next_value = tl.zeros(starts.shape, tl.float32)
    next_adv = tl.zeros(starts.shape, tl.float32)
    for step in range(length):
        at = starts + (length - 1 - step)
        real = (tl.load(mask_ptr + at, mask=in_batch, other=0) != 0) & in_batch
        r = tl.load(rewards_ptr + at, mask=real, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + at, mask=real, other=0.0).to(tl.float32)
        adv = r + gamma * next_value - v + gamma_lam * next_adv
        tl.store(adv_ptr + at, tl.where(real, adv, 0.0), mask=in_batch)
        tl.store(ret_ptr + at, tl.where(real, adv + v, 0.0), mask=in_batch)
        next_value = tl.where(real, v, next_value)
        next_adv = tl.where(real, adv, next_adv)


@triton.jit
def _dual_gae_loop_kernel(
    rewards_ptr,
    costs_ptr,
    values_r_ptr,
    values_c_ptr,
    mask_ptr,
    lam_ptr,
    adv_r_ptr,
    ret_r_ptr,
    adv_c_ptr,
    ret_c_ptr,
    adv_ptr,
    length,
    plane,
    num_costs,
    gamma,
    gamma_lam,
    lam_value,
    batch,
    LAMBDA_FROM_PTR: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = rows < batch
    starts = rows.to(tl.int64) * length
    _gae_rows_loop(rewards_ptr, values_r_ptr, mask_ptr, adv_r_ptr, ret_r_ptr, starts, in_batch, length,
                   gamma, gamma_lam)  # fmt: skip
    stream = tl.full((), 0, tl.int64)  # offset of cost stream k (int64: K·B·T may pass 2^31)
    for _ in range(num_costs):
        _gae_rows_loop(costs_ptr + stream, values_c_ptr + stream, mask_ptr, adv_c_ptr + stream, ret_c_ptr + stream,
                       starts, in_batch, length, gamma, gamma_lam)  # fmt: skip
        stream += plane
    lambda_sum = tl.zeros((), tl.float32)
    for k in range(num_costs):
        lambda_sum += _lagrange_lambda(lam_ptr, lam_value, k, LAMBDA_FROM_PTR)
    # Each lane reads back only what it wrote itself: no barrier needed.
    for t in range(length):
        at = starts + t
        penalty = tl.zeros((BLOCK_B,), tl.float32)  # Σ_k λ_k·A_c,k
        offsets = at
        for k in range(num_costs):
            lam_k = _lagrange_lambda(lam_ptr, lam_value, k, LAMBDA_FROM_PTR)
            penalty += lam_k * tl.load(adv_c_ptr + offsets, mask=in_batch, other=0.0)
            offsets += plane
        adv_r = tl.load(adv_r_ptr + at, mask=in_batch, other=0.0)
        tl.store(adv_ptr + at, (adv_r - penalty) / (1.0 + lambda_sum), mask=in_batch)


def dual_gae(
    rewards: torch.Tensor,
    costs: torch.Tensor,
    values_r: torch.Tensor,
    values_c: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    lagrange_lambda: float | Sequence[float] | torch.Tensor,
    method: str = "scan",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both GAEs, both returns and the Lagrangian advantage in one launch.

    Args:
        rewards, values_r: (B, T) reward signal and reward-critic values.
        costs, values_c: (B, T) for one constraint or (K, B, T) for K.
        mask: (B, T) 1 (or True) on real response tokens.
        gamma: discount γ; lam: GAE parameter λ_gae.
        lagrange_lambda: λ: a python float (passed by value: no host-to-device copy), a tensor of one
            value or K values (read on the device: no sync), or a sequence of K floats.
        method: "scan" or "loop" (module docstring).
    Returns:
        (adv_r, ret_r, adv_c, ret_c, adv), float32; adv_c and ret_c have the shape of ``costs``.
    """
    one_constraint = costs.dim() == rewards.dim()
    if one_constraint:
        costs, values_c = costs.unsqueeze(0), values_c.unsqueeze(0)  # (1, B, T)
    num_costs, batch, length = costs.shape
    device = rewards.device
    if isinstance(lagrange_lambda, (int, float)):
        lam_tensor, lam_value = None, float(lagrange_lambda)
        if num_costs != 1:
            raise ValueError(f"{num_costs} cost streams need {num_costs} values of λ, got one float")
    else:
        lam_tensor = torch.as_tensor(lagrange_lambda, dtype=torch.float32, device=device).reshape(-1)  # (K,)
        lam_value = 0.0
        if lam_tensor.numel() != num_costs:
            raise ValueError(f"{num_costs} cost streams need as many λ, got {lam_tensor.numel()}")
    rewards, costs, values_r, values_c = (x.contiguous() for x in (rewards, costs, values_r, values_c))
    mask = mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes, a dtype every Triton version loads
    adv_r = torch.empty(batch, length, dtype=torch.float32, device=device)
    ret_r, adv = torch.empty_like(adv_r), torch.empty_like(adv_r)
    adv_c = torch.empty(num_costs, batch, length, dtype=torch.float32, device=device)
    ret_c = torch.empty_like(adv_c)
    if batch > 0 and length > 0:
        args = (
            rewards, costs, values_r, values_c, mask, lam_tensor, adv_r, ret_r, adv_c, ret_c, adv,
            length, batch * length, num_costs, float(gamma), float(gamma * lam), lam_value,
        )  # fmt: skip
        if method == "scan":
            # One block holds a typical response; longer rows are scanned in blocks with a carry.
            block_t = min(triton.next_power_of_2(length), 1024)
            _dual_gae_scan_kernel[(batch,)](*args, LAMBDA_FROM_PTR=lam_tensor is not None, BLOCK_T=block_t)
        elif method == "loop":
            block_b = min(triton.next_power_of_2(batch), 32)
            _dual_gae_loop_kernel[(triton.cdiv(batch, block_b),)](
                *args, batch, LAMBDA_FROM_PTR=lam_tensor is not None, BLOCK_B=block_b
            )
        else:
            raise ValueError(f"method must be 'scan' or 'loop', got {method!r}")
    if one_constraint:
        adv_c, ret_c = adv_c.squeeze(0), ret_c.squeeze(0)  # (B, T)
    return adv_r, ret_r, adv_c, ret_c, adv
