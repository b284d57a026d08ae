"""Pure tensor math of Safe RLHF — the specification every fast path is tested against.

Only torch is imported here: no config objects, no models, no state beyond the Lagrange multipliers.
"""

from saferlhf.algorithms.gae import dual_gae, gae, lagrangian_advantage
from saferlhf.algorithms.kl import KL_ESTIMATORS, kl_estimate
from saferlhf.algorithms.lagrange import LagrangeMultiplier, MultiLagrange, PIDLagrangian
from saferlhf.algorithms.layers import rms_norm, swiglu
from saferlhf.algorithms.logprobs import entropy_from_logits, gather_logprobs
from saferlhf.algorithms.losses import (
    CostModelLossOutput,
    DPOLossOutput,
    PolicyLossOutput,
    PreferenceLossOutput,
    ValueLossOutput,
    cost_model_loss,
    divergence_mask,
    dpo_loss,
    kl_loss,
    policy_loss,
    reward_model_loss,
    sequence_logprob_sums,
    sft_loss,
    value_loss,
)
from saferlhf.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten, per_sequence_mean
from saferlhf.algorithms.shaping import end_index, shape_rewards

__all__ = [
    "KL_ESTIMATORS",
    "CostModelLossOutput",
    "DPOLossOutput",
    "LagrangeMultiplier",
    "MultiLagrange",
    "PIDLagrangian",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "ValueLossOutput",
    "cost_model_loss",
    "divergence_mask",
    "dpo_loss",
    "dual_gae",
    "end_index",
    "entropy_from_logits",
    "gae",
    "gather_logprobs",
    "kl_estimate",
    "kl_loss",
    "lagrangian_advantage",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_sequence_mean",
    "policy_loss",
    "reward_model_loss",
    "rms_norm",
    "sequence_logprob_sums",
    "sft_loss",
    "shape_rewards",
    "swiglu",
    "value_loss",
]
