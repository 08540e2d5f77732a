"""Every stage depends on all the project code it runs, and on no other: the modules
its script imports, directly or through other modules, are exactly the ``.py`` deps
``dvc.yaml`` lists for it. A change to one of them reruns the stage; a change to
anything else does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT

SPEC = yaml.safe_load((PROJECT / "dvc.yaml").read_text())


def module_file(name: str) -> Path | None:
    """The file of project module ``name`` (dotted), or None if it is not one."""
    path = PROJECT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported(path: Path) -> set[Path]:
    """The project files ``path`` imports (anywhere in it, lazy imports too), with the
    ``__init__.py`` of every package on the way, as Python runs them."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if not name.startswith("skinlesion"):
                continue
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:end]))
                if file is not None:
                    found.add(file)
    return found


def closure(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(imported(current) - seen)
    return {str(path.relative_to(PROJECT)) for path in seen}


def declared_code(stage: str) -> set[str]:
    return {dep for dep in SPEC["stages"][stage]["deps"] if dep.endswith(".py")}


@pytest.mark.parametrize("stage", list(SPEC["stages"]))
def test_a_stage_depends_on_exactly_the_code_it_imports(stage):
    script = PROJECT / "stages" / f"{stage}.py"
    assert SPEC["stages"][stage]["cmd"].split(" ${item.")[0] == f"python -m stages.{stage}"
    needed = closure(script)
    declared = declared_code(stage)
    assert declared == needed, (f"dvc.yaml stage {stage}: missing {sorted(needed - declared)}, "
                                f"not imported {sorted(declared - needed)}")


def test_the_import_walk_sees_lazy_imports_and_packages():
    files = closure(PROJECT / "stages" / "explain.py")
    assert "skinlesion/__init__.py" in files and "skinlesion/evaluation/__init__.py" in files
    assert "skinlesion/evaluation/inference.py" in files  # imported inside a function of explain.py
