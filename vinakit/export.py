"""The steps of ``notebooks/export.ipynb``: keep the adapter, merge it onto 16/32-bit weights, prove the merge is
faithful, then write GGUF files, model cards and (optionally) push to the Hugging Face Hub.

Each step is one call from the notebook, in the only order that is allowed:

1. :func:`load_source`: the adapter (or full model) and the training run it came from (:mod:`vinakit.runs`).
2. :func:`load_heldout`: held-out examples (the training run's validation split), tokenised with the training
   chat template.
3. :func:`keep_adapter`: copy the adapter into the export run folder (or merge several adapters into one with
   :func:`vinakit.merge.merge_adapters`). It is written before any merge or upload, so the work is never lost.
4. :func:`merge_to_16bit`: merge onto the original base weights reloaded in 16/32-bit, never into 4-bit weights
   (a QLoRA adapter is merged onto the 16-bit original of its base) (:mod:`vinakit.merge`). The folder gets the
   exact chat template and the generation config used in training.
5. :func:`check_fidelity`: the merged model, reloaded from disk, against the adapter on the same 16/32-bit base
   (max |logit diff|, mean KL, perplexity), next to the naive merge into 4-bit weights so the user sees why
   (:mod:`vinakit.fidelity`). Above the thresholds it raises :class:`FidelityError` and nothing can be published.
6. :func:`save_gguf`, :func:`write_cards`, :func:`publish` (:mod:`vinakit.publish`). Publishing re-checks the run
   folder on disk: the adapter must be there and the fidelity check must have passed on exactly the merged files.

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from vinakit import fidelity as fidelity_lib
from vinakit import merge as merge_lib
from vinakit import publish as publish_lib
from vinakit.device import active_profile
from vinakit.errors import ParamsError, VinakitError
from vinakit.fidelity import FIDELITY_FILE, FidelityError, FidelityReport
from vinakit.hub import Hub, HubError
from vinakit.merge import MERGED_DIR, MergedModel
from vinakit.plan import check_before_loading
from vinakit.publish import GGUF_DIR, GGUFResult, ModelCards, PublishBlockedError, PublishReport
from vinakit.record import Run, read_json, write_json
from vinakit.runs import (ADAPTER_DIR, TRAINING_INFO_FILE, TrainedRun, ValidationRows, WeightsKind, base_model_16bit,
                          find_run, folder_fingerprint, validation_rows)

__all__ = [
    "ExportSource", "FidelityError", "HeldOut", "KeptAdapter", "PublishBlockedError", "check_fidelity",
    "find_source", "keep_adapter", "load_heldout", "load_source", "merge_to_16bit", "publish", "save_gguf",
    "write_cards",
]


# --------------------------------------------------------------------------------------------------------------
# 1. The source: an adapter folder or a full model folder, and the training run around it
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSource:
    """What is exported.

    Attributes:
        trained: the weights folder and the training run around it (:func:`vinakit.runs.find_run`).
        base_model: the 16-bit base to merge onto and compare against (:func:`vinakit.runs.base_model_16bit`;
            for a full model: the model folder itself).
        extra: more adapters to merge with this one (``merge_with``).
    """

    trained: TrainedRun
    base_model: str
    extra: tuple["ExportSource", ...] = ()

    @property
    def path(self) -> Path:
        """The adapter folder or the full model folder."""
        return self.trained.weights_dir

    @property
    def kind(self) -> WeightsKind:
        return self.trained.kind

    @property
    def run_dir(self) -> Path | None:
        return self.trained.run_dir

    @property
    def training(self) -> dict[str, Any]:
        """``vinakit_training.json`` of the folder ({} when absent)."""
        return dict(self.trained.training)

    @property
    def training_params(self) -> dict[str, Any]:
        """The training run's resolved ``params.yaml`` ({} without a run folder)."""
        return dict(self.trained.params)

    @property
    def training_manifest(self) -> dict[str, Any]:
        """The training run's ``manifest.json`` ({} without a run folder)."""
        return dict(self.trained.manifest)

    @property
    def trained_in_4bit(self) -> bool:
        """Whether the adapter was trained on a 4-bit base (QLoRA)."""
        return self.trained.trained_in_4bit

    def describe(self) -> Any:
        """A one-column table for the notebook."""
        import pandas as pd

        rows = {
            "source": str(self.path),
            "kind": "LoRA adapter" if self.kind == "lora" else "full model (nothing to merge)",
            "base model (16-bit, merged onto)": self.base_model,
            "trained in 4-bit (QLoRA)": self.trained_in_4bit,
            "training run": str(self.run_dir) if self.run_dir else "(none found)",
            "chat template": self.training.get("chat_template_name", "tokenizer's own"),
            "merge with": ", ".join(str(s.path) for s in self.extra) or "-",
        }
        return pd.DataFrame({"value": list(rows.values())}, index=list(rows))


def find_source(spec: str, output_dir: str | os.PathLike[str] = "outputs") -> ExportSource:
    """Resolve the ``adapter`` parameter (see :func:`vinakit.runs.find_run`) and its 16-bit base.

    Raises:
        VinakitError: nothing exportable was found, or the 16-bit base is gone or quantized.
    """
    trained = find_run(spec, output_dir)
    return ExportSource(trained, base_model_16bit(trained))


def load_source(params: Any, run: Run) -> ExportSource:
    """Find what to export (and what to merge it with), check the eval run, and record it all in the manifest.

    Args:
        params: ``ExportParams``.
        run: the export run.
    """
    from vinakit.model import set_trust_remote_code

    set_trust_remote_code(params.trust_remote_code)  # the merge and the fidelity check load the base again
    if params.backend == "unsloth" and active_profile().is_gpu:
        from vinakit.model import import_unsloth

        import_unsloth()  # Unsloth patches transformers and PEFT, so it must come before the steps import them
    source = find_source(params.adapter, params.output_dir)
    extra = tuple(find_source(spec, params.output_dir) for spec in params.merge_with)
    if extra and (source.kind != "lora" or any(other.kind != "lora" for other in extra)):
        raise ParamsError("merge_with merges LoRA adapters; one of the folders is a full model.")
    if params.eval_run and not (Path(params.eval_run).expanduser() / "metrics.json").is_file():
        raise ParamsError(f"eval_run={params.eval_run!r} has no metrics.json: give the folder of an eval_mcq run, "
                          f"or leave eval_run empty.")
    source = replace(source, extra=extra)
    run.update_manifest(source={
        "path": str(source.path), "kind": source.kind, "base_model": source.base_model,
        "training_run": str(source.run_dir) if source.run_dir else None,
        "trained_in_4bit": source.trained_in_4bit, "weights_sha256": folder_fingerprint(source.path),
        "merge_with": [str(other.path) for other in extra],
    })
    check_before_loading(params, run)  # records the estimate, warns if it will not fit
    return source


# --------------------------------------------------------------------------------------------------------------
# 2. Held-out examples
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Held-out examples for the fidelity check, tokenised with the training template.

    Attributes:
        examples: ``{"input_ids", "labels"}`` dicts (labels -100 where training did not train).
        rows: the raw rows (chat ``{"messages"}`` rows or text documents), for the template check.
        kind: "chat" or "text".
        description: where they came from.
    """

    examples: list[dict[str, list[int]]]
    rows: list[Any]
    kind: Literal["chat", "text"]
    description: str

    def summary(self) -> str:
        tokens = sum(len(example["input_ids"]) for example in self.examples)
        return f"{len(self.examples)} held-out examples, {tokens} tokens: {self.description}"


def load_heldout(source: ExportSource, params: Any, run: Run) -> HeldOut:
    """Held-out data tokenised with the source's tokenizer and the training run's ``train_on``.

    With ``fidelity_dataset`` empty this re-creates the training run's validation split exactly (same loader,
    cleaning and seed; for a CPT run the same validation documents), see :func:`vinakit.runs.validation_rows`.

    Raises:
        VinakitError: no training run to take data from and no ``fidelity_dataset``; or no row fits.
    """
    if params.fidelity_dataset:
        from vinakit.data import load_chat_dataset

        count = params.fidelity_rows
        data = load_chat_dataset(params.fidelity_dataset, skip_bad_rows=params.skip_bad_rows,
                                 normalize=params.normalize_text, tone_style=params.tone_style, limit=count)
        held = ValidationRows(data.train[:count], "chat", f"{params.fidelity_dataset}, first {count} rows")
    else:
        held = validation_rows(source.trained, params.fidelity_rows)
    tokenizer = merge_lib.adapter_tokenizer(source.path, source.base_model, source.training)
    examples = fidelity_lib.tokenize_examples(tokenizer, held.rows, held.kind, params.fidelity_max_tokens,
                                              source.training_params.get("train_on") or "assistant")
    if not examples:
        raise VinakitError(f"None of the held-out rows ({held.description}) has a trained token: check the data or "
                           f"set fidelity_dataset.")
    heldout = HeldOut(examples, held.rows, held.kind, held.description)
    run.update_manifest(heldout={"description": held.description, "examples": len(examples),
                                 "tokens": sum(len(e["input_ids"]) for e in examples)})
    return heldout


# --------------------------------------------------------------------------------------------------------------
# 3. Keeping the adapter (and merging several adapters into one)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class KeptAdapter:
    """The adapter as kept in the export run folder.

    Attributes:
        path: ``<run>/adapter`` (for a full model: the model folder itself, which is not copied).
        source: the source it came from (the first one when several adapters were merged).
        comparison: the eval table of :func:`vinakit.merge.merge_adapters` when adapters were merged, else None.
    """

    path: Path
    source: ExportSource
    comparison: Any = None

    @property
    def kind(self) -> WeightsKind:
        return self.source.kind

    @property
    def base_model(self) -> str:
        return self.source.base_model

    @property
    def lora_dir(self) -> Path | None:
        """The adapter folder to put on the base; None for a full model."""
        return self.path if self.kind == "lora" else None

    @property
    def model_name(self) -> str:
        """What to load: the 16-bit base of an adapter, or the full model folder."""
        return self.base_model if self.kind == "lora" else str(self.path)

    def tokenizer(self) -> Any:
        return merge_lib.adapter_tokenizer(self.path, self.base_model, self.training)

    @property
    def training(self) -> dict[str, Any]:
        return read_json(self.path / TRAINING_INFO_FILE) or self.source.training

    def comparison_table(self) -> Any:
        """The merge comparison, or a one-line table saying one adapter was kept as trained."""
        import pandas as pd

        if self.comparison is not None:
            return self.comparison
        return pd.DataFrame({"note": ["one adapter, kept as trained (nothing merged)"]})

    def describe(self) -> Any:
        import pandas as pd

        files = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        return pd.DataFrame({"value": [str(self.path), ", ".join(files)]}, index=["kept at", "files"])


def keep_adapter(source: ExportSource, heldout: HeldOut, params: Any, run: Run) -> KeptAdapter:
    """Write the adapter into ``<run>/adapter`` before anything else happens to it.

    One adapter is copied as is (with its tokenizer, chat template and training info). With ``merge_with``, the
    adapters are merged into one (:func:`vinakit.merge.merge_adapters`) and the comparison table is returned.
    """
    target = run.path / ADAPTER_DIR
    if source.kind == "full":
        run.update_manifest(adapter={"path": str(source.path), "note": "full model: nothing to keep separately"})
        return KeptAdapter(source.path, source)
    comparison = None
    if source.extra:
        merged = merge_lib.merge_adapters(
            [source.path, *(other.path for other in source.extra)], target, weights=params.merge_weights or None,
            method=params.merge_method, density=params.merge_density,
            evaluate=fidelity_lib.perplexity_hook(heldout.examples))
        comparison = merged.table
    else:
        shutil.copytree(source.path, target)
    run.update_manifest(adapter={"path": str(target), "weights_sha256": folder_fingerprint(target),
                                 "merged_from": [str(source.path), *(str(o.path) for o in source.extra)]})
    return KeptAdapter(target, source, comparison)


# --------------------------------------------------------------------------------------------------------------
# 4. Merging onto 16/32-bit weights
# --------------------------------------------------------------------------------------------------------------


def merge_to_16bit(kept: KeptAdapter, params: Any, run: Run) -> MergedModel:
    """Merge the kept adapter onto the original 16-bit base weights (never 4-bit) in ``merged_dtype`` and save it
    with the exact chat template, the generation config used in training and the training info.

    Raises:
        VinakitError: the adapter was not kept first (see :func:`keep_adapter`).
    """
    if not kept.path.is_dir():
        raise VinakitError(f"The adapter must be kept before merging, and {kept.path} does not exist: call "
                           f"keep_adapter first.")
    output = run.path / MERGED_DIR
    dtype = merge_lib.saved_dtype_name(kept.model_name, params.merged_dtype)
    tokenizer = kept.tokenizer()
    start = time.perf_counter()
    if _unsloth_merges(kept, params):
        method = merge_lib.merge_with_unsloth(kept.path, output, max_seq_length=params.max_seq_length,
                                              load_in_4bit=kept.source.trained_in_4bit, saved_dtype=dtype)
    else:
        method = merge_lib.merge_to_folder(kept.model_name, kept.lora_dir, tokenizer, output, saved_dtype=dtype)
    tokenizer.save_pretrained(output)
    merge_lib.write_generation_config(output, tokenizer)
    write_json(output / TRAINING_INFO_FILE, dict(kept.training, exported_from=str(kept.path), merged_by=method,
                                                 merged_dtype=dtype))
    merged = MergedModel(output, dtype, method, time.perf_counter() - start)
    run.update_manifest(merged={"path": str(output), "dtype": dtype, "merged_by": method,
                                "seconds": round(merged.seconds, 2)})
    return merged


def _unsloth_merges(kept: KeptAdapter, params: Any) -> bool:
    """Unsloth merges on a GPU when the adapter's recorded base is a Hub model: it finds that model's 16-bit
    original by name and reads it shard by shard. A local base folder may be the 4-bit copy itself, so a local
    base is merged with PEFT onto :func:`vinakit.runs.base_model_16bit`."""
    from vinakit.families import unsloth_refusal

    recorded = kept.source.trained.adapter_base
    return (params.backend == "unsloth" and active_profile().is_gpu and kept.kind == "lora"
            and bool(recorded) and not Path(recorded).expanduser().is_dir() and unsloth_refusal(recorded) is None)


# --------------------------------------------------------------------------------------------------------------
# 5. Fidelity
# --------------------------------------------------------------------------------------------------------------


def check_fidelity(kept: KeptAdapter, merged: MergedModel, heldout: HeldOut, params: Any, run: Run
                   ) -> FidelityReport:
    """Compare the merged model (reloaded from disk) with the adapter model on held-out data.

    The reference is the adapter applied, unmerged, to the same 16-bit base weights. Also measured, for
    comparison only: the adapter on the base loaded in 4-bit (how QLoRA trained) and the naive merge into those
    4-bit weights. One model is loaded at a time. metrics.json gets ``merge_max_abs_logit_diff``,
    ``merge_mean_kl``, ``merge_perplexity``, ``adapter_perplexity``, ``naive_4bit_*``, ``qlora_4bit_*`` and
    ``fidelity_passed``; ``fidelity.json`` records the fingerprint of the checked files for publishing.

    Raises:
        FidelityError: a threshold (``max_logit_diff``, ``max_kl``) or a template check failed. The report is
            written to the run folder first.
    """
    from vinakit.merge import load_adapter_model

    dtype = fidelity_lib.check_dtype(kept.model_name, merged.dtype)
    tokenizer = kept.tokenizer()
    load = partial(load_adapter_model, kept.model_name, kept.lora_dir, tokenizer, dtype=dtype)
    candidates = fidelity_lib.Candidates(
        reference=load, exported=partial(load_adapter_model, str(merged.path), None, None, dtype=dtype),
        four_bit=partial(load, load_in_4bit=True) if params.compare_naive_4bit else None,
        four_bit_is_adapter=kept.kind == "lora")
    rows, note = fidelity_lib.measure(candidates, heldout.examples)
    checks = fidelity_lib.template_checks(tokenizer, merged.path, heldout.rows, heldout.kind)
    report = fidelity_lib.fidelity_report(rows, checks, max_logit_diff=params.max_logit_diff, max_kl=params.max_kl,
                                          note=note)
    fidelity_lib.record_fidelity(report, run, adapter_dir=kept.path, source_kind=kept.kind, merged_dir=merged.path)
    if not report.passed:
        raise FidelityError("The merged model does not behave like the adapter model, so nothing will be published: "
                            + "; ".join(report.problems) + f". The adapter is safe in {kept.path}; the fidelity "
                            f"table is in {run.path / FIDELITY_FILE}. If the differences are only 16-bit rounding "
                            f"(mean KL tiny), set merged_dtype: float32 or raise max_logit_diff/max_kl.")
    return report


# --------------------------------------------------------------------------------------------------------------
# 6. GGUF, model cards, publishing
# --------------------------------------------------------------------------------------------------------------


def save_gguf(merged: MergedModel, params: Any, run: Run) -> GGUFResult:
    """GGUF files of the merged model through llama.cpp, when ``gguf`` is in ``save_methods`` and llama.cpp is
    installed; otherwise a message saying how to build it, and the merged folder as the export."""
    if "gguf" not in params.save_methods:
        result = GGUFResult("skipped", "GGUF not requested (add gguf to save_methods).")
    else:
        name = (params.repo_id.split("/")[-1] if params.repo_id else merged.path.parent.name) or "model"
        result = publish_lib.write_gguf(merged.path, run.path / GGUF_DIR, params.gguf_quantizations, name=name,
                                        dtype=merged.dtype)
    print(result.message)
    run.update_manifest(gguf={"status": result.status, "message": result.message, "files": result.files})
    return result


def write_cards(kept: KeptAdapter, merged: MergedModel, gguf: GGUFResult, fidelity: FidelityReport, params: Any,
                run: Run) -> ModelCards:
    """Write a Vietnamese + English model card into every exported folder (adapter, merged, gguf)."""
    folders = {"lora": kept.path, "merged_16bit": merged.path}
    if gguf.status == "written" and gguf.folder:
        folders["gguf"] = gguf.folder
    if kept.kind == "full":
        folders.pop("lora")  # a full model has no adapter of its own to describe
    # The base as the user named it in training (unsloth/Llama-3.2-1B-Instruct, tiny-vi), not the 4-bit copy.
    facts = {"base_model": kept.source.trained.model_name or kept.base_model, "training": kept.training,
             "training_params": kept.source.training_params,
             "training_data": kept.source.training_manifest.get("data", {}), "fidelity": fidelity.metrics}
    cards = publish_lib.write_model_cards(folders, facts, params, gguf.files)
    run.update_manifest(model_cards={kind: str(path) for kind, path in cards.paths.items()})
    return cards


def publish(params: Any, run: Run, hub: Hub | None = None) -> PublishReport:
    """Push the export to the Hub when ``push_to_hub`` is true (private by default), after re-checking the gate.

    The token comes from ``HF_TOKEN`` or Colab secrets only. A failed upload changes no local file; the error says
    what to do and how to retry the upload alone (:func:`vinakit.publish.publish_run`).

    Raises:
        PublishBlockedError: the adapter is missing or the fidelity check did not pass on these files.
        HubError: no token, no network, or the Hub refused (the manifest records the failure first).
    """
    if not params.push_to_hub:
        report = PublishReport("skipped", f"push_to_hub is false: nothing was uploaded; the export is in {run.path}.")
        run.update_manifest(hub=report.to_dict())
        return report
    try:
        report = publish_lib.publish_run(run.path, params.repo_id, methods=params.save_methods,
                                         private=params.private, hub=hub)
    except (HubError, PublishBlockedError) as error:
        run.update_manifest(hub={"status": "failed", "error": str(error)})
        run.finish(status="upload_failed")
        raise
    run.update_manifest(hub=report.to_dict())
    return report
