"""``make demo``: the whole pipeline on the embedded tiny model, on a CPU, in minutes.

Runs each notebook headless with ``params/cpu_tiny.yaml`` into ``outputs/`` and prints where the results are.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vinakit.cli import run_notebook
from vinakit.record import default_run_name

PRESET = Path(__file__).resolve().parent.parent / "params" / "cpu_tiny.yaml"


def main() -> int:
    """Run the demo pipeline; returns a process exit code."""
    stamp = default_run_name("demo")
    start = time.perf_counter()
    sft_dir = run_notebook("sft", [str(PRESET)], [("run_name", f"{stamp}-sft")])
    print(f"\nvinakit demo finished in {time.perf_counter() - start:.0f} s.")
    print(f"  SFT run: {sft_dir}  (adapter/, metrics.json, loss.png, samples.csv, sft.ipynb)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
