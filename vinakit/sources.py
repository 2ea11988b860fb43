"""Reading rows from any source with located errors: local files, the kit's sample data, hub datasets.

A source is a local file (.jsonl, .json, .csv, .parquet, .txt), a sample alias (``vinakit:chat``,
``vinakit:mcq``, ``vinakit:corpus``) or a Hugging Face hub dataset id (``name`` or ``name:split``). Its rows are
numbered as errors show them (1-based line for jsonl/csv/txt, row for a json list, parquet or hub dataset).
:func:`collect_rows` converts every row with a caller's function: a row it cannot use (:class:`BadRow`) raises a
:class:`~vinakit.errors.DataError` naming file, line and field, or with ``skip_bad_rows`` is skipped and counted
by reason in the :class:`DataReport`, which goes into the run manifest. :mod:`vinakit.data` turns rows into
conversations and documents; evaluation reads its contexts and VMLU questions through :func:`read_rows`.

Only the standard library is imported at module level: pyarrow and datasets load inside functions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vinakit.errors import DataError, ParamsError
from vinakit.text import TONE_STYLES, TextStats

SAMPLE_FILES = {
    "vinakit:chat": "chat_vi.jsonl",
    "vinakit:mcq": "mcq_tinhoc.csv",
    "vinakit:corpus": "corpus_vi.txt",
}


CHAT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


CORPUS_SUFFIXES = (".txt", *CHAT_SUFFIXES)


MAX_SKIPPED_EXAMPLES = 20


# Suffixes that mark a string as a file path even when the file is missing (a hub id has none).
_FILE_LIKE_SUFFIXES = frozenset({*CORPUS_SUFFIXES, ".tsv", ".xlsx", ".xls", ".ods", ".gz", ".zip",
                                 ".bz2", ".xz", ".arrow", ".md", ".ndjson"})


_SKIP_HINT = "Fix the row, or set skip_bad_rows: true to skip such rows."


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

    def rows(self) -> list[tuple[str, Any]]:
        """The report as (name, value) rows for a table: counts, skip reasons, formats, normalisations."""
        fixes = {name: count for name, count in self.text.to_dict().items()
                 if name not in ("strings", "changed") and count}
        rows: list[tuple[str, Any]] = [("source", self.source), ("rows read", self.rows_read),
                                       ("rows used", self.rows_used), ("rows skipped", self.rows_skipped)]
        rows += [(f"skipped: {reason}", count) for reason, count in self.skip_reasons.most_common()]
        rows += [(f"format: {name}", count) for name, count in self.formats.most_common()]
        rows.append(("text normalised", f"{self.tone_style} tone style, {self.text.changed} of "
                                        f"{self.text.strings} strings changed" if self.normalized else "no"))
        rows += [(f"normalised: {name}", count) for name, count in fixes.items()]
        rows += [("split", self.split), ("train rows", self.train_rows), ("validation rows", self.validation_rows)]
        return rows

    def _repr_html_(self) -> str:
        from vinakit.display import html_table

        tables = html_table(self.rows(), "Data report")
        if self.validation_report is not None:
            tables += html_table(self.validation_report.rows(), "Validation source")
        return tables

    def __repr__(self) -> str:
        from vinakit.display import one_line

        return one_line("DataReport", source=self.source, rows_read=self.rows_read, rows_used=self.rows_used,
                        rows_skipped=self.rows_skipped)

    def skip(self, reason: str, example: str) -> None:
        self.skip_reasons[reason] += 1
        if len(self.skipped_examples) < MAX_SKIPPED_EXAMPLES:
            self.skipped_examples.append(example)


@dataclass(frozen=True)
class RowOptions:
    skip_bad_rows: bool
    normalize: bool
    tone_style: str
    limit: int | None


def check_tone_style(tone_style: str) -> None:
    if tone_style not in TONE_STYLES:
        raise ParamsError(f"tone_style must be one of {', '.join(TONE_STYLES)}, got {tone_style!r}")


@dataclass
class Table:
    """The rows of one source, each numbered as errors should show it."""

    label: str                       # the file path or dataset id that errors name
    description: str                 # what the report calls the source
    unit: str                        # "line" (jsonl, csv, txt) or "row" (json list, parquet, hub)
    rows: Iterable[tuple[int, Any]]  # (1-based line or row, parsed row or a BadRow)
    path: str | None = None
    sha256: str | None = None
    cells_are_text: bool = False     # csv: a list column arrives as a JSON string

    def new_report(self, options: RowOptions) -> DataReport:
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


def open_source(source: str | Path, suffixes: tuple[str, ...]) -> Table:
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


def _read_file(path: Path, description: str, suffixes: tuple[str, ...]) -> Table:
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
    table = Table(label=label, description=description, unit="line", rows=[],
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


def _hub_table(dataset_id: str) -> Table:
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
    return Table(label=dataset_id, description=f"hub:{name} split={split}", unit="row",
                  rows=enumerate(dataset, start=1))


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
    options = RowOptions(skip_bad_rows, normalize, tone_style, None)
    table = open_source(source, suffixes)
    report = table.new_report(options)
    table.rows = [(number, row if isinstance(row, BadRow) else (number, row)) for number, row in table.rows]
    items = collect_rows(table, lambda numbered: convert(numbered[1], numbered[0], table.cells_are_text), report,
                     options)
    return items, report, table.label


def collect_rows(table: Table, convert: Callable[[Any], tuple[Any, str]], report: DataReport,
             options: RowOptions) -> list[Any]:
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
            report.skip(bad.reason, f"{where}: {bad.message}")
            continue
        if result is None:  # dropped on purpose (an empty document): `kind` says why
            report.skip(kind, f"{table.locate(number)}: {kind.replace('_', ' ')}")
            continue
        kept.append(result)
        report.formats[kind] += 1
    report.rows_used = len(kept)
    return kept


def _located_error(bad: BadRow, table: Table, number: int) -> DataError:
    error = DataError(f"{bad.message}. {_SKIP_HINT}", path=table.label, line=number, field=bad.field)
    if table.unit == "row":
        # DataError always says "line"; a JSON list, parquet file or hub dataset has rows
        error.args = (str(error).replace(f", line {number}", f", row {number}", 1),)
    return error


def skip_summary(report: DataReport) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in report.skip_reasons.most_common()) \
        or "none skipped"

