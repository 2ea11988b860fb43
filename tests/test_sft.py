"""SFT: the trainer sees exactly the kit's labels on both backends, the run folder is complete, resume works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vinakit.errors import VinakitError
from vinakit.params import SFTParams
from vinakit.record import start_run

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"


def tiny_params(tmp_path: Path, backend: str, **overrides) -> SFTParams:
    values = dict(model_name="tiny-vi", backend=backend, load_in_4bit=False, max_seq_length=256, rank=8,
                  lora_alpha=16, use_rslora=False, learning_rate=3e-3, max_steps=6, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=1, save_steps=100,
                  eval_steps=3, val_size=8, output_dir=str(tmp_path), dataset="vinakit:chat")
    values.update(overrides)
    return SFTParams.validate(values)


def test_trainer_uses_exact_labels_and_loss_goes_down(backend: str, tmp_path: Path):
    if backend == "unsloth":
        import unsloth  # noqa: F401
    from vinakit import sft
    from vinakit.train import build_trainer

    params = tiny_params(tmp_path, backend)
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    tokenized = sft.tokenize(params, tokenizer, data, run)
    trainer = build_trainer(model, tokenizer, tokenized.train, tokenized.validation, params, run)
    expected = {tuple(r["input_ids"]): r["labels"] for r in tokenized.train}
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        n = sum(mask)
        assert labels[:n] == expected[tuple(ids[:n])], "the trainer changed the kit's labels"
        assert all(label == -100 for label in labels[n:]), "padding must not be trained"
    metrics = sft.train(params, model, tokenizer, tokenized, run)
    assert len(metrics["train_loss_history"]) == 6
    assert metrics["train_loss_history"][-1] < metrics["train_loss_history"][0]
    assert metrics["eval_loss_steps"] == [3, 6] and metrics["eval_loss"] > 0
    assert metrics["nonpad_token_share"] > 0.8
    adapter = run.path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    info = json.loads((adapter / "vinakit_training.json").read_text(encoding="utf-8"))
    assert info["chat_template"] == tokenizer.chat_template and info["base_model"] == "tiny-vi"
    manifest = run.read_json("manifest.json")
    assert manifest["data"]["train"]["rows_used"] > 0 and manifest["tokenized"]["train_rows"] > 0
    assert manifest["trainable_parameters"]["trainable"] < manifest["trainable_parameters"]["total"]


def test_sft_notebook_run_folder_is_a_complete_record(sft_run: Path):
    metrics = json.loads((sft_run / "metrics.json").read_text(encoding="utf-8"))
    assert isinstance(metrics["train_loss_history"], list) and len(metrics["train_loss_history"]) >= 2
    assert "eval_loss" in metrics
    for name in ("loss.png", "masking_preview.txt", "samples.csv", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "params.yaml", "sft.ipynb"):
        assert (sft_run / name).is_file(), name
    preview = (sft_run / "masking_preview.txt").read_text(encoding="utf-8")
    assert "[[" in preview and "<|im_end|>]]" in preview, "trained spans end with the end-of-turn token"
    manifest = json.loads((sft_run / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["data"]["train"]["sha256"] and manifest["device"]["device_type"] == "cpu"
    executed = json.loads((sft_run / "sft.ipynb").read_text(encoding="utf-8"))
    assert executed["metadata"]["papermill"]["parameters"]["run_name"] == sft_run.name
    assert sft_run.joinpath("samples.csv").read_bytes().startswith(b"\xef\xbb\xbf"), "CSV for Excel has a BOM"


def _complete(checkpoint: Path) -> bool:
    from vinakit.train import last_checkpoint

    try:
        return last_checkpoint(checkpoint) == checkpoint and bool(json.loads(
            (checkpoint / "trainer_state.json").read_text(encoding="utf-8")))
    except (VinakitError, OSError, ValueError):
        return False


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vinakit.cli", "run", "sft", "-f", str(CPU_TINY), "--no-progress", *args]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_loss(tmp_path: Path):
    common = ["-p", "output_dir", str(tmp_path), "-p", "max_steps", "24", "-p", "save_steps", "8",
              "-p", "logging_steps", "4", "-p", "val_size", "0", "-p", "save_total_limit", "5"]
    whole = subprocess.run(_cli(*common, "-p", "run_name", "whole"), capture_output=True, text=True, cwd=REPO)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = subprocess.Popen(_cli(*common, "-p", "run_name", "killed"), cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "checkpoint-8"
    # Killed as soon as checkpoint-8 is complete; a later checkpoint it may have half-written is skipped on resume
    # (last_checkpoint takes the newest one whose trainer_state.json reads), so no timing decides the outcome.
    deadline = time.monotonic() + 900  # a safety stop only: the outcome never depends on it
    while killed.poll() is None and not _complete(checkpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists() or "train_loss" not in json.loads(
        (tmp_path / "killed" / "metrics.json").read_text(encoding="utf-8")), "the run was not killed mid-way"

    resumed = subprocess.run(_cli(*common, "-p", "run_name", "resumed", "-p", "resume_from",
                                  str(tmp_path / "killed")), capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text(encoding="utf-8"))
    got = json.loads((tmp_path / "resumed" / "metrics.json").read_text(encoding="utf-8"))
    assert got["global_step"] == expected["global_step"] == 24
    assert got["train_loss_history"][-1] == pytest.approx(expected["train_loss_history"][-1], rel=1e-4)
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["resumed_from"].endswith("checkpoint-8") or manifest["resumed_from"].endswith("checkpoint-16")
