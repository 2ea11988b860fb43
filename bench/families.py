"""Seconds per SFT step and trainable parameters for the tiny model of every family, then export's fidelity check.

    .venv/bin/python bench/families.py                    # both backends, each in its own process
    .venv/bin/python bench/families.py --backend hf --steps 10

Per family (``tiny-<family>``, see :mod:`vinakit.families`) and backend it runs the SFT notebook's steps
in-process on the embedded chat data (LoRA r=16 on ``all-linear``, batch 4, max 256 tokens, ``--steps``
optimizer steps) and prints: the backend actually used (Unsloth does not patch MPT: the kit falls back to hf and
says why), trainable and total parameters, seconds per optimizer step (training time / steps, the first step's
warm-up included), the resolved LoRA target modules, and then the export notebook's merge + fidelity check on
that adapter (max |logit diff| merged vs adapter, passed or not). Each backend runs in its own process because
importing Unsloth patches transformers.
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vinakit.families import FAMILY_NAMES  # noqa: E402  (after the path is set; imports no torch)


def bench_family(family: str, backend: str, steps: int, root: Path) -> dict[str, Any]:
    """SFT ``steps`` steps then export with the fidelity check; the figures of one row."""
    from vinakit import export, sft
    from vinakit.params import ExportParams, SFTParams
    from vinakit.record import start_run

    params = SFTParams(model_name=f"tiny-{family}", backend=backend, load_in_4bit=False, max_seq_length=256,
                       output_dir=str(root), run_name=f"sft-{family}-{backend}", dataset="vinakit:chat", val_size=8,
                       rank=16, lora_alpha=16, use_rslora=False, learning_rate=1e-3, max_steps=steps,
                       per_device_train_batch_size=4, gradient_accumulation_steps=1, optim="adamw_torch",
                       logging_steps=1, eval_steps=10_000, save_steps=10_000, warmup_ratio=0.0, group_by_length=True)
    run = start_run(params)
    data = sft.load_data(params, run)
    start = time.perf_counter()
    model, tokenizer = sft.load_model(params, run)
    load_seconds = time.perf_counter() - start
    training = sft.train(params, model, tokenizer, sft.tokenize(params, tokenizer, data, run), run)
    manifest = run.read_json("manifest.json")
    del model
    exported = ExportParams(adapter=str(run.path), backend=params.backend, output_dir=str(root),
                            run_name=f"export-{family}-{backend}", save_methods=["lora", "merged_16bit"],
                            fidelity_rows=4, fidelity_max_tokens=128, max_logit_diff=0.01, max_kl=1e-4,
                            compare_naive_4bit=False)
    export_run = start_run(exported)
    source = export.load_source(exported, export_run)
    heldout = export.load_heldout(source, exported, export_run)
    kept = export.keep_adapter(source, heldout, exported, export_run)
    merged = export.merge_to_16bit(kept, exported, export_run)
    export.check_fidelity(kept, merged, heldout, exported, export_run)
    fidelity = export_run.read_json("metrics.json")
    return {"family": family, "asked": backend, "used": manifest["backend"],
            "trainable": manifest["trainable_parameters"]["trainable"],
            "total": manifest["trainable_parameters"]["total"],
            "load_s": round(load_seconds, 2), "s_per_step": round(training["train_runtime_s"] / steps, 3),
            "tokens_per_s": training.get("tokens_per_second"),
            "targets": ",".join(manifest["adapter_modules"]["target_modules"]),
            "fidelity_max_diff": fidelity["merge_max_abs_logit_diff"], "fidelity_passed": fidelity["fidelity_passed"]}


def _child(backend: str, steps: int, families: list[str]) -> None:
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as the kit does)
    with tempfile.TemporaryDirectory(prefix="vinakit-bench-families-") as folder:
        for family in families:
            print("ROW " + json.dumps(bench_family(family, backend, steps, Path(folder))), flush=True)


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("family", "asked", "used", "trainable", "total", "s/step", "tok/s", "fidelity diff", "passed",
              "LoRA targets")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print(f"| {row['family']} | {row['asked']} | {row['used']} | {row['trainable']:,} | {row['total']:,} | "
              f"{row['s_per_step']} | {row['tokens_per_s']} | {row['fidelity_max_diff']:.1e} | "
              f"{row['fidelity_passed']} | {row['targets']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hf", "unsloth", "both"], default="both")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--families", default=",".join(FAMILY_NAMES), help="comma-separated, default all")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    if args.child:
        _child(args.backend, args.steps, families)
        return
    rows: list[dict[str, Any]] = []
    for backend in (["hf", "unsloth"] if args.backend == "both" else [args.backend]):
        result = subprocess.run([sys.executable, __file__, "--child", "--backend", backend, "--steps", str(args.steps),
                                 "--families", ",".join(families)], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        rows += [json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith("ROW ")]
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-5000:], sep="\n", file=sys.stderr)
        for line in result.stdout.splitlines():
            if "instead of 'unsloth'" in line or line.startswith("vinakit: no LoRA"):
                print(line)
    _print_table(rows)


if __name__ == "__main__":
    main()
