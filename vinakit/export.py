"""Export a fine-tune: keep the adapter, merge it onto 16/32-bit weights, prove the merge is faithful, then
write GGUF files, model cards and (optionally) push to the Hugging Face Hub.

The steps, each one call from ``notebooks/export.ipynb``, in the only order that is allowed:

1. :func:`load_source`: the adapter (or full model) and the training run it came from.
2. :func:`load_heldout`: held-out examples (the training run's validation split), tokenised with the training
   chat template.
3. :func:`keep_adapter`: copy the adapter into the export run folder (or merge several adapters into one with
   :func:`merge_adapters`). It is written before any merge or upload, so the work is never lost.
4. :func:`merge_to_16bit`: merge onto the original base weights reloaded in 16/32-bit, never into 4-bit weights
   (a QLoRA adapter is merged onto the original base). On a GPU with the Unsloth backend this is Unsloth's
   ``save_pretrained_merged(..., "merged_16bit")``; elsewhere the kit merges with PEFT in float32. The folder
   gets the exact chat template and the generation config used in training.
5. :func:`check_fidelity`: the merged model, reloaded from disk, against the adapter on the same 16/32-bit base
   (max |logit diff|, mean KL, perplexity), next to the naive merge into 4-bit weights so the user sees why.
   Above the thresholds it raises :class:`FidelityError` and nothing can be published.
6. :func:`save_gguf`, :func:`write_cards`, :func:`publish`. Publishing re-checks the run folder on disk: the
   adapter must be there and the fidelity check must have passed on exactly the merged files being uploaded.

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

from vinakit.errors import DataError, ParamsError, VinakitError
from vinakit.hub import Hub, HubAuthError, HubError, PushedRepo, default_hub, find_token, push_folder, what_to_do
from vinakit.record import Run, write_json

SAVE_METHODS = ("lora", "merged_16bit", "gguf")
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged_16bit"
GGUF_DIR = "gguf"
FIDELITY_FILE = "fidelity.json"
TRAINING_INFO_FILE = "vinakit_training.json"  # the name vinakit.train.save_trained writes
WEIGHT_SUFFIXES = (".safetensors", ".bin")
LLAMA_CPP_ENV_VAR = "UNSLOTH_LLAMA_CPP_PATH"  # Unsloth's own variable, so both look in the same place

SourceKind = Literal["lora", "full"]
Evaluate = Callable[[Any, Any], Mapping[str, float]]


class FidelityError(VinakitError):
    """The merged model does not behave like the adapter model; nothing may be published."""


class PublishBlockedError(VinakitError):
    """Publishing was refused: the adapter is not saved or the fidelity check did not pass on these files."""


# --------------------------------------------------------------------------------------------------------------
# 1. The source: an adapter folder or a full model folder, and the training run around it
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSource:
    """What is exported.

    Attributes:
        path: the adapter folder (``adapter_config.json``) or the full model folder (``config.json``).
        kind: "lora" or "full" (a full fine-tune or a CPT model: nothing to merge).
        base_model: the base model folder or Hub id (for "full": the model folder itself).
        training: ``vinakit_training.json`` of the folder ({} when absent).
        run_dir: the training run folder (with ``params.yaml``), or None when the folder stands alone.
        extra: more adapters to merge with this one (``merge_with``).
    """

    path: Path
    kind: SourceKind
    base_model: str
    training: Mapping[str, Any]
    run_dir: Path | None
    extra: tuple["ExportSource", ...] = ()

    @property
    def training_params(self) -> dict[str, Any]:
        """The training run's resolved ``params.yaml`` ({} without a run folder)."""
        path = self.run_dir / "params.yaml" if self.run_dir else None
        if path is None or not path.is_file():
            return {}
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}

    @property
    def training_manifest(self) -> dict[str, Any]:
        """The training run's ``manifest.json`` ({} without a run folder)."""
        path = self.run_dir / "manifest.json" if self.run_dir else None
        return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}

    @property
    def trained_in_4bit(self) -> bool:
        """Whether the adapter was trained on a 4-bit base (QLoRA)."""
        return bool(self.training.get("load_in_4bit", self.training_params.get("load_in_4bit", False)))

    def describe(self) -> Any:
        """A one-column table for the notebook."""
        import pandas as pd

        rows = {
            "source": str(self.path),
            "kind": "LoRA adapter" if self.kind == "lora" else "full model (nothing to merge)",
            "base model": self.base_model,
            "trained in 4-bit (QLoRA)": self.trained_in_4bit,
            "training run": str(self.run_dir) if self.run_dir else "(none found)",
            "chat template": self.training.get("chat_template_name", "tokenizer's own"),
            "merge with": ", ".join(str(s.path) for s in self.extra) or "-",
        }
        return pd.DataFrame({"value": list(rows.values())}, index=list(rows))


def find_source(spec: str, output_dir: str | os.PathLike[str] = "outputs") -> ExportSource:
    """Resolve the ``adapter`` parameter to an :class:`ExportSource`.

    Args:
        spec: a training run folder (``outputs/sft-...``), its ``adapter/`` (or ``model/``) folder, any PEFT
            adapter folder or full model folder; empty: the newest training run in ``output_dir``.
        output_dir: where runs are looked for when ``spec`` is empty.

    Raises:
        VinakitError: nothing exportable was found, or the adapter's base model is gone.
    """
    folder = Path(spec).expanduser() if spec else _newest_trained_run(Path(output_dir).expanduser())
    if not folder.exists():
        raise VinakitError(f"adapter={spec!r} does not exist. Give a training run folder (outputs/sft-...) or "
                           f"its adapter/ folder.")
    model_dir, run_dir = _model_folder(folder)
    training = _read_json(model_dir / TRAINING_INFO_FILE)
    if (model_dir / "adapter_config.json").is_file():
        return ExportSource(model_dir.resolve(), "lora", _adapter_base(model_dir), training, run_dir)
    return ExportSource(model_dir.resolve(), "full", str(model_dir.resolve()), training, run_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as error:
        raise VinakitError(f"{path} is not valid JSON: {error}") from error


def _newest_trained_run(output_dir: Path) -> Path:
    """The most recently saved training run (not an export run) in ``output_dir``."""
    candidates = []
    if output_dir.is_dir():
        for run_dir in output_dir.iterdir():
            if not run_dir.is_dir() or _read_json(run_dir / "manifest.json").get("notebook") == "export":
                continue
            for name in (ADAPTER_DIR, "model"):
                if (run_dir / name / "adapter_config.json").is_file() or (run_dir / name / "config.json").is_file():
                    candidates.append(run_dir / name)
    if not candidates:
        raise VinakitError(f"No training run with an adapter/ or model/ folder in {output_dir}: run the SFT (or "
                           f"CPT) notebook first, or set adapter to the folder to export.")
    return max(candidates, key=lambda path: path.stat().st_mtime).parent


def _model_folder(folder: Path) -> tuple[Path, Path | None]:
    """(the adapter or model folder, the training run folder around it or None)."""
    for candidate, run_dir in ((folder, folder.parent), (folder / ADAPTER_DIR, folder), (folder / "model", folder)):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            run = run_dir if (run_dir / "params.yaml").is_file() else None
            return candidate, run.resolve() if run else None
    raise VinakitError(f"{folder} holds no adapter (adapter_config.json) or model (config.json), nor an adapter/ or "
                       f"model/ folder. Give a training run folder or the adapter folder itself.")


def _adapter_base(adapter_dir: Path) -> str:
    from vinakit.model import adapter_base_model, resolve_model_name

    base = adapter_base_model(adapter_dir)
    if Path(base).is_absolute() and not Path(base).is_dir():
        raise VinakitError(f"The adapter in {adapter_dir} was trained on the base model folder {base}, which no "
                           f"longer exists (a cleared cache, or another machine). Put the base model back there, "
                           f"or retrain the adapter.")
    return resolve_model_name(base)


def load_source(params: Any, run: Run) -> ExportSource:
    """Find what to export (and what to merge it with), check the eval run, and record it all in the manifest.

    Args:
        params: ``ExportParams``.
        run: the export run.
    """
    if _use_unsloth(params):
        from vinakit.model import _import_unsloth

        _import_unsloth()  # Unsloth patches transformers and PEFT, so it must come before the steps import them
    source = find_source(params.adapter, params.output_dir)
    extra = tuple(find_source(spec, params.output_dir) for spec in params.merge_with)
    if extra and (source.kind != "lora" or any(other.kind != "lora" for other in extra)):
        raise ParamsError("merge_with merges LoRA adapters; one of the folders is a full model.")
    if params.eval_run and not (Path(params.eval_run).expanduser() / "metrics.json").is_file():
        raise ParamsError(f"eval_run={params.eval_run!r} has no metrics.json: give the folder of an eval_mcq run, "
                          f"or leave eval_run empty.")
    source = ExportSource(source.path, source.kind, source.base_model, source.training, source.run_dir, extra)
    run.update_manifest(source={
        "path": str(source.path), "kind": source.kind, "base_model": source.base_model,
        "training_run": str(source.run_dir) if source.run_dir else None,
        "trained_in_4bit": source.trained_in_4bit, "weights_sha256": folder_fingerprint(source.path),
        "merge_with": [str(other.path) for other in extra],
    })
    return source


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over the names and contents of a folder's weight files (safetensors/bin)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            digest.update(str(path.relative_to(folder)).encode("utf-8"))
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def source_tokenizer(folder: Path, base_model: str, training: Mapping[str, Any]) -> Any:
    """The tokenizer saved with the adapter (it carries the training chat template), else the base's with the
    template recorded in ``vinakit_training.json``."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if training.get("chat_template"):
        tokenizer.chat_template = training["chat_template"]
    return tokenizer


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
    seed and cleaning); a raw-text (CPT) run gives the last documents of its corpus.

    Raises:
        VinakitError: no training run to take data from and no ``fidelity_dataset``; or no row fits.
    """
    rows, kind, description = _heldout_rows(source, params)
    tokenizer = source_tokenizer(source.path, source.base_model, source.training)
    examples = _tokenize_heldout(tokenizer, rows, kind, params.fidelity_max_tokens,
                                 source.training_params.get("train_on") or "assistant")
    if not examples:
        raise VinakitError(f"None of the held-out rows ({description}) has a trained token: check the data or set "
                           f"fidelity_dataset.")
    heldout = HeldOut(examples, rows, kind, description)
    run.update_manifest(heldout={"description": description, "examples": len(examples),
                                 "tokens": sum(len(e["input_ids"]) for e in examples)})
    return heldout


def _heldout_rows(source: ExportSource, params: Any) -> tuple[list[Any], Literal["chat", "text"], str]:
    from vinakit.data import load_chat_dataset

    count = params.fidelity_rows
    if params.fidelity_dataset:
        data = load_chat_dataset(params.fidelity_dataset, skip_bad_rows=params.skip_bad_rows,
                                 normalize=params.normalize_text, tone_style=params.tone_style, limit=count)
        return data.train[:count], "chat", f"{params.fidelity_dataset}, first {count} rows"
    training = source.training_params
    if not training.get("dataset"):
        raise VinakitError(f"{source.path} has no training run folder with params.yaml next to it, so its "
                           f"validation split is unknown: set fidelity_dataset to a held-out chat file.")
    if _training_notebook(source) == "sft":
        return _sft_validation(source, count)
    return _corpus_tail(source, count)


def _training_notebook(source: ExportSource) -> str:
    notebook = source.training_manifest.get("notebook")
    if notebook:
        return str(notebook)
    return "sft" if "train_on" in source.training_params else "cpt"


def _sft_validation(source: ExportSource, count: int) -> tuple[list[Any], Literal["chat"], str]:
    from vinakit.params import SFTParams
    from vinakit.sft import read_data

    known = SFTParams.field_types()
    params = SFTParams.validate({k: v for k, v in source.training_params.items() if k in known})
    validation = read_data(params).validation
    if not validation:
        raise VinakitError(f"The training run {source.run_dir} had no validation split (val_size 0): set "
                           f"fidelity_dataset to a held-out chat file.")
    return validation[:count], "chat", (f"validation split of {source.run_dir.name if source.run_dir else '?'} "
                                        f"({len(validation)} rows, seed {params.seed}), first {count}")


def _corpus_tail(source: ExportSource, count: int) -> tuple[list[Any], Literal["text"], str]:
    from vinakit.data import load_text_corpus

    training = source.training_params
    try:
        documents, _ = load_text_corpus(training["dataset"], text_field=training.get("text_field") or "text",
                                        normalize=training.get("normalize_text", True),
                                        tone_style=training.get("tone_style", "old"))
    except DataError as error:
        raise VinakitError(f"Could not re-read the training corpus {training['dataset']!r} ({error}): set "
                           f"fidelity_dataset to a held-out chat file.") from error
    return documents[-count:], "text", f"last {count} documents of {training['dataset']}"


def _tokenize_heldout(tokenizer: Any, rows: list[Any], kind: str, max_tokens: int, train_on: str
                      ) -> list[dict[str, list[int]]]:
    if kind == "text":
        examples = []
        for document in rows:
            ids = tokenizer(document, add_special_tokens=True)["input_ids"][:max_tokens]
            if len(ids) > 1:
                examples.append({"input_ids": ids, "labels": list(ids)})
        return examples
    from vinakit.chat import tokenize_rows

    # Long rows keep their end: the response is what was trained, and both models see the same cut input.
    kept, _ = tokenize_rows(tokenizer, rows, None, train_on)
    return [{"input_ids": row["input_ids"][-max_tokens:], "labels": row["labels"][-max_tokens:]} for row in kept]


# --------------------------------------------------------------------------------------------------------------
# 3. Keeping the adapter (and merging several adapters into one)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class KeptAdapter:
    """The adapter as kept in the export run folder.

    Attributes:
        path: ``<run>/adapter`` (for a full model: the model folder itself, which is not copied).
        source: the source it came from (the first one when several adapters were merged).
        comparison: the eval table of :func:`merge_adapters` when adapters were merged, else None.
    """

    path: Path
    source: ExportSource
    comparison: Any = None

    @property
    def kind(self) -> SourceKind:
        return self.source.kind

    @property
    def base_model(self) -> str:
        return self.source.base_model

    def tokenizer(self) -> Any:
        return source_tokenizer(self.path, self.base_model, self.training)

    @property
    def training(self) -> dict[str, Any]:
        return _read_json(self.path / TRAINING_INFO_FILE) or dict(self.source.training)

    def comparison_table(self) -> Any:
        """The :func:`merge_adapters` comparison, or a one-line table saying one adapter was kept as trained."""
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
    adapters are merged into one (:func:`merge_adapters`) and the comparison table is returned with it.
    """
    target = run.path / ADAPTER_DIR
    if source.kind == "full":
        run.update_manifest(adapter={"path": str(source.path), "note": "full model: nothing to keep separately"})
        return KeptAdapter(source.path, source)
    comparison = None
    if source.extra:
        merged = merge_adapters([source.path, *(other.path for other in source.extra)], target,
                                weights=params.merge_weights or None, method=params.merge_method,
                                density=params.merge_density, evaluate=perplexity_hook(heldout.examples))
        comparison = merged.table
    else:
        shutil.copytree(source.path, target)
    run.update_manifest(adapter={"path": str(target), "weights_sha256": folder_fingerprint(target),
                                 "merged_from": [str(source.path), *(str(o.path) for o in source.extra)]})
    return KeptAdapter(target, source, comparison)


@dataclass
class MergedAdapters:
    """Result of :func:`merge_adapters`: the new adapter folder and the eval comparison (or None)."""

    path: Path
    table: Any = None


def merge_adapters(adapter_dirs: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str], *,
                   weights: Sequence[float] | None = None, method: Literal["linear", "ties"] = "linear",
                   density: float = 0.5, evaluate: Evaluate | None = None) -> MergedAdapters:
    """Merge several LoRA adapters of the same base into one adapter (as VinaSmol merges its chat, multi-turn
    and instruction LoRAs).

    ``linear`` is the exact weighted sum of the adapters' weight deltas (PEFT's ``cat`` combination: the merged
    rank is the sum of the ranks). ``ties`` applies TIES-merging to the deltas (keep the ``density`` share of
    largest entries of each, elect a sign per entry, average the agreeing ones) and stores the result as a LoRA
    of rank = the sum of the ranks through an SVD (PEFT's ``ties_svd``).

    Args:
        adapter_dirs: two or more adapter folders trained on the same base model with the same chat template.
        output_dir: where the merged adapter goes (created; must not exist).
        weights: one weight per adapter; default equal weights summing to 1.
        method: "linear" or "ties".
        density: TIES only: share of each delta's entries kept, in (0, 1].
        evaluate: optional hook ``(model, tokenizer) -> {metric: value}`` run on every input adapter and on the
            merged one; the results form the returned table.

    Returns:
        The merged adapter folder (adapter, tokenizer with the chat template, training info) and the table.

    Raises:
        ParamsError: fewer than two adapters, different bases or templates, DoRA or ``modules_to_save``
            adapters, wrong number of weights.
    """
    import torch
    from peft import PeftModel

    from vinakit.model import load_model

    dirs = [Path(d).expanduser() for d in adapter_dirs]
    weights = _merge_weights(dirs, weights)
    base = _common_base(dirs)
    tokenizer = _common_tokenizer(dirs, base)
    model, _ = load_model(base, backend="hf", dtype=torch.float32)
    _fit_vocab(model, tokenizer)
    names = [f"adapter_{i}" for i in range(len(dirs))]
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.eval()
    rows = []
    for name, folder in zip(names, dirs):
        rows.append(_evaluated(peft_model, tokenizer, name, _adapter_label(folder), evaluate))
    ranks = sum(peft_model.peft_config[name].r for name in names)
    peft_model.add_weighted_adapter(
        names, list(weights), "merged", combination_type="cat" if method == "linear" else "ties_svd",
        svd_rank=ranks if method == "ties" else None, density=density if method == "ties" else None,
        svd_full_matrices=False)
    _use_unit_scaling(peft_model, "merged")
    rows.append(_evaluated(peft_model, tokenizer, "merged", f"merged ({method})", evaluate))
    output = Path(output_dir)
    _save_single_adapter(peft_model, "merged", output)
    tokenizer.save_pretrained(output)
    info = _read_json(dirs[0] / TRAINING_INFO_FILE)
    info.update(merged_from=[str(d) for d in dirs], merge_method=method, merge_weights=list(weights),
                merge_density=density if method == "ties" else None)
    (output / TRAINING_INFO_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return MergedAdapters(output, _comparison_table(rows) if evaluate else None)


def _merge_weights(dirs: list[Path], weights: Sequence[float] | None) -> list[float]:
    if len(dirs) < 2:
        raise ParamsError(f"merge_adapters needs at least two adapters, got {len(dirs)}.")
    if weights is None:
        return [1.0 / len(dirs)] * len(dirs)
    if len(weights) != len(dirs):
        raise ParamsError(f"merge_adapters: {len(dirs)} adapters but {len(weights)} weights.")
    return [float(w) for w in weights]


def _common_base(dirs: list[Path]) -> str:
    bases = {}
    for folder in dirs:
        if not (folder / "adapter_config.json").is_file():
            raise ParamsError(f"{folder} is not a LoRA adapter folder (no adapter_config.json).")
        config = _read_json(folder / "adapter_config.json")
        if config.get("use_dora"):
            raise ParamsError(f"{folder} is a DoRA adapter: merge_adapters merges plain LoRA adapters only.")
        if config.get("modules_to_save"):
            raise ParamsError(f"{folder} trains whole modules ({config['modules_to_save']}), which cannot be "
                              f"weight-merged with other adapters; merge the LoRA-only adapters.")
        base = _adapter_base(folder)
        bases[folder] = str(Path(base).resolve()) if Path(base).exists() else base
    if len(set(bases.values())) != 1:
        listing = "; ".join(f"{folder}: {base}" for folder, base in bases.items())
        raise ParamsError(f"Adapters can only be merged when they share a base model, got {listing}.")
    return next(iter(bases.values()))


def _common_tokenizer(dirs: list[Path], base: str) -> Any:
    tokenizers = [source_tokenizer(d, base, _read_json(d / TRAINING_INFO_FILE)) for d in dirs]
    templates = {getattr(t, "chat_template", None) for t in tokenizers}
    if len(templates) != 1:
        raise ParamsError("The adapters were trained with different chat templates; a merged adapter would not "
                          "know which one to answer in. Merge adapters trained with the same template.")
    return tokenizers[0]


def _adapter_label(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}" if folder.name == ADAPTER_DIR else folder.name


def _evaluated(model: Any, tokenizer: Any, name: str, label: str, evaluate: Evaluate | None) -> dict[str, Any]:
    if evaluate is None:
        return {"adapter": label}
    model.set_adapter(name)
    return {"adapter": label, **evaluate(model, tokenizer)}


def _use_unit_scaling(peft_model: Any, name: str) -> None:
    """PEFT folds each adapter's scale into the merged A (``cat``) or delta (``svd``), so the merged adapter must
    scale by exactly 1; its config is copied from the first adapter, whose rsLoRA flag would scale by sqrt(r)."""
    config = peft_model.peft_config[name]
    config.use_rslora = False
    config.lora_alpha = config.r
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and name in scaling:
            scaling[name] = 1.0


def _save_single_adapter(peft_model: Any, name: str, output: Path) -> None:
    """PEFT saves a non-default adapter into a sub-folder named after it; move it up to ``output``."""
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as temp:
        peft_model.save_pretrained(temp, selected_adapters=[name])
        saved = Path(temp) / name if (Path(temp) / name).is_dir() else Path(temp)
        shutil.copytree(saved, output)


def _comparison_table(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows).set_index("adapter")


def perplexity_hook(examples: Sequence[Mapping[str, Sequence[int]]]) -> Evaluate:
    """An ``evaluate`` hook for :func:`merge_adapters`: perplexity on the trained tokens of ``examples``."""

    def evaluate(model: Any, tokenizer: Any) -> dict[str, float]:
        total, count = 0.0, 0
        for example in examples:
            loss_sum, tokens = _label_loss(_logits(model, example["input_ids"]), example["labels"])
            total, count = total + loss_sum, count + tokens
        return {"perplexity": math.exp(total / count) if count else float("nan")}

    return evaluate


# --------------------------------------------------------------------------------------------------------------
# 4. Merging onto 16/32-bit weights
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MergedModel:
    """The merged model folder.

    Attributes:
        path: ``<run>/merged_16bit``.
        dtype: the dtype of the saved weights (the base model's own unless ``merged_dtype`` says otherwise).
        method: who merged ("PEFT merge_and_unload in float32 (CPU)" or Unsloth's save_pretrained_merged).
        seconds: how long merging and saving took.
    """

    path: Path
    dtype: str
    method: str
    seconds: float

    def describe(self) -> Any:
        import pandas as pd

        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        rows = {"folder": str(self.path), "weights dtype": self.dtype, "merged by": self.method,
                "size (MB)": round(size / 2**20, 1), "seconds": round(self.seconds, 1),
                "files": ", ".join(sorted(p.name for p in self.path.iterdir()))}
        return pd.DataFrame({"value": list(rows.values())}, index=list(rows))


def merge_to_16bit(kept: KeptAdapter, params: Any, run: Run) -> MergedModel:
    """Merge the kept adapter onto the original base weights (never 4-bit) and save it with the exact chat
    template, the generation config used in training and the training info.

    Raises:
        VinakitError: the adapter was not kept first (see :func:`keep_adapter`).
    """
    if not kept.path.is_dir():
        raise VinakitError(f"The adapter must be kept before merging, and {kept.path} does not exist: call "
                           f"keep_adapter first.")
    output = run.path / MERGED_DIR
    dtype_name = _save_dtype_name(kept, params.merged_dtype)
    start = time.perf_counter()
    if kept.kind == "lora" and _use_unsloth(params):
        method = _merge_with_unsloth(kept, output, params)
    else:
        method = _merge_with_peft(kept, output, dtype_name)
    tokenizer = kept.tokenizer()
    tokenizer.save_pretrained(output)
    _write_generation_config(output, tokenizer)
    info = dict(kept.training, exported_from=str(kept.path), merged_by=method, merged_dtype=dtype_name)
    (output / TRAINING_INFO_FILE).write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    merged = MergedModel(output, dtype_name, method, time.perf_counter() - start)
    run.update_manifest(merged={"path": str(output), "dtype": dtype_name, "merged_by": method,
                                "seconds": round(merged.seconds, 2)})
    return merged


def _use_unsloth(params: Any) -> bool:
    import torch

    return params.backend == "unsloth" and torch.cuda.is_available()


def _save_dtype_name(kept: KeptAdapter, choice: str) -> str:
    """``merged_dtype``, or for "auto" the dtype the base model was published in (bfloat16 when unknown)."""
    if choice != "auto":
        return choice
    from transformers import AutoConfig

    folder = kept.path if kept.kind == "full" else kept.base_model
    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
    return name if name in ("float32", "float16", "bfloat16") else "bfloat16"


def _merge_with_peft(kept: KeptAdapter, output: Path, dtype_name: str) -> str:
    import torch

    model = _load_exported_model(kept, dtype=_merge_dtype(dtype_name), load_in_4bit=False)
    if kept.kind == "lora":
        model = model.merge_and_unload()
    model = model.to(getattr(torch, dtype_name))
    model.config.dtype = dtype_name  # what loaders with dtype="auto" pick
    model.save_pretrained(output, safe_serialization=True)
    _free(model)
    return "PEFT merge_and_unload in float32" if kept.kind == "lora" else "re-saved (full model)"


def _merge_dtype(dtype_name: str) -> Any:
    """float32 on a CPU (exact sums, then one rounding when saving); the saved dtype on a GPU (memory)."""
    import torch

    return getattr(torch, dtype_name) if torch.cuda.is_available() else torch.float32


def _merge_with_unsloth(kept: KeptAdapter, output: Path, params: Any) -> str:
    from vinakit.model import _import_unsloth

    fast_language_model = _import_unsloth()
    # Loaded as trained (4-bit for QLoRA): Unsloth merges the LoRA delta into the original 16-bit weights of the
    # base, which it reads shard by shard, so even models that do not fit in 16-bit on the GPU can be merged.
    model, tokenizer = fast_language_model.from_pretrained(
        model_name=str(kept.path), max_seq_length=params.max_seq_length, load_in_4bit=kept.source.trained_in_4bit,
        dtype=None)
    model.save_pretrained_merged(str(output), tokenizer, save_method="merged_16bit")
    _free(model)
    return "Unsloth save_pretrained_merged (merged_16bit)"


def _write_generation_config(output: Path, tokenizer: Any) -> None:
    """The generation config of the base, stopping at the same tokens as generation during training does."""
    from transformers import GenerationConfig

    from vinakit.generation import stop_token_ids

    try:
        config = GenerationConfig.from_pretrained(output)
    except OSError:
        config = GenerationConfig()
    # The same stop tokens as vinakit.generation uses: the model's own eos ids, the end of turn and end of text.
    config.eos_token_id = stop_token_ids(SimpleNamespace(generation_config=config), tokenizer)
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(output)


# --------------------------------------------------------------------------------------------------------------
# 5. Fidelity
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FidelityReport:
    """The fidelity check: one row per model compared with the adapter model, and whether the export passed.

    Attributes:
        table: DataFrame indexed by model: max_abs_logit_diff, mean_kl, perplexity, role.
        metrics: the flat metrics written to metrics.json (``merge_max_abs_logit_diff`` ...).
        checks: template and generation-config checks (name -> bool).
        passed: all thresholds met and all checks true.
        problems: what failed, in words.
    """

    table: Any
    metrics: dict[str, Any]
    checks: dict[str, bool]
    passed: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class _Row:
    max_abs_logit_diff: float
    mean_kl: float
    perplexity: float


def check_fidelity(kept: KeptAdapter, merged: MergedModel, heldout: HeldOut, params: Any, run: Run
                   ) -> FidelityReport:
    """Compare the merged model (reloaded from disk) with the adapter model on held-out data.

    The reference is the adapter applied, unmerged, to the same base weights in 16/32-bit. Also measured, for
    comparison only: the adapter on the base loaded in 4-bit (how QLoRA trained) and the naive merge into those
    4-bit weights. metrics.json gets ``merge_max_abs_logit_diff``, ``merge_mean_kl``, ``merge_perplexity``,
    ``adapter_perplexity``, ``naive_4bit_*``, ``qlora_4bit_*`` and ``fidelity_passed``; ``fidelity.json`` records
    the fingerprint of the checked files for :func:`publish_run`.

    Raises:
        FidelityError: a threshold (``max_logit_diff``, ``max_kl``) or a template check failed. The report is
            written to the run folder first.
    """
    dtype = _check_dtype(kept)
    reference_model = _load_exported_model(kept, dtype=dtype, load_in_4bit=False)
    reference = [_logits(reference_model, e["input_ids"]) for e in heldout.examples]
    adapter_ppl = _perplexity(reference, heldout.examples)
    _free(reference_model)
    rows = {"adapter on 16/32-bit base (reference)": _Row(0.0, 0.0, adapter_ppl)}
    merged_model = _load_merged(merged.path, dtype)
    rows["merged 16-bit (exported)"] = _compare(merged_model, heldout.examples, reference)
    _free(merged_model)
    naive_note = ""
    if params.compare_naive_4bit:
        naive_rows, naive_note = _naive_4bit_rows(kept, heldout, reference)
        rows.update(naive_rows)
    checks = template_checks(kept, merged, heldout)
    report = _report(rows, checks, params, naive_note)
    _record_fidelity(report, kept, merged, run)
    if not report.passed:
        raise FidelityError("The merged model does not behave like the adapter model, so nothing will be published: "
                            + "; ".join(report.problems) + f". The adapter is safe in {kept.path}; the fidelity "
                            f"table is in {run.path / FIDELITY_FILE}. If the differences are only 16-bit rounding "
                            f"(mean KL tiny), set merged_dtype: float32 or raise max_logit_diff/max_kl.")
    return report


def _check_dtype(kept: KeptAdapter) -> Any:
    """float32 (exact) unless the model in float32 would not fit in the GPU's memory."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(kept.path if kept.kind == "full" else kept.base_model)
    hidden = getattr(config, "hidden_size", 4096)
    layers = getattr(config, "num_hidden_layers", 32)
    approx_params = 12 * hidden * hidden * layers + 2 * getattr(config, "vocab_size", 128000) * hidden
    fits = approx_params * 4 < 0.6 * torch.cuda.get_device_properties(0).total_memory
    return torch.float32 if fits else None  # None: the model's own dtype


def _load_exported_model(kept: KeptAdapter, *, dtype: Any, load_in_4bit: bool) -> Any:
    """The base (16/32-bit, or 4-bit) with the kept adapter on top, unmerged; or the full model."""
    from vinakit.model import load_model

    if kept.kind == "full":
        model, _ = load_model(str(kept.path), backend="hf", dtype=dtype, load_in_4bit=load_in_4bit)
        return model.eval()
    from peft import PeftModel

    model, _ = load_model(kept.base_model, backend="hf", dtype=dtype, load_in_4bit=load_in_4bit)
    _fit_vocab(model, kept.tokenizer())
    return PeftModel.from_pretrained(model, str(kept.path), is_trainable=False).eval()


def _load_merged(folder: Path, dtype: Any) -> Any:
    from vinakit.model import load_model

    model, _ = load_model(str(folder), backend="hf", dtype=dtype)
    return model.eval()


def _fit_vocab(model: Any, tokenizer: Any) -> None:
    """Grow the base's embeddings when training added tokens (CPT vocabulary extension), as training did."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def _logits(model: Any, input_ids: Sequence[int]) -> Any:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(input_ids)], device=device)).logits[0].float().cpu()


def _label_loss(logits: Any, labels: Sequence[int]) -> tuple[float, int]:
    """Summed next-token cross-entropy over the trained positions, and their count."""
    import torch

    targets = torch.tensor(list(labels[1:]))
    mask = targets != -100
    if not bool(mask.any()):
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(logits[:-1][mask], targets[mask], reduction="sum")
    return float(loss), int(mask.sum())


def _perplexity(all_logits: Sequence[Any], examples: Sequence[Mapping[str, Sequence[int]]]) -> float:
    total, count = 0.0, 0
    for logits, example in zip(all_logits, examples):
        loss, tokens = _label_loss(logits, example["labels"])
        total, count = total + loss, count + tokens
    return math.exp(total / count) if count else float("nan")


def _compare(model: Any, examples: Sequence[Mapping[str, Sequence[int]]], reference: Sequence[Any]) -> _Row:
    """Max |logit diff| and mean per-token KL(reference || model) over every position, and perplexity."""
    import torch

    max_diff, kl_sum, positions, candidate = 0.0, 0.0, 0, []
    for example, ref in zip(examples, reference):
        logits = _logits(model, example["input_ids"])
        candidate.append(logits)
        max_diff = max(max_diff, float((logits - ref).abs().max()))
        ref_logp, logp = ref.log_softmax(-1), logits.log_softmax(-1)
        kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
        positions += ref.shape[0]
    ppl = _perplexity(candidate, examples)
    del candidate
    return _Row(max_diff, max(kl_sum / positions, 0.0) if positions else float("nan"), ppl)


def _naive_4bit_rows(kept: KeptAdapter, heldout: HeldOut, reference: Sequence[Any]) -> tuple[dict[str, _Row], str]:
    """The adapter on the 4-bit base, then merged into those 4-bit weights (PEFT re-quantises the sum)."""
    try:
        model = _load_exported_model(kept, dtype=_check_dtype(kept), load_in_4bit=True)
    except (ImportError, RuntimeError, ValueError, OSError) as error:
        return {}, f"naive 4-bit merge not measured: loading in 4-bit failed ({type(error).__name__}: {error})"
    rows = {}
    if kept.kind == "lora":
        rows["adapter on 4-bit base (as QLoRA trains)"] = _compare(model, heldout.examples, reference)
        model = model.merge_and_unload()
        rows["naive merge into 4-bit (never exported)"] = _compare(model, heldout.examples, reference)
    else:
        rows["model quantised to 4-bit (for comparison)"] = _compare(model, heldout.examples, reference)
    _free(model)
    return rows, ""


def template_checks(kept: KeptAdapter, merged: MergedModel, heldout: HeldOut) -> dict[str, bool]:
    """The exported folder reproduces training's chat template, tokenisation and stop tokens.

    Returns:
        ``chat_template_identical``, ``tokenized_example_identical`` (a held-out example tokenised with the
        reloaded export equals the same example tokenised with the adapter's tokenizer, ids and labels) and
        ``generation_config_stops_at_end_of_turn``.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from vinakit.chat import end_of_turn_token

    original = kept.tokenizer()
    exported = AutoTokenizer.from_pretrained(merged.path)
    stops = GenerationConfig.from_pretrained(merged.path).eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    end_of_turn = exported.convert_tokens_to_ids(end_of_turn_token(exported))
    return {
        "chat_template_identical": original.chat_template == exported.chat_template,
        "tokenized_example_identical": all(
            _tokenize_heldout(original, [row], heldout.kind, 10**9, "assistant")
            == _tokenize_heldout(exported, [row], heldout.kind, 10**9, "assistant") for row in heldout.rows[:4]),
        "generation_config_stops_at_end_of_turn": end_of_turn in stops,
    }


def _report(rows: Mapping[str, _Row], checks: Mapping[str, bool], params: Any, note: str) -> FidelityReport:
    import pandas as pd

    table = pd.DataFrame({name: vars(row) for name, row in rows.items()}).T
    reference_ppl = rows["adapter on 16/32-bit base (reference)"].perplexity
    table["perplexity_change_pct"] = (table["perplexity"] / reference_ppl - 1.0) * 100.0
    table["role"] = ["reference", "checked: exported", *["for comparison"] * (len(rows) - 2)]
    table.index.name = "model"
    merged_row = rows["merged 16-bit (exported)"]
    problems = []
    if not merged_row.max_abs_logit_diff <= params.max_logit_diff:
        problems.append(f"max |logit diff| {merged_row.max_abs_logit_diff:.3g} > max_logit_diff "
                        f"{params.max_logit_diff}")
    if not merged_row.mean_kl <= params.max_kl:
        problems.append(f"mean KL {merged_row.mean_kl:.3g} > max_kl {params.max_kl}")
    problems += [f"{name} is false" for name, ok in checks.items() if not ok]
    metrics = {
        "merge_max_abs_logit_diff": merged_row.max_abs_logit_diff,
        "merge_mean_kl": merged_row.mean_kl,
        "merge_perplexity": merged_row.perplexity,
        "adapter_perplexity": reference_ppl,
        **_comparison_metrics(rows),
        **checks,
        "fidelity_max_logit_diff_threshold": params.max_logit_diff,
        "fidelity_max_kl_threshold": params.max_kl,
        "fidelity_passed": not problems,
    }
    if note:
        metrics["naive_4bit_note"] = note
    return FidelityReport(table, metrics, dict(checks), not problems, problems)


def _comparison_metrics(rows: Mapping[str, _Row]) -> dict[str, float]:
    prefixes = {"naive merge into 4-bit (never exported)": "naive_4bit",
                "adapter on 4-bit base (as QLoRA trains)": "qlora_4bit",
                "model quantised to 4-bit (for comparison)": "naive_4bit"}
    metrics = {}
    for name, row in rows.items():
        if name in prefixes:
            prefix = prefixes[name]
            metrics.update({f"{prefix}_max_abs_logit_diff": row.max_abs_logit_diff,
                            f"{prefix}_mean_kl": row.mean_kl, f"{prefix}_perplexity": row.perplexity})
    return metrics


def _record_fidelity(report: FidelityReport, kept: KeptAdapter, merged: MergedModel, run: Run) -> None:
    run.log_metrics(**report.metrics)
    report.table.to_csv(run.path / "fidelity.csv", encoding="utf-8-sig")
    write_json(run.path / FIDELITY_FILE, {
        "passed": report.passed,
        "problems": report.problems,
        "metrics": report.metrics,
        "adapter_dir": str(kept.path),
        "source_kind": kept.kind,
        "merged_dir": str(merged.path),
        "merged_fingerprint": folder_fingerprint(merged.path),
    })
    run.update_manifest(fidelity={"passed": report.passed, "problems": report.problems})


def _free(model: Any) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# 6a. GGUF
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GGUFResult:
    """What the GGUF step did.

    Attributes:
        status: "skipped" (not asked for), "unavailable" (no llama.cpp), "failed" or "written".
        message: what happened and, unless written, what to use instead.
        folder: ``<run>/gguf`` when written.
        files: the GGUF file names.
    """

    status: Literal["skipped", "unavailable", "failed", "written"]
    message: str
    folder: Path | None = None
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def llama_cpp_folder() -> Path:
    """Where Unsloth looks for llama.cpp: ``$UNSLOTH_LLAMA_CPP_PATH`` or ``~/.unsloth/llama.cpp``."""
    return Path(os.environ.get(LLAMA_CPP_ENV_VAR) or Path.home() / ".unsloth" / "llama.cpp").expanduser()


def find_llama_cpp(folder: Path | None = None) -> tuple[Path, Path] | None:
    """(quantizer, converter script) of a llama.cpp build, or None.

    Mirrors Unsloth's own check, which would otherwise try to download and compile llama.cpp (minutes, and
    impossible offline).
    """
    folder = folder or llama_cpp_folder()
    quantizer = next((folder / name for name in ("llama-quantize", "quantize")
                      if (folder / name).is_file() and os.access(folder / name, os.X_OK)), None)
    converter = next((folder / name for name in ("convert_hf_to_gguf.py", "convert-hf-to-gguf.py")
                      if (folder / name).is_file()), None)
    return (quantizer, converter) if quantizer and converter else None


def save_gguf(merged: MergedModel, params: Any, run: Run) -> GGUFResult:
    """GGUF files of the merged model through Unsloth, when ``gguf`` is in ``save_methods`` and llama.cpp is
    installed; otherwise a clear message and the merged folder as the export."""
    if "gguf" not in params.save_methods:
        result = GGUFResult("skipped", "GGUF not requested (add gguf to save_methods).")
    elif find_llama_cpp() is None:
        result = GGUFResult("unavailable", (
            f"No GGUF files: llama.cpp was not found in {llama_cpp_folder()} (it needs llama-quantize and "
            f"convert_hf_to_gguf.py; set {LLAMA_CPP_ENV_VAR} to a llama.cpp build). The merged model in "
            f"{merged.path} is your export; convert it later with: python llama.cpp/convert_hf_to_gguf.py "
            f"{merged.path} --outtype q8_0"))
    else:
        result = _convert_to_gguf(merged, params, run.path / GGUF_DIR)
    print(result.message)
    run.update_manifest(gguf={"status": result.status, "message": result.message, "files": result.files})
    return result


def _convert_to_gguf(merged: MergedModel, params: Any, output: Path) -> GGUFResult:
    from vinakit.model import _import_unsloth

    _import_unsloth()
    from transformers import AutoConfig
    from unsloth.save import save_to_gguf

    name = (params.repo_id.split("/")[-1] if params.repo_id else merged.path.parent.name) or "model"
    try:
        save_to_gguf(model_name=name, model_type=AutoConfig.from_pretrained(merged.path).model_type,
                     model_dtype="bfloat16" if merged.dtype == "bfloat16" else "float16",
                     model_directory=str(merged.path), quantization_method=list(params.gguf_quantizations),
                     gguf_directory=str(output), merge_is_disposable=False)
    except Exception as error:  # noqa: BLE001 - a failed conversion must not lose the checked merged model
        return GGUFResult("failed", f"GGUF conversion failed ({type(error).__name__}: {error}). The merged model "
                                    f"in {merged.path} is your export.")
    files = sorted(p.name for p in output.glob("*.gguf"))
    return GGUFResult("written", f"GGUF files in {output}: {', '.join(files)}", output, files)


# --------------------------------------------------------------------------------------------------------------
# 6b. Model cards
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelCards:
    """The README.md cards written into the exported folders (kind -> path)."""

    paths: dict[str, Path]

    def text(self, kind: str = "merged_16bit") -> str:
        """The Markdown of one card (the merged model's by default)."""
        path = self.paths.get(kind) or next(iter(self.paths.values()))
        return path.read_text(encoding="utf-8")


def repo_names(repo_id: str, methods: Sequence[str]) -> dict[str, str]:
    """Where each exported form goes: the first of merged_16bit, lora, gguf gets ``repo_id``; the others get
    ``<repo_id>-lora`` and ``<repo_id>-GGUF`` (the Hub's usual names)."""
    ordered = [kind for kind in ("merged_16bit", "lora", "gguf") if kind in methods]
    suffix = {"merged_16bit": "", "lora": "-lora", "gguf": "-GGUF"}
    return {kind: repo_id if i == 0 else f"{repo_id}{suffix[kind]}" for i, kind in enumerate(ordered)}


def write_cards(kept: KeptAdapter, merged: MergedModel, gguf: GGUFResult, fidelity: FidelityReport, params: Any,
                run: Run) -> ModelCards:
    """Write a Vietnamese + English model card into every exported folder (adapter, merged, gguf)."""
    from vinakit.card import CardFacts, flatten_numbers, write_model_card

    folders = {"lora": kept.path, "merged_16bit": merged.path}
    if gguf.status == "written" and gguf.folder:
        folders["gguf"] = gguf.folder
    if kept.kind == "full":
        folders.pop("lora")  # a full model has no adapter of its own to describe
    repos = repo_names(params.repo_id, params.save_methods) if params.push_to_hub else {}
    evaluation = _eval_metrics(params.eval_run)
    paths = {}
    for kind, folder in folders.items():
        facts = CardFacts(
            kind=kind, location=repos.get(kind) or str(folder), base_model=_public_base_name(kept),
            training=kept.training, training_params=kept.source.training_params,
            training_data=kept.source.training_manifest.get("data", {}), export_params=params.to_dict(),
            fidelity=fidelity.metrics, evaluation=flatten_numbers(evaluation),
            evaluation_source=Path(params.eval_run).name if params.eval_run else "",
            siblings=repos, gguf_files=gguf.files if kind == "gguf" else (), license=params.license)
        paths[kind] = write_model_card(folder, facts)
    run.update_manifest(model_cards={kind: str(path) for kind, path in paths.items()})
    return ModelCards(paths)


def _public_base_name(kept: KeptAdapter) -> str:
    """The base as the user named it in training (``unsloth/Llama-3.2-1B-Instruct``, ``tiny-vi``)."""
    return str(kept.training.get("base_model") or kept.source.training_params.get("model_name") or kept.base_model)


def _eval_metrics(eval_run: str) -> dict[str, Any]:
    return _read_json(Path(eval_run).expanduser() / "metrics.json") if eval_run else {}


# --------------------------------------------------------------------------------------------------------------
# 6c. Publishing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PublishReport:
    """What was uploaded: status "skipped" or "uploaded", and one entry per repo."""

    status: Literal["skipped", "uploaded"]
    message: str
    repos: list[PushedRepo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "repos": [r.to_dict() for r in self.repos]}

    def table(self) -> Any:
        import pandas as pd

        if not self.repos:
            return pd.DataFrame({"status": [self.status], "message": [self.message]})
        return pd.DataFrame([r.to_dict() for r in self.repos]).set_index("repo_id")


def publish(params: Any, run: Run, hub: Hub | None = None) -> PublishReport:
    """Push the export to the Hub when ``push_to_hub`` is true (private by default), after re-checking the gate.

    The token comes from ``HF_TOKEN`` or Colab secrets only. A failed upload changes no local file; the error says
    what to do and how to retry the upload alone.

    Raises:
        PublishBlockedError: the adapter is missing or the fidelity check did not pass on these files.
        HubError: no token, no network, or the Hub refused (the manifest records the failure first).
    """
    if not params.push_to_hub:
        report = PublishReport("skipped", "push_to_hub is false: nothing was uploaded; the export is in "
                                          f"{run.path}.")
        run.update_manifest(hub=report.to_dict())
        return report
    try:
        report = publish_run(run.path, params.repo_id, methods=params.save_methods, private=params.private,
                             hub=hub)
    except (HubError, PublishBlockedError) as error:
        run.update_manifest(hub={"status": "failed", "error": str(error)})
        run.finish(status="upload_failed")
        raise
    run.update_manifest(hub=report.to_dict())
    return report


def publish_run(run_dir: str | os.PathLike[str], repo_id: str, *, methods: Sequence[str] = ("merged_16bit",),
                private: bool = True, hub: Hub | None = None) -> PublishReport:
    """Upload an export run folder; usable on its own to retry a failed upload.

    Args:
        run_dir: an export run folder (``outputs/export-...``).
        repo_id: ``owner/name`` for the first form; see :func:`repo_names` for the others.
        methods: what to upload: merged_16bit, lora, gguf.
        private: create new repos private.
        hub: the Hub (default: :func:`vinakit.hub.default_hub`).

    Raises:
        PublishBlockedError: the gate failed (adapter not saved, fidelity not passed, files changed since).
        HubError: the upload failed; nothing local was changed.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    folders = _publishable_folders(run_dir, methods)
    token = find_token()
    retry = (f"Retry the upload alone with: python -c \"from vinakit.export import publish_run; "
             f"publish_run('{run_dir}', '{repo_id}', methods={list(methods)})\"")
    if token is None:
        raise HubAuthError(f"push_to_hub is true but no Hugging Face token was found. "
                           f"{what_to_do(HubAuthError(''))} Nothing was uploaded; every local file is intact in "
                           f"{run_dir}. {retry}")
    hub = hub or default_hub()
    repos = repo_names(repo_id, list(folders))
    pushed: list[PushedRepo] = []
    for kind, folder in folders.items():
        try:
            pushed.append(push_folder(hub, repos[kind], folder, token=token, private=private,
                                      commit_message=f"Upload {kind} exported with vinakit"))
        except HubError as error:
            done = ", ".join(p.repo_id for p in pushed) or "nothing"
            raise type(error)(f"Upload of {folder.name}/ to {repos[kind]} on the {hub.name} failed: {error}. "
                              f"{what_to_do(error)} Uploaded before the failure: {done}. No local file was "
                              f"changed; the export is in {run_dir}. {retry}") from None
    listing = ", ".join(f"{p.repo_id} ({'private' if p.private else 'public'})" for p in pushed)
    return PublishReport("uploaded", f"Uploaded to the {hub.name}: {listing}.", pushed)


def _publishable_folders(run_dir: Path, methods: Sequence[str]) -> dict[str, Path]:
    """The folders to upload, after checking the gate on disk."""
    fidelity = _read_json(run_dir / FIDELITY_FILE)
    if not fidelity:
        raise PublishBlockedError(f"{run_dir} has no {FIDELITY_FILE}: the fidelity check has not run, so nothing "
                                  f"may be published. Run the export notebook to the end.")
    if fidelity.get("source_kind") != "full" and not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise PublishBlockedError(f"The adapter is not saved in {run_dir / ADAPTER_DIR}; it must be kept before "
                                  f"anything is published.")
    if not fidelity.get("passed"):
        raise PublishBlockedError(f"The fidelity check failed ({'; '.join(fidelity.get('problems', []))}); nothing "
                                  f"may be published.")
    merged_dir = run_dir / MERGED_DIR
    if folder_fingerprint(merged_dir) != fidelity.get("merged_fingerprint"):
        raise PublishBlockedError(f"The weights in {merged_dir} changed after the fidelity check; run the export "
                                  f"again.")
    folders = {"merged_16bit": merged_dir, "lora": run_dir / ADAPTER_DIR, "gguf": run_dir / GGUF_DIR}
    chosen = {kind: folders[kind] for kind in ("merged_16bit", "lora", "gguf") if kind in methods}
    if fidelity.get("source_kind") == "full":
        chosen.pop("lora", None)
    if "gguf" in chosen and not any(chosen["gguf"].glob("*.gguf")):
        chosen.pop("gguf")  # no llama.cpp: the merged folder is the export (save_gguf said so)
    if not chosen:
        raise PublishBlockedError(f"Nothing to upload for save_methods {list(methods)} in {run_dir}.")
    return chosen
