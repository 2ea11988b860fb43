"""Benchmark: the kit's batched generation (``generate_chat``) vs the library's own ``model.generate``.

Both sides get the same prompts, batch size, token budget and greedy decoding. The library side gets its
batches ready-made (rendered, tokenised, sorted by length and left-padded by this script, outside the timing),
so its time is ``model.generate`` alone; the kit side is one ``generate_chat`` call, from prompt strings to
decoded replies. Repeats alternate the two (each repeat flips which goes first) and the medians are compared
in the same process. Prints both times and a line ``ratio <kit / library>``. Not a timed test: machines are
noisy, so compare figures from one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/generation_overhead.py                       # tiny model, CPU
    OMP_NUM_THREADS=1 .venv/bin/python bench/generation_overhead.py --profile             # where the kit's time goes
    .venv/bin/python bench/generation_overhead.py --model unsloth/Qwen2.5-0.5B-Instruct --n 64   # on a GPU
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_throughput import generation_parser, load_model_and_prompts  # noqa: E402  (after the path set-up)


def library_batches(model: Any, tokenizer: Any, prompts: list[str], batch_size: int) -> list[dict[str, Any]]:
    """The batches ``generate_chat`` feeds ``model.generate``, built here independently of the kit's helpers."""
    import torch

    from vinakit.chat import render_prompt
    from vinakit.device import input_device

    encoded = [tokenizer(render_prompt(tokenizer, [{"role": "user", "content": p}]), add_special_tokens=False)
               ["input_ids"] for p in prompts]
    encoded.sort(key=len, reverse=True)  # longest first, like the kit
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        width = max(len(ids) for ids in rows)
        batches.append({
            "input_ids": torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in rows], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device),
        })
    return batches


def timed(function: Callable[[], Any]) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = generation_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each side (alternating)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one kit call")
    args = parser.parse_args(argv)
    model, tokenizer, prompts = load_model_and_prompts(args)

    import torch

    from vinakit.generation import generate_chat, stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    batches = library_batches(model, tokenizer, prompts, args.batch_size)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                    eos_token_id=stops, pad_token_id=pad_id, use_cache=True)  # what generate_chat passes

    def library() -> list[Any]:
        with torch.no_grad():
            return [model.generate(**batch, **settings) for batch in batches]

    def kit() -> list[str]:
        return generate_chat(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)

    print(f"{args.repeats} repeats, alternating")
    library(), kit()  # warm-up: first-call costs
    times: dict[str, list[float]] = {"library": [], "kit": []}
    for repeat in range(args.repeats):
        sides = [("library", library), ("kit", kit)]
        for name, function in sides if repeat % 2 == 0 else sides[::-1]:
            times[name].append(timed(function))
    library_s, kit_s = statistics.median(times["library"]), statistics.median(times["kit"])
    paired = statistics.median(k / lib for k, lib in zip(times["kit"], times["library"]))
    print(f"model.generate on ready batches: median {library_s:.3f} s  "
          f"(min {min(times['library']):.3f}, max {max(times['library']):.3f})")
    print(f"generate_chat from prompts:      median {kit_s:.3f} s  "
          f"(min {min(times['kit']):.3f}, max {max(times['kit']):.3f})")
    outside = statistics.median(time_outside_generate(model, kit) for _ in range(args.repeats))
    print(f"kit's own work around model.generate: median {outside * 1000:.1f} ms = {outside / library_s:.1%} of "
          f"the library time (noise-free part of the gap)")
    print(f"paired ratio (median of kit / library per repeat) {paired:.3f}")
    print(f"ratio {kit_s / library_s:.3f}")
    if args.profile:
        profile(kit)
    return 0


def time_outside_generate(model: Any, function: Callable[[], Any]) -> float:
    """Seconds ``function`` spends outside ``model.generate`` (which is timed through a wrapper)."""
    original = model.generate
    inside = 0.0

    def generate(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            inside += time.perf_counter() - start

    model.generate = generate  # an instance attribute shadows the method until deleted
    try:
        total = timed(function)
    finally:
        del model.generate
    return total - inside


def profile(function: Callable[[], Any]) -> None:
    """The top of a cProfile of one call, by cumulative time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(function)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    sys.exit(main())
