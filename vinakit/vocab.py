"""Vocabulary extension for Vietnamese: propose new tokens, add them, measure fertility.

Byte-level BPE tokenizers (Llama-3, Qwen, SmolLM2, ``tiny-vi``) split many Vietnamese syllables into several
pieces (``" khuỷu"`` -> ``" khu"``, ``"á»"``, ``"·"``, ``"u"``). This module

* measures **fertility**, tokens per syllable, on Vietnamese text (1.0 is one token per syllable);
* proposes syllables/words the tokenizer splits, ranked by the tokens they would save on a corpus
  (:func:`train_new_tokens`);
* adds them to the tokenizer and the model (:func:`extend_vocabulary`), initialising each new embedding row with
  the mean of the embeddings of the pieces the *old* tokenizer split the word into.

How words are added, and why: each word becomes an entry of the BPE model's own vocabulary in the form it takes
in running text (after a space: ``"ĠViá»ĩt"`` for byte-level tokenizers) and the model switches to
``ignore_merges`` (a pre-token found whole in the vocabulary is one token). The usual alternative,
``tokenizer.add_tokens``, matches raw substrings before pre-tokenisation: a new ``" tha"`` then cuts
``" thanh"`` in two, and a token without its space costs a separate space token, so fertility barely moves.
A word at the very start of a text or line (no space before it) keeps its old pieces.

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import json
import re
import tempfile
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from vinakit.errors import ParamsError, VinakitError

# A syllable is a run of letters and digits: Vietnamese writes one syllable per space-separated word.
_SYLLABLE = re.compile(r"[^\W_]+")
# A candidate is one word (letters only) preceded by one space, as it appears in running text.
_RUNNING_WORD = re.compile(r" [^\W\d_]+")
_LETTERS = re.compile(r"[^\W\d_]+")
_TONE_MARKS = "\u0300\u0301\u0303\u0309\u0323"
_VOWELS = "".join(sorted({unicodedata.normalize("NFC", base + mark)
                          for base in "aăâeêioôơuưy" for mark in ("", *_TONE_MARKS)}))
# The shape of a Vietnamese syllable: optional onset, one to three vowels, optional final consonant.
_VIETNAMESE_SYLLABLE = re.compile(
    rf"(?:ngh|ng|nh|ch|gh|gi|kh|ph|qu|th|tr|[bcdđghklmnpqrstvx])?[{_VOWELS}]{{1,3}}(?:ng|nh|ch|[cmnpt])?")

__all__ = [
    "FertilityReport", "NewToken", "NewTokens", "TokenCandidate", "count_syllables", "extend_vocabulary",
    "fertility", "fertility_report", "is_vietnamese_syllable", "readable_pieces", "train_new_tokens",
]


# --------------------------------------------------------------------------------------------------------------
# Fertility
# --------------------------------------------------------------------------------------------------------------


def is_vietnamese_syllable(word: str) -> bool:
    """Whether ``word`` has the shape of one Vietnamese syllable ("khuỷu", "Nguyễn"; not "matplotlib")."""
    return bool(_VIETNAMESE_SYLLABLE.fullmatch(unicodedata.normalize("NFC", word).lower()))


def count_syllables(text: str) -> int:
    """Number of Vietnamese syllables (runs of letters and digits) in ``text``, NFC or NFD."""
    return len(_SYLLABLE.findall(unicodedata.normalize("NFC", text)))


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    """Tokens ``tokenizer`` spends on ``texts`` (no special tokens)."""
    if not texts:
        return 0
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return sum(len(ids) for ids in encoded)


def _syllables_in(texts: list[str]) -> int:
    """Syllables in ``texts``; fertility is undefined without any."""
    syllables = sum(count_syllables(text) for text in texts)
    if syllables == 0:
        raise VinakitError("Cannot measure fertility: the texts hold no syllable (no letters or digits).")
    return syllables


def fertility(tokenizer: Any, texts: Iterable[str]) -> float:
    """Tokens per syllable of ``tokenizer`` on ``texts``.

    Args:
        tokenizer: a transformers tokenizer.
        texts: Vietnamese text (normalise it first, as training does).

    Returns:
        Tokens divided by syllables; 1.0 means one token per syllable.

    Raises:
        VinakitError: the texts hold no syllable.
    """
    texts = list(texts)
    syllables = _syllables_in(texts)
    return count_tokens(tokenizer, texts) / syllables


@dataclass(frozen=True)
class FertilityReport:
    """Tokens per syllable before and after a vocabulary extension, on the same (held-out) texts."""

    before: float
    after: float
    syllables: int
    tokens_before: int
    tokens_after: int
    texts: int

    @property
    def tokens_saved_share(self) -> float:
        """Share of tokens the new vocabulary saves on these texts (0.1 = 10 % fewer tokens)."""
        return 1.0 - self.tokens_after / self.tokens_before if self.tokens_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (rounded for reading)."""
        values = asdict(self)
        values.update(before=round(self.before, 4), after=round(self.after, 4),
                      tokens_saved_share=round(self.tokens_saved_share, 4))
        return values

    def to_frame(self) -> Any:
        """A two-row table (before / after) for a notebook."""
        import pandas as pd

        return pd.DataFrame({
            "tokenizer": ["before", "after"],
            "tokens": [self.tokens_before, self.tokens_after],
            "syllables": [self.syllables, self.syllables],
            "tokens per syllable": [round(self.before, 4), round(self.after, 4)],
        }).set_index("tokenizer")


def fertility_report(old_tokenizer: Any, new_tokenizer: Any, texts: Iterable[str]) -> FertilityReport:
    """Compare two tokenizers' fertility on the same texts.

    Args:
        old_tokenizer: the tokenizer before the extension.
        new_tokenizer: the tokenizer after it.
        texts: held-out Vietnamese text.

    Returns:
        The report.

    Raises:
        VinakitError: the texts hold no syllable.
    """
    texts = list(texts)
    syllables = _syllables_in(texts)
    before, after = count_tokens(old_tokenizer, texts), count_tokens(new_tokenizer, texts)
    return FertilityReport(before=before / syllables, after=after / syllables, syllables=syllables,
                           tokens_before=before, tokens_after=after, texts=len(texts))


# --------------------------------------------------------------------------------------------------------------
# Proposing new tokens
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCandidate:
    """A word the tokenizer splits, with what adding it would save on the corpus.

    Attributes:
        word: the word as written (no surrounding space).
        count: how often it occurs after a space in the corpus.
        piece_count: how many tokens the current tokenizer splits it into.
        pieces: those tokens as readable text (a token ending inside a letter is shown joined with the next).
        tokens_saved: ``count * (piece_count - 1)``.
    """

    word: str
    count: int
    piece_count: int
    pieces: tuple[str, ...]
    tokens_saved: int


class NewTokens(list):
    """The proposed words (a ``list`` of ``str``), best first, with the details in ``candidates``."""

    def __init__(self, candidates: Sequence[TokenCandidate] = ()) -> None:
        super().__init__(candidate.word for candidate in candidates)
        self.candidates: list[TokenCandidate] = list(candidates)

    def to_frame(self) -> Any:
        """The candidates as a table: word, count, pieces, tokens saved."""
        import pandas as pd

        return pd.DataFrame([{"word": c.word, "count": c.count, "pieces": c.piece_count,
                              "split as": " | ".join(c.pieces), "tokens_saved": c.tokens_saved}
                             for c in self.candidates],
                            columns=["word", "count", "pieces", "split as", "tokens_saved"])


def train_new_tokens(corpus: Iterable[str], n: int, tokenizer: Any, *, min_count: int = 2,
                     vietnamese_only: bool = True) -> NewTokens:
    """Propose up to ``n`` Vietnamese syllables the tokenizer splits into several pieces, ranked by tokens saved.

    Words are counted in the form they take in running text (after a space) with the tokenizer's own
    normaliser and pre-tokeniser, so "tokens saved" is exactly what :func:`extend_vocabulary` would save on
    this corpus. Only letter-only words are proposed (no digits, no punctuation).

    Args:
        corpus: training documents (normalised as for training; keep the validation split out).
        n: how many words to propose at most.
        tokenizer: the current (fast, BPE) tokenizer.
        min_count: ignore words seen fewer times than this.
        vietnamese_only: propose only words shaped like one Vietnamese syllable (no English words such as
            "matplotlib" from code or loanwords written as one word); False proposes any letter-only word.

    Returns:
        The words, best first (a list of str with ``.candidates`` and ``.to_frame()``).

    Raises:
        ParamsError: ``n`` < 0 or ``min_count`` < 1.
        VinakitError: the tokenizer cannot be extended (not a fast BPE tokenizer with a pre-tokeniser).
    """
    if n < 0:
        raise ParamsError(f"The number of new tokens must be >= 0, got {n}.")
    if min_count < 1:
        raise ParamsError(f"min_count must be >= 1, got {min_count}.")
    backend = _bpe_backend(tokenizer)
    counts = _running_word_counts(backend, corpus)
    candidates = []
    for (word, pretoken), count in counts.items():
        if count < min_count or (vietnamese_only and not is_vietnamese_syllable(word)):
            continue
        ids = [piece.id for piece in backend.model.tokenize(pretoken)]
        if len(ids) > 1:
            candidates.append(TokenCandidate(word, count, len(ids), readable_pieces(tokenizer, ids),
                                             count * (len(ids) - 1)))
    candidates.sort(key=lambda c: (-c.tokens_saved, -c.count, c.word))
    return NewTokens(candidates[:n])


def _running_word_counts(backend: Any, corpus: Iterable[str]) -> Counter[tuple[str, str]]:
    """Count (word, pre-token) pairs of words that follow a space."""
    counts: Counter[tuple[str, str]] = Counter()
    for document in corpus:
        text = _normalized(backend, document)
        for pretoken, (start, end) in backend.pre_tokenizer.pre_tokenize_str(text):
            surface = text[start:end]
            if _RUNNING_WORD.fullmatch(surface):
                counts[(surface[1:], pretoken)] += 1
    return counts


def _normalized(backend: Any, text: str) -> str:
    return backend.normalizer.normalize_str(text) if backend.normalizer is not None else text


def readable_pieces(tokenizer: Any, ids: Sequence[int]) -> tuple[str, ...]:
    """The text of each token; byte-level tokens that end inside a letter ("á»") are joined with the next."""
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[start:end]), clean_up_tokenization_spaces=False)
        if not text.endswith("\ufffd") or end == len(ids):
            pieces.append(text)
            start = end
    return tuple(pieces)


# --------------------------------------------------------------------------------------------------------------
# Adding them
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewToken:
    """One word added to the vocabulary.

    Attributes:
        word: the word as given.
        token: the vocabulary entry (the tokenizer's internal form, e.g. ``"ĠViá»ĩt"``).
        token_id: its id (= its embedding row).
        old_ids: the ids the old tokenizer split it into; its embedding rows started as their mean.
        old_pieces: those pieces as readable text (see :func:`readable_pieces`).
    """

    word: str
    token: str
    token_id: int
    old_ids: tuple[int, ...]
    old_pieces: tuple[str, ...] = field(default=())


def extend_vocabulary(model: Any, tokenizer: Any, new_tokens: Iterable[str]) -> tuple[Any, Any, list[NewToken]]:
    """Add words to the tokenizer and the model; each new embedding row starts as the mean of its old pieces.

    The means are computed before the embedding matrix grows, from the pieces the *old* tokenizer split each
    word into (input embeddings, and output embeddings when they are not tied to the input ones). After the
    call every new word, written after a space as in running text, encodes as exactly one token; every old
    token keeps its id.

    Args:
        model: the causal LM, before any LoRA adapter is added.
        tokenizer: its fast BPE tokenizer.
        new_tokens: words (letters, no spaces), e.g. from :func:`train_new_tokens`. Duplicates are dropped.

    Returns:
        ``(model, tokenizer, added)``: the same model with a larger embedding matrix, a new tokenizer (chat
        template and special tokens kept), and the words added in id order.

    Raises:
        ParamsError: a word is empty, not one word for this tokenizer, or already a single token.
        VinakitError: the model already has an adapter, or the tokenizer is not a fast BPE tokenizer with a
            pre-tokeniser.
    """
    if hasattr(model, "peft_config"):
        raise VinakitError("Extend the vocabulary before adding LoRA: the adapter would not see the new rows.")
    backend = _bpe_backend(tokenizer)
    words = _clean_words(new_tokens)
    if not words:
        return model, tokenizer, []
    planned = _plan_tokens(tokenizer, backend, words)
    input_rows, output_rows = _initial_rows(model, planned)  # before the matrix grows
    new_tokenizer, added = _tokenizer_with(tokenizer, planned)
    _grow_embeddings(model, len(new_tokenizer))
    _write_rows(model, added, input_rows, output_rows)
    _check_extension(tokenizer, new_tokenizer, added)
    return model, new_tokenizer, added


def _bpe_backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VinakitError(f"Vocabulary extension needs a fast tokenizer (tokenizer.json); "
                           f"{type(tokenizer).__name__} has none.")
    model_type = type(backend.model).__name__
    if model_type != "BPE":
        raise VinakitError(f"Vocabulary extension supports BPE tokenizers (Llama-3, Qwen, SmolLM2, tiny-vi); this "
                           f"tokenizer's model is {model_type}.")
    if backend.pre_tokenizer is None:
        raise VinakitError("Vocabulary extension needs a tokenizer that splits text into words before BPE (a "
                           "pre-tokeniser); this one has none, so a word cannot become one vocabulary entry.")
    return backend


def _clean_words(new_tokens: Iterable[str]) -> list[str]:
    if isinstance(new_tokens, str):
        raise ParamsError(f"new_tokens must be a list of words, got the string {new_tokens!r}.")
    words = []
    for entry in new_tokens:
        if not isinstance(entry, str) or not entry.strip():
            raise ParamsError(f"new_tokens: every entry must be a non-empty word, got {entry!r}.")
        word = unicodedata.normalize("NFC", entry.strip())  # NFD marks are not letters to the checks below
        if any(character.isspace() for character in word):
            raise ParamsError(f"new_tokens: {entry!r} has a space inside; give one word (syllable) per entry, "
                              f"e.g. {word.split()!r}.")
        words.append(word)
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class _Planned:
    word: str
    token: str
    old_ids: tuple[int, ...]


def _plan_tokens(tokenizer: Any, backend: Any, words: list[str]) -> list[_Planned]:
    """Each word's vocabulary entry and old pieces; every problem is reported at once."""
    vocab = backend.get_vocab(with_added_tokens=True)
    planned, existing, not_one_word = [], [], []
    for word in words:
        pretokens = backend.pre_tokenizer.pre_tokenize_str(_normalized(backend, " " + word))
        if len(pretokens) != 1 or not _LETTERS.fullmatch(word):
            not_one_word.append(word)
            continue
        token = pretokens[0][0]
        old_ids = tuple(piece.id for piece in backend.model.tokenize(token))
        if token in vocab or len(old_ids) == 1:
            existing.append(f"{word!r} (token {token!r}, id {vocab.get(token, old_ids[0])})")
            continue
        planned.append(_Planned(word, token, old_ids))
    if not_one_word:
        raise ParamsError(f"new_tokens: {', '.join(map(repr, not_one_word))} are not single words for this "
                          f"tokenizer; use letters only (no digits or punctuation), one word per entry.")
    if existing:
        raise ParamsError(f"new_tokens: {', '.join(existing)} already exist as single tokens in the vocabulary; "
                          f"remove them from new_tokens.")
    return planned


def _initial_rows(model: Any, planned: list[_Planned]) -> tuple[Any, Any | None]:
    """Mean of the old pieces' input (and untied output) embeddings, one row per new word."""
    import torch

    input_weight = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is None or output.weight is input_weight or output.weight.data_ptr() == input_weight.data_ptr()
    with torch.no_grad():
        input_rows = torch.stack([_mean_rows(input_weight, p.old_ids) for p in planned])
        output_rows = None if tied else torch.stack([_mean_rows(output.weight, p.old_ids) for p in planned])
    return input_rows, output_rows


def _mean_rows(weight: Any, ids: tuple[int, ...]) -> Any:
    import torch

    rows = weight[torch.tensor(ids, device=weight.device)]
    return rows.float().mean(dim=0).detach().clone()  # a copy: resizing may free the old matrix


def _tokenizer_with(tokenizer: Any, planned: list[_Planned]) -> tuple[Any, list[NewToken]]:
    """A new tokenizer whose BPE vocabulary holds the planned entries (old ids unchanged)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="vinakit-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        tokenizer_file = Path(folder) / "tokenizer.json"
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        added = _add_to_bpe_vocab(tokenizer, data, planned)
        tokenizer_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        _load_tokenizer_json_verbatim(Path(folder) / "tokenizer_config.json")
        new_tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in ("model_max_length", "padding_side", "truncation_side"):
        setattr(new_tokenizer, name, getattr(tokenizer, name))
    return new_tokenizer, added


def _add_to_bpe_vocab(tokenizer: Any, data: dict[str, Any], planned: list[_Planned]) -> list[NewToken]:
    vocab: dict[str, int] = data["model"]["vocab"]
    # The tokenizers library renumbers added tokens (<|im_end|> ...) from the size of the BPE vocabulary when it
    # loads a file; listing them in the BPE vocabulary with their ids keeps every old id where it was.
    for special in data.get("added_tokens", []):
        vocab.setdefault(special["content"], special["id"])
    next_id = max([*vocab.values(), *(s["id"] for s in data.get("added_tokens", []))]) + 1
    added = []
    for offset, item in enumerate(planned):
        vocab[item.token] = next_id + offset
        pieces = readable_pieces(tokenizer, item.old_ids)
        added.append(NewToken(item.word, item.token, next_id + offset, item.old_ids, pieces))
    # A pre-token found whole in the vocabulary becomes that one token; without merges leading to the new
    # entries, this is what makes them reachable. Old tokens are unaffected (checked in _check_extension).
    data["model"]["ignore_merges"] = True
    return added


def _load_tokenizer_json_verbatim(config_path: Path) -> None:
    """Make AutoTokenizer load tokenizer.json as saved.

    Model-specific classes such as transformers 5's ``Qwen2Tokenizer`` rebuild the BPE model from vocab and
    merges with their own settings, which would drop ``ignore_merges`` and with it every new token.
    """
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["tokenizer_class"] = "TokenizersBackend"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def _grow_embeddings(model: Any, vocab_size: int) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    # Some models (Qwen) already have spare rows beyond the tokenizer; never shrink them.
    if vocab_size > rows:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)


def _write_rows(model: Any, added: list[NewToken], input_rows: Any, output_rows: Any | None) -> None:
    import torch

    ids = [token.token_id for token in added]
    with torch.no_grad():
        input_weight = model.get_input_embeddings().weight
        index = torch.tensor(ids, device=input_weight.device)
        input_weight[index] = input_rows.to(device=input_weight.device, dtype=input_weight.dtype)
        if output_rows is not None:
            output_weight = model.get_output_embeddings().weight
            output_weight[index] = output_rows.to(device=output_weight.device, dtype=output_weight.dtype)


def _check_extension(old_tokenizer: Any, new_tokenizer: Any, added: list[NewToken]) -> None:
    """Old ids unchanged and every new word one token in running text, or a clear error."""
    new_vocab = new_tokenizer.get_vocab()
    moved = [token for token, token_id in old_tokenizer.get_vocab().items() if new_vocab.get(token) != token_id]
    if moved:
        raise VinakitError(f"Vocabulary extension would change the ids of {len(moved)} existing tokens "
                           f"(e.g. {moved[:3]}); this tokenizer is not supported.")
    for token in added:
        ids = new_tokenizer(" " + token.word, add_special_tokens=False)["input_ids"]
        if ids != [token.token_id]:
            raise VinakitError(f"After the extension {token.word!r} still encodes as {ids}, not as its new id "
                               f"{token.token_id}; this tokenizer's pre-tokeniser is not supported.")
