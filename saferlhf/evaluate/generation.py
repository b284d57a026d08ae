"""Generate responses for a prompt set and score them (toy-world ground truth or score models)."""

from __future__ import annotations

import torch

from saferlhf.data.collate import PromptDataset
from saferlhf.rollout.base import SamplingParams
from saferlhf.rollout.hf import HFGenerator


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[str], sampling: SamplingParams, *, batch_size: int = 64,
    max_length: int = 512, chat_template: bool = False, generator=None,
) -> list[str]:
    """Decoded responses, one per prompt and sample (``sampling.n`` per prompt, in prompt order)."""
    dataset = PromptDataset([{"prompt": p} for p in prompts], tokenizer, max_length, chat_template=chat_template)
    generator = generator or HFGenerator(model, tokenizer)
    texts: list[str] = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        gen = generator.generate(batch.input_ids, batch.attention_mask, sampling)
        for ids, mask in zip(gen.response_ids, gen.response_mask):
            texts.append(tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip())
    return texts
