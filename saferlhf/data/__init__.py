"""Data: row schemas and validation, the dataset registry and mixing, templates and collators.

The toy world lives in `saferlhf.data.toyworld`; the ``data check`` command in `saferlhf.data.check`.
"""

from saferlhf.data.collate import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PairBatch,
    PairDataset,
    PromptBatch,
    PromptDataset,
    SFTBatch,
    SFTDataset,
    format_prompt,
)
from saferlhf.data.registry import (
    DATASETS,
    DatasetEntry,
    DatasetSpec,
    MixedDataset,
    load_rows,
    mix_datasets,
    parse_spec,
    read_path,
    read_rows,
    register_dataset,
)
from saferlhf.data.schema import (
    KINDS,
    DataError,
    RowError,
    UnreadableRow,
    ValidationReport,
    validate_rows,
)

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "KINDS",
    "PROMPT_TEMPLATE",
    "DataError",
    "DatasetEntry",
    "DatasetSpec",
    "MixedDataset",
    "PairBatch",
    "PairDataset",
    "PromptBatch",
    "PromptDataset",
    "RowError",
    "SFTBatch",
    "SFTDataset",
    "UnreadableRow",
    "ValidationReport",
    "format_prompt",
    "load_rows",
    "mix_datasets",
    "parse_spec",
    "read_path",
    "read_rows",
    "register_dataset",
    "validate_rows",
]
