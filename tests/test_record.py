"""Run folders: complete records, never overwritten, never holding a token."""

from __future__ import annotations

import datetime
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from vinakit import record
from vinakit.errors import RunFolderExistsError, VinakitError
from vinakit.hub import HubError
from vinakit.params import SFTParams
from vinakit.record import RESERVED_MARKER, mark_run, reserve_run_dir, start_run


def test_start_run_writes_params_and_manifest(tmp_path: Path):
    params = SFTParams.validate({"output_dir": str(tmp_path), "run_name": "chạy-thử", "rank": 8})
    run = start_run(params)
    assert run.path == (tmp_path / "chạy-thử").resolve()
    saved = yaml.safe_load((run.path / "params.yaml").read_text(encoding="utf-8"))
    assert saved["rank"] == 8 and saved["run_name"] == "chạy-thử"
    manifest = json.loads(run.manifest_path.read_text(encoding="utf-8"))
    assert manifest["notebook"] == "sft" and manifest["status"] == "running"
    assert manifest["versions"]["vinakit"] and manifest["python"]
    run.log_metrics(train_loss=1.5)
    run.log_metrics(eval_loss=1.7)
    assert run.read_json("metrics.json") == {"train_loss": 1.5, "eval_loss": 1.7}
    run.finish()
    assert run.read_json("manifest.json")["status"] == "completed"


def test_existing_run_is_never_overwritten(tmp_path: Path):
    params = SFTParams.validate({"output_dir": str(tmp_path), "run_name": "r"})
    start_run(params)
    (tmp_path / "r" / "metrics.json").write_text("{}", encoding="utf-8")
    with pytest.raises(RunFolderExistsError, match="never overwritten"):
        start_run(params)
    with pytest.raises(RunFolderExistsError):
        reserve_run_dir(tmp_path, "r")


def test_a_reserved_folder_is_taken_once(tmp_path: Path):
    folder = reserve_run_dir(tmp_path, "r")
    (folder / "sft.ipynb").write_text("{}", encoding="utf-8")  # papermill writes the notebook early
    run = start_run(SFTParams.validate({"output_dir": str(tmp_path), "run_name": "r"}))
    assert not (run.path / RESERVED_MARKER).exists()
    with pytest.raises(RunFolderExistsError):
        start_run(SFTParams.validate({"output_dir": str(tmp_path), "run_name": "r"}))


def test_default_run_name_is_timestamped(tmp_path: Path):
    run = start_run(SFTParams.validate({"output_dir": str(tmp_path)}))
    assert re.fullmatch(r"sft-\d{8}-\d{6}-\d{3}", run.path.name), "sft-YYYYmmdd-HHMMSS-mmm"
    assert run.read_json("manifest.json")["pid"] == os.getpid()


class _FrozenClock:
    """datetime with a now() that never moves: every default name asks for the same millisecond."""

    timedelta = datetime.timedelta

    class datetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0, 5000)


def test_default_names_taken_in_the_same_millisecond_move_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(record, "_dt", _FrozenClock)
    with ThreadPoolExecutor(8) as pool:  # reserved at once: each mkdir is atomic, a taken name is never shared
        folders = list(pool.map(lambda _: reserve_run_dir(tmp_path, notebook="sft"), range(8)))
    started = start_run(SFTParams.validate({"output_dir": str(tmp_path)})).path  # the kernel side, by hand
    names = sorted(folder.name for folder in [*folders, started])
    assert len(set(names)) == 9 and names[0] == "sft-20260101-120000-005" and names[-1] == "sft-20260101-120000-013"


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    for output_dir in (blocker, blocker / "below"):
        with pytest.raises(VinakitError, match="Cannot create the run folder"):
            reserve_run_dir(output_dir, notebook="sft")


def test_how_a_run_ended_is_recorded_once(tmp_path: Path):
    run = start_run(SFTParams.validate({"output_dir": str(tmp_path), "run_name": "r"}))
    mark_run(run.path, "upload_failed")
    mark_run(run.path, "failed", error={"type": "HubNetworkError", "message": "dropped", "cell": 9})
    manifest = run.read_json("manifest.json")
    assert manifest["status"] == "upload_failed" and manifest["error"]["cell"] == 9 and manifest["finished_at"]
    run.finish()  # a retried upload, or a cell fixed by hand: completed, and the old error goes
    mark_run(run.path, "interrupted")
    manifest = run.read_json("manifest.json")
    assert manifest["status"] == "completed" and "error" not in manifest


def test_token_value_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sentinel = "hf_" + "SENTINEL" * 4  # built at run time: no token-shaped string is committed
    monkeypatch.setenv("HF_TOKEN", sentinel)
    run = start_run(SFTParams.validate({"output_dir": str(tmp_path), "run_name": "r"}))
    with pytest.raises(HubError, match="Hugging Face token"):
        run.log_metrics(note=f"token {sentinel}")
    assert sentinel not in "".join(p.read_text(encoding="utf-8") for p in run.path.iterdir() if p.is_file())


def test_a_cell_that_raises_in_a_notebook_marks_the_run(tmp_path: Path):
    """The kernel-side hook: a notebook run by hand records its own failure (vinakit run records it from outside)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.run_cell("from vinakit.params import SFTParams\nfrom vinakit.record import start_run\n"
                       f"run = start_run(SFTParams.validate({{'output_dir': {str(tmp_path)!r}, 'run_name': 'r'}}))")
        failed = shell.run_cell("raise ValueError('Hỏng ở đây\\nchi tiết')")
        manifest = json.loads((tmp_path / "r" / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["status"] == "failed" and manifest["finished_at"]
        assert manifest["error"] == {"type": "ValueError", "message": "Hỏng ở đây", "cell": failed.execution_count}
        shell.run_cell("raise KeyboardInterrupt")
        assert json.loads((tmp_path / "r" / "manifest.json").read_text("utf-8"))["status"] == "interrupted"
        shell.run_cell("run.finish()")
        assert json.loads((tmp_path / "r" / "manifest.json").read_text("utf-8"))["status"] == "completed"
    finally:
        InteractiveShell.clear_instance()
