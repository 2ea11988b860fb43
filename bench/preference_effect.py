"""The measured effect of preference tuning on the MCQ defects the eval notebook counts, on tiny-vi (CPU).

SFT (params/cpu_tiny.yaml, the embedded MCQ set) -> ORPO (or DPO) on the embedded MCQ pairs (the SFT run's
validation contexts left out) -> eval_mcq of the SFT adapter and of the tuned adapter on the same held-out contexts
(the SFT run's validation rows). Printed per defect: the SFT model's rate vs the preference-tuned model's rate, plus
format validity and key agreement, with item counts. The settings are fixed before the run (the preset, for
``--steps`` steps, 60 by default: 1.3 epochs of the MCQ pairs); nothing is tuned on the result.

    .venv/bin/python bench/preference_effect.py [--method orpo|dpo] [--steps 60] [--output-dir DIR] [--sft RUN]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
from pathlib import Path

PRESET = Path(__file__).resolve().parent.parent / "params" / "cpu_tiny.yaml"
ENGLISH = re.compile(r"\b(?:Question|Answer)\s*:")
# defect of the rejected replies -> how eval_mcq's metrics show it on a generated MCQ
ROWS = (
    ("duplicate_options", "duplicate_option_rate", "valid items with two equal options"),
    ("key_in_question", "key_in_question_rate", "valid items whose stem holds the key's text"),
    ("wrong_key", "key_disagreement_rate", "valid items whose key the model itself does not pick"),
    ("missing_answer_line", "no_answer_rate", "items without an answer line"),
    ("catch_all_option", "catch_all_option_rate", "valid items with an all/none-of-the-above option"),
    ("english_answer", "english_rate", "items written with English labels (Question:/Answer:)"),
)


def main() -> int:
    """Run the three notebooks and the two evaluations, print the table; returns a process exit code."""
    from vinakit.cli import run_notebook
    from vinakit.pairs import SAMPLE_FILE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (4 pairs each)")
    parser.add_argument("--method", default="orpo", choices=("orpo", "dpo"))
    parser.add_argument("--output-dir", default="outputs/bench-preference")
    parser.add_argument("--sft", default="", help="an SFT run of this preset to reuse (default: run one)")
    args = parser.parse_args()
    out = ("output_dir", str(Path(args.output_dir).resolve()))
    mcq_pairs = Path(tempfile.mkdtemp()) / "mcq_pairs.jsonl"
    lines = SAMPLE_FILE.read_text(encoding="utf-8").splitlines()
    mcq_pairs.write_text("\n".join(line for line in lines if json.loads(line)["source"] == "mcq_tinhoc.csv") + "\n",
                         encoding="utf-8")
    sft = Path(args.sft).resolve() if args.sft else run_notebook("sft", [str(PRESET)], [out], progress_bar=False)
    orpo = run_notebook("preference", [str(PRESET)], [out, ("adapter", str(sft)), ("dataset", str(mcq_pairs)),
                                                       ("max_steps", str(args.steps)), ("method", args.method)],
                        progress_bar=False)
    evaluations = {}
    tuned = f"SFT+{args.method.upper()}"
    for label, adapter in (("SFT", sft), (tuned, orpo)):
        folder = run_notebook("eval_mcq", [str(PRESET)], [out, ("adapter", str(adapter)), ("compare_base", "false")],
                              progress_bar=False)
        evaluations[label] = figures(folder)
    training = json.loads((orpo / "metrics.json").read_text(encoding="utf-8"))
    print(f"\n{args.method.upper()}: {training['global_step']} steps, reward accuracy on training pairs "
          f"{training['rewards_accuracy_before']:.3f} -> {training['rewards_accuracy']:.3f}, validation pairs "
          f"{training.get('eval_rewards_accuracy', float('nan')):.3f}; runs in {Path(args.output_dir)}")
    print(table(evaluations, tuned))
    return 0


def figures(eval_dir: Path) -> dict[str, float | int]:
    """The fine-tuned model's rates from one eval_mcq run (metrics.json + predictions.csv)."""
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    tuned = metrics.get("fine-tuned", metrics)  # one model evaluated: its figures are at the top level
    with open(eval_dir / "predictions.csv", encoding="utf-8-sig", newline="") as handle:
        rows = [row for row in csv.DictReader(handle)]
    n = len(rows)
    agreement = tuned.get("key_agreement_rate")
    return {
        "n_items": n, "n_valid": sum(row["format_valid"] == "True" for row in rows),
        "format_valid_rate": tuned["format_valid_rate"], "format_strict_rate": tuned["format_strict_rate"],
        "key_agreement_rate": agreement,
        "key_disagreement_rate": None if agreement is None else round(1 - agreement, 4),
        "duplicate_option_rate": tuned.get("duplicate_option_rate"),
        "key_in_question_rate": tuned.get("key_in_question_rate"),
        "catch_all_option_rate": tuned.get("catch_all_option_rate"),
        "no_answer_rate": round(sum("no_answer" in row["error_codes"] for row in rows) / n, 4) if n else None,
        "english_rate": round(sum(bool(ENGLISH.search(row["raw_output"])) for row in rows) / n, 4) if n else None,
    }


def table(evaluations: dict[str, dict[str, float | int]], tuned: str) -> str:
    """A Markdown table: per defect the SFT and the preference-tuned rates, then validity and agreement."""
    sft, orpo = evaluations["SFT"], evaluations[tuned]
    lines = [f"held-out items: {sft['n_items']} (valid: SFT {sft['n_valid']}, {tuned} {orpo['n_valid']})", "",
             f"| defect in the rejected replies | measured as | SFT | {tuned} |", "|---|---|---|---|"]
    for defect, key, what in ROWS:
        lines.append(f"| {defect} | {what} | {_pct(sft[key])} | {_pct(orpo[key])} |")
    for key in ("format_valid_rate", "format_strict_rate", "key_agreement_rate"):
        lines.append(f"| (overall) | {key} | {_pct(sft[key])} | {_pct(orpo[key])} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{float(value):.0%}"


if __name__ == "__main__":
    sys.exit(main())
