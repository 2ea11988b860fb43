"""Training on both backends: Unsloth's trainer (``backend: unsloth``) or TRL's SFTTrainer (``backend: hf``).

Both get the same pre-tokenised data (``input_ids`` + exact ``labels`` from :mod:`vinakit.chat`), the same
length-grouped sampler and the same collator, so the only difference between the backends is the model code.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vinakit.display import tidy_notebook_table
from vinakit.packing import TokenCountingCollator
from vinakit.record import Run, shared_path, write_json
from vinakit.runs import TRAINING_INFO_FILE



# ----------------------------------------------------------------------------------------------- data


@dataclass
class TokenizedData:
    """Tokenised train/validation splits and what was dropped while tokenising."""

    train: Any  # datasets.Dataset
    validation: Any | None
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        lengths = self.train["length"]
        return {
            "train_rows": len(self.train),
            "validation_rows": len(self.validation) if self.validation is not None else 0,
            "dropped_while_tokenizing": dict(self.dropped),
            "train_tokens": int(sum(lengths)),
            "max_length": int(max(lengths)),
            "mean_length": round(sum(lengths) / len(lengths), 1),
        }


def tokenize_chat_data(tokenizer: Any, chat_data: Any, max_length: int, train_on: str = "assistant") -> TokenizedData:
    """Tokenise ``ChatData`` splits with exact responses-only labels; rows with nothing to train are dropped."""
    from datasets import Dataset

    from vinakit.chat import tokenize_rows
    from vinakit.errors import DataError

    train_rows, dropped = tokenize_rows(tokenizer, chat_data.train, max_length, train_on)
    if not train_rows:
        raise DataError(f"No training row is left after tokenising ({dict(dropped)}): raise max_seq_length or "
                        f"check the data.")
    validation = None
    if chat_data.validation:
        val_rows, val_dropped = tokenize_rows(tokenizer, chat_data.validation, max_length, train_on)
        dropped.update({f"validation: {k}": v for k, v in val_dropped.items()})
        validation = Dataset.from_list(_model_columns(val_rows)) if val_rows else None
    return TokenizedData(Dataset.from_list(_model_columns(train_rows)), validation, dropped)


def _model_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "length": len(r["input_ids"])} for r in rows]


class PaddingCountingCollator(TokenCountingCollator):
    """TRL's language-modelling collator, counting real and padded tokens (the non-pad share)."""

    def __init__(self, pad_token_id: int) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        super().__init__()
        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        batch = self.inner(examples)
        self.count(batch["attention_mask"])
        return batch


# ----------------------------------------------------------------------------------------------- trainer


def kit_config_class(backend: str) -> type:
    """The kit's training config ``KitSFTConfig``: TRL's ``SFTConfig`` plus two real dataclass fields.

    ``embedding_learning_rate`` (the embeddings' own optimizer group, read by the kit's and Unsloth's trainers)
    and ``length_buckets`` (batches of similar length, read by ``_KitTrainerMixin``) survive ``to_dict`` and the
    pickled ``training_args.bin`` like every other argument. TRL is imported only here (after Unsloth, on that
    backend), so the class is made on first use and then lives in this module as ``KitSFTConfig``.
    """
    if backend == "unsloth":
        from vinakit.model import import_unsloth

        import_unsloth()  # Unsloth must patch TRL before TRL is imported
    if "KitSFTConfig" not in globals():
        globals()["KitSFTConfig"] = _make_kit_config()
    return globals()["KitSFTConfig"]


def _make_kit_config() -> type:
    from trl import SFTConfig

    @dataclass
    class KitSFTConfig(SFTConfig):
        embedding_learning_rate: float | None = field(
            default=None, metadata={"help": "learning rate of embed_tokens/lm_head (None: learning_rate)"})
        length_buckets: bool = field(default=True, metadata={"help": "batch rows of similar length together"})

    KitSFTConfig.__module__, KitSFTConfig.__qualname__ = __name__, "KitSFTConfig"  # picklable by name
    return KitSFTConfig


def __getattr__(name: str) -> Any:
    # Unpickling a checkpoint's training_args.bin in a fresh process looks the class up by name.
    if name == "KitSFTConfig":
        return kit_config_class("hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def training_arguments(params: Any, run: Run, model: Any, *, has_eval: bool) -> Any:
    """The kit's SFT config from the notebook parameters; precision and optimizer come from the device policy.

    The bf16/fp16 flags follow the *loaded* model's dtype (see :func:`vinakit.device.trainer_precision`).
    """
    from vinakit.device import optimizer_name, single_gpu_arguments, trainer_precision

    config = kit_config_class(params.backend)(
        output_dir=str(shared_path(run.path / "checkpoints")),  # one folder for every rank of a distributed run
        per_device_train_batch_size=params.per_device_train_batch_size,
        per_device_eval_batch_size=params.per_device_train_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        learning_rate=params.learning_rate,
        embedding_learning_rate=getattr(params, "embedding_learning_rate", None),
        length_buckets=params.group_by_length,
        num_train_epochs=params.num_train_epochs,
        max_steps=params.max_steps,
        warmup_steps=params.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=params.lr_scheduler_type,
        weight_decay=params.weight_decay,
        optim=optimizer_name(params.optim),
        logging_steps=params.logging_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=params.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=params.eval_steps,
        seed=params.seed,
        data_seed=params.seed,
        report_to=[],
        max_length=params.max_seq_length,
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenised with exact labels already
        remove_unused_columns=False,
        length_column_name="length",
        dataloader_num_workers=0,
        # TRL's chunked loss multiplies by lm_head's base weight itself, which skips a LoRA on lm_head.
        loss_type="nll" if _has_lora(model.get_output_embeddings()) else None,
        **trainer_precision(model),
    )
    return single_gpu_arguments(config)


def _has_lora(module: Any) -> bool:
    return module is not None and hasattr(module, "lora_A")


def build_trainer(model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any | None, params: Any,
                  run: Run, *, callbacks: list[Any] | None = None) -> Any:
    """The backend's trainer over pre-tokenised data, with loss history and padding accounting."""
    args = training_arguments(params, run, model, has_eval=eval_dataset is not None)
    collator = PaddingCountingCollator(_pad_id(tokenizer))
    history = LossHistory()
    # With fp16 the loss scaler skips steps with inf gradients by design: only the loss is watched then.
    guard = NonFiniteGuard(check_gradients=not args.fp16)
    trainer_cls = _trainer_class(params.backend)
    trainer = trainer_cls(model=model, processing_class=tokenizer, train_dataset=train_dataset,
                          eval_dataset=eval_dataset, args=args, data_collator=collator,
                          callbacks=[_as_callback(history), _as_callback(guard), *(callbacks or [])])
    tidy_notebook_table(trainer)
    trainer.vinakit_history = history
    trainer.vinakit_guard = guard
    trainer.vinakit_collator = collator
    return trainer


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def _trainer_class(backend: str) -> type:
    """The backend's trainer class with the kit's two additions (see ``_KitTrainerMixin``)."""
    if backend == "unsloth":
        from unsloth import UnslothTrainer  # has its own embedding-learning-rate parameter group

        return type("KitUnslothTrainer", (_KitTrainerMixin, UnslothTrainer), {})
    from trl import SFTTrainer

    return type("KitHFTrainer", (_KitTrainerMixin, _EmbeddingGroupMixin, SFTTrainer), {})


class LengthBucketSampler:
    """Batches of similar length in random order: little padding, no long-to-short curriculum.

    transformers' LengthGroupedSampler sorts only within mega-batches of at most a quarter of the data, so
    small data sets still pad a lot; this one shuffles, sorts windows of ``window_batches`` batches by length,
    cuts them into batches and shuffles the batches. ``set_epoch`` (called by the Trainer) makes each epoch's
    order a function of (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.

    In a distributed run ``batch_size`` is the global batch (per device x ranks) and every rank makes the same
    order; accelerate gives rank r the r-th per-device slice of each global batch. So N ranks of batch b train on
    the rows one process of batch N x b trains on, in the same steps, for the same seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window_batches: int = 64) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window_batches * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        import random

        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start:start + self.window], key=self.lengths.__getitem__)
            batches.extend(window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [i for b in batches if len(b) < self.batch_size for i in b]
        rng.shuffle(full)
        # The DataLoader cuts this flat order into batches again: short leftovers go last, sorted, so they
        # cannot shift the boundaries of the full batches.
        partial.sort(key=self.lengths.__getitem__)
        return iter([index for batch in full for index in batch] + partial)


class _KitTrainerMixin:
    """Length-bucketed sampling, evaluation batches through the plain collator (so the padding count covers
    training batches only), and every micro-batch's loss shown to the :class:`NonFiniteGuard`."""

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        guard = getattr(self, "vinakit_guard", None)
        if guard is not None:
            guard.saw_loss(loss, self.state.global_step + 1)
        return loss

    def _load_optimizer_and_scheduler(self, *args: Any, **kwargs: Any) -> Any:
        _restore_indexed_cpu_locations()
        return super()._load_optimizer_and_scheduler(*args, **kwargs)

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        dataset = self.train_dataset
        if self.args.length_buckets and "length" in dataset.column_names:
            # Buckets of the global batch: accelerate deals the flat order out to the ranks one per-device batch
            # at a time, so the ranks of one step together get the rows one process with the global batch gets.
            global_batch = self.args.train_batch_size * self.args.world_size
            return LengthBucketSampler(dataset["length"], global_batch, self.args.seed)
        return super()._get_train_sampler(*args, **kwargs)

    def get_eval_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        counting = self.data_collator
        self.data_collator = getattr(counting, "inner", counting)
        try:
            return super().get_eval_dataloader(*args, **kwargs)
        finally:
            self.data_collator = counting


def _restore_indexed_cpu_locations() -> None:
    """Let ``torch.load`` restore to ``cpu:N``: a resumed CPU rank (gloo) loads its optimizer with its own device
    as ``map_location``, which is ``cpu:0``, a location torch's own CPU restore does not take ("don't know how to
    restore data location"). Registered once; other locations are left to torch."""
    import torch.serialization

    if globals().get("_cpu_locations_registered"):
        return

    def restore(obj: Any, location: str) -> Any:
        return obj if location.startswith("cpu:") else None

    torch.serialization.register_package(30, lambda obj: None, restore)
    globals()["_cpu_locations_registered"] = True


class _EmbeddingGroupMixin:
    """TRL's SFTTrainer with the embedding learning rate as its own parameter group (Unsloth has its own)."""

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        embedding_lr = self.args.embedding_learning_rate
        if embedding_lr is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        self.optimizer = build_optimizer_with_embedding_group(self, embedding_lr)
        return self.optimizer


def embedding_parameter_ids(model: Any) -> set[int]:
    """ids of the trainable input/output embedding weights (``modules_to_save`` copies included)."""
    ids = set()
    for name, param in model.named_parameters():
        if param.requires_grad and ("embed_tokens" in name or "lm_head" in name) and "lora_" not in name:
            ids.add(id(param))
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):  # other names: MPT's wte
        for name, param in module.named_parameters() if module is not None else ():
            if param.requires_grad and "lora_" not in name:
                ids.add(id(param))
    return ids


def build_optimizer_with_embedding_group(trainer: Any, embedding_lr: float) -> Any:
    """An optimizer with the body at ``learning_rate`` and the embeddings at ``embedding_lr``."""
    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    embed_ids = embedding_parameter_ids(model)
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((id(param) in embed_ids, name in decay), []).append(param)
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    param_groups = [
        {"params": ps, "weight_decay": trainer.args.weight_decay if is_decay else 0.0,
         "lr": embedding_lr if is_embed else trainer.args.learning_rate}
        for (is_embed, is_decay), ps in groups.items()
    ]
    return optimizer_cls(param_groups, **optimizer_kwargs)


# ----------------------------------------------------------------------------------------------- running


class LossHistory:
    """Keeps every logged train/eval loss with its step (a transformers ``TrainerCallback``)."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            # the final evaluation can repeat the last step's: keep one value per step
            self.eval = [(s, v) for s, v in self.eval if s != state.global_step]
            self.eval.append((state.global_step, float(logs["eval_loss"])))


class NonFiniteGuard:
    """Stops training at the first NaN/inf loss or gradient norm (a ``TrainerCallback`` through ``_as_callback``).

    The loss of every micro-batch comes from ``_KitTrainerMixin.training_step`` (the trainer's own logs hide a
    NaN loss behind ``logging_nan_inf_filter``). Once tripped, the step's gradients are dropped, so the optimizer
    leaves the weights as they were; training stops at the end of the step without saving a checkpoint, and
    :func:`run_training` raises :class:`~vinakit.errors.TrainingDivergedError`. Earlier checkpoints are kept.

    Args:
        check_gradients: also check the gradient norm before each optimizer step.
    """

    def __init__(self, check_gradients: bool = True) -> None:
        self.check_gradients = check_gradients
        self.step: int | None = None
        self.what = ""
        self.value = 0.0

    def saw_loss(self, loss: Any, step: int) -> None:
        """Check one micro-batch's loss (``step``: the optimizer step it belongs to, 1-based)."""
        value = float(loss)  # one sync per micro-batch: the trainer's own NaN filter syncs there already
        if self.step is None and not math.isfinite(value):
            self.step, self.what, self.value = step, "loss", value

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if model is None:
            return
        if self.step is None and self.check_gradients:
            norm = _gradient_norm(model)
            if not math.isfinite(norm):
                self.step, self.what, self.value = state.global_step + 1, "gradient norm", norm
        if self.step is not None:
            model.zero_grad(set_to_none=True)  # a parameter without a gradient is not touched by the optimizer

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.step is not None:
            control.should_training_stop = True
            control.should_save = False  # never a checkpoint of this step: the last good one stays the newest
            control.should_evaluate = False


def _gradient_norm(model: Any) -> float:
    import torch

    grads = [param.grad for param in model.parameters() if param.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _as_callback(handler: Any) -> Any:
    """Wrap an object's ``on_*`` methods as a TrainerCallback (transformers is imported here, after Unsloth)."""
    from transformers import TrainerCallback

    def forward(event: str) -> Any:
        return lambda self, *args, **kwargs: getattr(handler, event)(*args, **kwargs)

    events = {name: forward(name) for name in dir(handler) if name.startswith("on_")}
    return type(f"{type(handler).__name__}Callback", (TrainerCallback,), events)()


def last_checkpoint(run_folder: str | Path) -> Path:
    """The newest complete ``checkpoint-N`` of a run folder, its ``checkpoints/`` folder, or a checkpoint itself.

    transformers' ``get_last_checkpoint`` takes the highest number in one folder, also a checkpoint that a killed
    run left half-written. The trainer writes ``trainer_state.json`` last, so the kit takes the newest checkpoint
    whose state file reads as JSON, and it knows the run-folder layout (``<run>/checkpoints/``).
    """
    from vinakit.errors import VinakitError

    folder = Path(run_folder).expanduser()
    if (folder / "trainer_state.json").exists():
        return folder
    found = [path for root in (folder / "checkpoints", folder) if root.is_dir() for path in root.glob("checkpoint-*")
             if path.name.split("-")[-1].isdigit() and _complete_checkpoint(path)]
    if not found:
        raise VinakitError(f"resume_from={run_folder}: no complete checkpoint-N folder found there (looked in "
                           f"{folder}/checkpoints). Checkpoints are written every save_steps steps.")
    return max(found, key=lambda path: int(path.name.split("-")[-1]))


def _complete_checkpoint(path: Path) -> bool:
    import json

    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def run_training(trainer: Any, params: Any, run: Run) -> dict[str, Any]:
    """Train (resuming if asked), then return and record the metrics of the run."""
    from vinakit.device import distributed_summary, peak_memory_gib, reset_peak_memory

    checkpoint = str(last_checkpoint(params.resume_from)) if params.resume_from else None
    run.update_manifest(precision={"bf16": trainer.args.bf16, "fp16": trainer.args.fp16},
                        optimizer=trainer.args.optim, distributed=distributed_summary(trainer.args),
                        **({"resumed_from": checkpoint} if checkpoint else {}))
    reset_peak_memory()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    if trainer.vinakit_guard.step is not None:
        raise _diverged(trainer.vinakit_guard, params, run)
    history: LossHistory = trainer.vinakit_history
    collator: TokenCountingCollator = trainer.vinakit_collator
    metrics: dict[str, Any] = {
        "train_loss": float(result.training_loss),
        "train_loss_history": [loss for _, loss in history.train],
        "train_loss_steps": [step for step, _ in history.train],
        "global_step": int(trainer.state.global_step),
        "train_runtime_s": round(seconds, 2),
        "train_tokens_seen": collator.real_tokens,
        "tokens_per_second": round(collator.real_tokens / seconds, 1) if seconds > 0 else None,
        "nonpad_token_share": round(collator.nonpad_share, 4) if collator.nonpad_share else None,
        "peak_memory_gib": peak_memory_gib(),  # None on CPU
    }
    if trainer.eval_dataset is not None:
        final = trainer.evaluate()  # logged through the history callback too
        metrics.update(eval_loss=float(final["eval_loss"]),
                       eval_loss_history=[loss for _, loss in history.eval],
                       eval_loss_steps=[step for step, _ in history.eval])
    return run.log_metrics(**metrics)


def _diverged(guard: NonFiniteGuard, params: Any, run: Run) -> Exception:
    """The error for a tripped guard; the run is marked failed with the step first."""
    from vinakit.errors import TrainingDivergedError, VinakitError
    from vinakit.record import error_details, mark_run

    try:
        kept = f"the last good checkpoint is kept: {last_checkpoint(run.path)}"
    except VinakitError:
        kept = f"no checkpoint was written before it (every save_steps={params.save_steps} steps)"
    error = TrainingDivergedError(
        f"Training stopped at step {guard.step}: the {guard.what} is {guard.value} (not a finite number). Nothing "
        f"was saved as the run's result; {kept}. Lower learning_rate (now {params.learning_rate}) or check the "
        f"data, then start again.", step=guard.step)
    mark_run(run.path, "failed", **error_details(error))
    return error


def save_trained(model: Any, tokenizer: Any, run: Run, params: Any, *, name: str = "adapter") -> Path:
    """Save the adapter (or the full model) with its tokenizer and exact chat template into the run folder."""
    folder = run.path / name
    whole = _whole_state_dict(model)
    if whole is None:
        model.save_pretrained(str(folder))
    elif whole:  # FSDP2: rank 0 holds the gathered weights; the other ranks' own folders get none
        model.save_pretrained(str(folder), state_dict=whole)
    tokenizer.save_pretrained(str(folder))
    info = {
        "base_model": params.model_name,
        "backend": params.backend,
        "load_in_4bit": params.load_in_4bit,
        "full_finetuning": getattr(params, "full_finetuning", False),
        "chat_template_name": getattr(params, "chat_template", "") or "tokenizer's own",
        "chat_template": getattr(tokenizer, "chat_template", None),
        "max_seq_length": params.max_seq_length,
        "train_on": getattr(params, "train_on", None),
        "run": run.path.name,
    }
    write_json(folder / TRAINING_INFO_FILE, info)
    run.update_manifest(saved_model=str(folder))
    return folder


def _whole_state_dict(model: Any) -> dict[str, Any] | None:
    """The whole state dict when FSDP2 sharded the model (on rank 0; {} on the others), else None.

    Under FSDP2 each rank holds one shard of every weight (DTensor), which ``save_pretrained`` cannot write.
    Gathering is a collective, so every rank calls this; the whole weights go to rank 0's CPU memory only (a
    sharded model is one that does not fit on one GPU).
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(param, DTensor) for param in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plot_losses(metrics: dict[str, Any], title: str = "Loss", model_name: str = "") -> Any:
    """A matplotlib figure of the train (and validation) loss curves, titled with the model's short name."""
    import matplotlib.pyplot as plt

    from vinakit.model import display_name

    title = f"{title}: {display_name(model_name)}" if model_name else title
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(metrics.get("train_loss_steps", []), metrics.get("train_loss_history", []), label="train")
    if metrics.get("eval_loss_history"):
        ax.plot(metrics["eval_loss_steps"], metrics["eval_loss_history"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def total_steps(n_rows: int, params: Any) -> int:
    """Optimizer steps a run will take (for progress messages and warm-up)."""
    if params.max_steps > 0:
        return params.max_steps
    per_epoch = math.ceil(n_rows / (params.per_device_train_batch_size * params.gradient_accumulation_steps))
    return math.ceil(per_epoch * params.num_train_epochs)
