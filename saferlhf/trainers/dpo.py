"""Direct Preference Optimisation (Rafailov et al. 2023, arXiv 2305.18290): the baseline to Safe RLHF.

DPO trains the policy on preference pairs directly, without a reward model or rollouts. A frozen
reference (the policy's start checkpoint) scores the same pairs; the loss is
:func:`~saferlhf.algorithms.dpo_loss` on each response's summed log-probs, counted from the first
token where the chosen and rejected sequences differ to each one's end (DESIGN.md §3,
:func:`~saferlhf.algorithms.divergence_mask`) — the shared prompt cancels in the log-ratio.

``dpo.label`` picks which response of a pair is chosen, reusing the orderings of the reward and
cost models: ``better`` (helpfulness, ``better_response_id``) or ``safer`` (harmlessness,
``safer_response_id``). One label per run: DPO has a single preference signal, which is exactly
what Safe RLHF's decoupled reward and cost are compared against.

Logged per step (``train/``) and on the held-out pairs (``eval/``): the loss; the implicit rewards
β·(log π − log π_ref) of the chosen and rejected responses, their margin and the accuracy
P(chosen reward > rejected reward); the policy's log-probs of both responses.

The loop is :func:`~saferlhf.trainers.supervised.train_supervised`; this module supplies the loss,
the evaluation pass and the saver.
"""

from __future__ import annotations

import torch

from saferlhf import distributed, ops
from saferlhf.algorithms import divergence_mask, dpo_loss, sequence_logprob_sums
from saferlhf.config import Config
from saferlhf.data.collate import PairBatch, PairDataset
from saferlhf.models import packing
from saferlhf.models.hf import load_causal_lm, load_tokenizer
from saferlhf.models.packing import pack
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

# dpo.label -> the PairDataset ordering that puts that response first (reward model / cost model).
LABELS = {"better": "reward", "safer": "cost"}
PLOT_KEYS = ["train/loss", "eval/loss", "train/accuracy", "eval/accuracy", "train/reward_margin",
             "eval/reward_margin", "train/chosen_reward", "train/rejected_reward", "train/lr"]


def pair_logprob_sums(model, batch: PairBatch, device: torch.device,
                      packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen, rejected), each (B,) float32, of a pair batch under ``model``.

    ``model`` is an engine or a plain causal LM; the batch is right-padded, so the default positions
    are right. Differentiable when called with gradients enabled. Packed, only the scored positions go
    through the LM head.
    """
    ids = batch.input_ids.to(device)  # (2B, L)
    attention = batch.attention_mask.to(device)  # (2B, L)
    b = batch.num_pairs
    chosen_mask, rejected_mask = divergence_mask(ids[:b], ids[b:], attention[:b], attention[b:])  # (B, L-1) x2
    scored = torch.cat([chosen_mask, rejected_mask])  # (2B, L-1): entry t scores token t+1
    if packed:
        pk = pack(ids, attention)
        rows, cols = scored.nonzero(as_tuple=True)  # (K,)
        where = pk.packed_position().view(ids.shape)
        logits = model(**pk.model_kwargs(), logits_to_keep=where[rows, cols], use_cache=False).logits[0]  # (K, V)
        token_logp = ops.logprobs(logits, ids[rows, cols + 1])  # (K,)
        sums = token_logp.new_zeros(ids.shape[0]).index_add(0, rows, token_logp)  # (2B,)
        return sums[:b], sums[b:]
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (2B, L, V)
    logp = ops.logprobs(logits[:, :-1], ids[:, 1:])  # (2B, L-1): entry t is log p(token t+1)
    sums = sequence_logprob_sums(logp, scored)  # (2B,)
    return sums[:b], sums[b:]


def dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """``dpo_loss`` and the logged metrics (0-d tensors) of (B,) log-prob sums."""
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    metrics = {
        "accuracy": out.accuracy,
        "reward_margin": (out.chosen_rewards - out.rejected_rewards).mean(),
        "chosen_reward": out.chosen_rewards.mean(),
        "rejected_reward": out.rejected_rewards.mean(),
        "chosen_logp": policy_chosen.detach().float().mean(),
        "rejected_logp": policy_rejected.detach().float().mean(),
    }
    return out.loss, metrics


def train_dpo(cfg: Config) -> dict[str, float]:
    """``saferlhf dpo``: fine-tune the policy with DPO and return its final metrics."""
    if cfg.dpo.label not in LABELS:
        raise ValueError(f"dpo.label must be one of {sorted(LABELS)}, got {cfg.dpo.label!r}")
    if not cfg.dpo.beta > 0:
        raise ValueError(f"dpo.beta must be > 0, got {cfg.dpo.beta}")
    if not cfg.model.name_or_path:
        raise ValueError("model.name_or_path is required for dpo (usually the SFT model)")
    run = setup_run(cfg)
    beta, path = cfg.dpo.beta, cfg.model.name_or_path
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, padding_side="right")
    def load(checkpointing: bool):
        model = load_causal_lm(path, dtype=cfg.model.dtype, tokenizer=tokenizer, gradient_checkpointing=checkpointing,
                               trust_remote_code=cfg.model.trust_remote_code)
        return apply_layer_levers(model, cfg, run.device)

    train_rows, eval_rows = load_splits(cfg.data, "preference", cfg.run.seed)
    make = lambda rows: PairDataset(rows, tokenizer, cfg.model.max_length,  # noqa: E731
                                    target=LABELS[cfg.dpo.label], chat_template=cfg.model.chat_template)
    train_set, eval_set = make(train_rows), make(eval_rows)
    if train_set.n_truncated:
        logger.info("%d training pairs were cut to model.max_length=%d", train_set.n_truncated,
                    cfg.model.max_length)
    plan = plan_steps(len(train_set), cfg)
    engine = distributed.make_engine(
        load(cfg.model.gradient_checkpointing), engine_config(cfg, run.dist.world_size),
        scheduler=cfg.optim.lr_scheduler, warmup_steps=plan.warmup_steps, total_steps=plan.total_steps,
    )
    # The reference is the policy's start checkpoint, frozen; it only ever runs forwards.
    reference = distributed.make_engine(load(False), engine_config(cfg, run.dist.world_size, train=False))

    packed = packing.is_enabled(engine.module) and packing.is_enabled(reference.module)

    def loss_fn(engine, batch):
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprob_sums(reference, batch, run.device, packed)  # (B,) x2
        chosen, rejected = pair_logprob_sums(engine, batch, run.device, packed)  # (B,) x2
        return dpo_metrics(chosen, rejected, ref_chosen, ref_rejected, beta)

    # The reference's sums on the held-out pairs never change: computed at the first evaluation.
    eval_reference: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def eval_fn(engine, step):
        if len(eval_set) == 0:
            return {}
        engine.eval()
        first = not eval_reference
        sums: list[list[torch.Tensor]] = [[], [], [], []]  # policy chosen/rejected, reference chosen/rejected
        for k, (batch, valid) in enumerate(eval_batches(eval_set, cfg.optim.micro_batch_size, run.dist)):
            if first:
                eval_reference.append(tuple(s.cpu() for s in pair_logprob_sums(reference, batch, run.device,
                                                                                 packed)))
            policy = pair_logprob_sums(engine, batch, run.device, packed)
            for out, value in zip(sums, (*policy, *eval_reference[k])):
                out.append(value.cpu()[:valid])
        parts = distributed.all_gather_objects([torch.cat(s) for s in sums])
        gathered = [torch.cat([p[i] for p in parts]) for i in range(4)]  # each (N_eval,)
        loss, metrics = dpo_metrics(*gathered, beta)
        return {"eval/loss": loss.item(), **{f"eval/{k}": v.item() for k, v in metrics.items()}}

    def save_fn(engine, directory):
        save_model(run, engine, directory, tokenizer)

    def pair_lengths(i):
        item = train_set[i]
        return len(item.chosen), len(item.rejected)

    units = Units(count=lambda batch: float(batch.num_pairs), lengths=pair_lengths, side_by_side=False,
                  packed=packed)
    final = train_supervised(run, engine, train_set, plan, loss_fn, eval_fn, save_fn, units)
    if run.is_main:
        plot_metrics(run.out_dir / "metrics.jsonl", PLOT_KEYS, run.plot_dir / "dpo.png",
                     title=f"DPO ({cfg.dpo.label}, beta={beta:g})")
        logger.info("dpo: %s", {k: round(v, 4) for k, v in final.items() if k.startswith("eval/")})
    run.metrics.close()
    return final
