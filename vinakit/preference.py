"""The steps of ``notebooks/preference.ipynb``: ORPO or DPO on preference pairs, each one call from a cell.

The run folder is an SFT run folder plus the reward figures: ``adapter/`` (saved first), ``loss.png``,
``rewards.png``, ``metrics.json`` (final ``rewards_accuracy`` and ``rewards_margin``), ``pairs_preview.csv``,
``samples.csv`` and the manifest. The eval_mcq and export notebooks take it like an SFT run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vinakit.params import PreferenceParams
from vinakit.record import Run


def load_data(params: PreferenceParams, run: Run) -> Any:
    """Load, check, clean and split the pairs; when continuing an SFT run, its validation prompts are left out
    (so eval_mcq's held-out contexts stay unseen); the data report goes into the manifest."""
    from vinakit.pairs import load_preference_dataset
    from vinakit.runs import sft_validation_prompts

    held_out = sft_validation_prompts(params.adapter, params.output_dir) if params.adapter else frozenset()
    data = load_preference_dataset(params.dataset, val_size=params.val_split, skip_bad_rows=params.skip_bad_rows,
                                   normalize=params.normalize_text, tone_style=params.tone_style, seed=params.seed,
                                   exclude_prompts=held_out)
    run.add_data_report("train", data.report)
    return data


def load_model(params: PreferenceParams, run: Run) -> tuple[Any, Any]:
    """Load the model: the SFT run's adapter on its base (trainable, with its saved chat template) when
    ``adapter`` is set, else the base model with a new LoRA adapter (the LoRA settings as in SFT)."""
    from vinakit import model as model_lib
    from vinakit.chat import use_chat_template
    from vinakit.device import device_summary
    from vinakit.plan import check_before_loading

    check_before_loading(params, run)  # records the estimate, warns if too big
    model_lib.set_trust_remote_code(params.trust_remote_code)
    model, tokenizer = model_lib.load_model(
        params.model_name, backend=params.backend, max_seq_length=params.max_seq_length,
        load_in_4bit=params.load_in_4bit, full_finetuning=params.full_finetuning, seed=params.seed)
    if params.adapter:
        model, tokenizer = _continue_adapter(params, model, tokenizer, run)
    else:
        tokenizer = use_chat_template(tokenizer, params.chat_template or None)
        model = model_lib.prepare_for_training(model, params)
    run.update_manifest(device=device_summary(), backend=params.backend,
                        trainable_parameters=model_lib.trainable_parameter_summary(model))
    return model, tokenizer


def _continue_adapter(params: PreferenceParams, model: Any, tokenizer: Any, run: Run) -> tuple[Any, Any]:
    from peft import PeftModel

    from vinakit.chat import use_chat_template
    from vinakit.runs import trained_adapter

    trained = trained_adapter(params.adapter, params.output_dir, params.model_name)
    model = PeftModel.from_pretrained(model, str(trained.weights_dir), is_trainable=True)
    if (trained.weights_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(trained.weights_dir)  # the template SFT trained with
        tokenizer.model_max_length = params.max_seq_length
    tokenizer = use_chat_template(tokenizer, params.chat_template or None)
    run.update_manifest(continued_from=str(trained.run_dir or trained.weights_dir))
    return model, tokenizer


def tokenize(params: PreferenceParams, tokenizer: Any, data: Any, run: Run) -> dict[str, Any]:
    """Tokenise the pairs exactly for the chat template; pairs that cannot fit are dropped and counted."""
    from vinakit.pairs import tokenize_pairs

    limits = {"max_length": params.max_seq_length, "max_prompt_length": params.max_prompt_length or None}
    tokenized = {"train": tokenize_pairs(tokenizer, data.train, **limits),
                 "validation": tokenize_pairs(tokenizer, data.validation, **limits)}
    run.update_manifest(tokenized={name: part.summary() for name, part in tokenized.items()})
    if not tokenized["train"].rows:
        from vinakit.errors import DataError

        raise DataError(f"no training pair fits max_seq_length={params.max_seq_length} "
                        f"({dict(tokenized['train'].dropped)}): raise max_seq_length", path=params.dataset)
    return tokenized


def pairs_preview(tokenizer: Any, tokenized: dict[str, Any], run: Run, n: int = 3) -> Any:
    """The first ``n`` training pairs as the model sees them (prompt end, chosen, rejected, defect); a DataFrame,
    also saved as pairs_preview.csv."""
    import pandas as pd

    columns = {"prompt (end)": ("prompt_input_ids", -24), "chosen": ("chosen_input_ids", 0),
               "rejected": ("rejected_input_ids", 0)}
    table = pd.DataFrame([{**{name: tokenizer.decode(row[key][start:], skip_special_tokens=False)
                              for name, (key, start) in columns.items()}, "defect": row["defect"]}
                          for row in tokenized["train"].rows[:n]])
    table.to_csv(run.path / "pairs_preview.csv", index=False, encoding="utf-8-sig")
    return table


def train(params: PreferenceParams, model: Any, tokenizer: Any, tokenized: dict[str, Any], run: Run) -> dict[str, Any]:
    """Train with the method's TRL trainer, save the adapter first of all, then score the pairs; the metrics."""
    from vinakit.preference_train import build_preference_trainer, run_preference_training

    trainer = build_preference_trainer(model, tokenizer, tokenized["train"].rows, tokenized["validation"].rows,
                                       params, run)
    return run_preference_training(trainer, params, run, save=lambda: _save(params, model, tokenizer, run))


def _save(params: PreferenceParams, model: Any, tokenizer: Any, run: Run) -> Path:
    """The adapter as SFT saves it; DPO's frozen reference copy ("ref") is not part of the result."""
    from vinakit.record import read_json, write_json
    from vinakit.runs import TRAINING_INFO_FILE
    from vinakit.train import save_trained

    folder = save_trained(model, tokenizer, run, params, name="model" if params.full_finetuning else "adapter")
    shutil.rmtree(folder / "ref", ignore_errors=True)  # PEFT writes extra adapters into sub-folders
    info = read_json(folder / TRAINING_INFO_FILE)
    info.update(method=params.method, continued_from=run.read_json("manifest.json").get("continued_from", ""))
    write_json(folder / TRAINING_INFO_FILE, info)
    return folder


def training_summary(training: dict[str, Any]) -> Any:
    """The headline figures as a table."""
    from vinakit.display import Summary

    keys = ("method", "train_loss", "rewards_accuracy_before", "rewards_accuracy", "rewards_margin_before",
            "rewards_margin", "eval_rewards_accuracy", "eval_rewards_margin", "global_step", "train_runtime_s")
    return Summary({key: training[key] for key in keys if key in training}, "Preference training")


def sample_generations(params: PreferenceParams, model: Any, tokenizer: Any, run: Run) -> Any:
    """Answer the sample prompts with the tuned model; a DataFrame, also saved as samples.csv."""
    from vinakit.generation import sample_answers

    return sample_answers(model, tokenizer, params.sample_prompts, backend=params.backend,
                          max_new_tokens=params.max_new_tokens, path=run.path / "samples.csv")
