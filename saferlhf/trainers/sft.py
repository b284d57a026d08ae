"""Supervised fine-tuning: ``prompt + response + eos`` with the loss on response tokens only."""

from __future__ import annotations

import torch

from saferlhf import distributed
from saferlhf.algorithms import sft_loss
from saferlhf.config import Config
from saferlhf.data.collate import SFTDataset
from saferlhf.models.hf import load_causal_lm, load_tokenizer
from saferlhf.trainers.common import (
    apply_layer_levers,
    eval_batches,
    plot_metrics,
    save_model,
    setup_run,
    train_ds_config,
)
from saferlhf.trainers.data import load_splits
from saferlhf.trainers.supervised import plan_steps, train_supervised


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
        model, train_ds_config(cfg, run.dist.world_size),
        scheduler=cfg.optim.lr_scheduler, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
    )

    def loss_fn(engine, batch):
        logits = engine(input_ids=batch.input_ids.to(run.device),
                        attention_mask=batch.attention_mask.to(run.device), use_cache=False).logits
        return sft_loss(logits, batch.labels.to(run.device)), {}

    @torch.no_grad()
    def eval_fn(engine, step):
        if len(eval_set) == 0:
            return {}
        engine.eval()
        total = torch.zeros(2)  # (sum of token losses, token count)
        for batch, valid in eval_batches(eval_set, cfg.optim.micro_batch_size, run.dist):
            logits = engine(input_ids=batch.input_ids.to(run.device),
                            attention_mask=batch.attention_mask.to(run.device), use_cache=False).logits[:valid]
            labels = batch.labels.to(run.device)[:valid]
            if valid == 0:
                continue
            n = (labels[:, 1:] != -100).sum()
            total += torch.stack([sft_loss(logits, labels).float().cpu() * n.cpu(), n.cpu().float()])
        total = distributed.all_reduce_mean(total)
        return {"eval/loss": (total[0] / total[1].clamp(min=1)).item()}

    def save_fn(engine, directory):
        save_model(run, engine, directory, tokenizer)

    final = train_supervised(run, engine, train_set, plan, loss_fn, eval_fn, save_fn)
    if run.is_main:
        plot_metrics(run.out_dir / "metrics.jsonl", ["train/loss", "train/lr", "eval/loss"],
                     run.plot_dir / "sft.png", title="SFT")
    run.metrics.close()
    return final
