"""Preference pairs: reading them in every common format, the checks, and the embedded Vietnamese set.

Row formats (detected per row, like the chat formats of :mod:`vinakit.data`):

* ``prompt``/``chosen``/``rejected`` as strings (TRL's standard form; the prompt becomes one user turn);
* the same with ``prompt`` a list of messages and ``chosen``/``rejected`` lists of assistant messages or strings
  (TRL's conversational form);
* ``chosen``/``rejected`` full conversations that share their prefix and no ``prompt`` (UltraFeedback style);
* KTO's unpaired ``prompt`` + ``completion`` + ``label``: recognised and refused by name (no KTO stage yet).

Every kept row is ``{"prompt": [messages ending with a user turn], "chosen": str, "rejected": str, "defect": str}``.
Bad rows raise a :class:`~vinakit.errors.DataError` naming file, line and field, or are skipped and counted
(``skip_bad_rows``); besides the chat checks, a pair whose two replies are equal, whose prompts differ, or that
has an empty reply is bad.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vinakit.errors import DataError
from vinakit.sources import CHAT_SUFFIXES, BadRow, DataReport, RowOptions, collect_rows, open_source, skip_summary
from vinakit.text import is_blank, normalize_with_counts

PREFERENCE_SAMPLE = "vinakit:preference"
SAMPLE_FILE = Path(__file__).resolve().parent / "sample_data" / "preference_vi.jsonl"
MCQ_DEFECTS = ("duplicate_options", "key_in_question", "wrong_key", "missing_answer_line", "catch_all_option",
               "english_answer")
CHAT_DEFECTS = ("wrong_answer", "english_answer", "off_topic", "no_diacritics")
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass
class PreferenceData:
    """Train and validation pairs and the data report (for the manifest)."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    report: DataReport


def load_preference_dataset(source: str, *, val_size: float = 0.0, skip_bad_rows: bool = False,
                            normalize: bool = True, tone_style: str = "old", seed: int = 0,
                            exclude_prompts: frozenset[str] = frozenset()) -> PreferenceData:
    """Read, check, clean and split preference pairs.

    Args:
        source: a .jsonl/.json/.csv/.parquet file, ``vinakit:preference`` or a hub dataset id.
        val_size: fraction or row count held out (0: none).
        skip_bad_rows: skip and count bad rows instead of raising a located DataError.
        normalize: NFC, one tone-mark style (``tone_style``), as for SFT data.
        tone_style: see :func:`vinakit.text.normalize_vietnamese`.
        seed: seed of the split.
        exclude_prompts: last-user-turn texts to leave out (an SFT run's validation prompts, so evaluation stays
            held out); counted as ``held_out_by_sft_run``.

    Raises:
        DataError: a bad row (strict mode) or no usable pair.
    """
    from vinakit.data import split_rows

    options = RowOptions(skip_bad_rows, normalize, tone_style, None)
    table = open_source(_sample_or(source), CHAT_SUFFIXES)
    report = table.new_report(options)

    def convert(row: Any) -> tuple[dict[str, Any] | None, str]:
        pair, kind = read_pair(row, table.cells_are_text)
        if normalize:
            texts, stats = normalize_with_counts(_texts(pair), tone_style)
            _put_texts(pair, texts)
            report.text.add(stats)
        if pair["prompt"][-1]["content"] in exclude_prompts:
            return None, "held_out_by_sft_run"
        return pair, kind

    rows = collect_rows(table, convert, report, options)
    if not rows:
        raise DataError(f"no usable pairs: all {report.rows_read} rows were skipped ({skip_summary(report)}); "
                        f"see the first ones: {report.skipped_examples[:3]}", path=table.label)
    train, validation = split_rows(rows, val_size, seed, report.source, unit="pairs")
    report.split = f"val_size={val_size} seed={seed}" if validation else "none"
    report.train_rows, report.validation_rows = len(train), len(validation)
    return PreferenceData(train, validation, report)


def _sample_or(source: str) -> str | Path:
    return SAMPLE_FILE if source == PREFERENCE_SAMPLE else source


def read_pair(row: Any, cells_are_text: bool = False) -> tuple[dict[str, Any], str]:
    """One row as ``{"prompt", "chosen", "rejected", "defect"}`` and its format name.

    Raises:
        BadRow: the row fits no format, or fails a check (the reason names it: ``same_reply``,
            ``prompts_differ``, ``empty_reply``, ``prompt_not_user`` ...).
    """
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"expected an object with chosen/rejected, got {type(row).__name__}")
    row = {key: _maybe_json(value) if cells_are_text else value for key, value in row.items()}
    if "completion" in row and "label" in row:
        raise BadRow("unpaired_row", "an unpaired (KTO) row with completion + label: this kit trains paired "
                     "ORPO/DPO only; give prompt, chosen and rejected", "completion")
    for name in ("chosen", "rejected"):
        if name not in row:
            raise BadRow("missing_field", f"missing field {name!r}; a pair needs chosen and rejected", name)
    if "prompt" in row:
        prompt, kind = _messages(row["prompt"], "prompt", as_user=True), "standard"
        chosen, rejected = (_reply(row[name], name, prompt) for name in ("chosen", "rejected"))
        kind = "conversational" if not isinstance(row["prompt"], str) else kind
    else:
        prompt, chosen, rejected = _split_shared_prefix(row["chosen"], row["rejected"])
        kind = "implicit_prompt"
    _check_pair(prompt, chosen, rejected)
    defect = row.get("defect", "")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "defect": defect if isinstance(defect, str) else ""}, kind


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _messages(value: Any, name: str, as_user: bool = False) -> list[dict[str, str]]:
    if isinstance(value, str) and as_user:
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRow("wrong_type", f"{name!r} must be a string or a non-empty list of {{role, content}} messages",
                     name)
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise BadRow("wrong_type", f"message {number} of {name!r} is not a {{role, content}} object", name)
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role not in _ROLES:
            raise BadRow("unknown_role", f"message {number} of {name!r} has role {role!r}; use system, user or "
                         "assistant", name)
        if not isinstance(content, str):
            raise BadRow("wrong_type", f"message {number} of {name!r} needs a string content", name)
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def _reply(value: Any, name: str, prompt: list[dict[str, str]]) -> str:
    """A reply given as a string, or as a list ending with the assistant reply (a leading copy of the prompt is
    allowed, a different one is ``prompts_differ``)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise BadRow("no_reply", f"{name!r} must end with an assistant message", name)
    if len(messages) > 1 and messages[:-1] != prompt:
        raise BadRow("prompts_differ", f"{name!r} carries a conversation that differs from 'prompt'; the two "
                     "replies of a pair must answer the same prompt", name)
    return messages[-1]["content"]


def _split_shared_prefix(chosen: Any, rejected: Any) -> tuple[list[dict[str, str]], str, str]:
    """UltraFeedback style: two full conversations; the prompt is everything before the last message."""
    first, second = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for name, messages in (("chosen", first), ("rejected", second)):
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise BadRow("no_reply", f"{name!r} must be a conversation ending with an assistant reply", name)
    if first[:-1] != second[:-1]:
        raise BadRow("prompts_differ", "chosen and rejected conversations differ before their last reply; a pair "
                     "must answer the same prompt", "rejected")
    return first[:-1], first[-1]["content"], second[-1]["content"]


def _check_pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> None:
    if prompt[-1]["role"] != "user":
        raise BadRow("prompt_not_user", "the prompt must end with a user turn", "prompt")
    if any(is_blank(message["content"]) for message in prompt if message["role"] == "user"):
        raise BadRow("empty_prompt", "a user turn of the prompt is empty", "prompt")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if is_blank(reply):
            raise BadRow("empty_reply", f"the {name} reply is empty (or only invisible characters)", name)
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise BadRow("same_reply", "chosen and rejected are the same text: the pair teaches nothing", "rejected")


def _texts(pair: dict[str, Any]) -> list[str]:
    return [message["content"] for message in pair["prompt"]] + [pair["chosen"], pair["rejected"]]


def _put_texts(pair: dict[str, Any], texts: list[str]) -> None:
    for message, text in zip(pair["prompt"], texts):
        message["content"] = text
    pair["chosen"], pair["rejected"] = texts[-2], texts[-1]


# --------------------------------------------------------------------------------------------------------------
# Tokenising pairs


@dataclass
class TokenizedPairs:
    """Tokenised pairs (``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``, ``defect``) and the
    pairs dropped, by reason."""

    rows: list[dict[str, Any]]
    dropped: Counter

    def summary(self) -> dict[str, Any]:
        """For the manifest."""
        return {"pairs": len(self.rows), "dropped": dict(self.dropped)}


def tokenize_pairs(tokenizer: Any, pairs: Sequence[Mapping[str, Any]], max_length: int,
                   max_prompt_length: int | None = None) -> TokenizedPairs:
    """Tokenise pairs exactly (:func:`vinakit.chat.tokenize_preference`); pairs that cannot fit or render are
    dropped and counted."""
    from vinakit.chat import ChatTemplateError, ResponseTruncatedError, tokenize_preference

    rows, dropped = [], Counter()
    for pair in pairs:
        try:
            ids = tokenize_preference(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"],
                                      max_length=max_length, max_prompt_length=max_prompt_length)
        except ResponseTruncatedError:
            dropped["pair longer than max_length"] += 1
        except ChatTemplateError as error:
            dropped[error.reason] += 1
        else:
            rows.append({**ids, "defect": pair.get("defect", "")})
    return TokenizedPairs(rows, dropped)


def naive_pair_ids(tokenizer: Any, prompt: Sequence[Mapping[str, Any]], reply: str) -> list[int]:
    """What naive pipelines do: the generation prompt tokenised alone, then reply + end-of-turn text alone."""
    from vinakit.chat import end_of_turn_token

    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    reply_ids = tokenizer(reply + end_of_turn_token(tokenizer), add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=False)["input_ids"] + reply_ids


def naive_mismatches(tokenizer: Any, pairs: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(replies whose naive ids differ from the exact ones, replies compared)."""
    from vinakit.chat import tokenize_preference

    differ = total = 0
    for pair in pairs:
        exact = tokenize_preference(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"])
        for side in ("chosen", "rejected"):
            total += 1
            differ += naive_pair_ids(tokenizer, pair["prompt"], pair[side]) != (
                exact["prompt_input_ids"] + exact[f"{side}_input_ids"])
    return differ, total


# --------------------------------------------------------------------------------------------------------------
# The embedded set: MCQ pairs (one defect each) and general chat pairs


def mcq_pair(mcq: Any, defect: str) -> dict[str, Any]:
    """A pair from one MCQ row: the clean MCQ against the same MCQ with ``defect`` (one of ``MCQ_DEFECTS``)."""
    from vinakit.data import format_mcq, mcq_user_prompt

    options, key = dict(mcq.options), mcq.answer
    others = [letter for letter in "ABCD" if letter != key]
    chosen = format_mcq(mcq.question, options, key)
    if defect == "duplicate_options":
        bad = dict(options, **{others[1]: options[others[0]]})
        rejected = format_mcq(mcq.question, bad, key)
    elif defect == "key_in_question":
        rejected = format_mcq(f"{mcq.question.rstrip('?')} ({options[key]})?", options, key)
    elif defect == "wrong_key":
        rejected = format_mcq(mcq.question, options, others[len(mcq.question) % 3])
    elif defect == "missing_answer_line":
        rejected = chosen.rsplit("\n", 1)[0]
    elif defect == "catch_all_option":
        rejected = format_mcq(mcq.question, dict(options, **{others[-1]: "Tất cả các đáp án trên"}), key)
    elif defect == "english_answer":
        lines = [f"Question: {_english_stub(mcq.question)}"] + [f"{letter}. {options[letter]}" for letter in "ABCD"]
        rejected = "Here is a multiple-choice question.\n" + "\n".join(lines) + f"\nAnswer: {key}"
    else:
        raise ValueError(f"unknown MCQ defect {defect!r}; use one of {MCQ_DEFECTS}")
    return {"prompt": [{"role": "user", "content": mcq_user_prompt(mcq.context)}], "chosen": chosen,
            "rejected": rejected, "defect": defect, "source": "mcq_tinhoc.csv"}


def _defect_for(mcq: Any, index: int) -> str:
    """The defects in turn, where eval can see them: a key of one short syllable ("L1", "26") cannot leak
    detectably (:func:`vinakit.mcq.key_leaks_into_question` ignores it), and options of punctuation only ("//",
    "#") already count as duplicates; those rows get a wrong key instead."""
    from vinakit.mcq import duplicate_option_pairs, key_leaks_into_question

    defect = MCQ_DEFECTS[index % len(MCQ_DEFECTS)]
    key = mcq.options[mcq.answer]
    if defect == "key_in_question" and not key_leaks_into_question(f"{mcq.question} {key}", key):
        return "wrong_key"
    if defect == "duplicate_options" and duplicate_option_pairs(mcq.options)[0]:
        return "wrong_key"
    return defect


def _english_stub(question: str) -> str:
    """An English framing of the stem (the kit has no translator; the defect is the language of the reply)."""
    return f"According to the passage, which option is right? ({question})"


def strip_diacritics(text: str) -> str:
    """Vietnamese without tone marks and vowel hats (``đ`` becomes ``d``): the diacritic-less defect."""
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if unicodedata.category(c) != "Mn"))


def chat_pairs(items: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Pairs from hand-written items ``{question, answer, wrong, english}``: each correct answer against the wrong
    one, the English one, the diacritic-less one and (cycling) another item's answer as the off-topic one."""
    pairs = []
    for index, item in enumerate(items):
        other = items[(index + 1) % len(items)]["answer"]
        for defect, rejected in (("wrong_answer", item["wrong"]), ("english_answer", item["english"]),
                                 ("no_diacritics", strip_diacritics(item["answer"])), ("off_topic", other)):
            pairs.append({"prompt": [{"role": "user", "content": item["question"]}], "chosen": item["answer"],
                          "rejected": rejected, "defect": defect, "source": "hand-written"})
    return pairs


def build_embedded_set(mcq_csv: Path, chat_items: Path) -> list[dict[str, Any]]:
    """The embedded preference set: every MCQ row of ``mcq_csv`` with the defects in turn, then the chat pairs."""
    import csv

    from vinakit.data import read_mcq_row

    with mcq_csv.open(encoding="utf-8") as handle:
        mcqs = [read_mcq_row(row) for row in csv.DictReader(handle)]
    pairs = [mcq_pair(mcq, _defect_for(mcq, index)) for index, mcq in enumerate(mcqs)]
    items = [json.loads(line) for line in chat_items.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pairs + chat_pairs(items)
