"""Shared fixtures: the toy-world models (base → SFT → reward model → cost model), built once.

Stages run in-process (a world of one, gloo); the distributed tests launch torchrun themselves.
"""

from __future__ import annotations

import os

import pytest
from helpers import ToyModels, stage_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> ToyModels:
    from saferlhf.pipeline import build_base_model
    from saferlhf.trainers.preference import train_preference
    from saferlhf.trainers.sft import train_sft

    root = tmp_path_factory.mktemp("toy")
    base = build_base_model(root / "base")
    train_sft(stage_config("sft", root / "sft", base))
    sft = root / "sft" / "model"
    rm_metrics = train_preference(stage_config("rm", root / "rm", sft))
    cm_metrics = train_preference(stage_config("cm", root / "cm", sft))
    return ToyModels(root, base, sft, root / "rm" / "model", root / "cm" / "model", rm_metrics, cm_metrics)
