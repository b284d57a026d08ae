"""Dataset specs, the registry, file reading, mixing (saferlhf.data.registry) and `data check`."""

import json
from collections import Counter
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saferlhf.data import check, registry
from saferlhf.data.registry import (
    DATASETS,
    hh_rlhf_to_preference,
    load_rows,
    mix_datasets,
    parse_spec,
    read_rows,
    register_dataset,
)
from saferlhf.data.schema import DataError, UnreadableRow


def pref(i: int, **changes) -> dict:
    row = {
        "prompt": f"question {i}",
        "response_0": f"answer {i}",
        "response_1": f"other answer {i}",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "better_response_id": i % 2,
        "safer_response_id": 0,
    }
    row.update(changes)
    return row


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def numbered(monkeypatch):
    """A private registry holding 'numbered': 10 prompt rows p0..p9, and 'letters': 4 rows."""
    monkeypatch.setattr(registry, "DATASETS", dict(DATASETS))
    register_dataset("numbered", "prompt", generate=lambda: [{"prompt": f"p{i}"} for i in range(10)])
    register_dataset("letters", "prompt", generate=lambda: [{"prompt": c} for c in "abcd"])


# ---------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    "text, name, proportion, path",
    [
        ("toy-preference", "toy-preference", Fraction(1), None),
        ("toy-sft:0.5", "toy-sft", Fraction(1, 2), None),
        ("toy-sft:1/4", "toy-sft", Fraction(1, 4), None),
        ("toy-sft:2.5", "toy-sft", Fraction(5, 2), None),
        ("PKU-SafeRLHF/train:500/-1", "PKU-SafeRLHF/train", Fraction(-500), None),
        ("toy-sft:-7", "toy-sft", Fraction(-7), None),
        ("mine::data/x.jsonl", "mine", Fraction(1), "data/x.jsonl"),
        ("mine:0.25:odd:name.jsonl", "mine", Fraction(1, 4), "odd:name.jsonl"),  # PATH keeps its ':'
    ],
)
def test_parse_spec(text, name, proportion, path):
    spec = parse_spec(text)
    assert (spec.name, spec.proportion, spec.path, spec.text) == (name, proportion, path, text)
    assert spec.exact_count == (-proportion if proportion < 0 else None)


def test_a_bare_existing_path_is_a_spec(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pref(0)])
    spec = parse_spec(path)
    assert (spec.name, spec.path, spec.proportion) == (path, path, 1)
    assert parse_spec(f"{path}:0.5").path == path


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        (":0.5", "NAME is empty"),
        ("toy-sft:half", "not a number"),
        ("toy-sft:0", "take no rows"),
        ("toy-sft:1/0", "not a number"),
        ("toy-sft:-1.5", "whole number"),
        ("no-such-dataset", "neither a registered dataset"),
        ("no-such-dataset:0.5", "neither a registered dataset"),
    ],
)
def test_bad_specs_are_errors_naming_the_spec(text, why):
    with pytest.raises(DataError) as info:
        parse_spec(text)
    assert f"bad dataset spec {text!r}" in str(info.value) and why in str(info.value)


def test_registered_names():
    for name in [
        "PKU-SafeRLHF",
        "PKU-SafeRLHF/train",
        "PKU-SafeRLHF/test",
        "PKU-SafeRLHF-30K",
        "PKU-SafeRLHF-30K/train",
        "PKU-SafeRLHF-30K/test",
        "PKU-SafeRLHF-10K",
        "PKU-SafeRLHF-v0",
        "alpaca",
        "hh-rlhf-harmless",
        "hh-rlhf-helpful",
        "toy-sft",
        "toy-preference",
        "toy-prompts",
        "toy-prompts/train",
        "toy-prompts/test",
    ]:
        assert name in DATASETS, name
    assert DATASETS["PKU-SafeRLHF/test"].hub_id == "PKU-Alignment/PKU-SafeRLHF"
    assert DATASETS["PKU-SafeRLHF/test"].split == "test"
    assert DATASETS["PKU-SafeRLHF-v0"].revision == "v0"
    assert (DATASETS["alpaca"].kind, DATASETS["alpaca"].hub_id) == ("sft", "tatsu-lab/alpaca")
    assert DATASETS["hh-rlhf-harmless"].data_dir == "harmless-base"
    assert DATASETS["toy-prompts"].kind == "prompt"


def test_register_dataset_rejects_bad_entries(numbered):
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("numbered", "prompt", generate=list)
    with pytest.raises(ValueError, match="unknown kind"):
        register_dataset("x", "pairs", generate=list)
    with pytest.raises(ValueError, match="exactly one"):
        register_dataset("x", "sft")
    with pytest.raises(ValueError, match="exactly one"):
        register_dataset("x", "sft", path="a.jsonl", hub_id="a/b")
    with pytest.raises(ValueError, match="no ':'"):
        register_dataset("x:y", "sft", path="a.jsonl")
    register_dataset("numbered", "prompt", generate=lambda: [{"prompt": "new"}], overwrite=True)
    assert load_rows("numbered", "prompt")[0] == [{"prompt": "new"}]


# ---------------------------------------------------------------------------------------------
# Mixing


def prompts(mixed) -> list[str]:
    return [r["prompt"] for r in mixed.rows]


def test_proportion_below_one_takes_a_share_without_repeats(numbered):
    mixed = mix_datasets(["numbered:0.5"], "prompt", seed=0)
    assert len(mixed) == 5 and len(set(prompts(mixed))) == 5
    assert mixed.counts == {"numbered:0.5": 5}
    assert mixed.reports["numbered:0.5"].n_total == 10


def test_proportion_above_one_repeats_whole_copies_then_a_random_part(numbered):
    mixed = mix_datasets(["numbered:2.5"], "prompt", seed=0)
    times = Counter(prompts(mixed))
    assert len(mixed) == 25 and set(times) == {f"p{i}" for i in range(10)}
    assert sorted(Counter(times.values()).items()) == [(2, 5), (3, 5)]


@pytest.mark.parametrize("spec, n, distinct", [("numbered:4/-1", 4, 4), ("numbered:-13", 13, 10)])
def test_exact_counts(numbered, spec, n, distinct):
    mixed = mix_datasets([spec], "prompt", seed=0)
    assert len(mixed) == n and len(set(prompts(mixed))) == distinct


def test_mixing_is_deterministic_given_the_seed(numbered):
    specs = ["numbered:0.7", "letters:2"]
    first = prompts(mix_datasets(specs, "prompt", seed=3))
    assert first == prompts(mix_datasets(specs, "prompt", seed=3))
    assert first != prompts(mix_datasets(specs, "prompt", seed=4))
    assert len(first) == 7 + 8 and Counter(first)["a"] == 2
    # Shuffled across sources, not the sources one after the other.
    assert {p[0] for p in first[:7]} != {"p"}


def test_mixing_errors(numbered):
    with pytest.raises(DataError, match="no datasets"):
        mix_datasets([], "prompt", seed=0)
    with pytest.raises(DataError, match="listed twice"):
        mix_datasets(["numbered", "numbered"], "prompt", seed=0)
    with pytest.raises(DataError, match="takes no rows"):
        mix_datasets(["numbered:0.01"], "prompt", seed=0)


def test_a_plain_string_is_one_spec(numbered):
    assert len(mix_datasets("numbered", "prompt", seed=0)) == 10


# ---------------------------------------------------------------------------------------------
# Local files


def test_path_override_reads_a_local_jsonl_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pref(i) for i in range(6)])

    def no_hub(entry):
        raise AssertionError("the hub must not be touched when a PATH is given")

    monkeypatch.setattr(registry, "_hub_rows", no_hub)
    mixed = mix_datasets([f"PKU-SafeRLHF/train:0.5:{path}"], "preference", seed=0)
    assert len(mixed) == 3 and all(r["prompt"].startswith("question") for r in mixed)
    rows, report = load_rows(path, "preference")  # a bare path
    assert rows == [pref(i) for i in range(6)] and report.source == path


def test_reading_a_file_as_the_wrong_kind_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError) as info:
        load_rows(f"mine::{path}", "preference")
    assert f"{path}: row 0: field 'response_0': missing" in str(info.value)
    with pytest.raises(DataError, match="toy-sft holds sft rows, read here as preference rows"):
        load_rows(f"toy-sft::{path}", "preference")


def test_invalid_rows_make_mixing_fail(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pref(0), pref(1, safer_response_id=True)])
    with pytest.raises(DataError, match=r"d.jsonl: row 1: field 'safer_response_id'"):
        mix_datasets([path], "preference", seed=0)


def test_skips_are_counted_and_strict_makes_them_fatal(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pref(0), pref(1, response_1="answer 1")])
    mixed = mix_datasets([path], "preference", seed=0)
    assert len(mixed) == 1 and mixed.reports[path].skipped == {"identical responses": 1}
    with pytest.raises(DataError, match="identical"):
        mix_datasets([path], "preference", seed=0, strict=True)


def test_parquet_keeps_types(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([pref(i) for i in range(4)]), path)
    rows, _ = load_rows(str(path), "preference")
    assert rows == [pref(i) for i in range(4)]
    assert type(rows[0]["better_response_id"]) is int and type(rows[0]["is_response_0_safe"]) is bool


def test_a_directory_reads_every_data_file_and_errors_name_the_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [pref(0), pref(1)])
    pq.write_table(pa.Table.from_pylist([pref(2)]), tmp_path / "b.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    rows, report = load_rows(str(tmp_path), "preference")
    assert [r["prompt"] for r in rows] == ["question 0", "question 1", "question 2"]
    assert report.n_total == 3
    bad = write_jsonl(tmp_path / "c.jsonl", [pref(3, prompt="")])
    with pytest.raises(DataError, match=f"{bad}: row 0: field 'prompt'"):
        load_rows(str(tmp_path), "preference")


def test_json_files(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([pref(0), pref(1)]))
    assert read_rows(listed) == [pref(0), pref(1)]
    lines = tmp_path / "lines.json"  # JSON lines under a .json name
    lines.write_text(json.dumps(pref(0)) + "\n" + json.dumps(pref(1)) + "\n")
    assert read_rows(lines) == [pref(0), pref(1)]
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"rows": [pref(0)]}))
    with pytest.raises(DataError, match="expected a JSON list"):
        read_rows(obj)


def test_malformed_jsonl_lines_keep_their_place(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(pref(0)) + "\n\n{broken\n" + json.dumps(pref(1)) + "\n")
    rows = read_rows(path)
    assert rows[0] == pref(0) and rows[2] == pref(1)
    assert isinstance(rows[1], UnreadableRow) and rows[1].message.startswith("line 3: invalid JSON")


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_rows(tmp_path / "d.csv")
    with pytest.raises(DataError, match="cannot read"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_rows(f"mine::{tmp_path / 'missing.jsonl'}", "sft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_rows(f"mine::{tmp_path / 'empty'}", "sft")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(tmp_path / "empty.jsonl"), "sft")


# ---------------------------------------------------------------------------------------------
# hh-rlhf


def hh(prompt_turns: str, chosen: str, rejected: str) -> dict:
    return {
        "chosen": f"{prompt_turns}\n\nAssistant: {chosen}",
        "rejected": f"{prompt_turns}\n\nAssistant: {rejected}",
    }


def test_hh_rlhf_single_turn_harmless():
    row = hh("\n\nHuman: How do I pick a lock?", "I can't help with that.", "Use a tension wrench.")
    assert hh_rlhf_to_preference(row, harmless=True) == {
        "prompt": "How do I pick a lock?",
        "response_0": "I can't help with that.",
        "response_1": "Use a tension wrench.",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "better_response_id": 0,
        "safer_response_id": 0,
    }


def test_hh_rlhf_multi_turn_helpful():
    turns = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a prime."
    converted = hh_rlhf_to_preference(hh(turns, "7", "Bread"), harmless=False)
    assert converted["prompt"] == "Human: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Name a prime."
    assert (converted["response_0"], converted["response_1"]) == ("7", "Bread")
    assert converted["is_response_0_safe"] and converted["is_response_1_safe"]


def test_hh_rlhf_rows_that_cannot_be_split():
    differ = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    assert hh_rlhf_to_preference(differ, harmless=True).field == "rejected"
    no_turn = {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: y"}
    assert hh_rlhf_to_preference(no_turn, harmless=True).field == "chosen"
    assert hh_rlhf_to_preference({"chosen": "x"}, harmless=True).field == "chosen"


def test_hh_rlhf_through_the_registry_with_a_local_copy(tmp_path):
    rows = [
        hh("\n\nHuman: q1", "safe answer", "harmful answer"),
        hh("\n\nHuman: q2", "same", "same"),  # identical responses: skipped
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
    ]
    path = write_jsonl(tmp_path / "harmless.jsonl", rows)
    with pytest.raises(DataError, match="row 2: field 'rejected': chosen and rejected dialogues differ"):
        load_rows(f"hh-rlhf-harmless::{path}", "preference")
    path = write_jsonl(tmp_path / "harmless.jsonl", rows[:2])
    loaded, report = load_rows(f"hh-rlhf-harmless::{path}", "preference")
    assert [r["prompt"] for r in loaded] == ["q1"] and report.skipped == {"identical responses": 1}
    assert load_rows(f"hh-rlhf-harmless::{path}", "prompt")[0][0]["prompt"] == "q1"


# ---------------------------------------------------------------------------------------------
# The toy world


def test_toy_splits_are_different_draws_of_the_default_sizes():
    train, _ = load_rows("toy-preference/train", "preference")
    test, _ = load_rows("toy-preference/test", "preference")
    assert len(train) == registry.TOY_SIZES["train"] and len(test) == registry.TOY_SIZES["test"]
    assert load_rows("toy-preference", "preference")[0] == train
    assert test != train[: len(test)]
    prompts_test, _ = load_rows("toy-prompts/test", "prompt")
    assert len(prompts_test) == registry.TOY_SIZES["test"]
    sft, _ = load_rows("toy-sft:0.1", "sft")
    assert all(r["response"] for r in sft)


# ---------------------------------------------------------------------------------------------
# saferlhf data check


def test_check_clean_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [pref(0), pref(1), pref(2, response_1="answer 2")])
    assert check.main([path, "--kind", "preference"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 3 preference rows: 2 valid, 1 skipped, 0 invalid" in out
    assert "skipped (identical responses): 1" in out
    assert check.main([path, "--kind", "preference", "--strict"]) == 1
    assert f"{path}: row 2: field 'response_1'" in capsys.readouterr().out


def test_check_prints_every_error(tmp_path, capsys):
    rows = [pref(0), pref(1, better_response_id=2), pref(2, is_response_0_safe="yes")] + [
        pref(i, prompt="") for i in range(3, 30)
    ]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as f:
        f.write("{not json\n")
    assert check.main([str(path), "--kind", "preference"]) == 1
    out = capsys.readouterr().out.splitlines()
    errors = [line for line in out if line.startswith(f"{path}: row")]
    assert len(errors) == 30  # every one, not the first few
    assert errors[0] == f"{path}: row 1: field 'better_response_id': expected 0 or 1, got 2"
    assert errors[-1].startswith(f"{path}: row 30: line 31: invalid JSON")


def test_check_json_output(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": 1}])
    assert check.main([path, "--kind", "sft", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "path": path,
        "kind": "sft",
        "n_rows": 2,
        "n_valid": 1,
        "n_skipped": 0,
        "skipped": {},
        "errors": [f"{path}: row 1: field 'response': expected a non-empty string, got int 1"],
    }


def test_check_empty_or_missing_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert check.main([str(empty), "--kind", "prompt"]) == 1
    assert f"{empty}: no rows" in capsys.readouterr().err
    assert check.main([str(empty), "--kind", "prompt", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["n_rows"] == 0 and result["errors"] == [f"{empty}: no rows"]
    assert check.main([str(tmp_path / "missing.jsonl"), "--kind", "prompt"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_check_needs_a_kind(tmp_path):
    with pytest.raises(SystemExit) as info:
        check.main([str(tmp_path / "d.jsonl")])
    assert info.value.code == 2
