"""The steps of ``notebooks/sft.ipynb``, each one call from a notebook cell."""

from __future__ import annotations

from typing import Any

from vinakit.params import LoraParams, SFTParams
from vinakit.record import Run


def load_data(params: SFTParams, run: Run) -> Any:
    """Load, clean and split the chat data; the data report goes into the run manifest.

    Through :func:`vinakit.runs.load_sft_data`, which eval and export use to re-create the validation split.
    """
    from vinakit.runs import load_sft_data

    data = load_sft_data(params)
    run.add_data_report("train", data.report)
    return data


def load_model(params: LoraParams, run: Run, *, modules_to_save: list[str] | None = None) -> tuple[Any, Any]:
    """Load the model on the chosen backend, set the chat template and add LoRA (unless full fine-tuning)."""
    from vinakit import model as model_lib
    from vinakit.chat import use_chat_template
    from vinakit.device import device_summary
    from vinakit.plan import check_before_loading

    check_before_loading(params, run, modules_to_save=modules_to_save)  # records the estimate, warns if too big
    model_lib.set_trust_remote_code(params.trust_remote_code)
    model, tokenizer = model_lib.load_model(
        params.model_name, backend=params.backend, max_seq_length=params.max_seq_length,
        load_in_4bit=params.load_in_4bit, full_finetuning=params.full_finetuning, seed=params.seed)
    tokenizer = use_chat_template(tokenizer, params.chat_template or None)
    model = model_lib.prepare_for_training(model, params, modules_to_save=modules_to_save)
    run.update_manifest(device=device_summary(), backend=params.backend,
                        trainable_parameters=model_lib.trainable_parameter_summary(model),
                        adapter_modules=model_lib.adapter_modules(model))
    return model, tokenizer


def tokenize(params: SFTParams, tokenizer: Any, data: Any, run: Run) -> Any:
    """Tokenise with exact responses-only labels and write the masking preview into the run folder."""
    from vinakit.masking import write_masking_preview
    from vinakit.train import tokenize_chat_data

    tokenized = tokenize_chat_data(tokenizer, data, params.max_seq_length, params.train_on)
    run.update_manifest(tokenized=tokenized.summary())
    examples = [tokenized.train[i] for i in range(min(params.preview_examples, len(tokenized.train)))]
    write_masking_preview(run.path / "masking_preview.txt", tokenizer, examples, n=len(examples))
    return tokenized


def masking_preview_html(tokenizer: Any, tokenized: Any, n: int) -> str:
    """HTML of the first ``n`` training examples with the trained tokens highlighted."""
    from vinakit.masking import masking_preview

    parts = [masking_preview(tokenizer, tokenized.train[i], html=True) for i in range(min(n, len(tokenized.train)))]
    return "<hr>".join(parts)


def train(params: SFTParams, model: Any, tokenizer: Any, tokenized: Any, run: Run) -> dict[str, Any]:
    """Train on the backend's trainer, save the adapter first of all, then return the run's metrics."""
    from vinakit.train import build_trainer, run_training, save_trained

    trainer = build_trainer(model, tokenizer, tokenized.train, tokenized.validation, params, run)
    metrics = run_training(trainer, params, run)
    save_trained(model, tokenizer, run, params, name="model" if params.full_finetuning else "adapter")
    return metrics


def model_summary(run: Run) -> Any:
    """Trainable and total parameters (recorded in the manifest by :func:`load_model`), shown as a table."""
    from vinakit.display import Summary

    counts = run.read_json("manifest.json")["trainable_parameters"]
    return Summary({"trainable parameters": counts["trainable"], "total parameters": counts["total"],
                    "trainable share": f"{counts['share']:.2%}"}, "Model")


def training_summary(training: dict[str, Any]) -> Any:
    """The headline training figures, shown as a table (losses with 4 significant digits, counts as integers)."""
    from vinakit.display import Summary

    keys = ("train_loss", "eval_loss", "global_step", "tokens_per_second", "nonpad_token_share")
    return Summary({key: training[key] for key in keys if key in training}, "Training")


def sample_generations(params: SFTParams, model: Any, tokenizer: Any, run: Run) -> Any:
    """Answer the sample prompts with the trained model; a DataFrame, also saved as samples.csv."""
    from vinakit.generation import sample_answers

    return sample_answers(model, tokenizer, params.sample_prompts, backend=params.backend,
                          max_new_tokens=params.max_new_tokens, path=run.path / "samples.csv")
