"""Input holes, driven end to end through ``vinakit run`` the way a user's run meets them (issue 11, item 6).

* A CSV saved by Excel carries CRLF inside its cells: SFT trains on LF, the manifest's data report counts the
  fix, the masking preview shows no ``\\r``.
* ``learning_rate: 1e-3`` in a YAML preset (PyYAML reads YAML 1.1: a string) is a float, as YAML 1.2 reads it.
* A CPT run folder passed as ``adapter`` to eval_mcq is refused before any model loads, saying to pass its
  ``model/`` as ``model_name``; the run folder itself is accepted as ``model_name``.
* A ``repo_id`` against the Hub's naming rules is refused before papermill or torch is imported, and no run
  folder is created.

The notebook-running tests are short (2 steps, a few items) and marked slow. Unit tests of the same fixes live
in test_text, test_data, test_params, test_evaluate and test_model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"
# Short runs on the plain-transformers backend: each test checks the input path, not the training.
SHORT = ("-p", "backend", "hf", "-p", "max_steps", "2", "-p", "logging_steps", "1", "--no-progress")


def vinakit(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``vinakit ARGS`` in a subprocess, as a user types it."""
    return subprocess.run([sys.executable, "-m", "vinakit.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout)


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-3000:] + result.stderr[-5000:]


# --- parameters: refused or accepted before any kernel starts ----------------------------------------------------


def test_yaml_preset_with_1e_3_is_accepted(tmp_path: Path):
    preset = tmp_path / "toc_do_hoc.yaml"
    preset.write_text("# tốc độ học viết kiểu 1e-3 (YAML 1.2 đọc là số thực)\nlearning_rate: 1e-3\n"
                      "cpt:\n  embedding_learning_rate: 1E-4\n", encoding="utf-8")
    sft = vinakit("params", "sft", "-f", str(CPU_TINY), "-f", str(preset))
    assert sft.returncode == 0, output_of(sft)
    assert yaml.safe_load(sft.stdout)["learning_rate"] == 1e-3
    cpt = vinakit("params", "cpt", "-f", str(CPU_TINY), "-f", str(preset))
    assert cpt.returncode == 0, output_of(cpt)
    assert (yaml.safe_load(cpt.stdout)["learning_rate"], yaml.safe_load(cpt.stdout)["embedding_learning_rate"]) \
        == (1e-3, 1e-4)


@pytest.mark.parametrize("repo_id", ["user/..", "../x", "user/-bad-", "user/a--b", "user/" + "a" * 97])
def test_a_bad_repo_id_is_refused_before_anything_runs(tmp_path: Path, repo_id: str):
    """No clock: the failing call must import neither papermill nor torch, and create no run folder."""
    code = ("import sys\nfrom vinakit.cli import main\n"
            f"rc = main(['run', 'export', '-f', {str(CPU_TINY)!r}, '-p', 'repo_id', {repo_id!r}, "
            f"'-p', 'push_to_hub', 'true', '-p', 'output_dir', {str(tmp_path)!r}])\n"
            "print(sorted(m for m in ('papermill', 'torch', 'transformers') if m in sys.modules))\nsys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, output_of(result)
    assert f"repo_id {repo_id!r} breaks the Hugging Face Hub's naming rules" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", "validation must not start papermill or torch"
    assert not any(tmp_path.iterdir()), "no run folder may be created for an invalid repo_id"


# --- data: a CSV saved by Excel ------------------------------------------------------------------------------------


def excel_csv(path: Path) -> Path:
    """Alpaca rows as Excel saves them: a BOM, CRLF after each row and inside cells broken with Alt+Enter."""
    rows = [("instruction", "output")]
    rows += [(f"Kể tên hai thành phố ở miền Bắc (lần {n}):\r\nviết mỗi tên một dòng.", "Hà Nội\r\nHải Phòng")
             for n in range(1, 5)]
    rows += [("Thủ đô của Việt Nam là gì?", "Hà Nội là thủ đô của Việt Nam.")] * 2
    lines = [",".join(f'"{cell}"' for cell in row) for row in rows]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


@pytest.mark.slow
def test_crlf_inside_csv_cells_reaches_sft_as_lf(tmp_path: Path):
    data = excel_csv(tmp_path / "tu_excel.csv")
    result = vinakit("run", "sft", "-f", str(CPU_TINY), "-p", "dataset", str(data), "-p", "val_size", "0",
                     "-p", "output_dir", str(tmp_path / "runs"), "-p", "run_name", "crlf", "-p", "preview_examples",
                     "2", "-p", "sample_prompts", "[]", "-p", "per_device_train_batch_size", "2", *SHORT)
    assert result.returncode == 0, output_of(result)
    run = tmp_path / "runs" / "crlf"
    report = json.loads((run / "manifest.json").read_text(encoding="utf-8"))["data"]["train"]
    assert report["text_normalization"]["line_endings"] == 8  # 4 rows x (instruction + output)
    preview = (run / "masking_preview.txt").read_text(encoding="utf-8")
    assert "Hà Nội\nHải Phòng" in preview and "\r" not in preview and "\\r" not in preview


# --- a CPT run is a model, not an adapter ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step CPT run of the tiny model (LoRA: it saves adapter/ and the merged model/)."""
    out = tmp_path_factory.mktemp("cpt")
    result = vinakit("run", "cpt", "-f", str(CPU_TINY), "-p", "output_dir", str(out), "-p", "run_name", "cpt-ngắn",
                     "-p", "stages", "[full]", "-p", "num_new_tokens", "0", "-p", "max_new_tokens", "4", *SHORT)
    assert result.returncode == 0, output_of(result)
    return out / "cpt-ngắn"


EVAL_SHORT = ("-p", "max_items", "2", "-p", "vmlu_max_items", "2", "-p", "max_new_tokens", "8",
              "-p", "key_agreement", "false", "-p", "show_examples", "1", "-p", "backend", "hf", "--no-progress")


@pytest.mark.slow
def test_a_cpt_run_as_adapter_is_refused_before_loading_with_the_right_hint(cpt_run: Path, tmp_path: Path):
    result = vinakit("run", "eval_mcq", "-f", str(CPU_TINY), "-p", "adapter", str(cpt_run), "-p", "output_dir",
                     str(tmp_path), "-p", "run_name", "as-adapter", *EVAL_SHORT)
    assert result.returncode == 2, output_of(result)
    assert f"adapter: {cpt_run} is a continued-pretraining (CPT) run" in result.stderr
    assert f"-p model_name {cpt_run.resolve() / 'model'}" in result.stderr
    assert "set model_name to the base" not in result.stderr  # the old, misleading hint after loading
    executed = json.loads((tmp_path / "as-adapter" / "eval_mcq.ipynb").read_text(encoding="utf-8"))
    failed = [cell for cell in executed["cells"] if cell["cell_type"] == "code"
              and any(output.get("output_type") == "error" for output in cell.get("outputs", []))]
    assert len(failed) == 1 and "find_trained_model" in "".join(failed[0]["source"])  # before any model loads


@pytest.mark.slow
def test_a_cpt_run_folder_is_accepted_as_model_name(cpt_run: Path, tmp_path: Path):
    result = vinakit("run", "eval_mcq", "-f", str(CPU_TINY), "-p", "model_name", str(cpt_run), "-p", "output_dir",
                     str(tmp_path), "-p", "run_name", "as-model", *EVAL_SHORT)
    assert result.returncode == 0, output_of(result)
    run = tmp_path / "as-model"
    assert yaml.safe_load((run / "params.yaml").read_text(encoding="utf-8"))["model_name"] == str(cpt_run)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics and json.loads((run / "manifest.json").read_text(encoding="utf-8"))["status"] == "completed"
