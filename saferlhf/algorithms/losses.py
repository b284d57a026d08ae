"""Losses of every stage: PPO actor and critic, reward and cost models, DPO, SFT / PTX.

Notation: B sequences (or preference pairs), T response tokens, L sequence length, V vocabulary;
``mask`` is 1 on real response tokens; ρ = π / π_old the importance ratio; A an advantage; V a value,
G a return; ε the PPO clip ratio; r / c end scores of the reward / cost model; σ the logistic
function; β the DPO temperature.

Formulas and sources:
- actor (PPO-clip, Schulman et al. 2017 arXiv 1707.06347 eq. 7):
  L = -mean_seq mean_tok min(ρ·A, clip(ρ, 1-ε, 1+ε)·A), ρ = exp(logp - logp_old).
- critic (clipped value loss of the PPO reference implementations):
  L = 0.5·mean_seq mean_tok max((V - G)², (clip(V, V_old - c, V_old + c) - G)²).
- reward model (Bradley-Terry; Safe RLHF, Dai et al. 2023 arXiv 2310.12773 §3.2, plus an L2 term on
  the scores): L = -mean log σ(r_w - r_l) + reg·mean(r_w² + r_l²)/2.
- cost model (Safe RLHF §3.2: a Bradley-Terry term on the pair and a classification term on each
  response's safety label s = +1 safe / -1 unsafe), with l the safer and h the less safe response:
  L = mean[-log σ(c_h - c_l) - log σ(-s_h·c_h) - log σ(-s_l·c_l)] + reg·mean(c_h² + c_l²)/2.
- DPO (Rafailov et al. 2023 arXiv 2305.18290 eq. 7):
  L = -mean log σ(β·[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]).
- SFT and the PPO pre-training (PTX) term: mean token cross-entropy; the PTX loss is ``sft_loss``.
- KL to the reference as a loss term (the critic-free modes' default; GRPO, Shao et al. 2024 arXiv
  2402.03300 eq. 3-4): L_KL = mean_seq mean_tok k3(π, π_ref), k3 = e^x - 1 - x, x = logp_ref - logp,
  with logp the current policy's (differentiable) log-probs of the sampled tokens.

Every log σ is ``logsigmoid`` (no overflow for large score gaps). Losses are computed in at least
float32. Metrics (clip fractions, accuracies, approx KL) are detached 0-d tensors — reading them is
the caller's host sync, not ours. Loss targets (advantages, old log-probs, old values, returns) are
detached inside the losses: no gradient can leak into the rollout tensors.

Deviations from the original safe-rlhf code:
- DPO log-prob sums start at the first differing token itself: the original sliced the shifted
  (B, L-1) log-probs with *token* indices [diverge, end], i.e. it scored tokens diverge+1 .. end+1 —
  one token off: it dropped the first differing token, the most informative one, and (when the
  response ended before the last position) added the log-prob of the padding token after the end.
  ``divergence_mask`` returns the mask in the shifted layout, so entry t covers token t+1.
- the actor and critic losses skip rows with no response token (the original's per-row mean was
  nan for them); padding is selected out, never multiplied, so nan/inf there is harmless.
- the cost-model sign accuracy counts a score of exactly 0 as wrong (sign 0 matches neither label).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from saferlhf.algorithms.kl import kl_estimate
from saferlhf.algorithms.masked import masked_mean, masked_sum, per_sequence_mean


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # () differentiable
    clip_fraction: torch.Tensor  # () fraction of real tokens whose gradient the clip removed
    approx_kl: torch.Tensor  # () token mean of the k3 estimate of KL(π_old || π)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor  # () differentiable
    clip_fraction: torch.Tensor  # () fraction of real tokens where the clipped term was the larger


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor  # () differentiable
    accuracy: torch.Tensor  # () fraction of pairs ordered correctly


class CostModelLossOutput(NamedTuple):
    loss: torch.Tensor  # () differentiable
    accuracy: torch.Tensor  # () P(c_h > c_l)
    sign_accuracy: torch.Tensor  # () P(sign(c) = -s) over all 2B responses


class DPOLossOutput(NamedTuple):
    loss: torch.Tensor  # () differentiable
    chosen_rewards: torch.Tensor  # (B,) β·(log π(y_w) - log π_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # (B,) β·(log π(y_l) - log π_ref(y_l)), detached
    accuracy: torch.Tensor  # () P(chosen reward > rejected reward)


def _float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _real(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32, with 0 on padding so that nan/inf there reach no value or gradient."""
    return torch.where(real, _float(x), 0.0)


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss of the actor, averaged per sequence then over sequences.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy (differentiable).
        logp_old: (B, T) log-probs of the same tokens under the rollout policy.
        advantages: (B, T) actor advantages (e.g. ``lagrangian_advantage``); treated as constants.
        mask: (B, T) 1 on real response tokens.
        clip_ratio: ε; the ratio is clipped to [1 - ε, 1 + ε].
    Returns:
        PolicyLossOutput(loss, clip_fraction, approx_kl). ``clip_fraction`` counts the tokens where
        min() picked the clipped term strictly (their gradient is zero); ``approx_kl`` is the masked
        token mean of k3 = (ρ - 1) - log ρ, an unbiased, non-negative estimate of KL(π_old || π).
    """
    real = mask.bool()  # (B, T)
    logp = _real(logp, real)  # (B, T)
    logp_old = _real(logp_old, real).detach()  # (B, T)
    advantages = _real(advantages, real).detach()  # (B, T)
    log_ratio = logp - logp_old  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    surrogate = ratio * advantages  # (B, T)
    clipped_surrogate = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * advantages  # (B, T)
    loss = -per_sequence_mean(torch.minimum(surrogate, clipped_surrogate), real)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_surrogate < surrogate).to(log_ratio.dtype), real)
        # The tokens were sampled from π_old, so π_old is the first argument: k3 = (ρ - 1) - log ρ.
        approx_kl = masked_mean(kl_estimate(logp_old, logp, "k3"), real)
    return PolicyLossOutput(loss, clip_fraction, approx_kl)


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_value: float,
) -> ValueLossOutput:
    """Clipped squared-error loss of a critic, averaged per sequence then over sequences.

    Args:
        values: (B, T) current critic values (differentiable).
        values_old: (B, T) the critic's values at rollout time; treated as constants.
        returns: (B, T) GAE returns G; treated as constants.
        mask: (B, T) 1 on real response tokens.
        clip_value: the value may move at most this far from ``values_old`` before its error stops
            decreasing the loss.
    Returns:
        ValueLossOutput(loss, clip_fraction); ``clip_fraction`` counts the tokens where the clipped
        error was strictly the larger (their gradient is zero).
    """
    real = mask.bool()  # (B, T)
    values = _real(values, real)  # (B, T)
    values_old = _real(values_old, real).detach()  # (B, T)
    returns = _real(returns, real).detach()  # (B, T)
    values_clipped = values_old + torch.clamp(values - values_old, -clip_value, clip_value)  # (B, T)
    error = (values - returns) ** 2  # (B, T)
    clipped_error = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * per_sequence_mean(torch.maximum(error, clipped_error), real)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > error).to(error.dtype), real)
    return ValueLossOutput(loss, clip_fraction)


def kl_loss(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(π || π_ref) as a loss: the k3 estimate per token, averaged per sequence then over sequences.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy (differentiable).
        logp_ref: (B, T) log-probs of the same tokens under the reference model; treated as constants.
        mask: (B, T) 1 on real response tokens.
    Returns:
        0-d loss (add β times it to the actor's loss).
    """
    real = mask.bool()  # (B, T)
    return per_sequence_mean(kl_estimate(_real(logp, real), _real(logp_ref, real).detach(), "k3"), real)


def reward_model_loss(
    better_end: torch.Tensor, worse_end: torch.Tensor, reg: float = 0.001
) -> PreferenceLossOutput:
    """Bradley-Terry loss of the reward model with an L2 penalty on the scores.

    Args:
        better_end: (B,) end scores r_w of the more helpful responses.
        worse_end: (B,) end scores r_l of the less helpful responses.
        reg: coefficient of the score penalty mean(r_w² + r_l²)/2, which keeps scores near 0.
    Returns:
        PreferenceLossOutput(loss, accuracy); accuracy = P(r_w > r_l), ties counting as wrong.
    """
    better, worse = _float(better_end), _float(worse_end)  # (B,), (B,)
    loss = -F.logsigmoid(better - worse).mean() + reg * (better**2 + worse**2).mean() / 2
    with torch.no_grad():
        accuracy = (better > worse).to(better.dtype).mean()
    return PreferenceLossOutput(loss, accuracy)


def _safety_sign(is_safe: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s = +1 for a safe response, -1 for an unsafe one.

    A bool tensor is a label (True = safe); any other dtype already holds the sign ±1. Integer 0/1
    labels are not accepted as labels: 0 would read as sign 0 — convert them with ``.bool()``.
    """
    if is_safe.dtype == torch.bool:
        return torch.where(is_safe, 1.0, -1.0).to(dtype)
    return is_safe.to(dtype)


def cost_model_loss(
    safer_end: torch.Tensor,
    unsafer_end: torch.Tensor,
    safer_is_safe: torch.Tensor,
    unsafer_is_safe: torch.Tensor,
    reg: float = 0.001,
) -> CostModelLossOutput:
    """Safe RLHF's cost-model loss: order each pair, and push safe responses below 0, unsafe above.

    Args:
        safer_end: (B,) end scores c_l of the safer responses.
        unsafer_end: (B,) end scores c_h of the less safe responses.
        safer_is_safe: (B,) safety label of the safer response: bool (True = safe) or the sign s as
            a float / int tensor (+1 safe, -1 unsafe).
        unsafer_is_safe: (B,) the same for the less safe response.
        reg: coefficient of the score penalty mean(c_h² + c_l²)/2.
    Returns:
        CostModelLossOutput(loss, accuracy, sign_accuracy): accuracy = P(c_h > c_l);
        sign_accuracy = P(sign(c) = -s) over all 2B responses (a score of exactly 0 is wrong).
    """
    lower, higher = _float(safer_end), _float(unsafer_end)  # (B,) c_l, (B,) c_h
    sign_lower = _safety_sign(safer_is_safe, lower.dtype)  # (B,) s_l
    sign_higher = _safety_sign(unsafer_is_safe, lower.dtype)  # (B,) s_h
    per_pair = (
        -F.logsigmoid(higher - lower)
        - F.logsigmoid(-sign_higher * higher)
        - F.logsigmoid(-sign_lower * lower)
    )  # (B,)
    loss = per_pair.mean() + reg * (higher**2 + lower**2).mean() / 2
    with torch.no_grad():
        accuracy = (higher > lower).to(lower.dtype).mean()
        scores = torch.cat([lower, higher])  # (2B,)
        signs = torch.cat([sign_lower, sign_higher])  # (2B,)
        sign_accuracy = (torch.sign(scores) == -signs).to(lower.dtype).mean()
    return CostModelLossOutput(loss, accuracy, sign_accuracy)


def divergence_mask(
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the tokens DPO scores: from the first token where the pair differs to each one's end.

    The two sequences share a prompt at the same positions (right padding). They diverge at the first
    position where either the token ids or the masks differ, considering only positions that are real
    in at least one of them. Everything before is shared and cancels in the DPO log-ratio.

    The masks are returned in the *shifted log-prob layout* of
    ``gather_logprobs(logits[:, :-1], ids[:, 1:])``: entry t is set when token t+1 is scored, i.e.
    when d <= t+1 and token t+1 is real. A pair without any difference gets empty masks (a constant
    loss log 2 and no gradient; the data layer drops identical pairs before this).

    Args:
        chosen_ids, rejected_ids: (B, L) int token ids, prompt + response.
        chosen_mask, rejected_mask: (B, L) attention masks, 1 on real tokens.
    Returns:
        (chosen_logp_mask, rejected_logp_mask), each (B, L-1) bool.
    """
    if chosen_ids.shape != rejected_ids.shape or chosen_mask.shape != chosen_ids.shape:
        raise ValueError(
            "chosen and rejected sequences must be padded to one shape, got "
            f"{tuple(chosen_ids.shape)} and {tuple(rejected_ids.shape)} (masks {tuple(chosen_mask.shape)}, "
            f"{tuple(rejected_mask.shape)})"
        )
    chosen_real, rejected_real = chosen_mask.bool(), rejected_mask.bool()  # (B, L), (B, L)
    differs = (chosen_ids != rejected_ids) | (chosen_real != rejected_real)  # (B, L)
    differs = differs & (chosen_real | rejected_real)
    length = chosen_ids.shape[-1]
    positions = torch.arange(length, device=chosen_ids.device)  # (L,)
    first_difference = torch.where(differs, positions, length).amin(dim=-1, keepdim=True)  # (B, 1)
    scored = positions >= first_difference  # (B, L); empty when the pair is identical
    return (chosen_real & scored)[:, 1:], (rejected_real & scored)[:, 1:]


def sequence_logprob_sums(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of each row's log-probs over the masked positions: log π(response | prompt) for DPO.

    Args:
        logp: (B, T) per-token log-probs (e.g. the shifted layout of ``divergence_mask``).
        mask: (B, T).
    Returns:
        (B,).
    """
    return masked_sum(_float(logp), mask, dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> DPOLossOutput:
    """Direct Preference Optimisation loss from sequence log-prob sums.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log π(y | x) of the policy (differentiable).
        ref_chosen_logps, ref_rejected_logps: (B,) log π_ref(y | x) of the frozen reference.
        beta: β, the strength of the implicit KL regularisation.
    Returns:
        DPOLossOutput(loss, chosen_rewards, rejected_rewards, accuracy); the implicit rewards are
        β·(log π - log π_ref), detached; accuracy = P(chosen reward > rejected reward).
    """
    chosen_log_ratio = _float(policy_chosen_logps) - _float(ref_chosen_logps).detach()  # (B,)
    rejected_log_ratio = _float(policy_rejected_logps) - _float(ref_rejected_logps).detach()  # (B,)
    loss = -F.logsigmoid(beta * (chosen_log_ratio - rejected_log_ratio)).mean()
    chosen_rewards = beta * chosen_log_ratio.detach()  # (B,)
    rejected_rewards = beta * rejected_log_ratio.detach()  # (B,)
    accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
    return DPOLossOutput(loss, chosen_rewards, rejected_rewards, accuracy)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not ``ignore_index``.

    ``labels`` are aligned with the *inputs* (the Hugging Face convention: labels = input ids with the
    prompt and padding set to -100); the shift happens here: logits at t predict labels at t+1.
    Used for SFT and as the PTX term of PPO. A batch without any label gives 0, not nan.

    Args:
        logits: (B, L, V), any floating dtype (the cross-entropy is taken in at least float32).
        labels: (B, L) int64.
    Returns:
        0-d tensor.
    """
    logits = _float(logits[:, :-1])  # (B, L-1, V)
    targets = labels[:, 1:]  # (B, L-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    count = (targets != ignore_index).sum()
    return total / count.clamp(min=1)
