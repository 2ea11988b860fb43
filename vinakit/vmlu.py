"""Multiple-choice answering by letter log-probabilities, and the VMLU-format question set.

A model answers a multiple-choice question the way it was trained to write one: the prompt is the chat
template's user turn, the reply starts with ``Đáp án:``, and the answer is the choice letter with the highest
log-probability next (:func:`pick_letters`). The eval notebook uses it twice: to check the keys of the MCQs a
model wrote, and to answer a VMLU-format set (``question``, ``choices``, ``answer``, optional ``subject``), to
see that general Vietnamese knowledge did not drop after fine-tuning (:func:`answer_vmlu`).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from vinakit.errors import DataError
from vinakit.sources import BadRow, DataReport, read_rows
from vinakit.text import is_blank

VMLU_SAMPLE = "vinakit:vmlu"
VMLU_SAMPLE_FILE = Path(__file__).resolve().parent / "sample_data" / "vmlu_sample.jsonl"
CHOICE_LETTERS = ("A", "B", "C", "D", "E")  # VMLU has up to five choices
ANSWER_PREFIX = "Đáp án:"
_VMLU_PROMPT = "Trả lời câu hỏi trắc nghiệm sau.\n\n{mcq}"


@dataclass
class VmluItems:
    """Multiple-choice questions with a key (VMLU format), or an empty table when none were asked for."""

    table: Any
    source: str = ""

    def __len__(self) -> int:
        return len(self.table)


def read_vmlu(dataset: str, clean: Callable[[str], str], *, max_items: int = 0, skip_bad_rows: bool = False,
              normalize: bool = True, tone_style: str = "old") -> tuple[VmluItems, DataReport | None]:
    """Read a VMLU-format set; ``vinakit:vmlu`` is the kit's own 48-question sample.

    VMLU's own files work as they are (choices written "A. ...", up to five options). An empty ``dataset``
    gives an empty set.

    Args:
        dataset: a file, a hub dataset id, ``vinakit:vmlu`` or "".
        clean: the text normalisation applied to questions and choices.
        max_items: keep the first N questions (0: all).
        skip_bad_rows: skip and count bad rows instead of stopping at the first with its file, line and field.
        normalize: recorded in the data report.
        tone_style: recorded in the data report.

    Returns:
        The questions and the data report (None for an empty ``dataset``).

    Raises:
        DataError: a row without question, choices or key (unless ``skip_bad_rows``), or no usable rows.
    """
    import pandas as pd

    if not dataset:
        return VmluItems(table=pd.DataFrame(columns=["subject", "question", "choices", "answer"])), None
    source: str | Path = VMLU_SAMPLE_FILE if dataset == VMLU_SAMPLE else dataset
    rows, report, label = read_rows(
        source, lambda row, line, cells_are_text: (_vmlu_item(row, clean, cells_are_text), "vmlu"),
        skip_bad_rows=skip_bad_rows, normalize=normalize, tone_style=tone_style)
    if not rows:
        raise DataError(f"no usable questions ({dict(report.skip_reasons)})", path=label)
    if max_items:
        rows = rows[:max_items]
    report.train_rows = len(rows)
    return VmluItems(table=pd.DataFrame(rows), source=dataset), report


def _vmlu_item(row: Any, clean: Callable[[str], str], cells_are_text: bool) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"a row must be an object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or is_blank(question):  # zero-width characters alone are no question
        raise BadRow("missing_field", "no question (empty, or only invisible characters)", "question")
    choices = _vmlu_choices(row.get("choices"), cells_are_text)
    answer = str(row.get("answer") or "").strip().strip("().:").upper()
    if not answer:
        raise BadRow("no_answer_key", "no answer key (VMLU's test split has no public keys: use its dev or "
                                      "valid split)", "answer")
    if answer not in CHOICE_LETTERS[:len(choices)]:
        raise BadRow("bad_answer_key", f"answer {answer!r} is not one of the {len(choices)} choices", "answer")
    return {"subject": str(row.get("subject") or "unknown"), "question": clean(question.strip()),
            "choices": [clean(choice) for choice in choices], "answer": answer}


def _vmlu_choices(value: Any, cells_are_text: bool) -> list[str]:
    if cells_are_text and isinstance(value, str):
        try:
            value = json.loads(value)  # a CSV cell holds the list as JSON
        except ValueError:
            pass
    if not isinstance(value, list) or not 2 <= len(value) <= len(CHOICE_LETTERS):
        raise BadRow("bad_choices", f"choices must be a list of 2 to {len(CHOICE_LETTERS)} strings", "choices")
    choices = []
    for letter, choice in zip(CHOICE_LETTERS, value):
        text = str(choice).strip()
        for label in (f"{letter}.", f"{letter})", f"{letter}:"):
            text = text[len(label):].strip() if text.startswith(label) else text  # VMLU writes "A. ..."
        if is_blank(text):
            raise BadRow("bad_choices", f"choice {letter} is empty (or only invisible characters)", "choices")
        choices.append(text)
    return choices


def mcq_block(question: str, options: Sequence[str]) -> str:
    """``Câu hỏi: ...`` then one ``A. ...`` line per option."""
    lines = [f"Câu hỏi: {question}"] + [f"{letter}. {text}" for letter, text in zip(CHOICE_LETTERS, options)]
    return "\n".join(lines)


def scoring_prompt(tokenizer: Any, user_text: str) -> str:
    """The chat-template prompt whose reply starts with ``Đáp án:`` (a letter comes next)."""
    from vinakit.chat import render_prompt

    return render_prompt(tokenizer, [{"role": "user", "content": user_text}]) + ANSWER_PREFIX


def pick_letters(model: Any, tokenizer: Any, user_texts: Sequence[str], n_choices: Sequence[int], *,
                 batch_size: int, max_prompt_tokens: int) -> list[str]:
    """The letter each prompt's reply most likely starts with, among its first ``n`` choices."""
    from vinakit.generation import continuation_logprobs

    if not user_texts:
        return []
    letters = CHOICE_LETTERS[:max(n_choices)]
    scores = continuation_logprobs(model, tokenizer, [scoring_prompt(tokenizer, t) for t in user_texts],
                                   [f" {letter}" for letter in letters], batch_size=batch_size,
                                   max_prompt_tokens=max_prompt_tokens)
    return [letters[max(range(n), key=lambda i: row[i])] for row, n in zip(scores, n_choices)]


def answer_vmlu(model: Any, tokenizer: Any, vmlu: VmluItems, *, batch_size: int,
                max_prompt_tokens: int) -> tuple[Any, Any, dict]:
    """Answer each VMLU question by the letter with the highest log-probability after ``Đáp án:``.

    Returns:
        ``(per-question table, per-subject table, summary)``; the summary has ``vmlu_accuracy``,
        ``vmlu_chance`` (what guessing scores) and ``vmlu_n`` (empty when there is no VMLU set).
    """
    import pandas as pd

    if not len(vmlu):
        return pd.DataFrame(), pd.DataFrame(columns=["subject", "n", "accuracy"]), {}
    table = vmlu.table.copy()
    prompts = [_VMLU_PROMPT.format(mcq=mcq_block(q, c)) for q, c in zip(table["question"], table["choices"])]
    table["predicted"] = pick_letters(model, tokenizer, prompts, [len(c) for c in table["choices"]],
                                      batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    table["correct"] = table["predicted"] == table["answer"]
    subjects = (table.groupby("subject", sort=True)["correct"].agg(["size", "mean"]).reset_index()
                .rename(columns={"size": "n", "mean": "accuracy"}))
    subjects["accuracy"] = subjects["accuracy"].round(4)
    summary = {
        "vmlu_n": len(table),
        "vmlu_accuracy": round(float(table["correct"].mean()), 4),
        "vmlu_chance": round(float((1 / table["choices"].map(len)).mean()), 4),
        "vmlu_per_subject": dict(zip(subjects["subject"], subjects["accuracy"])),
    }
    return table, subjects, summary
