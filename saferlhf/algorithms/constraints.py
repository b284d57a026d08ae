"""What the cost constraint of PPO-Lagrangian constrains: per-episode costs under each constraint form.

Notation: N episodes; C (N,) the cost model's end score of each episode (C > 0: judged unsafe);
d the threshold (``lagrange.threshold``); τ the cost temperature (``lagrange.cost_temperature``);
σ the logistic function; [x]_+ = max(x, 0); 1[·] the indicator.

The Lagrangian trainer constrains J_C ≤ d, where J_C is the windowed mean of a per-episode cost c that
λ's update reads (``saferlhf.algorithms.lagrange``), and the actor follows A = (A_r − λ·A_c)/(1 + λ),
where A_c is the GAE of a cost stream whose end signal is c̃ (``shape_rewards`` places it on the last
token). Each constraint form chooses (c, c̃):

- ``mean_cost`` — the paper's expected-cost constraint E[C] ≤ d (Safe RLHF, Dai et al. 2023, arXiv
  2310.12773, §3.3): c = c̃ = C. What d means depends on the cost model's scale: with d = 0 the
  policy may answer unsafely as often as its safe answers' negative scores offset.
- ``unsafe_rate`` — a chance constraint P(unsafe) ≤ d with d ∈ [0, 1]: λ reads c = 1[C > 0], the cost
  model's verdict (its sign separates safe from unsafe answers), so J_C is the fraction of the window's
  answers judged unsafe and ``threshold=0.05`` means "at most 5 % unsafe by the cost model". The cost
  stream follows c̃ = σ(C/τ), the probability of being unsafe, whose gradient does not vanish where the
  indicator is flat (τ → 0 approaches the indicator; a large τ flattens the signal).
- ``rectified`` — the per-prompt critical constraint C(x, y) ≤ 0 of RePO (Peng et al. 2024, arXiv
  2410.19933): c = c̃ = [C]_+, so only unsafe answers cost; a safe answer's negative score no longer
  offsets an unsafe one (their "safety compensation") in J_C or in the cost stream. J_C ≥ 0 always, so
  with d = 0 λ falls only when every answer in the window is judged safe; a small d > 0 tolerates a
  little residual cost.

Deviations: RePO also splits each batch into safe and unsafe prompts for separate clipping; here the
rectified cost enters the same PPO-Lagrangian update as the other forms.
"""

from __future__ import annotations

import torch

CONSTRAINTS = ("mean_cost", "unsafe_rate", "rectified")


def constraint_costs(cost: torch.Tensor, constraint: str,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode costs of a constraint form (module docstring).

    Args:
        cost: (N,) cost-model end scores C.
        constraint: one of ``CONSTRAINTS``.
        temperature: τ > 0 of ``unsafe_rate``'s σ(C/τ) (ignored by the other forms).
    Returns:
        (c, c̃): (N,) the cost λ's update reads, and (N,) the end cost of the cost stream (advantage).
    """
    if constraint == "mean_cost":
        return cost, cost
    if constraint == "unsafe_rate":
        if not temperature > 0:
            raise ValueError(f"the cost temperature must be > 0, got {temperature}")
        return (cost > 0).to(cost.dtype), torch.sigmoid(cost / temperature)
    if constraint == "rectified":
        rectified = cost.clamp(min=0)
        return rectified, rectified
    raise ValueError(f"unknown constraint {constraint!r}; expected one of {', '.join(CONSTRAINTS)}")


__all__ = ["CONSTRAINTS", "constraint_costs"]
