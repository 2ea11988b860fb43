"""Merge fidelity: does a merged model behave like the adapter model it came from?

Measured on held-out examples (``{"input_ids", "labels"}``) against reference logits (the adapter, unmerged, on
the 16/32-bit base): max |logit diff| and mean per-token KL over every position, and perplexity on the trained
tokens. :func:`measure` loads each model inside its own call and only CPU results leave it, so at most one model
is alive at a time; :func:`fidelity_report` turns the rows into the table, the metrics and the threshold gate
that publishing re-checks on disk (``fidelity.json``).

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vinakit.device import free_memory, input_device
from vinakit.errors import VinakitError

FIDELITY_FILE = "fidelity.json"
MERGE_CHECK_TEXT = "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam."

REFERENCE = "adapter on 16/32-bit base (reference)"
EXPORTED = "merged 16-bit (exported)"
QLORA_4BIT = "adapter on 4-bit base (as QLoRA trains)"
NAIVE_4BIT = "naive merge into 4-bit (never exported)"
QUANTISED_4BIT = "model quantised to 4-bit (for comparison)"
# metrics.json prefixes of the comparison rows
_PREFIXES = {NAIVE_4BIT: "naive_4bit", QLORA_4BIT: "qlora_4bit", QUANTISED_4BIT: "naive_4bit"}

Examples = Sequence[Mapping[str, Sequence[int]]]
Loader = Callable[[], Any]
Evaluate = Callable[[Any, Any], Mapping[str, float]]


class FidelityError(VinakitError):
    """The merged model does not behave like the adapter model; nothing may be published."""


@dataclass
class Comparison:
    """One model against the reference: max |logit diff|, mean KL(reference || model) per token, perplexity."""

    max_abs_logit_diff: float
    mean_kl: float
    perplexity: float


@dataclass
class FidelityReport:
    """The fidelity check: one row per model compared with the adapter model, and whether the export passed.

    Attributes:
        table: DataFrame indexed by model: max_abs_logit_diff, mean_kl, perplexity, role.
        metrics: the flat metrics written to metrics.json (``merge_max_abs_logit_diff`` ...).
        checks: template and generation-config checks (name -> bool).
        passed: all thresholds met and all checks true.
        problems: what failed, in words.
    """

    table: Any
    metrics: dict[str, Any]
    checks: dict[str, bool]
    passed: bool
    problems: list[str] = field(default_factory=list)

    def _repr_html_(self) -> str:
        from vinakit.display import frame_html, html_table

        verdict = "passed" if self.passed else "failed: " + "; ".join(self.problems)
        return frame_html(self.table, f"Fidelity check {verdict}") + html_table(self.checks, "Checks")

    def __repr__(self) -> str:
        from vinakit.display import one_line

        return one_line("FidelityReport", passed=self.passed, problems=len(self.problems))


# --------------------------------------------------------------------------------------------------------------
# Logits, loss, perplexity
# --------------------------------------------------------------------------------------------------------------


def logits(model: Any, input_ids: Sequence[int]) -> Any:
    """The model's logits for one sequence, as a float32 CPU tensor ``[positions, vocab]``."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([list(input_ids)], device=input_device(model))
        return model(input_ids=ids, use_cache=False).logits[0].float().cpu()


def label_loss(all_logits: Any, labels: Sequence[int]) -> tuple[float, int]:
    """Summed next-token cross-entropy over the trained positions (labels != -100), and their count."""
    import torch

    targets = torch.tensor(list(labels[1:]))
    mask = targets != -100
    if not bool(mask.any()):
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(all_logits[:-1][mask], targets[mask], reduction="sum")
    return float(loss), int(mask.sum())


def perplexity(logits_per_example: Sequence[Any], examples: Examples) -> float:
    """Perplexity on the trained tokens of ``examples`` from their logits (NaN when nothing is trained)."""
    losses = [label_loss(values, example["labels"]) for values, example in zip(logits_per_example, examples)]
    return _perplexity(losses)


def _perplexity(losses: Sequence[tuple[float, int]]) -> float:
    total, count = sum(loss for loss, _ in losses), sum(tokens for _, tokens in losses)
    return math.exp(total / count) if count else float("nan")


def compare(model: Any, examples: Examples, reference: Sequence[Any]) -> Comparison:
    """Max |logit diff| and mean per-token KL(reference || model) over every position, and perplexity.

    The model's logits are compared one example at a time and dropped (a 128k vocabulary makes them large).
    """
    max_diff, kl_sum, positions, losses = 0.0, 0.0, 0, []
    for example, ref in zip(examples, reference):
        values = logits(model, example["input_ids"])
        max_diff = max(max_diff, float((values - ref).abs().max()))
        ref_logp, logp = ref.log_softmax(-1), values.log_softmax(-1)
        kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
        positions += ref.shape[0]
        losses.append(label_loss(values, example["labels"]))
    mean_kl = max(kl_sum / positions, 0.0) if positions else float("nan")
    return Comparison(max_diff, mean_kl, _perplexity(losses))


def text_logits(model: Any, tokenizer: Any, text: str = MERGE_CHECK_TEXT) -> Any:
    """Logits (CPU) of a model in eval mode on one text: compute them before loading a model to compare with."""
    from vinakit.generation import eval_mode

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with eval_mode(model):
        return logits(model, ids)


def max_logit_difference(model: Any, other: Any, tokenizer: Any, text: str = MERGE_CHECK_TEXT) -> float:
    """Largest absolute logit difference between two models on a Vietnamese sentence (merge fidelity)."""
    return float((text_logits(model, tokenizer, text) - text_logits(other, tokenizer, text)).abs().max())


def perplexity_hook(examples: Examples) -> Evaluate:
    """An ``evaluate`` hook for :func:`vinakit.merge.merge_adapters`: perplexity on the trained tokens."""

    def evaluate(model: Any, tokenizer: Any) -> dict[str, float]:
        losses = [label_loss(logits(model, e["input_ids"]), e["labels"]) for e in examples]
        return {"perplexity": _perplexity(losses)}

    return evaluate


def tokenize_examples(tokenizer: Any, rows: Sequence[Any], kind: str, max_tokens: int, train_on: str = "assistant"
                      ) -> list[dict[str, list[int]]]:
    """Held-out rows as ``{"input_ids", "labels"}`` examples, labelled as training labelled them.

    Args:
        tokenizer: the tokenizer with the training chat template.
        rows: chat rows (``{"messages"}``) for ``kind`` "chat", documents for "text".
        kind: "chat" or "text".
        max_tokens: longest example; chat rows keep their end (the trained answer), documents their start.
        train_on: the training run's ``train_on``.
    """
    if kind == "text":
        examples = []
        for document in rows:
            ids = tokenizer(document, add_special_tokens=True)["input_ids"][:max_tokens]
            if len(ids) > 1:
                examples.append({"input_ids": ids, "labels": list(ids)})
        return examples
    from vinakit.chat import tokenize_rows

    # Long rows keep their end: the response is what was trained, and both models see the same cut input.
    kept, _ = tokenize_rows(tokenizer, rows, None, train_on)
    return [{"input_ids": row["input_ids"][-max_tokens:], "labels": row["labels"][-max_tokens:]} for row in kept]


# --------------------------------------------------------------------------------------------------------------
# Measuring: one model alive at a time
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """How to load each model of the check; each loader returns a fresh model in eval mode.

    Attributes:
        reference: the adapter, unmerged, on the 16/32-bit base (or the full model).
        exported: the merged model reloaded from disk.
        four_bit: the adapter on the base loaded in 4-bit (or the full model in 4-bit); None: not measured.
        four_bit_is_adapter: ``four_bit`` carries an adapter, so its naive merge into 4-bit is measured too.
    """

    reference: Loader
    exported: Loader
    four_bit: Loader | None = None
    four_bit_is_adapter: bool = True


def measure(candidates: Candidates, examples: Examples) -> tuple[dict[str, Comparison], str]:
    """The comparison rows (reference first) and a note when the 4-bit rows could not be measured."""
    reference = _reference_logits(candidates.reference, examples)
    free_memory()
    rows = {REFERENCE: Comparison(0.0, 0.0, perplexity(reference, examples))}
    rows[EXPORTED] = _compared(candidates.exported, examples, reference)[0]
    free_memory()
    note = ""
    if candidates.four_bit is not None:
        try:
            measured = _compared(candidates.four_bit, examples, reference, then_merge=candidates.four_bit_is_adapter)
        except (ImportError, RuntimeError, ValueError, OSError) as error:
            note = f"naive 4-bit merge not measured: loading in 4-bit failed ({type(error).__name__}: {error})"
        else:
            names = [QLORA_4BIT, NAIVE_4BIT] if candidates.four_bit_is_adapter else [QUANTISED_4BIT]
            rows.update(zip(names, measured))
        free_memory()
    return rows, note


def _reference_logits(load: Loader, examples: Examples) -> list[Any]:
    model = load()
    return [logits(model, example["input_ids"]) for example in examples]


def _compared(load: Loader, examples: Examples, reference: Sequence[Any], *, then_merge: bool = False
              ) -> list[Comparison]:
    """The loaded model against the reference; with ``then_merge`` also after PEFT merges the adapter into the
    same (4-bit) weights, which re-quantises the sum: the naive merge this kit never exports."""
    model = load()
    rows = [compare(model, examples, reference)]
    if then_merge:
        model = model.merge_and_unload()
        rows.append(compare(model, examples, reference))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Template checks, the report and the gate
# --------------------------------------------------------------------------------------------------------------


def template_checks(original: Any, merged_dir: Path, rows: Sequence[Any], kind: str) -> dict[str, bool]:
    """The exported folder reproduces training's chat template, tokenisation and stop tokens.

    Args:
        original: the tokenizer saved with the adapter (the training template).
        merged_dir: the exported folder.
        rows: held-out rows; the first four are tokenised with both tokenizers.
        kind: "chat" or "text".

    Returns:
        ``chat_template_identical``, ``tokenized_example_identical`` (ids and labels equal) and
        ``generation_config_stops_at_end_of_turn``.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from vinakit.chat import end_of_turn_token

    exported = AutoTokenizer.from_pretrained(merged_dir)
    stops = GenerationConfig.from_pretrained(merged_dir).eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    end_of_turn = exported.convert_tokens_to_ids(end_of_turn_token(exported))
    return {
        "chat_template_identical": original.chat_template == exported.chat_template,
        "tokenized_example_identical": all(
            tokenize_examples(original, [row], kind, 10**9) == tokenize_examples(exported, [row], kind, 10**9)
            for row in rows[:4]),
        "generation_config_stops_at_end_of_turn": end_of_turn in stops,
    }


def fidelity_report(rows: Mapping[str, Comparison], checks: Mapping[str, bool], *, max_logit_diff: float,
                    max_kl: float, note: str = "") -> FidelityReport:
    """The table, the flat metrics and the gate: the exported row within both thresholds and every check true."""
    import pandas as pd

    table = pd.DataFrame({name: vars(row) for name, row in rows.items()}).T
    reference_ppl = rows[REFERENCE].perplexity
    table["perplexity_change_pct"] = (table["perplexity"] / reference_ppl - 1.0) * 100.0
    table["role"] = ["reference", "checked: exported", *["for comparison"] * (len(rows) - 2)]
    table.index.name = "model"
    exported = rows[EXPORTED]
    problems = []
    if not exported.max_abs_logit_diff <= max_logit_diff:
        problems.append(f"max |logit diff| {exported.max_abs_logit_diff:.3g} > max_logit_diff {max_logit_diff}")
    if not exported.mean_kl <= max_kl:
        problems.append(f"mean KL {exported.mean_kl:.3g} > max_kl {max_kl}")
    problems += [f"{name} is false" for name, ok in checks.items() if not ok]
    metrics: dict[str, Any] = {
        "merge_max_abs_logit_diff": exported.max_abs_logit_diff,
        "merge_mean_kl": exported.mean_kl,
        "merge_perplexity": exported.perplexity,
        "adapter_perplexity": reference_ppl,
        **_comparison_metrics(rows),
        **checks,
        "fidelity_max_logit_diff_threshold": max_logit_diff,
        "fidelity_max_kl_threshold": max_kl,
        "fidelity_passed": not problems,
    }
    if note:
        metrics["naive_4bit_note"] = note
    return FidelityReport(table, metrics, dict(checks), not problems, problems)


def _comparison_metrics(rows: Mapping[str, Comparison]) -> dict[str, float]:
    metrics = {}
    for name, row in rows.items():
        if name in _PREFIXES:
            prefix = _PREFIXES[name]
            metrics.update({f"{prefix}_max_abs_logit_diff": row.max_abs_logit_diff,
                            f"{prefix}_mean_kl": row.mean_kl, f"{prefix}_perplexity": row.perplexity})
    return metrics


def check_dtype(config_source: str | Path, saved_dtype: str) -> Any:
    """The dtype to compare in, as the device policy decides (:func:`vinakit.device.compare_dtype`) for a model of
    this size. Only one model is alive at a time (:func:`measure`)."""
    from transformers import AutoConfig

    from vinakit.device import compare_dtype

    config = AutoConfig.from_pretrained(config_source)
    hidden, layers = getattr(config, "hidden_size", 4096), getattr(config, "num_hidden_layers", 32)
    approx_params = 12 * hidden * hidden * layers + 2 * getattr(config, "vocab_size", 128000) * hidden
    return compare_dtype(approx_params, saved_dtype)


def record_fidelity(report: FidelityReport, run: Any, *, adapter_dir: Path, source_kind: str, merged_dir: Path
                    ) -> None:
    """Write metrics.json, fidelity.csv and ``fidelity.json``: the gate :func:`vinakit.publish.publish_run`
    re-checks on disk, with the fingerprint of exactly the weights that were checked."""
    from vinakit.record import write_json
    from vinakit.runs import folder_fingerprint

    run.log_metrics(**report.metrics)
    report.table.to_csv(run.path / "fidelity.csv", encoding="utf-8-sig")
    write_json(run.path / FIDELITY_FILE, {
        "passed": report.passed,
        "problems": report.problems,
        "metrics": report.metrics,
        "adapter_dir": str(adapter_dir),
        "source_kind": source_kind,
        "merged_dir": str(merged_dir),
        "merged_fingerprint": folder_fingerprint(merged_dir),
    })
    run.update_manifest(fidelity={"passed": report.passed, "problems": report.problems})
