"""Batched chat generation with the exact chat template used in training."""

from __future__ import annotations

from typing import Any, Sequence

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
    import torch
    from tqdm.auto import tqdm

    from vinakit.chat import render_prompt

    texts = [render_prompt(tokenizer, as_messages(p)) for p in prompts]
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    all_encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_prompt_tokens:
        all_encoded = [_cut_middle(ids, max_prompt_tokens) for ids in all_encoded]
    # Batches of similar lengths waste less compute on padding; longest first, so running out of memory
    # shows on the first batch. Replies go back to the prompts' order.
    order = sorted(range(len(texts)), key=lambda i: -len(all_encoded[i]))
    replies: list[str] = [""] * len(texts)
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress):
        indices = order[start:start + batch_size]
        encoded = [all_encoded[i] for i in indices]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, temperature=temperature if do_sample else None,
                                    top_p=top_p if do_sample else None, top_k=None, eos_token_id=stops,
                                    pad_token_id=pad_id)
        for index, row in zip(indices, output[:, width:].tolist()):
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            replies[index] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    return replies


def _cut_middle(ids: list[int], limit: int) -> list[int]:
    """Keep the start (instruction) and the end (generation prompt) of an over-long prompt."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


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
    import torch
    from tqdm.auto import tqdm

    candidates = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
    if any(not ids for ids in candidates):
        raise ValueError(f"every continuation must be at least one token, got {list(continuations)!r}")
    longest = max(len(ids) for ids in candidates)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(model, tokenizer)[0]
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", disable=not progress):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        if max_prompt_tokens:
            encoded = [_cut_middle(ids, max_prompt_tokens) for ids in encoded]
        # One-token candidates (the usual case: " A") need one pass per prompt; longer ones one per candidate.
        rows = encoded if longest == 1 else [ids + c for ids in encoded for c in candidates]
        keep = 1 if longest == 1 else longest + 1  # the position before a candidate predicts its first token
        logprobs = _last_logprobs(model, rows, keep=keep, pad_id=pad_id, device=device)
        for index in range(len(encoded)):
            if longest == 1:
                scores.append([float(logprobs[index, -1, c[0]]) for c in candidates])
            else:
                rows_of_prompt = logprobs[index * len(candidates):(index + 1) * len(candidates)]
                scores.append([_sum_tail(row, c) for row, c in zip(rows_of_prompt, candidates)])
    return scores


def _last_logprobs(model: Any, rows: list[list[int]], *, keep: int, pad_id: int, device: Any) -> Any:
    """Log-softmax of the last ``keep`` positions of left-padded rows, shape (rows, keep, vocab), float32."""
    import torch

    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in rows], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
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
