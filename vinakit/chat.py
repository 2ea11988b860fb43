"""Chat templates and exact responses-only labels for any chat template.

Why not string markers: searching for ``<|im_start|>assistant`` (or any other header) breaks on templates
that rename roles (Gemma's ``model``), merge the system prompt into the first user turn (Gemma, Mistral
``[INST]``), ``trim`` the content (Llama-3.1), render the last assistant turn differently (Qwen3's empty
``<think>`` block) or always append an assistant header. Instead this module renders each conversation twice,
once with every assistant content replaced by a unique sentinel and once for real. Everything outside the
sentinels is text the template wrote itself, so aligning the two renderings gives the exact character span of
each rendered response; the special token the template writes right after it is the end-of-turn token. The
real rendering is tokenised once (with offsets) and the tokens inside the trained spans are labelled.

Importing this module is cheap: transformers, tokenizers and tqdm are only used through the objects passed in
or imported inside functions.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

from vinakit.errors import DataError, ParamsError, VinakitError

IGNORE_INDEX = -100
TRAIN_ON_CHOICES = ("assistant", "last", "all")
TRUNCATED_REASON = "response truncated away by max_length"
NO_TRAINED_TURN_REASON = "no assistant turn to train"
PROGRESS_BAR_MIN_ROWS = 1000

# Private-use code points with digits between: no real text holds them, and no template filter (trim,
# upper, lower, escape) changes them.
_SENTINEL_OPEN = "\U000f0a00"
_SENTINEL_CLOSE = "\U000f0a01"
# Beyond this many whitespace trimming variants of one content, only the four usual ones are tried.
_MAX_TRIM_VARIANTS = 4096


class ChatTemplateError(VinakitError):
    """The chat template cannot render a conversation, or its responses cannot be located exactly.

    Args:
        message: what went wrong and what to do about it.
        reason: a short row-independent description, used as the key when counting dropped rows.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class ResponseTruncatedError(VinakitError):
    """``max_length`` cut away every trained token of a conversation; drop the row and count it."""

    reason = TRUNCATED_REASON


class NoTrainedTurnError(DataError):
    """A conversation has no assistant turn to train (none at all, or all marked ``"train": false``)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A named chat template.

    Attributes:
        name: the name users pass as ``chat_template``.
        template: the Jinja source, rendered by ``tokenizer.apply_chat_template``.
        end_of_turn: the token the template writes after each response; None means the tokenizer's eos token.
        required_tokens: literal tokens the template writes; the tokenizer must have each as a single token.
        uses_bos: whether the template writes the tokenizer's bos token.
        models: model families whose tokenizers have the required tokens (named in error messages).
    """

    name: str
    template: str
    end_of_turn: str | None
    required_tokens: tuple[str, ...]
    uses_bos: bool
    models: str


_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA_3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma has no system role: the system prompt opens the first user turn, and the assistant is "model".
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Alpaca layout with Vietnamese headers; each response ends with the eos token so the model learns to stop.
_ALPACA_VI = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Hướng dẫn:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Trả lời:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ raise_exception('alpaca-vi knows the roles system, user and assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Trả lời:\\n' }}{% endif %}"
)

NAMED_TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        ChatTemplate("chatml", _CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), False,
                     "Qwen2.5, Qwen3, SmolLM2"),
        ChatTemplate("llama-3", _LLAMA_3, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                     True, "Llama-3.1, Llama-3.2"),
        ChatTemplate("gemma", _GEMMA, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), True,
                     "Gemma 2, Gemma 3"),
        ChatTemplate("alpaca-vi", _ALPACA_VI, None, (), False, "any model whose tokenizer has an eos token"),
    )
}


# --------------------------------------------------------------------------------------------------------------
# Choosing the template


def use_chat_template(tokenizer: Any, name: str | None) -> Any:
    """Set the chat template used for training, evaluation and export.

    Args:
        tokenizer: a Hugging Face tokenizer; it is changed in place and returned.
        name: None or "" keeps the tokenizer's own template; otherwise a key of ``NAMED_TEMPLATES``.

    Returns:
        The same tokenizer, carrying the chosen template.

    Raises:
        ParamsError: the tokenizer has no template of its own, the name is unknown, or the tokenizer lacks a
            token the named template writes (vinakit never adds tokens silently: their embeddings would be
            untrained).
    """
    if not name:
        if not getattr(tokenizer, "chat_template", None):
            raise ParamsError(
                "This tokenizer has no chat template of its own. Set chat_template to one of "
                f"{', '.join(NAMED_TEMPLATES)} (for a base model, 'alpaca-vi' needs only an eos token).")
        return tokenizer
    template = named_template(name)
    for token in _tokens_needed(tokenizer, template):
        if not _is_single_token(tokenizer, token):
            raise ParamsError(
                f"Chat template '{template.name}' writes the token {token!r}, which this tokenizer does not have "
                "as a single token. vinakit does not add tokens silently (their embeddings would start "
                f"untrained). Use the tokenizer's own template (chat_template: \"\") or a model whose tokenizer "
                f"has it ({template.models}).")
    tokenizer.chat_template = template.template
    return tokenizer


def named_template(name: str) -> ChatTemplate:
    """The named template, or a ParamsError listing the valid names closest first."""
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    closest = difflib.get_close_matches(name, list(NAMED_TEMPLATES), n=len(NAMED_TEMPLATES), cutoff=0.0)
    raise ParamsError(f"Unknown chat template {name!r}. Valid names, closest first: {', '.join(closest)}; "
                      "or leave it empty to keep the tokenizer's own template.")


def _tokens_needed(tokenizer: Any, template: ChatTemplate) -> list[str]:
    tokens = list(template.required_tokens)
    for role, needed in (("bos_token", template.uses_bos), ("eos_token", template.end_of_turn is None)):
        if needed:
            token = getattr(tokenizer, role, None)
            if not token:
                raise ParamsError(f"Chat template '{template.name}' needs a {role.split('_')[0]} token and this "
                                  "tokenizer has none. Use the tokenizer's own template (chat_template: \"\") or "
                                  f"a model whose tokenizer has one ({template.models}).")
            tokens.append(token)
    return tokens


def _is_single_token(tokenizer: Any, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def end_of_turn_token(tokenizer: Any) -> str:
    """The token the tokenizer's chat template writes right after an assistant response.

    Found by rendering a probe conversation, so it holds for any template; when the template writes no
    token after the response, it is the eos token (which training then appends).

    Raises:
        ChatTemplateError: the template cannot render a user/assistant exchange, or writes text that is not a
            special token after the response.
    """
    sentinel = _sentinel(0)
    text = _render(tokenizer, [{"role": "user", "content": "Xin chào"}, {"role": "assistant", "content": sentinel}])
    _, positions = _split_on_sentinels(text, [sentinel])
    content_end = positions[0] + len(sentinel)
    facts = _TokenizerFacts.of(tokenizer)
    boundary = _end_of_turn_span(text, content_end, facts.special_tokens)
    if boundary is None:
        raise _missing_end_of_turn(text, content_end)
    start, end = boundary
    if end > len(text):
        if not facts.eos_token:
            raise ChatTemplateError("The chat template writes nothing after a response and the tokenizer has no "
                                    "eos token, so a model could never learn to stop.")
        return facts.eos_token
    return text[start:end]


# --------------------------------------------------------------------------------------------------------------
# Tokenising with exact labels


def tokenize_conversation(tokenizer: Any, messages: Sequence[Mapping[str, Any]], max_length: int | None = None,
                          train_on: str = "assistant") -> dict[str, list[int]]:
    """Tokenise one conversation with its chat template and label exactly the trained responses.

    For each trained assistant turn the labels are the tokens of the rendered content plus the end-of-turn
    token the template writes after it (and any whitespace the template puts between the two); everything
    else (system, user, role headers, text the template adds such as Qwen3's empty think block) is -100.
    A token that straddles the start of a response (BPE may merge a template newline with a leading newline
    of the content) is trained. When the template writes nothing after the last response, the eos token is
    appended and trained, so the model learns to stop.

    Args:
        tokenizer: a fast Hugging Face tokenizer carrying the chat template (see ``use_chat_template``).
        messages: ``{"role", "content"}`` dicts; ``"train": False`` on an assistant message leaves it
            untrained (the key is removed before rendering).
        max_length: keep at most this many tokens (truncated from the right); None keeps all.
        train_on: "assistant" (every assistant turn), "last" (only the final assistant turn) or "all"
            (every token, ``"train"`` keys ignored).

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, lists of int of equal length, -100 where not trained.

    Raises:
        NoTrainedTurnError: no assistant turn to train.
        ResponseTruncatedError: ``max_length`` leaves no trained token.
        ChatTemplateError: the template fails on this conversation, or does something the alignment cannot
            explain.
        DataError: malformed messages.
    """
    return _tokenize(_TokenizerFacts.of(tokenizer), messages, max_length, train_on)


def tokenize_rows(tokenizer: Any, rows: Iterable[Mapping[str, Any]], max_length: int | None = None,
                  train_on: str = "assistant") -> tuple[list[dict[str, Any]], Counter]:
    """Tokenise many ``{"messages": [...]}`` rows, dropping and counting the rows that cannot be trained.

    Args:
        tokenizer: a fast tokenizer carrying the chat template.
        rows: mappings with a ``messages`` list (a list, a ``datasets.Dataset``, any iterable).
        max_length: as in ``tokenize_conversation``.
        train_on: as in ``tokenize_conversation``.

    Returns:
        The tokenised rows (``input_ids``, ``labels``, ``length``) and a Counter of dropped rows by reason:
        "response truncated away by max_length", "no assistant turn to train", or the template's error.

    Raises:
        DataError: a row has no ``messages`` list or a malformed message, located by 1-based row number.
    """
    from tqdm.auto import tqdm

    _check_options(max_length, train_on)
    facts = _TokenizerFacts.of(tokenizer)
    total = len(rows) if isinstance(rows, Sized) else None
    kept: list[dict[str, Any]] = []
    dropped: Counter = Counter()
    progress = tqdm(rows, total=total, desc="tokenising conversations", unit="row",
                    disable=total is not None and total <= PROGRESS_BAR_MIN_ROWS)
    for number, row in enumerate(progress, start=1):
        try:
            example = _tokenize(facts, _row_messages(row, number), max_length, train_on)
        except ResponseTruncatedError:
            dropped[TRUNCATED_REASON] += 1
        except NoTrainedTurnError:
            dropped[NO_TRAINED_TURN_REASON] += 1
        except ChatTemplateError as error:
            dropped[error.reason] += 1
        except DataError as error:
            raise DataError(error.reason, path=error.path, line=number, field=error.field or "messages") from error
        else:
            example["length"] = len(example["input_ids"])
            kept.append(example)
    return kept, dropped


def _row_messages(row: Any, number: int) -> Any:
    if not isinstance(row, Mapping) or "messages" not in row:
        raise DataError("each row needs a 'messages' list of {role, content} dicts", line=number, field="messages")
    return row["messages"]


@dataclass(frozen=True)
class _TokenizerFacts:
    """What labelling needs from a tokenizer, computed once per batch of rows."""

    tokenizer: Any
    special_tokens: tuple[str, ...]  # longest first, so "<|eot_id|>" wins over a shorter prefix
    eos_token: str | None
    eos_token_id: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> _TokenizerFacts:
        if not getattr(tokenizer, "is_fast", False):
            raise ParamsError("Exact response labels need a fast tokenizer (offset mapping); load it with "
                              "AutoTokenizer.from_pretrained(..., use_fast=True).")
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
            if getattr(added, "special", False):
                specials.add(getattr(added, "content", str(added)))
        return cls(tokenizer, tuple(sorted((t for t in specials if t), key=len, reverse=True)),
                   tokenizer.eos_token, tokenizer.eos_token_id)


@dataclass(frozen=True)
class _Response:
    """One assistant turn located in the rendered text; ``eot_end`` is len(text) + 1 for an appended eos."""

    content_start: int
    content_end: int
    eot_start: int
    eot_end: int


def _tokenize(facts: _TokenizerFacts, messages: Any, max_length: int | None, train_on: str) -> dict[str, list[int]]:
    _check_options(max_length, train_on)
    clean, trained_turns = _prepare_messages(messages, train_on)
    text, responses = _locate_responses(facts, clean, trained_turns)
    encoding = facts.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = [tuple(pair) for pair in encoding["offset_mapping"]]
    if responses and responses[-1].eot_end > len(text):
        # The template writes nothing after the last response: append eos so the model learns to stop.
        input_ids.append(facts.eos_token_id)
        offsets.append((len(text), len(text) + 1))
    _check_end_of_turn_tokens(facts, text, input_ids, offsets, responses)
    if train_on == "all":
        labels = list(input_ids)
    else:
        spans = [(r.content_start, r.eot_end) for r in responses]
        labels = [token if _in_any_span(start, end, spans) else IGNORE_INDEX
                  for token, (start, end) in zip(input_ids, offsets)]
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ResponseTruncatedError(f"max_length={max_length} cuts away every trained token of this "
                                         "conversation; drop the row or raise max_length.")
    return {"input_ids": input_ids, "labels": labels}


def _check_options(max_length: int | None, train_on: str) -> None:
    if train_on not in TRAIN_ON_CHOICES:
        raise ParamsError(f"train_on must be one of {', '.join(TRAIN_ON_CHOICES)}, not {train_on!r}.")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ParamsError(f"max_length must be a positive int or None, not {max_length!r}.")


def _prepare_messages(messages: Any, train_on: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Validated copies without the ``train`` key, and the indices of the trained assistant messages."""
    clean = _clean_messages(messages)
    assistant = [i for i, message in enumerate(clean) if message["role"] == "assistant"]
    if not assistant:
        roles = ", ".join(message["role"] for message in clean) or "none"
        raise NoTrainedTurnError(f"the conversation has no assistant turn to train (roles: {roles})",
                                 field="messages")
    if train_on == "all":
        return clean, assistant
    wanted = assistant[-1:] if train_on == "last" else assistant
    trained = [i for i in wanted if messages[i].get("train", True)]
    if not trained:
        raise NoTrainedTurnError(f"every assistant turn that train_on={train_on!r} selects is marked "
                                 "\"train\": false", field="messages")
    return clean, trained


def _clean_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"messages must be a list of {{role, content}} dicts, not {type(messages).__name__}",
                        field="messages")
    clean = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise DataError(f"message {number} is a {type(message).__name__}, not a {{role, content}} dict",
                            field="messages")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"message {number} needs a string '{key}'", field="messages")
        if not isinstance(message.get("train", True), bool):
            raise DataError(f"message {number}: 'train' must be true or false", field="messages")
        if _SENTINEL_OPEN in message["content"] or _SENTINEL_CLOSE in message["content"]:
            raise DataError(f"message {number} holds a private-use character vinakit reserves (U+F0A00/U+F0A01)",
                            field="messages")
        clean.append({key: value for key, value in message.items() if key != "train"})
    return clean


def _in_any_span(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a token's character range overlaps a trained span (zero-width tokens: lies inside one)."""
    if start == end:
        return any(span_start <= start < span_end for span_start, span_end in spans)
    return any(start < span_end and end > span_start for span_start, span_end in spans)


# --------------------------------------------------------------------------------------------------------------
# Locating the responses in the rendered text


def _sentinel(number: int) -> str:
    return f"{_SENTINEL_OPEN}{number}{_SENTINEL_CLOSE}"


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ParamsError("This tokenizer has no chat template: call use_chat_template(tokenizer, name) first.")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # a template may raise anything (raise_exception, KeyError, TypeError...)
        reason = f"chat template failed: {type(error).__name__}: {error}"
        raise ChatTemplateError(f"The chat template cannot render this conversation ({type(error).__name__}: "
                                f"{error}).", reason=reason) from error
    if not isinstance(text, str):
        raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, not a string.")
    return text


def _locate_responses(facts: _TokenizerFacts, messages: list[dict[str, Any]],
                      trained_turns: list[int]) -> tuple[str, list[_Response]]:
    """The real rendering and, for each trained turn, its content span and end-of-turn token span."""
    assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    sentinels = [_sentinel(n) for n in range(len(assistant))]
    masked = [dict(message) for message in messages]
    for index, sentinel in zip(assistant, sentinels):
        masked[index]["content"] = sentinel
    text = _render(facts.tokenizer, messages)
    segments, _ = _split_on_sentinels(_render(facts.tokenizer, masked), sentinels)
    contents = _align(text, segments, [messages[i]["content"] for i in assistant])
    responses = []
    for index, (start, end) in zip(assistant, contents):
        if index not in trained_turns:
            continue
        boundary = _end_of_turn_span(text, end, facts.special_tokens)
        if boundary is None:
            raise _missing_end_of_turn(text, end)
        if boundary[1] > len(text) and facts.eos_token_id is None:
            raise ChatTemplateError("The chat template writes nothing after the last response and the tokenizer "
                                    "has no eos token to append; the model could never learn to stop.")
        responses.append(_Response(start, end, *boundary))
    return text, responses


def _split_on_sentinels(text: str, sentinels: list[str]) -> tuple[list[str], list[int]]:
    """The template's own text between the sentinels (len(sentinels) + 1 segments) and their positions."""
    segments, positions, cursor = [], [], 0
    for number, sentinel in enumerate(sentinels):
        position = text.find(sentinel, cursor)
        if position < 0 or text.count(sentinel) != 1:
            raise ChatTemplateError(
                f"The chat template does not write the content of assistant turn {number + 1} exactly once, "
                "unchanged and in order, so vinakit cannot tell which tokens are the response.",
                reason="chat template does not write each assistant content exactly once")
        segments.append(text[cursor:position])
        positions.append(position)
        cursor = position + len(sentinel)
    segments.append(text[cursor:])
    return segments, positions


def _align(text: str, segments: list[str], contents: list[str]) -> list[tuple[int, int]]:
    """Character span of each rendered content such that ``text == s0 + c0 + s1 + c1 + ... + sN``.

    Candidates for each content are the content itself and its whitespace-trimmed forms first (templates
    ``trim`` or ``lstrip`` content); only when none fits, any span the template text around it allows (a
    template may render the content otherwise, e.g. drop an old ``<think>`` block). Memoised backtracking
    keeps this linear in practice.
    """
    if not text.startswith(segments[0]):
        raise _unexplained_rendering()
    memo: dict[tuple[int, int], list[tuple[int, int]] | None] = {}

    def solve(turn: int, start: int) -> list[tuple[int, int]] | None:
        if turn == len(contents):
            return [] if start == len(text) else None
        if (turn, start) not in memo:
            memo[(turn, start)] = None
            following = segments[turn + 1]
            for end in _candidate_ends(text, start, contents[turn], following, turn + 1 == len(contents)):
                rest = solve(turn + 1, end + len(following))
                if rest is not None:
                    memo[(turn, start)] = [(start, end), *rest]
                    break
        return memo[(turn, start)]

    spans = solve(0, len(segments[0]))
    if spans is None:
        raise _unexplained_rendering()
    return spans


def _candidate_ends(text: str, start: int, content: str, following: str, is_last: bool) -> list[int]:
    """Possible end positions of a rendered content starting at ``start``, most plausible first."""
    ends = []
    for form in _trimmed_forms(content):
        end = start + len(form)
        if text.startswith(form, start) and text.startswith(following, end) and end not in ends:
            ends.append(end)
    if is_last:
        fixed = len(text) - len(following)
        others = [fixed] if fixed >= start and text.endswith(following) else []
    elif following:
        others, position = [], text.find(following, start)
        while position >= 0:
            others.append(position)
            position = text.find(following, position + 1)
        others.sort(key=lambda end: abs(end - start - len(content)))
    else:
        others = []  # nothing separates this content from the next one: only its own text can tell
    return ends + [end for end in others if end not in ends]


def _trimmed_forms(content: str) -> list[str]:
    """The content and every copy with some leading and/or trailing whitespace removed, longest first."""
    leading = len(content) - len(content.lstrip())
    trailing = len(content) - len(content.rstrip())
    if (leading + 1) * (trailing + 1) > _MAX_TRIM_VARIANTS:
        forms = [content, content.strip(), content.lstrip(), content.rstrip()]
    else:
        forms = [content[left:len(content) - right]
                 for left in range(leading + 1) for right in range(trailing + 1)
                 if left + right <= len(content)]
    return sorted(dict.fromkeys(forms), key=len, reverse=True)


def _end_of_turn_span(text: str, content_end: int, special_tokens: tuple[str, ...]) -> tuple[int, int] | None:
    """The special token the template writes after a response (whitespace may come between).

    Returns ``(len(text), len(text) + 1)`` when only whitespace follows the last response (an eos will be
    appended), and None when the template writes ordinary text instead of an end-of-turn token.
    """
    token_start = content_end
    while token_start < len(text) and text[token_start].isspace():
        token_start += 1
    if token_start == len(text):
        return len(text), len(text) + 1
    for token in special_tokens:
        if text.startswith(token, token_start):
            return token_start, token_start + len(token)
    return None


def _missing_end_of_turn(text: str, content_end: int) -> ChatTemplateError:
    following = text[content_end:content_end + 40]
    return ChatTemplateError(
        f"The chat template writes {following!r} after an assistant response instead of an end-of-turn token, so "
        "a model trained on it would never learn to stop. Use a template that ends each response with a special "
        "token (e.g. chat_template: alpaca-vi, which ends it with eos).",
        reason="chat template writes no end-of-turn token after a response")


def _unexplained_rendering() -> ChatTemplateError:
    return ChatTemplateError(
        "The chat template renders the text around an assistant response differently depending on its content "
        "(for example it moves a <think>...</think> block out of the last response), so vinakit cannot tell "
        "exactly which tokens are the response. Remove that block from the content, or use a template that "
        "writes the content unchanged (e.g. chat_template: chatml).",
        reason="chat template renders the text around a response depending on its content")


def _check_end_of_turn_tokens(facts: _TokenizerFacts, text: str, input_ids: list[int],
                              offsets: list[tuple[int, int]], responses: list[_Response]) -> None:
    """Each end-of-turn text must have become one token of its own, or the model learns a different stop."""
    for response in responses:
        if response.eot_end > len(text):
            continue  # the appended eos, one token by construction
        eot = text[response.eot_start:response.eot_end]
        eot_id = facts.tokenizer.convert_tokens_to_ids(eot)
        if not any(token == eot_id and start < response.eot_end and end > response.eot_start
                   for token, (start, end) in zip(input_ids, offsets)):
            raise ChatTemplateError(f"The end-of-turn text {eot!r} was not tokenised as its own token.",
                                    reason="end-of-turn token is not a single token")


# --------------------------------------------------------------------------------------------------------------
# Prompts for generation


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """The generation prompt: the conversation up to its last user turn, rendered as in training.

    It is the exact text that preceded the final response in training: for most templates that equals
    ``apply_chat_template(..., add_generation_prompt=True)``; for templates that render the last response
    differently it includes what they add (Qwen3's empty ``<think>`` block). Tokenise it with
    ``add_special_tokens=False`` (the template already writes any bos).

    Raises:
        DataError: there is no user turn, or the messages are malformed.
        ChatTemplateError: the template cannot render the conversation.
    """
    clean = _clean_messages(messages)
    users = [i for i, message in enumerate(clean) if message["role"] == "user"]
    if not users:
        raise DataError("a generation prompt needs at least one user turn", field="messages")
    prompt = clean[:users[-1] + 1]
    sentinel = _sentinel(0)
    try:
        text = _render(tokenizer, [*prompt, {"role": "assistant", "content": sentinel}])
    except ChatTemplateError:
        text = ""
    if text.count(sentinel) == 1:
        return text[:text.index(sentinel)]
    # The template does not write a response where training would: fall back on its own generation prompt.
    return _render(tokenizer, prompt, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------------------
# Preference pairs


def tokenize_preference(tokenizer: Any, prompt: Sequence[Mapping[str, Any]], chosen: str, rejected: str,
                        max_length: int | None = None, max_prompt_length: int | None = None) -> dict[str, list[int]]:
    """Tokenise a preference pair exactly as the chat template renders prompt + reply (the SFT rendering).

    Each side is rendered as one conversation, tokenised as one text and cut right after the end-of-turn token
    that follows the reply, so text a template adds before a final reply (Qwen3's empty think block) belongs to
    the prompt and trimmed or merged system prompts stay exact. A token straddling the prompt/reply boundary goes
    to the completions, so ``prompt_input_ids`` is one list shared by both sides and ``prompt_input_ids +
    chosen_input_ids`` is the one-text tokenisation. ``max_length`` (prompt + longer completion) and
    ``max_prompt_length`` cut the prompt from the left; completions are kept whole.

    Raises:
        ResponseTruncatedError: no prompt token fits beside the longer completion (drop the pair and count it).
        ChatTemplateError: the template cannot render the pair or writes no end-of-turn token after a reply.
        DataError: the prompt does not end with a user turn, or a message is malformed.
    """
    _check_options(max_length, "assistant")
    facts = _TokenizerFacts.of(tokenizer)
    messages = _clean_messages(prompt)
    if not messages or messages[-1]["role"] != "user":
        raise DataError("a preference prompt must end with a user turn", field="prompt")
    sides = [_prompt_and_reply_ids(facts, messages, reply) for reply in (chosen, rejected)]
    shared = _common_prefix(sides[0][0][:sides[0][1]], sides[1][0][:sides[1][1]])
    prompt_ids = sides[0][0][:shared]
    completions = [ids[shared:] for ids, _ in sides]
    longest, room = max(len(ids) for ids in completions), min(len(prompt_ids), max_prompt_length or len(prompt_ids))
    room = min(room, max_length - longest) if max_length is not None else room
    if room < 1:
        raise ResponseTruncatedError(f"max_length={max_length} cannot hold a reply of {longest} tokens and any of "
                                     "its prompt; drop the pair or raise max_length.")
    return {"prompt_input_ids": prompt_ids[len(prompt_ids) - room:], "chosen_input_ids": completions[0],
            "rejected_input_ids": completions[1]}


def _prompt_and_reply_ids(facts: _TokenizerFacts, messages: list[dict[str, Any]], reply: str) -> tuple[list[int], int]:
    """(ids of prompt + reply cut after the reply's end-of-turn token, index of the first token of the reply)."""
    conversation = _clean_messages([*messages, {"role": "assistant", "content": reply}])  # reserved characters
    text, (response,) = _locate_responses(facts, conversation, [len(messages)])
    encoding = facts.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]
    if response.eot_end > len(text):  # nothing after the reply: eos is appended, as in SFT
        ids.append(facts.eos_token_id)
        offsets.append((len(text), len(text) + 1))
    _check_end_of_turn_tokens(facts, text, ids, offsets, [response])
    end = next(i for i, (start, stop) in enumerate(offsets) if stop >= response.eot_end and stop > start) + 1
    first = next((i for i, (start, stop) in enumerate(offsets) if stop > response.content_start), end - 1)
    return ids[:end], first


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
