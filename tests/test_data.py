"""Tests of vinakit.data: chat and corpus loading, bad input located by file/line/field, splits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from vinakit.data import (
    ChatData,
    format_mcq,
    load_chat_dataset,
    load_text_corpus,
    mcq_user_prompt,
)
from vinakit.errors import DataError, ParamsError
from vinakit.sources import sample_path
from vinakit.text import normalize_vietnamese

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent
MCQ_PROMPT_START = "Hãy đọc đoạn văn sau và viết một câu hỏi trắc nghiệm có bốn phương án A, B, C, D"


def fixture(name: str) -> str:
    """Path of a fixture file, as a user would type it."""
    return str(FIXTURES / name)


def write_jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n",
                    encoding="utf-8")
    return str(path)


def chat(question: str, answer: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def contents(data: ChatData) -> list[list[str]]:
    return [[message["content"] for message in row["messages"]] for row in data.train]


# --- formats --------------------------------------------------------------------------------------


def test_openai_messages_keep_roles_and_train_flag_and_drop_extra_keys() -> None:
    data = load_chat_dataset(fixture("chat_openai.jsonl"))
    assert len(data.train) == 3 and data.validation == []
    first, second = data.train[0]["messages"], data.train[1]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[2] == {"role": "assistant", "content": "Thủ đô của Việt Nam là Hà Nội."}
    # "name" on a message and "id" on the row are dropped; "train": false is kept; "Assistant" ok
    assert second[0] == {"role": "user", "content": "Hãy kể tên một con sông ở miền Bắc."}
    assert second[1] == {"role": "assistant", "content": "Sông Hồng.", "train": False}
    assert second[3]["role"] == "assistant"
    assert set(data.train[0]) == {"messages"}
    assert data.report.formats == Counter({"openai_messages": 3})


def test_contents_are_normalised_nfc_and_old_tone_style_by_default() -> None:
    data = load_chat_dataset(fixture("chat_openai.jsonl"))
    every = [text for row in contents(data) for text in row]
    assert all(unicodedata.is_normalized("NFC", text) for text in every)
    assert "Sông Đà, nơi có thủy điện Hòa Bình." in every  # was "thủy điện Hoà Bình"
    assert "Chúc bạn một năm mới an khang, khỏe mạnh." in every  # was "khoẻ"
    stats = data.report.text
    assert (stats.strings, stats.changed, stats.nfc, stats.tone_marks) == (9, 3, 1, 2)


def test_new_tone_style_and_no_normalisation() -> None:
    new = load_chat_dataset(fixture("chat_openai.jsonl"), tone_style="new")
    assert "Sông Đà, nơi có thuỷ điện Hoà Bình." in contents(new)[1]
    raw = load_chat_dataset(fixture("chat_openai.jsonl"), normalize=False)
    user = raw.train[1]["messages"][0]["content"]
    assert user == unicodedata.normalize("NFD", "Hãy kể tên một con sông ở miền Bắc.")
    assert raw.report.normalized is False and raw.report.text.strings == 0


def test_sharegpt_roles_are_mapped() -> None:
    data = load_chat_dataset(fixture("chat_sharegpt.json"))
    assert [[m["role"] for m in row["messages"]] for row in data.train] == [
        ["system", "user", "assistant"], ["user", "assistant"], ["user", "assistant"]]
    assert data.train[2]["messages"][1]["content"] == "Bằng hai."
    assert data.report.formats == Counter({"sharegpt": 3})


def test_alpaca_rows_from_a_data_object() -> None:
    data = load_chat_dataset(fixture("chat_alpaca.json"))
    assert data.train[0]["messages"] == [
        {"role": "user", "content": "Dịch sang tiếng Anh.\n\nTôi yêu Hà Nội."},
        {"role": "assistant", "content": "I love Hanoi."}]
    assert [m["role"] for m in data.train[1]["messages"]] == ["user", "assistant"]  # empty input
    assert data.train[2]["messages"][0] == {"role": "system", "content": "Bạn là giáo viên ngữ văn."}
    assert data.report.formats == Counter({"alpaca": 3})


def test_mcq_context_schema_becomes_a_write_an_mcq_conversation() -> None:
    data = load_chat_dataset(fixture("mcq_context.csv"))
    user, assistant = data.train[1]["messages"]
    assert user["content"] == mcq_user_prompt(
        "RAM là bộ nhớ truy cập ngẫu nhiên.\nDữ liệu trong RAM mất khi tắt máy.")
    assert assistant["content"] == ("Câu hỏi: Dữ liệu trong RAM mất khi nào?\nA. Khi bật máy\n"
                                    "B. Khi tắt máy\nC. Khi sao lưu\nD. Không bao giờ\nĐáp án: B")
    assert data.train[2]["messages"][1]["content"].endswith("Đáp án: C")  # key written "C."
    assert data.report.formats == Counter({"mcq_context": 3})


def test_mcq_para_schema_with_excel_bom() -> None:
    data = load_chat_dataset(fixture("mcq_para.csv"))
    user, assistant = data.train[0]["messages"]
    assert user["content"].startswith(MCQ_PROMPT_START)
    assert user["content"].endswith("Đoạn văn: Bàn phím là thiết bị nhập dữ liệu.")
    assert assistant["content"].splitlines() == [
        "Câu hỏi: Bàn phím là thiết bị gì?", "A. Thiết bị xuất", "B. Thiết bị nhập",
        "C. Thiết bị lưu trữ", "D. Thiết bị mạng", "Đáp án: B"]
    assert data.report.formats == Counter({"mcq_para": 2})


def test_formats_are_detected_per_row_and_counted() -> None:
    data = load_chat_dataset(fixture("chat_mixed.jsonl"))
    assert data.report.formats == Counter(
        {"openai_messages": 1, "sharegpt": 1, "alpaca": 1, "mcq_context": 1, "mcq_para": 1})
    assert data.train[4]["messages"][1]["content"].endswith("Đáp án: B")


def test_mcq_options_given_as_numbers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mcq.jsonl", [
        {"context": "Năm 1975 đất nước thống nhất.", "question": "Đất nước thống nhất năm nào?",
         "answer_a": 1945, "answer_b": 1954, "answer_c": 1975, "answer_d": 1986, "correct_answer": "c"}])
    assistant = load_chat_dataset(path).train[0]["messages"][1]["content"]
    assert assistant.splitlines()[1:] == ["A. 1945", "B. 1954", "C. 1975", "D. 1986", "Đáp án: C"]


def test_report_counts_each_text_fix(tmp_path: Path) -> None:
    garbled = "Tiếng Việt".encode("utf-8").decode("cp1252")
    path = write_jsonl(tmp_path / "dirty.jsonl", [
        chat(garbled, "Đúng\u200b rồi."),
        chat(unicodedata.normalize("NFD", "Sức khoẻ"), "Hoà bình."),
    ])
    data = load_chat_dataset(path)
    assert contents(data) == [["Tiếng Việt", "Đúng rồi."], ["Sức khỏe", "Hòa bình."]]
    assert data.report.text.to_dict() == {"strings": 4, "changed": 4, "nfc": 1, "zero_width": 1,
                                          "mojibake": 1, "tone_marks": 2, "line_endings": 0}
    assert data.report.to_dict()["text_normalization"]["mojibake"] == 1


def test_parquet_rows_and_bad_parquet_row(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    first = chat("Một cộng một?", "Hai.")
    first["messages"][0]["train"] = False  # arrow then gives every other turn "train": None
    rows = [first, chat("Hai cộng hai?", "Bốn."),
            {"messages": [{"role": "user", "content": "Ba cộng ba?"},
                          {"role": "human", "content": "Sáu."}]}]
    path = tmp_path / "chat.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as info:
        load_chat_dataset(str(path))
    assert info.value.line == 3 and info.value.field == "messages[1].role"
    assert f"file {path}, row 3, field 'messages[1].role': unknown role 'human'" in str(info.value)
    data = load_chat_dataset(str(path), skip_bad_rows=True)
    assert contents(data) == [["Một cộng một?", "Hai."], ["Hai cộng hai?", "Bốn."]]
    assert data.train[0]["messages"][0]["train"] is False
    assert "train" not in data.train[0]["messages"][1] and "train" not in data.train[1]["messages"][0]
    assert data.report.skipped_examples == [
        f"{path}:row 3: messages[1].role: unknown role 'human'; use one of system, user, assistant"]


def test_csv_column_of_json_messages(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    messages = json.dumps(chat("Xin chào", "Chào bạn!")["messages"], ensure_ascii=False)
    path.write_text('id,messages\n1,"' + messages.replace('"', '""') + '"\n', encoding="utf-8")
    assert contents(load_chat_dataset(str(path))) == [["Xin chào", "Chào bạn!"]]


def test_text_field_names_the_conversation_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"hoi_thoai": [{"from": "human", "value": "Bạn tên gì?"}, {"from": "gpt", "value": "Tôi là Vina."}]},
        {"hoi_thoai": [{"role": "user", "content": "Mấy giờ rồi?"}, {"role": "assistant", "content": "Ba giờ."}]},
    ])
    data = load_chat_dataset(path, text_field="hoi_thoai")
    assert contents(data) == [["Bạn tên gì?", "Tôi là Vina."], ["Mấy giờ rồi?", "Ba giờ."]]
    assert data.report.formats == Counter({"sharegpt": 1, "openai_messages": 1})


def test_jsonl_with_bom_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps(chat("Câu một", "Đáp một"), ensure_ascii=False), "", "  ",
             json.dumps(chat("Câu hai", "Đáp hai"), ensure_ascii=False)]
    path.write_text("\n".join(lines), encoding="utf-8-sig")
    data = load_chat_dataset(str(path))
    assert len(data.train) == 2 and data.report.rows_read == 2


def test_limit_keeps_the_first_rows() -> None:
    data = load_chat_dataset(fixture("chat_mixed.jsonl"), limit=2)
    assert len(data.train) == 2 and data.report.rows_read == 2
    assert data.report.formats == Counter({"openai_messages": 1, "sharegpt": 1})


# --- bad rows: strict raises at file/line/field, skip mode counts ---------------------------------

BAD_ROWS = [
    # file, unit, number, field, reason, rows left when skipping, words of the message
    ("bad_malformed.jsonl", "line", 3, None, "malformed_json", 2, "malformed JSON"),
    ("bad_missing_field.jsonl", "line", 2, "messages[1].content", "missing_field", 2, "has no 'content'"),
    ("bad_content_type.jsonl", "line", 3, "messages[1].content", "wrong_type",
     2, "content must be a string, got a list"),
    ("bad_messages_type.jsonl", "line", 2, "messages", "wrong_type", 2, "must be a list of turns"),
    ("bad_unknown_role.jsonl", "line", 2, "messages[1].role", "unknown_role", 2, "unknown role 'bot'"),
    ("bad_no_assistant.jsonl", "line", 2, None, "no_assistant_turn", 2, "no assistant turn"),
    ("bad_empty_assistant.jsonl", "line", 3, "messages[1].content", "empty_assistant",
     2, "assistant turn is empty"),
    ("bad_mcq_key.csv", "line", 3, "correct_answer", "bad_mcq_key", 1, "answer key 'E' is not one of A, B, C, D"),
    ("bad_row.json", "row", 2, "messages[1].role", "unknown_role", 2, "unknown role 'robot'"),
]


@pytest.mark.parametrize(("name", "unit", "number", "field", "reason", "kept", "words"), BAD_ROWS,
                         ids=[case[0] for case in BAD_ROWS])
def test_bad_row_raises_with_file_line_and_field(name, unit, number, field, reason, kept, words) -> None:
    path = fixture(name)
    with pytest.raises(DataError) as info:
        load_chat_dataset(path)
    error = info.value
    assert (error.path, error.line, error.field) == (path, number, field)
    where = f"file {path}, {unit} {number}" + (f", field '{field}'" if field else "")
    assert str(error).startswith(f"{where}: ")
    assert words in str(error)
    assert "set skip_bad_rows: true to skip such rows" in str(error)


@pytest.mark.parametrize(("name", "unit", "number", "field", "reason", "kept", "words"), BAD_ROWS,
                         ids=[case[0] for case in BAD_ROWS])
def test_bad_row_is_skipped_and_counted(name, unit, number, field, reason, kept, words) -> None:
    path = fixture(name)
    data = load_chat_dataset(path, skip_bad_rows=True)
    report = data.report
    assert len(data.train) == kept == report.rows_used
    assert report.rows_read == kept + 1 and report.rows_skipped == 1
    assert report.skip_reasons == Counter({reason: 1})
    location = f"{path}:{number}" if unit == "line" else f"{path}:row {number}"
    (example,) = report.skipped_examples
    assert example.startswith(f"{location}: " + (f"{field}: " if field else ""))
    assert words in example


FILE_PROBLEMS = [
    ("bad_not_utf8.csv", "is not valid UTF-8", 2),
    ("empty.jsonl", "file is empty", None),
    ("header_only.csv", "has a header line but no data rows", None),
    ("unknown_ext.xlsx", "unsupported file type '.xlsx'", None),
    ("no_such_file.jsonl", "file not found", None),
]


@pytest.mark.parametrize("skip_bad_rows", [False, True])
@pytest.mark.parametrize(("name", "words", "line"), FILE_PROBLEMS, ids=[c[0] for c in FILE_PROBLEMS])
def test_file_problems_raise_even_when_skipping(name: str, words: str, line: int | None,
                                                skip_bad_rows: bool) -> None:
    path = fixture(name)
    with pytest.raises(DataError, match=words) as info:
        load_chat_dataset(path, skip_bad_rows=skip_bad_rows)
    assert info.value.path == path and info.value.line == line


def test_not_utf8_says_how_to_fix_it() -> None:
    with pytest.raises(DataError, match="re-save it as UTF-8"):
        load_chat_dataset(fixture("bad_not_utf8.csv"))


def test_utf16_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text("context,question\nA,B\n", encoding="utf-16")
    with pytest.raises(DataError, match="UTF-16"):
        load_chat_dataset(str(path))


def test_aliases_are_roles_of_sharegpt_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "human", "content": "Chào"}, {"role": "gpt", "content": "Chào bạn"}]}])
    with pytest.raises(DataError, match="unknown role 'human'"):
        load_chat_dataset(path)
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "Chào"}, {"from": "robot", "value": "Chào bạn"}]}])
    with pytest.raises(DataError) as info:
        load_chat_dataset(sharegpt)
    assert info.value.field == "conversations[1].from" and "unknown role 'robot'" in str(info.value)


def test_more_bad_rows_are_located(tmp_path: Path) -> None:
    rows = [
        chat("Câu tốt", "Đáp tốt"),
        {"instruction": "Viết một câu."},                                        # 2: no output
        {"context": "Đoạn văn", "question": "Hỏi?", "answer_a": "1", "answer_b": "2",
         "answer_d": "4", "correct_answer": "A"},                                # 3: no answer_c
        {"messages": [{"role": "user", "content": "Hỏi"},
                      {"role": "assistant", "content": "\u200b\u00ad"}]},       # 4: empty once cleaned
        {"messages": [{"role": "user", "content": "Hỏi"},
                      {"role": "assistant", "content": "Đáp", "train": "không"}]},  # 5: train not bool
        {"cau_hoi": "Không rõ định dạng"},                                      # 6: unknown format
        ["không", "phải", "object"],                                            # 7: not an object
        {"para": "Đoạn", "question": "Hỏi?", "answer_a": 1945, "answer_b": 1954, "answer_c": 1975,
         "answer_d": 1986, "answer_key": 3},                                    # 8: key is a number
    ]
    path = write_jsonl(tmp_path / "mixed_bad.jsonl", rows)
    data = load_chat_dataset(path, skip_bad_rows=True)
    assert len(data.train) == 1
    assert data.report.skip_reasons == Counter({"missing_field": 2, "empty_assistant": 1,
                                                "wrong_type": 2, "unknown_format": 1, "bad_mcq_key": 1})
    expected_starts = [f"{path}:2: output: missing field 'output'",
                       f"{path}:3: answer_c: missing field 'answer_c'",
                       f"{path}:4: messages[1].content: the assistant turn is empty",
                       f"{path}:5: messages[1].train: 'train' must be true or false",
                       f"{path}:6: matches no known format",
                       f"{path}:7: expected an object (a conversation), got a list",
                       f"{path}:8: answer_key: answer key '3' is not one of A, B, C, D"]
    assert len(data.report.skipped_examples) == len(expected_starts)
    for example, start in zip(data.report.skipped_examples, expected_starts):
        assert example.startswith(start), example


def test_csv_row_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    path = tmp_path / "mcq.csv"
    path.write_text("context,question,answer_a,answer_b,answer_c,answer_d,correct_answer\n"
                    "Đoạn,Hỏi?,1,2,3,4,A\n"
                    "Đoạn, có dấu phẩy,Hỏi?,1,2,3,4,B\n", encoding="utf-8")
    with pytest.raises(DataError, match="has 8 fields but the header has 7") as info:
        load_chat_dataset(str(path))
    assert info.value.line == 3


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"messages": "sai"}, {"messages": []}])
    with pytest.raises(DataError, match=r"no usable rows: all 2 rows were skipped \(wrong_type: 1, "
                                        r"no_assistant_turn: 1\)") as info:
        load_chat_dataset(path, skip_bad_rows=True)
    assert info.value.path == path


def test_json_that_is_really_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(chat("A", "B")) + "\n" + json.dumps(chat("C", "D")) + "\n")
    with pytest.raises(DataError, match="rename the file to .jsonl") as info:
        load_chat_dataset(str(path))
    assert info.value.line == 2


# --- validation split -----------------------------------------------------------------------------


@pytest.fixture
def twenty_rows(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "twenty.jsonl",
                       [chat(f"Câu hỏi số {i}", f"Trả lời số {i}") for i in range(20)])


def test_fraction_split_is_deterministic_and_disjoint(twenty_rows: str) -> None:
    first = load_chat_dataset(twenty_rows, val_size=0.2, seed=7)
    again = load_chat_dataset(twenty_rows, val_size=0.2, seed=7)
    other = load_chat_dataset(twenty_rows, val_size=0.2, seed=8)
    assert (len(first.train), len(first.validation)) == (16, 4)
    assert first.validation == again.validation and first.train == again.train
    assert first.validation != other.validation
    questions = {row["messages"][0]["content"] for row in first.train + first.validation}
    assert len(questions) == 20
    assert first.report.split == "val_size=0.2 seed=7"
    assert (first.report.train_rows, first.report.validation_rows) == (16, 4)


def test_count_split_and_tiny_fraction(twenty_rows: str) -> None:
    assert len(load_chat_dataset(twenty_rows, val_size=3).validation) == 3
    assert len(load_chat_dataset(twenty_rows, val_size=0.01).validation) == 1  # at least one row


def test_split_that_leaves_no_training_rows_is_an_error(twenty_rows: str) -> None:
    with pytest.raises(DataError, match="would leave no training rows"):
        load_chat_dataset(twenty_rows, val_size=20)
    with pytest.raises(DataError, match="would leave no training rows"):
        load_chat_dataset(twenty_rows, val_size=0.5, limit=1)


@pytest.mark.parametrize("val_size", [0.7, -1, -0.1, True, "0.1", 1.0])
def test_bad_val_size_is_a_params_error(twenty_rows: str, val_size: object) -> None:
    with pytest.raises(ParamsError, match="val_size"):
        load_chat_dataset(twenty_rows, val_size=val_size)


def test_val_source_is_loaded_the_same_way(twenty_rows: str) -> None:
    data = load_chat_dataset(twenty_rows, val_source=fixture("chat_alpaca.json"))
    assert len(data.train) == 20 and len(data.validation) == 3
    assert data.report.split == "val_source"
    assert data.report.validation_report.formats == Counter({"alpaca": 3})
    assert data.report.to_dict()["validation_source"]["rows_used"] == 3
    with pytest.raises(ParamsError, match="not both"):
        load_chat_dataset(twenty_rows, val_source=fixture("chat_alpaca.json"), val_size=0.1)


def test_other_bad_options_are_params_errors(twenty_rows: str) -> None:
    with pytest.raises(ParamsError, match="tone_style"):
        load_chat_dataset(twenty_rows, tone_style="mới")
    with pytest.raises(ParamsError, match="limit"):
        load_chat_dataset(twenty_rows, limit=0)


# --- report ---------------------------------------------------------------------------------------


def test_report_is_json_ready_and_hashes_the_file() -> None:
    path = fixture("bad_unknown_role.jsonl")
    report = load_chat_dataset(path, skip_bad_rows=True, val_size=1).report
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert as_dict["path"] == str(Path(path).resolve())
    assert (as_dict["rows_read"], as_dict["rows_used"], as_dict["rows_skipped"]) == (3, 2, 1)
    assert as_dict["skip_reasons"] == {"unknown_role": 1}
    assert as_dict["formats"] == {"openai_messages": 2}
    assert as_dict["text_normalization"]["enabled"] is True
    assert (as_dict["train_rows"], as_dict["validation_rows"]) == (1, 1)
    assert "2 used, 1 skipped (unknown_role: 1)" in report.summary()


def test_skipped_examples_are_capped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "many_bad.jsonl",
                       [chat("Hỏi", "Đáp")] + [{"messages": "sai"} for _ in range(30)])
    report = load_chat_dataset(path, skip_bad_rows=True).report
    assert report.rows_skipped == 30 and len(report.skipped_examples) == 20


# --- MCQ helpers ----------------------------------------------------------------------------------


def test_format_mcq_is_the_canonical_text() -> None:
    text = format_mcq(" Thủ đô của Việt Nam\nlà gì? ",
                      {"A": "Huế", "B": "Hà Nội", "C": "Đà Nẵng", "D": "Sài Gòn"}, "b")
    assert text == ("Câu hỏi: Thủ đô của Việt Nam là gì?\nA. Huế\nB. Hà Nội\nC. Đà Nẵng\n"
                    "D. Sài Gòn\nĐáp án: B")


def test_format_mcq_rejects_bad_options_and_keys() -> None:
    with pytest.raises(ValueError, match="A, B, C, D"):
        format_mcq("Hỏi?", {"A": "1", "B": "2", "C": "3"}, "A")
    with pytest.raises(ValueError, match="answer"):
        format_mcq("Hỏi?", {"A": "1", "B": "2", "C": "3", "D": "4"}, "E")


def test_mcq_user_prompt_is_vietnamese_and_stable_under_normalisation() -> None:
    prompt = mcq_user_prompt("  Hòa bình là khát vọng.  ")
    assert prompt == (MCQ_PROMPT_START + " và cho biết đáp án đúng.\n\nĐoạn văn: Hòa bình là khát vọng.")
    for style in ("old", "new"):
        assert normalize_vietnamese(mcq_user_prompt("x"), style) == mcq_user_prompt("x")


# --- sources --------------------------------------------------------------------------------------


def test_sample_aliases_point_into_the_package() -> None:
    package = REPO_ROOT / "vinakit" / "sample_data"
    assert sample_path("vinakit:chat") == package / "chat_vi.jsonl"
    assert sample_path("vinakit:mcq") == package / "mcq_tinhoc.csv"
    assert sample_path("vinakit:corpus") == package / "corpus_vi.txt"
    with pytest.raises(DataError, match="vinakit:chat"):
        sample_path("vinakit:khong_co")


@pytest.mark.parametrize(("alias", "loader"), [("vinakit:chat", load_chat_dataset),
                                               ("vinakit:mcq", load_chat_dataset),
                                               ("vinakit:corpus", load_text_corpus)])
def test_sample_data_loads_cleanly_when_present(alias: str, loader) -> None:
    if not sample_path(alias).exists():
        pytest.skip(f"{sample_path(alias)} not written yet")
    result = loader(alias)
    report = result.report if isinstance(result, ChatData) else result[1]
    assert report.rows_used > 0 and report.rows_skipped == report.skip_reasons["empty_document"]
    assert report.source.startswith(alias)


def test_a_path_that_looks_like_a_file_is_not_sent_to_the_hub() -> None:
    with pytest.raises(DataError, match="file not found"):
        load_chat_dataset("du_lieu/khong_co.jsonl")


def test_unreachable_hub_dataset_gives_a_clear_error() -> None:
    # offline mode: no retries against a network this machine does not have
    code = ("from vinakit.data import load_chat_dataset\n"
            "try:\n"
            "    load_chat_dataset('nobody-here/khong-co-du-lieu-nay:train')\n"
            "except Exception as error:\n"
            "    print(type(error).__name__, '|', error.path, '|', error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=120)
    kind, path, message = result.stdout.strip().splitlines()[-1].split(" | ", 2)
    assert (kind, path) == ("DataError", "nobody-here/khong-co-du-lieu-nay:train")
    assert "could not load dataset 'nobody-here/khong-co-du-lieu-nay' (split 'train')" in message
    assert "Hugging Face Hub" in message and "local file" in message


def test_importing_text_and_data_stays_cheap() -> None:
    code = ("import sys, vinakit.text, vinakit.data\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'pyarrow', 'pandas')"
            " if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


# --- corpus ---------------------------------------------------------------------------------------


def test_txt_corpus_is_split_on_blank_lines_and_normalised() -> None:
    documents, report = load_text_corpus(fixture("corpus.txt"))
    assert documents == ["Việt Nam nằm ở Đông Nam Á.\nThủ đô là Hà Nội.",
                         "Sông Hồng chảy qua Hà Nội.",
                         "Mùa thu, hoa sữa nở.\nHòa bình là khát vọng."]
    assert (report.rows_read, report.rows_used, report.text.nfc, report.text.tone_marks) == (3, 3, 1, 1)
    assert report.sha256 == hashlib.sha256((FIXTURES / "corpus.txt").read_bytes()).hexdigest()


def test_jsonl_corpus_drops_and_counts_empty_documents() -> None:
    documents, report = load_text_corpus(fixture("corpus.jsonl"), tone_style="new")
    assert documents == ["Tiếng Việt có sáu thanh điệu.", "Chữ Quốc ngữ dùng bảng chữ cái Latinh.",
                         "Thuỷ triều lên xuống mỗi ngày."]
    assert report.skip_reasons == Counter({"empty_document": 2})
    path = fixture("corpus.jsonl")
    assert report.skipped_examples == [f"{path}:2: empty document", f"{path}:4: empty document"]


def test_csv_corpus_with_a_named_text_column() -> None:
    documents, _ = load_text_corpus(fixture("corpus.csv"), text_field="noi_dung")
    assert documents == ["Đà Nẵng là thành phố biển.", "Huế có nhiều lăng tẩm."]


def test_corpus_without_the_text_column() -> None:
    path = fixture("corpus.csv")
    with pytest.raises(DataError, match="set text_field to the column") as info:
        load_text_corpus(path)
    assert (info.value.line, info.value.field) == (2, "text")
    with pytest.raises(DataError, match="no documents"):
        load_text_corpus(path, skip_bad_rows=True)


@pytest.mark.parametrize(("name", "words"), [("binary.txt", "binary"),
                                             ("corpus_cp1258.txt", "not valid UTF-8"),
                                             ("empty.jsonl", "file is empty")])
def test_corpus_file_problems(name: str, words: str) -> None:
    with pytest.raises(DataError, match=words):
        load_text_corpus(fixture(name), skip_bad_rows=True)


def test_corpus_of_only_empty_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "empty_docs.jsonl", [{"text": ""}, {"text": "\u200b"}])
    with pytest.raises(DataError, match="no documents"):
        load_text_corpus(path)


def test_txt_is_for_corpora_only() -> None:
    with pytest.raises(DataError, match="load_text_corpus"):
        load_chat_dataset(fixture("corpus.txt"))


def test_read_rows_gives_another_schema_the_same_located_errors(tmp_path):
    from vinakit.sources import BadRow, read_rows

    path = tmp_path / "contexts.jsonl"
    path.write_text('{"context": "Hà Nội là thủ đô."}\n{"para": ""}\n{"context": "Huế có sông Hương."}\n',
                    encoding="utf-8")

    def to_item(row, line, cells_are_text):
        if not row.get("context"):
            raise BadRow("missing_field", "no context in this row", "context")
        return {"context": row["context"], "line": line}, "context"

    with pytest.raises(DataError) as error:
        read_rows(path, to_item)
    assert error.value.line == 2 and error.value.field == "context" and str(path) in str(error.value)
    items, report, label = read_rows(path, to_item, skip_bad_rows=True)
    assert [item["line"] for item in items] == [1, 3] and label == str(path)
    assert report.rows_read == 3 and report.rows_used == 2 and report.skip_reasons["missing_field"] == 1


# --- invisible-only fields and Windows line endings -------------------------------------------------------------

INVISIBLE = "\u200b\u200c\u2060\ufeff\u00ad"  # nothing a reader sees: what a copy from a web page can leave


@pytest.mark.parametrize("normalize", [True, False])
def test_invisible_only_answers_and_alpaca_fields_are_empty(tmp_path: Path, normalize: bool) -> None:
    path = write_jsonl(tmp_path / "invisible.jsonl", [
        chat("Thủ đô của Việt Nam?", "Hà Nội."),
        chat("Sông dài nhất?", INVISIBLE),
        {"instruction": INVISIBLE, "output": "Hòa bình."},
        {"instruction": "Dịch sang tiếng Anh", "input": INVISIBLE, "output": "Peace.", "system": "\u200b"},
    ])
    with pytest.raises(DataError, match=r"line 2, field 'messages\[1\].content': the assistant turn is empty"):
        load_chat_dataset(path, normalize=normalize)
    data = load_chat_dataset(path, normalize=normalize, skip_bad_rows=True)
    assert data.report.skip_reasons == Counter({"empty_assistant": 1, "empty_field": 1})
    assert [m["content"] for m in data.train[1]["messages"]] == ["Dịch sang tiếng Anh", "Peace."]


@pytest.mark.parametrize("normalize", [True, False])
def test_invisible_only_mcq_cells_are_empty(tmp_path: Path, normalize: bool) -> None:
    (tmp_path / "mcq.csv").write_text(
        "context,question,answer_a,answer_b,answer_c,answer_d,correct_answer\n"
        f"{INVISIBLE},Thủ đô?,Hà Nội,Huế,Đà Nẵng,Vinh,A\n"
        f"Sông Hồng chảy qua Hà Nội.,Sông nào?,Sông Hồng,{INVISIBLE},Sông Đà,Sông Mã,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2, field 'context': 'context' is empty"):
        load_chat_dataset(str(tmp_path / "mcq.csv"), normalize=normalize)
    with pytest.raises(DataError, match="no usable rows"):
        load_chat_dataset(str(tmp_path / "mcq.csv"), normalize=normalize, skip_bad_rows=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_invisible_only_documents_are_dropped_and_counted(tmp_path: Path, normalize: bool) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Hà Nội mùa thu."}, {"text": INVISIBLE},
                                                  {"text": unicodedata.normalize("NFD", "Thuỷ triều \u200b")}])
    documents, report = load_text_corpus(path, normalize=normalize)
    assert len(documents) == 2 and report.skip_reasons == Counter({"empty_document": 1})
    txt = tmp_path / "docs.txt"
    txt.write_text(f"Hà Nội mùa thu.\n\n{INVISIBLE}\n\nHuế mộng mơ.\n", encoding="utf-8")
    assert load_text_corpus(str(txt), normalize=normalize)[1].skip_reasons == Counter({"empty_document": 1})


def test_windows_line_endings_in_csv_cells_become_lf_and_are_counted(tmp_path: Path) -> None:
    """Excel saves a cell with Alt+Enter line breaks as CRLF inside quotes, and ends rows with CRLF too."""
    rows = ["instruction,output", '"Liệt kê hai thành phố:\r\nmiền Bắc","Hà Nội\r\nHải Phòng"',
            '"Một câu hỏi","Một dòng"']
    (tmp_path / "excel.csv").write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    data = load_chat_dataset(str(tmp_path / "excel.csv"))
    assert contents(data) == [["Liệt kê hai thành phố:\nmiền Bắc", "Hà Nội\nHải Phòng"], ["Một câu hỏi", "Một dòng"]]
    assert data.report.text.line_endings == 2
    assert data.report.to_dict()["text_normalization"]["line_endings"] == 2
    assert "line_endings 2" in data.report.summary()
    raw = load_chat_dataset(str(tmp_path / "excel.csv"), normalize=False)
    assert contents(raw)[0][1] == "Hà Nội\r\nHải Phòng"  # normalize_text: false keeps the text as it is


def test_data_report_shows_a_table_of_counts_and_a_one_line_repr(tmp_path: Path) -> None:
    garbled = "Tiếng Việt".encode("utf-8").decode("cp1252")
    path = write_jsonl(tmp_path / "mixed.jsonl", [chat(garbled, "Đúng rồi."), {"messages": []},
                                                  chat("Hỏi", "Đáp")])
    report = load_chat_dataset(path, skip_bad_rows=True).report
    page = report._repr_html_()
    assert "<table>" in page and "rows read</th><td style=\"text-align:left\">3<" in page
    assert "rows used</th><td style=\"text-align:left\">2<" in page
    assert "rows skipped</th><td style=\"text-align:left\">1<" in page
    assert all(f"skipped: {reason}" in page for reason in report.skip_reasons)
    assert "normalised: mojibake" in page and ".0<" not in page
    assert repr(report) == f"DataReport(source={report.source!r}, rows_read=3, rows_used=2, rows_skipped=1)"


def test_display_formats_counts_as_integers_and_floats_with_four_significant_digits() -> None:
    from vinakit.display import Summary, format_value, html_table

    assert [format_value(v) for v in (43707.0, 8.13680648803711, 0.38446685, 2417, None, True)] == \
        ["43707", "8.137", "0.3845", "2417", "", "True"]
    assert Summary({"num_tokens": 43707.0, "loss": 8.13680648803711}) == {"num_tokens": 43707, "loss": 8.137}
    assert html_table({"<b>": "x&y"}, "T") == ('<table><caption style="text-align:left"><b>T</b></caption><tr>'
                                              '<th style="text-align:left">&lt;b&gt;</th>'
                                              '<td style="text-align:left">x&amp;y</td></tr></table>')


def test_the_notebook_loss_table_after_training_shows_integers_and_four_digits(monkeypatch) -> None:
    from types import SimpleNamespace

    import IPython.display
    from transformers.utils.notebook import NotebookProgressCallback

    from vinakit.display import tidy_notebook_table

    shown: list[str] = []
    monkeypatch.setattr(IPython.display, "display", lambda page: shown.append(page.data))
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[object(), NotebookProgressCallback()]))
    tidy_notebook_table(trainer)
    callback = trainer.callback_handler.callbacks[1]
    assert isinstance(callback, NotebookProgressCallback) and type(callback) is not NotebookProgressCallback
    callback.on_evaluate(SimpleNamespace(eval_strategy="steps"), SimpleNamespace(
        log_history=[{"loss": 8.13680648803711}], global_step=4), None,
        metrics={"eval_loss": 7.699123, "eval_num_tokens": 3401.0})
    assert len(shown) == 1 and callback.training_tracker is None
    assert all(f"<td>{cell}</td>" in shown[0] for cell in ("8.137", "7.699", "3401", "4"))
    assert ".000000" not in shown[0]
