"""Row validation (saferlhf.data.schema): every error and skip rule, strict mode, Alpaca rows,
reports, and a property test over random rows."""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saferlhf.data.schema import (
    SKIP_CONTRADICTORY,
    SKIP_IDENTICAL,
    DataError,
    RowError,
    UnreadableRow,
    validate_rows,
)


def pref(**changes) -> dict:
    row = {
        "prompt": "How do I bake bread?",
        "response_0": "Mix flour, water and yeast, then bake.",
        "response_1": "No idea.",
        "is_response_0_safe": True,
        "is_response_1_safe": True,
        "better_response_id": 0,
        "safer_response_id": 1,
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()  # pref(field=_DROP) removes the field

REQUIRED = [
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
]


def only_error(report) -> RowError:
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


def test_valid_row_is_kept_and_normalised():
    row = pref(better_response_id=np.int64(1), is_response_1_safe=np.bool_(False), safer_response_id=0)
    report = validate_rows([row], "preference")
    assert report.errors == [] and report.n_valid == 1
    kept = report.rows[0]
    assert type(kept["better_response_id"]) is int and kept["better_response_id"] == 1
    assert type(kept["is_response_1_safe"]) is bool and kept["is_response_1_safe"] is False


def test_unknown_keys_are_kept():
    report = validate_rows([pref(sha256="abc", meta={"a": 1})], "preference")
    assert report.rows[0]["sha256"] == "abc" and report.rows[0]["meta"] == {"a": 1}


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_field_is_an_error_naming_row_and_field(name):
    rows = [pref(), pref(**{name: _DROP})]
    report = validate_rows(rows, "preference", source="data.jsonl")
    error = only_error(report)
    assert (error.source, error.row, error.field) == ("data.jsonl", 1, name)
    assert "missing" in error.message
    assert report.n_valid == 1 and report.n_invalid == 1


def test_error_string_names_file_row_field_expected_and_got():
    rows = [pref(), pref(), pref(), pref(better_response_id=2)]
    error = only_error(validate_rows(rows, "preference", source="data.jsonl"))
    assert str(error) == "data.jsonl: row 3: field 'better_response_id': expected 0 or 1, got 2"


@pytest.mark.parametrize(
    "value, shown",
    [(True, "bool True"), (False, "bool False"), ("1", "str '1'"), (1.0, "float 1.0"), (None, "NoneType")],
)
def test_response_id_must_be_an_int(value, shown):
    error = only_error(validate_rows([pref(safer_response_id=value)], "preference"))
    assert error.field == "safer_response_id"
    assert "expected 0 or 1 (an int)" in error.message and shown in error.message


@pytest.mark.parametrize("value", [-1, 2, 7])
def test_response_id_outside_0_1_is_an_error(value):
    error = only_error(validate_rows([pref(better_response_id=value)], "preference"))
    assert error.message == f"expected 0 or 1, got {value}"


@pytest.mark.parametrize("value", [1, 0, "true", None, 1.0])
def test_safety_flag_must_be_a_bool(value):
    error = only_error(validate_rows([pref(is_response_0_safe=value)], "preference"))
    assert error.field == "is_response_0_safe" and "expected true or false" in error.message


@pytest.mark.parametrize("name", ["prompt", "response_0", "response_1"])
@pytest.mark.parametrize("value", ["", "   \n", 5, ["a"]])
def test_text_fields_must_be_non_empty_strings(name, value):
    error = only_error(validate_rows([pref(**{name: value})], "preference"))
    assert error.field == name and "non-empty string" in error.message


def test_all_errors_of_a_row_are_reported_but_the_row_counts_once():
    report = validate_rows([pref(prompt="", better_response_id="0", is_response_1_safe=None)], "preference")
    assert sorted(e.field for e in report.errors) == ["better_response_id", "is_response_1_safe", "prompt"]
    assert report.n_invalid == 1 and report.n_valid == 0


def test_v1_optional_fields_are_checked_when_present():
    good = pref(
        response_0_harm_category={"Violence": False, "Fraud": False},
        response_1_harm_category={"Violence": True},
        response_0_severity_level=0,
        response_1_severity_level=np.int64(3),
        prompt_source="human",
        response_0_source="Alpaca-7B",
        response_1_source=None,  # None means absent (datasets fills missing columns with None)
        is_response_1_safe=False,
        safer_response_id=0,
    )
    report = validate_rows([good], "preference")
    assert report.errors == [] and type(report.rows[0]["response_1_severity_level"]) is int

    bad = {
        "response_0_severity_level": 4,
        "response_1_severity_level": True,
        "response_0_harm_category": {"Violence": 1},
        "response_1_harm_category": ["Violence"],
        "prompt_source": 3,
        "response_0_source": ["x"],
    }
    for name, value in bad.items():
        error = only_error(validate_rows([pref(**{name: value})], "preference"))
        assert error.field == name, (name, error)


def test_identical_responses_are_skipped_and_counted():
    rows = [pref(), pref(response_1=pref()["response_0"]), pref()]
    report = validate_rows(rows, "preference")
    assert report.errors == [] and report.n_valid == 2
    assert report.skipped == {SKIP_IDENTICAL: 1} and report.skipped_rows == [(1, SKIP_IDENTICAL)]


@pytest.mark.parametrize(
    "safe0, safe1, safer, contradictory",
    [
        (False, True, 0, True),  # points at the unsafe one while the other is safe
        (True, False, 1, True),
        (True, False, 0, False),
        (False, True, 1, False),
        (True, True, 0, False),  # both safe or both unsafe: either may be the safer
        (False, False, 1, False),
    ],
)
def test_contradictory_safety_labels_are_skipped(safe0, safe1, safer, contradictory):
    row = pref(is_response_0_safe=safe0, is_response_1_safe=safe1, safer_response_id=safer)
    report = validate_rows([row], "preference")
    assert report.errors == []
    assert report.skipped == ({SKIP_CONTRADICTORY: 1} if contradictory else {})
    assert report.n_valid == (0 if contradictory else 1)


def test_strict_turns_skips_into_errors():
    rows = [
        pref(response_1=pref()["response_0"]),
        pref(is_response_0_safe=False, is_response_1_safe=True, safer_response_id=0),
        pref(),
    ]
    report = validate_rows(rows, "preference", source="d.jsonl", strict=True)
    assert report.skipped == {} and report.skipped_rows == []
    assert [(e.row, e.field) for e in report.errors] == [(0, "response_1"), (1, "safer_response_id")]
    assert report.n_valid == 1


def test_skips_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="saferlhf.data.schema"):
        validate_rows([pref(response_1=pref()["response_0"]), pref()], "preference", source="d.jsonl")
    assert "d.jsonl: skipped 1 of 2 rows" in caplog.text and SKIP_IDENTICAL in caplog.text


def test_non_object_and_unreadable_rows_are_errors_in_place():
    rows = [pref(), ["not", "a", "dict"], UnreadableRow("line 3: invalid JSON"), pref()]
    report = validate_rows(rows, "preference", source="f.jsonl")
    assert [(e.row, e.field) for e in report.errors] == [(1, None), (2, None)]
    assert str(report.errors[1]) == "f.jsonl: row 2: line 3: invalid JSON"
    assert report.n_valid == 2


def test_no_rows_is_a_data_error():
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        validate_rows([], "sft", source="empty.jsonl")


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown data kind"):
        validate_rows([pref()], "pairs")


def test_raise_if_errors_lists_first_errors_and_the_count():
    rows = [pref(better_response_id=5) for _ in range(25)] + [pref()]
    report = validate_rows(rows, "preference", source="d.jsonl")
    with pytest.raises(DataError) as info:
        report.raise_if_errors()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "25 of 26 preference rows are invalid" in message and "numbered from 0" in message
    assert "d.jsonl: row 0: field 'better_response_id'" in message
    assert "row 19:" in message and "row 20:" not in message and "and 5 more errors" in message


def test_raise_if_errors_when_everything_was_skipped():
    report = validate_rows([pref(response_1=pref()["response_0"])], "preference", source="d.jsonl")
    with pytest.raises(DataError, match="no valid rows.*identical responses: 1"):
        report.raise_if_errors()
    validate_rows([pref()], "preference").raise_if_errors()  # a clean report passes


def test_sft_rows():
    report = validate_rows([{"prompt": "p", "response": "r", "id": 7}, {"prompt": "p"}], "sft")
    assert report.rows == [{"prompt": "p", "response": "r", "id": 7}]
    assert [(e.row, e.field) for e in report.errors] == [(1, "response")]


def test_alpaca_rows_are_normalised():
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "text": "kept"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Name a fruit.", "output": "Apple"},
    ]
    report = validate_rows(rows, "sft")
    assert report.errors == []
    assert report.rows[0] == {"prompt": "Translate.\n\nBonjour", "response": "Hello", "text": "kept"}
    assert report.rows[1] == {"prompt": "Name a colour.", "response": "Blue"}
    assert report.rows[2] == {"prompt": "Name a fruit.", "response": "Apple"}


def test_alpaca_errors_name_the_alpaca_fields():
    rows = [{"instruction": "Do it.", "input": 3, "output": "ok"}, {"instruction": "Do it.", "output": ""}]
    report = validate_rows(rows, "sft")
    assert [(e.row, e.field) for e in report.errors] == [(0, "input"), (1, "output")]


def test_prompt_rows_accept_preference_sft_and_alpaca_rows():
    rows = [pref(), {"prompt": "p", "response": "r"}, {"instruction": "i", "input": "x"}, {"prompt": ""}]
    report = validate_rows(rows, "prompt")
    assert [r["prompt"] for r in report.rows] == [pref()["prompt"], "p", "i\n\nx"]
    assert [(e.row, e.field) for e in report.errors] == [(3, "prompt")]


# ---------------------------------------------------------------------------------------------
# Property test: random rows built from the schema's keys with random-typed values.

_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["", " ", "0", "1", "a", "b"]),
    st.lists(st.integers(0, 1), max_size=2),
    st.dictionaries(st.sampled_from(["x", "y", 1]), st.one_of(st.booleans(), st.integers(0, 1)), max_size=2),
)
_TEXT = st.sampled_from(["a", "b", "a b"])
_FIELDS = {
    "prompt": _TEXT,
    "response_0": _TEXT,
    "response_1": _TEXT,
    "is_response_0_safe": st.booleans(),
    "is_response_1_safe": st.booleans(),
    "better_response_id": st.sampled_from([0, 1]),
    "safer_response_id": st.sampled_from([0, 1]),
    "response_0_harm_category": st.dictionaries(st.sampled_from(["x", "y"]), st.booleans(), max_size=2),
    "response_1_harm_category": st.dictionaries(st.sampled_from(["x", "y"]), st.booleans(), max_size=2),
    "response_0_severity_level": st.integers(0, 3),
    "response_1_severity_level": st.integers(0, 3),
    "prompt_source": _TEXT,
    "response_0_source": _TEXT,
    "response_1_source": _TEXT,
    "extra": _ANY,
}


@st.composite
def random_row(draw):
    """Required keys missing with p≈0.05, optional ones with p≈0.5; a present key holds a random-typed
    value with p≈0.1, else a well-typed one."""
    row = {}
    for key, valid in _FIELDS.items():
        roll = draw(st.integers(0, 19))
        if roll == 0 and key in REQUIRED or roll >= 10 and key not in REQUIRED:
            continue
        row[key] = draw(_ANY) if roll in (1, 2) else draw(valid)
    return row


def assert_satisfies_preference_schema(row: dict) -> None:
    for key in ("prompt", "response_0", "response_1"):
        assert type(row[key]) is str and row[key].strip()
    for key in ("is_response_0_safe", "is_response_1_safe"):
        assert type(row[key]) is bool
    for key in ("better_response_id", "safer_response_id"):
        assert type(row[key]) is int and row[key] in (0, 1)
    assert row["response_0"] != row["response_1"]
    safer = row["safer_response_id"]
    assert row[f"is_response_{safer}_safe"] or not row[f"is_response_{1 - safer}_safe"]
    for i in (0, 1):
        level = row.get(f"response_{i}_severity_level")
        assert level is None or (type(level) is int and 0 <= level <= 3)
        category = row.get(f"response_{i}_harm_category")
        assert category is None or all(type(k) is str and type(v) is bool for k, v in category.items())
        assert row.get(f"response_{i}_source") is None or type(row[f"response_{i}_source"]) is str
    assert row.get("prompt_source") is None or type(row["prompt_source"]) is str


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(random_row(), min_size=1, max_size=12), strict=st.booleans())
def test_every_accepted_row_satisfies_the_schema(rows, strict):
    report = validate_rows(rows, "preference", strict=strict)
    # Every input row is exactly one of: kept, skipped, invalid.
    invalid = {e.row for e in report.errors}
    skipped = {i for i, _ in report.skipped_rows}
    assert not invalid & skipped
    kept = [i for i in range(len(rows)) if i not in invalid | skipped]
    assert len(kept) == report.n_valid
    # Both the input row (before normalisation could hide e.g. True read as 1) and the kept row.
    for i, row in zip(kept, report.rows):
        assert_satisfies_preference_schema(rows[i])
        assert row == rows[i]
    assert report.n_skipped == len(skipped)
    if strict:
        assert report.skipped == {}


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.dictionaries(st.sampled_from(["prompt", "response", "instruction", "input", "output"]), _ANY | _TEXT),
        min_size=1,
        max_size=8,
    )
)
def test_every_accepted_sft_row_has_a_prompt_and_a_response(rows):
    report = validate_rows(rows, "sft")
    for row in report.rows:
        assert type(row["prompt"]) is str and row["prompt"].strip()
        assert type(row["response"]) is str and row["response"].strip()
    assert report.n_valid + report.n_invalid == len(rows)
