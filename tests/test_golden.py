"""Golden losses: the first 10 training losses of SFT and CPT on tiny-vi, pinned per backend and device.

Fixed seeds, ``logging_steps=1``, float32 on the CPU: the same code gives the same losses to rounding, so any
change that moves training (data order, labels, packing, LoRA init, optimizer groups, learning-rate schedule, a
library upgrade) fails here loudly. Values live in ``tests/golden/*.json``; refresh them on purpose only, with
the reason in the commit message:

    VINAKIT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from vinakit.record import start_run

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_ENV_VAR = "VINAKIT_UPDATE_GOLDEN"
REFRESH = f"{UPDATE_ENV_VAR}=1 .venv/bin/python -m pytest tests/test_golden.py"
STEPS = 10
RTOL = 1e-4
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "unsloth")


def sft_losses(backend: str, tmp_path: Path) -> list[float]:
    """SFT through the notebook's steps: LoRA r8 on the embedded chat data, batch 4, no evaluation."""
    from vinakit import sft
    from vinakit.params import SFTParams

    params = SFTParams.validate(dict(
        model_name="tiny-vi", backend=backend, load_in_4bit=False, max_seq_length=256, rank=8, lora_alpha=16,
        use_rslora=False, learning_rate=3e-3, max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=1, save_steps=1000, val_size=0,
        warmup_ratio=0.1, output_dir=str(tmp_path), run_name="golden-sft", dataset="vinakit:chat", seed=3407))
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    tokenized = sft.tokenize(params, tokenizer, data, run)
    return sft.train(params, model, tokenizer, tokenized, run)["train_loss_history"]


def cpt_losses(backend: str, tmp_path: Path) -> list[float]:
    """CPT through the notebook's steps, without vocabulary extension: one ``full`` stage, 64-token blocks."""
    from vinakit import cpt
    from vinakit.params import CPTParams

    params = CPTParams.validate(dict(
        model_name="tiny-vi", backend=backend, load_in_4bit=False, max_seq_length=64, rank=4, lora_alpha=8,
        use_rslora=False, learning_rate=2e-3, embedding_learning_rate=1e-3, stages=[f"full:{STEPS}"],
        per_device_train_batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=1,
        eval_steps=1000, save_steps=1000, warmup_ratio=0.0, val_size=0.1, output_dir=str(tmp_path),
        run_name="golden-cpt", dataset="vinakit:corpus", seed=3407))
    run = start_run(params)
    corpus = cpt.load_corpus(params, run)
    model, tokenizer = cpt.load_model(params, run)
    packed = cpt.pack(params, model, tokenizer, corpus, run)
    model = cpt.prepare_for_training(params, model, run)
    return cpt.train_stages(params, model, tokenizer, packed, run).stages[0]["train_loss_history"]


RECIPES = {"sft": sft_losses, "cpt": cpt_losses}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_first_losses_match_the_golden_values(recipe: str, backend: str, tmp_path: Path):
    key = golden_key(backend)
    losses = RECIPES[recipe](backend, tmp_path)
    assert len(losses) == STEPS, f"expected one logged loss per step for {STEPS} steps, got {losses}"
    path = GOLDEN_DIR / f"{recipe}_losses.json"
    if os.environ.get(UPDATE_ENV_VAR) == "1":
        record(path, key, losses)
        return
    golden = read(path).get(key)
    if golden is None:
        message = f"no golden {recipe} losses for {key} in {path}; record them on purpose with: {REFRESH}"
        if not key.startswith("cpu-"):
            pytest.skip(message)  # recorded on the CPU, where CI runs; a GPU gives other (valid) numbers
        pytest.fail(message)
    moved = [step for step, (got, want) in enumerate(zip(losses, golden["losses"]), start=1)
             if not math.isclose(got, want, rel_tol=RTOL)]
    assert not moved, (
        f"{recipe.upper()} training on tiny-vi ({key}) moved: the losses of steps {moved} differ from the golden "
        f"values by more than rtol={RTOL}.\n  got:      {losses}\n  expected: {golden['losses']}\n"
        f"  recorded with {golden['libraries']}; now {library_versions()}.\n"
        f"If the change is intended (a fix, a new default, a library upgrade), refresh the values on purpose and "
        f"say why in the commit: {REFRESH}")


def golden_key(backend: str) -> str:
    """``<device profile>-<backend>``: CPU float32 numbers differ from a GPU's bf16 ones."""
    from vinakit.device import active_profile

    return f"{active_profile().name}-{backend}"


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record(path: Path, key: str, losses: list[float]) -> None:
    values = read(path)
    values[key] = {"losses": losses, "libraries": library_versions()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(values.items())), indent=2) + "\n", encoding="utf-8")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
