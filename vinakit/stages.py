"""CPT training in stages (``new_embeddings``, ``all_embeddings``, ``full``): what each stage trains, how far the
weights moved, each stage saved under ``stages/`` and resumable.

The notebook reaches this through :mod:`vinakit.cpt` (``cpt.train_stages``, ``cpt.plot_stage_losses``). PEFT's
``modules_to_save`` copies of ``embed_tokens`` and ``lm_head`` are the trained embeddings; a tied model keeps
one weight for both (:func:`tie_trained_embeddings`). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vinakit.errors import ParamsError, VinakitError
from vinakit.packing import PackedCollator, PackedCorpus
from vinakit.params import CPTParams
from vinakit.record import Run, write_json

STAGE_FILE = "stage.json"
STAGES_DIR = "stages"


# --------------------------------------------------------------------------------------------------------------
# Trained embeddings
# --------------------------------------------------------------------------------------------------------------


def embeddings_tied(model: Any) -> bool:
    """Whether the model's output head shares its weight with the input embeddings (small models do)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def embeddings_tied_in_config(model: Any) -> bool:
    """Whether the model's config declares tied input and output embeddings."""
    return bool(getattr(model.config, "tie_word_embeddings", False))


def tie_trained_embeddings(model: Any) -> None:
    """Make the trained copies of ``embed_tokens`` and ``lm_head`` share one weight (a tied model stays tied).

    PEFT's ``modules_to_save`` copies each module separately, which silently unties them: the output head would
    then be trained (or merged) apart from the input embeddings.
    """
    input_copy = _trained_copy(model.get_input_embeddings())
    output_copy = _trained_copy(model.get_output_embeddings())
    if input_copy is not None and output_copy is not None:
        output_copy.weight = input_copy.weight


def _trained_copy(module: Any) -> Any | None:
    copies = getattr(module, "modules_to_save", None)
    if copies is None or not len(copies):
        return None
    return copies[next(iter(copies.keys()))]


# --------------------------------------------------------------------------------------------------------------
# Running the stages
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StagedTraining:
    """What :func:`train_stages` did.

    Attributes:
        stages: one dict per stage: name, steps, train/eval loss history, update norms after it, folder.
        metrics: the run's metrics.json content after training.
    """

    stages: list[dict[str, Any]]
    metrics: Any

    def to_frame(self) -> Any:
        import pandas as pd

        keys = ("stage", "name", "global_step", "train_loss", "eval_loss", "embedding_update_norm",
                "old_embedding_rows_update_norm", "body_update_norm", "resumed")
        from vinakit.display import format_numbers

        # losses and norms with 4 significant digits, as every table of the kit shows them
        return pd.DataFrame([format_numbers({key: stage.get(key) for key in keys}) for stage in self.stages])


def train_stages(params: CPTParams, model: Any, tokenizer: Any, packed: PackedCorpus, run: Run,
                 new_token_ids: Sequence[int] = ()) -> StagedTraining:
    """Run the stages of ``params.stages`` in order; each stage's weights are saved under ``stages/``.

    ``embedding_update_norm`` and ``body_update_norm`` in metrics.json are L2 norms of the change of the
    embedding matrices and of every other trained weight over this run.
    """
    from vinakit.train import embedding_parameter_ids

    embeddings, body = _split_trainable(model, embedding_parameter_ids)
    start = _Snapshot(embeddings, body)
    completed = completed_stages(params) if params.resume_from else []
    stages = [_resumed_record(folder, index) for index, folder in enumerate(completed, start=1)]
    for index, (name, steps) in enumerate(params.stage_plan, start=1):
        if index <= len(completed):
            continue
        record = _train_one_stage(params, model, tokenizer, packed, run, index, name, steps,
                                  embeddings, body, new_token_ids)
        record.update(start.norms(embeddings, body, new_token_ids))
        _save_stage(params, model, tokenizer, run, index, name, record)
        stages.append(record)
    _set_trainable(embeddings, True)
    _set_trainable(body, True)
    metrics = run.log_metrics(**start.norms(embeddings, body, new_token_ids), **_summary_metrics(stages, packed))
    return StagedTraining(stages, metrics)


def _split_trainable(model: Any, embedding_parameter_ids: Any) -> tuple[list[Any], list[Any]]:
    embed_ids = embedding_parameter_ids(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    embeddings = [param for param in trainable if id(param) in embed_ids]
    body = [param for param in trainable if id(param) not in embed_ids]
    if not embeddings:
        raise VinakitError("No trainable embedding weights found: CPT trains embed_tokens and lm_head as "
                           "modules_to_save; check that the model has modules named embed_tokens and lm_head.")
    return embeddings, body


def _set_trainable(params: list[Any], trainable: bool) -> None:
    for param in params:
        param.requires_grad_(trainable)


class _Snapshot:
    """A CPU copy of the trained weights at the start of the run, to measure how far they moved."""

    def __init__(self, embeddings: list[Any], body: list[Any]) -> None:
        self.embeddings = [param.detach().to("cpu", copy=True) for param in embeddings]
        self.body = [param.detach().to("cpu", copy=True) for param in body]

    def norms(self, embeddings: list[Any], body: list[Any], new_token_ids: Sequence[int]) -> dict[str, float]:
        old_rows = _old_rows_mask(self.embeddings, new_token_ids)
        return {
            "embedding_update_norm": _change_norm(self.embeddings, embeddings),
            "old_embedding_rows_update_norm": _change_norm(self.embeddings, embeddings, old_rows),
            "body_update_norm": _change_norm(self.body, body),
        }


def _old_rows_mask(snapshots: list[Any], new_token_ids: Sequence[int]) -> list[Any]:
    import torch

    masks = []
    for snapshot in snapshots:
        mask = torch.ones(snapshot.shape[0], dtype=torch.bool)
        if new_token_ids:
            mask[torch.tensor(list(new_token_ids))] = False
        masks.append(mask)
    return masks


def _change_norm(before: list[Any], after: list[Any], row_masks: list[Any] | None = None) -> float:
    total = 0.0
    for index, (old, param) in enumerate(zip(before, after)):
        change = param.detach().to("cpu").float() - old.float()
        if row_masks is not None:
            change = change[row_masks[index]]
        total += float(change.pow(2).sum())
    return math.sqrt(total)


def _train_one_stage(params: CPTParams, model: Any, tokenizer: Any, packed: PackedCorpus, run: Run, index: int,
                     name: str, steps: int, embeddings: list[Any], body: list[Any],
                     new_token_ids: Sequence[int]) -> dict[str, Any]:
    from vinakit.train import build_trainer, run_training

    _set_trainable(embeddings, True)
    _set_trainable(body, name == "full")
    hooks = _only_new_rows(embeddings, new_token_ids) if name == "new_embeddings" else []
    stage_run = _stage_run(run, index, name)
    stage_params = _stage_params(params, index, name, steps)
    try:
        trainer = build_trainer(model, tokenizer, packed.train, packed.validation, stage_params, stage_run)
        trainer.data_collator = trainer.vinakit_collator = PackedCollator(packed.isolates_documents)
        metrics = run_training(trainer, stage_params, stage_run)
        # The trainer wrapped model.forward (mixed-precision autocast); later stages, evaluation and the merge
        # check must see the model's own forward.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {"stage": index, "name": name, "folder": str(stage_run.path), "resumed": False,
            "optimizer_groups": _optimizer_groups(trainer), **dict(metrics)}


def _only_new_rows(embeddings: list[Any], new_token_ids: Sequence[int]) -> list[Any]:
    """Gradient hooks that zero every row but the new tokens' (the new_embeddings stage)."""
    import torch

    if not new_token_ids:
        raise VinakitError("Stage new_embeddings needs added tokens, but the vocabulary extension added none.")
    hooks = []
    for param in embeddings:
        mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
        mask[torch.tensor(list(new_token_ids), device=param.device)] = 1
        hooks.append(param.register_hook(lambda grad, mask=mask: grad * mask))
    return hooks


def _stage_run(run: Run, index: int, name: str) -> Run:
    folder = run.path / STAGES_DIR / f"{index:02d}-{name}"
    if folder.exists():
        raise VinakitError(f"{folder} exists: this run already trained stage {index} ({name}) and runs are never "
                           f"overwritten. Start a new run, with resume_from: {run.path} to continue after it.")
    folder.mkdir(parents=True)
    return Run(path=folder, notebook=run.notebook)


def _stage_params(params: CPTParams, index: int, name: str, steps: int) -> CPTParams:
    """The parameters one stage trains with (its step budget; its own checkpoint to resume from)."""
    changes: dict[str, Any] = {"resume_from": _partial_stage_folder(params, index, name), "group_by_length": False}
    if steps > 0:
        changes["max_steps"] = steps
    if name == "new_embeddings":
        changes["weight_decay"] = 0.0  # decay would shrink the frozen rows, which get no gradient but do get decay
    return dataclasses.replace(params, **changes)


def _partial_stage_folder(params: CPTParams, index: int, name: str) -> str:
    """The resumed run's folder of this stage when it stopped mid-way with a checkpoint, else ""."""
    if not params.resume_from:
        return ""
    folder = Path(params.resume_from).expanduser() / STAGES_DIR / f"{index:02d}-{name}"
    has_checkpoint = any((folder / "checkpoints").glob("checkpoint-*"))
    return str(folder) if has_checkpoint and not (folder / STAGE_FILE).is_file() else ""


def _optimizer_groups(trainer: Any) -> list[dict[str, Any]]:
    """Learning rate and size of each optimizer parameter group (the embedding group must be there)."""
    from vinakit.train import embedding_parameter_ids

    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return []
    embed_ids = embedding_parameter_ids(trainer.model)
    groups = []
    for group in optimizer.param_groups:
        groups.append({"lr": group.get("initial_lr", group["lr"]), "weight_decay": group.get("weight_decay"),
                       "parameters": len(group["params"]),
                       "embeddings": all(id(p) in embed_ids for p in group["params"]) and bool(group["params"])})
    return groups


def _save_stage(params: CPTParams, model: Any, tokenizer: Any, run: Run, index: int, name: str,
                record: dict[str, Any]) -> None:
    from vinakit.train import save_trained

    stage_run = Run(path=Path(record["folder"]), notebook=run.notebook)
    with quiet_embedding_save():
        save_trained(model, tokenizer, stage_run, params, name="model" if params.full_finetuning else "adapter")
    write_json(stage_run.path / STAGE_FILE, {"stage": index, "name": name, "status": "completed", **record})


@contextlib.contextmanager
def quiet_embedding_save() -> Iterator[None]:
    """PEFT warns that it saves the resized embedding layers too: expected here, so not shown.

    A notebook filters it for the whole kernel (vinakit.quiet, from start_run); this keeps it quiet where the
    stages are used without a run of a notebook (the tests, a script), with the same one pattern.
    """
    import warnings

    from vinakit.quiet import PEFT_EMBEDDING_SAVE

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_EMBEDDING_SAVE)
        yield


# --------------------------------------------------------------------------------------------------------------
# Resuming after completed stages
# --------------------------------------------------------------------------------------------------------------


def completed_stages(params: CPTParams) -> list[Path]:
    """Folders of the stages the run ``resume_from`` completed, in order.

    Raises:
        VinakitError: ``resume_from`` is not a CPT run folder.
        ParamsError: its completed stages are not the first stages of ``params.stages``, or it completed all.
    """
    root = Path(params.resume_from).expanduser()
    if not (root / STAGES_DIR).is_dir():
        raise VinakitError(f"resume_from={params.resume_from}: no {STAGES_DIR}/ folder there; give the folder of "
                           f"a CPT run.")
    done = sorted(p for p in (root / STAGES_DIR).iterdir() if (p / STAGE_FILE).is_file())
    names = [json.loads((p / STAGE_FILE).read_text(encoding="utf-8"))["name"] for p in done]
    planned = [name for name, _ in params.stage_plan]
    if names != planned[:len(names)]:
        raise ParamsError(f"resume_from={params.resume_from} completed the stages {names}, which do not start "
                          f"stages {planned}; resume with the same stages.")
    if len(names) == len(planned):
        raise ParamsError(f"resume_from={params.resume_from} already completed every stage in {planned}; add a "
                          f"stage to continue training.")
    return done


def _resumed_record(folder: Path, index: int) -> dict[str, Any]:
    record = json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))
    record.update(stage=index, resumed=True)
    return record


def load_stage_weights(model: Any, folders: list[Path], params: CPTParams) -> None:
    """Load the trained weights a completed stage saved (adapter, or the full model) into ``model``.

    Args:
        model: the model prepared for training (adapter and trained embedding copies in place).
        folders: at most one stage folder (:func:`completed_stages` ``[-1:]``); nothing happens when empty.
        params: the run's parameters (full fine-tuning or LoRA).

    Raises:
        VinakitError: no weights there, or weights that do not fit this model.
    """
    if not folders:
        return
    from safetensors.torch import load_file

    saved = folders[0] / ("model" if params.full_finetuning else "adapter")
    files = sorted(saved.glob("*.safetensors"))
    if not files:
        raise VinakitError(f"resume_from: no weights (*.safetensors) in {saved}.")
    state = {key: value for file in files for key, value in load_file(str(file)).items()}
    if params.full_finetuning:
        result = model.load_state_dict(state, strict=False)
        misfits = list(result.unexpected_keys)
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        # PEFT also saves the base embedding layers of a resized vocabulary (original_module ...): not needed here.
        misfits = [k for k in result.unexpected_keys if ".original_module." not in k and ".modules_to_save." not in k]
        misfits += [k for k in result.missing_keys if "lora_" in k or ".modules_to_save." in k]
    if misfits:
        raise VinakitError(f"resume_from: the weights in {saved} do not fit this model (e.g. {misfits[:3]}); "
                           f"resume with the same model_name, rank and target_modules.")
    if _trained_copy(model.get_input_embeddings()) is not None and embeddings_tied_in_config(model):
        tie_trained_embeddings(model)


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def _summary_metrics(stages: list[dict[str, Any]], packed: PackedCorpus) -> dict[str, Any]:
    last = stages[-1] if stages else {}
    return {
        "stages": [{key: value for key, value in stage.items() if key != "optimizer_groups"} for stage in stages],
        "train_loss": last.get("train_loss"),
        "eval_loss": last.get("eval_loss"),
        # of the training blocks (the trainer's own count mixes in the padded validation blocks)
        "nonpad_token_share": round(packed.train_blocks.nonpad_share, 4),
        "global_step": sum(int(stage.get("global_step") or 0) for stage in stages),
    }


def plot_stage_losses(training: StagedTraining, title: str = "CPT loss", model_name: str = "") -> Any:
    """Train and validation loss of every stage on one step axis, stage boundaries marked, titled with the
    model's short name."""
    import matplotlib.pyplot as plt

    from vinakit.model import display_name

    title = f"{title}: {display_name(model_name)}" if model_name else title
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for stage in training.stages:
        steps = [offset + s for s in stage.get("train_loss_steps", [])]
        ax.plot(steps, stage.get("train_loss_history", []), label=f"{stage['name']} train")
        if stage.get("eval_loss_history"):
            ax.plot([offset + s for s in stage["eval_loss_steps"]], stage["eval_loss_history"], "o--",
                    label=f"{stage['name']} validation")
        offset += int(stage.get("global_step") or 0)
        ax.axvline(offset, color="grey", alpha=0.3)
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
