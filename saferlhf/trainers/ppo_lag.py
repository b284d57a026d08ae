"""PPO-Lagrangian (Safe RLHF), its baselines PPO and reward shaping, and the critic-free modes, as one loop.

    saferlhf ppo-lag   learned λ, reward and cost critics:   A = (A_r − λ·A_c) / (1 + λ)
    saferlhf ppo-rs    fixed λ, one critic, end reward R − λ·C
    saferlhf ppo       reward only, one critic (the cost model, when given, is only logged)
    saferlhf grpo-lag  learned λ, no critic: A = (Â_r − λ·Â_c) / (1 + λ), Â normalised within each
    saferlhf rloo-lag  prompt's group of ``rollout.samples_per_prompt`` answers (GRPO / RLOO baseline)
    saferlhf grpo      reward only, no critic: A = Â_r
    saferlhf rloo

Each step reads top to bottom: generate → score (actor/reference log-probs, reward, cost, values)
→ make experience (KL shaping, GAE, λ update; or group advantages) → update epochs (actor + PTX,
critics) → log and checkpoint. Models: actor (trained), reference (frozen actor init), reward and cost
models (frozen), reward and cost critics (trained; none in the critic-free modes), each on its own
DeepSpeed engine.

Critic-free modes: the G answers of a prompt are consecutive rows of the rollout (both generation
backends lay them out so; checked every step), and the group advantages are computed once over the
whole scored rollout, before the update cuts it into mini-batches and token-budget passes: however
the rows are then split, each carries its own group's advantage. A rank generates every answer of its
own prompts, so no group spans ranks. The KL to the reference enters as a k3 loss term
(``ppo.kl_in=loss``, their default) or in the reward as the PPO modes place it (``reward``).
With ``lagrange.constraints`` (grpo-lag, rloo-lag) there are K cost models, the cost is (K, N), one λ_k
per constraint, and A = (Â_r − Σ_k λ_k·Â_c,k) / (1 + Σ_k λ_k).

Notation: N sequences in a rollout, P prompt tokens (left-padded), T response tokens
(right-padded), L = P + T, V vocabulary.

Token alignment: the log-prob of response token t (sequence position P + t) comes from the
logits at position P + t − 1, and the value of the state before emitting it is the critic's score
at the same position P + t − 1 — so both read ``[:, P-1 : L-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from saferlhf import distributed, ops
from saferlhf.algorithms import kl_loss, policy_loss, value_loss
from saferlhf.algorithms.group import broadcast_to_tokens, constrained_group_advantages
from saferlhf.config import Config
from saferlhf.data.collate import PromptDataset, SFTDataset
from saferlhf.models import packing
from saferlhf.models.hf import load_causal_lm, load_tokenizer
from saferlhf.models.passes import (
    Rows,
    entropy_sum,
    response_logprobs,
    response_values,
    sft_pass,
    trim_right,
)
from saferlhf.models.score_model import ScoreModel
from saferlhf.models.scorer import Scorer
from saferlhf.rollout import make_generator
from saferlhf.rollout.base import Generation, SamplingParams, cut_to_lengths
from saferlhf.rollout.sync import WeightSyncError, bucketize, weight_groups
from saferlhf.trainers import checkpoint
from saferlhf.trainers.batching import split_by_tokens
from saferlhf.trainers.common import (
    Run,
    apply_layer_levers,
    check_finite,
    engine_config,
    logger,
    plot_metrics,
    progress,
    save_model,
    setup_run,
)
from saferlhf.trainers.data import load_splits
from saferlhf.trainers.penalty import GROUP_ESTIMATORS, MODES, make_penalty
from saferlhf.trainers.phases import PhaseTimer, StepProfiler


@dataclass
class Experience:
    """One step's rollout, scored. N sequences, T response tokens."""

    sequences: torch.Tensor  # (N, L) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (N, L)
    prompt_len: int  # P
    mask: torch.Tensor  # (N, T) 1 on real response tokens
    logp_old: torch.Tensor  # (N, T)
    values_r: torch.Tensor  # (N, T) zeros without a reward critic
    values_c: torch.Tensor  # (N, T) zeros without a cost critic
    adv: torch.Tensor  # (N, T) the advantage the actor follows
    ret_r: torch.Tensor  # (N, T)
    ret_c: torch.Tensor  # (N, T)
    logp_ref: torch.Tensor | None = None  # (N, T) the reference's log-probs (the KL loss term reads them)


def _check_same_vocab(tok_a, name_a: str, tok_b, name_b: str) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise ValueError(f"tokenizer mismatch: {name_a} and {name_b} must share a vocabulary "
                         f"({len(tok_a)} vs {len(tok_b)} tokens); critics read the actor's token ids")


class PPOLagTrainer:
    """Holds the engines and the loop state; the loop itself is :meth:`train`."""

    def __init__(self, cfg: Config):
        self.cfg, self.mode = cfg, cfg.stage
        self.penalty = make_penalty(cfg)  # how the cost enters the step: learned λ, fixed λ or not at all
        p = cfg.ppo
        # Critic-free modes: "grpo" or "rloo" (saferlhf.algorithms.group); None for the PPO modes.
        self.estimator = GROUP_ESTIMATORS.get(self.mode)
        self.group_size = cfg.rollout.samples_per_prompt
        if self.estimator is not None and self.group_size < 2:
            raise ValueError(f"rollout.samples_per_prompt must be >= 2 for {MODES[self.mode]}, got {self.group_size}")
        self.kl_in = p.kl_in if p.kl_in != "auto" else ("loss" if self.estimator is not None else "reward")
        if not cfg.model.name_or_path:
            raise ValueError("model.name_or_path (the actor, usually the SFT model) is required")
        if not p.reward_model:
            raise ValueError("ppo.reward_model is required")
        # One cost model per constraint: lagrange.cost_models with lagrange.constraints, else ppo.cost_model.
        self.constraint_names = list(cfg.lagrange.constraints)
        cost_paths = list(cfg.lagrange.cost_models) if self.constraint_names else [p.cost_model] * bool(p.cost_model)
        if self.penalty.needs_cost_model and not cost_paths:
            raise ValueError(f"ppo.cost_model is required for {MODES[self.mode]}")
        self.run: Run = setup_run(cfg)
        world, device = self.run.dist.world_size, self.run.device

        actor_path = cfg.model.name_or_path
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or actor_path, padding_side="left")
        # Critics read the actor's token ids: their tokenizers must match (checked before any engine starts).
        self.use_cost_critic = self.penalty.cost_critic and self.estimator is None
        critic_paths = {}
        if self.estimator is None:
            critic_paths["reward"] = p.reward_critic or (actor_path if p.critic_init == "actor" else p.reward_model)
        if self.use_cost_critic:
            critic_paths["cost"] = p.cost_critic or (actor_path if p.critic_init == "actor" else p.cost_model)
        for name, path in critic_paths.items():
            _check_same_vocab(self.tokenizer, f"actor ({actor_path})", load_tokenizer(path), f"{name} critic ({path})")

        prompts, _ = load_splits(cfg.data, "prompt", cfg.run.seed)
        self.prompts = PromptDataset(prompts, self.tokenizer, cfg.model.max_length,
                                     chat_template=cfg.model.chat_template)
        self.ptx = None
        if cfg.data.ptx:
            from saferlhf.data.registry import mix_datasets

            ptx_rows = mix_datasets(cfg.data.ptx, "sft", seed=cfg.run.seed, strict=cfg.data.strict).rows
            sft_tok = load_tokenizer(cfg.model.tokenizer or actor_path, padding_side="right")
            self.ptx = SFTDataset(ptx_rows, sft_tok, cfg.model.max_length, chat_template=cfg.model.chat_template)
        if p.micro_batch_tokens > 0:
            # The longest sequence a pass can meet: the longest prompt and a response at the length cap.
            longest = max(len(self.prompts[i].input_ids) for i in range(len(self.prompts))) + \
                cfg.rollout.max_new_tokens
            if p.micro_batch_tokens < longest:
                raise ValueError(f"ppo.micro_batch_tokens={p.micro_batch_tokens} is smaller than the longest "
                                 f"sequence a step can hold ({longest} tokens: the longest prompt plus "
                                 f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}); raise it to at least "
                                 f"{longest}")
        if self.ptx is not None and cfg.optim.micro_batch_tokens > 0:
            longest = max(len(self.ptx[i].input_ids) for i in range(len(self.ptx)))
            if cfg.optim.micro_batch_tokens < longest:
                raise ValueError(f"optim.micro_batch_tokens={cfg.optim.micro_batch_tokens} (the PTX passes' budget) is "
                                 f"smaller than the longest PTX sequence ({longest} tokens)")
        n_per_step = p.rollout_batch_size * world
        if len(self.prompts) < n_per_step:
            raise ValueError(f"{len(self.prompts)} prompts are fewer than one step's {n_per_step} "
                             f"(ppo.rollout_batch_size × world size)")
        self.total_steps = p.total_steps if cfg.run.max_steps <= 0 else min(p.total_steps, cfg.run.max_steps)
        updates = self.total_steps * p.update_epochs * max(1, self._rollout_size() // p.mini_batch_size)

        # One optimizer step per mini-batch: the loop marks the last of its passes as the boundary itself.
        def trained(model, lr, wd):
            return distributed.make_engine(
                model, engine_config(cfg, world, micro_batch_size=p.mini_batch_size, lr=lr, weight_decay=wd),
                scheduler=cfg.optim.lr_scheduler, warmup_steps=int(cfg.optim.warmup_ratio * updates),
                total_steps=updates)

        def frozen(model):
            return distributed.make_engine(model, engine_config(cfg, world, train=False,
                                                                micro_batch_size=p.mini_batch_size))

        self.packed: dict[str, bool] = {}  # model → whether its passes run packed (model.packing)
        self.full_head = not cfg.model.response_logits  # the original's LM head over every position

        def levers(name, model):
            model = apply_layer_levers(model, cfg, device)
            self.packed[name] = packing.is_enabled(model)
            return model

        def load(name, path):
            model = load_causal_lm(path, dtype=cfg.model.dtype, tokenizer=self.tokenizer,
                                   gradient_checkpointing=cfg.model.gradient_checkpointing)
            return levers(name, model)

        def score_model(name, path):
            return levers(name, ScoreModel.from_pretrained(path, dtype=cfg.model.dtype))

        self.actor = trained(load("actor", actor_path), cfg.optim.lr, cfg.optim.weight_decay)
        self.ref = frozen(load("ref", actor_path))
        self.reward = Scorer(frozen(score_model("reward", p.reward_model)),
                             load_tokenizer(p.reward_model, padding_side="right"), cfg.model.max_length,
                             actor_tokenizer=self.tokenizer, packed=self.packed["reward"])
        self.costs = [Scorer(frozen(score_model(f"cost{k or ''}", path)), load_tokenizer(path, padding_side="right"),
                             cfg.model.max_length, actor_tokenizer=self.tokenizer, packed=self.packed[f"cost{k or ''}"])
                      for k, path in enumerate(cost_paths)]
        self.critic_r = None
        if "reward" in critic_paths:
            self.critic_r = trained(score_model("reward_critic", critic_paths["reward"]),
                                    p.critic_lr, p.critic_weight_decay)
        self.critic_c = None
        if self.use_cost_critic:
            self.critic_c = trained(score_model("cost_critic", critic_paths["cost"]),
                                    p.critic_lr, p.critic_weight_decay)
        engine_log = None if cfg.run.verbose else self.run.out_dir / f"engine-rank{self.run.dist.rank}.log"
        self.generator = make_generator(cfg, self.actor, self.tokenizer, actor_path, engine_log)
        self.sampling = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, repetition_penalty=cfg.rollout.repetition_penalty,
            n=cfg.rollout.samples_per_prompt)
        self.start_step = 1
        self.phases = PhaseTimer(device, sync=cfg.run.profile or cfg.run.memory_snapshot)
        if self.run.dist.rank > 0:
            # Every rank was seeded alike; sampling must differ between ranks (rank 0 keeps run.seed).
            torch.manual_seed(cfg.run.seed + 1_000_003 * self.run.dist.rank)

    def _rollout_size(self) -> int:
        return self.cfg.ppo.rollout_batch_size * self.cfg.rollout.samples_per_prompt

    # -- data position: a pure function of (seed, step), so resuming needs only the step ---------

    def prompt_indices(self, step: int) -> list[int]:
        """This rank's prompt indices of ``step`` (1-based): seeded epochs cut into global batches."""
        cfg = self.cfg
        per_step = cfg.ppo.rollout_batch_size * self.run.dist.world_size
        steps_per_epoch = len(self.prompts) // per_step
        epoch, offset = divmod(step - 1, steps_per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(cfg.run.seed + epoch))
        chunk = order[offset * per_step : (offset + 1) * per_step].tolist()
        r, b = self.run.dist.rank, cfg.ppo.rollout_batch_size
        return chunk[r * b : (r + 1) * b]

    def ptx_indices(self, step: int, update: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step * 1009 + update)
        return torch.randint(len(self.ptx), (self.cfg.ppo.mini_batch_size,), generator=g).tolist()

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        try:
            return self._train()
        finally:
            self.close()  # also when a step raised: the generation engine must not outlive the run

    def _train(self) -> dict[str, float]:
        cfg, run = self.cfg, self.run
        if cfg.run.resume:
            self.resume()
        bar = progress(total=self.total_steps, desc=MODES[self.mode], enabled=cfg.run.progress and run.is_main)
        bar.update(self.start_step - 1)
        last: dict[str, float] = {}
        if self.generator.needs_sync and self.start_step > 1:
            self.sync_weights()  # the engine started from the initial weights; the actor was restored
        profiler = StepProfiler(run.out_dir / "profile", run.device, trace=cfg.run.profile,
                                memory=cfg.run.memory_snapshot) if run.is_main else None
        profile_from = min(self.start_step + 1, self.total_steps)  # the first step warms up
        for step in range(self.start_step, self.total_steps + 1):
            if profiler is not None and step == profile_from:
                profiler.start()
            phases = self.phases
            with phases("generate"):
                batch = self.prompts.collate([self.prompts[i] for i in self.prompt_indices(step)])
                gen = self.generator.generate(batch.input_ids, batch.attention_mask, self.sampling)
                if cfg.rollout.synthetic_lengths:  # a benchmark's workload: seeded per step, not by the RNG state
                    lengths_rng = torch.Generator().manual_seed(cfg.run.seed * 7919 + step * 31 + run.dist.rank)
                    gen = cut_to_lengths(gen, cfg.rollout.synthetic_lengths, lengths_rng, self.tokenizer.pad_token_id)
                self.generator.sleep()
                if self.generator.needs_sync:
                    # Each rank's engine finishes on its own; without this the first to finish would wait
                    # in the score phase's first collective and its wait would be counted as scoring.
                    distributed.barrier()
            generated = float(gen.response_mask.sum())
            exp, stats = self.make_experience(gen, step)  # phases "score" and "experience"
            stats.update(self.update(exp, step))  # phases "actor" and "critics"
            if self.generator.needs_sync:
                with phases("sync"):
                    stats.update(self.sync_weights())
            timings = phases.collect()
            timings["time/learn"] = timings.get("time/actor", 0.0) + timings.get("time/critics", 0.0)
            stats.update(timings)
            stats["rollout/tokens_per_second"] = generated / max(timings["time/generate"], 1e-9)
            last = stats
            run.metrics.log(step, stats)
            bar.set_postfix(R=f"{stats['train/reward']:.2f}", C=f"{stats.get('train/cost', 0.0):.2f}",
                            lam=f"{stats.get('train/lambda', 0.0):.2f}")
            bar.update(1)
            if cfg.run.save_every > 0 and step % cfg.run.save_every == 0 and step != self.total_steps:
                self.save_checkpoint(step)
        bar.close()
        if profiler is not None:
            for path in profiler.finish():
                logger.info("profile: wrote %s", path)
        self.close()
        self.save_final()
        if run.is_main:
            plot_metrics(run.out_dir / "metrics.jsonl",
                         ["train/lambda", "train/episode_cost_window",
                          *(f"train/{key}/{name}" for name in self.constraint_names
                            for key in ("lambda", "episode_cost_window", "unsafe_rate")),
                          "train/reward", "train/cost", "train/kl",
                          "train/actor_loss", "train/reward_critic_loss", "train/cost_critic_loss",
                          "train/kl_loss", "train/response_length"], run.plot_dir / f"{self.mode}.png",
                         title=MODES[self.mode])
        run.metrics.close()
        return last

    # -- passes: the token budget ---------------------------------------------------------------------

    def _passes(self, attention_mask: torch.Tensor, prompt_len: int,
                rows: torch.Tensor | None = None) -> list[tuple[torch.Tensor, bool]]:
        """``rows`` of a rollout (all when None) cut into passes of at most ``ppo.micro_batch_tokens``.

        Returns (row indices, real) per pass. Every rank runs the same number of passes (ZeRO-2/3
        reduce or gather at each); a rank with fewer rows than passes gets a zero-weight pass over one
        row (``real`` False) that only keeps the ranks in step.
        """
        budget = self.cfg.ppo.micro_batch_tokens
        if rows is None:
            rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        if budget <= 0:
            return [(rows, True)]
        sub = attention_mask[rows]
        # Host sync, once per mini-batch: the lengths decide the passes.
        items = list(zip(sub[:, :prompt_len].sum(-1).tolist(), sub[:, prompt_len:].sum(-1).tolist()))
        longest = max(p + r for p, r in items)
        if longest > budget:
            raise ValueError(f"ppo.micro_batch_tokens={budget} is smaller than a sequence of {longest} tokens")
        packed = self.packed["actor"]
        parts = split_by_tokens(items, budget, packed=packed)
        count = int(distributed.all_reduce_max(torch.tensor([len(parts)]))[0])
        if count > len(parts):
            parts = split_by_tokens(items, budget, packed=packed, min_parts=count)
        return [(rows[torch.tensor(part, device=rows.device)], True) if part else (rows[:1], False)
                for part in parts]

    # -- experience ----------------------------------------------------------------------------------

    @torch.no_grad()
    def make_experience(self, gen: Generation, step: int) -> tuple[Experience, dict[str, float]]:
        """Score a rollout and turn it into advantages and returns (DESIGN.md §3).

        The six passes (actor and reference log-probs, reward and cost end scores, both critics' values)
        run pass by pass over token-budget micro-batches (``ppo.micro_batch_tokens``), packed where the
        model allows (``model.packing``), so that memory follows the budget, not the rollout.
        """
        cfg, device = self.cfg, self.run.device
        seq = gen.sequences.to(device)  # (N, L)
        attn = gen.attention_mask.to(device)  # (N, L)
        mask = gen.response_mask.to(device).float()  # (N, T)
        plen = gen.prompt_ids.shape[1]
        n, width = mask.shape
        if self.estimator is not None:
            _check_groups(gen.prompt_ids, self.group_size)
        temperature = cfg.rollout.temperature
        logp_old, logp_ref, values_r, values_c = (torch.zeros(n, width, device=device) for _ in range(4))
        reward, cost = torch.zeros(n, device=device), torch.zeros(max(1, len(self.costs)), n, device=device)
        entropy = torch.zeros(2, device=device)  # (Σ entropy, tokens)
        self.actor.eval()
        with self.phases("score"):
            for index, real in self._passes(attn, plen):
                rows = Rows.take(seq, attn, plen, index)
                args = (rows.sequences, rows.attention_mask, rows.prompt_len)
                lp, logits = response_logprobs(self.actor, *args, temperature, packed=self.packed["actor"],
                                               full_head=self.full_head)
                ent = entropy_sum(logits, None if self.packed["actor"] else rows.response(mask), temperature)
                del logits
                lp_ref, _ = response_logprobs(self.ref, *args, temperature, packed=self.packed["ref"],
                                              full_head=self.full_head)
                r = self.reward(rows.sequences, rows.attention_mask)
                c = [score(rows.sequences, rows.attention_mask) for score in self.costs]  # K × (rows,)
                v_r = (response_values(self.critic_r, *args, packed=self.packed["reward_critic"])
                       if self.critic_r is not None else None)
                v_c = (response_values(self.critic_c, *args, packed=self.packed["cost_critic"])
                       if self.critic_c is not None else None)
                if not real:
                    continue  # a zero-weight pass: it only kept this rank in step with the others
                cols = slice(0, rows.width)
                logp_old[index, cols], logp_ref[index, cols] = lp, lp_ref
                if v_r is not None:
                    values_r[index, cols] = v_r
                if v_c is not None:
                    values_c[index, cols] = v_c
                reward[index] = r
                for k, c_k in enumerate(c):
                    cost[k, index] = c_k
                entropy += torch.stack(ent)
            check_finite("reward score", reward, step)
            check_finite("cost score", cost, step)
            if not self.constraint_names:
                cost = cost[0]  # (N,): one constraint
        with self.phases("experience"):
            return self._advantages(step, seq, attn, plen, mask, logp_old, logp_ref, reward, cost, values_r,
                                    values_c, entropy[0] / entropy[1].clamp(min=1.0))

    def _advantages(self, step, seq, attn, plen, mask, logp_old, logp_ref, reward, cost, values_r, values_c,
                    entropy) -> tuple[Experience, dict[str, float]]:
        """λ update, then KL shaping and both GAEs, or the group advantages, of a scored rollout (the
        ``experience`` phase)."""
        p = self.cfg.ppo
        sig = self.penalty.signals(reward, cost)  # the end signals and λ of this mode (a collective for λ)
        stats: dict[str, float] = dict(sig.stats)
        extra: dict[str, torch.Tensor] = {}  # mode-specific scalars, reduced with the common ones

        if self.estimator is None:
            beta = p.kl_coeff if self.kl_in == "reward" else 0.0  # with kl_in=loss the actor loss holds the KL
            rewards, costs = ops.shape_rewards(logp_old, logp_ref, mask, sig.end_reward, sig.end_cost, beta,
                                               p.clip_score)
            adv_r, ret_r, adv_c, ret_c, adv = ops.dual_gae(rewards, costs, values_r, values_c, mask, p.gamma,
                                                           p.gae_lambda, sig.lam)
        else:
            adv = self._group_advantages(sig, logp_old, logp_ref, mask)  # (N, T)
            ret_r = ret_c = torch.zeros_like(mask)  # no critic learns from them
            groups = (-1, self.group_size)
            extra["reward_group_std"] = reward.view(groups).std(-1).mean()  # 0: the group's answers score alike
            if self.penalty.cost_critic:
                extra["cost_group_std"] = sig.end_cost.reshape(-1, *groups[1:]).std(-1).mean()
        kl = ((logp_old - logp_ref) * mask).sum(-1)  # (N,) per-sequence KL (k1 sum)
        lengths = mask.sum(-1)  # (N,)
        # Several constraints: the mean cost over all of them, unsafe by any; each one's under its name.
        unsafe = cost > 0 if cost.dim() == 1 else (cost > 0).any(0)  # (N,)
        for name, cost_k in zip(self.constraint_names, cost):
            extra[f"cost/{name}"], extra[f"unsafe_rate/{name}"] = cost_k.mean(), (cost_k > 0).float().mean()
        local = torch.stack([reward.mean(), cost.mean(), kl.mean(), lengths.mean(), entropy,
                             unsafe.float().mean(), (lengths == 0).float().mean(), *extra.values()])
        keys = ["reward", "cost", "kl", "response_length", "entropy", "unsafe_rate", "empty_rate", *extra]
        stats.update({f"train/{k}": v for k, v in zip(keys, distributed.all_reduce_mean(local.cpu()).tolist())})
        exp = Experience(seq, attn, plen, mask, logp_old, values_r, values_c, adv, ret_r, ret_c, logp_ref)
        return exp, stats

    def _group_advantages(self, sig, logp_old, logp_ref, mask) -> torch.Tensor:
        """The critic-free advantage of every response token: (N, T).

        Per-episode scores R and c̃ (the constraint's cost stream; with ``ppo.kl_in=reward`` each is the
        sum over the response of the PPO modes' KL-shaped per-token signal, i.e. its undiscounted return)
        → advantages within each prompt's group, per stream → A = (Â_r − λ·Â_c)/(1 + λ) (Â_r alone
        without a learned λ) → every response token of an episode carries its A.

        Plain torch: the group statistics are over (N,) vectors, a few microseconds next to the
        model passes of a step, so a fused op would save nothing measurable.
        """
        p = self.cfg.ppo
        reward, cost = sig.end_reward, sig.end_cost  # (N,), (N,) or (K, N)
        if self.kl_in == "reward":
            shaped = [ops.shape_rewards(logp_old, logp_ref, mask, reward, c, p.kl_coeff, p.clip_score)
                      for c in (cost if cost.dim() == 2 else cost[None])]  # per constraint
            reward = shaped[0][0].sum(-1)  # (N,)
            cost = torch.stack([costs.sum(-1) for _, costs in shaped]).reshape(cost.shape)  # (N,) or (K, N)
        # The learned policy gives the cost a stream of its own (in the PPO modes, a cost critic).
        costs = cost if self.penalty.cost_critic else None
        _, _, adv = constrained_group_advantages(reward, costs, sig.lam, self.group_size, self.estimator)
        return broadcast_to_tokens(adv, mask)  # (N, T)

    # -- the update epochs ---------------------------------------------------------------------------------

    def update(self, exp: Experience, step: int) -> dict[str, float]:
        """PPO epochs over mini-batches: actor (+ PTX), reward critic, cost critic; one optimizer step each
        per mini-batch, its gradient accumulated over the mini-batch's passes."""
        cfg, p = self.cfg, self.cfg.ppo
        n = exp.sequences.shape[0]
        sums: dict[str, list[torch.Tensor]] = {}
        self.actor.train()
        critics = [c for c in (self.critic_r, self.critic_c) if c is not None]
        for critic in critics:
            critic.train()
        g = torch.Generator().manual_seed(cfg.run.seed + step)
        update = 0
        for _ in range(p.update_epochs):
            order = torch.randperm(n, generator=g)
            for start in range(0, n - p.mini_batch_size + 1, p.mini_batch_size):
                idx = order[start : start + p.mini_batch_size].to(exp.sequences.device)
                passes = self._passes(exp.attention_mask, exp.prompt_len, idx)
                weights = _pass_weights(exp.mask, idx, passes)
                with self.phases("actor"):
                    metrics = self._actor_step(exp, passes, weights, step, update)
                if critics:
                    with self.phases("critics"):
                        metrics.update(self._critic_steps(exp, passes, weights, step))
                for key, value in metrics.items():
                    sums.setdefault(key, []).append(value.detach().float().reshape(()))
                update += 1
        if not sums:
            return {}
        keys = sorted(sums)
        means = torch.stack([torch.stack(sums[k]).mean() for k in keys]).cpu()
        out = {f"train/{k}": v for k, v in zip(keys, distributed.all_reduce_mean(means).tolist())}
        out["train/actor_lr"] = self.actor.get_lr()[0]
        return out

    def _actor_step(self, exp: Experience, passes, weights, step: int, update: int) -> dict[str, torch.Tensor]:
        """One clipped-policy-loss step of the actor on a mini-batch (+ PTX when configured)."""
        cfg, p = self.cfg, self.cfg.ppo
        names = ("actor_loss", "actor_clip_fraction", "approx_kl") + (("kl_loss",) if self.kl_in == "loss" else ())
        metrics = {k: torch.zeros((), device=exp.mask.device) for k in names}
        ptx_passes = self._ptx_passes(step, update) if self.ptx is not None and p.ptx_coeff > 0 else []
        last = len(passes) + len(ptx_passes) - 1
        for k, ((index, _), (w_seq, w_tok)) in enumerate(zip(passes, weights)):
            rows = Rows.take(exp.sequences, exp.attention_mask, exp.prompt_len, index)
            logp, _ = response_logprobs(self.actor, rows.sequences, rows.attention_mask, rows.prompt_len,
                                        cfg.rollout.temperature, packed=self.packed["actor"], full_head=self.full_head)
            pl = policy_loss(logp, rows.response(exp.logp_old), rows.response(exp.adv), rows.response(exp.mask),
                             p.clip_ratio)
            objective = pl.loss
            if self.kl_in == "loss":  # β·KL(π ‖ π_ref), the k3 estimate, beside the policy loss
                kl = kl_loss(logp, rows.response(exp.logp_ref), rows.response(exp.mask))
                metrics["kl_loss"] += kl.detach() * w_seq
                objective = objective + p.kl_coeff * kl
            # The loss is a mean over the mini-batch's sequences: each pass's own mean weighs by its share.
            loss = objective * w_seq
            metrics["actor_loss"] += loss.detach()
            metrics["actor_clip_fraction"] += pl.clip_fraction * w_tok
            metrics["approx_kl"] += pl.approx_kl * w_tok
            check_finite("actor loss", loss.detach(), step)  # host sync: one per pass
            self._backward(self.actor, loss, boundary=k == last)
        if ptx_passes:
            metrics["ptx_loss"] = torch.zeros((), device=exp.mask.device)
            total = sum(float(count) for *_, count in ptx_passes)
            for j, (input_ids, attention_mask, labels, real, _) in enumerate(ptx_passes):
                ce_sum, _ = sft_pass(self.actor, input_ids, attention_mask, labels, packed=self.packed["actor"])
                ptx_loss = ce_sum / max(total, 1.0) * float(real)  # token mean over the whole PTX batch
                metrics["ptx_loss"] += ptx_loss.detach()
                loss = p.ptx_coeff * ptx_loss
                check_finite("actor loss", loss.detach(), step)
                self._backward(self.actor, loss, boundary=len(passes) + j == last)
        self.actor.step()
        return metrics

    def _ptx_passes(self, step: int, update: int) -> list[tuple]:
        """The PTX batch of this update cut by ``optim.micro_batch_tokens``: (ids, mask, labels, real, tokens)."""
        device = self.run.device
        batch = self.ptx.collate([self.ptx[i] for i in self.ptx_indices(step, update)])
        ids, attn, labels = (x.to(device) for x in (batch.input_ids, batch.attention_mask, batch.labels))
        budget = self.cfg.optim.micro_batch_tokens
        parts: list[list[int]] = [list(range(ids.shape[0]))]
        if budget > 0:
            items = [(n,) for n in attn.sum(-1).tolist()]
            parts = split_by_tokens(items, budget, packed=self.packed["actor"])
            count = int(distributed.all_reduce_max(torch.tensor([len(parts)]))[0])
            if count > len(parts):
                parts = split_by_tokens(items, budget, packed=self.packed["actor"], min_parts=count)
        out = []
        for part in parts:
            real = bool(part)
            index = torch.tensor(part or [0], device=device)
            sub = trim_right(ids[index], attn[index], labels[index])
            out.append((*sub, real, float((sub[2][:, 1:] != -100).sum()) if real else 0.0))
        return out

    def _critic_steps(self, exp: Experience, passes, weights, step: int) -> dict[str, torch.Tensor]:
        """One clipped-value-loss step of each critic on a mini-batch."""
        p = self.cfg.ppo
        metrics = {}
        for name, critic, values_old, returns in (
            ("reward_critic", self.critic_r, exp.values_r, exp.ret_r),
            ("cost_critic", self.critic_c, exp.values_c, exp.ret_c),
        ):
            if critic is None:
                continue
            loss_sum = torch.zeros((), device=exp.mask.device)
            clip = torch.zeros((), device=exp.mask.device)
            for k, ((index, _), (w_seq, w_tok)) in enumerate(zip(passes, weights)):
                rows = Rows.take(exp.sequences, exp.attention_mask, exp.prompt_len, index)
                values = response_values(critic, rows.sequences, rows.attention_mask, rows.prompt_len,
                                         packed=self.packed[name])
                vl = value_loss(values, rows.response(values_old), rows.response(returns), rows.response(exp.mask),
                                p.clip_value)
                loss = vl.loss * w_seq
                check_finite(f"{name} loss", loss.detach(), step)
                self._backward(critic, loss, boundary=k == len(passes) - 1)
                loss_sum += loss.detach()
                clip += vl.clip_fraction * w_tok
            critic.step()
            metrics[f"{name}_loss"] = loss_sum
            metrics[f"{name}_clip_fraction"] = clip
        return metrics

    @staticmethod
    def _backward(engine, loss: torch.Tensor, *, boundary: bool) -> None:
        """Accumulate the gradient of one pass; the mini-batch's last pass is the accumulation boundary.

        The loss is already normalised over the whole mini-batch (``_pass_weights``), so DeepSpeed must not
        divide it again; ``engine.step()`` follows once, after the boundary pass.
        """
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss, scale_wrt_gas=False)

    # -- checkpoints ------------------------------------------------------------------------------

    def _engines(self) -> dict:
        engines = {"actor": self.actor}
        if self.critic_r is not None:
            engines["reward_critic"] = self.critic_r
        if self.critic_c is not None:
            engines["cost_critic"] = self.critic_c
        return engines

    def save_checkpoint(self, step: int) -> Path:
        """Engines (weights, optimizer, scheduler), λ, RNG and step, written atomically."""
        return checkpoint.save(self.run, step, self._engines(), {"lagrange": self.penalty.state_dict()})

    def resume(self) -> None:
        state = checkpoint.resume(self.run, self._engines())
        if state is None:
            return
        if state.get("lagrange") is not None:
            self.penalty.load_state_dict(state["lagrange"])
        self.start_step = state["step"] + 1

    # -- the generation engine ------------------------------------------------------------------

    def sync_weights(self) -> dict[str, float]:
        """Push the actor's weights into the generation engine (DESIGN.md §5), then check and verify it.

        A failed push leaves the engine on its last good weights (see the vllm backend); it is tried
        once more from the actor, and a second failure stops the run (checkpoints stay as they are).
        After the push the engine's layers are compared with the actor's weights
        (``rollout.check_weights``) and, with ``rollout.verify_sync``, its greedy continuations and
        log-probs with the actor's. A failure of either is handled by ``rollout.on_verify_failure``:
        ``restart`` rebuilds the engine from the actor's full weights and checks again (a second
        failure stops the run), ``stop`` stops it at once, ``warn`` logs and goes on.
        """
        cfg = self.cfg
        self.generator.wake_up()

        def push():
            return self.generator.load_weights(bucketize(self._actor_weights(), cfg.rollout.sync_bucket_mb << 20))

        try:
            sync = push()
        except WeightSyncError as e:
            logger.warning("weight sync failed, trying once more: %s", e)
            sync = push()
        stats = {"sync/seconds": sync.seconds, "sync/buckets": float(sync.buckets),
                 "sync/megabytes": sync.bytes / 2**20}
        check, failure = self._check_engine(sync.check, stats)
        stats["sync/failures"] = float(failure is not None)
        if failure is not None:
            action = cfg.rollout.on_verify_failure
            if action == "warn":
                logger.warning("weight sync check failed, going on (rollout.on_verify_failure=warn): %s", failure)
            elif action == "stop":
                raise WeightSyncError(f"weight sync check failed (rollout.on_verify_failure=stop): {failure}")
            else:
                logger.warning("weight sync check failed, rebuilding the engine from the actor's weights: %s",
                               failure)
                check = self.generator.rebuild(self._actor_weights())
                _, failure = self._check_engine(check, stats)
                if failure is not None:
                    raise WeightSyncError(f"weight sync check failed again after rebuilding the engine from the "
                                          f"actor's full weights: {failure}")
        stats["sync/engine_restarts"] = float(self.generator.restarts)
        return stats

    def _actor_weights(self):
        """The actor's parameters group by group, in the engine's dtype (a collective under ZeRO-3)."""
        return weight_groups(self.actor, dtype=getattr(torch, self.cfg.model.dtype), device=self.run.device)

    def _check_engine(self, check, stats: dict[str, float]) -> tuple[object, str | None]:
        """The weight check's and verification's verdict on the engine, agreed by every rank.

        Fills ``stats`` (``sync/check_ok``, ``sync/check_max_error``, ``sync/verified``,
        ``sync/max_logprob_diff``) and returns (the check, a description of the failure or None).
        """
        cfg = self.cfg
        failed_check = check is not None and not check.ok
        verified, diff = True, 0.0
        if cfg.rollout.verify_sync:
            count = min(cfg.rollout.verify_prompts, len(self.prompts))
            probes = [self.prompts[i].input_ids.tolist() for i in range(count)]
            same, diff = self.generator.verify(self.actor, probes)
            verified = same and diff <= cfg.rollout.verify_tolerance
        local = torch.tensor([float(failed_check), float(not verified),
                              check.worst[1] if check is not None else 0.0, diff])
        failed_check, failed_verify, worst, diff = distributed.all_reduce_max(local).tolist()  # every rank acts alike
        if check is not None:
            stats.update({"sync/check_ok": float(not failed_check), "sync/check_max_error": worst})
        if cfg.rollout.verify_sync:
            stats.update({"sync/verified": float(not failed_verify), "sync/max_logprob_diff": diff})
        if not (failed_check or failed_verify):
            return check, None
        parts = []
        if failed_verify:
            parts.append(f"the engine's greedy continuations or log-probs differ from the actor's (max log-prob "
                         f"difference {diff:.3g}, tolerance {cfg.rollout.verify_tolerance:.3g})")
        if check is not None:
            parts.append(check.describe() if not check.ok else f"weight check passed here ({check.describe()})")
        return check, "; ".join(parts)

    def close(self) -> None:
        """Stop the generation engine (a no-op for the hf backend)."""
        self.generator.shutdown()

    def save_final(self) -> None:
        save_model(self.run, self.actor, self.run.out_dir / "model", self.tokenizer)


def _check_groups(prompt_ids: torch.Tensor, group_size: int) -> None:
    """The critic-free modes' layout: every run of ``group_size`` consecutive rows answers one prompt.

    Both generation backends return a prompt's answers next to each other (prompt by prompt); a backend
    that did otherwise would make every group statistic silently wrong, so this is checked (on the
    host-side prompt ids: no device sync).
    """
    n, width = prompt_ids.shape
    if n % group_size:
        raise RuntimeError(f"{n} rollout rows do not split into groups of rollout.samples_per_prompt={group_size}")
    groups = prompt_ids.view(n // group_size, group_size, width)  # (B, G, P)
    if not bool((groups == groups[:, :1]).all()):
        raise RuntimeError("the rollout's answers are not grouped by prompt: each run of "
                           f"rollout.samples_per_prompt={group_size} consecutive rows must answer one prompt")


def _pass_weights(mask: torch.Tensor, index: torch.Tensor, passes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each pass's share of a mini-batch: (of its sequences with a response token, of its response tokens).

    The actor and critic losses are means over sequences (each a mean over its tokens), the clip
    fractions and approximate KL means over tokens; weighting every pass's own mean by its share makes
    the sum over passes the mini-batch's mean however the mini-batch was cut. Zero-weight passes
    (``real`` False) count nothing.
    """
    rows = mask[index]  # (B, T)
    sequences = (rows.sum(-1) > 0).sum().float().clamp(min=1.0)
    tokens = rows.sum().clamp(min=1.0)
    weights = []
    for part, real in passes:
        sub = mask[part]
        share = float(real)
        weights.append(((sub.sum(-1) > 0).sum().float() / sequences * share, sub.sum() / tokens * share))
    return weights


def train_ppo(cfg: Config) -> dict[str, float]:
    return PPOLagTrainer(cfg).train()
