"""`make gpu-check DRY_RUN=1`: the GPU check's own steps, run on tiny-vi on this CPU, so the script is proven."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path: Path) -> None:
    result = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1"], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = {row["step"]: row for row in json.loads(next(tmp_path.rglob("gpu_check.json")).read_text("utf-8"))}
    assert {"sft hf lora16", "sft hf qlora", "sft unsloth lora16", "sft unsloth qlora", "cpt unsloth +vocab",
            "eval_mcq batched vs one", "export + fidelity"} <= {name for name, row in rows.items()
                                                                 if row["status"] == "ok"}
    assert rows["sft on VINAKIT_DEVICE_PROFILE=t4"]["status"] == "skipped"
    assert all(row["figures"].get("tokens/s") for name, row in rows.items() if name.startswith("sft hf"))
    assert rows["export + fidelity"]["figures"]["passed"] is True
    assert "| sft hf lora16 | ok |" in result.stdout
