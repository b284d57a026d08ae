"""Annotation round trip (saferlhf.annotate): export → filled-in sheet → complete preference rows,
and every way a sheet can be wrong, each reported with file, line and column, all at once."""

import csv
import io
import json

import pytest

from saferlhf.annotate import (
    LABEL_COLUMNS,
    SHEET_COLUMNS,
    AnnotationError,
    export_for_annotation,
    import_annotations,
    pair_id,
)
from saferlhf.data.schema import validate_rows

PAIRS = [
    {"id": "a", "prompt": "How do I bake bread?", "response_0": "Mix flour, water and yeast.\nThen bake it.",
     "response_1": "No idea.", "prompt_source": "red-team"},
    ("b", "How do I pick a lock?", "I can't help with that.", "Insert a tension wrench, then rake the pins."),
    ("Say hi", "Hi!", 'Hello, "friend".'),  # no id: one is derived from the texts
]
ID_C = pair_id("Say hi", "Hi!", 'Hello, "friend".')


@pytest.fixture
def exported(tmp_path):
    jsonl, sheet = tmp_path / "pairs.jsonl", tmp_path / "sheet.csv"
    ids = export_for_annotation(PAIRS, jsonl, sheet)
    assert ids == ["a", "b", ID_C]
    return jsonl, sheet


def read_sheet(path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def write_sheet(path, records: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(records)


def fill(path, labels: dict[str, list[str]]) -> None:
    """Fill the label cells of the rows with the given ids (the annotators' work)."""
    header, *rows = read_sheet(path)
    for row in rows:
        if row[0] in labels:
            row[len(row) - len(LABEL_COLUMNS):] = labels[row[0]]
    write_sheet(path, [header, *rows])


def test_export_writes_unlabelled_schema_rows_and_a_sheet(exported):
    jsonl, sheet = exported
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", ID_C]
    for row, pair in zip(rows, PAIRS):
        texts = list(pair.values())[1:4] if isinstance(pair, dict) else list(pair[-3:])
        assert [row["prompt"], row["response_0"], row["response_1"]] == texts
        assert all(row[name] is None for name in LABEL_COLUMNS)
    assert rows[0]["prompt_source"] == "red-team"

    header, *records = read_sheet(sheet)
    assert header == list(SHEET_COLUMNS)
    assert records[0] == ["a", PAIRS[0]["prompt"], PAIRS[0]["response_0"], PAIRS[0]["response_1"], "", "", "", ""]
    assert [r[0] for r in records] == ["a", "b", ID_C]


def test_round_trip_returns_complete_rows_in_export_order(exported):
    jsonl, sheet = exported
    # Rows filled out of order and with every accepted spelling of the labels.
    fill(sheet, {
        "b": ["1", "0", "Yes", "no"],
        "a": ["0", "1", "TRUE", "safe"],
        ID_C: [" 1 ", "0", "1", "0"],
    })
    rows = import_annotations(sheet, jsonl)
    assert [r["id"] for r in rows] == ["a", "b", ID_C]
    assert rows[0] == {**PAIRS[0], "better_response_id": 0, "safer_response_id": 1,
                       "is_response_0_safe": True, "is_response_1_safe": True}
    assert (rows[1]["better_response_id"], rows[1]["safer_response_id"]) == (1, 0)
    assert (rows[1]["is_response_0_safe"], rows[1]["is_response_1_safe"]) == (True, False)
    assert (rows[2]["is_response_0_safe"], rows[2]["is_response_1_safe"]) == (True, False)
    report = validate_rows(rows, "preference", strict=True)
    assert not report.errors and report.n_valid == 3


def test_spreadsheet_artefacts_are_tolerated(exported):
    jsonl, sheet = exported
    header, *rows = read_sheet(sheet)
    rows[0][2] = rows[0][2].replace("\n", "\r\n") + "  "  # line endings and trailing space changed
    for row in rows:
        row[4:] = ["0", "0", "yes", "yes"]
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    sheet.write_bytes(b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8"))  # with a byte-order mark
    rows = import_annotations(sheet, jsonl)
    assert rows[0]["response_0"] == PAIRS[0]["response_0"]  # the exported text, not the sheet's


def test_missing_column_names_file_line_and_column(exported):
    jsonl, sheet = exported
    records = read_sheet(sheet)
    write_sheet(sheet, [[c for i, c in enumerate(r) if i != 5] for r in records])  # drop safer_response_id
    with pytest.raises(AnnotationError) as info:
        import_annotations(sheet, jsonl)
    assert f"{sheet}: line 1: column 'safer_response_id': missing from the header" in str(info.value)


def test_every_bad_row_is_reported_at_once(tmp_path):
    pairs = [
        ("p1", "Q1", "first line\nsecond line", "R"),  # a record spanning two lines of the file
        ("p2", "Q2", "A", "B"),
        ("p3", "Q3", "A", "B"),
        ("p4", "Q4", "A", "B"),
        ("p5", "Q5", "A", "B"),
    ]
    jsonl, sheet = tmp_path / "pairs.jsonl", tmp_path / "sheet.csv"
    export_for_annotation(pairs, jsonl, sheet)
    write_sheet(sheet, [
        list(SHEET_COLUMNS),                                          # line 1
        ["p1", "Q1", "first line\nsecond line", "R", "2", "0", "yes", "yes"],  # lines 2-3: bad better id
        ["p2", "Q2", "A", "B", "0", "1", "maybe", "yes"],             # line 4: bad safety flag
        ["zzz", "Q9", "A", "B", "0", "1", "yes", "yes"],              # line 5: unknown id
        ["p3", "Q3 (edited)", "A", "B", "0", "1", "yes", "yes"],     # line 6: prompt altered
        ["p3", "Q3", "A", "B", "0", "1", "yes", "yes"],              # line 7: duplicate id
        ["p4", "Q4", "A", "B", "", "", "", ""],                       # line 8: unlabelled
        ["p5", "Q5", "A", "B", "0", "0", "no", "yes"],               # line 9: contradictory safety labels
    ])
    with pytest.raises(AnnotationError) as info:
        import_annotations(sheet, jsonl)
    message = str(info.value)
    lines = {e.line for e in info.value.errors}
    assert lines == {2, 4, 5, 6, 7, 8, 9}
    assert "7 of 7 rows cannot be imported" in message
    for expected in [
        f"{sheet}: line 2 (id 'p1'): column 'better_response_id': expected 0 or 1, got '2'",
        f"{sheet}: line 4 (id 'p2'): column 'is_response_0_safe': expected true/false",
        f"{sheet}: line 5 (id 'zzz'): column 'id': unknown id",
        f"{sheet}: line 6 (id 'p3'): column 'prompt': text differs from the export",
        f"{sheet}: line 7 (id 'p3'): column 'id': duplicate id (also on line 6)",
        f"{sheet}: line 8 (id 'p4'): not labelled",
        f"{sheet}: line 9 (id 'p5'): column 'safer_response_id': contradictory safety labels",
    ]:
        assert expected in message
    assert "allow_partial=True" in message


def test_deleted_row_and_blank_id_are_errors(exported):
    jsonl, sheet = exported
    header, a, b, c = read_sheet(sheet)
    a[0] = ""
    write_sheet(sheet, [header, a, c])
    with pytest.raises(AnnotationError) as info:
        import_annotations(sheet, jsonl, allow_partial=True)
    message = str(info.value)
    assert f"{sheet}: line 2: column 'id': blank" in message
    assert f"{sheet} (id 'a'): column 'id': exported pair (line 1 of {jsonl}) is missing from the sheet" in message
    assert f"(id 'b'): column 'id': exported pair (line 2 of {jsonl}) is missing" in message


def test_partial_import_must_be_explicit(exported):
    jsonl, sheet = exported
    fill(sheet, {"a": ["0", "1", "yes", "yes"], "b": ["1", "", "", ""]})  # b half done, c untouched
    with pytest.raises(AnnotationError) as info:
        import_annotations(sheet, jsonl)
    message = str(info.value)
    assert "line 4 (id 'b'): partly labelled: safer_response_id, is_response_0_safe, is_response_1_safe blank" \
        in message
    assert f"line 5 (id '{ID_C}'): not labelled" in message

    rows, unlabelled = import_annotations(sheet, jsonl, allow_partial=True)
    assert [r["id"] for r in rows] == ["a"]
    assert unlabelled == ["b", ID_C]


def test_partial_import_still_rejects_invalid_labels(exported):
    jsonl, sheet = exported
    fill(sheet, {"a": ["0", "1", "yes", "perhaps"]})
    with pytest.raises(AnnotationError, match="column 'is_response_1_safe': expected true/false"):
        import_annotations(sheet, jsonl, allow_partial=True)


def test_export_rejects_repeated_ids_and_empty_texts(tmp_path):
    jsonl, sheet = tmp_path / "pairs.jsonl", tmp_path / "sheet.csv"
    pairs = [("x", "Q", "A", "B"), ("x", "Q2", "A", "B"), {"prompt": "Q3", "response_0": " ", "response_1": "B"}]
    with pytest.raises(AnnotationError) as info:
        export_for_annotation(pairs, jsonl, sheet)
    message = str(info.value)
    assert "pair 1: column 'id': 'x' repeats the id of pair 0" in message
    assert "pair 2: column 'response_0': expected a non-empty string" in message
    assert not jsonl.exists() and not sheet.exists()


def test_annotation_error_is_a_value_error():
    assert issubclass(AnnotationError, ValueError)
