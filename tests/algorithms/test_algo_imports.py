"""saferlhf.algorithms is the spec: it may import torch and the standard library, nothing else."""

import ast
from pathlib import Path

import saferlhf.algorithms

ALLOWED_TOP_LEVEL = {"torch", "math", "collections", "dataclasses", "typing", "__future__"}


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    return modules


def test_algorithms_import_only_torch_the_stdlib_and_themselves():
    package_dir = Path(saferlhf.algorithms.__file__).parent
    files = sorted(package_dir.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for module in _imported_modules(path):
            allowed = module.split(".")[0] in ALLOWED_TOP_LEVEL or module.startswith("saferlhf.algorithms")
            assert allowed, f"{path.name} imports {module}"


def test_every_public_name_is_exported():
    for name in saferlhf.algorithms.__all__:
        assert hasattr(saferlhf.algorithms, name), name
