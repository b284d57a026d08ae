"""Reward-model and cost-model training on decoupled preference pairs (DESIGN.md §3).

Both stages train the generic :class:`~saferlhf.models.score_model.ScoreModel` on the end scores of
a (chosen, rejected) pair: better/worse for the reward model, safer/less safe for the cost model,
whose loss also pushes safe responses to c < 0 and unsafe ones to c > 0.
"""

from __future__ import annotations

import torch

from saferlhf import distributed
from saferlhf.algorithms import cost_model_loss, reward_model_loss
from saferlhf.config import Config
from saferlhf.data.categories import relabel_by_categories
from saferlhf.data.collate import PairDataset
from saferlhf.models import packing
from saferlhf.models.hf import load_tokenizer
from saferlhf.models.passes import end_scores
from saferlhf.models.score_model import ScoreModel
from saferlhf.trainers.common import (
    apply_layer_levers,
    engine_config,
    eval_batches,
    logger,
    plot_metrics,
    save_model,
    setup_run,
)
from saferlhf.trainers.data import load_splits
from saferlhf.trainers.supervised import Units, plan_steps, train_supervised

TARGETS = {"rm": "reward", "cm": "cost"}


def pair_loss(target: str, end_scores: torch.Tensor, safe_sign: torch.Tensor, reg: float):
    """Loss and metrics of a pair batch: rows [0, B) chosen, [B, 2B) rejected (see PairBatch)."""
    b = end_scores.shape[0] // 2
    chosen, rejected = end_scores[:b], end_scores[b:]  # (B,), (B,)
    if target == "reward":
        loss, accuracy = reward_model_loss(chosen, rejected, reg)
        return loss, {"accuracy": accuracy, "score_gap": (chosen - rejected).mean()}
    loss, accuracy, sign_accuracy = cost_model_loss(chosen, rejected, safe_sign[:b] > 0, safe_sign[b:] > 0, reg)
    return loss, {"accuracy": accuracy, "sign_accuracy": sign_accuracy}


def train_preference(cfg: Config) -> dict[str, float]:
    """``saferlhf rm`` / ``saferlhf cm``: train a reward or cost model and return its final metrics."""
    target = TARGETS[cfg.stage]
    run = setup_run(cfg)
    if not cfg.model.name_or_path:
        raise ValueError(f"model.name_or_path is required for {cfg.stage} (usually the SFT model)")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, padding_side="right")
    model = ScoreModel.from_pretrained(cfg.model.name_or_path, dtype=cfg.model.dtype, kind=target,
                                       normalize=cfg.score.normalize)
    apply_layer_levers(model, cfg, run.device)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer of {cfg.model.tokenizer or cfg.model.name_or_path} has {len(tokenizer)} tokens "
                         f"but the backbone only {model.config.vocab_size} embeddings")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_rows, eval_rows = load_splits(cfg.data, "preference", cfg.run.seed)
    if cfg.data.categories:  # a cost model of some harm categories only (lagrange.constraints)
        train_rows = relabel_by_categories(train_rows, cfg.data.categories, f"data.train {cfg.data.train}")
        eval_rows = relabel_by_categories(eval_rows, cfg.data.categories, "held-out rows", check_present=False)
        logger.info("cost labels: harmful in %s (data.categories); %d of %d training rows unsafe on one side",
                    cfg.data.categories, sum(r["is_response_0_safe"] != r["is_response_1_safe"] for r in train_rows),
                    len(train_rows))
    make = lambda rows: PairDataset(rows, tokenizer, cfg.model.max_length, target=target,  # noqa: E731
                                    chat_template=cfg.model.chat_template)
    train_set, eval_set = make(train_rows), make(eval_rows)
    plan = plan_steps(len(train_set), cfg)
    engine = distributed.make_engine(
        model, engine_config(cfg, run.dist.world_size),
        scheduler=cfg.optim.lr_scheduler, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
    )
    reg = cfg.score.regularization

    packed = packing.is_enabled(model)

    def batch_scores(engine, batch):
        return end_scores(engine, batch.input_ids.to(run.device), batch.attention_mask.to(run.device), packed=packed)

    def loss_fn(engine, batch):
        return pair_loss(target, batch_scores(engine, batch), batch.safe_sign.to(run.device), reg)

    @torch.no_grad()
    def eval_fn(engine, step):
        if len(eval_set) == 0:
            return {}
        engine.eval()
        chosen, rejected, sign_c, sign_r = [], [], [], []
        for batch, valid in eval_batches(eval_set, cfg.optim.micro_batch_size, run.dist):
            b = batch.input_ids.shape[0] // 2
            end = batch_scores(engine, batch).cpu()
            chosen.append(end[:b][:valid])
            rejected.append(end[b:][:valid])
            sign_c.append(batch.safe_sign[:b][:valid])
            sign_r.append(batch.safe_sign[b:][:valid])
        parts = distributed.all_gather_objects([torch.cat(x) for x in (chosen, rejected, sign_c, sign_r)])
        c, r, sc, sr = (torch.cat([p[i] for p in parts]) for i in range(4))
        scores = torch.cat([c, r])
        signs = torch.cat([sc, sr])
        metrics = {f"eval/{k}": v.item() for k, v in pair_loss(target, scores, signs, reg)[1].items()}
        metrics["eval/loss"] = pair_loss(target, scores, signs, reg)[0].item()
        metrics["eval/score_mean"] = scores.mean().item()
        metrics["eval/score_std"] = scores.std().item()
        if run.is_main:
            _histogram(target, c, r, sc, sr, run.plot_dir / f"{target}_scores_step{step}.png", cfg.score.histogram_bins)
        return metrics

    def save_fn(engine, directory):
        save_model(run, engine, directory, tokenizer)

    def pair_lengths(i):
        item = train_set[i]
        return len(item.chosen), len(item.rejected)

    units = Units(count=lambda batch: float(batch.num_pairs), lengths=pair_lengths, side_by_side=False,
                  packed=packed)
    final = train_supervised(run, engine, train_set, plan, loss_fn, eval_fn, save_fn, units)
    if run.is_main:
        keys = ["train/loss", "train/accuracy", "eval/accuracy", "train/lr"]
        if target == "cost":
            keys += ["train/sign_accuracy", "eval/sign_accuracy"]
        plot_metrics(run.out_dir / "metrics.jsonl", keys, run.plot_dir / f"{cfg.stage}.png",
                     title=f"{target} model")
        logger.info("%s model: %s", target, {k: round(v, 4) for k, v in final.items() if k.startswith("eval/")})
    run.metrics.close()
    return final


def _histogram(target, chosen, rejected, sign_chosen, sign_rejected, path, bins: int) -> None:
    """Score histograms: better vs worse (reward), safe vs unsafe responses (cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if target == "reward":
        groups = {"better": chosen, "worse": rejected}
    else:
        scores, signs = torch.cat([chosen, rejected]), torch.cat([sign_chosen, sign_rejected])
        groups = {"safe": scores[signs > 0], "unsafe": scores[signs < 0]}
    for label, values in groups.items():
        if len(values):
            ax.hist(values.numpy(), bins=bins, alpha=0.6, label=f"{label} (n={len(values)})")
    ax.set_xlabel("end score")
    ax.set_title(f"{target} model scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
