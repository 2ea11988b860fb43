"""How often the naive pair tokenisation differs from the exact one, per tokenizer and chat template.

Naive (what many pipelines do): render the generation prompt alone, tokenise it, then tokenise reply + end-of-turn
text alone. Exact (``vinakit.chat.tokenize_preference``): the template's own rendering of prompt + reply, tokenised
as one text and cut after the end-of-turn token. Counted per reply (chosen and rejected) over the embedded pairs,
as they are (one user turn), with a Vietnamese system prompt, and with whitespace around the replies.

    VINAKIT_SHARED_DIR=../shared .venv/bin/python bench/preference_tokens.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SYSTEM = {"role": "system", "content": "Bạn là trợ lý hữu ích, trả lời bằng tiếng Việt."}


def main() -> int:
    """Print one line per (tokenizer, template, prompt form): replies that differ / replies compared."""
    from transformers import AutoTokenizer

    from vinakit.chat import NAMED_TEMPLATES, use_chat_template
    from vinakit.errors import ParamsError
    from vinakit.pairs import load_preference_dataset, naive_mismatches

    shared = Path(os.environ.get("VINAKIT_SHARED_DIR", "../shared")) / "tokenizers"
    pairs = load_preference_dataset("vinakit:preference").train
    with_system = [{**pair, "prompt": [SYSTEM, *pair["prompt"]]} for pair in pairs]
    # scraped replies often keep a leading space or a trailing newline (UltraFeedback has both)
    padded = [{**pair, "chosen": f" {pair['chosen']}\n", "rejected": f"\n{pair['rejected']} "} for pair in pairs]
    print(f"{len(pairs)} pairs ({2 * len(pairs)} replies) from vinakit:preference")
    print(f"{'tokenizer':<10} {'template':<10} {'prompt':<14} naive differs")
    for family in ("qwen3", "llama3_1"):
        for template in ("", *NAMED_TEMPLATES):
            tokenizer = AutoTokenizer.from_pretrained(shared / family)
            try:
                use_chat_template(tokenizer, template or None)
            except ParamsError:
                continue  # the tokenizer lacks a token this template writes
            for form, rows in (("user turn", pairs), ("system + user", with_system), ("padded reply", padded)):
                differ, total = naive_mismatches(tokenizer, rows)
                print(f"{family:<10} {template or 'own':<10} {form:<14} {differ}/{total} ({differ / total:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
