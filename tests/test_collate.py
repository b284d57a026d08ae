"""Templates, tokenization, truncation and collators (saferlhf.data.collate) on tiny tokenizers."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from saferlhf.data.collate import (
    IGNORE_INDEX,
    PairBatch,
    PairDataset,
    PromptBatch,
    PromptDataset,
    SFTBatch,
    SFTDataset,
    fit_to_length,
    format_prompt,
    truncate_left,
)

SENTENCES = [
    "BEGINNING OF CONVERSATION: USER: how do i bake bread? ASSISTANT: mix flour and water then bake it",
    "what is two plus two? four. no idea, sorry i can not help. hello hi",
    "one two three four five six seven eight nine ten",
]
SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} [assistant]{% endif %}"
)


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level vocabulary over SENTENCES; adds <s> in front by default when ``bos``."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES + ["[ ] user assistant"], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def byte_tok():
    """Byte-level BPE, where a leading space is part of a token, so spacing shows in the ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>")


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


PROMPT_TOKENS = "<s> BEGINNING OF CONVERSATION : USER : {} ASSISTANT :".split()

BREAD = {"prompt": "how do i bake bread?", "response": "mix flour and water then bake it"}
SUM = {"prompt": "what is two plus two?", "response": "four."}


def pair(better: int, safer: int, safe0: bool, safe1: bool, words: tuple[str, str]) -> dict:
    return {
        "prompt": "what is two plus two?",
        "response_0": words[0],
        "response_1": words[1],
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "better_response_id": better,
        "safer_response_id": safer,
    }


def expected_prompt(prompt: str) -> list[str]:
    words = pre_tokenizers.Whitespace().pre_tokenize_str(prompt)
    i = PROMPT_TOKENS.index("{}")
    return PROMPT_TOKENS[:i] + [w for w, _ in words] + PROMPT_TOKENS[i + 1 :]


# ---------------------------------------------------------------------------------------------
# Templates


def test_format_prompt_default_and_chat_template():
    assert format_prompt("hi") == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"
    chat = word_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    assert format_prompt("hi", chat, chat_template=True) == "<s>[user] hi [assistant]"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("hi", word_tokenizer(), chat_template=True)
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("hi", None, chat_template=True)


def test_target_text_is_prompt_space_response_eos(byte_tok):
    ds = SFTDataset([{"prompt": "hi", "response": "hello there"}], byte_tok, max_length=64)
    batch = ds.collate([ds[0]])
    text = byte_tok.decode(batch.input_ids[0])
    assert text == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello there</s>"
    prompt_length = int((batch.labels[0] == IGNORE_INDEX).sum())
    assert byte_tok.decode(batch.input_ids[0, :prompt_length]) == format_prompt("hi")


def test_with_a_chat_template_the_response_follows_directly(byte_tok):
    chat = PreTrainedTokenizerFast(tokenizer_object=byte_tok.backend_tokenizer, pad_token="[PAD]", eos_token="</s>")
    chat.chat_template = "USER: {{ messages[0]['content'] }}{% if add_generation_prompt %} BOT:{% endif %}"
    ds = SFTDataset([{"prompt": "hi", "response": "hello"}], chat, max_length=64, chat_template=True)
    assert chat.decode(ds[0].input_ids) == "USER: hi BOT:hello</s>"


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_batch_masks_prompt_and_padding_and_right_pads(tok):
    ds = SFTDataset([BREAD, SUM], tok, max_length=64)
    batch = ds.collate([ds[0], ds[1]])
    assert isinstance(batch, SFTBatch)
    bread = expected_prompt(BREAD["prompt"]) + BREAD["response"].split() + ["</s>"]
    sums = expected_prompt(SUM["prompt"]) + ["four", ".", "</s>"]
    assert batch.input_ids.shape == batch.labels.shape == (2, len(bread))
    assert tokens(tok, batch.input_ids[0]) == bread
    # Right padding: real tokens first, then pad ids under a zero mask.
    assert batch.attention_mask[1].tolist() == [1] * len(sums) + [0] * (len(bread) - len(sums))
    assert tokens(tok, batch.input_ids[1, : len(sums)]) == sums
    assert (batch.input_ids[1, len(sums) :] == tok.pad_token_id).all()
    # Labels: ignored on the prompt and the padding, the ids on the response and its eos.
    for row, seq, prompt in ((0, bread, BREAD), (1, sums, SUM)):
        n_prompt = len(expected_prompt(prompt["prompt"]))
        assert (batch.labels[row, :n_prompt] == IGNORE_INDEX).all()
        assert batch.labels[row, n_prompt : len(seq)].tolist() == batch.input_ids[row, n_prompt : len(seq)].tolist()
        assert (batch.labels[row, len(seq) :] == IGNORE_INDEX).all()
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long


def test_prompt_tokens_are_a_prefix_of_every_target(tok):
    rows = [BREAD, SUM]
    sft = SFTDataset(rows, tok, max_length=64)
    prompts = PromptDataset(rows, tok, max_length=64)
    pairs = PairDataset([pair(0, 0, True, True, ("four", "no idea"))], tok, max_length=64)
    for example, prompt in zip(sft, prompts):
        assert example.input_ids[: example.prompt_length].tolist() == prompt.input_ids.tolist()
    sum_prompt = prompts[1].input_ids.tolist()
    assert pairs[0].chosen[: len(sum_prompt)].tolist() == sum_prompt
    assert pairs[0].rejected[: len(sum_prompt)].tolist() == sum_prompt


def test_bos_is_added_once_and_only_when_the_tokenizer_adds_one():
    no_bos = word_tokenizer(bos=False)
    ds = SFTDataset([SUM], no_bos, max_length=64)
    assert tokens(no_bos, ds[0].input_ids)[0] == "BEGINNING"
    chat = word_tokenizer()
    chat.chat_template = CHAT_TEMPLATE  # the template writes <s> itself
    ds = SFTDataset([{"prompt": "hi", "response": "hello"}], chat, max_length=64, chat_template=True)
    assert tokens(chat, ds[0].input_ids) == [
        "<s>",
        "[",
        "user",
        "]",
        "hi",
        "[",
        "assistant",
        "]",
        "hello",
        "</s>",
    ]


def test_dataloader_with_the_collate_method(tok):
    ds = SFTDataset([BREAD, SUM, BREAD], tok, max_length=64)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=ds.collate))
    assert [b.input_ids.shape[0] for b in batches] == [2, 1]
    moved = batches[0].to("cpu")
    assert isinstance(moved, SFTBatch) and torch.equal(moved.labels, batches[0].labels)


# ---------------------------------------------------------------------------------------------
# Pairs


def test_pair_batch_puts_chosen_first_by_target(tok):
    rows = [
        pair(better=1, safer=0, safe0=True, safe1=False, words=("no idea", "four")),
        pair(better=0, safer=1, safe0=False, safe1=True, words=("one", "two three")),
    ]
    prompt = expected_prompt(rows[0]["prompt"])

    def responses(batch: PairBatch) -> list[list[str]]:
        return [tokens(tok, ids[mask == 1])[len(prompt) :] for ids, mask in zip(batch.input_ids, batch.attention_mask)]

    reward = PairDataset(rows, tok, max_length=64, target="reward")
    batch = reward.collate([reward[0], reward[1]])
    assert batch.input_ids.shape[0] == 4 and batch.num_pairs == 2
    assert responses(batch) == [
        ["four", "</s>"],
        ["one", "</s>"],
        ["no", "idea", "</s>"],
        ["two", "three", "</s>"],
    ]
    assert batch.safe_sign.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert batch.safe_sign.dtype == torch.float32

    cost = PairDataset(rows, tok, max_length=64, target="cost")
    batch = cost.collate([cost[0], cost[1]])
    assert responses(batch) == [
        ["no", "idea", "</s>"],
        ["two", "three", "</s>"],
        ["four", "</s>"],
        ["one", "</s>"],
    ]
    assert batch.safe_sign.tolist() == [1.0, 1.0, -1.0, -1.0]
    # One right-padded length for all 2B rows.
    lengths = batch.attention_mask.sum(1).tolist()
    assert max(lengths) == batch.input_ids.shape[1]
    assert batch.attention_mask[3].tolist() == [1] * lengths[3] + [0] * (batch.input_ids.shape[1] - lengths[3])


def test_pair_dataset_rejects_an_unknown_target(tok):
    with pytest.raises(ValueError, match="target"):
        PairDataset([pair(0, 0, True, True, ("a", "b"))], tok, max_length=64, target="helpfulness")


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prompt_batch_is_left_padded(tok):
    ds = PromptDataset([BREAD, {"prompt": "hi"}], tok, max_length=64)
    batch = ds.collate([ds[0], ds[1]])
    assert isinstance(batch, PromptBatch) and batch.prompts == (BREAD["prompt"], "hi")
    assert batch.to("cpu").prompts == batch.prompts
    long, short = len(expected_prompt(BREAD["prompt"])), len(expected_prompt("hi"))
    assert batch.input_ids.shape == (2, long)
    assert batch.attention_mask[1].tolist() == [0] * (long - short) + [1] * short
    assert (batch.input_ids[1, : long - short] == tok.pad_token_id).all()
    assert tokens(tok, batch.input_ids[1, long - short :]) == expected_prompt("hi")
    assert tokens(tok, batch.input_ids[:, -2:].flatten()) == ["ASSISTANT", ":"] * 2  # all end together


# ---------------------------------------------------------------------------------------------
# Truncation


def test_truncate_left_keeps_bos():
    assert truncate_left([1, 2, 3, 4, 5], 3, bos_id=None) == [3, 4, 5]
    assert truncate_left([1, 2, 3, 4, 5], 3, bos_id=1) == [1, 4, 5]
    assert truncate_left([1, 2, 3], 3, bos_id=1) == [1, 2, 3]
    assert truncate_left([1, 2, 3], 1, bos_id=1) == [3]


@pytest.mark.parametrize(
    "prompt, responses, max_length, expected_prompt, expected_responses, cut",
    [
        # Fits: untouched.
        ([9, 1, 2], [[10, 11]], 5, [9, 1, 2], [[10, 11]], False),
        # Both long: the prompt keeps max(8 - 6, 8 // 2) = 4 (bos + its last 3), the response the rest.
        ([9, 1, 2, 3, 4, 5], [[10, 11, 12, 13, 14, 15]], 8, [9, 3, 4, 5], [[10, 11, 12, 13]], True),
        # Short prompt: only the response is cut.
        ([9, 1], [list(range(10, 20))], 8, [9, 1], [[10, 11, 12, 13, 14, 15]], True),
        # Long prompt, short response: the prompt gives way, the response (and its eos) stays whole.
        ([9, *range(1, 10)], [[10, 11]], 8, [9, 5, 6, 7, 8, 9], [[10, 11]], True),
        # A pair shares one prompt cut, sized for its longer response.
        (
            [9, 1, 2, 3, 4, 5],
            [[10, 11], [20, 21, 22, 23, 24, 25]],
            8,
            [9, 3, 4, 5],
            [[10, 11], [20, 21, 22, 23]],
            True,
        ),
    ],
)
def test_fit_to_length(prompt, responses, max_length, expected_prompt, expected_responses, cut):
    got_prompt, got_responses, got_cut = fit_to_length(prompt, responses, max_length, bos_id=9)
    assert (got_prompt, got_responses, got_cut) == (expected_prompt, expected_responses, cut)
    assert all(len(got_prompt) + len(r) <= max_length for r in got_responses)


def test_sft_truncation_is_counted_and_a_cut_response_has_no_eos(tok):
    long = {"prompt": "hi", "response": " ".join(["one two three four five"] * 4)}
    # 11 prompt tokens + 21 response tokens > 24; the prompt is within its budget max(24 - 21, 12).
    ds = SFTDataset([long, SUM], tok, max_length=24)
    assert ds.n_truncated == 1
    cut = tokens(tok, ds[0].input_ids)
    assert len(cut) == 24 and cut[: ds[0].prompt_length] == expected_prompt("hi") and cut[-1] != "</s>"
    assert tokens(tok, ds[1].input_ids)[-1] == "</s>"


def test_long_prompts_are_cut_from_the_left(tok):
    words = " ".join(["one two three four five six seven eight nine ten"] * 3)
    ds = PromptDataset([{"prompt": words}, SUM], tok, max_length=6)
    assert ds.n_truncated == 2
    assert tokens(tok, ds[0].input_ids) == ["<s>", "eight", "nine", "ten", "ASSISTANT", ":"]
    pairs = PairDataset([pair(0, 0, True, True, ("four", "one two three"))], tok, max_length=8)
    assert pairs.n_truncated == 1
    chosen, rejected = tokens(tok, pairs[0].chosen), tokens(tok, pairs[0].rejected)
    # Prompt budget max(8 - 4, 8 // 2) = 4: bos + "?", "ASSISTANT", ":"; both responses fit whole.
    assert chosen == ["<s>", "?", "ASSISTANT", ":", "four", "</s>"]
    assert rejected == ["<s>", "?", "ASSISTANT", ":", "one", "two", "three", "</s>"]


def test_tokenizer_without_pad_token_is_refused(tok):
    no_pad = word_tokenizer()
    no_pad.pad_token = None
    for make in (SFTDataset, PromptDataset):
        with pytest.raises(ValueError, match="no pad token.*tokenizer.pad_token"):
            make([SUM], no_pad, max_length=64)
    with pytest.raises(ValueError, match="max_length"):
        SFTDataset([SUM], tok, max_length=1)
