"""Tests of vinakit.text: Vietnamese normalisation (NFC, line endings, invisible characters, mojibake, tone marks)."""

from __future__ import annotations

import unicodedata

import pytest

from vinakit.errors import ParamsError
from vinakit.text import TextStats, is_blank, normalize_vietnamese, normalize_with_counts

# (old style, new style): the mark on the first vowel of a final oa/oe/uy, or on the second
TONE_PAIRS = [
    ("hòa", "hoà"), ("hòe", "hoè"), ("thủy", "thuỷ"), ("khỏe", "khoẻ"), ("lòa", "loà"),
    ("ủy", "uỷ"), ("tụy", "tuỵ"), ("xõa", "xoã"), ("lũy", "luỹ"), ("họa", "hoạ"), ("thúy", "thuý"),
    ("góa", "goá"), ("khóa", "khoá"), ("tòa", "toà"), ("hủy", "huỷ"), ("nhụy", "nhuỵ"),
    ("Hòa", "Hoà"), ("HÒA", "HOÀ"), ("Khỏe", "Khoẻ"), ("THỦY", "THUỶ"),
    ("òa", "oà"),  # no onset at all: "òa khóc"
]

SENTENCE_OLD = "Hòa bình, sức khỏe và thủy lợi: Ủy ban tỉnh Khánh Hòa đã họp (hoàn toàn quý giá)."
SENTENCE_NEW = "Hoà bình, sức khoẻ và thuỷ lợi: Uỷ ban tỉnh Khánh Hoà đã họp (hoàn toàn quý giá)."

# Real words whose mark placement is the same in both styles (a final consonant or another vowel
# follows the diphthong, or "qu"/"gi" is the onset), plus common words with no diphthong at all.
MUST_NOT_CHANGE = [
    "hoàn", "toán", "khuyến", "quý", "quỳ", "thuyền", "huỳnh", "quà", "quả", "hoài", "ngoáy",
    "khuya", "khuỷu", "tuyết", "thuở", "huế", "thuế", "xoăn", "hoạch", "luyện", "chuyện",
    "quyển", "quyết", "oán", "toàn", "khoảng", "hoặc", "giỏi", "người", "được", "Việt", "tiếng",
    "của", "những", "quốc", "Nguyễn", "thuận", "khuẩn", "hoãn", "loạn", "ngoài", "quạ", "quẹo",
    "QUÝ", "Huỳnh", "khoèo", "ngoằn", "tuần", "xuyên", "quỷ", "quỹ", "quấy", "hoa", "thuy",
    "khoe", "Thủy", "hóa",
]
MUST_NOT_CHANGE_IN_ANY_STYLE = MUST_NOT_CHANGE[:-2]  # "Thủy", "hóa" change in the new style

# Correct text that a careless mojibake fixer would damage.
CORRECT_TEXT = [
    "Châu Âu", "ÂM NHẠC VIỆT NAM", "Â", "Â©", "Ê‘", "Ô“hi”", "Ã", "café", "naïve", "São Paulo",
    "50°C", "« Hòa bình »", "Nguyễn Ái Quốc", "Đà Lạt", "Ăn uống", "Ơn giời", "Ưu tiên",
    "ĐẠI HỌC QUỐC GIA HÀ NỘI", "Giá: 20.000 ₫ – rẻ… “thật”", "Â\xa0Âu",
]

SAMPLES = [
    SENTENCE_OLD, SENTENCE_NEW, "Tiếng Việt có sáu thanh điệu.", "Người Đà Nẵng ăn mì Quảng.",
    "Thuỵ Điển và Thụy Sĩ", "ồ, ậ, ỡ, ữ, ặ, ỵ", "Emoji 👨\u200d👩\u200d👧 gia đình", *CORRECT_TEXT,
]


def _as_cp1252(text: str) -> str:
    """What a cp1252 reader shows for UTF-8 bytes (undefined bytes kept as C1 controls)."""
    return "".join(_cp1252_char(byte) for byte in text.encode("utf-8"))


def _cp1252_char(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(byte)


def _as_latin1(text: str) -> str:
    return text.encode("utf-8").decode("latin-1")


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


# --- NFC ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tone_style", ["old", "new", "off"])
@pytest.mark.parametrize("text", SAMPLES)
def test_nfd_input_gives_the_same_result_as_nfc(text: str, tone_style: str) -> None:
    from_nfc = normalize_vietnamese(unicodedata.normalize("NFC", text), tone_style)
    assert normalize_vietnamese(_nfd(text), tone_style) == from_nfc
    assert unicodedata.is_normalized("NFC", from_nfc)


def test_nfd_sentence_becomes_nfc() -> None:
    assert normalize_vietnamese(_nfd("Tiếng Việt"), "off") == "Tiếng Việt"


def test_tone_typed_before_the_vowel_modifier_is_composed() -> None:
    # NFC keeps "o + grave + circumflex" apart (same combining class): some input methods type so
    assert normalize_vietnamese("o\u0300\u0302ng v\u00f4\u0301i e\u0301\u0302", "off") == "ồng vối ế"


# --- tone marks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), TONE_PAIRS)
def test_old_style_puts_the_mark_on_the_first_vowel(old: str, new: str) -> None:
    assert normalize_vietnamese(new, "old") == old
    assert normalize_vietnamese(old, "old") == old
    assert normalize_vietnamese(_nfd(new), "old") == old


@pytest.mark.parametrize(("old", "new"), TONE_PAIRS)
def test_new_style_puts_the_mark_on_the_second_vowel(old: str, new: str) -> None:
    assert normalize_vietnamese(old, "new") == new
    assert normalize_vietnamese(new, "new") == new
    assert normalize_vietnamese(_nfd(old), "new") == new


def test_default_tone_style_is_old() -> None:
    assert normalize_vietnamese(SENTENCE_NEW) == SENTENCE_OLD


def test_sentences_convert_both_ways() -> None:
    assert normalize_vietnamese(SENTENCE_NEW, "old") == SENTENCE_OLD
    assert normalize_vietnamese(SENTENCE_OLD, "new") == SENTENCE_NEW


def test_off_leaves_both_placements_alone() -> None:
    assert normalize_vietnamese(SENTENCE_OLD, "off") == SENTENCE_OLD
    assert normalize_vietnamese(SENTENCE_NEW, "off") == SENTENCE_NEW


def test_mark_moves_next_to_digits_and_punctuation() -> None:
    assert normalize_vietnamese("(hoà)2,thuỷ-lợi", "old") == "(hòa)2,thủy-lợi"


def test_must_not_change_list_is_long_enough() -> None:
    assert len(MUST_NOT_CHANGE_IN_ANY_STYLE) >= 30


@pytest.mark.parametrize("tone_style", ["old", "new"])
@pytest.mark.parametrize("word", MUST_NOT_CHANGE_IN_ANY_STYLE)
def test_words_with_one_placement_never_change(word: str, tone_style: str) -> None:
    assert normalize_vietnamese(word, tone_style) == word
    assert normalize_vietnamese(_nfd(word), tone_style) == word
    sentence = f"Từ “{word}” đứng giữa câu."
    assert normalize_vietnamese(sentence, tone_style) == sentence


def test_words_outside_vietnamese_onsets_are_left_alone() -> None:
    # "zoé" is not Vietnamese (z is no onset); "qùy"/"gioà" have the u/i in their onset
    for word in ("Zoé", "qùy", "gioà", "Chloé"):
        assert normalize_vietnamese(word, "old") == word
        assert normalize_vietnamese(word, "new") == word


def test_unknown_tone_style_is_rejected() -> None:
    with pytest.raises(ParamsError, match="tone_style"):
        normalize_vietnamese("hòa", "mới")
    with pytest.raises(ParamsError, match="tone_style"):
        normalize_with_counts(["hòa"], "NEW")


# --- mojibake -------------------------------------------------------------------------------------


def test_known_mojibake_is_repaired() -> None:
    assert normalize_vietnamese("Tiáº¿ng Viá»‡t") == "Tiếng Việt"


MOJIBAKE_SOURCES = [
    "Tiếng Việt là ngôn ngữ chính thức.",
    "Người Đà Nẵng đến rồi đấy, thật vậy.",  # ờ and Đ hold bytes cp1252 leaves undefined
    "Dữ liệu được lưu trữ trên ổ cứng, bậc nhất.",  # ậ holds 0xAD, a soft hyphen in cp1252
    "“Hòa bình” – trích dẫn… và emoji 🇻🇳",
    "ĐẠI HỌC QUỐC GIA",
]


@pytest.mark.parametrize("garble", [_as_cp1252, _as_latin1], ids=["cp1252", "latin1"])
@pytest.mark.parametrize("source", MOJIBAKE_SOURCES)
def test_utf8_read_as_a_single_byte_code_page_is_repaired(source: str, garble) -> None:
    garbled = garble(source)
    assert garbled != source
    assert normalize_vietnamese(garbled, "off") == source


def test_mojibake_of_nfd_text_is_repaired_and_composed() -> None:
    assert normalize_vietnamese(_as_cp1252(_nfd("Tiếng Việt")), "off") == "Tiếng Việt"


def test_a_byte_order_mark_read_as_cp1252_is_removed() -> None:
    assert normalize_vietnamese("ï»¿Xin chào", "off") == "Xin chào"


def test_a_decoded_mark_needs_an_ascii_vowel_before_it() -> None:
    # "Ì€" is a garbled U+0300; after "ẫ" (which has its marks) it would stack a third one
    assert normalize_vietnamese("ẫÌ€ và Tiáº¿ng", "off") == "ẫÌ€ và Tiếng"
    assert normalize_vietnamese("eÌ€ và Tiáº¿ng", "off") == "è và Tiếng"


def test_text_garbled_twice_is_repaired() -> None:
    assert normalize_vietnamese(_as_cp1252(_as_cp1252("Tiếng Việt")), "off") == "Tiếng Việt"


def test_symbols_are_repaired_once_the_text_is_known_to_be_garbled() -> None:
    # alone, "Â©" may be correct text; beside Vietnamese mojibake it is the mojibake of "©"
    source = "© 2024 – Tiếng Việt “hay”"
    assert normalize_vietnamese(_as_cp1252(source), "off") == source
    assert normalize_vietnamese(_as_cp1252("© 2024 –"), "off") == _as_cp1252("© 2024 –")


def test_only_the_garbled_part_of_mixed_text_is_repaired() -> None:
    mixed = _as_cp1252("Tiếng Việt") + " và Hà Nội"
    assert normalize_vietnamese(mixed, "off") == "Tiếng Việt và Hà Nội"


@pytest.mark.parametrize("text", CORRECT_TEXT)
def test_correct_text_is_never_taken_for_mojibake(text: str) -> None:
    assert normalize_vietnamese(text, "off") == text
    assert normalize_with_counts([text], "off")[1].mojibake == 0


# --- invisible characters -------------------------------------------------------------------------


@pytest.mark.parametrize("invisible", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"])
def test_zero_width_characters_and_soft_hyphens_are_removed(invisible: str) -> None:
    assert normalize_vietnamese(f"Việt{invisible} Nam", "off") == "Việt Nam"
    assert normalize_vietnamese(f"{invisible}Hà{invisible}Nội{invisible}", "off") == "HàNội"


def test_zero_width_between_a_letter_and_its_tone_mark_is_removed_before_composing() -> None:
    assert normalize_vietnamese("Vie\u0302\u200b\u0323t", "off") == "Việt"


def test_zero_width_joiner_inside_an_emoji_sequence_is_kept() -> None:
    family = "👨\u200d👩\u200d👧"
    assert normalize_vietnamese(f"Gia đình {family}", "off") == f"Gia đình {family}"


# --- idempotence and counts -----------------------------------------------------------------------


@pytest.mark.parametrize("tone_style", ["old", "new", "off"])
def test_normalising_twice_changes_nothing_more(tone_style: str) -> None:
    inputs = SAMPLES + [_nfd(text) for text in SAMPLES] + [_as_cp1252(t) for t in MOJIBAKE_SOURCES]
    inputs += [f"\u200b{word}\u00ad" for word in MUST_NOT_CHANGE] + [new for _, new in TONE_PAIRS]
    for text in inputs:
        once = normalize_vietnamese(text, tone_style)
        assert normalize_vietnamese(once, tone_style) == once, text


def test_counts_say_which_step_changed_how_many_strings() -> None:
    texts = [
        "Hello, world!",                       # ASCII: nothing
        _nfd("Tiếng Việt"),                    # nfc
        "Việt\u200b Nam",                      # zero_width
        "Tiáº¿ng Viá»‡t",                      # mojibake
        "Hoà bình",                            # tone_marks (old style)
        _nfd("thuỷ") + "\u00ad",               # nfc + zero_width + tone_marks
        "Hòa bình",                            # already fine
    ]
    results, stats = normalize_with_counts(texts, "old")
    assert results == ["Hello, world!", "Tiếng Việt", "Việt Nam", "Tiếng Việt", "Hòa bình", "thủy",
                       "Hòa bình"]
    assert stats == TextStats(strings=7, changed=5, nfc=2, zero_width=2, mojibake=1, tone_marks=2)


def test_counts_of_new_style_and_of_off() -> None:
    assert normalize_with_counts(["Hòa", "hoà", "khỏe"], "new")[1].tone_marks == 2
    results, stats = normalize_with_counts(["Hòa", "hoà"], "off")
    assert results == ["Hòa", "hoà"] and stats.changed == 0 and stats.strings == 2


def test_text_stats_add_and_to_dict() -> None:
    total = TextStats(strings=2, changed=1, nfc=1)
    total.add(TextStats(strings=3, changed=2, mojibake=1, tone_marks=2))
    assert total.to_dict() == {"strings": 5, "changed": 3, "nfc": 1, "zero_width": 0, "mojibake": 1,
                               "tone_marks": 2, "line_endings": 0}


# --- line endings and blank text ------------------------------------------------------------------


@pytest.mark.parametrize("tone_style", ["old", "new", "off"])
def test_windows_and_old_mac_line_endings_become_lf(tone_style: str) -> None:
    """Excel writes CRLF inside a CSV cell; ASCII text takes the same path as Vietnamese text."""
    cell = "Câu 1: Hà Nội\r\nCâu 2: Huế\rCâu 3"
    assert normalize_vietnamese(cell, tone_style) == "Câu 1: Hà Nội\nCâu 2: Huế\nCâu 3"
    assert normalize_vietnamese("line one\r\nline two\r\n", tone_style) == "line one\nline two\n"
    assert normalize_vietnamese(_nfd("Hòa bình\r\n\r\nThủy lợi"), tone_style).count("\n") == 2


def test_line_endings_are_counted_with_the_other_steps() -> None:
    texts = ["Hà Nội\r\nHuế", "A\r\nB", _nfd("Hoà\r\nbình"), "Hà Nội\nHuế"]
    results, stats = normalize_with_counts(texts, "old")
    assert results == ["Hà Nội\nHuế", "A\nB", "Hòa\nbình", "Hà Nội\nHuế"]
    assert (stats.line_endings, stats.nfc, stats.tone_marks, stats.changed) == (3, 1, 1, 3)
    assert "\r" not in "".join(results)


@pytest.mark.parametrize("text", ["", "  \n\t", "\u200b", "\u200b\u200c\u2060\ufeff", "\u00ad \u200d", "\r\n\u200b"])
def test_invisible_only_text_is_blank(text: str) -> None:
    assert is_blank(text)


@pytest.mark.parametrize("text", ["Hà Nội", _nfd("ồ"), "\u200bA", "👍", "0"])
def test_visible_text_is_not_blank(text: str) -> None:
    assert not is_blank(text)
