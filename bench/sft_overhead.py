"""Does the kit's SFT path add overhead? Kit vs the same library used directly, same model, data, batch, steps.

    .venv/bin/python bench/sft_overhead.py            # both backends, each in its own process
    .venv/bin/python bench/sft_overhead.py --backend hf --steps 40

Per backend it trains the embedded tiny model on the embedded chat data twice in one process, in alternating
order (direct, kit, direct, kit), and prints tokens/s after warm-up (real, non-pad tokens per second of
training step time) for each path and the ratio kit/direct (target >= 0.95), plus the kit's share of non-pad
tokens per batch (target >= 0.9). The direct baselines follow the libraries' own docs:
  * unsloth: Unsloth's notebook recipe: FastLanguageModel + get_peft_model, chat template rendered into a
    ``text`` column, UnslothTrainer/SFTTrainer on that column, ``train_on_responses_only``;
  * hf: TRL's SFTTrainer on the conversational ``messages`` dataset with a PEFT LoraConfig.
Each backend runs in its own process because importing Unsloth patches transformers and TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RANK, ALPHA, LR, BATCH, MAX_LEN = 8, 16, 1e-3, 8, 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepTimer:
    """Counts real tokens per training batch and times optimizer steps after a warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.tokens = 0
        self.padded = 0
        self.seconds = 0.0
        self._pending_tokens = 0
        self._pending_padded = 0
        self._start = 0.0

    def wrap(self, collator: Any) -> Any:
        def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collator(examples)
            self._pending_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                else int(batch["input_ids"].numel())
            self._pending_padded = int(batch["input_ids"].numel())
            return batch
        return collate

    def callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class _Timer(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step > timer.warmup:
                    timer.seconds += time.perf_counter() - timer._start
                    timer.tokens += timer._pending_tokens
                    timer.padded += timer._pending_padded

        return _Timer()

    def result(self) -> dict[str, float]:
        return {"tokens_per_s": self.tokens / self.seconds, "padded_tokens_per_s": self.padded / self.seconds,
                "nonpad_share": self.tokens / self.padded, "timed_seconds": self.seconds}


def chat_rows() -> list[dict[str, Any]]:
    from vinakit.data import load_chat_dataset

    return load_chat_dataset("vinakit:chat").train


def kit_run(backend: str, steps: int, warmup: int, out: Path) -> dict[str, float]:
    """The kit's path: vinakit.sft steps exactly as the notebook calls them."""
    from vinakit import sft
    from vinakit.params import SFTParams
    from vinakit.record import start_run
    from vinakit.train import build_trainer

    params = SFTParams.validate(dict(
        model_name="tiny-vi", backend=backend, load_in_4bit=False, max_seq_length=MAX_LEN, rank=RANK,
        lora_alpha=ALPHA, use_rslora=False, learning_rate=LR, max_steps=steps + warmup,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=5,
        save_steps=10_000, val_size=0, output_dir=str(out), dataset="vinakit:chat"))
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    tokenized = sft.tokenize(params, tokenizer, data, run)
    timer = StepTimer(warmup)
    trainer = build_trainer(model, tokenizer, tokenized.train, None, params, run, callbacks=[timer.callback()])
    trainer.data_collator = timer.wrap(trainer.data_collator)
    trainer.train()
    return timer.result()


def direct_unsloth_run(steps: int, warmup: int, out: Path) -> dict[str, float]:
    """Unsloth's notebook recipe, written as its docs show it."""
    from datasets import Dataset
    from unsloth import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
    from unsloth.chat_templates import train_on_responses_only

    from vinakit.model import tiny_model_dir

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir()), max_seq_length=MAX_LEN,
                                                         load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                             lora_dropout=0, bias="none", use_gradient_checkpointing=False,
                                             random_state=3407)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows()]
    dataset = Dataset.from_dict({"text": texts})
    args = UnslothTrainingArguments(output_dir=str(out / "direct"), per_device_train_batch_size=BATCH,
                                    gradient_accumulation_steps=1, max_steps=steps + warmup, learning_rate=LR,
                                    logging_steps=5, optim="adamw_torch", seed=3407, report_to=[],
                                    save_strategy="no", dataset_text_field="text", max_length=MAX_LEN,
                                    use_cpu=True)
    trainer = UnslothTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    trainer = train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                      response_part="<|im_start|>assistant\n")
    timer = StepTimer(warmup)
    trainer.add_callback(timer.callback())
    trainer.data_collator = timer.wrap(trainer.data_collator)
    trainer.train()
    return timer.result()


def direct_hf_run(steps: int, warmup: int, out: Path) -> dict[str, float]:
    """TRL's SFTTrainer + PEFT on a conversational dataset, as TRL's docs show it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from vinakit.model import tiny_model_dir

    folder = str(tiny_model_dir())
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in chat_rows()])
    args = SFTConfig(output_dir=str(out / "direct"), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, max_steps=steps + warmup, learning_rate=LR, logging_steps=5,
                     optim="adamw_torch", seed=3407, report_to=[], save_strategy="no", max_length=MAX_LEN,
                     use_cpu=True)
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args,
                         peft_config=peft_config)
    timer = StepTimer(warmup)
    trainer.add_callback(timer.callback())
    trainer.data_collator = timer.wrap(trainer.data_collator)
    trainer.train()
    return timer.result()


def bench_backend(backend: str, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    direct = direct_unsloth_run if backend == "unsloth" else direct_hf_run
    results: dict[str, list[dict[str, float]]] = {"kit": [], "direct": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            results["direct"].append(direct(steps, warmup, Path(tmp) / f"d{i}"))
            results["kit"].append(kit_run(backend, steps, warmup, Path(tmp) / f"k{i}"))
    best = {path: max(runs, key=lambda r: r["tokens_per_s"]) for path, runs in results.items()}
    return {"backend": backend, "kit": best["kit"], "direct": best["direct"],
            "ratio": best["kit"]["tokens_per_s"] / best["direct"]["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["unsloth", "hf"], help="one backend in this process")
    parser.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by the driver)")
    args = parser.parse_args()
    if args.backend:
        result = bench_backend(args.backend, args.steps, args.warmup, args.repeats)
        print(("BENCH " + json.dumps(result)) if args.json else json.dumps(result, indent=2))
        return
    results = {}
    for backend in ("unsloth", "hf"):
        proc = subprocess.run([sys.executable, __file__, "--backend", backend, "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--json"],
                              capture_output=True, text=True, env={**os.environ})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if line is None:
            sys.exit(f"{backend} benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[backend] = json.loads(line[6:])
    print(f"SFT overhead on the tiny model, CPU, batch {BATCH}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, best of {args.repeats}:")
    for backend, r in results.items():
        print(f"  {backend:8s} kit {r['kit']['tokens_per_s']:9.0f} tok/s | direct {r['direct']['tokens_per_s']:9.0f} "
              f"tok/s | ratio kit/direct {r['ratio']:.3f} | non-pad share kit {r['kit']['nonpad_share']:.3f}, "
              f"direct {r['direct']['nonpad_share']:.3f}")
        print(f"  {'':8s} counting pad tokens too (raw compute): kit {r['kit']['padded_tokens_per_s']:9.0f} tok/s | "
              f"direct {r['direct']['padded_tokens_per_s']:9.0f} tok/s")
    speed = results["unsloth"]["kit"]["tokens_per_s"] / results["hf"]["kit"]["tokens_per_s"]
    print(f"  unsloth backend vs hf backend (kit path): {speed:.2f}x tokens/s")


if __name__ == "__main__":
    main()
