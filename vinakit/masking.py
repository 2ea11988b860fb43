"""Masking previews: a tokenised example decoded with its trained tokens marked (text for the run folder, HTML for
the notebook). Moved out of :mod:`vinakit.chat`, which computes the labels shown here."""

from __future__ import annotations

import html as html_lib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vinakit.chat import IGNORE_INDEX
from vinakit.record import write_text

TRAINED_HTML_STYLE = "background:#c8f7c5"


def masking_preview(tokenizer: Any, example: Mapping[str, Sequence[int]], html: bool = False) -> str:
    """The decoded sequence with the trained tokens marked.

    Args:
        tokenizer: the tokenizer that produced the example.
        example: a dict with ``input_ids`` and ``labels`` (as from ``tokenize_conversation``).
        html: False wraps trained spans in ``[[`` ``]]``; True returns HTML with trained spans highlighted, the
            rest escaped and newlines shown as ``↵``.
    """
    pieces = []
    for trained, token_ids in _runs(example["input_ids"], example["labels"]):
        piece = tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if html:
            piece = html_lib.escape(piece).replace("\n", "↵\n")
            pieces.append(f'<span style="{TRAINED_HTML_STYLE}">{piece}</span>' if trained else piece)
        else:
            pieces.append(f"[[{piece}]]" if trained else piece)
    joined = "".join(pieces)
    return f'<pre style="white-space:pre-wrap">{joined}</pre>' if html else joined


def write_masking_preview(path: str | Path, tokenizer: Any, examples: Sequence[Mapping[str, Sequence[int]]],
                          n: int = 5) -> Path:
    """Write the text masking preview of the first ``n`` examples to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = []
    for number, example in enumerate(list(examples)[:n], start=1):
        trained = sum(label != IGNORE_INDEX for label in example["labels"])
        header = (f"=== example {number}: {len(example['input_ids'])} tokens, {trained} trained "
                  "(trained text inside [[ ]]) ===")
        blocks.append(f"{header}\n{masking_preview(tokenizer, example)}\n")
    write_text(Path(path), "\n".join(blocks))
    return path


def _runs(input_ids: Sequence[int], labels: Sequence[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs
