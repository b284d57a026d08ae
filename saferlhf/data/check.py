"""``saferlhf data check PATH --kind {preference,sft,prompt} [--json] [--strict]``.

Validates a data file (or every data file below a directory) without training on it: prints the
number of valid rows, the skipped rows per reason and every error, one per line — or, with
``--json``, one JSON object ``{"path", "kind", "n_rows", "n_valid", "n_skipped", "skipped",
"errors"}``. Exits 1 when any row is invalid or the file cannot be read or holds no rows, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys

from saferlhf.data.registry import read_path
from saferlhf.data.schema import KINDS, DataError, ValidationReport, validate_rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saferlhf data check",
        description="Validate a .jsonl/.json/.parquet file (or a directory of them) against a row schema.",
    )
    parser.add_argument("path", help="data file, or a directory of data files")
    parser.add_argument("--kind", required=True, choices=KINDS, help="row schema to check against")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--strict", action="store_true", help="count rows that would be skipped as errors")
    return parser


def check_path(path: str, kind: str, strict: bool = False) -> ValidationReport:
    """Validate every row under ``path``; raises `DataError` when nothing can be read."""
    reports = [validate_rows(rows, kind, source=source, strict=strict) for source, rows in read_path(path)]
    return reports[0] if len(reports) == 1 else ValidationReport.concat(reports, source=path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = check_path(args.path, args.kind, strict=args.strict)
    except DataError as e:
        if args.json:
            print(json.dumps(_summary(args.path, args.kind, None, [str(e)])))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    errors = [str(e) for e in report.errors]
    if args.json:
        print(json.dumps(_summary(args.path, args.kind, report, errors)))
    else:
        print(
            f"{args.path}: {report.n_total} {args.kind} rows: {report.n_valid} valid, "
            f"{report.n_skipped} skipped, {report.n_invalid} invalid"
        )
        for reason, n in sorted(report.skipped.items()):
            print(f"  skipped ({reason}): {n}")
        if errors:
            print(f"{len(errors)} errors (rows are numbered from 0):")
            print("\n".join(errors))
    return 1 if errors else 0


def _summary(path: str, kind: str, report: ValidationReport | None, errors: list[str]) -> dict:
    return {
        "path": path,
        "kind": kind,
        "n_rows": report.n_total if report else 0,
        "n_valid": report.n_valid if report else 0,
        "n_skipped": report.n_skipped if report else 0,
        "skipped": dict(sorted(report.skipped.items())) if report else {},
        "errors": errors,
    }


if __name__ == "__main__":
    sys.exit(main())
