"""How well do several processes scale? Training tokens/s of 1 process vs N ranks (``vinakit run --nproc N``).

    .venv/bin/python bench/ddp_scaling.py                       # CPU: tiny-vi, 1 vs 2 processes (gloo)
    .venv/bin/python bench/ddp_scaling.py --nproc 4 -f params/kaggle_2xt4.yaml --steps 30   # a multi-GPU box

Weak scaling, as data parallelism is used: every rank keeps the per-device batch of the 1-process run, so N ranks
train N times the rows per step. Both runs go through ``vinakit run`` (the notebook, as a user runs it) with the
same parameters; each rank's ``metrics.json`` holds its real (non-pad) tokens and its training time, and the
N-rank throughput is the sum of the ranks' tokens over the slowest rank's time. Printed: tokens/s of each, the
speed-up and the scaling efficiency (speed-up / N; 1.0 is perfect). On a CPU the ranks share the cores (set
``OMP_NUM_THREADS=1``): the efficiency says what the launcher and gloo cost, not what GPUs would gain.
Whole-run times include loading and the kernels' start; the figures here are the training loop's only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(notebook: str, yaml_files: list[str], out: Path, name: str, steps: int, batch: int, nproc: int,
         extra: list[str]) -> tuple[int, float, float]:
    """One ``vinakit run``; returns (real tokens of all ranks, slowest rank's training seconds, wall seconds)."""
    command = [sys.executable, "-m", "vinakit.cli", "run", notebook, "--no-progress", "-p", "output_dir", str(out),
               "-p", "run_name", name, "-p", "max_steps", str(steps), "-p", "per_device_train_batch_size", str(batch),
               "-p", "eval_steps", str(10 * steps), "-p", "save_steps", str(10 * steps), "-p", "max_new_tokens", "2",
               *extra]
    for path in yaml_files:
        command += ["-f", path]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    folders = [out / name, *sorted((out / name / "ranks").glob("rank-*[0-9]"))]
    metrics = [json.loads((folder / "metrics.json").read_text(encoding="utf-8")) for folder in folders]
    return sum(m["train_tokens_seen"] for m in metrics), max(m["train_runtime_s"] for m in metrics), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", default="sft")
    parser.add_argument("-f", "--file", dest="yaml_files", action="append", default=[])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (both runs)")
    parser.add_argument("-p", "--param", dest="params", action="append", nargs=2, default=[], metavar=("NAME", "V"))
    args = parser.parse_args()
    yaml_files = args.yaml_files or [str(REPO / "params" / "cpu_tiny.yaml")]
    extra = [item for pair in args.params for item in ("-p", *pair)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one = _run(args.notebook, yaml_files, out, "one", args.steps, args.batch, 1, extra)
        many = _run(args.notebook, yaml_files, out, "many", args.steps, args.batch, args.nproc, extra)
    rate_one, rate_many = one[0] / one[1], many[0] / many[1]
    speedup = rate_many / rate_one
    print(f"{args.notebook} {' '.join(Path(f).name for f in yaml_files)}: {args.steps} steps, per-device batch "
          f"{args.batch}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {os.cpu_count()} CPU cores")
    print(f"  1 process : {rate_one:9.1f} real tokens/s  ({one[0]} tokens in {one[1]:.1f} s; whole run {one[2]:.1f} s)")
    print(f"  {args.nproc} ranks   : {rate_many:9.1f} real tokens/s  ({many[0]} tokens in {many[1]:.1f} s; "
          f"whole run {many[2]:.1f} s)")
    print(f"  speed-up {speedup:.2f}x, scaling efficiency {speedup / args.nproc:.2f}")


if __name__ == "__main__":
    main()
