"""Benchmark: batched generation (``vinakit.generation.generate_chat``) vs one prompt at a time.

The same N MCQ prompts (the SFT/eval prompt built from the embedded MCQ contexts) and the same token budget
are generated twice with greedy decoding: once one prompt per ``generate`` call, as typical notebooks do,
and once ``batch_size`` prompts per call with left padding. Prints both times and a line ``speedup <x>``.
Not a timed test: machines are noisy, so compare figures from one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_throughput.py              # tiny model, CPU
    .venv/bin/python bench/eval_throughput.py --model unsloth/Qwen2.5-0.5B-Instruct --n 64   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def mcq_prompts(n: int) -> list[str]:
    """``n`` MCQ-writing prompts from the embedded MCQ set (contexts repeat when n exceeds them)."""
    import csv

    from vinakit.data import mcq_user_prompt
    from vinakit.sources import sample_path

    with open(sample_path("vinakit:mcq"), encoding="utf-8-sig", newline="") as handle:
        contexts = list(dict.fromkeys(row["context"] for row in csv.DictReader(handle)))
    return [mcq_user_prompt(contexts[i % len(contexts)]) for i in range(n)]


def timed(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int) -> tuple[float, int]:
    """Seconds to answer every prompt, and the number of tokens generated."""
    import torch

    from vinakit.generation import generate_chat

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    replies = generate_chat(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(reply, add_special_tokens=False)["input_ids"]) for reply in replies)
    return seconds, tokens


def generation_parser(description: str) -> argparse.ArgumentParser:
    """The options of both generation benchmarks: model, backend, prompts, batch size and token budget."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="tiny-vi", help="model name or folder (default: the embedded tiny-vi)")
    parser.add_argument("--backend", default="hf", choices=["hf", "unsloth"])
    parser.add_argument("--n", type=int, default=32, help="number of prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--load-in-4bit", action="store_true")
    return parser


def load_model_and_prompts(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """The model for inference and the MCQ prompts; prints the set-up line."""
    import torch

    from vinakit.device import device_summary
    from vinakit.model import load_for_inference

    model, tokenizer = load_for_inference(args.model, backend=args.backend, max_seq_length=2048,
                                          load_in_4bit=args.load_in_4bit)
    device = device_summary()
    print(f"model {args.model} ({args.backend}) on {device['device_type']} {device['device_name']}, "
          f"torch threads {torch.get_num_threads()}; {args.n} prompts, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}")
    return model, tokenizer, mcq_prompts(args.n)


def main(argv: list[str] | None = None) -> int:
    args = generation_parser(__doc__.splitlines()[0]).parse_args(argv)
    model, tokenizer, prompts = load_model_and_prompts(args)
    timed(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=8)  # warm-up: first-call costs
    one_s, one_tokens = timed(model, tokenizer, prompts, batch_size=1, max_new_tokens=args.max_new_tokens)
    print(f"one prompt at a time: {one_s:.2f} s, {one_tokens} tokens, {one_tokens / one_s:.0f} tokens/s")
    batch_s, batch_tokens = timed(model, tokenizer, prompts, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens)
    print(f"batched (batch {args.batch_size}): {batch_s:.2f} s, {batch_tokens} tokens, "
          f"{batch_tokens / batch_s:.0f} tokens/s")
    print(f"speedup {one_s / batch_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
