"""Read the multiple-choice questions a model writes, and measure them.

A fine-tuned model is asked to write ``Câu hỏi: ... A. ... B. ... C. ... D. ... Đáp án: X`` about a passage
(:func:`vinakit.data.format_mcq` is the exact training format). Real outputs drift from it: lowercase or
bracketed labels (``a)``, ``(B)``, ``C:``, ``D/``), markdown bold, a preamble ("Dưới đây là câu hỏi..."), an
explanation after the key, ``Đáp án đúng là B``, the option text instead of the letter, English labels, NFD
text, CRLF line ends and leaked template tokens. :func:`parse_mcq` reads all of those and says precisely why an
output is unusable (fewer than four options, no key, a key outside A-D, cut off by the token budget).

The metrics follow DESIGN.md "MCQ generation evaluation": format validity (strict = the exact training
format, lenient = :func:`parse_mcq` succeeds), answer-letter distribution, option hygiene, grounding in the
context by syllable bigrams, diversity, and reference metrics on the question stem. Vietnamese is compared
after :func:`vinakit.text.normalize_vietnamese` (NFC, one tone-mark style) and tokenised by whitespace
syllables, never by an English tokenizer (``rouge_score``'s deletes Vietnamese letters).

Only the standard library is imported at module level; sacreBLEU loads inside the reference metrics.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from vinakit.data import MCQ_LETTERS as LETTERS
from vinakit.text import normalize_vietnamese


# Error codes: each entry of ParsedMCQ.errors starts with one of these, then ": <detail>".
NO_QUESTION = "no_question"
MISSING_OPTION = "missing_option"
EXTRA_OPTION = "extra_option"
EMPTY_OPTION = "empty_option"
NO_ANSWER = "no_answer"
ANSWER_OUT_OF_RANGE = "answer_out_of_range"
ANSWER_UNMATCHED = "answer_unmatched"
TRUNCATED = "truncated"

# --- cleaning ---------------------------------------------------------------------------------------------------

# A turn header a model may echo before its reply ("<|im_start|>assistant", Llama-3, Gemma).
_LEADING_HEADER = re.compile(
    r"^\s*(?:<\|im_start\|>\s*\w*|<\|start_header_id\|>\s*\w*\s*<\|end_header_id\|>|<start_of_turn>\s*\w*"
    r"|<\|assistant\|>|<s>|\[/INST\])\s*")
# Tokens that end a turn: whatever follows belongs to a turn the model invented.
_END_OF_TURN = re.compile(r"<\|im_end\|>|<\|eot_id\|>|<end_of_turn>|</s>|<\|endoftext\|>|<\|end\|>|<eos>")
# Any other special-looking token left in the text.
_OTHER_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|<(?:start|end)_of_turn>|</?s>|\[/?INST\]|<</?SYS>>|<unk>|<pad>")
_MARKDOWN_EMPHASIS = re.compile(r"\*+|__|`+")
_LEADING_DECORATION = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|[-•>][ \t]+|(?:=>|->|→)[ \t]*)", re.MULTILINE)

# --- structure --------------------------------------------------------------------------------------------------

# An option label at the start of a line: "A.", "a)", "(B)", "C:", "D/", "A -", "[C]".
_LINE_LABEL = re.compile(r"^[ \t]*[(\[]?([A-Ea-e])[ \t]?(?:[.):/\]]|[-–](?=[ \t]))[ \t]*", re.MULTILINE)
# An option label inside a line ("... đúng? A. Một B. Hai"): upper case and followed by a space, to keep
# initials and abbreviations out.
_INLINE_LABEL = re.compile(r"(?:(?<=\s)|^)[(\[]?([A-E])[.):\]][ \t]+")
# "Đáp án:", "Đáp án đúng là", "Đáp án B", "Câu trả lời:", "Answer:", "Correct answer is". The marker must be
# followed by a colon, "là"/"is" or a lone letter, so an option such as "Tất cả các đáp án trên" is no marker.
_ANSWER_MARKER = re.compile(
    r"(?<!\w)(?:đáp\s*án|(?:câu\s*)?trả\s*lời|(?:the\s+)?(?:correct\s+)?answer)"
    r"(?:\s+(?:đúng|chính\s*xác|correct))?"
    r"(?:\s*(?:[:：=\-–]|\blà\b|\bis\b)(?:\s*(?:là\b|[:：]))?|(?=\s*[(\[]?[A-Ea-e](?!\w)))\s*",
    re.IGNORECASE)
_QUESTION_LABEL = re.compile(r"^[ \t]*(?:câu\s*hỏi(?:\s*trắc\s*nghiệm)?|question|câu)[ \t]*\d*[ \t]*[:.)\-–][ \t]*",
                             re.IGNORECASE | re.MULTILINE)
_ANSWER_LETTER = re.compile(
    r"[(\[]?\s*(?:(?:câu|phương\s*án|đáp\s*án|lựa\s*chọn|option|chọn|choice)\s+)?([A-Za-z])(?!\w)", re.IGNORECASE)

# "Tất cả các đáp án trên", "Cả A, B và C", "Không có đáp án nào đúng", "All of the above".
_CATCH_ALL_OPTION = re.compile(
    r"tất\s*cả\s*(?:các\s*)?(?:đáp\s*án|phương\s*án|ý|câu|lựa\s*chọn)|cả\s+(?:ba|bốn|[abc])\b.*(?:đều|và)"
    r"|không\s*có\s*(?:đáp\s*án|phương\s*án|ý|câu)\s*nào|(?:all|none)\s+of\s+the\s+(?:above|others)"
    r"|các\s*(?:đáp\s*án|phương\s*án|ý)\s*trên\s*đều",
    re.IGNORECASE)


@dataclass
class ParsedMCQ:
    """One multiple-choice question read from model output.

    Attributes:
        question: the question stem (one line, whitespace collapsed), "" when none was found.
        options: option texts keyed by upper-case letter, in the order written ("A".."D", or "E" when written).
        answer: the declared key "A".."D", or None when missing or out of range.
        valid: True when the question, four non-empty options A-D and a key in A-D were all found.
        errors: reasons it is not valid, each "<code>: <detail>" with a code from this module.
        strict: valid *and* written exactly in the training format (:func:`vinakit.data.format_mcq`).
        answer_source: "letter" (a letter after the marker), "text" (the option's text), or "".
    """

    question: str
    options: dict[str, str]
    answer: str | None
    valid: bool
    errors: list[str] = field(default_factory=list)
    strict: bool = False
    answer_source: str = ""

    @property
    def key_text(self) -> str:
        """The text of the declared key's option ("" when there is none)."""
        return self.options.get(self.answer or "", "")

    @property
    def error_codes(self) -> list[str]:
        """The codes of :attr:`errors` (the part before the colon)."""
        return [error.split(":", 1)[0] for error in self.errors]


def parse_mcq(text: str | None) -> ParsedMCQ | None:
    """Read a multiple-choice question from what a model wrote.

    Args:
        text: the model's reply, as decoded (may hold template tokens, markdown, NFD text, CRLF).

    Returns:
        None when the text holds nothing that looks like an MCQ (no question label, no option label, no answer
        marker); otherwise a :class:`ParsedMCQ`, whose ``valid`` says whether it is usable and ``errors`` why not.
    """
    if text is None:
        return None
    raw = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    clean = _clean(raw)
    if not clean.strip():
        return None
    labels, option_end, answer_match = _locate_structure(clean)
    question_region = clean[:labels[0][1]] if labels else clean[:answer_match.start() if answer_match else None]
    question = _question_text(question_region) if (labels or answer_match) else _labelled_question(clean)
    if not labels and answer_match is None and not question:
        return None  # nothing of an MCQ at all: plain prose or noise
    errors: list[str] = []
    options = _option_texts(clean, labels, option_end, errors)
    answer, source = _read_answer(clean, answer_match, options, errors)
    if not question:
        errors.insert(0, f"{NO_QUESTION}: no question stem before the options")
    if answer_match is None and 0 < len(options) < len(LETTERS):
        errors.append(f"{TRUNCATED}: the text stops inside the options (raise max_new_tokens?)")
    valid = not errors
    parsed = ParsedMCQ(question=question, options=options, answer=answer, valid=valid, errors=errors,
                       answer_source=source)
    parsed.strict = valid and _is_canonical(text, parsed)
    return parsed


def _clean(text: str) -> str:
    text = _LEADING_HEADER.sub("", text)
    for end in _END_OF_TURN.finditer(text):
        if _OTHER_SPECIAL.sub("", text[:end.start()]).strip():
            text = text[:end.start()]  # the reply ended here; later text is an invented next turn
            break
    text = _OTHER_SPECIAL.sub("", text)
    text = _MARKDOWN_EMPHASIS.sub("", text)
    return _LEADING_DECORATION.sub("", text)


def _locate_structure(text: str) -> tuple[list[tuple[str, int, int]], int, re.Match[str] | None]:
    """Option labels (letter, start, end), where the options end, and the answer marker after them.

    Labels at line starts and labels inside lines are both tried; the reading that finds more options wins
    (line starts on a tie, since that is how most models write).
    """
    best: tuple[list[tuple[str, int, int]], int, re.Match[str] | None] = ([], len(text), None)
    for pattern in (_LINE_LABEL, _INLINE_LABEL):
        first_a = next((m for m in pattern.finditer(text) if m.group(1).upper() == "A"), None)
        search_from = first_a.start() if first_a else 0
        answer = _ANSWER_MARKER.search(text, search_from)
        end = answer.start() if answer else len(text)
        labels = _label_chain(pattern, text, first_a, end) if first_a else []
        if len(labels) > len(best[0]) or (not best[0] and best[2] is None):
            best = (labels, end, answer)
    return best


def _label_chain(pattern: re.Pattern[str], text: str, first_a: re.Match[str],
                 end: int) -> list[tuple[str, int, int]]:
    """Labels in alphabetical order from the first "A"; a letter going backwards starts a second MCQ."""
    labels = [("A", first_a.start(), first_a.end())]
    for match in pattern.finditer(text, first_a.end(), end):
        letter = match.group(1).upper()
        if letter <= labels[-1][0]:
            break
        labels.append((letter, match.start(), match.end()))
    return labels


def _question_text(region: str) -> str:
    labelled = list(_QUESTION_LABEL.finditer(region))
    if labelled:
        lines = region[labelled[-1].end():].strip().split("\n")
    else:
        # No label: a preamble ("Dưới đây là câu hỏi:") ends with a colon; the stem is the last paragraph.
        paragraphs = [p for p in re.split(r"\n\s*\n", region.strip()) if p.strip()]
        lines = [line for line in (paragraphs[-1].split("\n") if paragraphs else []) if line.strip()]
        while len(lines) > 1 and lines[0].rstrip().endswith(":"):
            lines.pop(0)
    lines = [line for line in lines if line.strip()]
    while len(lines) > 1 and lines[-1].rstrip().endswith(":") and len(lines[-1].split()) <= 5:
        lines.pop()  # "Các phương án:" between the stem and the options
    return _one_line(" ".join(lines))


def _labelled_question(text: str) -> str:
    match = _QUESTION_LABEL.search(text)
    return _one_line(text[match.end():]) if match else ""


def _option_texts(text: str, labels: list[tuple[str, int, int]], end: int, errors: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for index, (letter, _, text_start) in enumerate(labels):
        text_end = labels[index + 1][1] if index + 1 < len(labels) else end
        options[letter] = _one_line(text[text_start:text_end])
    missing = [letter for letter in LETTERS if letter not in options]
    if missing:
        found = ", ".join(options) or "none"
        errors.append(f"{MISSING_OPTION}: fewer than four options A-D (found {found}; missing {', '.join(missing)})")
    extra = [letter for letter in options if letter not in LETTERS]
    if extra:
        errors.append(f"{EXTRA_OPTION}: more than four options ({', '.join(extra)})")
    empty = [letter for letter, value in options.items() if not value]
    if empty:
        errors.append(f"{EMPTY_OPTION}: option {', '.join(empty)} has no text")
    return options


def _read_answer(text: str, marker: re.Match[str] | None, options: Mapping[str, str],
                 errors: list[str]) -> tuple[str | None, str]:
    """The key after the marker: a letter, or the text of one option."""
    if marker is None:
        errors.append(f"{NO_ANSWER}: no answer key ('Đáp án: X') found")
        return None, ""
    after = text[marker.end():].strip()
    first_line = after.split("\n", 1)[0].strip()
    if not first_line:
        errors.append(f"{TRUNCATED}: nothing follows '{marker.group(0).strip()}' (raise max_new_tokens?)")
        return None, ""
    letter = _ANSWER_LETTER.match(first_line)
    if letter:
        key = letter.group(1).upper()
        if key in LETTERS:
            return key, "letter"
        errors.append(f"{ANSWER_OUT_OF_RANGE}: the key {letter.group(1)!r} is not one of A-D")
        return None, "letter"
    key = _option_matching(first_line, options)
    if key is None:
        errors.append(f"{ANSWER_UNMATCHED}: the key {first_line[:60]!r} is neither a letter nor an option's text")
        return None, ""
    return key, "text"


def _option_matching(answer_text: str, options: Mapping[str, str]) -> str | None:
    """The letter whose option text the answer states (the longest option contained in it wins)."""
    wanted = comparable(answer_text)
    matches = [(len(comparable(value)), letter) for letter, value in options.items()
               if letter in LETTERS and comparable(value) and comparable(value) in wanted]
    if not matches:
        return None
    matches.sort(reverse=True)
    if len(matches) > 1 and matches[0][0] == matches[1][0]:
        return None  # two options with the same text: the key is ambiguous
    return matches[0][1]


def _is_canonical(text: str, parsed: ParsedMCQ) -> bool:
    """The exact training text, byte for byte (NFD, CRLF or markdown make an output lenient-only)."""
    from vinakit.data import format_mcq

    return text.strip() == format_mcq(parsed.question, {k: parsed.options[k] for k in LETTERS}, parsed.answer or "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- comparing Vietnamese ---------------------------------------------------------------------------------------


def comparable(text: str) -> str:
    """Text as compared: NFC, one tone-mark style, lower case, punctuation dropped, single spaces."""
    return " ".join(syllables(text))


def syllables(text: str) -> list[str]:
    """Lower-cased whitespace syllables without punctuation ("Công nghệ," -> ["công", "nghệ"])."""
    normalized = normalize_vietnamese(text or "").casefold()
    return re.findall(r"\w+", normalized)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of a token list, in order (empty when it is shorter than n)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def grounding(text: str, context: str) -> float | None:
    """Share of the text's syllable bigrams that occur in the context (unigrams for a one-syllable text).

    Returns:
        A share in [0, 1], or None when the text has no syllables.
    """
    tokens = syllables(text)
    if not tokens:
        return None
    n = 2 if len(tokens) >= 2 else 1
    source = set(ngrams(syllables(context), n))
    grams = ngrams(tokens, n)
    return sum(gram in source for gram in grams) / len(grams)


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct-n: unique n-grams over all n-grams of the texts (None when there are none)."""
    grams = [gram for text in texts for gram in ngrams(syllables(text), n)]
    return len(set(grams)) / len(grams) if grams else None


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace syllables (a Vietnamese-safe ROUGE-L)."""
    hyp, ref = syllables(hypothesis), syllables(reference)
    if not hyp or not ref:
        return 0.0
    lcs = _lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def option_similarity(first: str, second: str) -> float:
    """Similarity of two options in [0, 1] (difflib ratio over comparable text)."""
    return difflib.SequenceMatcher(None, comparable(first), comparable(second)).ratio()


def duplicate_option_pairs(options: Mapping[str, str], threshold: float = 0.8) -> tuple[int, int]:
    """Count option pairs that are the same after normalisation, and near-duplicate pairs.

    Args:
        options: option texts by letter.
        threshold: similarity (see :func:`option_similarity`) from which a different pair counts as near.

    Returns:
        ``(exact pairs, near pairs)``; a pair counts in one of the two at most.
    """
    values = [comparable(value) for _, value in sorted(options.items())]
    exact = near = 0
    for i, first in enumerate(values):
        for second in values[i + 1:]:
            if first == second:
                exact += 1
            elif difflib.SequenceMatcher(None, first, second).ratio() >= threshold:
                near += 1
    return exact, near


def key_leaks_into_question(question: str, key_text: str) -> bool:
    """True when the key's text is written in the question (a giveaway).

    Keys of one short syllable ("Có", "Hai") are ignored: they occur in questions by chance.
    """
    key = syllables(key_text)
    if not key or (len(key) == 1 and len(key[0]) < 4):
        return False
    return f" {' '.join(key)} " in f" {comparable(question)} "


def is_catch_all_option(option: str) -> bool:
    """True for "tất cả các đáp án trên"-style options (all/none of the above, "cả A và B")."""
    return bool(_CATCH_ALL_OPTION.search(normalize_vietnamese(option)))


# --- per item and aggregate -------------------------------------------------------------------------------------


def item_metrics(parsed: ParsedMCQ | None, context: str, reference_question: str = "",
                 near_duplicate_threshold: float = 0.8) -> dict[str, Any]:
    """The metric columns of one generated MCQ.

    Args:
        parsed: the result of :func:`parse_mcq` (None counts as invalid).
        context: the passage the question was asked about.
        reference_question: the gold question stem, when the data has one ("" for none).
        near_duplicate_threshold: see :func:`duplicate_option_pairs`.

    Returns:
        Flat JSON-ready values: the parsed fields (``question``, ``option_a``..``option_d``, ``answer``),
        ``format_valid``, ``format_strict``, ``errors`` and, for valid items only (None otherwise),
        ``duplicate_options``, ``near_duplicate_options``, ``key_in_question``, ``catch_all_option``,
        ``question_grounding``, ``key_grounding``, and with a reference ``rouge_l``, ``bleu``, ``chrf``.
    """
    parsed_or_empty = parsed or ParsedMCQ("", {}, None, False, ["no_mcq: the output holds no MCQ"])
    row: dict[str, Any] = {
        "question": parsed_or_empty.question,
        **{f"option_{letter.lower()}": parsed_or_empty.options.get(letter, "") for letter in LETTERS},
        "answer": parsed_or_empty.answer or "",
        "format_valid": parsed_or_empty.valid,
        "format_strict": parsed_or_empty.strict,
        "errors": "; ".join(parsed_or_empty.errors),
        "error_codes": ",".join(parsed_or_empty.error_codes),
    }
    valid = parsed_or_empty.valid
    options = {k: parsed_or_empty.options[k] for k in LETTERS} if valid else {}
    exact, near = duplicate_option_pairs(options, near_duplicate_threshold) if valid else (None, None)
    row.update(
        duplicate_options=exact,
        near_duplicate_options=near,
        key_in_question=key_leaks_into_question(parsed_or_empty.question, parsed_or_empty.key_text) if valid else None,
        catch_all_option=any(map(is_catch_all_option, options.values())) if valid else None,
        question_grounding=grounding(parsed_or_empty.question, context) if valid else None,
        key_grounding=grounding(parsed_or_empty.key_text, context) if valid else None,
    )
    if reference_question:
        row.update(_reference_scores(parsed_or_empty.question if valid else "", reference_question))
    return row


def _reference_scores(question: str, reference: str) -> dict[str, float]:
    import sacrebleu

    hypothesis, gold = normalize_vietnamese(question), normalize_vietnamese(reference)
    return {
        "rouge_l": round(rouge_l(hypothesis, gold), 4),
        "bleu": round(sacrebleu.sentence_bleu(hypothesis, [gold]).score, 2),
        "chrf": round(sacrebleu.sentence_chrf(hypothesis, [gold]).score, 2),
    }


def aggregate(rows: Sequence[Mapping[str, Any]], references: Sequence[str] | None = None) -> dict[str, Any]:
    """Aggregate per-item metric rows (from :func:`item_metrics`) into the run's summary.

    Rates about the format are over all items; hygiene, grounding and diversity are over valid items, so a
    model that writes few valid MCQs is not rewarded for them. Reference metrics are over items with a
    reference; an invalid item scores 0 there (it wrote no usable question).

    Args:
        rows: per-item metric rows.
        references: gold question stems aligned with ``rows`` ("" where none); enables corpus BLEU/chrF.

    Returns:
        JSON-ready aggregates: ``n_items``, ``n_valid``, ``format_valid_rate``, ``format_strict_rate``,
        ``answer_letter_counts``, ``answer_letter_shares``, ``answer_letter_max_share``, ``error_counts``,
        ``duplicate_option_rate``, ``near_duplicate_option_rate``, ``key_in_question_rate``,
        ``catch_all_option_rate``, ``question_grounding_mean``, ``key_grounding_mean``, ``distinct_1``,
        ``distinct_2``, ``repeated_question_rate`` and, with references, ``rouge_l_mean``, ``bleu``, ``chrf``.
    """
    total = len(rows)
    valid = [row for row in rows if row.get("format_valid")]
    letters = Counter(row["answer"] for row in valid)
    questions = [row["question"] for row in valid]
    summary: dict[str, Any] = {
        "n_items": total,
        "n_valid": len(valid),
        "format_valid_rate": _share(len(valid), total),
        "format_strict_rate": _share(sum(bool(row.get("format_strict")) for row in rows), total),
        "answer_letter_counts": {letter: letters.get(letter, 0) for letter in LETTERS},
        "answer_letter_shares": {letter: _share(letters.get(letter, 0), len(valid)) for letter in LETTERS},
        "answer_letter_max_share": _share(max(letters.values(), default=0), len(valid)),
        "error_counts": dict(Counter(code for row in rows for code in str(row.get("error_codes", "")).split(",")
                                     if code)),
        "duplicate_option_rate": rate(valid, "duplicate_options"),
        "near_duplicate_option_rate": rate(valid, "near_duplicate_options"),
        "key_in_question_rate": rate(valid, "key_in_question"),
        "catch_all_option_rate": rate(valid, "catch_all_option"),
        "question_grounding_mean": _mean(row.get("question_grounding") for row in valid),
        "key_grounding_mean": _mean(row.get("key_grounding") for row in valid),
        "distinct_1": _round(distinct_n(questions, 1)),
        "distinct_2": _round(distinct_n(questions, 2)),
        "repeated_question_rate": _repeated_share(questions),
    }
    if references and any(references):
        summary.update(_corpus_reference_scores(rows, references))
    return summary


def _corpus_reference_scores(rows: Sequence[Mapping[str, Any]], references: Sequence[str]) -> dict[str, Any]:
    import sacrebleu

    pairs = [(normalize_vietnamese(row["question"]) if row.get("format_valid") else "", normalize_vietnamese(ref))
             for row, ref in zip(rows, references) if ref]
    hypotheses, golds = [h for h, _ in pairs], [g for _, g in pairs]
    return {
        "n_with_reference": len(pairs),
        "rouge_l_mean": _mean(rouge_l(h, g) for h, g in pairs),
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [golds]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [golds]).score, 2),
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def rate(rows: Sequence[Mapping[str, Any]], name: str) -> float | None:
    """Share of rows whose ``name`` is true, among rows where it is set (None when none is)."""
    values = [bool(row.get(name)) for row in rows if row.get(name) is not None]
    return _share(sum(values), len(values))


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(sum(numbers) / len(numbers), 4) if numbers else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _repeated_share(questions: Sequence[str]) -> float | None:
    """Share of questions that repeat an earlier one (after normalisation)."""
    seen: set[str] = set()
    repeats = 0
    for question in questions:
        key = comparable(question)
        repeats += key in seen
        seen.add(key)
    return _share(repeats, len(questions))
