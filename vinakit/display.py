"""Notebook displays of the kit's results: one HTML table helper and the number formats they share.

Counts show as integers (``43707``, never ``43707.0``), other floats with 4 significant digits. A building
block: it imports no step module and nothing heavy.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from typing import Any

SIGNIFICANT_DIGITS = 4


def format_value(value: Any) -> str:
    """One value as a table shows it.

    Args:
        value: a number, string, bool, None, or a small list/dict.

    Returns:
        Integers (and integral floats such as a token count logged as 43707.0) without decimals, other floats
        with 4 significant digits, None as an empty string, lists joined with ", ".
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {format_value(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    return str(value)


def _format_float(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{SIGNIFICANT_DIGITS}g}"


def format_numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with integral floats as ints and other floats rounded to 4 significant digits."""
    return {key: _rounded(value) for key, value in values.items()}


def _rounded(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        value = float(_format_float(value))
        return int(value) if value.is_integer() and abs(value) < 1e15 else value
    return value


def html_table(rows: Mapping[str, Any] | Iterable[tuple[str, Any]], title: str | None = None) -> str:
    """A two-column HTML table (name, value), values formatted by :func:`format_value`.

    Args:
        rows: names and values, in display order.
        title: a caption above the table.

    Returns:
        The HTML, every text escaped.
    """
    items = rows.items() if isinstance(rows, Mapping) else rows
    body = "".join(f"<tr><th style=\"text-align:left\">{html.escape(str(name))}</th>"
                   f"<td style=\"text-align:left\">{html.escape(format_value(value))}</td></tr>"
                   for name, value in items)
    caption = f"<caption style=\"text-align:left\"><b>{html.escape(title)}</b></caption>" if title else ""
    return f"<table>{caption}{body}</table>"


def frame_html(frame: Any, title: str | None = None) -> str:
    """A DataFrame as HTML with the shared number formats, under an optional bold title."""
    heading = f"<p><b>{html.escape(title)}</b></p>" if title else ""
    return heading + frame.to_html(float_format=_format_float, na_rep="")


def one_line(name: str, **fields: Any) -> str:
    """A short one-line repr for logs: ``Name(a=1, b='x')``."""
    return f"{name}(" + ", ".join(f"{key}={value!r}" for key, value in fields.items()) + ")"


class Summary(dict):
    """A dict that a notebook shows as a table (counts as integers, floats with 4 significant digits)."""

    def __init__(self, values: Mapping[str, Any], title: str | None = None) -> None:
        super().__init__(format_numbers(values))
        self.title = title

    def _repr_html_(self) -> str:
        return html_table(self, self.title)


def evaluation_html(evaluation: Any) -> str:
    """The evaluation's metrics side by side (``Evaluation.comparison()``) as HTML."""
    return frame_html(evaluation.comparison(), "Evaluation: " + " vs ".join(r.label for r in evaluation.results))


def evaluation_repr(evaluation: Any) -> str:
    """A one-line repr of an evaluation: the models and the number of items."""
    return one_line("Evaluation", models=[r.label for r in evaluation.results],
                    items=len(evaluation.results[0].predictions) if evaluation.results else 0)


def model_result_html(result: Any) -> str:
    """One evaluated model's aggregate metrics as a table."""
    return html_table(result.summary, f"{result.label}: {result.model}")


def model_result_repr(result: Any) -> str:
    """A one-line repr of one evaluated model."""
    return one_line("ModelResult", label=result.label, model=result.model, items=len(result.predictions))


def tidy_notebook_table(trainer: Any) -> None:
    """Make transformers' notebook loss table show counts as integers and floats with 4 significant digits.

    In a notebook, transformers' ``NotebookProgressCallback`` prints every float with 6 decimals
    ("Num Tokens 43707.000000"); its instance in ``trainer`` is swapped, in place, for a subclass that formats
    the values first. Outside a notebook (no such callback) nothing changes.
    """
    from transformers.utils.notebook import NotebookProgressCallback

    callbacks = trainer.callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) is NotebookProgressCallback:
            callbacks[index] = _tidy_callback_class(NotebookProgressCallback)()


def _tidy_callback_class(base: type) -> type:
    class TidyNotebookProgressCallback(base):  # type: ignore[misc, valid-type]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            super().on_train_begin(args, state, control, **kwargs)
            self.training_tracker.write_line = _formatting(self.training_tracker.write_line)

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.training_tracker is not None:
                return super().on_evaluate(args, state, control, **kwargs)
            self.training_tracker = _OneTable()  # an evaluation after training: one table, formatted
            try:
                super().on_evaluate(args, state, control, **kwargs)
            finally:
                self.training_tracker = None

    return TidyNotebookProgressCallback


def _formatting(write_line: Any) -> Any:
    return lambda values: write_line({key: _cell(value) for key, value in values.items()})


class _OneTable:
    """Stands in for transformers' training tracker when an evaluation runs after training."""

    def write_line(self, values: dict[str, Any]) -> None:
        from IPython.display import HTML, display
        from transformers.utils.notebook import text_to_html_table

        display(HTML(text_to_html_table([list(values), [_cell(value) for value in values.values()]])))

    def remove_child(self) -> None:
        pass


def _cell(value: Any) -> Any:
    return format_value(value) if isinstance(value, float) else value
