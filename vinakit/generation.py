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
    replies: list[str] = []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
        if max_prompt_tokens:
            encoded = [_cut_middle(ids, max_prompt_tokens) for ids in encoded]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=do_sample, temperature=temperature if do_sample else None,
                                    top_p=top_p if do_sample else None, top_k=None, eos_token_id=stops,
                                    pad_token_id=pad_id)
        for row in output[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return replies


def _cut_middle(ids: list[int], limit: int) -> list[int]:
    """Keep the start (instruction) and the end (generation prompt) of an over-long prompt."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]
