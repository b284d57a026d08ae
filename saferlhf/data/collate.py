"""Prompt templates, tokenization, and the torch datasets and collators for every stage.

Notation: B rows in a batch, L the padded length of the batch.

Text layout (DESIGN.md §2):

- The prompt text is ``PROMPT_TEMPLATE.format(prompt=...)`` — the paper's
  ``"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"`` — or, with ``chat_template=True``, the
  tokenizer's own chat template for one user message with the generation prompt appended.
- The target is the prompt text, then the response, then eos. With the default template one space
  separates "ASSISTANT:" and the response (``prompt + " " + response``); with a chat template the
  response follows the generation prompt directly, as the template expects.
- Prompt and response are tokenized *separately* and the ids concatenated, so the prompt's tokens
  are always an exact prefix of the target's, and a prompt batch (for generation) holds the same
  ids the policy was fine-tuned on. The tokenizer's bos is prepended when it adds one by default
  (and the text does not already begin with it, as chat templates often do); eos is the
  tokenizer's ``eos_token_id``.

Truncation to ``max_length`` (counted in each dataset's ``n_truncated``): the response gets room
first, but the prompt keeps at least ``max_length // 2`` tokens; what must go is cut from the *left*
of the prompt (its end, next to "ASSISTANT:", matters most; bos is kept) and from the *right* of the
response. A cut response loses its eos — the text did not end there, and the model must not learn
to stop mid-answer. In a pair both responses share one prompt cut, sized for the longer response.

Padding uses ``tokenizer.pad_token_id``; masks come from lengths, not from comparing ids with the
pad id, so pad == eos is fine. Targets are right-padded, prompts for generation left-padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF causal LMs) skip


# ---------------------------------------------------------------------------------------------
# Batches


def _move(batch, device: torch.device | str, non_blocking: bool = False):
    changes = {
        f.name: getattr(batch, f.name).to(device, non_blocking=non_blocking)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **changes)


@dataclass(frozen=True)
class SFTBatch:
    """Prompt + response sequences, right-padded.

    input_ids       (B, L) long
    attention_mask  (B, L) long, 1 on real tokens
    labels          (B, L) long, ``input_ids`` on response tokens (eos included), IGNORE_INDEX on
                    prompt and padding; aligned with input_ids (HF causal LMs shift internally)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SFTBatch:
        return _move(self, device, non_blocking)


@dataclass(frozen=True)
class PairBatch:
    """Preference pairs as one right-padded batch of 2B sequences.

    Rows 0..B-1 are the chosen responses (the better one for a reward model, the safer one for a
    cost model), rows B..2B-1 the rejected ones, row i and row B+i sharing a prompt.

    input_ids       (2B, L) long
    attention_mask  (2B, L) long, 1 on real tokens
    safe_sign       (2B,) float, +1 where the response is safe, -1 where it is unsafe
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    safe_sign: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        return _move(self, device, non_blocking)


@dataclass(frozen=True)
class PromptBatch:
    """Prompts for generation, left-padded so that every row ends at the last column.

    input_ids       (B, L) long
    attention_mask  (B, L) long, 1 on real tokens
    prompts         B raw prompt strings (before templating), for scoring the generations
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: tuple[str, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PromptBatch:
        return _move(self, device, non_blocking)


# ---------------------------------------------------------------------------------------------
# Templates and tokenization


def format_prompt(prompt: str, tokenizer=None, chat_template: bool = False) -> str:
    """The prompt text a response follows: the paper's template, or the tokenizer's chat template."""
    if not chat_template:
        return PROMPT_TEMPLATE.format(prompt=prompt)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "chat_template=True needs a tokenizer with a chat template; set tokenizer.chat_template "
            "or use the default prompt template"
        )
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _require_special_tokens(tokenizer, eos: bool) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one before building datasets, "
            "e.g. tokenizer.pad_token = tokenizer.eos_token"
        )
    if eos and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token")


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts bos in front of a text when asked for special tokens."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of formatted prompt texts, with bos in front when the tokenizer adds one."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not _adds_bos(tokenizer):
        return ids
    bos = tokenizer.bos_token_id
    return [p if p[:1] == [bos] else [bos, *p] for p in ids]


def _encode_row_prompts(tokenizer, rows: Sequence[dict], chat_template: bool) -> list[list[int]]:
    return encode_prompts(tokenizer, [format_prompt(r["prompt"], tokenizer, chat_template) for r in rows])


def encode_responses(tokenizer, responses: Sequence[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids of responses as they follow the prompt (see the module docstring), eos appended."""
    if not responses:
        return []
    texts = list(responses) if chat_template else [" " + r for r in responses]
    eos = tokenizer.eos_token_id
    return [[*ids, eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def truncate_left(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last ``limit`` ids, keeping a leading bos in front."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids[:1] == [bos_id] and limit > 1:
        return [bos_id, *ids[len(ids) - limit + 1 :]]
    return ids[len(ids) - limit :]


def fit_to_length(
    prompt: list[int], responses: Sequence[list[int]], max_length: int, bos_id: int | None
) -> tuple[list[int], list[list[int]], bool]:
    """Cut a prompt and its responses so that prompt + each response fits ``max_length``.

    The prompt keeps max(max_length − longest response, max_length // 2) tokens from its end; each
    response is then cut from the right to the room left. Returns (prompt, responses, truncated).
    """
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt, list(responses), False
    prompt = truncate_left(prompt, max(max_length - longest, max_length // 2), bos_id)
    room = max_length - len(prompt)
    return prompt, [r[:room] for r in responses], True


def _right_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) ids and mask from N 1-D id tensors, L the longest."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)  # (N, L)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _left_pad(seqs: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)  # (N, L)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    return ids, mask


def _ids(values: list[int]) -> torch.Tensor:
    # int32 halves the memory of a tokenized dataset; collation widens to long.
    return torch.tensor(values, dtype=torch.int32)


def _check_max_length(max_length: int, minimum: int) -> None:
    if max_length < minimum:
        raise ValueError(f"max_length must be at least {minimum}, got {max_length}")


# ---------------------------------------------------------------------------------------------
# Datasets. Each tokenizes all rows up front (one batched tokenizer call), so ``n_truncated`` is
# known before training starts, and has a ``collate`` method to pass as a DataLoader's collate_fn.
# Rows are expected to be validated (saferlhf.data.schema).


class SFTExample(NamedTuple):
    input_ids: torch.Tensor  # (n,) int32, prompt then response
    prompt_length: int


class SFTDataset(Dataset):
    """Supervised fine-tuning rows (``prompt``, ``response``) → `SFTBatch`."""

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int, chat_template: bool = False):
        _require_special_tokens(tokenizer, eos=True)
        _check_max_length(max_length, 2)
        self.pad_token_id = tokenizer.pad_token_id
        prompts = _encode_row_prompts(tokenizer, rows, chat_template)
        responses = encode_responses(tokenizer, [r["response"] for r in rows], chat_template)
        self.examples: list[SFTExample] = []
        self.n_truncated = 0
        for prompt, response in zip(prompts, responses):
            prompt, (response,), cut = fit_to_length(prompt, [response], max_length, tokenizer.bos_token_id)
            self.n_truncated += cut
            self.examples.append(SFTExample(_ids(prompt + response), len(prompt)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> SFTExample:
        return self.examples[index]

    def collate(self, items: Sequence[SFTExample]) -> SFTBatch:
        input_ids, attention_mask = _right_pad([item.input_ids for item in items], self.pad_token_id)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, L)
        for i, item in enumerate(items):
            labels[i, : item.prompt_length] = IGNORE_INDEX
        return SFTBatch(input_ids, attention_mask, labels)


class PairExample(NamedTuple):
    chosen: torch.Tensor  # (n,) int32, prompt then chosen response
    rejected: torch.Tensor  # (m,) int32, prompt then rejected response
    chosen_safe: bool
    rejected_safe: bool


class PairDataset(Dataset):
    """Preference rows → `PairBatch`.

    ``target="reward"`` orders each pair by ``better_response_id`` (reward model, DPO),
    ``target="cost"`` by ``safer_response_id`` (cost model).
    """

    def __init__(
        self,
        rows: Sequence[dict],
        tokenizer,
        max_length: int,
        target: str = "reward",
        chat_template: bool = False,
    ):
        if target not in ("reward", "cost"):
            raise ValueError(f"target must be 'reward' or 'cost', got {target!r}")
        _require_special_tokens(tokenizer, eos=True)
        _check_max_length(max_length, 2)
        self.pad_token_id = tokenizer.pad_token_id
        self.target = target
        chosen_key = "better_response_id" if target == "reward" else "safer_response_id"
        prompts = _encode_row_prompts(tokenizer, rows, chat_template)
        texts = [r[f"response_{i}"] for r in rows for i in (0, 1)]
        responses = encode_responses(tokenizer, texts, chat_template)
        self.examples: list[PairExample] = []
        self.n_truncated = 0
        for k, (row, prompt) in enumerate(zip(rows, prompts)):
            pair = responses[2 * k : 2 * k + 2]
            prompt, pair, cut = fit_to_length(prompt, pair, max_length, tokenizer.bos_token_id)
            self.n_truncated += cut
            c = row[chosen_key]
            self.examples.append(
                PairExample(
                    chosen=_ids(prompt + pair[c]),
                    rejected=_ids(prompt + pair[1 - c]),
                    chosen_safe=row[f"is_response_{c}_safe"],
                    rejected_safe=row[f"is_response_{1 - c}_safe"],
                )
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PairExample:
        return self.examples[index]

    def collate(self, items: Sequence[PairExample]) -> PairBatch:
        seqs = [item.chosen for item in items] + [item.rejected for item in items]
        input_ids, attention_mask = _right_pad(seqs, self.pad_token_id)  # (2B, L)
        safe = [item.chosen_safe for item in items] + [item.rejected_safe for item in items]
        safe_sign = torch.tensor([1.0 if s else -1.0 for s in safe])  # (2B,)
        return PairBatch(input_ids, attention_mask, safe_sign)


class PromptExample(NamedTuple):
    input_ids: torch.Tensor  # (n,) int32
    prompt: str


class PromptDataset(Dataset):
    """Prompt rows → left-padded `PromptBatch` for generation; ``max_length`` bounds the prompt."""

    def __init__(self, rows: Sequence[dict], tokenizer, max_length: int, chat_template: bool = False):
        _require_special_tokens(tokenizer, eos=False)
        _check_max_length(max_length, 1)
        self.pad_token_id = tokenizer.pad_token_id
        prompts = _encode_row_prompts(tokenizer, rows, chat_template)
        self.examples: list[PromptExample] = []
        self.n_truncated = 0
        for row, ids in zip(rows, prompts):
            self.n_truncated += len(ids) > max_length
            ids = truncate_left(ids, max_length, tokenizer.bos_token_id)
            self.examples.append(PromptExample(_ids(ids), row["prompt"]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:
        return self.examples[index]

    def collate(self, items: Sequence[PromptExample]) -> PromptBatch:
        input_ids, attention_mask = _left_pad([item.input_ids for item in items], self.pad_token_id)
        return PromptBatch(input_ids, attention_mask, tuple(item.prompt for item in items))
