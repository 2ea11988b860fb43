"""Exact responses-only labels for any chat template (vinakit.chat).

Two kinds of tokenizer: the real Qwen3 and Llama-3.1 tokenizers from the shared folder (skipped when
VINAKIT_SHARED_DIR is unset), and small byte-level BPE tokenizers trained here in memory on Vietnamese text,
used with the named templates and with templates written to break marker-based masking.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from vinakit.chat import (
    IGNORE_INDEX,
    NAMED_TEMPLATES,
    ChatTemplateError,
    NoTrainedTurnError,
    ResponseTruncatedError,
    end_of_turn_token,
    render_prompt,
    tokenize_conversation,
    tokenize_rows,
    use_chat_template,
)
from vinakit.errors import DataError, ParamsError, VinakitError
from vinakit.masking import masking_preview, write_masking_preview

# --------------------------------------------------------------------------------------------------------------
# Conversations (Vietnamese, both tone-mark placements, whitespace around contents)

SYSTEM = {"role": "system", "content": "Bạn là trợ lý hữu ích, trả lời ngắn gọn bằng tiếng Việt."}
SINGLE = [
    {"role": "user", "content": "Thủ đô của Việt Nam là gì?"},
    {"role": "assistant", "content": "Thủ đô của Việt Nam là Hà Nội."},
]
# Leading newlines only on the last response: earlier ones follow a template newline that BPE would merge
# with them (see test_token_straddling_the_response_start_is_trained).
MULTI = [
    {"role": "user", "content": "Xin chào!"},
    {"role": "assistant", "content": "  Chào bạn, tôi có thể giúp gì?  \n"},
    {"role": "user", "content": "Hoà bình và hòa hợp khác nhau thế nào?"},
    {"role": "assistant", "content": "  Hoà bình là không có chiến tranh.\n\n"},
    {"role": "user", "content": "Còn thuỷ lợi và thủy triều?"},
    {"role": "assistant", "content": "\n\n  Thuỷ lợi là dẫn nước tưới ruộng; thủy triều là nước biển lên xuống.\n  "},
]
CONVERSATIONS = {
    "single": SINGLE,
    "single_with_system": [SYSTEM, *SINGLE],
    "multi": MULTI,
    "multi_with_system": [SYSTEM, *MULTI],
}


def assistant_contents(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


# --------------------------------------------------------------------------------------------------------------
# Helpers


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(example: dict[str, list[int]]) -> list[list[int]]:
    """Runs of consecutive trained tokens; also checks every label is -100 or its own input id."""
    assert len(example["input_ids"]) == len(example["labels"])
    runs: list[list[int]] = []
    current: list[int] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE_INDEX, token)
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token)
    if current:
        runs.append(current)
    return runs


def template_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def assert_exact_labels(tokenizer: Any, messages: list[dict[str, Any]], rendered: list[str], eot: str,
                        **options: Any) -> dict[str, list[int]]:
    """Trained tokens decode to exactly each rendered response + eot; ids equal the template's own."""
    example = tokenize_conversation(tokenizer, messages, **options)
    assert [decode(tokenizer, run) for run in trained_runs(example)] == [content + eot for content in rendered]
    assert example["input_ids"] == template_ids(tokenizer, messages)
    return example


# --------------------------------------------------------------------------------------------------------------
# Real tokenizers


def shared_tokenizer(name: str) -> Any:
    shared = os.environ.get("VINAKIT_SHARED_DIR")
    if not shared:
        pytest.skip("VINAKIT_SHARED_DIR is not set (the folder with the real test tokenizers)")
    return _load_shared(str(Path(shared) / "tokenizers" / name))


@lru_cache(maxsize=None)
def _load_shared(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# How each real template renders a response, written out from the templates themselves.
REAL = {
    # Qwen3 writes earlier responses unchanged and lstrips newlines from the last one (after its think block).
    "qwen3": ("<|im_end|>", lambda contents: [*contents[:-1], contents[-1].lstrip("\n")]),
    # Llama-3.1 trims every message.
    "llama3_1": ("<|eot_id|>", lambda contents: [c.strip() for c in contents]),
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(REAL))
def test_real_template_labels_are_rendered_response_plus_end_of_turn(family: str, conversation: str) -> None:
    tokenizer = shared_tokenizer(family)
    eot, render = REAL[family]
    messages = CONVERSATIONS[conversation]
    example = assert_exact_labels(tokenizer, messages, render(assistant_contents(messages)), eot)
    untrained = decode(tokenizer, [t for t, label in zip(example["input_ids"], example["labels"])
                                   if label == IGNORE_INDEX])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in untrained


@pytest.mark.parametrize("family", list(REAL))
def test_real_end_of_turn_token(family: str) -> None:
    assert end_of_turn_token(shared_tokenizer(family)) == REAL[family][0]


def test_qwen3_empty_think_block_of_last_turn_is_not_trained() -> None:
    tokenizer = shared_tokenizer("qwen3")
    example = tokenize_conversation(tokenizer, MULTI)
    think_ids = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
    positions = [i for i, token in enumerate(example["input_ids"]) if token in think_ids]
    assert len(positions) == 2  # only the last turn gets the (empty) block
    assert all(example["labels"][i] == IGNORE_INDEX for i in positions)
    assert len(trained_runs(example)) == 3  # the earlier turns are trained too


def test_qwen3_earlier_turn_with_think_block_trains_what_the_template_writes() -> None:
    tokenizer = shared_tokenizer("qwen3")
    messages = [
        {"role": "user", "content": "Một cộng một bằng mấy?"},
        {"role": "assistant", "content": "<think>\nCộng hai số.\n</think>\n\nBằng hai."},
        {"role": "user", "content": "Còn hai cộng hai?"},
        {"role": "assistant", "content": "Bằng bốn."},
    ]
    # Qwen3 drops the reasoning of responses before the last user turn.
    assert_exact_labels(tokenizer, messages, ["Bằng hai.", "Bằng bốn."], "<|im_end|>")


def test_qwen3_think_block_in_last_turn_is_refused_with_a_clear_error() -> None:
    tokenizer = shared_tokenizer("qwen3")
    messages = [*SINGLE[:1], {"role": "assistant", "content": "<think>\nNghĩ về Hà Nội.\n</think>\n\nHà Nội."}]
    with pytest.raises(ChatTemplateError, match="depending on its content"):
        tokenize_conversation(tokenizer, messages)


def test_token_straddling_the_response_start_is_trained() -> None:
    tokenizer = shared_tokenizer("qwen3")
    messages = [*MULTI[:1], {"role": "assistant", "content": "\nChào bạn."}, *MULTI[2:4]]
    first = decode(tokenizer, trained_runs(tokenize_conversation(tokenizer, messages))[0])
    # BPE merges the header's newline with the response's: that one token is trained, nothing else extra.
    assert first == "\n\nChào bạn.<|im_end|>"


@pytest.mark.parametrize("family", list(REAL))
def test_real_render_prompt_is_the_text_before_the_trained_response(family: str) -> None:
    tokenizer = shared_tokenizer(family)
    messages = [SYSTEM, *MULTI]
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    last = REAL[family][1](assistant_contents(messages))[-1]
    assert full.startswith(prompt) and full[len(prompt):].startswith(last)
    if family == "qwen3":
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    else:
        assert prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------------------
# Tokenizers built here: byte-level BPE with the Llama-3/Qwen pre-tokenizer regex, trained on Vietnamese

CORPUS = [
    "Xin chào! Tôi là trợ lý ảo, tôi có thể giúp gì cho bạn hôm nay?",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "Hoà bình, thuỷ lợi, hòa hợp, thủy triều, khoẻ mạnh, khỏe khoắn.",
    "Thuỷ lợi là dẫn nước tưới ruộng; thủy triều là nước biển lên xuống.",
    "Bạn là trợ lý hữu ích, trả lời ngắn gọn bằng tiếng Việt.",
    "### Hướng dẫn:\n### Trả lời:\nsystem\nuser\nassistant\nmodel\n",
]
ALL_SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]")
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=None)
def _trained_bpe(specials: tuple[str, ...]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 3, trainer)
    return bpe


def make_tokenizer(specials: tuple[str, ...] = ALL_SPECIALS, template: str | None = None) -> Any:
    """A fresh tokenizer (tests change its template) with bos <s> and eos </s>."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(specials), bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = template
    return tokenizer


def named(name: str) -> Any:
    return use_chat_template(make_tokenizer(), name)


# How each named template renders a response, and its end-of-turn token.
NAMED = {
    "chatml": ("<|im_end|>", lambda contents: list(contents)),
    "llama-3": ("<|eot_id|>", lambda contents: [c.strip() for c in contents]),
    "gemma": ("<end_of_turn>", lambda contents: [c.strip() for c in contents]),
    "alpaca-vi": ("</s>", lambda contents: list(contents)),
}


def test_named_templates_cover_the_required_names() -> None:
    assert set(NAMED) <= set(NAMED_TEMPLATES)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(NAMED))
def test_named_template_labels_are_rendered_response_plus_end_of_turn(name: str, conversation: str) -> None:
    tokenizer = named(name)
    eot, render = NAMED[name]
    messages = CONVERSATIONS[conversation]
    assert_exact_labels(tokenizer, messages, render(assistant_contents(messages)), eot)
    assert end_of_turn_token(tokenizer) == eot


def test_gemma_merges_system_into_first_user_turn_and_calls_the_assistant_model() -> None:
    tokenizer = named("gemma")
    messages = [SYSTEM, *SINGLE]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert f"<start_of_turn>user\n{SYSTEM['content']}\n\n{SINGLE[0]['content']}<end_of_turn>" in text
    assert "<start_of_turn>model\n" in text and text.startswith("<s>")
    example = assert_exact_labels(tokenizer, messages, [SINGLE[1]["content"]], "<end_of_turn>")
    assert example["labels"][0] == IGNORE_INDEX


def test_alpaca_vi_uses_vietnamese_headers_and_ends_responses_with_eos() -> None:
    tokenizer = named("alpaca-vi")
    text = tokenizer.apply_chat_template(SINGLE, tokenize=False)
    assert "### Hướng dẫn:\n" in text and f"### Trả lời:\n{SINGLE[1]['content']}</s>" in text
    assert render_prompt(tokenizer, SINGLE).endswith("### Trả lời:\n")


MISTRAL_STYLE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + "
    "' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_mistral_style_template_merging_system_into_user(conversation: str) -> None:
    tokenizer = make_tokenizer(template=MISTRAL_STYLE)
    messages = CONVERSATIONS[conversation]
    example = assert_exact_labels(tokenizer, messages, assistant_contents(messages), "</s>")
    assert end_of_turn_token(tokenizer) == "</s>"
    if messages[0]["role"] == "system":
        untrained = decode(tokenizer, [t for t, label in zip(example["input_ids"], example["labels"])
                                       if label == IGNORE_INDEX])
        assert f"[INST] {SYSTEM['content']}" in untrained


TRIMMING_CHATML = NAMED_TEMPLATES["chatml"].template.replace("message['content']", "(message['content'] | trim)")


def test_template_that_trims_content() -> None:
    tokenizer = make_tokenizer(template=TRIMMING_CHATML)
    messages = [
        SYSTEM,
        {"role": "user", "content": "  Hòa hay hoà?\n"},
        {"role": "assistant", "content": "\n\n  Cả hai: hòa và hoà là một chữ.  \n\n"},
        {"role": "user", "content": "Thủy hay thuỷ?"},
        {"role": "assistant", "content": " \n Cả thủy và thuỷ đều đúng. \n "},
    ]
    assert_exact_labels(tokenizer, messages, [c.strip() for c in assistant_contents(messages)], "<|im_end|>")


def test_nfd_text_and_both_tone_mark_styles_are_labelled_exactly() -> None:
    tokenizer = named("chatml")
    contents = [unicodedata.normalize("NFD", "Hoà bình, thuỷ lợi."), "Hòa bình, thủy lợi."]
    messages = [
        {"role": "user", "content": unicodedata.normalize("NFD", "Viết hai cách.")},
        {"role": "assistant", "content": contents[0]},
        {"role": "user", "content": "Cách kia?"},
        {"role": "assistant", "content": contents[1]},
    ]
    assert_exact_labels(tokenizer, messages, contents, "<|im_end|>")


LLAMA_3_BASE = (  # some base-model templates always append the assistant header, even after a response
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)


def test_template_that_always_appends_an_assistant_header() -> None:
    tokenizer = make_tokenizer(template=LLAMA_3_BASE)
    example = assert_exact_labels(tokenizer, MULTI, [c.strip() for c in assistant_contents(MULTI)], "<|eot_id|>")
    assert example["labels"][-3:] == [IGNORE_INDEX] * 3


PLAIN = "{% for message in messages %}{{ message['role'] + ':\\n' + message['content'] + '\\n' }}{% endfor %}"


def test_eos_is_appended_and_trained_when_the_template_writes_none_after_the_last_response() -> None:
    tokenizer = make_tokenizer(template=PLAIN)
    example = tokenize_conversation(tokenizer, SINGLE)
    assert example["input_ids"] == [*template_ids(tokenizer, SINGLE), tokenizer.eos_token_id]
    runs = trained_runs(example)
    assert [decode(tokenizer, run) for run in runs] == [SINGLE[1]["content"] + "\n</s>"]
    assert end_of_turn_token(tokenizer) == "</s>"


def test_template_without_end_of_turn_between_responses_is_refused() -> None:
    tokenizer = make_tokenizer(template=PLAIN)
    with pytest.raises(ChatTemplateError, match="never learn to stop"):
        tokenize_conversation(tokenizer, MULTI)
    last_only = tokenize_conversation(tokenizer, MULTI, train_on="last")
    assert len(trained_runs(last_only)) == 1


def test_template_that_drops_the_response_is_refused() -> None:
    tokenizer = make_tokenizer(template="{% for m in messages %}{% if m['role'] != 'assistant' %}"
                                        "{{ m['content'] }}{% endif %}{% endfor %}</s>")
    with pytest.raises(ChatTemplateError, match="exactly once"):
        tokenize_conversation(tokenizer, SINGLE)


# --------------------------------------------------------------------------------------------------------------
# train_on, "train": false, truncation, bad conversations


def test_train_on_last_trains_only_the_final_response() -> None:
    tokenizer = named("chatml")
    example = tokenize_conversation(tokenizer, MULTI, train_on="last")
    assert [decode(tokenizer, run) for run in trained_runs(example)] == [MULTI[-1]["content"] + "<|im_end|>"]


def test_train_on_all_trains_every_token() -> None:
    tokenizer = named("gemma")
    example = tokenize_conversation(tokenizer, [SYSTEM, *MULTI], train_on="all")
    assert example["labels"] == example["input_ids"]


def test_message_marked_train_false_is_not_trained_and_the_key_never_reaches_the_template() -> None:
    leak_guard = ("{% for message in messages %}{% if message.train is defined %}"
                  "{{ raise_exception('the train key reached the template') }}{% endif %}{% endfor %}")
    tokenizer = make_tokenizer(template=leak_guard + NAMED_TEMPLATES["chatml"].template)
    messages = [dict(m) for m in MULTI]
    messages[1]["train"] = False
    example = tokenize_conversation(tokenizer, messages)
    rendered = [decode(tokenizer, run) for run in trained_runs(example)]
    assert rendered == [c + "<|im_end|>" for c in assistant_contents(MULTI)[1:]]
    assert messages[1]["train"] is False  # the caller's messages are not changed
    messages[-1]["train"] = False
    with pytest.raises(NoTrainedTurnError):
        tokenize_conversation(tokenizer, messages, train_on="last")


def test_truncation_keeps_a_partial_response_and_refuses_a_cut_away_one() -> None:
    tokenizer = named("chatml")
    full = tokenize_conversation(tokenizer, [SYSTEM, *SINGLE])
    first_trained = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    partial = tokenize_conversation(tokenizer, [SYSTEM, *SINGLE], max_length=first_trained + 2)
    assert partial["input_ids"] == full["input_ids"][:first_trained + 2]
    assert partial["labels"][-2:] == full["input_ids"][first_trained:first_trained + 2]
    with pytest.raises(ResponseTruncatedError):
        tokenize_conversation(tokenizer, [SYSTEM, *SINGLE], max_length=first_trained)
    assert issubclass(ResponseTruncatedError, VinakitError)


def test_conversation_without_assistant_turn_is_an_error() -> None:
    with pytest.raises(NoTrainedTurnError, match="no assistant turn"):
        tokenize_conversation(named("chatml"), [SYSTEM, SINGLE[0]])


def test_malformed_messages_and_options_are_errors() -> None:
    tokenizer = named("chatml")
    with pytest.raises(DataError, match="string 'content'"):
        tokenize_conversation(tokenizer, [SINGLE[0], {"role": "assistant", "content": None}])
    with pytest.raises(ParamsError, match="train_on"):
        tokenize_conversation(tokenizer, SINGLE, train_on="responses")
    with pytest.raises(ParamsError, match="max_length"):
        tokenize_conversation(tokenizer, SINGLE, max_length=0)


def test_tokenize_rows_drops_and_counts_rows_that_cannot_be_trained() -> None:
    tokenizer = named("gemma")
    long_prompt = {"role": "user", "content": " ".join(["Hà Nội là thủ đô của Việt Nam."] * 40)}
    rows = [
        {"messages": SINGLE},
        {"messages": [long_prompt, SINGLE[1]]},                      # response cut away by max_length
        {"messages": [SYSTEM, SINGLE[0]]},                          # nothing to train
        {"messages": [SINGLE[0], SINGLE[0], SINGLE[1]]},            # Gemma refuses non-alternating roles
        {"messages": MULTI},
    ]
    kept, dropped = tokenize_rows(tokenizer, rows, max_length=80, train_on="assistant")
    assert kept[0]["input_ids"] == tokenize_conversation(tokenizer, SINGLE)["input_ids"]
    assert kept[1]["input_ids"] == tokenize_conversation(tokenizer, MULTI)["input_ids"][:80]
    assert all(row["length"] == len(row["input_ids"]) == len(row["labels"]) for row in kept)
    assert dropped == {
        "response truncated away by max_length": 1,
        "no assistant turn to train": 1,
        "chat template failed: TemplateError: Conversation roles must alternate user/assistant/user/assistant/...": 1,
    }


def test_tokenize_rows_locates_a_malformed_row() -> None:
    with pytest.raises(DataError) as caught:
        tokenize_rows(named("chatml"), [{"messages": SINGLE}, {"text": "Xin chào"}], max_length=None,
                      train_on="assistant")
    assert caught.value.line == 2


# --------------------------------------------------------------------------------------------------------------
# Choosing the template


def test_unknown_template_name_lists_the_closest_first() -> None:
    with pytest.raises(ParamsError) as caught:
        use_chat_template(make_tokenizer(), "lama3")
    message = str(caught.value)
    assert message.index("llama-3") < min(message.index(name) for name in ("chatml", "gemma", "alpaca-vi"))


def test_named_template_refuses_a_tokenizer_without_its_tokens() -> None:
    tokenizer = make_tokenizer(specials=("<s>", "</s>"))
    with pytest.raises(ParamsError, match=r"<\|im_start\|>.*own template"):
        use_chat_template(tokenizer, "chatml")
    assert tokenizer.chat_template is None  # nothing changed, no token added
    assert len(tokenizer) == len(make_tokenizer(specials=("<s>", "</s>")))
    assert use_chat_template(tokenizer, "alpaca-vi").chat_template == NAMED_TEMPLATES["alpaca-vi"].template


def test_own_template_is_kept_and_its_absence_is_an_error() -> None:
    tokenizer = make_tokenizer(template=MISTRAL_STYLE)
    assert use_chat_template(tokenizer, None).chat_template == MISTRAL_STYLE
    assert use_chat_template(tokenizer, "").chat_template == MISTRAL_STYLE
    with pytest.raises(ParamsError, match="no chat template"):
        use_chat_template(make_tokenizer(), None)


# --------------------------------------------------------------------------------------------------------------
# Prompts and previews


@pytest.mark.parametrize("name", list(NAMED))
def test_render_prompt_drops_everything_after_the_last_user_turn(name: str) -> None:
    tokenizer = named(name)
    messages = [SYSTEM, *MULTI]
    expected = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert render_prompt(tokenizer, messages) == expected
    assert render_prompt(tokenizer, messages[:-1]) == expected
    with pytest.raises(DataError, match="user turn"):
        render_prompt(tokenizer, [SYSTEM])


def test_masking_preview_marks_exactly_the_trained_text() -> None:
    tokenizer = named("chatml")
    example = tokenize_conversation(tokenizer, [SYSTEM, *SINGLE])
    text = masking_preview(tokenizer, example)
    assert text == tokenizer.apply_chat_template([SYSTEM, *SINGLE], tokenize=False).replace(
        SINGLE[1]["content"] + "<|im_end|>", "[[" + SINGLE[1]["content"] + "<|im_end|>]]")
    html = masking_preview(tokenizer, example, html=True)
    assert f'<span style="background:#c8f7c5">{SINGLE[1]["content"]}&lt;|im_end|&gt;</span>' in html
    assert "&lt;|im_start|&gt;system↵\n" in html and "<|im_start|>" not in html


def test_write_masking_preview_writes_n_examples(tmp_path: Path) -> None:
    tokenizer = named("llama-3")
    examples = [tokenize_conversation(tokenizer, conversation) for conversation in CONVERSATIONS.values()]
    path = write_masking_preview(tmp_path / "run" / "masking_preview.txt", tokenizer, examples, n=2)
    written = path.read_text(encoding="utf-8")
    assert written.count("=== example") == 2
    assert "[[Thủ đô của Việt Nam là Hà Nội.<|eot_id|>]]" in written


def test_importing_vinakit_chat_loads_no_heavy_library() -> None:
    code = ("import sys, vinakit.chat; "
            "print(sorted({'torch', 'transformers', 'datasets', 'tokenizers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"
