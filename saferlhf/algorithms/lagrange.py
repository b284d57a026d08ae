"""The Lagrange multiplier of PPO-Lagrangian and its variants (DESIGN §3).

Notation: λ the multiplier (λ_k with K constraints); d the cost threshold (the constraint is
J_C <= d); J_C the expected episode cost, estimated as the mean of the last ``window`` episode costs
(pooled over all ranks); e = J_C - d the constraint violation; N episodes per update.

``LagrangeMultiplier`` — Safe RLHF (Dai et al. 2023, arXiv 2310.12773, §3.3): the policy maximises
the Lagrangian J_R - λ·(J_C - d) and λ minimises it, by gradient steps on log λ (λ = e^{log λ} stays
positive without a projection):

    log λ ← min(log λ + lr·λ·(J_C - d), log λ_max)        (∂/∂ log λ of λ·(J_C - d) is λ·(J_C - d))

so λ rises while the policy is unsafe (J_C > d) and falls once it is safe. The step is proportional
to λ itself: λ never reaches 0 by itself, but a λ driven very close to 0 recovers very slowly.
The first ``delay`` updates only fill the cost window.

``PIDLagrangian`` — Stooke, Achiam & Abbeel 2020, "Responsive Safety in Reinforcement Learning by PID
Lagrangian Methods" (arXiv 2007.03964): λ is the output of a PID controller on the violation e,

    I ← clip(I + K_i·e, 0, λ_max),      λ = clip(K_p·e + I + K_d·Δe, 0, λ_max)

with Δe = e - e_previous (0 on the first update). I is the integral term in units of λ,
K_i·Σe, started at λ_init so that λ starts where the caller asked. Anti-windup: the integral is
clamped at 0 from below (a long-satisfied constraint cannot bank a negative integral that would delay
the reaction to the next violation) and at λ_max from above (it cannot wind up while λ is saturated).

``MultiLagrange`` — several constraints (one cost model or cost head per harm category), one
independent multiplier per constraint, updated together with a single all-reduce.

All three share one interface: ``update(episode_costs) -> λ`` (adds the costs to the window, then one
update step), ``value`` (python float), ``tensor`` (float32, for the loss), ``last_cost`` (the J_C of
the last update), ``state_dict()`` / ``load_state_dict()`` (exact round trip: λ state, step count,
window). Pooling over ranks is the caller's: ``pool`` (keyword argument) sums a (K, 2) float64 tensor
of per-window (sum, count) over ranks — the trainer passes ``saferlhf.distributed.all_reduce_sum``,
and then ``update`` is a collective that every rank must call; every rank computes the same J_C and
therefore the same λ, no broadcast is needed. Without ``pool`` the windows are this process's own.
This module imports only torch. The update runs on the host in float64; reading the costs is its one
host sync, once per PPO step.

Deviations from the original safe-rlhf code:
- J_C pools the windows of all ranks (a global (sum, count) all-reduce); the original averaged the
  per-rank window means, which weighs ranks with fewer episodes more.
- λ is updated identically on every rank instead of on rank 0 and broadcast.
- non-finite costs raise a ValueError instead of turning λ into nan.
- PID-Lagrangian and several constraints are extensions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

EpisodeCosts = Union[torch.Tensor, Sequence[float], float]
Pool = Callable[[torch.Tensor], torch.Tensor]  # (K, 2) per-rank (sum, count) → the sum over ranks


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_int_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _cost_list(episode_costs: EpisodeCosts) -> list[float]:
    """The costs as python floats, validated finite; a tensor is read once (a host sync)."""
    if isinstance(episode_costs, torch.Tensor):
        costs = episode_costs.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif isinstance(episode_costs, (int, float)):
        costs = [float(episode_costs)]
    else:
        costs = [float(c) for c in episode_costs]
    bad = [(i, c) for i, c in enumerate(costs) if not math.isfinite(c)]
    if bad:
        shown = ", ".join(f"{c} at index {i}" for i, c in bad[:10])
        raise ValueError(f"episode costs must be finite; got {len(bad)} non-finite value(s): {shown}")
    return costs


def _window_means(windows: Sequence[deque[float]], pool: Pool | None) -> list[float]:
    """J_C per window: the mean of its costs, pooled over all ranks by ``pool`` (one collective).

    Args:
        windows: K deques of this rank's recent episode costs.
        pool: sums the (K, 2) tensor of (sum, count) over ranks; None keeps this process's own.
    Returns:
        K python floats.
    """
    totals = torch.tensor([[math.fsum(w), float(len(w))] for w in windows], dtype=torch.float64)  # (K, 2)
    if pool is not None:
        totals = pool(totals).cpu()  # identical on every rank
    means = []
    for k, (total, count) in enumerate(totals.tolist()):
        if count == 0:
            raise ValueError(f"no episode costs recorded for constraint {k}: pass at least one cost")
        mean = total / count
        _check_finite(f"the mean episode cost of constraint {k}", mean)
        means.append(mean)
    return means


def _restore_window(window: deque[float], saved: Sequence[float]) -> None:
    """Replace the window's content by ``saved`` (the newest entries if the window is now smaller)."""
    costs = _cost_list(list(saved))
    window.clear()
    window.extend(costs)


def _check_keys(kind: str, state: dict[str, Any], keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{kind} state_dict is missing {missing}; it has {sorted(state)}")


class LagrangeMultiplier:
    """Safe RLHF's learned λ: gradient ascent on log λ on the windowed mean episode cost.

    Args:
        lambda_init: λ before the first update, in (0, lambda_max].
        lr: learning rate of log λ, >= 0.
        lambda_max: upper bound of λ, > 0.
        threshold: the cost limit d.
        delay: number of initial ``update`` calls that only record costs.
        window: number of most recent episode costs (per rank) in J_C.
        pool: sums (sum, count) over ranks (module docstring); None: this process only.
    """

    def __init__(
        self,
        lambda_init: float = 1.0,
        lr: float = 0.1,
        lambda_max: float = 5.0,
        threshold: float = 0.0,
        delay: int = 0,
        window: int = 128,
        *,
        pool: Pool | None = None,
    ) -> None:
        for name, value in [
            ("lambda_init", lambda_init),
            ("lr", lr),
            ("lambda_max", lambda_max),
            ("threshold", threshold),
        ]:
            _check_finite(name, value)
        if not lambda_init > 0:
            raise ValueError(f"lambda_init must be > 0 (λ is kept as log λ), got {lambda_init}")
        if lambda_init > lambda_max:
            raise ValueError(f"lambda_init ({lambda_init}) must not exceed lambda_max ({lambda_max})")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        _check_int_at_least("delay", delay, 0)
        _check_int_at_least("window", window, 1)
        self.lr = float(lr)
        self.threshold = float(threshold)
        self.delay = delay
        self._log_lambda_max = math.log(lambda_max)
        self._log_lambda = math.log(lambda_init)
        self.pool = pool
        self._window: deque[float] = deque(maxlen=window)
        self._steps = 0
        self.last_cost: float | None = None

    @property
    def value(self) -> float:
        """The current λ."""
        return math.exp(self._log_lambda)

    @property
    def tensor(self) -> torch.Tensor:
        """The current λ as a 0-d float32 CPU tensor (move it to the loss's device)."""
        return torch.tensor(self.value, dtype=torch.float32)

    def update(self, episode_costs: EpisodeCosts) -> float:
        """Add this batch's episode costs (N,) to the window, then take one step; returns the new λ."""
        self._window.extend(_cost_list(episode_costs))
        (mean_cost,) = _window_means([self._window], self.pool)
        return self._apply(mean_cost)

    def _apply(self, mean_cost: float) -> float:
        """One step of the update rule given J_C (already pooled over ranks)."""
        self.last_cost = mean_cost
        if self._steps >= self.delay:
            violation = mean_cost - self.threshold
            _check_finite("J_C - threshold", violation)
            self._log_lambda = min(self._log_lambda + self.lr * self.value * violation, self._log_lambda_max)
        self._steps += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The mutable state as plain python values: log λ, the step count, the window, J_C."""
        return {
            "log_lambda": self._log_lambda,
            "steps": self._steps,
            "window": list(self._window),
            "last_cost": self.last_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a λ above this multiplier's lambda_max is clamped to it."""
        _check_keys("LagrangeMultiplier", state, ["log_lambda", "steps", "window", "last_cost"])
        log_lambda = float(state["log_lambda"])
        if math.isnan(log_lambda) or log_lambda == math.inf:
            raise ValueError(f"saved log_lambda must be a number below +inf, got {log_lambda}")
        _check_int_at_least("saved steps", state["steps"], 0)
        _restore_window(self._window, state["window"])
        self._log_lambda = min(log_lambda, self._log_lambda_max)
        self._steps = state["steps"]
        self.last_cost = None if state["last_cost"] is None else float(state["last_cost"])


class PIDLagrangian:
    """λ from a PID controller on the constraint violation e = J_C - d (module docstring).

    Args:
        kp, ki, kd: proportional, integral and derivative gains, >= 0.
        threshold: the cost limit d.
        window: number of most recent episode costs (per rank) in J_C.
        lambda_max: upper bound of λ (and of the integral term), > 0.
        lambda_init: λ before the first update and the integral's starting value, in [0, lambda_max].
        delay: number of initial ``update`` calls that only record costs.
        pool: sums (sum, count) over ranks (module docstring); None: this process only.
    """

    def __init__(
        self,
        kp: float,
        ki: float,
        kd: float,
        threshold: float = 0.0,
        window: int = 128,
        lambda_max: float = 5.0,
        lambda_init: float = 1.0,
        delay: int = 0,
        *,
        pool: Pool | None = None,
    ) -> None:
        for name, value in [("kp", kp), ("ki", ki), ("kd", kd), ("lambda_max", lambda_max)]:
            _check_finite(name, value)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        _check_finite("threshold", threshold)
        _check_finite("lambda_init", lambda_init)
        if not lambda_max > 0:
            raise ValueError(f"lambda_max must be > 0, got {lambda_max}")
        if not 0 <= lambda_init <= lambda_max:
            raise ValueError(f"lambda_init must lie in [0, lambda_max={lambda_max}], got {lambda_init}")
        _check_int_at_least("delay", delay, 0)
        _check_int_at_least("window", window, 1)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.threshold = float(threshold)
        self.lambda_max = float(lambda_max)
        self.delay = delay
        self._lambda = float(lambda_init)
        self._integral = float(lambda_init)
        self.pool = pool
        self._previous_error: float | None = None
        self._window: deque[float] = deque(maxlen=window)
        self._steps = 0
        self.last_cost: float | None = None

    @property
    def value(self) -> float:
        """The current λ."""
        return self._lambda

    @property
    def tensor(self) -> torch.Tensor:
        """The current λ as a 0-d float32 CPU tensor (move it to the loss's device)."""
        return torch.tensor(self._lambda, dtype=torch.float32)

    def update(self, episode_costs: EpisodeCosts) -> float:
        """Add this batch's episode costs (N,) to the window, then take one step; returns the new λ."""
        self._window.extend(_cost_list(episode_costs))
        (mean_cost,) = _window_means([self._window], self.pool)
        return self._apply(mean_cost)

    def _apply(self, mean_cost: float) -> float:
        """One controller step given J_C (already pooled over ranks)."""
        self.last_cost = mean_cost
        if self._steps >= self.delay:
            error = mean_cost - self.threshold
            _check_finite("J_C - threshold", error)
            derivative = 0.0 if self._previous_error is None else error - self._previous_error
            integral = min(max(self._integral + self.ki * error, 0.0), self.lambda_max)
            output = self.kp * error + integral + self.kd * derivative
            if math.isnan(output):
                raise ValueError(f"PID output is nan for J_C = {mean_cost}; the costs are out of range")
            self._integral = integral
            self._previous_error = error
            self._lambda = min(max(output, 0.0), self.lambda_max)
        self._steps += 1
        return self._lambda

    def state_dict(self) -> dict[str, Any]:
        """The mutable state as plain python values: λ, the integral, e_previous, steps, window, J_C."""
        return {
            "lambda": self._lambda,
            "integral": self._integral,
            "previous_error": self._previous_error,
            "steps": self._steps,
            "window": list(self._window),
            "last_cost": self.last_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; λ and the integral are clamped to this controller's [0, lambda_max]."""
        keys = ["lambda", "integral", "previous_error", "steps", "window", "last_cost"]
        _check_keys("PIDLagrangian", state, keys)
        lam, integral = float(state["lambda"]), float(state["integral"])
        _check_finite("saved lambda", lam)
        _check_finite("saved integral", integral)
        _check_int_at_least("saved steps", state["steps"], 0)
        _restore_window(self._window, state["window"])
        self._lambda = min(max(lam, 0.0), self.lambda_max)
        self._integral = min(max(integral, 0.0), self.lambda_max)
        previous = state["previous_error"]
        self._previous_error = None if previous is None else float(previous)
        self._steps = state["steps"]
        self.last_cost = None if state["last_cost"] is None else float(state["last_cost"])


Multiplier = Union[LagrangeMultiplier, PIDLagrangian]


class MultiLagrange:
    """K constraints, one multiplier each (any mix of ``LagrangeMultiplier`` and ``PIDLagrangian``).

    ``update`` takes the costs of each constraint, (K, N), and updates every λ_k from its own window
    with one ``pool`` call for all K; ``tensor`` is (K,), the λ argument of ``lagrangian_advantage``.
    """

    def __init__(self, multipliers: Sequence[Multiplier], *, pool: Pool | None = None) -> None:
        if len(multipliers) == 0:
            raise ValueError("MultiLagrange needs at least one multiplier")
        self.multipliers = list(multipliers)
        self.pool = pool

    @property
    def value(self) -> list[float]:
        """The current λ_k, K python floats."""
        return [m.value for m in self.multipliers]

    @property
    def tensor(self) -> torch.Tensor:
        """The current λ_k as a (K,) float32 CPU tensor."""
        return torch.tensor(self.value, dtype=torch.float32)

    @property
    def last_cost(self) -> list[float | None]:
        """J_C of each constraint at the last update."""
        return [m.last_cost for m in self.multipliers]

    def update(self, episode_costs: torch.Tensor | Sequence[EpisodeCosts]) -> list[float]:
        """Add each constraint's episode costs, (K, N) or K sequences, then step every λ_k."""
        if len(episode_costs) != len(self.multipliers):
            raise ValueError(
                f"expected costs for {len(self.multipliers)} constraints, got {len(episode_costs)}"
            )
        # Validate every row before touching any window, so that a bad row leaves no partial update.
        rows = [_cost_list(costs) for costs in episode_costs]
        for multiplier, costs in zip(self.multipliers, rows):
            multiplier._window.extend(costs)
        means = _window_means([m._window for m in self.multipliers], self.pool)
        return [m._apply(mean) for m, mean in zip(self.multipliers, means)]

    def state_dict(self) -> dict[str, Any]:
        return {"multipliers": [m.state_dict() for m in self.multipliers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys("MultiLagrange", state, ["multipliers"])
        saved = state["multipliers"]
        if len(saved) != len(self.multipliers):
            raise ValueError(f"saved state has {len(saved)} multipliers, this one {len(self.multipliers)}")
        for multiplier, multiplier_state in zip(self.multipliers, saved):
            multiplier.load_state_dict(multiplier_state)
