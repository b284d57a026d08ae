"""How the cost enters a PPO step: the penalty policy of each mode, as an object the loop calls the same way.

    saferlhf ppo-lag   Learned   λ learned from the episode costs (``lagrange.*``), a cost critic,
                                 A = (A_r − λ·A_c) / (1 + λ)
    saferlhf ppo-rs    Fixed     end reward R − λ·C with λ = ``ppo.shaping_lambda``, no cost critic
    saferlhf ppo       None_     reward only (the cost model, when given, is only logged)
    saferlhf grpo-lag  Learned   as ppo-lag, critic-free: group advantages (``GROUP_ESTIMATORS``)
    saferlhf rloo-lag  Learned
    saferlhf grpo      None_     as ppo, critic-free
    saferlhf rloo      None_

Every policy answers the same questions: does the step need a cost critic (``cost_critic``; the
critic-free stages have no critic at all, whatever the policy), and for a scored rollout,
``signals(reward, cost) -> Signals`` — the end reward and end cost that the KL shaping places on the
last token (the critic-free stages: the per-episode scores their groups normalise), the λ the dual GAE
(or the group combination) combines the advantages with, and what to log. The λ
update is the learned policy's own business: a collective (every rank pools its episode costs through
``saferlhf.distributed``); the math is ``saferlhf.algorithms.lagrange`` and, for what the constraint
constrains (``lagrange.constraint``), ``saferlhf.algorithms.constraints``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from saferlhf import distributed
from saferlhf.algorithms import LagrangeMultiplier, MultiLagrange, PIDLagrangian
from saferlhf.algorithms.constraints import constraint_costs

MODES = {"ppo_lag": "ppo-lag", "ppo": "ppo", "ppo_rs": "ppo-rs", "grpo_lag": "grpo-lag", "rloo_lag": "rloo-lag",
         "grpo": "grpo", "rloo": "rloo"}  # stage → command
# The critic-free stages and their group estimator (saferlhf.algorithms.group).
GROUP_ESTIMATORS = {"grpo_lag": "grpo", "rloo_lag": "rloo", "grpo": "grpo", "rloo": "rloo"}


@dataclass
class Signals:
    end_reward: torch.Tensor  # (N,) placed on each response's last token of the reward stream
    end_cost: torch.Tensor  # (N,) placed on the cost stream (zeros without a cost critic); (K, N) for K constraints
    lam: torch.Tensor  # () the λ of A = (A_r − λ·A_c)/(1 + λ); 0 without a cost critic; (K,) for K constraints
    stats: dict[str, float] = field(default_factory=dict)


def _multiplier(lg, threshold: float, pool):
    """One λ of ``lagrange.method`` (gradient or pid) for the cost limit ``threshold``."""
    if lg.method == "gradient":
        return LagrangeMultiplier(lambda_init=lg.lambda_init, lr=lg.lr, lambda_max=lg.lambda_max, threshold=threshold,
                                  delay=lg.delay, window=lg.window, pool=pool)
    if lg.method == "pid":
        return PIDLagrangian(kp=lg.kp, ki=lg.ki, kd=lg.kd, threshold=threshold, window=lg.window,
                             lambda_max=lg.lambda_max, lambda_init=lg.lambda_init, delay=lg.delay, pool=pool)
    raise ValueError(f"lagrange.method must be gradient or pid, got {lg.method!r}")


class Learned:
    """PPO-Lagrangian: λ learned by gradient ascent (the paper) or a PID controller, from the windowed cost.

    With ``lagrange.constraints`` (K names) there is one λ_k per constraint (``MultiLagrange``, one pooled
    collective for all K), ``cost`` is (K, N) and the signals' λ is (K,); each λ_k and J_C,k is logged
    under ``train/lambda/<name>`` and ``train/episode_cost_window/<name>``, and ``train/lambda`` is Σ_k λ_k
    (the weight of the cost side in A = (Â_r − Σ_k λ_k·Â_c,k)/(1 + Σ_k λ_k)).
    """

    cost_critic = True
    needs_cost_model = True

    def __init__(self, cfg) -> None:
        lg = cfg.lagrange
        pool = distributed.all_reduce_sum
        self.names = list(lg.constraints)
        if self.names:
            self.multiplier = MultiLagrange([_multiplier(lg, d, None) for d in lg.thresholds], pool=pool)
        else:
            self.multiplier = _multiplier(lg, lg.threshold, pool)
        self.constraint, self.temperature = lg.constraint, lg.cost_temperature

    def signals(self, reward: torch.Tensor, cost: torch.Tensor) -> Signals:
        # The paper's order: update λ from this step's episode costs, then use it in the advantage.
        episode, stream = constraint_costs(cost, self.constraint, self.temperature)  # (N,) or (K, N), twice
        lam = self.multiplier.update(episode.cpu())  # a collective; reading the costs is one host sync
        if not self.names:
            stats = {"train/lambda": lam, "train/episode_cost_window": self.multiplier.last_cost}
            return Signals(reward, stream, torch.tensor(lam, device=cost.device), stats)
        stats = {"train/lambda": sum(lam)}
        for name, lam_k, cost_k in zip(self.names, lam, self.multiplier.last_cost):
            stats[f"train/lambda/{name}"], stats[f"train/episode_cost_window/{name}"] = lam_k, cost_k
        return Signals(reward, stream, torch.tensor(lam, dtype=torch.float32, device=cost.device), stats)

    def state_dict(self) -> dict:
        return self.multiplier.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.multiplier.load_state_dict(state)


class Fixed:
    """Reward shaping: one reward R − λ·C with a fixed λ, one critic."""

    cost_critic = False
    needs_cost_model = True

    def __init__(self, cfg) -> None:
        self.lam = cfg.ppo.shaping_lambda

    def signals(self, reward: torch.Tensor, cost: torch.Tensor) -> Signals:
        zero = torch.zeros((), device=cost.device)
        return Signals(reward - self.lam * cost, torch.zeros_like(cost), zero, {"train/lambda": self.lam})

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


class None_:
    """PPO on the reward only."""

    cost_critic = False
    needs_cost_model = False

    def __init__(self, cfg) -> None:
        pass

    def signals(self, reward: torch.Tensor, cost: torch.Tensor) -> Signals:
        return Signals(reward, torch.zeros_like(cost), torch.zeros((), device=cost.device))

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


POLICIES = {"ppo_lag": Learned, "ppo_rs": Fixed, "ppo": None_, "grpo_lag": Learned, "rloo_lag": Learned,
            "grpo": None_, "rloo": None_}


def make_penalty(cfg):
    """The penalty policy of ``cfg.stage``."""
    if cfg.stage not in POLICIES:
        raise ValueError(f"PPO stage must be one of {list(POLICIES)}, got {cfg.stage!r}")
    return POLICIES[cfg.stage](cfg)


__all__ = ["GROUP_ESTIMATORS", "MODES", "POLICIES", "Fixed", "Learned", "None_", "Signals", "make_penalty"]
