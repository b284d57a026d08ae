"""Import ``saferlhf`` from an installed package or straight from this checkout.

Installed, ``saferlhf.kernels`` and ``saferlhf.csrc`` map to the top-level ``kernels/`` and ``csrc/``
directories (``pyproject.toml``). From a bare checkout (a machine with only torch, triton and
transformers) the same mapping is made here, so the benchmark scripts run without an install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"saferlhf.kernels": ROOT / "kernels", "saferlhf.csrc": ROOT / "csrc"}


def import_saferlhf():
    """The ``saferlhf`` package, with its ``kernels`` and ``csrc`` subpackages importable."""
    if importlib.util.find_spec("saferlhf") is None:
        sys.path.insert(0, str(ROOT))
    import saferlhf

    for name, directory in SUBPACKAGES.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(
            name, directory / "__init__.py", submodule_search_locations=[str(directory)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
        setattr(saferlhf, name.rsplit(".", 1)[1], package)
    return saferlhf
