"""Preference training (ORPO, DPO) on TRL's trainers over pairs tokenised exactly by the kit.

* ORPO (reference-free, one stage) is ``trl.experimental.orpo.ORPOTrainer``: TRL 1.14 moved it to
  ``trl.experimental``. Its own tokeniser (prompt string + reply string) is replaced by the kit's ids, and its NLL
  term covers the chosen reply only (TRL's covers prompt + reply: on tiny-vi after SFT that trained the model on
  the MCQ passages and it stopped writing MCQs, 0% valid on the held-out contexts; bench/preference_effect.py).
* DPO is ``trl.DPOTrainer``. Started from an SFT adapter, TRL freezes a copy of that adapter as "ref" and
  computes the reference log-probabilities with it: the reference is the SFT model, and the base weights exist
  once (only the LoRA matrices are copied, never the model).
* On the unsloth backend Unsloth is imported first (it patches TRL on import) and ``PatchDPOTrainer()`` is called,
  as Unsloth's notebooks do. In unsloth 2026.10.9 that function is a no-op kept for compatibility (the fused
  preference loss is opt-in, ``UNSLOTH_FUSED_PREFERENCE_LOSS=1``, GPU kernels), and Unsloth's CPU path does not
  export it at all: on CPU the TRL trainers run as they are, on the model Unsloth loaded.

Nothing heavy is imported at module level (Unsloth must be imported before TRL).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

from vinakit.record import Run

# Reward accuracy and margin before and after training are measured on the first this many training pairs (the
# same pairs both times): enough for a stable figure, cheap beside training.
SCORED_PAIRS = 128
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class RewardHistory:
    """Every logged loss and reward figure with its step (a transformers ``TrainerCallback``)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {key: [] for key in ("loss", *REWARD_KEYS)}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" in logs and all(key in logs for key in REWARD_KEYS):
            self.steps.append(state.global_step)
            for key in self.values:
                self.values[key].append(float(logs[key]))


def trainer_class(method: str, backend: str) -> tuple[type, type]:
    """(config class, trainer class) of ``method`` on ``backend``, taking the kit's pre-tokenised pairs."""
    if backend == "unsloth":
        from vinakit.model import import_unsloth

        import_unsloth()  # before TRL: Unsloth patches it on import
        import unsloth

        patch = getattr(unsloth, "PatchDPOTrainer", None)  # absent from Unsloth's CPU path: TRL runs as it is
        if patch is not None:
            patch()
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class KitDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
                return dataset  # already prompt_ids / chosen_ids / rejected_ids, exact for the template

        return DPOConfig, KitDPOTrainer
    with warnings.catch_warnings():  # chosen on purpose: ORPO lives in trl.experimental in TRL 1.14
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class KitORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
            return orpo_row(feature)

        def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
            outputs = super().concatenated_forward(model, batch)
            # TRL's NLL term covers prompt + reply; ORPO's SFT term (and the kit's SFT) is the chosen reply only.
            return (*outputs[:4], reply_nll(outputs[2], batch["chosen_labels"]), *outputs[5:])

    return ORPOConfig, KitORPOTrainer


def orpo_row(pair: dict[str, Any]) -> dict[str, list[int]]:
    """ORPO's row layout (full sequences, masks, labels -100 on the prompt) from the kit's exact ids."""
    prompt = list(pair["prompt_input_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        completion = list(pair[f"{side}_input_ids"])
        row[f"{side}_input_ids"] = prompt + completion
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
        row[f"{side}_labels"] = [-100] * len(prompt) + completion
    return row


def reply_nll(chosen_logits: Any, chosen_labels: Any) -> Any:
    """Mean next-token NLL over the chosen replies' tokens (labels -100 elsewhere).

    ``chosen_logits`` are ORPO's, already without the last position (``[batch, length - 1, vocab]``, padded to
    the longer side of the batch); ``chosen_labels`` are the collator's (``-100`` on prompt and padding).
    """
    import torch

    width = chosen_logits.shape[1] + 1
    labels = torch.nn.functional.pad(chosen_labels, (0, max(0, width - chosen_labels.shape[1])), value=-100)
    targets = labels[:, 1:width].to(chosen_logits.device)
    return torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]).float(),
                                             targets.reshape(-1), ignore_index=-100)


def _dataset(method: str, rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    if method == "dpo":  # TRL's DPO names the columns without "input_"
        rows = [{"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"],
                 "rejected_ids": r["rejected_input_ids"]} for r in rows]
    else:
        rows = [{key: r[key] for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")} for r in rows]
    return Dataset.from_list(rows)


def build_preference_trainer(model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
                             eval_rows: list[dict[str, Any]], params: Any, run: Run) -> Any:
    """The method's TRL trainer over tokenised pairs, with the reward history attached as ``vinakit_history``."""
    from vinakit.device import optimizer_name, single_gpu_arguments, trainer_precision

    config_cls, trainer_cls = trainer_class(params.method, params.backend)
    args = config_cls(
        output_dir=str(run.path / "checkpoints"), per_device_train_batch_size=params.per_device_train_batch_size,
        per_device_eval_batch_size=params.per_device_train_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps, learning_rate=params.learning_rate,
        num_train_epochs=params.num_train_epochs, max_steps=params.max_steps, warmup_steps=params.warmup_ratio,
        lr_scheduler_type=params.lr_scheduler_type, weight_decay=params.weight_decay,
        optim=optimizer_name(params.optim), logging_steps=params.logging_steps, save_strategy="steps",
        save_steps=params.save_steps, save_total_limit=params.save_total_limit, eval_strategy="no",
        seed=params.seed, data_seed=params.seed, report_to=[], beta=params.beta, max_length=params.max_seq_length,
        remove_unused_columns=False, dataloader_num_workers=0, **trainer_precision(model))
    history = RewardHistory()
    trainer = trainer_cls(model=model, args=single_gpu_arguments(args), processing_class=tokenizer,
                          train_dataset=_dataset(params.method, train_rows),
                          eval_dataset=_dataset(params.method, eval_rows) if eval_rows else None,
                          callbacks=[_as_callback(history)])
    trainer.vinakit_history = history
    return trainer


def _as_callback(handler: Any) -> Any:
    from vinakit.train import _as_callback as as_callback

    return as_callback(handler)


def run_preference_training(trainer: Any, params: Any, run: Run,
                            save: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Train, call ``save`` (the adapter first of all), then score the training pairs (and validation pairs) once
    more; record and return the metrics.

    ``rewards_accuracy``/``rewards_margin`` are measured on the first ``SCORED_PAIRS`` training pairs (the logged
    figures are per batch, during training), ``*_before`` the same before the first step, ``eval_*`` on the
    validation pairs after training.

    Raises:
        TrainingDivergedError: the loss is not a finite number.
    """
    from vinakit.errors import TrainingDivergedError

    checkpoint = _checkpoint(params)
    scored = trainer.train_dataset.select(range(min(SCORED_PAIRS, len(trainer.train_dataset))))
    before = trainer.evaluate(scored, metric_key_prefix="train_pairs")  # the figure to beat
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    if not math.isfinite(float(result.training_loss)):
        raise TrainingDivergedError(f"{params.method} training diverged (loss {result.training_loss}): lower "
                                    f"learning_rate (now {params.learning_rate}) or beta.",
                                    step=trainer.state.global_step)
    if save is not None:
        save()
    history: RewardHistory = trainer.vinakit_history
    on_train = trainer.evaluate(scored, metric_key_prefix="train_pairs")
    metrics: dict[str, Any] = {
        "method": params.method, "train_loss": float(result.training_loss), "global_step": trainer.state.global_step,
        "train_runtime_s": round(seconds, 2),
        "rewards_accuracy": float(on_train["eval_rewards/accuracies"]),  # TRL prefixes rewards "eval_"
        "rewards_margin": float(on_train["eval_rewards/margins"]),
        "rewards_accuracy_before": float(before["eval_rewards/accuracies"]),
        "rewards_margin_before": float(before["eval_rewards/margins"]),
        "train_loss_steps": history.steps, "train_loss_history": history.values["loss"],
        **{f"{key.replace('/', '_')}_history": history.values[key] for key in REWARD_KEYS},
    }
    if trainer.eval_dataset is not None:
        final = trainer.evaluate()
        metrics.update(eval_rewards_accuracy=float(final["eval_rewards/accuracies"]),
                       eval_rewards_margin=float(final["eval_rewards/margins"]), eval_loss=float(final["eval_loss"]))
    return run.log_metrics(**metrics)


def _checkpoint(params: Any) -> str | None:
    if not params.resume_from:
        return None
    from vinakit.train import last_checkpoint

    return str(last_checkpoint(params.resume_from))


def plot_rewards(metrics: dict[str, Any], title: str = "Rewards") -> Any:
    """Chosen and rejected reward, their margin (left axis) and the reward accuracy (right axis) over steps."""
    import matplotlib.pyplot as plt

    steps = metrics.get("train_loss_steps", [])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("rewards_chosen", "chosen reward"), ("rewards_rejected", "rejected reward"),
                       ("rewards_margins", "margin")):
        ax.plot(steps, metrics.get(f"{key}_history", []), "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    accuracy = ax.twinx()
    accuracy.plot(steps, metrics.get("rewards_accuracies_history", []), "k:o", label="accuracy")
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_ylabel("reward accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = [*ax.get_legend_handles_labels()[0], *accuracy.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="best", fontsize="small")
    return fig
