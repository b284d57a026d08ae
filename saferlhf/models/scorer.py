"""A frozen reward or cost model as the trainer and the evaluation use it: end scores of answers.

One class for both callers:

- the PPO trainer scores the actor's token sequences (``scorer(sequences, attention_mask)``): directly
  when the score model shares the actor's tokenizer (packed where the model allows), otherwise — as
  the original safe-rlhf does — decoded with the actor's tokenizer and encoded again with its own;
- the evaluation scores (prompt, response) texts (``scorer.texts(prompts, responses)``), laid out as
  the preference trainer lays out its pairs: the prompt in the model's template, the response, eos,
  cut to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saferlhf.models.passes import end_scores


@dataclass
class Scorer:
    model: torch.nn.Module  # a ScoreModel (or a DeepSpeed engine around one)
    tokenizer: object
    max_length: int = 512
    chat_template: bool = False  # texts: the tokenizer's chat template instead of the paper's
    actor_tokenizer: object | None = None  # sequences: the tokenizer of the ids they come in
    packed: bool = False

    @property
    def same_tokenizer(self) -> bool:
        return self.actor_tokenizer is None or self.tokenizer.get_vocab() == self.actor_tokenizer.get_vocab()

    @property
    def device(self) -> torch.device:
        module = getattr(self.model, "module", self.model)
        return next(module.parameters()).device

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N,) float32 end scores of (N, L) token sequences of the actor."""
        device = self.device
        if self.same_tokenizer:
            return end_scores(self.model, sequences.to(device), attention_mask.to(device), packed=self.packed)
        texts = [self.actor_tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                 for ids, m in zip(sequences, attention_mask)]
        tok = self.tokenizer
        enc = tok([t + (tok.eos_token or "") for t in texts], return_tensors="pt", padding=True, truncation=True,
                  max_length=self.max_length, add_special_tokens=False)
        return end_scores(self.model, enc.input_ids.to(device), enc.attention_mask.to(device), packed=self.packed)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
              show_progress: bool = False, desc: str = "score") -> list[float]:
        """End scores of (prompt, response) pairs, laid out as the preference trainer lays out pairs."""
        from saferlhf.data.collate import encode_prompts, encode_responses, fit_to_length, format_prompt
        from saferlhf.monitor import progress

        tok = self.tokenizer
        prompt_ids = encode_prompts(tok, [format_prompt(p, tok, self.chat_template) for p in prompts])
        response_ids = encode_responses(tok, list(responses), self.chat_template)
        seqs = []
        for p, r in zip(prompt_ids, response_ids):
            p, (r,), _ = fit_to_length(p, [r], self.max_length, tok.bos_token_id)
            seqs.append(torch.tensor(p + r, dtype=torch.long))
        device = self.device
        scores: list[float] = []
        for start in progress(range(0, len(seqs), batch_size), desc=desc, enabled=show_progress):
            chunk = seqs[start:start + batch_size]
            ids = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=tok.pad_token_id)  # (B, L)
            lengths = torch.tensor([len(s) for s in chunk])  # (B,)
            mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()  # (B, L), right padding
            scores += end_scores(self.model, ids.to(device), mask.to(device), packed=self.packed).cpu().tolist()
        return scores  # one host sync per batch


__all__ = ["Scorer"]
