"""Vocabulary extension: proposals ranked by tokens saved, mean-of-old-pieces initialisation, fertility."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import torch

from vinakit import vocab
from vinakit.data import load_text_corpus
from vinakit.errors import ParamsError, VinakitError
from vinakit.tiny import load_tiny

RUNNING_TEXT = "Tôi yêu {word} lắm, vì {word} là của Việt Nam."


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    documents, _ = load_text_corpus("vinakit:corpus")
    return documents


@pytest.fixture()
def tiny() -> tuple:
    return load_tiny()


def split_words(tokenizer, documents: list[str], n: int = 3) -> list[str]:
    """Words of the corpus the tiny tokenizer splits into several pieces."""
    return list(vocab.train_new_tokens(documents, n, tokenizer, min_count=1))


def tied_copy(model):
    """The tiny model with input and output embeddings tied (as small real models have them)."""
    from transformers import LlamaForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tied.load_state_dict(state, strict=False)
    tied.tie_weights()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    return tied


# ------------------------------------------------------------------------------------------------ fertility


def test_syllables_are_counted_the_same_in_nfc_and_nfd():
    text = "Hòa bình, thủy lợi và khoẻ mạnh: 3 điều."
    assert vocab.count_syllables(text) == 9
    assert vocab.count_syllables(unicodedata.normalize("NFD", text)) == 9


def test_fertility_is_tokens_per_syllable(tiny):
    _, tokenizer = tiny
    texts = ["Hà Nội là thủ đô.", "Thuỷ triều lên xuống."]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert vocab.fertility(tokenizer, texts) == pytest.approx(tokens / 9)
    nfd = [unicodedata.normalize("NFD", t) for t in texts]
    assert vocab.fertility(tokenizer, nfd) == pytest.approx(vocab.fertility(tokenizer, texts))
    with pytest.raises(VinakitError, match="no syllable"):
        vocab.fertility(tokenizer, ["... !!!"])


# ------------------------------------------------------------------------------------------------ proposals


def test_proposals_are_split_words_ranked_by_tokens_saved(tiny, corpus):
    _, tokenizer = tiny
    proposal = vocab.train_new_tokens(corpus, 30, tokenizer, min_count=1)
    assert 0 < len(proposal) <= 30 and list(proposal) == [c.word for c in proposal.candidates]
    saved = [c.tokens_saved for c in proposal.candidates]
    assert saved == sorted(saved, reverse=True)
    for candidate in proposal.candidates:
        pieces = tokenizer(" " + candidate.word, add_special_tokens=False)["input_ids"]
        assert len(pieces) == candidate.piece_count > 1
        assert "".join(candidate.pieces) == " " + candidate.word and "\ufffd" not in "".join(candidate.pieces)
        assert candidate.tokens_saved == candidate.count * (len(pieces) - 1)
        assert candidate.word.isalpha()
    table = proposal.to_frame()
    assert list(table["word"]) == list(proposal)


def test_a_frequent_split_word_outranks_a_rare_one(tiny):
    _, tokenizer = tiny
    frequent, rare = "khuỷu", "xõa"
    assert len(tokenizer(" " + rare, add_special_tokens=False)["input_ids"]) > 1
    documents = [f"Anh ấy gập {frequent} tay lại." for _ in range(5)] + [f"Tóc cô ấy {rare} ngang vai."]
    proposal = vocab.train_new_tokens(documents, 10, tokenizer, min_count=1)
    assert proposal.index(frequent) < proposal.index(rare)
    assert rare not in vocab.train_new_tokens(documents, 10, tokenizer, min_count=2)
    assert len(vocab.train_new_tokens(documents, 1, tokenizer, min_count=1)) == 1


def test_only_vietnamese_syllables_are_proposed_unless_asked(tiny):
    _, tokenizer = tiny
    documents = ["Thư viện matplotlib vẽ đồ thị; dãy Fibonacci tăng nhanh." for _ in range(4)]
    assert not {"matplotlib", "Fibonacci"} & set(vocab.train_new_tokens(documents, 50, tokenizer))
    assert {"matplotlib", "Fibonacci"} <= set(vocab.train_new_tokens(documents, 50, tokenizer, vietnamese_only=False))
    assert vocab.is_vietnamese_syllable("Nguyễn") and vocab.is_vietnamese_syllable("khuỷu")
    assert not vocab.is_vietnamese_syllable("Campuchia")


# ------------------------------------------------------------------------------------------------ extension


def test_new_rows_are_the_mean_of_the_old_pieces_computed_before_resizing(tiny, corpus):
    model, tokenizer = tiny
    words = split_words(tokenizer, corpus)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    old_rows = old_input.shape[0]
    old_pieces = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words}

    model, new_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, words)

    assert [t.word for t in added] == words
    assert [t.token_id for t in added] == list(range(old_rows, old_rows + len(words)))
    new_input = model.get_input_embeddings().weight
    new_output = model.get_output_embeddings().weight
    assert new_input.shape[0] == new_output.shape[0] == len(new_tokenizer) == old_rows + len(words)
    for token in added:
        assert list(token.old_ids) == old_pieces[token.word]
        expected_in = old_input[list(token.old_ids)].mean(dim=0)
        expected_out = old_output[list(token.old_ids)].mean(dim=0)
        assert torch.allclose(new_input[token.token_id], expected_in, atol=1e-6)
        assert torch.allclose(new_output[token.token_id], expected_out, atol=1e-6)  # untied: its own mean
        assert not torch.allclose(new_input[token.token_id], old_input.mean(dim=0), atol=1e-4)
    assert torch.equal(new_input[:old_rows], old_input)  # old rows untouched
    assert torch.equal(new_output[:old_rows], old_output)


def test_each_new_word_is_one_token_in_running_text_and_old_ids_stay(tiny, corpus):
    model, tokenizer = tiny
    words = split_words(tokenizer, corpus)
    _, new_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, words)
    for token in added:
        text = RUNNING_TEXT.format(word=token.word)
        ids = new_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.count(token.token_id) == 2
        assert len(ids) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 2 * (len(token.old_ids) - 1)
        assert new_tokenizer.decode(ids) == text
    old_vocab, new_vocab = tokenizer.get_vocab(), new_tokenizer.get_vocab()
    assert all(new_vocab[token] == token_id for token, token_id in old_vocab.items())
    assert new_tokenizer.chat_template == tokenizer.chat_template
    assert (new_tokenizer.eos_token, new_tokenizer.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    messages = [{"role": "user", "content": "Xin chào"}]
    assert new_tokenizer.apply_chat_template(messages, tokenize=False) == \
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_extension_survives_save_and_reload(tiny, corpus, tmp_path: Path):
    from transformers import AutoTokenizer

    model, tokenizer = tiny
    _, new_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, split_words(tokenizer, corpus))
    new_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = RUNNING_TEXT.format(word=added[0].word)
    assert reloaded(text)["input_ids"] == new_tokenizer(text)["input_ids"]
    assert len(reloaded) == len(new_tokenizer)


def test_tied_embeddings_get_one_mean_row_and_stay_tied(tiny, corpus):
    model, tokenizer = tiny
    model = tied_copy(model)
    words = split_words(tokenizer, corpus, n=2)
    old = model.get_input_embeddings().weight.detach().clone()
    model, _, added = vocab.extend_vocabulary(model, tokenizer, words)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for token in added:
        assert torch.allclose(model.lm_head.weight[token.token_id], old[list(token.old_ids)].mean(dim=0), atol=1e-6)


def test_nfd_and_tone_style_variants_of_a_word(tiny):
    model, tokenizer = tiny
    word = "khuỷu"
    _, new_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, [unicodedata.normalize("NFD", word)])
    assert added[0].word == word
    # the tokenizer's NFC normaliser makes NFD text hit the new token too
    nfd_text = unicodedata.normalize("NFD", f"Gập {word} tay.")
    assert added[0].token_id in new_tokenizer(nfd_text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ bad input


def test_words_that_already_exist_are_named(tiny):
    model, tokenizer = tiny
    existing = next(word for word in ("là", "của", "và")
                    if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1)
    with pytest.raises(ParamsError, match=f"'{existing}'.*already exist.*remove them from new_tokens"):
        vocab.extend_vocabulary(model, tokenizer, ["khuỷu", existing])
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]  # nothing was changed


@pytest.mark.parametrize("bad,message", [
    ("Việt Nam", "space inside"),
    ("COVID-19", "not single words"),
    ("", "non-empty"),
])
def test_malformed_new_tokens_are_refused(tiny, bad, message):
    model, tokenizer = tiny
    with pytest.raises(ParamsError, match=message):
        vocab.extend_vocabulary(model, tokenizer, [bad])
    with pytest.raises(ParamsError, match="list of words"):
        vocab.extend_vocabulary(model, tokenizer, "khuỷu")


def test_an_adapter_must_come_after_the_extension(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(VinakitError, match="before adding LoRA"):
        vocab.extend_vocabulary(peft_model, tokenizer, ["khuỷu"])


def test_no_words_changes_nothing(tiny):
    model, tokenizer = tiny
    same_model, same_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, [])
    assert (same_model, same_tokenizer, added) == (model, tokenizer, [])


# ------------------------------------------------------------------------------------------------ real tokenizers


@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_real_tokenizers_extend_and_lower_fertility(shared_dir: Path, corpus, name: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / name)
    train, held_out = corpus[:-25], corpus[-25:]
    words = vocab.train_new_tokens(train, 300, tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=4, intermediate_size=4,
                                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
    special_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    model, new_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, words)
    report = vocab.fertility_report(tokenizer, new_tokenizer, held_out)
    assert len(added) == len(words) > 100
    assert report.after < report.before - 0.03
    assert {t: new_tokenizer.convert_tokens_to_ids(t) for t in special_ids} == special_ids
    assert all(new_tokenizer(" " + t.word, add_special_tokens=False)["input_ids"] == [t.token_id] for t in added)
    assert model.get_input_embeddings().weight.shape[0] >= len(new_tokenizer)
