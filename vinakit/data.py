"""Chat and corpus data loading: any common format in, one conversation format out, with a report.

Every row becomes ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles system, user,
assistant (an optional per-message ``"train": false`` is kept for the tokenizer's label masking).
Rows come from local files (.jsonl, .json, .csv, .parquet), the kit's sample data (``vinakit:chat``,
``vinakit:mcq``, ``vinakit:corpus``) or a Hugging Face hub dataset id, read by :mod:`vinakit.sources`.

Bad rows are located by file, 1-based line (jsonl, csv) or row (json list, parquet, hub) and field.
Strict by default: a bad row raises :class:`~vinakit.errors.DataError`; with ``skip_bad_rows`` it is
skipped and counted by reason in the :class:`~vinakit.sources.DataReport`, which goes into the run manifest.

Only the standard library is imported at module level: pyarrow and datasets load inside functions,
so the CLI stays fast and Unsloth can still be imported before transformers.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vinakit.errors import DataError, ParamsError
from vinakit.sources import (CHAT_SUFFIXES, CORPUS_SUFFIXES, BadRow, DataReport, RowOptions, check_tone_style,
                             collect_rows, open_source, skip_summary)
from vinakit.text import TextStats, is_blank, normalize_with_counts

MCQ_LETTERS = ("A", "B", "C", "D")

_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "model": "assistant", "bot": "assistant"}
# The one MCQ row schema, in its two seed-data forms: (schema name -> context column, answer-key column).
MCQ_SCHEMAS = {"mcq_para": ("para", "answer_key"), "mcq_context": ("context", "correct_answer")}
MCQ_OPTION_FIELDS = ("answer_a", "answer_b", "answer_c", "answer_d")
MCQ_CONTEXT_FIELDS = tuple(context for context, _ in MCQ_SCHEMAS.values())
_MCQ_KEY = re.compile(r"\(?\s*([A-Da-d])\s*[.):]?")
_MCQ_PROMPT = ("Hãy đọc đoạn văn sau và viết một câu hỏi trắc nghiệm có bốn phương án A, B, C, D "
               "và cho biết đáp án đúng.\n\nĐoạn văn: {context}")


# --- public helpers -------------------------------------------------------------------------------


def mcq_user_prompt(context: str) -> str:
    """Returns the user turn that asks for a multiple-choice question about ``context``.

    Training (MCQ rows) and evaluation build the prompt with this one function, so both see the
    same words.

    Args:
        context: the Vietnamese passage the question must be about.

    Returns:
        The prompt, in Vietnamese.
    """
    return _MCQ_PROMPT.format(context=context.strip())


def format_mcq(question: str, options: Mapping[str, str], answer: str) -> str:
    """Returns the canonical MCQ text the model learns to write and the evaluator parses.

    ``"Câu hỏi: {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nĐáp án: {X}"``. Runs of
    whitespace (newlines included) in the question and options become one space, because the
    format is read line by line.

    Args:
        question: the question stem.
        options: the four options keyed "A".."D" (case-insensitive).
        answer: the letter of the correct option, "A".."D" (case-insensitive).

    Returns:
        The formatted MCQ.

    Raises:
        ValueError: the options are not exactly A-D or the answer is not one of them.
    """
    by_letter = {str(letter).strip().upper(): text for letter, text in options.items()}
    if sorted(by_letter) != list(MCQ_LETTERS):
        raise ValueError(f"options must have exactly the keys A, B, C, D, got {sorted(options)}")
    key = answer.strip().upper()
    if key not in MCQ_LETTERS:
        raise ValueError(f"answer must be one of A, B, C, D, got {answer!r}")
    lines = [f"Câu hỏi: {_one_line(question)}"]
    lines += [f"{letter}. {_one_line(by_letter[letter])}" for letter in MCQ_LETTERS]
    lines.append(f"Đáp án: {key}")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- results --------------------------------------------------------------------------------------


@dataclass
class ChatData:
    """Conversations ready for a chat template.

    Attributes:
        train: training rows, each ``{"messages": [{"role", "content"[, "train"]}, ...]}``.
        validation: validation rows, same shape (empty when no split was asked for).
        report: what was read, used, skipped and normalised.
    """

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    report: DataReport


# --- public loaders -------------------------------------------------------------------------------


def load_chat_dataset(
    source: str | Path,
    *,
    val_source: str | Path | None = None,
    val_size: float | int = 0.0,
    skip_bad_rows: bool = False,
    normalize: bool = True,
    tone_style: str = "old",
    seed: int = 0,
    text_field: str | None = None,
    limit: int | None = None,
) -> ChatData:
    """Loads conversations from a file, a sample alias or a hub dataset, and splits off validation.

    Row formats are detected per row: OpenAI ``messages`` (role/content), ShareGPT ``conversations``
    (from/value), Alpaca (``instruction``, ``input``, ``output``, ``system``) and the two MCQ
    schemas (``context, question, answer_a..answer_d, correct_answer`` and ``para, question,
    answer_a..answer_d, answer_key``), which become "write an MCQ about this passage" conversations.

    Args:
        source: a .jsonl/.json/.csv/.parquet path, ``vinakit:chat``/``vinakit:mcq``, or a hub id
            (``name`` or ``name:split``, default split "train").
        val_source: a second source, loaded the same way, used as the validation set.
        val_size: fraction in (0, 0.5] or a row count >= 1 to split off as validation; 0 for none.
        skip_bad_rows: skip bad rows and count them instead of raising.
        normalize: normalise every message content with :mod:`vinakit.text`.
        tone_style: "old" (hòa), "new" (hoà) or "off", see :func:`vinakit.text.normalize_vietnamese`.
        seed: seed of the validation split's shuffle.
        text_field: the column holding the conversation (a list of role/content or from/value
            turns) when it is named neither "messages" nor "conversations".
        limit: keep at most this many rows from each source (reading stops there).

    Returns:
        The train and validation rows and the report.

    Raises:
        DataError: a file-level problem, a bad row in strict mode, or no usable rows.
        ParamsError: an option is out of range.
    """
    _check_chat_options(val_source, val_size, tone_style, limit, text_field)
    options = RowOptions(skip_bad_rows, normalize, tone_style, limit)
    rows, report = _load_chat_rows(source, text_field, options)
    if val_source is not None:
        train = rows
        validation, report.validation_report = _load_chat_rows(val_source, text_field, options)
        report.split = "val_source"
    else:
        train, validation = split_rows(rows, val_size, seed, report.source)
        report.split = f"val_size={val_size} seed={seed}" if validation else "none"
    report.train_rows, report.validation_rows = len(train), len(validation)
    return ChatData(train=train, validation=validation, report=report)


def load_text_corpus(
    source: str | Path,
    *,
    text_field: str = "text",
    normalize: bool = True,
    tone_style: str = "old",
    skip_bad_rows: bool = False,
) -> tuple[list[str], DataReport]:
    """Loads raw documents for continued pretraining.

    Args:
        source: a .txt file (documents separated by blank lines), a .jsonl/.json/.csv/.parquet
            file with a text column, ``vinakit:corpus``, or a hub id (``name`` or ``name:split``).
        text_field: the column holding the text (not used for .txt).
        normalize: normalise every document with :mod:`vinakit.text`.
        tone_style: "old", "new" or "off", see :func:`vinakit.text.normalize_vietnamese`.
        skip_bad_rows: skip rows without a text column (or with a non-text value) instead of raising.

    Returns:
        The documents and the report. Empty documents are dropped and counted as "empty_document".

    Raises:
        DataError: a file-level problem, a bad row in strict mode, or no documents at all.
        ParamsError: tone_style is unknown.
    """
    check_tone_style(tone_style)
    options = RowOptions(skip_bad_rows, normalize, tone_style, limit=None)
    table = open_source(source, CORPUS_SUFFIXES)
    report = table.new_report(options)

    def to_document(row: Any) -> tuple[str | None, str]:
        document = _corpus_document(row, text_field, options, report)
        return document, "text" if document is not None else "empty_document"

    documents = collect_rows(table, to_document, report, options)
    report.train_rows = len(documents)
    if not documents:
        raise DataError(f"no documents: all {report.rows_read} were empty or skipped "
                        f"({skip_summary(report)}); check text_field (now {text_field!r}) and the file",
                        path=table.label)
    return documents, report


# --- options --------------------------------------------------------------------------------------


def _check_chat_options(val_source: Any, val_size: Any, tone_style: str, limit: Any,
                        text_field: Any) -> None:
    check_tone_style(tone_style)
    _validation_count(1000, val_size)  # raises on a bad type or range
    if val_source is not None and val_size:
        raise ParamsError("give either val_source or val_size, not both")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ParamsError(f"limit must be None or an integer >= 1, got {limit!r}")
    if text_field is not None and not (isinstance(text_field, str) and text_field):
        raise ParamsError(f"text_field must be None or a column name, got {text_field!r}")


# --- chat rows ------------------------------------------------------------------------------------


def _load_chat_rows(source: str | Path, text_field: str | None,
                    options: RowOptions) -> tuple[list[dict[str, Any]], DataReport]:
    table = open_source(source, CHAT_SUFFIXES)
    report = table.new_report(options)

    def to_chat(row: Any) -> tuple[dict[str, Any], str]:
        messages, kind = _chat_messages(row, text_field, table.cells_are_text)
        stats = _normalize_messages(messages, options)
        _check_assistant_turns(messages)
        report.text.add(stats)  # only rows that are kept count
        return {"messages": [_without_field_path(m) for m in messages]}, kind

    rows = collect_rows(table, to_chat, report, options)
    if not rows:
        raise DataError(f"no usable rows: all {report.rows_read} rows were skipped "
                        f"({skip_summary(report)}); see the first ones: {report.skipped_examples[:3]}",
                        path=table.label)
    return rows, report


def _chat_messages(row: Any, text_field: str | None, cells_are_text: bool) -> tuple[list[dict], str]:
    """Returns the row's messages (each with a "_field" path for errors) and its format name."""
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"expected an object (a conversation), got {_type_name(row)}")
    if text_field is not None:
        if text_field not in row:
            raise BadRow("missing_field", f"no field {text_field!r} (text_field); the row has "
                          f"{', '.join(map(repr, row))}", text_field)
        turns = _as_list(row[text_field], text_field, cells_are_text)
        sharegpt = bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
        return _turns(turns, text_field, sharegpt), "sharegpt" if sharegpt else "openai_messages"
    if "messages" in row:
        return _turns(_as_list(row["messages"], "messages", cells_are_text), "messages", False), \
            "openai_messages"
    if "conversations" in row:
        turns = _as_list(row["conversations"], "conversations", cells_are_text)
        return _turns(turns, "conversations", True), "sharegpt"
    if "instruction" in row or "output" in row:
        return _alpaca_messages(row), "alpaca"
    if any(name in row for name in (*MCQ_OPTION_FIELDS, "correct_answer", "answer_key")):
        mcq = read_mcq_row(row)
        return _mcq_messages(mcq), mcq.schema
    raise BadRow("unknown_format", "matches no known format; expected 'messages', 'conversations', "
                  "'instruction'/'output' or an MCQ row (context, question, answer_a..answer_d, "
                  f"correct_answer); the row has {', '.join(map(repr, row)) or 'no fields'}")


def _as_list(value: Any, name: str, cells_are_text: bool) -> list[Any]:
    if cells_are_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow("wrong_type", f"{name!r} must be a JSON list of turns", name) from None
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"{name!r} must be a list of turns, got {_type_name(value)}", name)
    return value


def _turns(turns: list[Any], name: str, sharegpt: bool) -> list[dict[str, Any]]:
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = _SHAREGPT_ROLES if sharegpt else _OPENAI_ROLES
    messages = []
    for index, turn in enumerate(turns):
        where = f"{name}[{index}]"
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"a turn must be an object, got {_type_name(turn)}", where)
        for key in (role_key, content_key):
            if key not in turn:
                raise BadRow("missing_field", f"turn {index} has no {key!r}", f"{where}.{key}")
        role = roles.get(turn[role_key].strip().lower()) if isinstance(turn[role_key], str) else None
        if role is None:
            raise BadRow("unknown_role", f"unknown role {turn[role_key]!r}; use one of "
                          f"{', '.join(roles)}", f"{where}.{role_key}")
        if not isinstance(turn[content_key], str):
            raise BadRow("wrong_type", f"content must be a string, got {_type_name(turn[content_key])}",
                          f"{where}.{content_key}")
        message = {"role": role, "content": turn[content_key], "_field": f"{where}.{content_key}"}
        # Arrow (parquet, hub) gives every turn every key, so an absent "train" arrives as None
        if turn.get("train") is not None:
            if not isinstance(turn["train"], bool):
                raise BadRow("wrong_type", f"'train' must be true or false, got {turn['train']!r}",
                              f"{where}.train")
            message["train"] = turn["train"]
        messages.append(message)
    return messages


def _alpaca_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    instruction = _required_text(row, "instruction")
    output = _text_or_empty(row, "output", required=True)
    extra_input = _text_or_empty(row, "input")
    system = _text_or_empty(row, "system")
    user = f"{instruction}\n\n{extra_input}" if not is_blank(extra_input) else instruction
    messages = [{"role": "system", "content": system, "_field": "system"}] if not is_blank(system) else []
    messages.append({"role": "user", "content": user, "_field": "instruction"})
    messages.append({"role": "assistant", "content": output, "_field": "output"})
    return messages


@dataclass(frozen=True)
class McqRow:
    """One MCQ row of either seed schema, checked: a context, a question, four options and a key letter.

    Attributes:
        schema: ``"mcq_para"`` or ``"mcq_context"``.
        context_field: the column the passage came from (``para`` or ``context``).
        context: the passage.
        question: the question stem.
        options: ``{"A": ..., "D": ...}``.
        answer: the key letter, "A".."D".
    """

    schema: str
    context_field: str
    context: str
    question: str
    options: dict[str, str]
    answer: str


def read_mcq_row(row: dict[str, Any], context_field: str = "") -> McqRow:
    """Read an MCQ row of either seed schema; training and evaluation read MCQ rows with this one function.

    Args:
        row: ``context, question, answer_a..answer_d, correct_answer`` or ``para, ..., answer_key``; the key may
            be written ``B``, ``b``, ``(B)``, ``B.`` or ``B)``.
        context_field: the passage column when it is neither ``para`` nor ``context``.

    Raises:
        BadRow: a missing or empty field, a wrong type, or a key that is not A-D (naming the field).
    """
    schema = "mcq_para" if "para" in row or "answer_key" in row else "mcq_context"
    default_context, key_field = MCQ_SCHEMAS[schema]
    context_field = context_field or default_context
    context = _required_text(row, context_field, numbers_ok=True)
    question = _required_text(row, "question", numbers_ok=True)
    options = {letter: _required_text(row, name, numbers_ok=True)
               for letter, name in zip(MCQ_LETTERS, MCQ_OPTION_FIELDS)}
    key = _required_text(row, key_field, numbers_ok=True)  # a number key is a bad key, not a type error
    match = _MCQ_KEY.fullmatch(key.strip())
    if match is None:
        raise BadRow("bad_mcq_key", f"answer key {key!r} is not one of A, B, C, D", key_field)
    return McqRow(schema, context_field, context, question, options, match.group(1).upper())


def _mcq_messages(mcq: McqRow) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": mcq_user_prompt(mcq.context), "_field": mcq.context_field},
        {"role": "assistant", "content": format_mcq(mcq.question, mcq.options, mcq.answer),
         "_field": "question"},
    ]


def _required_text(row: dict[str, Any], name: str, numbers_ok: bool = False) -> str:
    text = _text_or_empty(row, name, required=True, numbers_ok=numbers_ok)
    if is_blank(text):  # zero-width characters alone are empty too, normalised or not
        raise BadRow("empty_field", f"{name!r} is empty (or holds only invisible characters)", name)
    return text


def _text_or_empty(row: dict[str, Any], name: str, required: bool = False,
                   numbers_ok: bool = False) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas writes NaN
        if required:
            raise BadRow("missing_field", f"missing field {name!r}", name)
        return ""
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a JSON option such as 1945 is still an option
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{name!r} must be a string, got {_type_name(value)}", name)
    return value


def _normalize_messages(messages: list[dict[str, Any]], options: RowOptions) -> TextStats:
    if not options.normalize:
        return TextStats()
    contents, stats = normalize_with_counts([m["content"] for m in messages], options.tone_style)
    for message, content in zip(messages, contents):
        message["content"] = content
    return stats


def _check_assistant_turns(messages: list[dict[str, Any]]) -> None:
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise BadRow("no_assistant_turn", "the conversation has no assistant turn to learn from")
    for message in assistant:
        if is_blank(message["content"]):  # an answer of only zero-width characters is empty, normalised or not
            raise BadRow("empty_assistant", "the assistant turn is empty (or holds only invisible characters)",
                         message["_field"])


def _without_field_path(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key != "_field"}


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- corpus rows ----------------------------------------------------------------------------------


def _corpus_document(row: Any, text_field: str, options: RowOptions,
                     report: DataReport) -> str | None:
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict):
        if text_field not in row:
            raise BadRow("missing_field", f"no field {text_field!r}; set text_field to the column "
                          f"that holds the text (the row has {', '.join(map(repr, row))})", text_field)
        text = row[text_field]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise BadRow("wrong_type", f"{text_field!r} must be a string, got {_type_name(text)}",
                          text_field)
    else:
        raise BadRow("wrong_type", f"expected an object with {text_field!r}, got {_type_name(row)}")
    if is_blank(text):  # invisible characters alone make an empty document, normalised or not
        return None
    if options.normalize:
        (text,), stats = normalize_with_counts([text], options.tone_style)
        report.text.add(stats)  # only documents that are kept count
    return text


# --- validation split -----------------------------------------------------------------------------

T = TypeVar("T")


def _validation_count(total: int, val_size: Any) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ParamsError(f"val_size must be a fraction in (0, 0.5] or a row count, got {val_size!r}")
    if isinstance(val_size, int):
        if val_size < 0:
            raise ParamsError(f"val_size must be >= 0, got {val_size}")
        return val_size
    if val_size == 0:
        return 0
    if not 0 < val_size <= 0.5:
        raise ParamsError(f"val_size as a fraction must be in (0, 0.5], got {val_size}; "
                          "give a whole number for a row count")
    return max(1, round(total * val_size))


def split_rows(rows: Sequence[T], val_size: float | int, seed: int, source: str = "", *, unit: str = "rows",
               fix: str = "") -> tuple[list[T], list[T]]:
    """Split off a seeded validation sample; both parts keep the file order. Chat rows and CPT documents alike.

    Args:
        rows: the rows (or documents).
        val_size: a fraction in (0, 0.5] or a count >= 1; 0 for no validation part.
        seed: seed of the sample: the same rows, size and seed give the same split (eval re-creates it).
        source: the file or dataset, named in errors.
        unit: what the rows are, for the error message ("rows", "documents").
        fix: how to fix a split that leaves nothing to train on (default: lower val_size or add rows).

    Returns:
        ``(train, validation)``.

    Raises:
        ParamsError: ``val_size`` has a wrong type or range.
        DataError: ``val_size`` leaves no training row.
    """
    count = _validation_count(len(rows), val_size)
    if count == 0:
        return list(rows), []
    if count >= len(rows):
        raise DataError(f"val_size={val_size} would leave no training {unit} ({len(rows)} usable {unit}); "
                        f"{fix or f'lower val_size or add {unit}'}", path=source or None)
    # sample indices, keep file order in both parts: easier to trace a row back to its line
    chosen = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for index, row in enumerate(rows) if index not in chosen]
    validation = [row for index, row in enumerate(rows) if index in chosen]
    return train, validation
