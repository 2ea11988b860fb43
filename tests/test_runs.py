"""Training-run folders: one folder rule for every consumer, the 16-bit base of a QLoRA adapter, and validation
splits re-created exactly as training made them (SFT and CPT)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vinakit import runs
from vinakit.errors import VinakitError
from vinakit.params import CPTParams, SFTParams
from vinakit.record import start_run, write_json


def _adapter_folder(folder: Path, base: str, training: dict | None = None) -> Path:
    """An adapter folder as far as the run rules look: adapter_config.json (and vinakit_training.json)."""
    folder.mkdir(parents=True)
    write_json(folder / "adapter_config.json", {"base_model_name_or_path": base, "peft_type": "LORA", "r": 8})
    if training is not None:
        write_json(folder / runs.TRAINING_INFO_FILE, training)
    return folder


def _sft_run(output_dir: Path, name: str, **values) -> Path:
    """An SFT run folder (params.yaml, manifest.json) with an adapter/ folder."""
    params = SFTParams.validate({"model_name": "tiny-vi", "dataset": "vinakit:chat", "val_size": 0.1, "seed": 5,
                                 "output_dir": str(output_dir), "run_name": name, **values})
    run = start_run(params)
    _adapter_folder(run.path / runs.ADAPTER_DIR, "tiny-vi", {"base_model": params.model_name, "load_in_4bit": True,
                                                             "chat_template": "{{ messages }}"})
    return run.path


# --------------------------------------------------------------------------------------------------------------
# Finding a run
# --------------------------------------------------------------------------------------------------------------


def test_run_folder_adapter_folder_and_model_folder_resolve_alike(tmp_path: Path, tiny_dir: Path):
    run_dir = _sft_run(tmp_path, "sft-a")
    by_run, by_adapter = runs.find_run(run_dir), runs.find_run(run_dir / "adapter")
    assert by_run == by_adapter
    assert by_run.weights_dir == (run_dir / "adapter").resolve() and by_run.run_dir == run_dir.resolve()
    assert by_run.kind == "lora" and by_run.notebook == "sft" and by_run.trained_in_4bit
    assert by_run.params["dataset"] == "vinakit:chat" and by_run.chat_template == "{{ messages }}"
    assert by_run.model_name == "tiny-vi" and by_run.name == "sft-a"
    full = runs.find_run(tiny_dir)
    assert full.kind == "full" and full.run_dir is None and runs.base_model_16bit(full) == str(tiny_dir.resolve())
    # a run that saved a full model (model/) and a bare adapter folder without a run around it
    (tmp_path / "cpt-run" / "model").mkdir(parents=True)
    write_json(tmp_path / "cpt-run" / "model" / "config.json", {"model_type": "llama"})
    assert runs.find_run(tmp_path / "cpt-run").weights_dir == (tmp_path / "cpt-run" / "model").resolve()
    bare = runs.find_run(_adapter_folder(tmp_path / "bare" / "lora", "tiny-vi"))
    assert bare.run_dir is None and bare.params == {} and bare.notebook == "" and bare.model_name == "tiny-vi"


def test_folder_errors_say_what_to_give(tmp_path: Path):
    with pytest.raises(VinakitError, match=r"adapter: folder .*không-có does not exist.*outputs/<run>"):
        runs.find_run(tmp_path / "không-có")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(VinakitError, match=r"holds no adapter \(adapter_config.json\) or model"):
        runs.find_run(tmp_path / "empty-run")
    with pytest.raises(VinakitError, match="run the SFT"):
        runs.find_run("", tmp_path / "nothing-here")


def test_empty_spec_is_the_newest_training_run_never_an_export_run(tmp_path: Path):
    older, newer = _sft_run(tmp_path, "sft-old"), _sft_run(tmp_path, "sft-new")
    exported = _sft_run(tmp_path, "export-x")
    write_json(exported / "manifest.json", {"notebook": "export"})
    for age, run_dir in ((300, older), (200, newer), (100, exported)):  # explicit times: no clock in the result
        stamp = 1_700_000_000 - age
        os.utime(run_dir / "adapter", (stamp, stamp))
    assert runs.find_run("", tmp_path).run_dir == newer.resolve()
    assert runs.newest_trained_run(tmp_path) == newer


# --------------------------------------------------------------------------------------------------------------
# The 16-bit base
# --------------------------------------------------------------------------------------------------------------


def test_quantized_names_and_same_model(tiny_dir: Path):
    assert runs.unquantized_name("unsloth/llama-3.2-1b-instruct-unsloth-bnb-4bit") == "unsloth/llama-3.2-1b-instruct"
    assert runs.unquantized_name("unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit/") == "unsloth/Qwen2.5-0.5B-Instruct"
    assert runs.unquantized_name("unsloth/Llama-3.2-1B-Instruct") == "unsloth/Llama-3.2-1B-Instruct"
    assert runs.same_model("unsloth/Llama-3.2-1B-Instruct", "unsloth/llama-3.2-1b-instruct-unsloth-bnb-4bit")
    assert runs.same_model("tiny-vi", str(tiny_dir)) and runs.same_model(str(tiny_dir) + "-bnb-4bit", "tiny-vi")
    assert not runs.same_model("tiny-vi", "unsloth/Llama-3.2-1B-Instruct")


def test_the_16bit_base_is_the_run_s_model_name_else_the_adapter_s_without_the_4bit_suffix(tmp_path: Path):
    swapped = "unsloth/llama-3.2-1b-instruct-unsloth-bnb-4bit"  # what Unsloth loads and PEFT records
    named = runs.find_run(_adapter_folder(tmp_path / "a", swapped, {"base_model": "unsloth/Llama-3.2-1B-Instruct"}))
    assert runs.base_model_16bit(named) == "unsloth/Llama-3.2-1B-Instruct"
    unnamed = runs.find_run(_adapter_folder(tmp_path / "b", swapped))
    assert runs.base_model_16bit(unnamed) == "unsloth/llama-3.2-1b-instruct"
    # trained from a pre-quantized repo: its name is stripped too
    prequantized = runs.find_run(_adapter_folder(tmp_path / "c", "x", {"base_model": "unsloth/gemma-3-1b-it-bnb-4bit"}))
    assert runs.base_model_16bit(prequantized) == "unsloth/gemma-3-1b-it"


def test_a_local_prequantized_base_resolves_to_its_16bit_sibling_or_is_refused(tmp_path: Path, tiny_dir: Path):
    sibling = tmp_path / "my-model"
    write_json(_mkdir(sibling) / "config.json", {"model_type": "llama", "dtype": "bfloat16"})
    quantized = tmp_path / "my-model-bnb-4bit"
    write_json(_mkdir(quantized) / "config.json", {"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}})
    run = runs.find_run(_adapter_folder(tmp_path / "a", str(quantized), {"base_model": str(quantized)}))
    assert runs.base_model_16bit(run) == str(sibling)
    sibling.joinpath("config.json").unlink()
    sibling.rmdir()
    with pytest.raises(VinakitError, match=r"pre-quantized 4-bit model .*my-model-bnb-4bit.*16-bit original, "
                                           r"expected at .*my-model, which does not exist.*field base_model"):
        runs.base_model_16bit(run)
    # a quantized folder whose name does not say so: refused, naming what to set instead
    hidden = tmp_path / "plain-name"
    write_json(_mkdir(hidden) / "config.json", {"quantization_config": {"quant_method": "bitsandbytes"}})
    run = runs.find_run(_adapter_folder(tmp_path / "b", str(hidden)))
    with pytest.raises(VinakitError, match=r"itself quantized \(bitsandbytes.*Pass its 16-bit original instead: set "
                                           r".*vinakit_training.json \(field base_model\)"):
        runs.base_model_16bit(run)
    gone = runs.find_run(_adapter_folder(tmp_path / "d", str(tmp_path / "deleted-base")))
    with pytest.raises(VinakitError, match="no longer exists"):
        runs.base_model_16bit(gone)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Validation splits
# --------------------------------------------------------------------------------------------------------------


def test_sft_validation_split_is_the_one_training_made(tmp_path: Path):
    from vinakit import sft

    run_dir = _sft_run(tmp_path, "sft-split", tone_style="new", val_size=5)
    params = SFTParams.validate({"dataset": "vinakit:chat", "val_size": 5, "seed": 5, "tone_style": "new",
                                 "output_dir": str(tmp_path), "run_name": "again"})
    trained_on = sft.load_data(params, start_run(params))  # what the SFT notebook itself loads
    held = runs.validation_rows(runs.find_run(run_dir), count=3)
    assert held.kind == "chat" and held.rows == trained_on.validation[:3]
    assert "sft-split (5 rows, seed 5), first 3" in held.description


def test_cpt_validation_split_is_the_one_training_held_out(tmp_path: Path):
    from vinakit import cpt

    params = CPTParams.validate({"model_name": "tiny-vi", "dataset": "vinakit:corpus", "val_size": 0.2, "seed": 11,
                                 "output_dir": str(tmp_path), "run_name": "cpt-split"})
    run = start_run(params)
    corpus = cpt.load_corpus(params, run)
    (run.path / "model").mkdir()
    write_json(run.path / "model" / "config.json", {"model_type": "llama"})
    held = runs.validation_rows(runs.find_run(run.path), count=1000)
    assert held.kind == "text" and held.rows == corpus.validation  # not the corpus' last documents
    assert runs.load_cpt_corpus(params)[:2] == (corpus.train, corpus.validation)


def test_a_run_without_a_split_says_to_set_fidelity_dataset(tmp_path: Path):
    bare = runs.find_run(_adapter_folder(tmp_path / "bare", "tiny-vi"))
    with pytest.raises(VinakitError, match="set fidelity_dataset"):
        runs.validation_rows(bare, 4)
    no_split = runs.find_run(_sft_run(tmp_path, "no-split", val_size=0))
    with pytest.raises(VinakitError, match=r"no validation split \(val_size 0\): set fidelity_dataset"):
        runs.validation_rows(no_split, 4)
    broken = _sft_run(tmp_path, "broken")
    (broken / "params.yaml").write_text("dataset: vinakit:chat\nval_size: 0.1\nseed: 5\nrank: many\n",
                                        encoding="utf-8")
    with pytest.raises(VinakitError, match=r"rank.*params.yaml"):
        runs.validation_rows(runs.find_run(broken), 4)


def test_training_info_is_read_through_the_record_helpers(tmp_path: Path):
    folder = _adapter_folder(tmp_path / "a", "tiny-vi")
    (folder / runs.TRAINING_INFO_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(VinakitError, match=r"Cannot read .*vinakit_training.json"):
        runs.find_run(folder)
