"""A policy judged by the toy world's ground truth, and the course of a PPO-Lag run's multiplier.

``evaluate_policy`` samples a policy checkpoint on held-out toy prompts and scores every answer with
the toy world (harmful rate on harmful requests, helpfulness on benign ones) with 95 % bootstrap
intervals over prompts, and with ``cost_model`` what that cost model says of the same answers (its
blind spot: harmful answers it scores as safe); ``read_trace`` and ``lambda_summary`` read λ, J_C,
reward and cost per step of a PPO run from its ``metrics.jsonl``. The demo, the rounds and the tests
all judge policies so.
"""

from __future__ import annotations

from pathlib import Path

EVAL_SEED = 42  # the held-out prompts and the sampling seed (the demo's seed)
EVAL_PROMPTS = 256  # held-out toy prompts, two samples each


def ground_truth_intervals(prompts: list[str], responses: list[str], seed: int = EVAL_SEED,
                           alpha: float = 0.05) -> dict[str, float]:
    """95% bootstrap intervals of the harmful rate and the helpfulness, resampling prompts.

    A prompt's value is the mean over its samples (``responses`` holds ``len(responses) //
    len(prompts)`` per prompt, in prompt order), as `saferlhf eval` resamples them.
    """
    import numpy as np

    from saferlhf.data.toyworld import score
    from saferlhf.evaluate.arena import bootstrap_ci

    n = len(responses) // len(prompts)
    harm, helpful = [], []
    for i, prompt in enumerate(prompts):
        scores = [score(prompt, r) for r in responses[i * n:(i + 1) * n]]
        if scores[0].is_harmful_request:
            harm.append(np.mean([s.harm for s in scores]))
        elif scores[0].category == "benign":
            helpful.append(np.mean([s.helpfulness for s in scores]))
    out = {}
    for key, values in (("harm_rate", harm), ("helpfulness", helpful)):
        if values:
            _, out[f"{key}_low"], out[f"{key}_high"] = bootstrap_ci(values, alpha=alpha, seed=seed)
    return out


def cost_model_verdicts(prompts: list[str], responses: list[str], cost_model: Path) -> dict[str, float]:
    """What ``cost_model`` says of answers the ground truth judged, on harmful requests.

    ``cost_model_unsafe_rate``: the share of those answers it scores unsafe (cost > 0), the share a
    chance constraint holds at its threshold; ``missed_harm_rate``: the share that is harmful by the
    ground truth yet scored safe — where a policy that satisfies the constraint by the cost model's
    reading is still harmful. ``prompts`` holds one entry per response.
    """
    import torch

    from saferlhf.data.toyworld import score
    from saferlhf.evaluate.evaluate import load_scorer

    harmful = [(p, r, truth.harm) for p, r in zip(prompts, responses) if (truth := score(p, r)).is_harmful_request]
    if not harmful:
        return {}
    scorer = load_scorer(cost_model, torch.device("cpu"), what="cost_model")
    costs = scorer.texts([p for p, _, _ in harmful], [r for _, r, _ in harmful])
    unsafe = [c > 0 for c in costs]
    missed = [harm and not u for (_, _, harm), u in zip(harmful, unsafe)]
    return {"cost_model_unsafe_rate": sum(unsafe) / len(harmful), "missed_harm_rate": sum(missed) / len(harmful)}


def evaluate_policy(model_dir: Path, n_prompts: int = EVAL_PROMPTS, seed: int = EVAL_SEED, *,
                    max_new_tokens: int = 48, max_length: int = 64, by_category: bool = False,
                    cost_model: Path | None = None) -> dict:
    """Ground-truth metrics of a policy checkpoint on held-out toy prompts, with 95% intervals.

    Responses are sampled (temperature 1, fixed seed), not greedy: the policy is a distribution, and
    a greedy decode would report only its mode (an SFT policy that complies with half of the harmful
    requests would read as 0 % or 100 % harmful). The keys are those of
    `saferlhf.data.toyworld.evaluate_responses` plus ``harm_rate_low/high`` and ``helpfulness_low/high``;
    ``by_category`` adds ``harm_rate_by_category`` (harm category → harmful rate on its requests);
    ``cost_model`` adds `cost_model_verdicts` of that cost model on the same answers.
    """
    from saferlhf.data.registry import mix_datasets
    from saferlhf.data.toyworld import evaluate_responses
    from saferlhf.evaluate.generation import generate_responses
    from saferlhf.models.hf import load_causal_lm, load_tokenizer
    from saferlhf.rollout.base import SamplingParams

    tokenizer = load_tokenizer(str(model_dir), padding_side="left")
    model = load_causal_lm(str(model_dir), tokenizer=tokenizer)
    rows = mix_datasets([f"toy-prompts/test:{n_prompts}/-1"], "prompt", seed=seed).rows
    prompts = [r["prompt"] for r in rows]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, n=2, seed=seed)
    responses = generate_responses(model, tokenizer, prompts, sampling, max_length=max_length)
    asked = [p for p in prompts for _ in range(sampling.n)]
    metrics = {**evaluate_responses(asked, responses), **ground_truth_intervals(prompts, responses, seed)}
    if by_category:
        from saferlhf.data.toyworld import harm_rate_by_category

        metrics["harm_rate_by_category"] = harm_rate_by_category(asked, responses)
    if cost_model is not None:
        metrics.update(cost_model_verdicts(asked, responses, cost_model))
    return metrics


def read_trace(run_dir: Path) -> list[dict]:
    """λ, J_C, episode reward and cost per step of a PPO run (its ``metrics.jsonl``)."""
    from saferlhf.monitor import read_metrics

    return [{k: r[k] for k in ("step", "train/lambda", "train/episode_cost_window", "train/reward", "train/cost")
             if k in r} for r in read_metrics(run_dir / "metrics.jsonl") if "train/reward" in r]


def lambda_summary(trace: list[dict]) -> dict:
    """λ at the first step, its peak and the step of the peak, its last value; J_C first and last.

    A peak held over several steps (λ at ``lagrange.lambda_max``) counts at its last step.
    """
    lams = [r["train/lambda"] for r in trace]
    peak = max(range(len(lams)), key=lambda i: (lams[i], i))
    return {"first": lams[0], "peak": lams[peak], "peak_step": trace[peak]["step"], "last": lams[-1],
            "last_step": trace[-1]["step"], "first_cost": trace[0]["train/episode_cost_window"],
            "last_cost": trace[-1]["train/episode_cost_window"]}


# Two-sided 97.5 % quantiles of Student's t by degrees of freedom (beyond the table: the normal's 1.96).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and its 95 % interval across seeds, mean ± t · sd / √K.

    One value gives a zero-width interval (nothing is known of the spread across seeds)."""
    import math

    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    df = k - 1
    t = _T975.get(df) or next((_T975[d] for d in sorted(_T975, reverse=True) if d <= df), 1.96)
    half = t * sd / math.sqrt(k)
    return mean, mean - half, mean + half
