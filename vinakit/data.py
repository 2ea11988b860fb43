"""Chat and corpus data loading: any common format in, one conversation format out, with a report.

Every row becomes ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles system, user,
assistant (an optional per-message ``"train": false`` is kept for the tokenizer's label masking).
Rows come from local files (.jsonl, .json, .csv, .parquet), the kit's sample data (``vinakit:chat``,
``vinakit:mcq``, ``vinakit:corpus``) or a Hugging Face hub dataset id (``name`` or ``name:split``).

Bad rows are located by file, 1-based line (jsonl, csv) or row (json list, parquet, hub) and field.
Strict by default: a bad row raises :class:`~vinakit.errors.DataError`; with ``skip_bad_rows`` it is
skipped and counted by reason in the :class:`DataReport`, which goes into the run manifest.

Only the standard library is imported at module level: pyarrow and datasets load inside functions,
so the CLI stays fast and Unsloth can still be imported before transformers.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vinakit.errors import DataError, ParamsError
from vinakit.text import TONE_STYLES, TextStats, normalize_with_counts

SAMPLE_FILES = {
    "vinakit:chat": "chat_vi.jsonl",
    "vinakit:mcq": "mcq_tinhoc.csv",
    "vinakit:corpus": "corpus_vi.txt",
}
CHAT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CORPUS_SUFFIXES = (".txt", *CHAT_SUFFIXES)
MCQ_LETTERS = ("A", "B", "C", "D")
MAX_SKIPPED_EXAMPLES = 20

# Suffixes that mark a string as a file path even when the file is missing (a hub id has none).
_FILE_LIKE_SUFFIXES = frozenset({*CORPUS_SUFFIXES, ".tsv", ".xlsx", ".xls", ".ods", ".gz", ".zip",
                                 ".bz2", ".xz", ".arrow", ".md", ".ndjson"})
_SKIP_HINT = "Fix the row, or set skip_bad_rows: true to skip such rows."
_OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "model": "assistant", "bot": "assistant"}
# (schema name, context column, answer-key column) of the two MCQ seed-data schemas.
_MCQ_SCHEMAS = {"mcq_para": ("para", "answer_key"), "mcq_context": ("context", "correct_answer")}
_MCQ_OPTION_FIELDS = ("answer_a", "answer_b", "answer_c", "answer_d")
_MCQ_KEY = re.compile(r"\(?\s*([A-Da-d])\s*[.):]?")
_MCQ_PROMPT = ("Hãy đọc đoạn văn sau và viết một câu hỏi trắc nghiệm có bốn phương án A, B, C, D "
               "và cho biết đáp án đúng.\n\nĐoạn văn: {context}")


# --- public helpers -------------------------------------------------------------------------------


def sample_path(alias: str) -> Path:
    """Returns the file behind a sample-data alias.

    Args:
        alias: ``vinakit:chat``, ``vinakit:mcq`` or ``vinakit:corpus``.

    Returns:
        The path inside the installed package (the file may not exist in a partial checkout).

    Raises:
        DataError: the alias is unknown.
    """
    if alias not in SAMPLE_FILES:
        raise DataError(f"unknown sample alias {alias!r}; use one of {', '.join(SAMPLE_FILES)}")
    return Path(__file__).resolve().parent / "sample_data" / SAMPLE_FILES[alias]


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
class DataReport:
    """What was read from one source, what was used and what was skipped, for the run manifest.

    Attributes:
        source: the source as the user gave it, with the file behind an alias.
        path: the local file read, or None for a hub dataset.
        sha256: the file's SHA-256, or None for a hub dataset.
        rows_read: rows (lines, documents) read, bad ones included; blank lines not counted.
        rows_used: rows kept.
        skip_reasons: skipped rows counted by reason (e.g. "unknown_role", "empty_document").
        skipped_examples: the first skipped rows as "file:line: field: reason".
        formats: rows kept counted by detected format (e.g. "openai_messages", "mcq_para").
        text: what text normalisation changed in the kept rows.
        normalized: whether text was normalised.
        tone_style: the tone-mark style used when normalising.
        split: how the validation set was made ("none", "val_size=0.1 seed=0", "val_source").
        train_rows: rows in the training set.
        validation_rows: rows in the validation set.
        validation_report: the report of ``val_source``, when one was given.
    """

    source: str
    path: str | None = None
    sha256: str | None = None
    rows_read: int = 0
    rows_used: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    formats: Counter[str] = field(default_factory=Counter)
    text: TextStats = field(default_factory=TextStats)
    normalized: bool = True
    tone_style: str = "old"
    split: str = "none"
    train_rows: int = 0
    validation_rows: int = 0
    validation_report: DataReport | None = None

    @property
    def rows_skipped(self) -> int:
        """Rows read but not used."""
        return sum(self.skip_reasons.values())

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-ready data (plain dicts, lists, numbers and strings)."""
        return {
            "source": self.source,
            "path": self.path,
            "sha256": self.sha256,
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "rows_skipped": self.rows_skipped,
            "skip_reasons": dict(self.skip_reasons.most_common()),
            "skipped_examples": list(self.skipped_examples),
            "formats": dict(self.formats.most_common()),
            "text_normalization": {"enabled": self.normalized, "tone_style": self.tone_style,
                                   **self.text.to_dict()},
            "split": self.split,
            "train_rows": self.train_rows,
            "validation_rows": self.validation_rows,
            "validation_source": self.validation_report.to_dict() if self.validation_report else None,
        }

    def summary(self) -> str:
        """Returns a few lines for a notebook to print."""
        skipped = ", ".join(f"{reason}: {count}" for reason, count in self.skip_reasons.most_common())
        fixes = ", ".join(f"{name} {count}" for name, count in self.text.to_dict().items()
                          if name not in ("strings", "changed") and count)
        lines = [
            f"{self.source}: {self.rows_read} rows read, {self.rows_used} used, "
            f"{self.rows_skipped} skipped" + (f" ({skipped})" if skipped else ""),
            "formats: " + ", ".join(f"{name} {count}" for name, count in self.formats.most_common()),
            f"text normalised ({self.tone_style} tone style): {self.text.changed} of "
            f"{self.text.strings} strings changed" + (f" ({fixes})" if fixes else "")
            if self.normalized else "text not normalised",
            f"split {self.split}: train {self.train_rows}, validation {self.validation_rows}",
        ]
        return "\n".join(lines)

    def _skip(self, reason: str, example: str) -> None:
        self.skip_reasons[reason] += 1
        if len(self.skipped_examples) < MAX_SKIPPED_EXAMPLES:
            self.skipped_examples.append(example)


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
    options = _RowOptions(skip_bad_rows, normalize, tone_style, limit)
    rows, report = _load_chat_rows(source, text_field, options)
    if val_source is not None:
        train = rows
        validation, report.validation_report = _load_chat_rows(val_source, text_field, options)
        report.split = "val_source"
    else:
        train, validation = _split_rows(rows, val_size, seed, report.source)
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
    _check_tone_style(tone_style)
    options = _RowOptions(skip_bad_rows, normalize, tone_style, limit=None)
    table = _open_source(source, CORPUS_SUFFIXES)
    report = table.new_report(options)

    def to_document(row: Any) -> tuple[str | None, str]:
        document = _corpus_document(row, text_field, options, report)
        return document, "text" if document is not None else "empty_document"

    documents = _collect(table, to_document, report, options)
    report.train_rows = len(documents)
    if not documents:
        raise DataError(f"no documents: all {report.rows_read} were empty or skipped "
                        f"({_reasons(report)}); check text_field (now {text_field!r}) and the file",
                        path=table.label)
    return documents, report


# --- options --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RowOptions:
    skip_bad_rows: bool
    normalize: bool
    tone_style: str
    limit: int | None


def _check_tone_style(tone_style: str) -> None:
    if tone_style not in TONE_STYLES:
        raise ParamsError(f"tone_style must be one of {', '.join(TONE_STYLES)}, got {tone_style!r}")


def _check_chat_options(val_source: Any, val_size: Any, tone_style: str, limit: Any,
                        text_field: Any) -> None:
    _check_tone_style(tone_style)
    _validation_count(1000, val_size)  # raises on a bad type or range
    if val_source is not None and val_size:
        raise ParamsError("give either val_source or val_size, not both")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ParamsError(f"limit must be None or an integer >= 1, got {limit!r}")
    if text_field is not None and not (isinstance(text_field, str) and text_field):
        raise ParamsError(f"text_field must be None or a column name, got {text_field!r}")


# --- sources --------------------------------------------------------------------------------------


@dataclass
class _Table:
    """The rows of one source, each numbered as errors should show it."""

    label: str                       # the file path or dataset id that errors name
    description: str                 # what the report calls the source
    unit: str                        # "line" (jsonl, csv, txt) or "row" (json list, parquet, hub)
    rows: Iterable[tuple[int, Any]]  # (1-based line or row, parsed row or a BadRow)
    path: str | None = None
    sha256: str | None = None
    cells_are_text: bool = False     # csv: a list column arrives as a JSON string

    def new_report(self, options: _RowOptions) -> DataReport:
        return DataReport(source=self.description, path=self.path, sha256=self.sha256,
                          normalized=options.normalize, tone_style=options.tone_style)

    def locate(self, number: int) -> str:
        return f"{self.label}:{number}" if self.unit == "line" else f"{self.label}:row {number}"


class BadRow(Exception):
    """One row that cannot be used; becomes a DataError (strict) or a counted skip.

    Args:
        reason: a short key the report counts skips by (e.g. "missing_field").
        message: what is wrong with the row and what to do.
        field: the field at fault, when one is.
    """

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


def _open_source(source: str | Path, suffixes: tuple[str, ...]) -> _Table:
    if isinstance(source, Path):
        return _read_file(source, str(source), suffixes)
    if not isinstance(source, str) or not source.strip():
        raise ParamsError(f"source must be a file path, a vinakit: alias or a hub dataset id, "
                          f"got {source!r}")
    if source.startswith("vinakit:"):
        path = sample_path(source)
        return _read_file(path, f"{source} ({path})", suffixes)
    path = Path(source).expanduser()
    if path.exists() or _looks_like_path(source):
        return _read_file(path, source, suffixes)
    return _hub_table(source)


def _looks_like_path(source: str) -> bool:
    return (Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES
            or source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1)


def _read_file(path: Path, description: str, suffixes: tuple[str, ...]) -> _Table:
    label = str(path)
    if not path.exists():
        raise DataError("file not found; check the path (relative paths start from the current "
                        f"working directory, {Path.cwd()})", path=label)
    if path.is_dir():
        raise DataError("is a folder; give a data file inside it", path=label)
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise DataError(_unsupported_suffix_message(suffix, suffixes), path=label)
    data = path.read_bytes()
    table = _Table(label=label, description=description, unit="line", rows=[],
                   path=str(path.resolve()), sha256=hashlib.sha256(data).hexdigest())
    if not data.strip():
        raise DataError("file is empty; put at least one row in it", path=label)
    if suffix == ".parquet":
        table.unit, table.rows = "row", _parquet_rows(path, label)
        return table
    text = _decode_utf8(data, label)
    if not text.strip():
        raise DataError("file is empty; put at least one row in it", path=label)
    if suffix == ".jsonl":
        table.rows = _jsonl_rows(text)
    elif suffix == ".json":
        table.unit, table.rows = "row", _json_rows(text, label)
    elif suffix == ".csv":
        table.rows, table.cells_are_text = _csv_rows(text, label), True
    else:
        table.rows = _txt_documents(text)
    return table


def _unsupported_suffix_message(suffix: str, suffixes: tuple[str, ...]) -> str:
    message = f"unsupported file type {suffix or '(none)'!r}; use one of {', '.join(suffixes)}"
    if suffix in (".xlsx", ".xls", ".ods"):
        message += " (in Excel: Save As 'CSV UTF-8 (Comma delimited)')"
    elif suffix == ".txt":
        message += " (plain text is for continued pretraining: load_text_corpus)"
    return message


def _decode_utf8(data: bytes, label: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError("file is UTF-16; re-save it as UTF-8 (in Excel: 'CSV UTF-8')", path=label)
    if b"\x00" in data[:8192]:
        raise DataError("looks like a binary file, not UTF-8 text; give a text file", path=label)
    try:
        return data.decode("utf-8-sig")  # -sig: Excel starts its UTF-8 files with a BOM
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"is not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-save it as UTF-8 "
                        "(Excel: 'CSV UTF-8'; legacy Vietnamese encodings such as Windows-1258, "
                        "TCVN3 or VNI need converting first)", path=label, line=line) from None


def _jsonl_rows(text: str) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    # split on "\n" only: str.splitlines would also split inside strings at U+2028 or U+0085
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((number, BadRow("malformed_json",
                                         f"malformed JSON ({exc.msg} at column {exc.colno})")))
    return rows


def _json_rows(text: str, label: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one object per line is JSON Lines: rename the file to .jsonl)" \
            if exc.msg == "Extra data" else ""
        raise DataError(f"malformed JSON ({exc.msg} at column {exc.colno}){hint}",
                        path=label, line=exc.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError('a .json file must hold a list of objects or {"data": [...]}', path=label)
    if not data:
        raise DataError("holds no rows; put at least one object in the list", path=label)
    return list(enumerate(data, start=1))


def _csv_rows(text: str, label: str) -> list[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        rows = []
        last_line = reader.line_num
        for cells in reader:
            # a quoted field can span lines: the row starts right after the previous one ended
            start, last_line = last_line + 1, reader.line_num
            if any(cell.strip() for cell in cells):
                rows.append((start, _csv_row(header, cells)))
    except csv.Error as exc:
        raise DataError(f"cannot be read as CSV ({exc})", path=label, line=reader.line_num) from None
    if not rows:
        raise DataError("has a header line but no data rows; add rows below the header", path=label)
    return rows


def _csv_row(header: list[str], cells: list[str]) -> dict[str, str] | BadRow:
    if len(cells) != len(header):
        return BadRow("wrong_field_count", f"has {len(cells)} fields but the header has "
                       f"{len(header)}; put fields that contain commas in double quotes")
    return dict(zip(header, cells))


def _txt_documents(text: str) -> list[tuple[int, str]]:
    documents: list[tuple[int, str]] = []
    lines: list[str] = []
    start = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            start = start if lines else number
            lines.append(line)
        elif lines:
            documents.append((start, "\n".join(lines)))
            lines = []
    if lines:
        documents.append((start, "\n".join(lines)))
    return documents


def _parquet_rows(path: Path, label: str) -> list[tuple[int, Any]]:
    import pyarrow.parquet  # heavy: only when a parquet file is read

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"cannot be read as Parquet ({type(exc).__name__}: {exc})",
                        path=label) from None
    if not rows:
        raise DataError("holds no rows", path=label)
    return list(enumerate(rows, start=1))


def _hub_table(dataset_id: str) -> _Table:
    name, _, split = dataset_id.partition(":")
    split = split or "train"
    try:
        from datasets import load_dataset  # heavy, and must come after `import unsloth`

        dataset = load_dataset(name, split=split)
    except Exception as exc:  # network, auth, missing split: all end the same way for the user
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub ({detail}). "
            "Check the id, the split, your network and HF_TOKEN for private data, or give a local "
            f"file ({', '.join(CORPUS_SUFFIXES)}).", path=dataset_id) from exc
    return _Table(label=dataset_id, description=f"hub:{name} split={split}", unit="row",
                  rows=enumerate(dataset, start=1))


# --- row loop -------------------------------------------------------------------------------------


def read_rows(source: str | Path, convert: Callable[[Any, int, bool], tuple[Any, str]], *,
              suffixes: tuple[str, ...] = CHAT_SUFFIXES, skip_bad_rows: bool = False, normalize: bool = True,
              tone_style: str = "old") -> tuple[list[Any], DataReport, str]:
    """Read rows of another schema (evaluation contexts, VMLU questions) with the kit's located errors.

    Args:
        source: a local file, a ``vinakit:`` alias or a hub dataset id, as for :func:`load_chat_dataset`.
        convert: ``convert(row, line, cells_are_text) -> (item, format)`` for one parsed row; it raises
            :class:`BadRow` for a row it cannot use and may return ``(None, reason)`` to drop one.
            ``cells_are_text`` is true for CSV, where a list column arrives as a JSON string.
        suffixes: the file endings accepted.
        skip_bad_rows: skip and count bad rows instead of raising a DataError naming file, line and field.
        normalize: recorded in the report (``convert`` normalises what it keeps).
        tone_style: recorded in the report.

    Returns:
        The kept items, the data report, and the label errors use for the source.
    """
    options = _RowOptions(skip_bad_rows, normalize, tone_style, None)
    table = _open_source(source, suffixes)
    report = table.new_report(options)
    table.rows = [(number, row if isinstance(row, BadRow) else (number, row)) for number, row in table.rows]
    items = _collect(table, lambda numbered: convert(numbered[1], numbered[0], table.cells_are_text), report,
                     options)
    return items, report, table.label


def _collect(table: _Table, convert: Callable[[Any], tuple[Any, str]], report: DataReport,
             options: _RowOptions) -> list[Any]:
    """Converts every row; bad rows raise (strict) or are counted; None results are dropped."""
    kept: list[Any] = []
    for number, row in table.rows:
        if options.limit is not None and len(kept) >= options.limit:
            break
        report.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            result, kind = convert(row)
        except BadRow as bad:
            if not options.skip_bad_rows:
                raise _located_error(bad, table, number) from None
            where = f"{table.locate(number)}: {bad.field}" if bad.field else table.locate(number)
            report._skip(bad.reason, f"{where}: {bad.message}")
            continue
        if result is None:  # dropped on purpose (an empty document): `kind` says why
            report._skip(kind, f"{table.locate(number)}: {kind.replace('_', ' ')}")
            continue
        kept.append(result)
        report.formats[kind] += 1
    report.rows_used = len(kept)
    return kept


def _located_error(bad: BadRow, table: _Table, number: int) -> DataError:
    error = DataError(f"{bad.message}. {_SKIP_HINT}", path=table.label, line=number, field=bad.field)
    if table.unit == "row":
        # DataError always says "line"; a JSON list, parquet file or hub dataset has rows
        error.args = (str(error).replace(f", line {number}", f", row {number}", 1),)
    return error


def _reasons(report: DataReport) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in report.skip_reasons.most_common()) \
        or "none skipped"


# --- chat rows ------------------------------------------------------------------------------------


def _load_chat_rows(source: str | Path, text_field: str | None,
                    options: _RowOptions) -> tuple[list[dict[str, Any]], DataReport]:
    table = _open_source(source, CHAT_SUFFIXES)
    report = table.new_report(options)

    def to_chat(row: Any) -> tuple[dict[str, Any], str]:
        messages, kind = _chat_messages(row, text_field, table.cells_are_text)
        stats = _normalize_messages(messages, options)
        # after normalising: an answer of only zero-width characters is empty
        _check_assistant_turns(messages)
        report.text.add(stats)  # only rows that are kept count
        return {"messages": [_without_field_path(m) for m in messages]}, kind

    rows = _collect(table, to_chat, report, options)
    if not rows:
        raise DataError(f"no usable rows: all {report.rows_read} rows were skipped "
                        f"({_reasons(report)}); see the first ones: {report.skipped_examples[:3]}",
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
    if any(name in row for name in (*_MCQ_OPTION_FIELDS, "correct_answer", "answer_key")):
        schema = "mcq_para" if "para" in row or "answer_key" in row else "mcq_context"
        return _mcq_messages(row, schema), schema
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
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [{"role": "system", "content": system, "_field": "system"}] if system.strip() else []
    messages.append({"role": "user", "content": user, "_field": "instruction"})
    messages.append({"role": "assistant", "content": output, "_field": "output"})
    return messages


def _mcq_messages(row: dict[str, Any], schema: str) -> list[dict[str, Any]]:
    context_field, key_field = _MCQ_SCHEMAS[schema]
    context = _required_text(row, context_field, numbers_ok=True)
    question = _required_text(row, "question", numbers_ok=True)
    options = {letter: _required_text(row, name, numbers_ok=True)
               for letter, name in zip(MCQ_LETTERS, _MCQ_OPTION_FIELDS)}
    key = _required_text(row, key_field, numbers_ok=True)  # a number key is a bad key, not a type error
    match = _MCQ_KEY.fullmatch(key.strip())
    if match is None:
        raise BadRow("bad_mcq_key", f"answer key {key!r} is not one of A, B, C, D", key_field)
    return [
        {"role": "user", "content": mcq_user_prompt(context), "_field": context_field},
        {"role": "assistant", "content": format_mcq(question, options, match.group(1)),
         "_field": "question"},
    ]


def _required_text(row: dict[str, Any], name: str, numbers_ok: bool = False) -> str:
    text = _text_or_empty(row, name, required=True, numbers_ok=numbers_ok)
    if not text.strip():
        raise BadRow("empty_field", f"{name!r} is empty", name)
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


def _normalize_messages(messages: list[dict[str, Any]], options: _RowOptions) -> TextStats:
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
        if not message["content"].strip():
            raise BadRow("empty_assistant", "the assistant turn is empty", message["_field"])


def _without_field_path(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key != "_field"}


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- corpus rows ----------------------------------------------------------------------------------


def _corpus_document(row: Any, text_field: str, options: _RowOptions,
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
    if options.normalize:
        (normalized,), stats = normalize_with_counts([text], options.tone_style)
        if normalized.strip():
            report.text.add(stats)  # only documents that are kept count
        text = normalized
    return text if text.strip() else None


# --- validation split -----------------------------------------------------------------------------


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


def _split_rows(rows: list[dict[str, Any]], val_size: float | int, seed: int,
                label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    count = _validation_count(len(rows), val_size)
    if count == 0:
        return rows, []
    if count >= len(rows):
        raise DataError(f"val_size={val_size} would leave no training rows ({len(rows)} usable rows); "
                        "lower val_size or add rows", path=label)
    # sample indices, keep file order in both parts: easier to trace a row back to its line
    chosen = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for index, row in enumerate(rows) if index not in chosen]
    validation = [row for index, row in enumerate(rows) if index in chosen]
    return train, validation
