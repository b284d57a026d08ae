"""Row schemas and validation for the three kinds of data rows.

Kinds (DESIGN.md §2):

- ``preference`` — the PKU-SafeRLHF schema: ``prompt, response_0, response_1, is_response_0_safe,
  is_response_1_safe, better_response_id, safer_response_id``. The ids are the ints 0 or 1 (bools,
  strings and floats are rejected: ``True`` or ``1.0`` usually means a column was mangled upstream);
  the safety flags are bools. Optional v1 fields, checked when present and not None:
  ``response_{0,1}_harm_category`` (dict str → bool), ``response_{0,1}_severity_level`` (int 0–3),
  ``prompt_source`` and ``response_{0,1}_source`` (str).
- ``sft`` — ``prompt, response``. Alpaca rows (``instruction, input, output``; ``input`` optional)
  are accepted too and normalised: ``prompt`` is the instruction, followed by a blank line and the
  input when the input is non-empty (``instruction + "\\n\\n" + input``), and ``response`` is the
  output; the three Alpaca keys are replaced by ``prompt`` and ``response``. A row is read as
  Alpaca when it has ``instruction`` and no ``prompt``.
- ``prompt`` — ``prompt`` (Alpaca ``instruction``/``input`` normalised the same way), so any
  preference or SFT file also serves as a prompt set.

Unknown keys are allowed and kept. Text fields must be non-empty (whitespace-only counts as empty).

Outcomes per row:

- an **error** (missing field, wrong type, out-of-range value): the row is dropped and a `RowError`
  names the source, the row (0-based index), the field, what was expected and what was found;
- a **skip** (counted with its reason and logged): identical responses, or contradictory safety
  labels — ``safer_response_id`` points at an unsafe response while the other one is safe.
  ``strict=True`` turns skips into errors;
- otherwise the row is kept, normalised (ids as ``int``, flags as ``bool``).
"""

from __future__ import annotations

import logging
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("preference", "sft", "prompt")

SKIP_IDENTICAL = "identical responses"
SKIP_CONTRADICTORY = "contradictory safety labels"

# How many errors a DataError message lists before summarising the rest.
_ERRORS_SHOWN = 20


class DataError(ValueError):
    """Data that cannot be used: invalid rows, an empty or unreadable file, a bad dataset spec."""


@dataclass(frozen=True)
class RowError:
    """One problem with one row. ``row`` is the 0-based index of the row in its source."""

    source: str
    row: int
    field: str | None  # None when the problem concerns the row as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: row {self.row}"
        if self.field is None:
            return f"{where}: {self.message}"
        return f"{where}: field {self.field!r}: {self.message}"


@dataclass(frozen=True)
class UnreadableRow:
    """Stands in for a row that could not be parsed or converted (a malformed JSON line, a dialogue
    that cannot be split), so that `validate_rows` reports it in place and later rows keep their
    indices."""

    message: str
    field: str | None = None


@dataclass
class ValidationReport:
    """What `validate_rows` found in one source.

    ``rows`` are the valid rows, normalised; ``errors`` every problem found (a row may have several);
    ``skipped`` counts skipped rows per reason and ``skipped_rows`` lists them as (row index, reason).
    """

    source: str
    kind: str
    n_total: int
    rows: list[dict] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: list[tuple[int, str]] = field(default_factory=list)

    @property
    def n_valid(self) -> int:
        return len(self.rows)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_invalid(self) -> int:
        """Number of rows with at least one error."""
        return len({(e.source, e.row) for e in self.errors})

    def raise_if_errors(self) -> None:
        """Raise `DataError` when any row is invalid, or when skipping left no row at all."""
        if self.errors:
            shown = "\n  ".join(str(e) for e in self.errors[:_ERRORS_SHOWN])
            more = len(self.errors) - _ERRORS_SHOWN
            tail = f"\n  ... and {more} more errors" if more > 0 else ""
            raise DataError(
                f"{self.source}: {self.n_invalid} of {self.n_total} {self.kind} rows are invalid "
                f"({len(self.errors)} errors; rows are numbered from 0):\n  {shown}{tail}"
            )
        if not self.rows:
            reasons = _counts(self.skipped)
            raise DataError(f"{self.source}: no valid rows: all {self.n_total} rows were skipped ({reasons})")

    @classmethod
    def concat(cls, reports: Sequence[ValidationReport], source: str) -> ValidationReport:
        """One report for several sources read as one dataset (e.g. the files of a directory).

        Errors keep their own source and row; ``skipped_rows`` index the concatenated input.
        """
        if not reports:
            raise DataError(f"{source}: no rows")
        merged = cls(source=source, kind=reports[0].kind, n_total=0)
        for report in reports:
            merged.rows.extend(report.rows)
            merged.errors.extend(report.errors)
            merged.skipped.update(report.skipped)
            merged.skipped_rows.extend((merged.n_total + i, reason) for i, reason in report.skipped_rows)
            merged.n_total += report.n_total
        return merged


def validate_rows(
    rows: Iterable[object], kind: str, source: str = "<memory>", strict: bool = False
) -> ValidationReport:
    """Check every row of ``rows`` against the schema of ``kind``; see the module docstring.

    Raises `DataError` when there are no rows at all; every other problem goes into the report
    (call `ValidationReport.raise_if_errors` to make them fatal).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    rows = list(rows)
    if not rows:
        raise DataError(f"{source}: no rows")
    check = _CHECKS[kind]
    report = ValidationReport(source=source, kind=kind, n_total=len(rows))
    for index, row in enumerate(rows):
        problems: list[tuple[str | None, str]] = []
        err = lambda name, message, problems=problems: problems.append((name, message))
        if isinstance(row, UnreadableRow):
            err(row.field, row.message)
        elif not isinstance(row, Mapping):
            err(None, f"expected an object (a mapping of field names to values), got {_describe(row)}")
        else:
            normalised = check(row, err)
            skip = _skip_reason(normalised) if not problems and kind == "preference" else None
            if skip is not None and strict:
                err(*_strict_error(normalised, skip))
            elif skip is not None:
                report.skipped[skip] += 1
                report.skipped_rows.append((index, skip))
                logger.debug("%s: row %d skipped: %s", source, index, skip)
            elif not problems:
                report.rows.append(normalised)
        report.errors.extend(RowError(source, index, name, message) for name, message in problems)
    if report.skipped:
        reasons = _counts(report.skipped)
        logger.warning("%s: skipped %d of %d rows (%s)", source, report.n_skipped, report.n_total, reasons)
    return report


# ---------------------------------------------------------------------------------------------
# Field checks. Each takes the row and an `err(field, message)` callback, and returns the value
# normalised (or None after reporting an error).

_Err = Callable[[str | None, str], None]


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.items()))


def _text(row: Mapping, name: str, err: _Err) -> str | None:
    if name not in row:
        err(name, "missing (expected a non-empty string)")
        return None
    value = row[name]
    if not isinstance(value, str):
        err(name, f"expected a non-empty string, got {_describe(value)}")
        return None
    if not value.strip():
        err(name, f"expected a non-empty string, got {value!r}")
        return None
    return value


def _flag(row: Mapping, name: str, err: _Err) -> bool | None:
    if name not in row:
        err(name, "missing (expected true or false)")
        return None
    value = row[name]
    # numpy bools come out of Parquet/pandas; they are not a subclass of bool.
    if not isinstance(value, (bool, np.bool_)):
        err(name, f"expected true or false, got {_describe(value)}")
        return None
    return bool(value)


def _is_int(value: object) -> bool:
    # bool is an int subclass; a flag in an id column means the columns are mixed up.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _response_id(row: Mapping, name: str, err: _Err) -> int | None:
    if name not in row:
        err(name, "missing (expected 0 or 1)")
        return None
    value = row[name]
    if not _is_int(value):
        err(name, f"expected 0 or 1 (an int), got {_describe(value)}")
        return None
    if value not in (0, 1):
        err(name, f"expected 0 or 1, got {int(value)}")
        return None
    return int(value)


def _optional(row: Mapping, name: str, err: _Err, check: Callable[[object], str | None]) -> None:
    """Check an optional field when present and not None; ``check`` returns an error or None."""
    value = row.get(name)
    if value is not None and (message := check(value)) is not None:
        err(name, message)


def _harm_category(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return f"expected an object mapping category names to true/false, got {_describe(value)}"
    for key, flag in value.items():
        if not isinstance(key, str) or not isinstance(flag, (bool, np.bool_)):
            return f"expected category name → true/false, got {key!r}: {_describe(flag)}"
    return None


def _severity(value: object) -> str | None:
    if not _is_int(value):
        return f"expected an int from 0 to 3, got {_describe(value)}"
    if not 0 <= value <= 3:
        return f"expected an int from 0 to 3, got {int(value)}"
    return None


def _source_name(value: object) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_describe(value)}"


def _check_preference(row: Mapping, err: _Err) -> dict:
    out = dict(row)
    out["prompt"] = _text(row, "prompt", err)
    for i in (0, 1):
        out[f"response_{i}"] = _text(row, f"response_{i}", err)
        out[f"is_response_{i}_safe"] = _flag(row, f"is_response_{i}_safe", err)
    out["better_response_id"] = _response_id(row, "better_response_id", err)
    out["safer_response_id"] = _response_id(row, "safer_response_id", err)
    for i in (0, 1):
        _optional(row, f"response_{i}_harm_category", err, _harm_category)
        _optional(row, f"response_{i}_severity_level", err, _severity)
        _optional(row, f"response_{i}_source", err, _source_name)
        if _is_int(row.get(f"response_{i}_severity_level")):
            out[f"response_{i}_severity_level"] = int(row[f"response_{i}_severity_level"])
    _optional(row, "prompt_source", err, _source_name)
    return out


def _alpaca_prompt(row: Mapping, err: _Err) -> str | None:
    """``instruction``, plus a blank line and ``input`` when the input is non-empty."""
    instruction = _text(row, "instruction", err)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        err("input", f"expected a string, got {_describe(extra)}")
        return None
    if instruction is None:
        return None
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def _is_alpaca(row: Mapping) -> bool:
    return "instruction" in row and "prompt" not in row


def _check_sft(row: Mapping, err: _Err) -> dict:
    if not _is_alpaca(row):
        out = dict(row)
        out["prompt"] = _text(row, "prompt", err)
        out["response"] = _text(row, "response", err)
        return out
    out = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
    out["prompt"] = _alpaca_prompt(row, err)
    out["response"] = _text(row, "output", err)
    return out


def _check_prompt(row: Mapping, err: _Err) -> dict:
    if not _is_alpaca(row):
        out = dict(row)
        out["prompt"] = _text(row, "prompt", err)
        return out
    out = {k: v for k, v in row.items() if k not in ("instruction", "input")}
    out["prompt"] = _alpaca_prompt(row, err)
    return out


_CHECKS: dict[str, Callable[[Mapping, _Err], dict]] = {
    "preference": _check_preference,
    "sft": _check_sft,
    "prompt": _check_prompt,
}


def _skip_reason(row: Mapping) -> str | None:
    """Why a well-typed preference row cannot be trained on, or None."""
    if row["response_0"] == row["response_1"]:
        return SKIP_IDENTICAL
    safer = row["safer_response_id"]
    if not row[f"is_response_{safer}_safe"] and row[f"is_response_{1 - safer}_safe"]:
        return SKIP_CONTRADICTORY
    return None


def _strict_error(row: Mapping, reason: str) -> tuple[str, str]:
    if reason == SKIP_IDENTICAL:
        return "response_1", "expected a response different from response_0, got an identical one (strict)"
    safer = row["safer_response_id"]
    return (
        "safer_response_id",
        f"points at response {safer}, which is unsafe, while response {1 - safer} is safe "
        f"(contradictory safety labels; strict)",
    )
