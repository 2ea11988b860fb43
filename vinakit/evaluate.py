"""The steps of ``notebooks/eval_mcq.ipynb``: MCQ generation and VMLU-style answering, base vs fine-tuned.

For each model (the base model, then the fine-tuned adapter on top of it) the evaluation

1. generates one MCQ per context, batched, with the exact chat template and prompt of training
   (:func:`vinakit.data.mcq_user_prompt`), and scores every item (:mod:`vinakit.mcq`);
2. checks the declared keys: the model itself (or ``judge_model``) answers each valid generated MCQ by letter
   log-probabilities, with and without the context;
3. answers a VMLU-format multiple-choice set by letter log-probabilities (accuracy overall and per subject), to
   see that general Vietnamese knowledge did not drop after fine-tuning.

The run folder gets ``predictions.csv`` (UTF-8 with BOM, opens in Excel), ``predictions_base.csv``,
``vmlu_predictions*.csv``, ``comparison.csv``, ``metrics.json`` and the plots.

Which items: with an SFT run as ``adapter`` that trained on the same dataset, only the rows that run held out
for validation are evaluated (``holdout``), so the fine-tuned model is not scored on questions it was trained to
write; contexts can still recur in training with other questions, and the items say so
(``context_seen_in_training``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vinakit import display
from vinakit.device import free_memory
from vinakit.errors import DataError, ParamsError, VinakitError
from vinakit.data import MCQ_LETTERS as LETTERS
from vinakit.params import EvalMCQParams, SFTParams
from vinakit.record import Metrics, Run
from vinakit.sources import CHAT_SUFFIXES, BadRow, read_rows
from vinakit.text import is_blank
from vinakit.vmlu import VmluItems, answer_vmlu, mcq_block, pick_letters, read_vmlu

TRUNCATION_MARK = " […] "
_LINE = "__vinakit_line__"

# Scoring prompts: the reply starts with "Đáp án:" and the letter comes next, as in the training format.
_KEY_CHECK_WITH_CONTEXT = "Đọc đoạn văn sau và trả lời câu hỏi trắc nghiệm.\n\nĐoạn văn: {context}\n\n{mcq}"
_KEY_CHECK_WITHOUT_CONTEXT = "Trả lời câu hỏi trắc nghiệm sau.\n\n{mcq}"

# Headline metrics first: the model card of the export notebook lists the first few.
_HEADLINE = ("format_valid_rate", "format_strict_rate", "key_agreement_rate", "guessable_without_context_rate",
             "vmlu_accuracy", "question_grounding_mean", "key_grounding_mean", "distinct_2")
COMPARED_METRICS = ("format_valid_rate", "format_strict_rate", "key_agreement_rate",
                    "guessable_without_context_rate", "question_grounding_mean", "key_grounding_mean",
                    "duplicate_option_rate", "key_in_question_rate", "distinct_1", "distinct_2",
                    "repeated_question_rate", "answer_letter_max_share", "hit_token_budget_rate", "rouge_l_mean",
                    "bleu", "chrf", "vmlu_accuracy", "vmlu_chance")
PLOTTED_METRICS = ("format_valid_rate", "format_strict_rate", "key_agreement_rate", "question_grounding_mean",
                   "key_grounding_mean", "distinct_2", "vmlu_accuracy")


# --------------------------------------------------------------------------------------------------------------
# The fine-tuned model
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """The fine-tuned model named by ``adapter``, or a null object when there is none.

    Attributes:
        weights_dir: the adapter folder (or a fully fine-tuned model folder); None when no adapter is given.
        run_dir: the SFT run folder it came from, when known.
        base_model: the base model it was trained on (as the SFT run named it).
        chat_template: the exact chat template saved with it ("" when unknown).
        sft_params: the SFT run's resolved parameters (empty when unknown).
    """

    weights_dir: Path | None = None
    run_dir: Path | None = None
    base_model: str = ""
    chat_template: str = ""
    sft_params: dict[str, Any] = field(default_factory=dict)

    @property
    def present(self) -> bool:
        """Whether there is a fine-tuned model to evaluate."""
        return self.weights_dir is not None

    @property
    def name(self) -> str:
        """A short label: the SFT run's name, else the folder's."""
        if self.run_dir is not None:
            return self.run_dir.name
        return self.weights_dir.name if self.weights_dir else ""


def find_trained_model(params: EvalMCQParams) -> TrainedModel:
    """Resolve ``params.adapter`` (see :func:`vinakit.runs.find_run`) and check it fits ``model_name``.

    Returns:
        The fine-tuned model, or ``TrainedModel()`` (nothing to compare) when ``adapter`` is empty.

    Raises:
        VinakitError: the folder holds no adapter, the adapter was trained on another base model, or it is a CPT
            run (whose model is passed as ``model_name``).
    """
    if not params.adapter:
        return TrainedModel()
    from vinakit.runs import find_run, refuse_cpt_run

    trained = find_run(params.adapter, params.output_dir)
    refuse_cpt_run(trained, params.adapter)  # before any model loads: a CPT model is evaluated as model_name
    _check_same_base(params.model_name, trained.model_name, trained.weights_dir)
    return TrainedModel(weights_dir=trained.weights_dir, run_dir=trained.run_dir, base_model=trained.model_name,
                        chat_template=trained.chat_template, sft_params=dict(trained.sft_params))


def _check_same_base(model_name: str, base: str, weights_dir: Path) -> None:
    """An adapter only works on the base model it was trained on: say so before loading anything."""
    from vinakit.runs import same_model

    if base and not same_model(model_name, base):
        raise VinakitError(
            f"The adapter in {weights_dir} was trained on base model {base!r}, but model_name is {model_name!r}. "
            f"An adapter only fits the base model it was trained on: set model_name to {base!r} "
            f"(e.g. -p model_name {base}) or give an adapter trained on {model_name!r}.")


# --------------------------------------------------------------------------------------------------------------
# Items: contexts (with gold MCQs when the data has them)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalItems:
    """The contexts to write MCQs about.

    Attributes:
        table: one row per item: ``item``, ``source_line``, ``context``, ``reference_question``,
            ``reference_a``..``reference_d``, ``reference_answer`` ("" without gold) and
            ``context_seen_in_training`` (None when unknown).
        note: which rows were chosen and why (held out from training or not).
        report: the data report of the source (also in the run manifest).
    """

    table: Any
    note: str
    report: Any

    def __len__(self) -> int:
        return len(self.table)


def load_items(params: EvalMCQParams, run: Run, trained: TrainedModel) -> EvalItems:
    """Read the contexts, keep the rows held out from the SFT run when possible, and record the choice.

    Raises:
        DataError: no context column, an empty context (unless ``skip_bad_rows``), or no usable rows.
    """
    import pandas as pd

    rows, report = _read_context_rows(params)
    rows, note = _select_rows(rows, params, trained)
    if params.max_items and len(rows) > params.max_items:
        rows = rows[:params.max_items]
        note += f"; the first {params.max_items} kept (max_items)"
    table = pd.DataFrame([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows])
    table.insert(0, "item", range(1, len(table) + 1))
    run.add_data_report("eval_items", report)
    run.update_manifest(eval_items={"count": len(table), "note": note})
    return EvalItems(table=table, note=note, report=report)


def _read_context_rows(params: EvalMCQParams) -> tuple[list[dict[str, Any]], Any]:
    from vinakit import data

    def to_item(row: Any, line: int, cells_are_text: bool) -> tuple[dict[str, Any], str]:
        item = _context_item(_with_line(row, line), params, data)
        return item, "mcq" if item["reference_question"] else "context"

    rows, report, label = read_rows(params.dataset, to_item, suffixes=(*CHAT_SUFFIXES, ".txt"),
                                         skip_bad_rows=params.skip_bad_rows, normalize=params.normalize_text,
                                         tone_style=params.tone_style)
    report.train_rows = len(rows)
    if not rows:
        raise DataError(f"no usable contexts: all {report.rows_read} rows were skipped "
                        f"({dict(report.skip_reasons)})", path=label)
    return rows, report


def _with_line(row: Any, number: int) -> Any:
    """The row with its line number inside (a text file's paragraph becomes a context row)."""
    if isinstance(row, str):
        return {"context": row, _LINE: number}
    return {**row, _LINE: number} if isinstance(row, dict) else row


def _context_item(row: Any, params: EvalMCQParams, data: Any) -> dict[str, Any]:
    """One source row as an item, with its gold MCQ when it has one."""
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"a row must be an object with a context, got {type(row).__name__}")
    row = dict(row)
    line = row.pop(_LINE, None)
    field_name = _context_field(row, params.context_field, data)
    context = row.get(field_name)
    if not isinstance(context, str) or is_blank(context):  # invisible characters alone are no passage either
        raise BadRow("empty_context", f"empty context in column {field_name!r} (or only invisible characters); "
                                      f"give a passage or remove the row", field_name)
    gold = _gold_mcq(row, field_name, data)
    clean = _normalizer(params)
    item = {
        "context": clean(context.strip()),
        "reference_question": clean(gold["question"]) if gold else "",
        **{f"reference_{letter.lower()}": clean(gold["options"][letter]) if gold else "" for letter in LETTERS},
        "reference_answer": gold["answer"] if gold else "",
        "context_seen_in_training": None,
        "source_line": line,
        "_raw_context": context,
        "_raw_gold": gold,
    }
    return item


def _context_field(row: dict[str, Any], wanted: str, data: Any) -> str:
    if wanted:
        if wanted not in row:
            raise BadRow("missing_field", f"no column {wanted!r} (context_field); the row has columns "
                                                f"{sorted(row)}", wanted)
        return wanted
    found = next((name for name in data.MCQ_CONTEXT_FIELDS if name in row), None)
    if found is None:
        raise BadRow("missing_field", f"no context column: expected 'context' or 'para' (or set "
                                            f"context_field to the column holding the passages); the row has "
                                            f"columns {sorted(row)}", "context")
    return found


def _gold_mcq(row: dict[str, Any], context_field: str, data: Any) -> dict[str, Any] | None:
    """The reference MCQ of a row (read as training reads MCQ rows), or None when the row has no complete one."""
    try:
        mcq = data.read_mcq_row(row, context_field)
    except BadRow:
        return None  # a passage without a complete reference MCQ is still an item to write a question about
    return {"question": mcq.question, "options": mcq.options, "answer": mcq.answer}


def _normalizer(params: EvalMCQParams) -> Any:
    from vinakit.text import normalize_vietnamese

    if not params.normalize_text:
        return lambda text: text
    return lambda text: normalize_vietnamese(text, params.tone_style)


def _select_rows(rows: list[dict[str, Any]], params: EvalMCQParams,
                 trained: TrainedModel) -> tuple[list[dict[str, Any]], str]:
    """Keep the SFT run's validation rows when the adapter trained on this dataset; say what was done."""
    total = f"{len(rows)} rows of {params.dataset}"
    if not trained.present:
        return rows, f"all {total} (no fine-tuned model, nothing to hold out)"
    if not trained.sft_params:
        return rows, f"all {total}: not checked against training (the adapter has no SFT run folder with params.yaml)"
    sft = _training_params(trained)
    if not _same_source(sft.dataset, params.dataset):
        return rows, f"all {total}: SFT run {trained.name} trained on another dataset ({sft.dataset})"
    if not params.holdout:
        return rows, f"all {total}, including rows SFT run {trained.name} trained on (holdout is off)"
    split = _sft_split(sft)
    if split is None:
        return rows, (f"all {total}, including training rows: SFT run {trained.name} kept no validation split of "
                      f"this dataset (val_size 0 or a separate val_dataset)")
    validation, training_prompts = split
    kept = []
    for row in rows:
        prompt, reply = _sft_message_texts(row, sft)
        if (prompt, reply) in validation:
            row["context_seen_in_training"] = prompt in training_prompts
            kept.append(row)
    if not kept:
        raise DataError(f"none of the {len(rows)} rows matches the validation rows of SFT run {trained.name}; set "
                        f"holdout: false to evaluate on all rows", path=params.dataset)
    seen = sum(bool(row["context_seen_in_training"]) for row in kept)
    return kept, (f"held out: the {len(kept)} of {total} that SFT run {trained.name} kept for validation "
                  f"(val_size={sft.val_size}, seed={sft.seed}); {seen} of them share their context "
                  f"with a training row (another question about the same passage)")


def _same_source(first: str, second: str) -> bool:
    if first == second:
        return True
    a, b = Path(first).expanduser(), Path(second).expanduser()
    return a.is_file() and b.is_file() and a.resolve() == b.resolve()


def _training_params(trained: TrainedModel) -> SFTParams:
    """The SFT run's parameters as training validated them (defaults included: no guessed values here)."""
    from vinakit.runs import PARAMS_FILE, run_params

    return run_params(trained.sft_params, SFTParams, str((trained.run_dir or trained.weights_dir) / PARAMS_FILE))


def _sft_split(sft: SFTParams) -> tuple[set[tuple[str, str]], set[str]] | None:
    """The SFT run's validation (prompt, reply) pairs and training prompts, rebuilt exactly as it split them."""
    from vinakit.runs import load_sft_data

    if sft.val_dataset or not sft.val_size:
        return None
    data = load_sft_data(sft)
    texts = lambda row: (row["messages"][0]["content"], row["messages"][-1]["content"])  # noqa: E731
    return {texts(row) for row in data.validation}, {texts(row)[0] for row in data.train}


def _sft_message_texts(row: dict[str, Any], sft: SFTParams) -> tuple[str, str]:
    """The user and assistant texts the SFT data loader made of this row (same normalisation as that run)."""
    from vinakit.data import format_mcq, mcq_user_prompt
    from vinakit.text import normalize_vietnamese

    gold = row["_raw_gold"]
    prompt = mcq_user_prompt(row["_raw_context"])
    reply = format_mcq(gold["question"], gold["options"], gold["answer"]) if gold else ""
    if sft.normalize_text:
        prompt, reply = normalize_vietnamese(prompt, sft.tone_style), normalize_vietnamese(reply, sft.tone_style)
    return prompt, reply


def load_vmlu(params: EvalMCQParams, run: Run) -> VmluItems:
    """Read the VMLU-format set (:func:`vinakit.vmlu.read_vmlu`); an empty ``vmlu_dataset`` skips this part.

    Raises:
        DataError: a row without question, choices or key (unless ``skip_bad_rows``), or no usable rows.
    """
    vmlu, report = read_vmlu(params.vmlu_dataset, _normalizer(params), max_items=params.vmlu_max_items,
                             skip_bad_rows=params.skip_bad_rows, normalize=params.normalize_text,
                             tone_style=params.tone_style)
    if report is not None:
        run.add_data_report("vmlu", report)
    return vmlu


# --------------------------------------------------------------------------------------------------------------
# Evaluating models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelResult:
    """Everything measured for one model.

    Attributes:
        label: "base" or "fine-tuned".
        model: what was loaded (base model name, or the adapter folder).
        predictions: per-item table (the CSV's columns).
        summary: aggregates (also in metrics.json).
        vmlu: per-question table of the answering evaluation (empty when skipped).
        vmlu_subjects: accuracy per subject.
    """

    label: str
    model: str
    predictions: Any
    summary: dict[str, Any]
    vmlu: Any
    vmlu_subjects: Any
    _repr_html_, __repr__ = display.model_result_html, display.model_result_repr


@dataclass
class Evaluation:
    """The results of every evaluated model, base first, and what was written to the run folder."""

    results: list[ModelResult]
    note: str
    metrics: Metrics
    _repr_html_, __repr__ = display.evaluation_html, display.evaluation_repr

    @property
    def primary(self) -> ModelResult:
        """The fine-tuned model when there is one, else the base model."""
        return self.results[-1]

    def comparison(self) -> Any:
        """Metrics side by side, one column per model (plus the change when there are two)."""
        return comparison_table(self.results)

    def vmlu_subjects(self) -> Any:
        """VMLU accuracy per subject, one column per model."""
        import pandas as pd

        tables = [r.vmlu_subjects.set_index("subject")["accuracy"].rename(r.label) for r in self.results
                  if len(r.vmlu_subjects)]
        if not tables:
            return pd.DataFrame()
        counts = self.results[-1].vmlu_subjects.set_index("subject")["n"]
        return pd.concat([counts, *tables], axis=1).reset_index()

    def examples(self, n: int) -> Any:
        """The first ``n`` items: context and each model's raw output and validity."""
        import pandas as pd

        first = self.results[0].predictions.head(n)
        table = pd.DataFrame({"context": first["context"].str.slice(0, 160)})
        for result in self.results:
            head = result.predictions.head(n)
            table[f"{result.label}: output"] = head["raw_output"].values
            table[f"{result.label}: valid"] = head["format_valid"].values
        return table


def evaluate_models(params: EvalMCQParams, run: Run, items: EvalItems, vmlu: VmluItems,
                    trained: TrainedModel) -> Evaluation:
    """Evaluate the base model (when asked, or when there is no adapter) and the fine-tuned model, one after
    the other (each is freed before the next loads), and write predictions, comparison and metrics."""
    from vinakit.plan import check_before_loading

    check_before_loading(params, run)  # records the estimate, warns if it will not fit
    judge = _load_judge(params)
    results = []
    for label in _labels(params, trained):
        start = time.perf_counter()
        model, tokenizer = _load(label, params, trained)
        result = evaluate_model(label, model, tokenizer, params, items, vmlu, judge=judge,
                                source=str(trained.weights_dir) if label == "fine-tuned" else params.model_name)
        result.summary["seconds"] = round(time.perf_counter() - start, 1)
        results.append(result)
        del model  # this loop holds the only reference: the next model loads into freed memory
        free_memory()
    evaluation = Evaluation(results=results, note=items.note, metrics=Metrics())
    evaluation.metrics = write_results(run, evaluation)
    return evaluation


def _labels(params: EvalMCQParams, trained: TrainedModel) -> list[str]:
    if not trained.present:
        return ["base"]
    return ["base", "fine-tuned"] if params.compare_base else ["fine-tuned"]


def _load(label: str, params: EvalMCQParams, trained: TrainedModel) -> tuple[Any, Any]:
    """Load a model for inference with the training chat template (the base model borrows the adapter's)."""
    from vinakit.chat import use_chat_template
    from vinakit.model import load_for_inference, set_trust_remote_code

    set_trust_remote_code(params.trust_remote_code)
    source = str(trained.weights_dir) if label == "fine-tuned" else params.model_name
    try:
        model, tokenizer = load_for_inference(source, backend=params.backend, max_seq_length=params.max_seq_length,
                                              load_in_4bit=params.load_in_4bit, seed=params.seed)
    except VinakitError:
        raise
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        raise VinakitError(f"Could not load the {label} model from {source}: {error}. If this is an adapter "
                           f"trained on another base model or vocabulary, set model_name to the base it was "
                           f"trained on.") from error
    if label == "base" and trained.chat_template:
        tokenizer.chat_template = trained.chat_template  # the base model sees the fine-tuned model's prompts
    elif label == "base" or not getattr(tokenizer, "chat_template", None):
        tokenizer = use_chat_template(tokenizer, params.chat_template or None)
    return model, tokenizer


def _load_judge(params: EvalMCQParams) -> tuple[Any, Any] | None:
    if not (params.key_agreement and params.judge_model):
        return None
    from vinakit.chat import use_chat_template
    from vinakit.model import load_for_inference

    model, tokenizer = load_for_inference(params.judge_model, backend=params.backend,
                                          max_seq_length=params.max_seq_length, load_in_4bit=params.load_in_4bit,
                                          seed=params.seed)
    return model, use_chat_template(tokenizer, params.chat_template or None)


def evaluate_model(label: str, model: Any, tokenizer: Any, params: EvalMCQParams, items: EvalItems,
                   vmlu: VmluItems, *, judge: tuple[Any, Any] | None = None, source: str = "") -> ModelResult:
    """Generate, parse and score the MCQs of one loaded model, check the keys, and answer the VMLU set.

    Args:
        label: "base" or "fine-tuned" (column and table labels).
        model: the loaded model (eval mode).
        tokenizer: its tokenizer, carrying the training chat template.
        params: the notebook's parameters.
        items: the contexts.
        vmlu: the answering set (may be empty).
        judge: another (model, tokenizer) to check the keys with; None = the model itself.
        source: what was loaded, for the tables.
    """
    from vinakit.generation import generate_chat
    from vinakit.mcq import aggregate, item_metrics, parse_mcq

    prompts, truncated = generation_prompts(tokenizer, items.table["context"].tolist(), params)
    outputs = generate_chat(model, tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                            batch_size=params.batch_size, do_sample=params.do_sample,
                            temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                            max_prompt_tokens=params.max_seq_length - params.max_new_tokens, progress=True)
    parsed = [parse_mcq(output) for output in outputs]
    references = items.table["reference_question"].tolist()
    rows = [item_metrics(p, context, reference, params.near_duplicate_threshold)
            for p, context, reference in zip(parsed, items.table["context"], references)]
    table = _predictions_table(items, outputs, rows, truncated, tokenizer, params)
    if params.key_agreement:
        judge_model, judge_tokenizer = judge or (model, tokenizer)
        _add_key_agreement(table, judge_model, judge_tokenizer, params)
    summary = aggregate(rows, references)
    summary.update(_extra_rates(table))
    vmlu_table, subjects, vmlu_summary = answer_vmlu(model, tokenizer, vmlu, **_scoring(params))
    summary.update(vmlu_summary)
    return ModelResult(label=label, model=source, predictions=table, summary=_ordered(summary), vmlu=vmlu_table,
                       vmlu_subjects=subjects)


def generation_prompts(tokenizer: Any, contexts: Sequence[str], params: EvalMCQParams) -> tuple[list[str], list[bool]]:
    """The SFT prompt of each context; contexts too long for the window are cut in the middle (and flagged).

    Raises:
        ParamsError: max_seq_length leaves no room for a context after the instruction and max_new_tokens.
    """
    from vinakit.chat import render_prompt
    from vinakit.data import mcq_user_prompt

    overhead = len(tokenizer(render_prompt(tokenizer, [{"role": "user", "content": mcq_user_prompt("x")}]),
                             add_special_tokens=False)["input_ids"])
    budget = params.max_seq_length - params.max_new_tokens - overhead - 8
    if budget < 16:
        raise ParamsError(f"max_seq_length {params.max_seq_length} leaves no room for a context after the "
                          f"instruction ({overhead} tokens) and max_new_tokens {params.max_new_tokens}: raise "
                          f"max_seq_length or lower max_new_tokens.")
    fitted = [fit_to_tokens(tokenizer, context, budget) for context in contexts]
    return [mcq_user_prompt(text) for text, _ in fitted], [cut for _, cut in fitted]


def fit_to_tokens(tokenizer: Any, text: str, budget: int) -> tuple[str, bool]:
    """Cut ``text`` in the middle to at most about ``budget`` tokens (start and end kept, ``[…]`` between).

    Returns:
        ``(text, whether it was cut)``.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text, False
    head = budget // 2
    tail = budget - head
    return (tokenizer.decode(ids[:head]).rstrip() + TRUNCATION_MARK + tokenizer.decode(ids[-tail:]).lstrip()), True


def _predictions_table(items: EvalItems, outputs: list[str], rows: list[dict[str, Any]], truncated: list[bool],
                       tokenizer: Any, params: EvalMCQParams) -> Any:
    import pandas as pd

    metrics = pd.DataFrame(rows)
    base = items.table[["item", "source_line", "context"]].reset_index(drop=True)
    table = pd.concat([base, pd.DataFrame({"raw_output": outputs}), metrics], axis=1)
    table["context_truncated"] = truncated
    # A reply as long as the budget was most likely cut off by it.
    table["hit_token_budget"] = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) >= params.max_new_tokens - 1
                                 for o in outputs]
    table["context_seen_in_training"] = items.table["context_seen_in_training"].values
    for name in ("reference_question", "reference_answer"):
        table[name] = items.table[name].values
    return table


def _add_key_agreement(table: Any, model: Any, tokenizer: Any, params: EvalMCQParams) -> None:
    """Answer each valid generated MCQ by letter log-probabilities, with and without its context."""
    valid = table.index[table["format_valid"]].tolist()
    blocks = [mcq_block(table.at[i, "question"], [table.at[i, f"option_{l.lower()}"] for l in LETTERS])
              for i in valid]
    budget = params.max_seq_length - 16
    with_context = [_KEY_CHECK_WITH_CONTEXT.format(
        context=fit_to_tokens(tokenizer, table.at[i, "context"], max(16, budget - _token_count(tokenizer, b)))[0],
        mcq=b) for i, b in zip(valid, blocks)]
    without_context = [_KEY_CHECK_WITHOUT_CONTEXT.format(mcq=b) for b in blocks]
    fours = [len(LETTERS)] * len(valid)
    answered = pick_letters(model, tokenizer, with_context, fours, **_scoring(params))
    guessed = pick_letters(model, tokenizer, without_context, fours, **_scoring(params))
    table["judge_answer"], table["key_agrees"] = "", None
    table["judge_answer_without_context"], table["guessable_without_context"] = "", None
    for i, with_letter, without_letter in zip(valid, answered, guessed):
        key = table.at[i, "answer"]
        table.at[i, "judge_answer"], table.at[i, "key_agrees"] = with_letter, with_letter == key
        table.at[i, "judge_answer_without_context"] = without_letter
        table.at[i, "guessable_without_context"] = without_letter == key


def _scoring(params: EvalMCQParams) -> dict[str, int]:
    return {"batch_size": params.batch_size, "max_prompt_tokens": params.max_seq_length - 8}


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _extra_rates(table: Any) -> dict[str, Any]:
    from vinakit.mcq import rate as _rate

    rows = table.to_dict("records")
    valid = [row for row in rows if row["format_valid"]]
    extra = {
        "hit_token_budget_rate": _rate(rows, "hit_token_budget"),
        "context_truncated_count": int(sum(bool(row["context_truncated"]) for row in rows)),
    }
    if "key_agrees" in table:
        extra.update(key_agreement_rate=_rate(valid, "key_agrees"),
                     guessable_without_context_rate=_rate(valid, "guessable_without_context"))
    return extra


def _ordered(summary: dict[str, Any]) -> dict[str, Any]:
    head = {name: summary[name] for name in _HEADLINE if name in summary}
    return {**head, **{k: v for k, v in summary.items() if k not in head}}


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def comparison_table(results: Sequence[ModelResult]) -> Any:
    """Compared metrics as rows, one column per model, and ``change`` (last minus first) for two models."""
    import pandas as pd

    table = pd.DataFrame({"metric": list(COMPARED_METRICS)})
    for result in results:
        table[result.label] = [result.summary.get(name) for name in COMPARED_METRICS]
    table = table.dropna(how="all", subset=[r.label for r in results]).reset_index(drop=True)
    if len(results) == 2:
        first, last = results[0].label, results[-1].label
        table["change"] = pd.to_numeric(table[last], errors="coerce") - pd.to_numeric(table[first], errors="coerce")
        table["change"] = table["change"].round(4)
    return table


def write_results(run: Run, evaluation: Evaluation) -> Metrics:
    """Write the CSVs (UTF-8 with BOM for Excel) and metrics.json; returns the metrics."""
    for result in evaluation.results:
        suffix = "" if result is evaluation.primary else f"_{result.label.replace('-', '_')}"
        result.predictions.to_csv(run.path / f"predictions{suffix}.csv", index=False, encoding="utf-8-sig")
        if len(result.vmlu):
            result.vmlu.to_csv(run.path / f"vmlu_predictions{suffix}.csv", index=False, encoding="utf-8-sig")
    evaluation.comparison().to_csv(run.path / "comparison.csv", index=False, encoding="utf-8-sig")
    primary = evaluation.primary
    others = {r.label.replace("-", "_"): r.summary for r in evaluation.results if r is not primary}
    return run.log_headline_metrics(**primary.summary, model=primary.label, items_note=evaluation.note, **others)


def plot_comparison(evaluation: Evaluation) -> Any:
    """A grouped bar chart of the main metrics (0-1), one bar per model; the title names the evaluated model."""
    import matplotlib.pyplot as plt
    from vinakit.model import display_name

    names = [name for name in PLOTTED_METRICS if any(r.summary.get(name) is not None for r in evaluation.results)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(evaluation.results)
    for index, result in enumerate(evaluation.results):
        values = [result.summary.get(name) for name in names]
        positions = [i + index * width for i in range(len(names))]
        bars = ax.bar(positions, [v or 0.0 for v in values], width, label=result.label)
        # "n/a" (e.g. no valid MCQ to measure) must not read as a score of 0.
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks([i + width * (len(evaluation.results) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([n.replace("_", " ") for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"MCQ evaluation of {display_name(evaluation.primary.model)} "
                 f"({evaluation.primary.summary.get('n_items')} items)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_answer_letters(evaluation: Evaluation) -> Any:
    """The share of each declared key letter among valid MCQs, per model (a flat 0.25 means no position bias)."""
    import matplotlib.pyplot as plt
    from vinakit.model import display_name

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(evaluation.results)
    for index, result in enumerate(evaluation.results):
        shares = result.summary.get("answer_letter_shares") or {}
        ax.bar([i + index * width for i in range(len(LETTERS))], [shares.get(l) or 0.0 for l in LETTERS], width,
               label=f"{result.label} ({result.summary.get('n_valid', 0)} valid)")
    ax.axhline(0.25, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(evaluation.results) - 1) / 2 for i in range(len(LETTERS))])
    ax.set_xticklabels(LETTERS)
    ax.set_ylabel("share of keys")
    ax.set_title(f"Answer-letter distribution: {display_name(evaluation.primary.model)}")
    ax.legend(fontsize=8)
    return fig


def summary_text(evaluation: Evaluation) -> str:
    """One line per model: the headline figures, for a notebook or the demo to print."""
    lines = [f"items: {evaluation.note}"]
    for result in evaluation.results:
        s = result.summary
        lines.append(
            f"{result.label:>10}: format valid {_pct(s.get('format_valid_rate'))} (strict "
            f"{_pct(s.get('format_strict_rate'))}), key agreement {_pct(s.get('key_agreement_rate'))}, "
            f"VMLU accuracy {_pct(s.get('vmlu_accuracy'))} (chance {_pct(s.get('vmlu_chance'))}), "
            f"{s.get('n_items')} items")
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"
