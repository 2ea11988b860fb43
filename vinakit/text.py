"""Vietnamese text hygiene: one spelling for the same text before training and before comparing.

Vietnamese arrives as NFC or NFD, with Windows line endings (Excel writes CRLF inside CSV cells), with invisible
characters, as mojibake (UTF-8 bytes read as
cp1252/latin-1 by a spreadsheet or a web scraper) and with two tone-mark placements for the
diphthongs oa, oe, uy (hòa/hoà, thủy/thuỷ). A tokenizer sees each variant as different tokens
(Llama-3 spends 2.7x the tokens on NFD), so the kit normalises every string it trains on or scores.

This module imports only the standard library: ``vinakit.params`` and the CLI import it cheaply.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache

from vinakit.errors import ParamsError

TONE_STYLES = ("old", "new", "off")

# --- Vietnamese letters ---------------------------------------------------------------------------

_TONE_MARKS = "\u0300\u0301\u0303\u0309\u0323"  # huyền, sắc, ngã, hỏi, nặng
_VOWEL_BASES = "aăâeêioôơuưy"
_VIETNAMESE_LETTERS = frozenset(
    {unicodedata.normalize("NFC", base + mark)
     for base in _VOWEL_BASES + _VOWEL_BASES.upper() for mark in ("", *_TONE_MARKS)}
    - set("aeiouyAEIOUY") | {"đ", "Đ"}
)
"""Letters Vietnamese writes and English does not (bare ASCII vowels left out on purpose)."""
_VIETNAMESE_MARKS = frozenset(_TONE_MARKS + "\u0302\u0306\u031b")  # NFD text is made of these

# --- line endings --------------------------------------------------------------------------------

_CARRIAGE_RETURN = re.compile("\r\n?")  # CRLF (Windows, Excel) and a lone CR (old Mac) both end a line

# --- invisible characters -------------------------------------------------------------------------

_EMOJI = "\U0001F000-\U0001FAFF\u2600-\u27BF"
# ZWJ glues emoji sequences (👨‍👩‍👧, 👩‍💻); elsewhere it is copy-paste debris like ZWSP.
_ZERO_WIDTH = re.compile(
    "[\u200b\u200c\u2060\ufeff\u00ad]"
    f"|(?<![{_EMOJI}\ufe0f\U0001F3FB-\U0001F3FF])\u200d"
    f"|\u200d(?![{_EMOJI}])"
)

# --- combining-mark order -------------------------------------------------------------------------

# NFC cannot compose "o + grave + circumflex" (both have combining class 230, so their order is
# kept); some old input methods type the tone first. Modifier first makes it composable.
_TONE_BEFORE_MODIFIER = re.compile("([\u0300\u0301\u0303\u0309])([\u0302\u0306\u031b])")
_COMBINING = re.compile("[\u0300-\u036f]")

# --- mojibake -------------------------------------------------------------------------------------

_CP1252_ONLY = {
    byte: bytes([byte]).decode("cp1252")
    for byte in range(0x80, 0xA0)
    if byte not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)  # undefined in cp1252: readers keep them as C1
}
# latin-1 decoding maps byte b to chr(b): this table then turns it into what cp1252 reads.
_SLOPPY_CP1252_DECODE = dict(_CP1252_ONLY)
_SLOPPY_CP1252_ENCODE = {ord(ch): byte for byte, ch in _CP1252_ONLY.items()}
# A run of non-ASCII characters a cp1252/latin-1 reader can produce. UTF-8 never puts an ASCII
# byte inside a multi-byte character, so mojibake never spans an ASCII character: repairing run by
# run keeps correct text beside it ("Tiáº¿ng và Hà") out of the decision.
_NON_ASCII_BYTE_CHARS = re.compile("([\x80-\xff" + "".join(_CP1252_ONLY.values()) + "]+)")
_CONTINUATION_CHARS = "\x80-\xbf" + "".join(_CP1252_ONLY.values())
# A UTF-8 lead byte (C2..F4) read as a character, followed by a continuation byte read as one.
_MOJIBAKE_HINT = re.compile(f"[\u00c2-\u00f4][{_CONTINUATION_CHARS}]")
_MOJIBAKE_DEBRIS = (
    frozenset(chr(code) for code in range(0x80, 0xC0))
    | frozenset("ÄÅÆÇËÎÏÐÑÖ×ØÛÜÞßäåæçëîïðñö÷øûüþÿ")
    | frozenset("€‚ƒ„†‡ˆ‰Š‹ŒŽ˜™š›œžŸ")
)
"""Characters that are rare in real Vietnamese text but frequent in its mojibake (º ¿ » Æ ‡ ...)."""
_MAX_MOJIBAKE_LAYERS = 3  # text saved wrongly twice needs two decodings

# --- tone-mark placement --------------------------------------------------------------------------

# Onsets that can precede oa/oe/uy. "qu" and "gi" are left out on purpose: in "quý" the u belongs
# to the onset and the vowel is y alone, so the mark is on y in every style.
_ONSETS = frozenset({
    "", "b", "c", "ch", "d", "đ", "g", "gh", "h", "k", "kh", "l", "m", "n", "ng", "ngh", "nh",
    "p", "ph", "r", "s", "t", "th", "tr", "v", "x",
})
_LETTER = r"[^\W\d_]"
# A whole word of at most 3 onset letters + oa/oe/uy, nothing after it: only there do the two
# styles differ ("hoàn", "thuyền", "huỳnh" place the mark the same way in both).
_TONE_CANDIDATE = re.compile(
    rf"(?<!{_LETTER})({_LETTER}{{0,3}}?)"
    r"([oòóỏõọ][aàáảãạeèéẻẽẹ]|[uùúủũụ][yỳýỷỹỵ])"
    rf"(?!{_LETTER})",
    re.IGNORECASE,
)


@dataclass
class TextStats:
    """How many strings each normalisation step changed (a string can count in several steps).

    Attributes:
        strings: strings looked at.
        changed: strings that came out different.
        nfc: strings that were not in NFC (e.g. NFD from macOS or some web pages).
        zero_width: strings with zero-width characters or soft hyphens removed.
        mojibake: strings repaired from UTF-8 read as cp1252/latin-1.
        tone_marks: strings whose oa/oe/uy tone mark was moved to the chosen style.
        line_endings: strings whose Windows (CRLF) or old Mac (CR) line endings became LF.
    """

    strings: int = 0
    changed: int = 0
    nfc: int = 0
    zero_width: int = 0
    mojibake: int = 0
    tone_marks: int = 0
    line_endings: int = 0

    def add(self, other: TextStats) -> None:
        """Adds the counts of ``other`` to these counts, in place."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, int]:
        """Returns the counts as a JSON-ready dict."""
        return asdict(self)


def normalize_vietnamese(text: str, tone_style: str = "old") -> str:
    """Returns one canonical spelling of Vietnamese text.

    Steps, in order: turn CRLF and CR line endings into LF, repair mojibake (only where the repair
    round-trips and the result looks more Vietnamese, so correct text such as "Châu Âu" is never
    touched), remove zero-width characters and soft hyphens, compose to NFC, and place the tone
    mark of a final oa/oe/uy.

    Args:
        text: any text; NFD input gives the same result as NFC input.
        tone_style: "old" (hòa, khỏe, thủy: the common style), "new" (hoà, khoẻ, thuỷ) or
            "off" (leave placements as they are).

    Returns:
        The normalised text, in NFC.

    Raises:
        ParamsError: tone_style is not one of "old", "new", "off".
    """
    return _normalize_steps(text, tone_style)[0]


def normalize_with_counts(texts: Iterable[str], tone_style: str = "old") -> tuple[list[str], TextStats]:
    """Normalises many strings and counts what each step changed, for the data report.

    Args:
        texts: the strings to normalise.
        tone_style: as in :func:`normalize_vietnamese`.

    Returns:
        The normalised strings (same order) and the counts.

    Raises:
        ParamsError: tone_style is not one of "old", "new", "off".
    """
    _check_tone_style(tone_style)
    stats = TextStats()
    results = []
    for text in texts:
        normalized, steps = _normalize_steps(text, tone_style)
        results.append(normalized)
        stats.strings += 1
        stats.changed += normalized != text
        for step in steps:
            setattr(stats, step, getattr(stats, step) + 1)
    return results, stats


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing once normalised: only whitespace, zero-width characters, soft hyphens.

    Loaders check emptiness with this, whether or not they normalise, so a passage of invisible characters is
    an empty passage.

    Args:
        text: any text.

    Returns:
        True when nothing visible is left.
    """
    return not _normalize_steps(text, "off")[0].strip()


def _check_tone_style(tone_style: str) -> None:
    if tone_style not in TONE_STYLES:
        raise ParamsError(f"tone_style must be one of {', '.join(TONE_STYLES)}, got {tone_style!r}")


def _normalize_steps(text: str, tone_style: str) -> tuple[str, list[str]]:
    """Runs the steps; returns the result and the names of the steps that changed something."""
    _check_tone_style(tone_style)
    steps = []
    if "\r" in text:  # a "\r" the model learns shows up in every answer it writes
        text = _CARRIAGE_RETURN.sub("\n", text)
        steps.append("line_endings")
    if text.isascii():  # every other problem handled here needs a non-ASCII character
        return text, steps
    # Mojibake first: a soft hyphen (U+00AD) is part of it ("áº" + SHY is "ậ"), so it must
    # be repaired before invisible characters are removed.
    for name, step in (("mojibake", _repair_mojibake), ("zero_width", _remove_zero_width),
                       ("nfc", _to_nfc), ("tone_marks", lambda t: _place_tone_marks(t, tone_style))):
        fixed = step(text)
        if fixed != text:
            steps.append(name)
            text = fixed
    return text, steps


def _remove_zero_width(text: str) -> str:
    return _ZERO_WIDTH.sub("", text)


def _to_nfc(text: str) -> str:
    composed = unicodedata.normalize("NFC", text)
    if _COMBINING.search(composed):  # a mark NFC could not attach: maybe typed before the modifier
        reordered = _TONE_BEFORE_MODIFIER.sub(r"\2\1", unicodedata.normalize("NFD", text))
        composed = unicodedata.normalize("NFC", reordered)
    return composed


# --- mojibake -------------------------------------------------------------------------------------


def _repair_mojibake(text: str) -> str:
    if not _MOJIBAKE_HINT.search(text):
        return text
    pieces = _NON_ASCII_BYTE_CHARS.split(text)  # odd indexes: the non-ASCII runs
    repairs = {index: _best_layer(pieces[index]) for index in range(1, len(pieces), 2)}
    for index, fixed in repairs.items():
        # NFD Vietnamese puts its marks on ASCII vowels: a decoded mark with no ASCII letter
        # before it would land on a letter that already has its own marks
        before = pieces[index - 1][-1:]
        if fixed and _COMBINING.match(fixed) and not (before.isascii() and before.isalpha()):
            repairs[index] = None
    # One piece that turns into Vietnamese letters, and looks more Vietnamese than before, shows
    # the text is garbled; then every piece that decodes is mojibake too, even where its score
    # cannot tell ("Â©" -> "©", "â€“" -> "–").
    if not any(fixed is not None and _is_evidence(pieces[index], fixed)
               for index, fixed in repairs.items()):
        return text
    for index, fixed in repairs.items():
        if fixed is not None:
            pieces[index] = fixed
    return "".join(pieces)


def _is_evidence(piece: str, repaired: str) -> bool:
    if repaired == "\ufeff":  # "ï»¿": a byte-order mark read as cp1252, never real text
        return True
    has_vietnamese = any(ch in _VIETNAMESE_LETTERS or ch in _VIETNAMESE_MARKS for ch in repaired)
    return has_vietnamese and _vietnamese_score(repaired) > _vietnamese_score(piece)


def _best_layer(piece: str) -> str | None:
    """Decodes a non-ASCII run layer after layer (text saved wrongly twice needs two).

    Returns the most Vietnamese-looking layer, or None when the run is not UTF-8 read wrongly.
    """
    layers = [piece]
    while len(layers) <= _MAX_MOJIBAKE_LAYERS:
        decoded = _decode_layer(layers[-1])
        if decoded is None:
            break
        layers.append(decoded)
    plausible = [layer for layer in layers[1:] if all(map(_plausible_char, layer))]
    return max(plausible, key=_vietnamese_score, default=None)


@lru_cache(maxsize=4096)
def _plausible_char(char: str) -> bool:
    """Whether a repair may produce ``char``: Latin letters, Vietnamese marks, punctuation, symbols.

    Decoding random symbol runs as UTF-8 gives CJK, private-use or unassigned characters; a real
    Vietnamese text garbled by a code page gives these back.
    """
    if char <= "\u024f" or char in _VIETNAMESE_MARKS or "\u1ea0" <= char <= "\u1ef9":
        return unicodedata.category(char) != "Cc"  # C1 controls are what a repair removes
    category = unicodedata.category(char)
    return category[0] in "PSZ" or category == "Cf"  # Cf: BOM, ZWJ (removed in the next step)


def _decode_layer(text: str) -> str | None:
    """Returns ``text`` as UTF-8 bytes read as cp1252/latin-1 would have produced it, or None."""
    if not _MOJIBAKE_HINT.search(text):
        return None
    try:
        raw = bytes(_SLOPPY_CP1252_ENCODE.get(ord(ch), ord(ch)) for ch in text)
        decoded = raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):  # ValueError: a character no single byte gives
        return None
    return decoded if _round_trips(decoded, text) else None


def _round_trips(repaired: str, original: str) -> bool:
    """True if reading ``repaired``'s UTF-8 as cp1252 (C1 kept) or as latin-1 gives ``original``."""
    as_latin1 = repaired.encode("utf-8").decode("latin-1")
    return original in (as_latin1, as_latin1.translate(_SLOPPY_CP1252_DECODE))


def _vietnamese_score(text: str) -> int:
    """Vietnamese letters (and tone/vowel marks of NFD text) minus typical mojibake debris."""
    composed = unicodedata.normalize("NFC", text)
    good = sum(ch in _VIETNAMESE_LETTERS or ch in _VIETNAMESE_MARKS for ch in composed)
    return good - sum(ch in _MOJIBAKE_DEBRIS for ch in composed)


# --- tone-mark placement --------------------------------------------------------------------------


def _place_tone_marks(text: str, tone_style: str) -> str:
    if tone_style == "off":
        return text
    return _TONE_CANDIDATE.sub(lambda match: _place_in_syllable(match, tone_style), text)


def _place_in_syllable(match: re.Match[str], tone_style: str) -> str:
    onset, diphthong = match.group(1), match.group(2)
    if onset.lower() not in _ONSETS:
        return match.group()
    (first, first_tone), (second, second_tone) = (_split_tone(ch) for ch in diphthong)
    if bool(first_tone) == bool(second_tone):  # no mark, or two marks (broken text): leave it
        return match.group()
    tone = first_tone or second_tone
    if tone_style == "old":
        first = unicodedata.normalize("NFC", first + tone)
    else:
        second = unicodedata.normalize("NFC", second + tone)
    return onset + first + second


@lru_cache(maxsize=256)
def _split_tone(letter: str) -> tuple[str, str]:
    """Splits an NFC letter into (letter without tone mark, tone mark or "")."""
    decomposed = unicodedata.normalize("NFD", letter)
    tone = "".join(mark for mark in decomposed if mark in _TONE_MARKS)
    bare = "".join(mark for mark in decomposed if mark not in _TONE_MARKS)
    return unicodedata.normalize("NFC", bare), tone
