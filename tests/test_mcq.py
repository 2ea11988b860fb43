"""The MCQ parser on outputs as models really write them, and the per-item / aggregate metrics."""

from __future__ import annotations

import unicodedata

import pytest

from vinakit.data import format_mcq
from vinakit.mcq import (
    ANSWER_OUT_OF_RANGE, ANSWER_UNMATCHED, EMPTY_OPTION, EXTRA_OPTION, MISSING_OPTION, NO_ANSWER, NO_QUESTION,
    TRUNCATED, aggregate, distinct_n, duplicate_option_pairs, grounding, is_catch_all_option, item_metrics,
    key_leaks_into_question, parse_mcq, rouge_l, syllables,
)

CANONICAL = format_mcq("Thủ đô của Việt Nam là gì?", {"A": "Hà Nội", "B": "Huế", "C": "Đà Nẵng", "D": "Sài Gòn"},
                       "A")
LEAF = {"A": "Xanh lục", "B": "Đỏ tươi", "C": "Vàng nhạt", "D": "Tím than"}

# (name, model output, question, options A-D, key): every one of these must parse as valid.
VALID_OUTPUTS = [
    ("canonical", CANONICAL, "Thủ đô của Việt Nam là gì?", ["Hà Nội", "Huế", "Đà Nẵng", "Sài Gòn"], "A"),
    ("lowercase labels with parenthesis",
     "Câu hỏi: Sông nào dài nhất chảy qua Việt Nam?\na) Sông Hồng\nb) Sông Đà\nc) Sông Mê Kông\nd) Sông Đồng Nai\n"
     "Đáp án đúng: c",
     "Sông nào dài nhất chảy qua Việt Nam?", ["Sông Hồng", "Sông Đà", "Sông Mê Kông", "Sông Đồng Nai"], "C"),
    ("markdown bold everywhere",
     "**Câu hỏi:** Ai là tác giả của Truyện Kiều?\n\n**A.** Nguyễn Du\n**B.** Hồ Xuân Hương\n**C.** Nguyễn Trãi\n"
     "**D.** Tố Hữu\n\n**Đáp án đúng: A**",
     "Ai là tác giả của Truyện Kiều?", ["Nguyễn Du", "Hồ Xuân Hương", "Nguyễn Trãi", "Tố Hữu"], "A"),
    ("preamble, numbered question, colon labels, 'Đáp án là', explanation",
     "Dưới đây là một câu hỏi trắc nghiệm dựa trên đoạn văn:\n\nCâu hỏi 1: RAM là gì?\nA: Bộ nhớ chỉ đọc\n"
     "B: Bộ nhớ truy cập ngẫu nhiên\nC: Ổ cứng\nD: Thiết bị nhập\nĐáp án là B\n"
     "Giải thích: RAM là bộ nhớ truy cập ngẫu nhiên, dữ liệu mất khi tắt máy.",
     "RAM là gì?", ["Bộ nhớ chỉ đọc", "Bộ nhớ truy cập ngẫu nhiên", "Ổ cứng", "Thiết bị nhập"], "B"),
    ("option text instead of the letter",
     "Câu hỏi: Bộ phận nào của CPU thực hiện phép tính số học?\nA. Bộ điều khiển (CU)\nB. Thanh ghi\n"
     "C. Bộ nhớ đệm\nD. Bộ số học – logic (ALU)\nĐáp án: Bộ số học – logic (ALU)",
     "Bộ phận nào của CPU thực hiện phép tính số học?",
     ["Bộ điều khiển (CU)", "Thanh ghi", "Bộ nhớ đệm", "Bộ số học – logic (ALU)"], "D"),
    ("slash labels, key letter followed by its text",
     "Câu hỏi: Hệ điều hành nào là mã nguồn mở?\nA/ Windows\nB/ macOS\nC/ Linux\nD/ iOS\nĐáp án: C. Linux",
     "Hệ điều hành nào là mã nguồn mở?", ["Windows", "macOS", "Linux", "iOS"], "C"),
    ("leaked template tokens and an invented next turn",
     "<|im_start|>assistant\nCâu hỏi: Nước sôi ở bao nhiêu độ C?\nA. 50\nB. 100\nC. 150\nD. 200\nĐáp án: B"
     "<|im_end|>\n<|im_start|>user\nCâu hỏi khác? A. x",
     "Nước sôi ở bao nhiêu độ C?", ["50", "100", "150", "200"], "B"),
    ("Llama-3 header and eot",
     "<|start_header_id|>assistant<|end_header_id|>\n\nCâu hỏi: Tết Nguyên đán là tết gì?\nA. Tết âm lịch\n"
     "B. Tết dương lịch\nC. Tết Trung thu\nD. Tết Đoan ngọ\nĐáp án: A<|eot_id|>",
     "Tết Nguyên đán là tết gì?", ["Tết âm lịch", "Tết dương lịch", "Tết Trung thu", "Tết Đoan ngọ"], "A"),
    ("English labels",
     "Question: Thành phố nào là thủ đô của Pháp?\nA) Paris\nB) Rome\nC) Berlin\nD) Madrid\nAnswer: A",
     "Thành phố nào là thủ đô của Pháp?", ["Paris", "Rome", "Berlin", "Madrid"], "A"),
    ("all on one line",
     "Câu hỏi: Đâu là số chẵn? A. Một B. Hai C. Ba D. Năm Đáp án: B",
     "Đâu là số chẵn?", ["Một", "Hai", "Ba", "Năm"], "B"),
    ("bullets, an arrow and 'Đáp án đúng là câu C'",
     "Câu hỏi: Đâu là thiết bị xuất?\n- A. Chuột\n- B. Bàn phím\n- C. Máy in\n- D. Máy quét\n=> Đáp án đúng là câu C",
     "Đâu là thiết bị xuất?", ["Chuột", "Bàn phím", "Máy in", "Máy quét"], "C"),
    ("an 'options' line between stem and options, 'là:'",
     "Câu hỏi: Thiết bị nào dùng để nhập dữ liệu?\nCác phương án:\nA. Loa\nB. Bàn phím\nC. Màn hình\nD. Máy in\n"
     "Đáp án đúng là: B",
     "Thiết bị nào dùng để nhập dữ liệu?", ["Loa", "Bàn phím", "Màn hình", "Máy in"], "B"),
    ("no question label, preamble with a colon, key in parentheses",
     "Sau đây là câu hỏi:\nThuỷ triều chủ yếu do đâu gây ra?\nA. Gió\nB. Mặt Trăng\nC. Núi lửa\nD. Động đất\n"
     "Đáp án: (B)",
     "Thuỷ triều chủ yếu do đâu gây ra?", ["Gió", "Mặt Trăng", "Núi lửa", "Động đất"], "B"),
    ("a second MCQ after the first: the first one counts",
     "Câu hỏi: Một tuần có mấy ngày?\nA. 5\nB. 6\nC. 7\nD. 8\nĐáp án: C\n\nCâu hỏi: Một năm có mấy tháng?\n"
     "A. 10\nB. 11\nC. 12\nD. 13\nĐáp án: C",
     "Một tuần có mấy ngày?", ["5", "6", "7", "8"], "C"),
    ("'Câu hỏi trắc nghiệm:' label and 'Đáp án đúng là đáp án D'",
     "**Câu hỏi trắc nghiệm:** Bộ nhớ nào mất dữ liệu khi tắt máy?\nA. ROM\nB. Ổ cứng\nC. Thẻ nhớ\nD. RAM\n\n"
     "Đáp án đúng là đáp án D vì RAM là bộ nhớ tạm thời.",
     "Bộ nhớ nào mất dữ liệu khi tắt máy?", ["ROM", "Ổ cứng", "Thẻ nhớ", "RAM"], "D"),
    ("two options per line, 'Câu 3.' label, bracketed labels and 'Đáp án - B'",
     "Câu 3. Số nào lớn nhất?\n(A) Một    (B) Hai\n(C) Ba    (D) Bốn\nĐáp án - D",
     "Số nào lớn nhất?", ["Một", "Hai", "Ba", "Bốn"], "D"),
    ("multi-line stem and 'Tất cả các đáp án trên' as an option",
     "Câu hỏi: Máy tính cá nhân\ngồm những bộ phận nào?\nA. CPU\nB. RAM\nC. Ổ cứng\nD. Tất cả các đáp án trên\n"
     "ĐÁP ÁN: D",
     "Máy tính cá nhân gồm những bộ phận nào?", ["CPU", "RAM", "Ổ cứng", "Tất cả các đáp án trên"], "D"),
]


@pytest.mark.parametrize("name,text,question,options,key", VALID_OUTPUTS, ids=[c[0] for c in VALID_OUTPUTS])
def test_real_looking_outputs_parse(name, text, question, options, key):
    parsed = parse_mcq(text)
    assert parsed is not None and parsed.valid, parsed
    assert parsed.errors == []
    assert parsed.question == question
    assert [parsed.options[letter] for letter in "ABCD"] == options
    assert parsed.answer == key


def test_only_the_training_format_is_strict():
    assert parse_mcq(CANONICAL).strict
    assert parse_mcq(CANONICAL + "\n").strict  # trailing whitespace is not a format difference
    for name, text, *_ in VALID_OUTPUTS[1:]:
        assert not parse_mcq(text).strict, name


def test_nfd_and_crlf_are_read_but_not_strict():
    text = unicodedata.normalize("NFD", "Câu hỏi: Hòa bình là gì?\r\nA. Chiến tranh\r\nB. Thái bình\r\n"
                                        "C. Loạn lạc\r\nD. Xung đột\r\nĐáp án: B")
    parsed = parse_mcq(text)
    assert parsed.valid and not parsed.strict
    assert parsed.question == "Hòa bình là gì?"  # returned in NFC
    assert parsed.options["B"] == unicodedata.normalize("NFC", "Thái bình")


def test_option_text_key_in_nfd_and_other_tone_style_matches():
    text = ("Câu hỏi: Điều gì xảy ra ở vùng ven biển?\nA. Thủy triều lên xuống\nB. Động đất\nC. Bão tuyết\n"
            "D. Núi lửa\nĐáp án: " + unicodedata.normalize("NFD", "thuỷ triều lên xuống"))
    parsed = parse_mcq(text)
    assert (parsed.valid, parsed.answer, parsed.answer_source) == (True, "A", "text")


@pytest.mark.parametrize("text,code", [
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Vàng\nĐáp án: A", MISSING_OPTION),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Vàng\nD. Tím", NO_ANSWER),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Vàng\nD. Tím\nĐáp án: E", ANSWER_OUT_OF_RANGE),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Vàng\nD. Tím\nE. Nâu\nĐáp án: A", EXTRA_OPTION),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB.\nC. Vàng\nD. Tím\nĐáp án: A", EMPTY_OPTION),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Vàng\nD. Tím\nĐáp án: Màu hồng", ANSWER_UNMATCHED),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Và", TRUNCATED),
    ("Câu hỏi: Lá cây có màu gì?\nA. Xanh\nB. Đỏ\nC. Vàng\nD. Tím\nĐáp án:", TRUNCATED),
    ("A. Xanh\nB. Đỏ\nC. Vàng\nD. Tím\nĐáp án: A", NO_QUESTION),
    ("Câu hỏi: Hai option trùng?\nA. Xanh\nB. Xanh\nC. Vàng\nD. Tím\nĐáp án: Xanh", ANSWER_UNMATCHED),
])
def test_unusable_outputs_are_rejected_with_a_reason(text, code):
    parsed = parse_mcq(text)
    assert parsed is not None and not parsed.valid and not parsed.strict
    assert code in parsed.error_codes, parsed.errors
    assert all(": " in error for error in parsed.errors)  # code plus a readable reason


@pytest.mark.parametrize("text", ["", "   \n", None, "xin chào các bạn, hôm nay trời đẹp quá",
                                  "................................"])
def test_no_mcq_at_all_gives_none(text):
    assert parse_mcq(text) is None


def test_an_answer_is_never_outside_a_to_d():
    for text in ("Câu hỏi: X?\nA. 1\nB. 2\nC. 3\nD. 4\nĐáp án: F", "Câu hỏi: X?\nA. 1\nB. 2\nC. 3\nD. 4\nĐáp án: e"):
        assert parse_mcq(text).answer is None


def test_catch_all_option_with_the_words_dap_an_is_not_an_answer_marker():
    text = ("Câu hỏi: Phần mềm nào là trình duyệt?\nA. Chrome\nB. Firefox\nC. Edge\n"
            "D. Tất cả các đáp án trên đều đúng\nĐáp án: D")
    parsed = parse_mcq(text)
    assert parsed.valid and parsed.options["D"] == "Tất cả các đáp án trên đều đúng" and parsed.answer == "D"


# --- metrics ----------------------------------------------------------------------------------------------------

CONTEXT = ("Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam. Thành phố nằm bên bờ sông Hồng "
           "và có lịch sử hơn một nghìn năm.")


def test_syllables_normalise_nfd_tone_style_and_punctuation():
    assert syllables("Thuỷ  triều, HOÀ bình!") == syllables(unicodedata.normalize("NFD", "thủy triều hòa bình"))
    assert syllables("Công nghệ") == ["công", "nghệ"]  # Vietnamese letters kept (rouge_score drops them)


def test_grounding_by_syllable_bigrams():
    assert grounding("thủ đô của nước Cộng hoà", CONTEXT) == 1.0  # tone style does not matter
    assert grounding("thành phố Huế nằm bên sông Hương", CONTEXT) == pytest.approx(2 / 6)
    assert grounding("sông Hồng", CONTEXT) == 1.0 and grounding("Hà", CONTEXT) == 1.0  # unigram when one syllable
    assert grounding("", CONTEXT) is None


def test_distinct_n_and_rouge_l():
    assert distinct_n(["một hai ba", "một hai bốn"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["một hai ba", "một hai bốn"], 2) == pytest.approx(3 / 4)
    assert rouge_l("Thủ đô của Việt Nam là gì?", "thủ đô của việt nam là gì") == 1.0
    assert rouge_l("Hòa bình là gì", "Hoà bình là gì") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    assert rouge_l("", "có") == 0.0


def test_option_hygiene():
    assert duplicate_option_pairs({"A": "Hà Nội", "B": "hà  nội.", "C": "Huế", "D": "Đà Nẵng"}) == (1, 0)
    assert duplicate_option_pairs({"A": "Bộ nhớ trong", "B": "Bộ nhớ trong máy", "C": "Huế", "D": "Cần Thơ"}) == (0, 1)
    assert duplicate_option_pairs(LEAF) == (0, 0)
    assert key_leaks_into_question("Hà Nội là thủ đô của nước nào, biết Hà Nội nằm bên sông Hồng?", "Hà Nội")
    assert not key_leaks_into_question("Thủ đô của Việt Nam là gì?", "Hà Nội")
    assert not key_leaks_into_question("Có mấy mùa trong năm?", "Có")  # one short syllable: chance
    for option in ("Tất cả các đáp án trên", "tất cả các phương án đều đúng", "Không có đáp án nào đúng",
                   "Cả A, B và C", "All of the above"):
        assert is_catch_all_option(option), option
    assert not is_catch_all_option("Tất niên")


def test_item_metrics_and_aggregate():
    good = format_mcq("Hà Nội nằm bên bờ sông nào?", {"A": "Sông Hồng", "B": "Sông Hương", "C": "Sông Đà",
                                                       "D": "Sông Mã"}, "A")
    leaky = format_mcq("Sông Hồng chảy qua đâu, sông Hồng hay sông Đà?",
                       {"A": "Sông Hồng", "B": "Sông Hồng", "C": "Tất cả các đáp án trên", "D": "Huế"}, "A")
    outputs = [good, leaky, "Câu hỏi: Hà Nội?\nA. x\nB. y", "vô nghĩa"]
    references = ["Hà Nội nằm bên bờ sông nào?", "", "Thủ đô là gì?", ""]
    rows = [item_metrics(parse_mcq(o), CONTEXT, ref) for o, ref in zip(outputs, references)]
    assert [r["format_valid"] for r in rows] == [True, True, False, False]
    assert rows[0]["format_strict"] and rows[0]["option_a"] == "Sông Hồng" and rows[0]["answer"] == "A"
    assert rows[0]["question_grounding"] == pytest.approx(4 / 6) and rows[0]["key_grounding"] == 1.0
    assert rows[0]["rouge_l"] == 1.0 and rows[0]["bleu"] == pytest.approx(100.0) and rows[0]["chrf"] == 100.0
    assert rows[1]["duplicate_options"] == 1 and rows[1]["key_in_question"] and rows[1]["catch_all_option"]
    assert rows[2]["question_grounding"] is None and rows[2]["rouge_l"] == 0.0 and "missing_option" in rows[2]["errors"]
    assert rows[3]["error_codes"] == "no_mcq"

    summary = aggregate(rows, references)
    assert summary["n_items"] == 4 and summary["n_valid"] == 2
    assert summary["format_valid_rate"] == 0.5 and summary["format_strict_rate"] == 0.5
    assert summary["answer_letter_counts"] == {"A": 2, "B": 0, "C": 0, "D": 0}
    assert summary["answer_letter_max_share"] == 1.0
    assert summary["duplicate_option_rate"] == 0.5 and summary["key_in_question_rate"] == 0.5
    assert summary["catch_all_option_rate"] == 0.5
    assert summary["error_counts"]["missing_option"] == 1 and summary["error_counts"]["no_mcq"] == 1
    assert summary["n_with_reference"] == 2 and summary["rouge_l_mean"] == 0.5
    assert 0 < summary["bleu"] < 100 and 0 < summary["chrf"] < 100
    assert summary["repeated_question_rate"] == 0.0


def test_aggregate_of_nothing_valid_has_no_made_up_numbers():
    rows = [item_metrics(parse_mcq("vô nghĩa"), CONTEXT)]
    summary = aggregate(rows)
    assert summary["format_valid_rate"] == 0.0
    assert summary["question_grounding_mean"] is None and summary["distinct_2"] is None
    assert summary["answer_letter_max_share"] is None and "bleu" not in summary


def test_repeated_questions_count_after_normalisation():
    rows = [item_metrics(parse_mcq(format_mcq(q, LEAF, "A")), CONTEXT)
            for q in ("Lá cây màu gì?", "lá cây  màu gì", "Hoa hồng màu gì?")]
    assert aggregate(rows)["repeated_question_rate"] == pytest.approx(1 / 3, abs=1e-3)
