"""Human annotation of response pairs: export a sheet, import the filled-in labels.

Safe RLHF labels helpfulness and harmlessness separately, so the sheet has separate columns for
them. The round trip:

1. `export_for_annotation` writes two files for the same pairs, each pair under a stable ``id``:
   - a JSONL file in the PKU-SafeRLHF schema with the four label fields set to null — the record of
     what was sent out, kept by whoever runs the round;
   - a CSV sheet for the annotators with the columns `SHEET_COLUMNS`: ``id, prompt, response_0,
     response_1`` and the blank label columns ``better_response_id, safer_response_id,
     is_response_0_safe, is_response_1_safe``.
2. Annotators fill in the label columns: ``better_response_id`` and ``safer_response_id`` take
   ``0`` or ``1``; the safety columns take ``true/false``, ``yes/no``, ``1/0`` or ``safe/unsafe``
   (any case).
3. `import_annotations` checks the sheet against the export and returns complete preference rows.

Import is all or nothing: either every exported pair comes back labelled, or `AnnotationError` is
raised listing every problem, each naming the file, the line (the CSV line where the row starts;
the header is line 1), the row's id and the column. Problems: a missing column, a label that is
not a valid value, an id that is blank, unknown (not in the export) or repeated, a prompt or
response whose text differs from the export, an exported pair missing from the sheet, an unlabelled
or partly labelled row, and contradictory safety labels (``safer_response_id`` points at a
response marked unsafe while the other is marked safe). ``allow_partial=True`` imports a half-done
sheet explicitly: rows with blank label cells are returned as a list of unlabelled ids instead of
being errors (the labels that *are* filled in must still be valid).

Text comparison ignores differences in line endings and leading/trailing whitespace (spreadsheet
programs change both); any other change is an error. The returned rows carry the exported text,
not the sheet's. Extra sheet columns (e.g. annotator notes) are ignored. Identical responses are
not an error here; the training data loader skips and counts them (DESIGN.md §2).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from saferlhf.data.schema import DataError, validate_rows

TEXT_COLUMNS = ("prompt", "response_0", "response_1")
LABEL_COLUMNS = ("better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe")
SHEET_COLUMNS = ("id", *TEXT_COLUMNS, *LABEL_COLUMNS)

_TRUE = frozenset({"true", "yes", "1", "safe"})
_FALSE = frozenset({"false", "no", "0", "unsafe"})


class AnnotationError(DataError):
    """A sheet or export that cannot be imported; ``errors`` lists every problem found."""

    def __init__(self, message: str, errors: Sequence[SheetError] = ()):
        super().__init__(message)
        self.errors = list(errors)


@dataclass(frozen=True)
class SheetError:
    """One problem in an annotation file. ``line`` is 1-based (the CSV header is line 1) and is the
    line where the row starts; None when the problem concerns the file as a whole."""

    source: str
    line: int | None
    column: str | None
    message: str
    id: str | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}: line {self.line}"
        if self.id is not None:
            where += f" (id {self.id!r})"
        if self.column is not None:
            where += f": column {self.column!r}"
        return f"{where}: {self.message}"


def _raise(source: str, errors: list[SheetError], what: str, note: str = "") -> None:
    listed = "\n  ".join(str(e) for e in errors)
    raise AnnotationError(f"{source}: {what} ({len(errors)} errors{note}):\n  {listed}", errors)


# ---------------------------------------------------------------------------------------------
# Export


def pair_id(prompt: str, response_0: str, response_1: str) -> str:
    """A stable id for a pair given without one: the first 16 hex digits of a SHA-256 of its texts."""
    digest = hashlib.sha256(json.dumps([prompt, response_0, response_1]).encode("utf-8"))
    return digest.hexdigest()[:16]


def _as_pair(item: object) -> dict:
    """A pair as a dict with ``id``, the three texts, and any extra fields of a mapping item."""
    if isinstance(item, Mapping):
        pair = {k: v for k, v in item.items() if k not in LABEL_COLUMNS}
    elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) in (3, 4):
        pair = dict(zip(("id", *TEXT_COLUMNS) if len(item) == 4 else TEXT_COLUMNS, item))
    else:
        raise TypeError(
            "expected a pair as a mapping with prompt/response_0/response_1 (and optionally id), "
            f"or a tuple (prompt, response_0, response_1) or (id, prompt, response_0, response_1); got {item!r:.80}"
        )
    return pair


def export_for_annotation(
    pairs: Iterable[Mapping | Sequence], jsonl_path: str | os.PathLike, csv_path: str | os.PathLike
) -> list[str]:
    """Write the pairs as an unlabelled PKU-SafeRLHF JSONL file and as a CSV sheet to fill in.

    Each pair is a mapping with ``prompt``, ``response_0``, ``response_1`` and optionally ``id``
    (other fields, e.g. ``prompt_source``, are kept in the JSONL file), or a tuple
    ``(prompt, response_0, response_1)`` or ``(id, prompt, response_0, response_1)``. A pair without
    an id gets `pair_id` of its texts. Returns the ids in order. Raises `AnnotationError` listing
    every pair with an empty text or a repeated id (nothing is written then).
    """
    rows, errors, seen = [], [], {}
    for index, item in enumerate(pairs):
        pair = _as_pair(item)
        where = f"pair {index}"
        empty = [n for n in TEXT_COLUMNS if not isinstance(pair.get(n), str) or not pair[n].strip()]
        for name in empty:
            errors.append(SheetError(where, None, name, f"expected a non-empty string, got {pair.get(name)!r:.60}"))
        if empty:
            continue
        raw_id = pair.pop("id", None)
        pid = pair_id(pair["prompt"], pair["response_0"], pair["response_1"]) if raw_id is None else str(raw_id)
        if not pid.strip() or pid != pid.strip():
            errors.append(SheetError(where, None, "id", f"{pid!r} is blank or has leading/trailing whitespace"))
        elif pid in seen:
            errors.append(SheetError(where, None, "id", f"{pid!r} repeats the id of pair {seen[pid]} (a pair "
                                     "without an id gets one from its texts, so this may be the same pair twice)"))
        else:
            seen[pid] = index
            rows.append({"id": pid, **pair, **dict.fromkeys(LABEL_COLUMNS)})
    source = str(jsonl_path)
    if errors:
        _raise(source, errors, "cannot export these pairs")
    if not rows:
        raise AnnotationError(f"{source}: no pairs to export")

    Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
    Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SHEET_COLUMNS)
        for row in rows:
            writer.writerow([row["id"], *(row[c] for c in TEXT_COLUMNS), *([""] * len(LABEL_COLUMNS))])
    return [row["id"] for row in rows]


# ---------------------------------------------------------------------------------------------
# Import


def _read_export(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, int]]:
    """The exported rows by id, in file order, and the line of each."""
    source = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{source}: cannot read the exported pairs: {e}") from None
    rows: dict[str, dict] = {}
    line_of: dict[str, int] = {}
    errors: list[SheetError] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(SheetError(source, number, None, f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(row, dict):
            errors.append(SheetError(source, number, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        bad = [c for c in TEXT_COLUMNS if not isinstance(row.get(c), str) or not row[c].strip()]
        if not isinstance(row.get("id"), (str, int)) or not str(row["id"]).strip():
            bad.insert(0, "id")
        if bad:
            errors.extend(SheetError(source, number, c, "missing or empty") for c in bad)
            continue
        pid = str(row["id"])
        if pid in rows:
            errors.append(SheetError(source, number, "id", f"repeats the id of line {line_of[pid]}", pid))
            continue
        rows[pid] = row
        line_of[pid] = number
    if errors:
        _raise(source, errors, "the exported pairs file is invalid")
    if not rows:
        raise AnnotationError(f"{source}: the exported pairs file holds no pairs")
    return rows, line_of


def _normalise_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _text_difference(sheet: str, exported: str) -> str:
    a, b = _normalise_text(sheet), _normalise_text(exported)
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f"text differs from the export at character {k}: sheet has {a[k:k + 30]!r}, export has {b[k:k + 30]!r} "
        "(prompts and responses must not be edited)"
    )


def _parse_label(column: str, cell: str) -> tuple[object, str | None]:
    """(value, error message or None) for a non-blank label cell."""
    value = cell.strip().lower()
    if column in ("better_response_id", "safer_response_id"):
        if value in ("0", "1"):
            return int(value), None
        return None, f"expected 0 or 1, got {cell!r}"
    if value in _TRUE:
        return True, None
    if value in _FALSE:
        return False, None
    return None, f"expected true/false, yes/no, 1/0 or safe/unsafe, got {cell!r}"


def _read_sheet(path: str | os.PathLike) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    """The header's line and cells, and the (start line, cells) of each later non-empty record."""
    source = str(path)
    try:
        # utf-8-sig: spreadsheet programs often save a byte-order mark.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            records, line = [], 1
            for cells in reader:
                # A record may span several lines (newlines inside quoted cells); report where it starts.
                start, line = line, reader.line_num + 1
                records.append((start, cells))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(f"{source}: cannot read the annotation sheet: {e}") from None
    records = [(n, cells) for n, cells in records if any(c.strip() for c in cells)]
    if not records:
        raise AnnotationError(f"{source}: the annotation sheet is empty (expected a header line)")
    (header_line, header), *body = records
    return header_line, [c.strip() for c in header], body


def import_annotations(
    csv_path: str | os.PathLike, exported_jsonl_path: str | os.PathLike, *, allow_partial: bool = False
) -> list[dict] | tuple[list[dict], list[str]]:
    """Complete PKU-SafeRLHF preference rows from a filled-in sheet, in the order of the export.

    Every row is the exported one (its text and extra fields, and ``id``) plus the four labels,
    normalised (ids as ``int``, flags as ``bool``). Raises `AnnotationError` listing every problem
    (see the module docstring). With ``allow_partial=True`` returns ``(rows, unlabelled_ids)``:
    rows with a blank label cell are left out of ``rows`` and their ids listed instead.
    """
    source = str(csv_path)
    exported, export_line = _read_export(exported_jsonl_path)
    header_line, header, records = _read_sheet(csv_path)

    errors: list[SheetError] = []
    missing = [c for c in SHEET_COLUMNS if c not in header]
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    errors += [SheetError(source, header_line, c, "missing from the header") for c in missing]
    errors += [SheetError(source, header_line, c, "appears more than once in the header") for c in repeated]
    if errors:
        _raise(source, errors, f"the sheet's header must hold the columns {', '.join(SHEET_COLUMNS)}")
    col = {name: header.index(name) for name in SHEET_COLUMNS}

    labelled: dict[str, dict] = {}
    unlabelled: set[str] = set()
    line_of: dict[str, int] = {}
    bad_lines: set[int] = set()
    for line, cells in records:
        n_before = len(errors)
        err = lambda column, message, pid=None, line=line: errors.append(SheetError(source, line, column, message, pid))
        if len(cells) > len(header):
            extra = [c for c in cells[len(header):] if c.strip()]
            if extra:
                err(None, f"has {len(cells)} cells but the header has {len(header)} columns")
        cells = cells + [""] * (len(header) - len(cells))
        pid = cells[col["id"]].strip()
        if not pid:
            err("id", "blank (every row needs the id it was exported with)")
        elif pid not in exported:
            err("id", f"unknown id (not in {exported_jsonl_path})", pid)
        elif pid in line_of:
            err("id", f"duplicate id (also on line {line_of[pid]})", pid)
        if len(errors) > n_before:
            bad_lines.add(line)
            continue
        line_of[pid] = line
        row = exported[pid]
        for name in TEXT_COLUMNS:
            if _normalise_text(cells[col[name]]) != _normalise_text(str(row[name])):
                err(name, _text_difference(cells[col[name]], str(row[name])), pid)
        labels: dict[str, object] = {}
        blank = []
        for name in LABEL_COLUMNS:
            cell = cells[col[name]]
            if not cell.strip():
                blank.append(name)
                continue
            labels[name], message = _parse_label(name, cell)
            if message is not None:
                err(name, message, pid)
        safer = labels.get("safer_response_id")
        if safer is not None and labels.get(f"is_response_{safer}_safe") is False \
                and labels.get(f"is_response_{1 - safer}_safe") is True:
            err("safer_response_id", f"contradictory safety labels: points at response {safer}, marked unsafe, "
                f"while response {1 - safer} is marked safe", pid)
        if blank and not allow_partial:
            what = "not labelled (all label columns are blank)" if len(blank) == len(LABEL_COLUMNS) else (
                f"partly labelled: {', '.join(blank)} blank")
            err(None, f"{what}; fill it in, or import a half-done sheet with allow_partial=True", pid)
        if len(errors) > n_before:
            bad_lines.add(line)
        elif blank:
            unlabelled.add(pid)
        else:
            labelled[pid] = {**row, "id": pid, **labels}

    for pid in exported:
        if pid not in line_of:
            message = (f"exported pair (line {export_line[pid]} of {exported_jsonl_path}) is missing from the "
                       "sheet; rows must not be deleted")
            errors.append(SheetError(source, None, "id", message, pid))

    # The schema's own checks on the complete rows (types, optional fields carried over from the
    # export). Rows with identical responses pass (the schema logs them as skipped; the training
    # loader skips and counts them).
    ids = list(labelled)
    if ids:
        report = validate_rows([labelled[i] for i in ids], "preference", source=source)
        for e in report.errors:
            errors.append(SheetError(source, line_of[ids[e.row]], e.field, e.message, ids[e.row]))
            bad_lines.add(line_of[ids[e.row]])
    if errors:
        errors.sort(key=lambda e: (e.line is None, e.line or 0))
        _raise(source, errors, f"{len(bad_lines)} of {len(records)} rows cannot be imported, so nothing was imported",
               "; lines are numbered from 1, the header is line 1")

    rows = [labelled[pid] for pid in exported if pid in labelled]
    if allow_partial:
        return rows, [pid for pid in exported if pid in unlabelled]
    return rows
