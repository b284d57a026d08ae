"""Supervised fine-tuning: ``prompt + response + eos`` with the loss on response tokens only."""

from __future__ import annotations

import torch

from saferlhf import distributed
from saferlhf.config import Config
from saferlhf.data.collate import SFTDataset
from saferlhf.models import packing
from saferlhf.models.hf import load_causal_lm, load_tokenizer
from saferlhf.models.passes import sft_pass
from saferlhf.trainers.common import (
    apply_layer_levers,
    engine_config,
    eval_batches,
    plot_metrics,
    save_model,
    setup_run,
)
from saferlhf.trainers.data import load_splits
from saferlhf.trainers.supervised import Units, plan_steps, train_supervised


def train_sft(cfg: Config) -> dict[str, float]:
    run = setup_run(cfg)
    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path is required for sft (a checkpoint directory or hub id)")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, padding_side="right")
    model = load_causal_lm(
        cfg.model.name_or_path, dtype=cfg.model.dtype, tokenizer=tokenizer,
        gradient_checkpointing=cfg.model.gradient_checkpointing, trust_remote_code=cfg.model.trust_remote_code,
    )
    apply_layer_levers(model, cfg, run.device)
    train_rows, eval_rows = load_splits(cfg.data, "sft", cfg.run.seed)
    train_set = SFTDataset(train_rows, tokenizer, cfg.model.max_length, chat_template=cfg.model.chat_template)
    eval_set = SFTDataset(eval_rows, tokenizer, cfg.model.max_length, chat_template=cfg.model.chat_template)
    plan = plan_steps(len(train_set), cfg)
    engine = distributed.make_engine(
        model, engine_config(cfg, run.dist.world_size),
        scheduler=cfg.optim.lr_scheduler, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
    )

    packed = packing.is_enabled(model)

    def token_loss(engine, batch):
        return sft_pass(engine, batch.input_ids.to(run.device), batch.attention_mask.to(run.device),
                        batch.labels.to(run.device), packed=packed)  # (Σ cross-entropy, trained tokens)

    def loss_fn(engine, batch):
        total, count = token_loss(engine, batch)
        return total / count.clamp(min=1.0), {}

    @torch.no_grad()
    def eval_fn(engine, step):
        if len(eval_set) == 0:
            return {}
        engine.eval()
        total = torch.zeros(2, device=run.device)  # (sum of token losses, token count)
        for batch, valid in eval_batches(eval_set, cfg.optim.micro_batch_size, run.dist):
            batch.labels[valid:] = -100  # filler rows (after the valid ones) count nothing
            total += torch.stack(token_loss(engine, batch))
        total = distributed.all_reduce_mean(total.cpu())
        return {"eval/loss": (total[0] / total[1].clamp(min=1)).item()}

    def trained_tokens(batch) -> float:
        return float((batch.labels[:, 1:] != -100).sum())

    units = Units(count=trained_tokens, lengths=lambda i: (len(train_set[i].input_ids),), packed=packed)

    def save_fn(engine, directory):
        save_model(run, engine, directory, tokenizer)

    final = train_supervised(run, engine, train_set, plan, loss_fn, eval_fn, save_fn, units)
    if run.is_main:
        plot_metrics(run.out_dir / "metrics.jsonl", ["train/loss", "train/lr", "eval/loss"],
                     run.plot_dir / "sft.png", title="SFT")
    run.metrics.close()
    return final
