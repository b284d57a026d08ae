"""saferlhf.models: tiny tokenizer/model factory, HF load/save, the score model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from saferlhf.models import (
    ScoreModel,
    atomic_directory,
    build_tiny_checkpoint,
    dtype_from_str,
    end_positions,
    load_causal_lm,
    load_tokenizer,
    make_tiny_model,
    resize_embeddings,
    save_causal_lm,
    tiny_config,
    train_tokenizer,
)

VERBS = ["bake", "paint", "fix", "build", "steal", "poison", "hack", "clean"]
NOUNS = ["bread", "fence", "bike", "car", "wallet", "dog", "server", "kitchen"]


def toy_sentences() -> list[str]:
    """A small lowercase language with punctuation, like the toy world's."""
    sentences = []
    for verb, noun in itertools.product(VERBS, NOUNS):
        sentences.append(f"how do i {verb} a {noun} ?")
        sentences.append(f"sure , here is how to {verb} the {noun} : first , get tools .")
    sentences.append("i cannot help with that , sorry .")
    return sentences


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(toy_sentences())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", toy_sentences(), seed=0)


def batch(tokenizer, texts, padding_side):
    tokenizer.padding_side = padding_side
    try:
        return tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        *toy_sentences()[:4],
        "i cannot help with that , sorry .",
        "zebra quux xylophone !",  # unseen words
        "two  spaces and a trailing one ",
        "BEGINNING OF CONVERSATION: USER: how do i fix a bike ? ASSISTANT: sure .",
        "line one\nline\ttwo",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_gives_one_token_per_known_word(tokenizer):
    for sentence in toy_sentences():
        words = sentence.split(" ")
        assert tokenizer.tokenize(sentence) == ["▁" + word for word in words]


def test_unseen_non_ascii_character_becomes_unk(tokenizer):
    ids = tokenizer("café")["input_ids"]
    assert tokenizer.unk_token_id in ids


def test_tokenizer_special_tokens(tokenizer):
    ids = [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert len(set(ids)) == 4
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 512


def test_chat_template_renders_the_paper_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "how do i fix a bike ?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "BEGINNING OF CONVERSATION: USER: how do i fix a bike ? ASSISTANT:"
    dialogue = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."}], tokenize=False
    )
    assert dialogue == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT: hello .</s>"


def test_tokenizer_training_is_deterministic():
    first = train_tokenizer(toy_sentences()).backend_tokenizer.to_str()
    second = train_tokenizer(toy_sentences()).backend_tokenizer.to_str()
    assert first == second


def test_vocab_size_caps_the_vocabulary():
    # 26² distinct two-letter words have far more mergeable pairs than 512 ids can hold.
    words = ["".join(pair) for pair in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)]
    assert len(train_tokenizer([" ".join(words)] * 3, vocab_size=512)) == 512
    assert len(train_tokenizer([" ".join(words)] * 3, vocab_size=300)) == 300


def test_checkpoint_tokenizer_loads_with_auto_tokenizer(tokenizer, checkpoint):
    loaded = AutoTokenizer.from_pretrained(checkpoint)
    text = "sure , here is how to fix the bike : first , get tools ."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert loaded.chat_template == tokenizer.chat_template


# ---------------------------------------------------------------- tiny models


def llama_parameter_count(config) -> int:
    """Hand count: embeddings, lm_head (untied), layers (q k v o, gate up down, 2 norms), final norm."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = h // config.num_attention_heads
    attention = 2 * h * config.num_attention_heads * head_dim + 2 * h * config.num_key_value_heads * head_dim
    per_layer = attention + 3 * h * inter + 2 * h
    return 2 * v * h + config.num_hidden_layers * per_layer + h


@pytest.mark.parametrize(("size", "low", "high"), [("tiny", 0.3e6, 0.5e6), ("20m", 19e6, 21e6)])
def test_tiny_size_parameter_counts(size, low, high):
    words = ["".join(pair) for pair in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)]
    tokenizer = train_tokenizer([" ".join(words)] * 3, vocab_size=512)
    config = tiny_config(tokenizer, size)
    with torch.device("meta"):  # shapes only: no memory, no init time
        count = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert count == llama_parameter_count(config)
    assert low <= count <= high
    assert config.vocab_size == 512
    assert config.max_position_embeddings >= 512
    assert not config.tie_word_embeddings
    assert config.hidden_size // config.num_attention_heads >= 32  # vLLM CPU attention's minimum head size


def test_tiny_config_takes_special_ids_from_tokenizer(tokenizer):
    config = tiny_config(tokenizer, "tiny")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="unknown tiny size"):
        tiny_config(tokenizer, "7b")


def test_make_tiny_model_is_deterministic_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = make_tiny_model(tokenizer, seed=5)
    assert torch.equal(torch.rand(3), expected_draw)
    second = make_tiny_model(tokenizer, seed=5)
    other = make_tiny_model(tokenizer, seed=6)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    half = make_tiny_model(tokenizer, seed=5, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.lm_head.weight, first.lm_head.weight.to(torch.bfloat16))


def test_build_tiny_checkpoint_is_a_standard_llama_checkpoint(tokenizer, checkpoint):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert isinstance(model, LlamaForCausalLM)
    reference = make_tiny_model(tokenizer, seed=0)
    ids = tokenizer(["how do i bake a bread ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# ---------------------------------------------------------------- hf load/save


def test_dtype_from_str():
    assert dtype_from_str("bf16") is torch.bfloat16
    assert dtype_from_str("BFloat16") is torch.bfloat16
    assert dtype_from_str("fp32") is torch.float32
    assert dtype_from_str("float16") is torch.float16
    assert dtype_from_str(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_str("int8")


def test_save_causal_lm_round_trip_gives_identical_logits(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, seed=1)
    out = save_causal_lm(model, tmp_path / "sft", tokenizer=tokenizer)
    ids = tokenizer(["sure , here is how to fix the bike ."], return_tensors="pt")["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ours = load_causal_lm(out, tokenizer=load_tokenizer(out))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(ours(ids).logits, expected)
    assert ours.config.pad_token_id == tokenizer.pad_token_id
    assert ours.generation_config.eos_token_id == tokenizer.eos_token_id


def test_save_causal_lm_writes_an_explicit_state_dict(tokenizer, tmp_path):
    module = make_tiny_model(tokenizer, seed=1)
    weights = make_tiny_model(tokenizer, seed=2).state_dict()  # stands in for gathered ZeRO-3 weights
    loaded = AutoModelForCausalLM.from_pretrained(save_causal_lm(module, tmp_path / "m", state_dict=weights))
    assert len(weights) == len(loaded.state_dict())  # the caller's dict is not consumed
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_load_causal_lm_options(checkpoint):
    model = load_causal_lm(checkpoint, dtype="bf16", gradient_checkpointing=True)
    assert model.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    assert model.config.use_cache is False


@pytest.fixture
def no_pad_checkpoint(tmp_path):
    """A checkpoint whose tokenizer has an eos but no pad token and no `<pad>` string at all."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    assert tokenizer.pad_token is None
    save_causal_lm(make_tiny_model(tokenizer, seed=3), tmp_path / "base", tokenizer=tokenizer)
    return tmp_path / "base"


def test_load_tokenizer_adds_a_new_pad_and_the_model_grows_mean_rows(no_pad_checkpoint):
    tokenizer = load_tokenizer(no_pad_checkpoint)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id == 5  # a new id, not eos
    original = AutoModelForCausalLM.from_pretrained(no_pad_checkpoint)
    model = load_causal_lm(no_pad_checkpoint, tokenizer=tokenizer)
    assert model.config.pad_token_id == 5
    assert model.config.vocab_size == 6
    for new, old in [
        (model.get_input_embeddings().weight, original.get_input_embeddings().weight),
        (model.get_output_embeddings().weight, original.get_output_embeddings().weight),
    ]:
        assert new.shape == (6, old.shape[1])
        assert torch.equal(new[:5], old)
        torch.testing.assert_close(new[5], old.mean(dim=0))


def test_resize_embeddings_never_shrinks_and_counts_added_rows(tokenizer):
    model = make_tiny_model(tokenizer)
    assert resize_embeddings(model, tokenizer) == 0
    grown = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, **tokenizer.special_tokens_map
    )
    grown.add_special_tokens({"additional_special_tokens": ["<extra_0>", "<extra_1>", "<extra_2>"]})
    old = model.get_input_embeddings().weight.clone()
    assert resize_embeddings(model, grown) == 3
    new = model.get_input_embeddings().weight
    torch.testing.assert_close(new[-3:], old.mean(dim=0).expand(3, -1))


def test_atomic_directory_replaces_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with atomic_directory(target) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "other").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left beside it


def test_atomic_directory_keeps_the_old_directory_on_error(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half-written")
            raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------- score model


TEXTS = ["how do i bake a bread ?", "i cannot", "sure , here is how to fix the bike : first , get tools ."]


def test_end_positions_on_hand_masks():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
    assert end_positions(mask).tolist() == [1, 3, 3, 2]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_end_score_is_the_last_real_token_of_the_unpadded_sequence(tokenizer, checkpoint, padding_side):
    model = ScoreModel.from_pretrained(checkpoint)
    assert not model.training
    padded = batch(tokenizer, TEXTS, padding_side)
    with torch.no_grad():
        out = model(**padded)
        assert out.scores.shape == padded["input_ids"].shape
        assert out.end_scores.shape == (len(TEXTS),)
        assert torch.isfinite(out.scores).all()
        for row, text in enumerate(TEXTS):
            alone = tokenizer([text], return_tensors="pt")
            expected = model(**alone)
            real = padded["attention_mask"][row].bool()
            torch.testing.assert_close(out.end_scores[row], expected.end_scores[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.scores[row][real], expected.scores[0], atol=1e-5, rtol=1e-5)


def test_score_model_from_causal_lm_checkpoint(checkpoint):
    model = ScoreModel.from_pretrained(checkpoint, kind="reward")
    lm = AutoModelForCausalLM.from_pretrained(checkpoint)
    lm_backbone = lm.model.state_dict()
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, lm_backbone[name]), name
    hidden = model.config.hidden_size
    assert model.score_head.weight.shape == (1, hidden)
    assert torch.equal(model.score_head.bias, torch.zeros(1))
    # N(0, 1/sqrt(H + 1)): the sample std of 128 draws lies within 25% of it.
    assert abs(model.score_head.weight.std().item() * math.sqrt(hidden + 1) - 1) < 0.25
    assert (model.kind, model.score_dim, model.normalize) == ("reward", 1, False)
    assert model.running_count.item() == 0


def accumulate_stats(model, tokenizer, batches):
    """Training-mode forwards over `batches`; returns every end score seen, (N,) or (N, K)."""
    model.train()
    seen = []
    with torch.no_grad():
        for texts in batches:
            seen.append(model(**batch(tokenizer, texts, "right")).end_scores)
    model.eval()
    return torch.cat(seen)


def test_running_stats_are_the_exact_mean_and_variance_of_all_end_scores(tokenizer, checkpoint):
    model = ScoreModel.from_pretrained(checkpoint)
    batches = [TEXTS, TEXTS[:1], toy_sentences()[:5]]
    seen = accumulate_stats(model, tokenizer, batches)
    assert model.running_count.item() == len(seen) == 9
    torch.testing.assert_close(model.running_mean, seen.mean().reshape(1))
    torch.testing.assert_close(model.running_var, seen.var(unbiased=False).reshape(1))
    with torch.no_grad():  # eval mode records nothing
        model(**batch(tokenizer, TEXTS, "right"))
    assert model.running_count.item() == 9


def test_normalized_scores_are_standardized_over_the_recorded_data(tokenizer, checkpoint):
    model = ScoreModel.from_pretrained(checkpoint)
    texts = toy_sentences()[:12]
    accumulate_stats(model, tokenizer, [texts[:5], texts[5:]])
    model.normalize = True
    with torch.no_grad():
        normalized = model(**batch(tokenizer, texts, "right")).end_scores
    torch.testing.assert_close(normalized.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.var(unbiased=False), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_score_model_save_load_round_trip(tokenizer, checkpoint, tmp_path):
    model = ScoreModel.from_pretrained(checkpoint, kind="cost")
    accumulate_stats(model, tokenizer, [TEXTS])
    out = model.save_pretrained(tmp_path / "cm", tokenizer=tokenizer)
    loaded = ScoreModel.from_pretrained(out)
    assert (loaded.kind, loaded.score_dim, loaded.normalize) == ("cost", 1, False)
    for name in ("running_mean", "running_var", "running_count"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)), name
    padded = batch(tokenizer, TEXTS, "right")
    with torch.no_grad():
        assert torch.equal(loaded(**padded).scores, model(**padded).scores)
    assert AutoTokenizer.from_pretrained(out)(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]
    critic = ScoreModel.from_pretrained(out, kind="critic", normalize=True)
    assert (critic.kind, critic.normalize) == ("critic", True)
    with pytest.raises(ValueError, match="score_dim=1"):
        ScoreModel.from_pretrained(out, score_dim=2)


def test_saved_score_model_loads_with_auto_model(tokenizer, checkpoint, tmp_path):
    model = ScoreModel.from_pretrained(checkpoint)
    out = model.save_pretrained(tmp_path / "rm")
    backbone = AutoModel.from_pretrained(out)
    padded = batch(tokenizer, TEXTS, "right")
    with torch.no_grad():
        expected = model(**padded, output_hidden=True).last_hidden
        real = padded["attention_mask"].bool()  # pad positions differ: the score model passes position ids
        assert torch.equal(backbone(**padded).last_hidden_state[real], expected[real])


def test_save_with_an_explicit_state_dict(tokenizer, checkpoint, tmp_path):
    model = ScoreModel.from_pretrained(checkpoint)
    gathered = {name: tensor + 1 for name, tensor in model.state_dict().items()}  # e.g. from ZeRO-3
    loaded = ScoreModel.from_pretrained(model.save_pretrained(tmp_path / "rm", state_dict=gathered))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, gathered[name]), name


def test_multi_head_score_model_shapes_and_round_trip(tokenizer, tmp_path):
    config = tiny_config(tokenizer, "tiny")
    model = ScoreModel.from_config(config, score_dim=3, kind="cost")
    padded = batch(tokenizer, TEXTS, "left")
    out = model(**padded)  # from_config: training mode, so stats are recorded
    length = padded["input_ids"].shape[1]
    assert out.scores.shape == (3, length, 3)
    assert out.end_scores.shape == (3, 3)
    torch.testing.assert_close(out.end_scores, out.scores[:, -1])  # left padding: the end is the last column
    torch.testing.assert_close(model.running_mean, out.end_scores.detach().mean(dim=0))
    model.eval()
    loaded = ScoreModel.from_pretrained(model.save_pretrained(tmp_path / "cm"))
    assert loaded.score_dim == 3
    with torch.no_grad():
        assert torch.equal(loaded(**padded).end_scores, model(**padded).end_scores)


def test_gradients_reach_head_and_every_backbone_parameter(tokenizer):
    torch.manual_seed(0)
    model = ScoreModel.from_config(tiny_config(tokenizer, "tiny"))
    padded = batch(tokenizer, TEXTS, "right")
    model(**padded).end_scores.square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    torch.manual_seed(0)
    plain = ScoreModel.from_config(tiny_config(tokenizer, "tiny"))
    checkpointed = ScoreModel.from_config(tiny_config(tokenizer, "tiny"))
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.backbone.is_gradient_checkpointing
    padded = batch(tokenizer, TEXTS, "right")
    for model in (plain, checkpointed):
        model(**padded).end_scores.sum().backward()
    assert torch.equal(checkpointed.running_count, plain.running_count)  # recompute does not re-record
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bf16_score_model_returns_float32_scores(tokenizer, checkpoint):
    model = ScoreModel.from_pretrained(checkpoint, dtype="bf16")
    assert model.score_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**batch(tokenizer, TEXTS, "right"))
    assert out.scores.dtype == torch.float32
    assert out.end_scores.dtype == torch.float32
    assert model.config is model.backbone.config


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_gguf_converts_to_a_standard_checkpoint(smollm2_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_checkpoint  # convert_smollm2's output (the session's one conversion)
    model = AutoModelForCausalLM.from_pretrained(path)  # a plain checkpoint: no gguf_file, no quantization
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert not hasattr(model.config, "quantization_config")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # the pretrained weights survived
