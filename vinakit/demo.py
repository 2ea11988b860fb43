"""``make demo``: the whole pipeline on the embedded tiny model, on a CPU, in minutes.

Runs each notebook headless with ``params/cpu_tiny.yaml`` into ``outputs/`` and prints where the results are.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vinakit.cli import run_notebook
from vinakit.record import default_run_name
from vinakit.report import REPORT_FILE

PRESET = Path(__file__).resolve().parent.parent / "params" / "cpu_tiny.yaml"


def main() -> int:
    """Run the demo pipeline; returns a process exit code."""
    stamp = default_run_name("demo")
    start = time.perf_counter()
    cpt_dir = run_notebook("cpt", [str(PRESET)], [("run_name", f"{stamp}-cpt")])
    cpt_model = ("model_name", str(cpt_dir / "model"))  # SFT and its evaluation start from the CPT model
    sft_dir = run_notebook("sft", [str(PRESET)], [("run_name", f"{stamp}-sft"), cpt_model])
    # ORPO on the embedded preference pairs, continuing the SFT adapter (about 45 s on 2 CPU cores)
    preference_dir = run_notebook("preference", [str(PRESET)], [("run_name", f"{stamp}-preference"),
                                                                ("adapter", str(sft_dir)), cpt_model])
    eval_dir = run_notebook("eval_mcq", [str(PRESET)], [("run_name", f"{stamp}-eval"), ("adapter", str(sft_dir)),
                                                        cpt_model])
    export_dir = run_notebook("export", [str(PRESET)], [("run_name", f"{stamp}-export"),
                                                        ("adapter", str(sft_dir / "adapter")),
                                                        ("eval_run", str(eval_dir))])
    print(f"\nvinakit demo finished in {time.perf_counter() - start:.0f} s.")
    print(f"  CPT run: {cpt_dir}  (model/ -> SFT's model_name, stages/, metrics.json, loss.png, completions.csv)")
    print(_cpt_summary(cpt_dir))
    print(f"  SFT run: {sft_dir}  (adapter/, metrics.json, loss.png, samples.csv, sft.ipynb)")
    print(f"  Preference run: {preference_dir}  (ORPO on top of SFT: adapter/, rewards.png, metrics.json)")
    print(_preference_summary(preference_dir))
    print(f"  Eval run: {eval_dir}  (predictions.csv, comparison.csv, comparison.png, metrics.json)")
    print(_eval_comparison(eval_dir))
    print(f"  Export run: {export_dir}  (adapter/, merged_16bit/ with README.md, fidelity.csv, metrics.json)")
    print("  Reports (each run's executed notebook with its outputs and plots; open in any browser):")
    for folder in (cpt_dir, sft_dir, preference_dir, eval_dir, export_dir):
        print(f"    {folder / REPORT_FILE}")
    return 0


def _cpt_summary(cpt_dir: Path) -> str:
    """Fertility and validation perplexity before -> after continued pretraining."""
    import json

    metrics = json.loads((cpt_dir / "metrics.json").read_text(encoding="utf-8"))
    return (f"    fertility (tokens/syllable, validation) {metrics['fertility_before']} -> "
            f"{metrics['fertility_after']} with {metrics['new_tokens_added']} new tokens\n"
            f"    validation perplexity {metrics['perplexity_before']:.1f} -> {metrics['perplexity_after']:.1f} "
            f"(per syllable {metrics['syllable_perplexity_before']:.1f} -> {metrics['syllable_perplexity_after']:.1f})")


def _preference_summary(preference_dir: Path) -> str:
    """Reward accuracy and margin on the training pairs, before -> after preference tuning."""
    import json

    metrics = json.loads((preference_dir / "metrics.json").read_text(encoding="utf-8"))
    return (f"    reward accuracy (training pairs) {metrics['rewards_accuracy_before']:.2f} -> "
            f"{metrics['rewards_accuracy']:.2f}, margin {metrics['rewards_margin_before']:.4f} -> "
            f"{metrics['rewards_margin']:.4f}")


def _eval_comparison(eval_dir: Path) -> str:
    """The base-vs-fine-tuned lines of the eval run, for the demo's closing summary."""
    import csv

    with open(eval_dir / "comparison.csv", encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    shown = ("format_valid_rate", "format_strict_rate", "key_agreement_rate", "vmlu_accuracy", "vmlu_chance")
    lines = ["  MCQ evaluation, base -> fine-tuned (held-out rows of the SFT data; tiny model, so modest):"]
    for row in rows:
        if row["metric"] in shown:
            base, tuned = row.get("base") or "n/a", row.get("fine-tuned") or "n/a"
            lines.append(f"    {row['metric']:<22} {base:>8} -> {tuned:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
