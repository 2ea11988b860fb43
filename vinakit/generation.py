"""Batched generation and scoring: chat replies with the exact training template, raw-text continuations (CPT),
and continuation log-probabilities (multiple-choice letters).

Every batch goes through one left-padding helper (:func:`left_pad`) and, for generation, one loop
(:func:`_generate_ids`): prompts are tokenised in one call, batched longest first and decoded in one call, so the
kit's own work around ``model.generate`` stays around 1% of a batch's time (``bench/generation_overhead.py``).
Nothing heavy is imported at module level.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, Sequence

from vinakit.device import input_device

Messages = list[dict[str, Any]]


def as_messages(prompt: str | Messages) -> Messages:
    """A bare string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn and end-of-text ids: generation stops at any of them."""
    from vinakit.chat import end_of_turn_token

    ids: list[int] = []
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_ids, int):
        ids.append(config_ids)
    elif config_ids:
        ids.extend(config_ids)
    for token in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


# --------------------------------------------------------------------------------------------------------------
# Model modes
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Evaluation mode (no dropout) inside the block; the model's own mode again afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def generation_mode(model: Any, backend: str) -> Iterator[None]:
    """Unsloth's fast inference path inside the block, its training path and the model's mode afterwards.

    For a model that is still being trained (CPT evaluates before and after training the same model).
    """
    from vinakit import model as model_lib

    was_training = model.training
    model_lib.prepare_for_inference(model, backend=backend)
    try:
        yield
    finally:
        model_lib.back_to_training(model, backend=backend)
        model.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def generate_chat(model: Any, tokenizer: Any, prompts: Sequence[str | Messages], *, max_new_tokens: int = 128,
                  batch_size: int = 16, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                  seed: int | None = None, max_prompt_tokens: int | None = None,
                  progress: bool = False) -> list[str]:
    """Generate one reply per prompt, batched with left padding; returns the decoded replies.

    Args:
        model: a causal LM (plain, PEFT or Unsloth), already on its device.
        tokenizer: the tokenizer carrying the chat template used in training.
        prompts: strings (one user turn each) or message lists ending with a user turn.
        max_new_tokens: generation budget per reply.
        batch_size: prompts per ``generate`` call.
        do_sample: sample instead of greedy decoding; ``seed`` makes it repeatable.
        max_prompt_tokens: prompts longer than this keep their start and end (the middle is cut).
        progress: show a tqdm progress bar over batches.
    """
    from vinakit.chat import render_prompt

    if not prompts:
        return []
    stops = stop_token_ids(model, tokenizer)
    encoded = _encode(tokenizer, [render_prompt(tokenizer, as_messages(p)) for p in prompts], max_prompt_tokens)
    rows = _generate_ids(model, encoded, stops=stops, pad_id=_pad_id(tokenizer, stops[0]),
                         max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                         temperature=temperature, top_p=top_p, seed=seed, progress=progress)
    return [reply.strip() for reply in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def complete(model: Any, tokenizer: Any, prompts: Sequence[str], *, backend: str, max_new_tokens: int = 48,
             batch_size: int = 16) -> list[str]:
    """Greedy raw-text continuations, each returned after its prompt (no chat template: CPT teaches text).

    The model is switched to generation for the call and back to its training state afterwards.

    Args:
        model: a causal LM (plain, PEFT or Unsloth), possibly in training.
        tokenizer: its tokenizer (generation stops at its EOS).
        prompts: text beginnings, e.g. ``"Hà Nội là"``.
        backend: ``"unsloth"`` or ``"hf"`` (how to switch the model to generation and back).
        max_new_tokens: generation budget per continuation.
        batch_size: prompts per ``generate`` call.
    """
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    with generation_mode(model, backend):
        rows = _generate_ids(model, _encode(tokenizer, prompts), stops=[eos], pad_id=_pad_id(tokenizer, eos),
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [prompt + text for prompt, text in zip(prompts, tokenizer.batch_decode(rows, skip_special_tokens=True))]


def _generate_ids(model: Any, encoded: list[list[int]], *, stops: Sequence[int], pad_id: int, max_new_tokens: int,
                  batch_size: int, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                  seed: int | None = None, progress: bool = False) -> list[list[int]]:
    """The new ids of each prompt up to its first stop token, in the prompts' order."""
    import torch
    from tqdm.auto import tqdm

    if seed is not None:
        torch.manual_seed(seed)
    stop_set = set(stops)
    # Batches of similar lengths waste less compute on padding; longest first, so running out of memory
    # shows on the first batch. Replies go back to the prompts' order.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    replies: list[list[int]] = [[] for _ in encoded]
    device = input_device(model)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress):
        indices = order[start:start + batch_size]
        input_ids, attention = left_pad([encoded[i] for i in indices], pad_id, device)
        with torch.no_grad():
            # use_cache: a model in training (CPT) has the cache switched off in its config.
            output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, temperature=temperature if do_sample else None,
                                    top_p=top_p if do_sample else None, top_k=None, eos_token_id=list(stops),
                                    pad_token_id=pad_id, use_cache=True)
        for index, row in zip(indices, output[:, input_ids.shape[1]:].tolist()):
            replies[index] = _until_stop(row, stop_set)
    return replies


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    for position, token in enumerate(row):
        if token in stops:
            return row[:position]
    return row


def _encode(tokenizer: Any, texts: Sequence[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text (one tokenizer call for all: per-text calls cost twice as much)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if max_prompt_tokens:
        encoded = [_cut_middle(ids, max_prompt_tokens) for ids in encoded]
    return encoded


def _pad_id(tokenizer: Any, fallback: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[Any, Any]:
    """Rows of token ids padded on the left to one width, for generation and last-position scoring.

    Returns:
        ``(input_ids, attention_mask)``, long tensors of shape (rows, width) on ``device``.
    """
    import torch

    width = max(len(ids) for ids in rows)
    # One flat list and a mask computed from the lengths: a third faster than nested lists.
    flat = [token for ids in rows for token in itertools.chain(itertools.repeat(pad_id, width - len(ids)), ids)]
    input_ids = torch.tensor(flat, dtype=torch.long).view(len(rows), width)
    starts = width - torch.tensor([len(ids) for ids in rows], dtype=torch.long)
    attention = (torch.arange(width).unsqueeze(0) >= starts.unsqueeze(1)).long()
    return input_ids.to(device), attention.to(device)


def _cut_middle(ids: list[int], limit: int) -> list[int]:
    """Keep the start (instruction) and the end (generation prompt) of an over-long prompt."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


def continuation_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], *,
                          batch_size: int = 16, max_prompt_tokens: int | None = None,
                          progress: bool = False) -> list[list[float]]:
    """Log-probability of each continuation after each prompt (multiple-choice scoring by letters).

    Args:
        model: a causal LM (plain, PEFT or Unsloth) on its device.
        tokenizer: its tokenizer.
        prompts: full texts, already rendered (e.g. ``render_prompt(...) + "Đáp án:"``); no special tokens are
            added.
        continuations: the candidates, e.g. ``[" A", " B", " C", " D"]``; a candidate of several tokens scores
            the sum of its tokens' log-probabilities.
        batch_size: prompts per forward pass.
        max_prompt_tokens: prompts longer than this keep their start and end (the middle is cut).
        progress: show a tqdm progress bar over batches.

    Returns:
        One list per prompt, one log-probability per continuation (natural log).
    """
    from tqdm.auto import tqdm

    candidates = _encode(tokenizer, continuations)
    if any(not ids for ids in candidates):
        raise ValueError(f"every continuation must be at least one token, got {list(continuations)!r}")
    longest = max(len(ids) for ids in candidates)
    pad_id = _pad_id(tokenizer, stop_token_ids(model, tokenizer)[0])
    scores: list[list[float]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", disable=not progress):
        encoded = _encode(tokenizer, prompts[start:start + batch_size], max_prompt_tokens)
        # One-token candidates (the usual case: " A") need one pass per prompt; longer ones one per candidate.
        rows = encoded if longest == 1 else [ids + c for ids in encoded for c in candidates]
        keep = 1 if longest == 1 else longest + 1  # the position before a candidate predicts its first token
        logprobs = _last_logprobs(model, rows, keep=keep, pad_id=pad_id)
        for index in range(len(encoded)):
            if longest == 1:
                scores.append([float(logprobs[index, -1, c[0]]) for c in candidates])
            else:
                rows_of_prompt = logprobs[index * len(candidates):(index + 1) * len(candidates)]
                scores.append([_sum_tail(row, c) for row, c in zip(rows_of_prompt, candidates)])
    return scores


def _last_logprobs(model: Any, rows: list[list[int]], *, keep: int, pad_id: int) -> Any:
    """Log-softmax of the last ``keep`` positions of left-padded rows, shape (rows, keep, vocab), float32."""
    import torch

    input_ids, attention = left_pad(rows, pad_id, input_device(model))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
    with torch.no_grad():
        # logits_to_keep: the whole (batch, length, vocab) tensor would need GBs for a 128k vocabulary.
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       logits_to_keep=keep).logits
    return torch.log_softmax(logits[:, -keep:, :].float(), dim=-1).cpu()


def _sum_tail(logprobs: Any, candidate: list[int]) -> float:
    """Sum of a row's log-probabilities of ``candidate``, which ends the row (each token is predicted by the
    position before it, so ``logprobs`` must cover at least ``len(candidate) + 1`` positions)."""
    n = len(candidate)
    keep = logprobs.shape[0]
    return float(sum(logprobs[keep - n - 1 + j, token] for j, token in enumerate(candidate)))


def sample_answers(model: Any, tokenizer: Any, prompts: Sequence[str], *, backend: str, max_new_tokens: int,
                   path: Any) -> Any:
    """Answer ``prompts`` greedily with the chat template (the model switched to inference first); a DataFrame
    (prompt, reply), also saved at ``path`` as CSV with a BOM, so that Excel shows the Vietnamese text."""
    import pandas as pd

    from vinakit.model import prepare_for_inference

    model = prepare_for_inference(model, backend=backend)
    replies = generate_chat(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    table = pd.DataFrame({"prompt": list(prompts), "reply": replies})
    table.to_csv(path, index=False, encoding="utf-8-sig")
    return table
