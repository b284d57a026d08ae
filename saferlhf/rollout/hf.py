"""The ``hf`` generation backend: transformers ``generate`` on the actor itself (the baseline).

Under ZeRO-3 the actor's parameters are partitioned, so every generated token gathers them; this
is how the original safe-rlhf generates and what the vLLM backend avoids.

Those gathers are collectives: under ZeRO-3 with several ranks every rank must run the same number
of forward passes. ``generate`` stops as soon as all of *its own* sequences have ended, so a rank
whose batch finishes early would leave the loop while the others still wait for it in the next
all-gather — a hang. ``synced_gpus=True`` keeps a finished rank running (discarded) forward passes
until every rank has finished. transformers only turns it on by itself when a live
``HfDeepSpeedConfig`` says ZeRO-3 is enabled, which this project does not create, so the generator
detects the partitioning itself (:func:`needs_synced_gpus`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from saferlhf.models.hf import is_zero3_partitioned
from saferlhf.rollout.base import Generation, SamplingParams, response_mask_from_ids


def needs_synced_gpus(model) -> bool:
    """``synced_gpus`` for ``generate``: ZeRO-3 partitioned parameters and a process group of > 1 ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return is_zero3_partitioned(model)


class HFGenerator:
    """``generate`` on the actor; under ZeRO-3 with several ranks with ``synced_gpus`` (module docstring).

    ``synced_gpus``: None detects it on every call (:func:`needs_synced_gpus`); True or False forces it.
    When synced, every rank must call :meth:`generate` the same number of times.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, synced_gpus: bool | None = None) -> None:
        self.model = model  # an nn.Module or a DeepSpeed engine (its .module generates)
        self.tokenizer = tokenizer
        self.synced_gpus = synced_gpus

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingParams) -> Generation:
        module = getattr(self.model, "module", self.model)
        was_training = module.training
        module.eval()
        device = next(module.parameters()).device
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            num_return_sequences=sampling.n,
            eos_token_id=eos,
            pad_token_id=pad,
            repetition_penalty=sampling.repetition_penalty,
            use_cache=True,
            synced_gpus=needs_synced_gpus(self.model) if self.synced_gpus is None else self.synced_gpus,
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = module.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), **kwargs)
        if was_training:
            module.train()
        p = prompt_ids.shape[1]
        response = out[:, p:].cpu()  # (B·n, T)
        if response.shape[1] == 0:  # nothing generated at all: keep a (B·n, 1) all-padding layout
            response = torch.full((out.shape[0], 1), pad, dtype=out.dtype)
            mask = torch.zeros_like(response)
        else:
            mask = response_mask_from_ids(response, eos, pad)
            response = response.masked_fill(mask == 0, pad)
        return Generation(
            prompt_ids=prompt_ids.repeat_interleave(sampling.n, dim=0).cpu(),
            prompt_mask=prompt_mask.repeat_interleave(sampling.n, dim=0).cpu(),
            response_ids=response,
            response_mask=mask,
        )

    needs_sync = False  # generates with the actor itself

    def load_weights(self, named_tensors) -> None:
        """The hf backend generates with the actor itself: there is nothing to push."""

    def verify(self, actor, probes, max_new_tokens: int = 16) -> tuple[bool, float]:
        return True, 0.0  # the actor itself

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
