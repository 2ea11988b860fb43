"""Run folders: complete records, never overwritten, never holding a token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vinakit.errors import RunFolderExistsError
from vinakit.hub import HubError
from vinakit.params import SFTParams
from vinakit.record import RESERVED_MARKER, reserve_run_dir, start_run


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
    assert run.path.name.startswith("sft-") and len(run.path.name) == len("sft-20260101-120000")


def test_token_value_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sentinel = "hf_" + "SENTINEL" * 4  # built at run time: no token-shaped string is committed
    monkeypatch.setenv("HF_TOKEN", sentinel)
    run = start_run(SFTParams.validate({"output_dir": str(tmp_path), "run_name": "r"}))
    with pytest.raises(HubError, match="Hugging Face token"):
        run.log_metrics(note=f"token {sentinel}")
    assert sentinel not in "".join(p.read_text(encoding="utf-8") for p in run.path.iterdir() if p.is_file())
