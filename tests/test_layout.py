"""The package's layers: notebook step modules on top, building blocks below, never the other way round."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from vinakit import ENTRY_POINTS, STEP_MODULES

PACKAGE = Path(__file__).resolve().parent.parent / "vinakit"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def kit_imports(path: Path) -> set[str]:
    """The vinakit modules a module imports (at module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vinakit"):
            parts = node.module.split(".")
            names.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vinakit."))
    return names - {path.stem}


def test_building_blocks_never_import_step_modules_and_steps_never_import_each_other() -> None:
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in ENTRY_POINTS:
            continue
        steps = kit_imports(path) & set(STEP_MODULES)
        if steps:
            wrong.append(f"{path.name} imports {sorted(steps)}")
    assert not wrong, "; ".join(wrong)


def test_notebooks_call_only_their_step_module_and_building_blocks() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text("utf-8"))["cells"]
                         if c["cell_type"] == "code")
        steps = {name for name in STEP_MODULES if f"vinakit.{name} " in code or f"vinakit.{name}\n" in code}
        assert len(steps) == 1, f"{path.name} uses the step modules {sorted(steps)}"


def test_modules_stay_small() -> None:
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 700} == {}
    assert sizes["export.py"] < 500 and sizes["cpt.py"] < 500


def test_lines_stay_within_the_configured_length() -> None:
    root = PACKAGE.parent
    limit = int(next(line.split("=")[1].split("#")[0] for line in (root / "pyproject.toml").read_text().splitlines()
                     if line.startswith("line-length")))
    long_lines = [f"{path.relative_to(root)}:{number}" for folder in ("vinakit", "tests", "bench")
                  for path in sorted((root / folder).glob("*.py"))
                  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                  if len(line) > limit]
    assert not long_lines, long_lines
