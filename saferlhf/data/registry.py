"""Dataset registry, dataset specs, file reading and seeded mixing.

A dataset argument is ``NAME[:PROPORTION[:PATH]]`` (DESIGN.md §2):

- ``NAME`` is a registered name (`DATASETS`, e.g. ``PKU-SafeRLHF/train``, ``toy-preference``), or a
  path to a local file or directory (a bare path also works as the whole spec). A registered name
  wins over a same-named path in the working directory.
- ``PROPORTION`` (default 1) is a number or a fraction: ``0.5`` or ``1/2`` takes that share of the
  rows, ``2.5`` repeats every row twice plus a random half, and a negative whole number takes
  exactly that many rows: ``500/-1`` (the original safe-rlhf spelling; ``-500`` is the same) takes
  500 rows, repeating rows when the dataset has fewer. A share is floor(proportion × rows).
- ``PATH`` replaces the entry's location with a local file or directory; the entry's conversion
  (e.g. hh-rlhf dialogues → preference rows) still applies. ``NAME::PATH`` keeps the proportion 1.

Local files are ``.jsonl``, ``.json`` (a list of objects, or JSON lines) or ``.parquet``; a directory
is every such file below it, in sorted order. JSON is parsed here rather than with ``datasets``
because ``datasets`` unifies the column types across rows: one ``1.0`` turns every id of the file into
a float and a missing key into ``None``, which would hide exactly the errors validation must name.
Parquet files are typed already and are read with pyarrow. Hub ids are used only when no local path
is given (and never in tests).

Registered datasets are validated against the *requested* kind, not their own: a preference set
also serves as a prompt set (its ``prompt`` field), and an SFT set used as preference data fails
with errors naming the missing fields.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from saferlhf.data.schema import KINDS, DataError, UnreadableRow, ValidationReport, validate_rows

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DatasetEntry:
    """Where a registered dataset lives and how its rows become schema rows.

    Exactly one of ``path`` (local file or directory), ``hub_id`` (Hugging Face hub, with ``split``,
    ``data_dir``, ``revision``) and ``generate`` (a function returning the rows) gives the rows;
    ``convert`` maps each raw row to a schema row, or to an `UnreadableRow` explaining why it can't.
    ``kind`` is the kind its rows have natively.
    """

    name: str
    kind: str
    path: str | None = None
    hub_id: str | None = None
    split: str = "train"
    data_dir: str | None = None
    revision: str | None = None
    generate: Callable[[], list[dict]] | None = None
    convert: Callable[[dict], dict | UnreadableRow] | None = None
    description: str = ""


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    kind: str,
    *,
    path: str | os.PathLike | None = None,
    hub_id: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    revision: str | None = None,
    generate: Callable[[], list[dict]] | None = None,
    convert: Callable[[dict], dict | UnreadableRow] | None = None,
    description: str = "",
    overwrite: bool = False,
) -> DatasetEntry:
    """Register ``name`` so that dataset specs can use it; see `DatasetEntry` for the fields."""
    if kind not in KINDS:
        raise ValueError(f"dataset {name!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not name or ":" in name:
        raise ValueError(f"dataset name {name!r} must be non-empty and contain no ':'")
    if sum(x is not None for x in (path, hub_id, generate)) != 1:
        raise ValueError(f"dataset {name!r}: give exactly one of path, hub_id and generate")
    if name in DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
    entry = DatasetEntry(
        name=name,
        kind=kind,
        path=None if path is None else os.fspath(path),
        hub_id=hub_id,
        split=split,
        data_dir=data_dir,
        revision=revision,
        generate=generate,
        convert=convert,
        description=description,
    )
    DATASETS[name] = entry
    return entry


# ---------------------------------------------------------------------------------------------
# Dataset specs


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``NAME[:PROPORTION[:PATH]]``. ``proportion`` < 0 means exactly ``-proportion`` rows."""

    text: str
    name: str
    proportion: Fraction = Fraction(1)
    path: str | None = None

    @property
    def exact_count(self) -> int | None:
        return int(-self.proportion) if self.proportion < 0 else None


def _spec_error(spec: str, why: str) -> DataError:
    usage = "expected NAME[:PROPORTION[:PATH]], e.g. 'toy-preference:0.5'"
    return DataError(f"bad dataset spec {spec!r}: {why} ({usage})")


def _parse_proportion(text: str, spec: str) -> Fraction:
    numerator, slash, denominator = text.strip().partition("/")
    try:
        # Fraction('500/-1') is rejected by Fraction's own parser, so the two parts are read apart.
        value = Fraction(numerator) / Fraction(denominator) if slash else Fraction(numerator)
    except (ValueError, ZeroDivisionError):
        raise _spec_error(spec, f"proportion {text!r} is not a number or fraction") from None
    if value == 0:
        raise _spec_error(spec, "proportion 0 would take no rows")
    if value < 0 and value.denominator != 1:
        raise _spec_error(spec, f"an exact row count must be a whole number, got {-value}")
    return value


def parse_spec(spec: str) -> DatasetSpec:
    """Parse ``NAME[:PROPORTION[:PATH]]``; errors name the spec. See the module docstring."""
    text = spec.strip()
    if not text:
        raise _spec_error(spec, "it is empty")
    if text in DATASETS or os.path.exists(text):
        return DatasetSpec(text=text, name=text, path=None if text in DATASETS else text)
    # PATH comes last, so any further ':' belongs to it.
    name, _, rest = text.partition(":")
    proportion_text, _, path = rest.partition(":")
    name = name.strip()
    if not name:
        raise _spec_error(spec, "NAME is empty")
    proportion = _parse_proportion(proportion_text, spec) if proportion_text.strip() else Fraction(1)
    path = path.strip() or None
    if path is None and name not in DATASETS:
        if not os.path.exists(name):
            known = ", ".join(sorted(DATASETS))
            raise _spec_error(spec, f"{name!r} is neither a registered dataset ({known}) nor a path")
        path = name
    return DatasetSpec(text=text, name=name, proportion=proportion, path=path)


# ---------------------------------------------------------------------------------------------
# Reading


def read_rows(path: str | os.PathLike) -> list[dict | UnreadableRow]:
    """The rows of one ``.jsonl`` / ``.json`` / ``.parquet`` file, unvalidated.

    A malformed JSON line becomes an `UnreadableRow` in its place (so validation reports it with its
    row index and line number); blank lines are ignored. An unreadable file raises `DataError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        expected = ", ".join(FILE_SUFFIXES)
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected {expected}")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # heavy; only for Parquet

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _parse_json_lines(text)  # many ".json" files are JSON lines
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of row objects, got a JSON {type(data).__name__}")
        return data
    return _parse_json_lines(text)


def _parse_json_lines(text: str) -> list[dict | UnreadableRow]:
    rows: list[dict | UnreadableRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(UnreadableRow(f"line {number}: invalid JSON: {e.msg} (column {e.colno})"))
    return rows


def read_path(path: str) -> list[tuple[str, list]]:
    """(source name, unvalidated rows) for a file, or for each data file below a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no {', '.join(FILE_SUFFIXES)} files")
        return [(str(f), read_rows(f)) for f in files]
    if not p.exists():
        raise DataError(f"{path}: no such file or directory")
    return [(path, read_rows(p))]


def _hub_rows(entry: DatasetEntry) -> list[dict]:
    import datasets  # heavy, and only needed here

    logger.info("loading %s (split %s) from the Hugging Face hub", entry.hub_id, entry.split)
    ds = datasets.load_dataset(entry.hub_id, data_dir=entry.data_dir, split=entry.split, revision=entry.revision)
    return ds.to_list()


def load_rows(spec: str | DatasetSpec, kind: str, strict: bool = False) -> tuple[list[dict], ValidationReport]:
    """All valid rows of one dataset (its proportion is applied by `mix_datasets`, not here).

    Raises `DataError` when any row is invalid, or none is left after skipping.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    entry = DATASETS.get(spec.name)
    if entry is None and spec.path is None:
        raise DataError(f"dataset spec {spec.text!r}: {spec.name!r} is not registered and no PATH is given")
    convert = entry.convert if entry is not None else None
    if spec.path is not None:
        sources = read_path(spec.path)
    elif entry.path is not None:
        sources = read_path(entry.path)
    elif entry.generate is not None:
        sources = [(entry.name, entry.generate())]
    else:
        sources = [(f"{entry.hub_id} ({entry.split})", _hub_rows(entry))]
    reports = []
    for source, raw in sources:
        if convert is not None:
            # Only objects are converted; anything else is left for validation to report.
            raw = [convert(r) if isinstance(r, Mapping) else r for r in raw]
        reports.append(validate_rows(raw, kind, source=source, strict=strict))
    report = reports[0] if len(reports) == 1 else ValidationReport.concat(reports, source=spec.path)
    try:
        report.raise_if_errors()
    except DataError as e:
        if entry is not None and entry.kind != kind:
            raise DataError(f"{e}\n({spec.name} holds {entry.kind} rows, read here as {kind} rows)") from None
        raise
    return report.rows, report


# ---------------------------------------------------------------------------------------------
# Mixing


@dataclass
class MixedDataset:
    """Rows of several datasets mixed by proportion and shuffled with a seed.

    ``reports`` and ``counts`` are keyed by the spec as written: each source's validation report,
    and how many rows it contributed to the mix.
    """

    rows: list[dict]
    reports: dict[str, ValidationReport] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)


def _take(n: int, spec: DatasetSpec, rng: np.random.Generator) -> np.ndarray:
    """Indices into n rows for the spec's proportion: whole repeats, then a random remainder."""
    wanted = spec.exact_count if spec.exact_count is not None else math.floor(spec.proportion * n)
    if wanted == 0:
        raise DataError(f"dataset spec {spec.text!r}: proportion {spec.proportion} of {n} rows takes no rows")
    repeats, remainder = divmod(wanted, n)
    return np.concatenate([np.tile(np.arange(n), repeats), rng.permutation(n)[:remainder]])


def mix_datasets(specs: Sequence[str | DatasetSpec], kind: str, seed: int, strict: bool = False) -> MixedDataset:
    """Load, validate, subsample or repeat each dataset by its proportion, and shuffle the union.

    The same specs and seed always give the same rows in the same order.
    """
    if isinstance(specs, str):
        specs = [specs]
    parsed = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise DataError("no datasets given")
    texts = [s.text for s in parsed]
    if len(set(texts)) != len(texts):
        raise DataError(f"a dataset spec is listed twice in {texts}; raise its proportion instead")
    rng = np.random.default_rng(seed)
    mixed = MixedDataset(rows=[])
    for spec in parsed:
        rows, report = load_rows(spec, kind, strict=strict)
        taken = [rows[i] for i in _take(len(rows), spec, rng)]
        mixed.rows.extend(taken)
        mixed.reports[spec.text] = report
        mixed.counts[spec.text] = len(taken)
        logger.info("%s: %d of %d valid rows in the mix", spec.text, len(taken), len(rows))
    mixed.rows = [mixed.rows[i] for i in rng.permutation(len(mixed.rows))]
    return mixed


# ---------------------------------------------------------------------------------------------
# Built-in datasets

_HH_TURN = "\n\nAssistant:"


def hh_rlhf_to_preference(row: dict, harmless: bool) -> dict | UnreadableRow:
    """Map an Anthropic hh-rlhf row (``chosen`` / ``rejected`` full dialogues) to a preference row.

    The prompt is the dialogue before the last ``"\\n\\nAssistant:"`` (shared by both dialogues);
    for a single human turn its ``"Human: "`` prefix is dropped since the prompt template names the
    user itself, while multi-turn dialogues are kept verbatim. ``response_0`` is the chosen final
    assistant turn, ``response_1`` the rejected one, so ``better_response_id = 0``.

    hh-rlhf has no safety labels. For the harmless set the chosen response is the less harmful one:
    it is marked safe and the rejected one unsafe (``safer_response_id = 0``), which over-states the
    harm of many rejected responses but keeps the cost model's sign term consistent with the ranking.
    For the helpful set both are marked safe.
    """
    parts = {}
    for key in ("chosen", "rejected"):
        text = row.get(key)
        if not isinstance(text, str):
            return UnreadableRow(f"expected a dialogue string, got {type(text).__name__}", field=key)
        cut = text.rfind(_HH_TURN)
        if cut < 0:
            return UnreadableRow(f"no {_HH_TURN.strip()!r} turn in the dialogue", field=key)
        parts[key] = (text[:cut], text[cut + len(_HH_TURN) :].strip())
    (prompt, chosen), (other_prompt, rejected) = parts["chosen"], parts["rejected"]
    if prompt != other_prompt:
        why = "chosen and rejected dialogues differ before the last assistant turn"
        return UnreadableRow(why, field="rejected")
    prompt = prompt.strip()
    if _HH_TURN not in prompt and prompt.startswith("Human:"):
        prompt = prompt[len("Human:") :].strip()
    return {
        "prompt": prompt,
        "response_0": chosen,
        "response_1": rejected,
        "is_response_0_safe": True,
        "is_response_1_safe": not harmless,
        "better_response_id": 0,
        "safer_response_id": 0,
    }


# The toy world's splits are independent draws (different seeds). Its request space is small and
# closed (about a hundred phrasings), so train and test share prompts by design: held-out means
# freshly sampled responses and labels, not unseen requests.
TOY_SIZES = {"train": 4000, "test": 500}
TOY_SEEDS = {"train": 0, "test": 1}
# name -> (kind, generator function in saferlhf.data.toyworld, its keyword arguments)
_TOY_DATASETS = {
    "toy-sft": ("sft", "generate_sft", {}),
    "toy-preference": ("preference", "generate_preference", {}),
    "toy-prompts": ("prompt", "generate_prompts", {}),
    # The RL prompt set of Safe RLHF is red-teaming heavy: most requests are harmful ones.
    "toy-redteam": ("prompt", "generate_prompts", {"harmful_fraction": 0.8}),
    # The sets of the toy PPO-Lagrangian demo (configs/tiny-cpu.yaml): an SFT policy that complies with
    # most harmful requests (so that with d = 0 it starts out violating the constraint), red-teaming
    # cost-model pairs that always differ in harm (declining is not "safer" than a harmless answer),
    # harmful-only RL prompts, and clean helpful answers to benign requests for the PTX term (the
    # paper's Alpaca).
    "toy-sft-permissive": ("sft", "generate_sft", {"harmful_comply": 0.75}),
    "toy-safety-preference": ("preference", "generate_preference",
                              {"harmful_fraction": 1.0, "refusal_safer": False}),
    "toy-harmful-prompts": ("prompt", "generate_prompts", {"harmful_fraction": 1.0}),
    "toy-helpful": ("sft", "generate_sft", {"harmful_fraction": 0.0, "benign_refuse": 0.0, "off_topic": 0.0,
                                            "low_quality": 0.0}),
}


def toy_rows(name: str, split: str) -> list[dict]:
    """The rows of toy dataset ``name`` (a key of ``_TOY_DATASETS``) for a split."""
    # Imported here: nothing else in this module needs the toy world.
    toyworld = importlib.import_module("saferlhf.data.toyworld")
    _, function, kwargs = _TOY_DATASETS[name]
    return getattr(toyworld, function)(TOY_SIZES[split], seed=TOY_SEEDS[split], **kwargs)


def _register_builtins() -> None:
    for name, hub_id, splits in (
        ("PKU-SafeRLHF", "PKU-Alignment/PKU-SafeRLHF", ("train", "test")),
        ("PKU-SafeRLHF-30K", "PKU-Alignment/PKU-SafeRLHF-30K", ("train", "test")),
        ("PKU-SafeRLHF-10K", "PKU-Alignment/PKU-SafeRLHF-10K", ("train",)),
    ):
        register_dataset(name, "preference", hub_id=hub_id, description=f"{hub_id} (train)")
        for split in splits:
            register_dataset(
                f"{name}/{split}", "preference", hub_id=hub_id, split=split, description=f"{hub_id} ({split})"
            )
    register_dataset(
        "PKU-SafeRLHF-v0",
        "preference",
        hub_id="PKU-Alignment/PKU-SafeRLHF",
        revision="v0",
        description="PKU-Alignment/PKU-SafeRLHF, first release (no harm categories or severity levels)",
    )
    register_dataset("alpaca", "sft", hub_id="tatsu-lab/alpaca", description="Alpaca 52K instructions")
    for subset, harmless in (("harmless", True), ("helpful", False)):
        register_dataset(
            f"hh-rlhf-{subset}",
            "preference",
            hub_id="Anthropic/hh-rlhf",
            data_dir=f"{subset}-base",
            convert=lambda row, harmless=harmless: hh_rlhf_to_preference(row, harmless),
            description=f"Anthropic/hh-rlhf {subset}-base, dialogues mapped to preference rows",
        )
    for name, (kind, _, _) in _TOY_DATASETS.items():
        for split in ("train", "test"):
            register_dataset(
                f"{name}/{split}",
                kind,
                generate=lambda name=name, split=split: toy_rows(name, split),
                description=f"toy world {kind} rows ({split})",
            )
        train = lambda name=name: toy_rows(name, "train")
        register_dataset(name, kind, generate=train, description=f"toy world {kind} rows (train)")


_register_builtins()
