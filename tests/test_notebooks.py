"""Notebooks: stored clean and thin, and every one runs end to end headless with params/cpu_tiny.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import report_problems

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"
FORBIDDEN_IN_CODE = ("!pip", "%pip", "%%capture", "notebook_login", "if False", "\ndef ", "\nclass ", "HF_TOKEN =")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path: Path):
    nb = load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["language_info"]["name"] == "python"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: stored with outputs"
            assert cell["execution_count"] is None, f"{path.name}: stored with an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin(path: Path):
    for cell in load(path)["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "\n" + "".join(cell["source"])
        for pattern in FORBIDDEN_IN_CODE:
            assert pattern not in source, f"{path.name}: {pattern.strip()!r} belongs in the package or a parameter"


def run_cli(*args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "vinakit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=1200)


# Extra command-line parameters per notebook; notebooks that consume a trained model get the SFT run.
EXTRA_ARGS = {
    "eval_mcq": lambda sft: ["-p", "adapter", str(sft)],
    "export": lambda sft: ["-p", "adapter", str(sft / "adapter")],
    "preference": lambda sft: ["-p", "adapter", str(sft)],  # ORPO on top of the SFT run
}


def check_run_folder(run: Path, name: str) -> dict:
    for expected in (f"{name}.ipynb", "params.yaml", "manifest.json", "metrics.json"):
        assert (run / expected).is_file(), f"{expected} missing from the run folder {run}"
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "completed"
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    executed = load(run / f"{name}.ipynb")
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    # every notebook plans its memory before it loads a model (vinakit.plan), on a CPU too
    assert isinstance(metrics["estimated_peak_memory_gib"], float) and manifest["memory_plan"]["fits"] in (True, False)
    # report.html: the executed notebook for any browser, and what it shows is clean (tests/test_report.py)
    problems = report_problems(run, name)
    assert not problems, "\n".join(problems)
    return manifest


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless_with_cpu_tiny(name: str, sft_run: Path, tmp_path: Path):
    if name == "sft":
        run = sft_run  # executed once per session by the fixture, shared with the notebooks that need it
    else:
        extra = EXTRA_ARGS.get(name, lambda sft: [])(sft_run)
        result = run_cli("run", name, "-f", str(CPU_TINY), "-p", "output_dir", str(tmp_path), "-p", "run_name",
                         "r1", "--no-progress", *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        run = tmp_path / "r1"
    check_run_folder(run, name)
    # never overwritten: the same run_name again is refused before anything runs
    again = run_cli("run", name, "-f", str(CPU_TINY), "-p", "output_dir", str(run.parent), "-p", "run_name",
                    run.name)
    assert again.returncode == 2 and "never overwritten" in again.stderr
