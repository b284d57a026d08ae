"""The one generation loop of evaluation, rounds and the demo: a policy's answers to a prompt set."""

from __future__ import annotations

import dataclasses

import torch

from saferlhf.data.collate import PromptDataset
from saferlhf.rollout.base import SamplingParams
from saferlhf.rollout.hf import HFGenerator


@torch.no_grad()
def generate_records(
    model, tokenizer, prompts: list[str], sampling: SamplingParams, *, batch_size: int = 64, max_length: int = 512,
    chat_template: bool = False, generator=None, show_progress: bool = False, desc: str = "generate",
) -> list[dict]:
    """One record per (prompt, sample), in prompt order: ``prompt_index, prompt, sample, response,
    response_tokens, finished`` (finished: the answer ended with eos rather than at max_new_tokens).

    ``generator``: a generation backend (a vLLM engine); default HF ``generate`` on ``model``. With a
    ``sampling.seed`` every batch gets its own seed (seed + batch index): reproducible, and batches do not
    repeat each other's random draws.
    """
    from saferlhf.monitor import progress

    dataset = PromptDataset([{"prompt": p} for p in prompts], tokenizer, max_length, chat_template=chat_template)
    generator = generator or HFGenerator(model, tokenizer, synced_gpus=False)
    eos = tokenizer.eos_token_id
    records: list[dict] = []
    starts = range(0, len(dataset), batch_size)
    for b, start in enumerate(progress(starts, desc=desc, enabled=show_progress)):
        batch = dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        seeded = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + b)
        gen = generator.generate(batch.input_ids, batch.attention_mask, seeded)
        for row, (ids, mask) in enumerate(zip(gen.response_ids, gen.response_mask)):
            real = ids[mask.bool()]  # (t,)
            i = start + row // sampling.n
            records.append({
                "prompt_index": i, "prompt": prompts[i], "sample": row % sampling.n,
                "response": tokenizer.decode(real, skip_special_tokens=True).strip(),
                "response_tokens": int(real.numel()),
                "finished": bool(real.numel() > 0 and int(real[-1]) == eos),
            })
    return records


def generate_responses(model, tokenizer, prompts: list[str], sampling: SamplingParams, **kwargs) -> list[str]:
    """The decoded answers only, one per prompt and sample (``sampling.n`` per prompt, in prompt order)."""
    return [r["response"] for r in generate_records(model, tokenizer, prompts, sampling, **kwargs)]
