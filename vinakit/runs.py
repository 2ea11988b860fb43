"""Training-run folders: where a run's adapter or model is, what it was trained on, and its validation split.

Every notebook that consumes a trained model (eval_mcq, export) reads runs through this module, so there is one
rule for what ``adapter`` may name and one way to rebuild a run's validation split:

* ``adapter`` is a training run folder (``outputs/sft-...``), its ``adapter/`` or ``model/`` folder, any PEFT
  adapter folder (``adapter_config.json``) or a full model folder (``config.json``); empty means the newest
  training run in ``output_dir`` that is not an export run.
* ``model_name`` may name a training run folder that hands over a full model (a CPT run): it stands for the run's
  ``model/`` (:func:`model_folder`); a CPT run is never an adapter to put on a base (:func:`refuse_cpt_run`).
* The base to merge onto and compare against is the 16-bit original (:func:`base_model_16bit`), never the
  ``-bnb-4bit`` copy Unsloth swaps in for QLoRA and PEFT then records in ``adapter_config.json``.
* The validation split is re-created from the run's ``params.yaml`` with the loader, cleaning and seed training
  used (:func:`load_sft_data`, :func:`load_cpt_corpus`).
* A preference run (ORPO/DPO) is taken like an SFT run; when it continued an SFT run (``continued_from`` in its
  ``vinakit_training.json``), that SFT run's parameters and validation split stand for it
  (:attr:`TrainedRun.sft_params`), so eval_mcq holds out the same rows.

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

from vinakit.errors import DataError, VinakitError
from vinakit.params import CPTParams, NotebookParams, PreferenceParams, SFTParams, read_yaml
from vinakit.record import read_json

TRAINING_INFO_FILE = "vinakit_training.json"  # written next to every saved adapter/model (vinakit.train)
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
PARAMS_FILE = "params.yaml"
MANIFEST_FILE = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The names of bitsandbytes 4-bit copies of a 16-bit model: Unsloth's own uploads, and the Hub's usual suffix.
QUANTIZED_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")

WeightsKind = Literal["lora", "full"]
SplitKind = Literal["chat", "text"]
P = TypeVar("P", bound=NotebookParams)

__all__ = [
    "ADAPTER_DIR", "MODEL_DIR", "TRAINING_INFO_FILE", "TrainedRun", "ValidationRows", "base_model_16bit",
    "find_run", "load_cpt_corpus", "folder_fingerprint", "load_sft_data", "model_folder", "newest_trained_run",
    "refuse_cpt_run", "run_params", "same_model", "sft_validation_prompts", "trained_adapter", "unquantized_name",
    "validation_rows", "weights_folder",
]


# --------------------------------------------------------------------------------------------------------------
# Finding a run
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedRun:
    """A trained adapter or model folder and the training run around it.

    Attributes:
        weights_dir: the adapter folder (``adapter_config.json``) or the full model folder (``config.json``).
        kind: "lora" or "full" (a full fine-tune, a CPT model or a plain model: nothing to merge).
        run_dir: the training run folder (with ``params.yaml``), or None when the folder stands alone.
        training: the folder's ``vinakit_training.json`` ({} when absent).
        params: the run's resolved ``params.yaml`` ({} without a run folder).
        manifest: the run's ``manifest.json`` ({} without a run folder).
    """

    weights_dir: Path
    kind: WeightsKind
    run_dir: Path | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    manifest: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The run folder's name, else the weights folder's."""
        return (self.run_dir or self.weights_dir).name

    @property
    def notebook(self) -> str:
        """The notebook that trained it ("sft", "cpt", "preference"); "" when there is no run folder."""
        if self.manifest.get("notebook"):
            return str(self.manifest["notebook"])
        if not self.params:
            return ""
        if "method" in self.params:  # a preference-only parameter
            return "preference"
        return "sft" if "train_on" in self.params else "cpt"  # train_on is an SFT-only parameter

    @property
    def continued_from(self) -> Path | None:
        """The SFT run a preference run continued (None otherwise, or when that folder is gone)."""
        folder = self.training.get("continued_from") or self.manifest.get("continued_from")
        return Path(folder) if folder and Path(folder).is_dir() else None

    @property
    def sft_params(self) -> Mapping[str, Any]:
        """The parameters of the SFT run behind these weights: its own, or for a preference run those of the SFT
        run it continued (whose validation split eval_mcq holds out); {} when unknown."""
        if self.notebook != "preference":
            return self.params
        return find_run(self.continued_from).params if self.continued_from else {}

    @property
    def trained_in_4bit(self) -> bool:
        """Whether it was trained on a 4-bit base (QLoRA)."""
        return bool(self.training.get("load_in_4bit", self.params.get("load_in_4bit", False)))

    @property
    def adapter_base(self) -> str:
        """``base_model_name_or_path`` of ``adapter_config.json`` ("" for a full model)."""
        if self.kind != "lora":
            return ""
        return str(read_json(self.weights_dir / "adapter_config.json").get("base_model_name_or_path") or "")

    @property
    def model_name(self) -> str:
        """The base model as training named it (``tiny-vi``, ``unsloth/Llama-3.2-1B-Instruct``), else the
        adapter's recorded base; "" when nothing says."""
        return str(self.training.get("base_model") or self.params.get("model_name") or self.adapter_base)

    @property
    def chat_template(self) -> str:
        """The exact chat template saved with the weights ("" when unknown)."""
        return str(self.training.get("chat_template") or "")


def find_run(spec: str | os.PathLike[str], output_dir: str | os.PathLike[str] = "outputs", *,
             parameter: str = "adapter") -> TrainedRun:
    """Resolve a run spec (the ``adapter`` parameter) to its weights folder and training run.

    Args:
        spec: a training run folder, its ``adapter/`` or ``model/`` folder, any PEFT adapter folder or a full
            model folder; empty: the newest training run in ``output_dir`` (export runs are skipped).
        output_dir: where runs are looked for when ``spec`` is empty.
        parameter: the parameter's name, for the error messages.

    Raises:
        VinakitError: the folder does not exist or holds no adapter or model; no training run was found.
    """
    folder = Path(spec).expanduser() if str(spec) else newest_trained_run(output_dir)
    if not folder.is_dir():
        raise VinakitError(f"{parameter}: folder {folder} does not exist. Give a training run folder "
                           f"(outputs/<run>) or its adapter/ folder.")
    weights_dir, run_dir = weights_folder(folder, parameter)
    kind: WeightsKind = "lora" if (weights_dir / "adapter_config.json").is_file() else "full"
    return TrainedRun(weights_dir, kind, run_dir, read_json(weights_dir / TRAINING_INFO_FILE),
                      _read_params(run_dir), read_json(run_dir / MANIFEST_FILE) if run_dir else {})


def weights_folder(folder: Path, parameter: str = "adapter") -> tuple[Path, Path | None]:
    """(the adapter or model folder in or at ``folder``, the training run folder around it or None).

    Raises:
        VinakitError: neither ``folder`` nor its ``adapter/`` or ``model/`` holds an adapter or a model.
    """
    for candidate in (folder, folder / ADAPTER_DIR, folder / MODEL_DIR):
        if _holds_weights(candidate):
            run_dir = folder.parent if candidate == folder else folder
            return candidate.resolve(), run_dir.resolve() if (run_dir / PARAMS_FILE).is_file() else None
    raise VinakitError(f"{parameter}: {folder} holds no adapter (adapter_config.json) or model (config.json), nor "
                       f"an {ADAPTER_DIR}/ or {MODEL_DIR}/ folder. Give a training run folder (outputs/<run>) or its "
                       f"{ADAPTER_DIR}/ folder.")


def _holds_weights(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def model_folder(folder: Path) -> Path:
    """The folder a loader should open for ``model_name`` = ``folder``: the folder itself when it holds a model or
    an adapter, else the ``model/`` a training run hands over (a CPT run folder stands for its model)."""
    if not _holds_weights(folder) and (folder / MODEL_DIR / "config.json").is_file():
        return folder / MODEL_DIR
    return folder


def refuse_cpt_run(run: TrainedRun, spec: str, parameter: str = "adapter") -> None:
    """A CPT run hands over a full model to train or evaluate as a base, not an adapter: say so before loading.

    Raises:
        VinakitError: ``run`` was made by the CPT notebook; the message says to pass its ``model/`` as model_name.
    """
    if run.notebook != "cpt" and run.training.get("kind") != "continued_pretraining":
        return
    model = run.weights_dir if run.kind == "full" else (run.run_dir or run.weights_dir.parent) / MODEL_DIR
    or_run = f", or the run folder {run.run_dir}" if run.run_dir else ""
    raise VinakitError(
        f"{parameter}: {spec} is a continued-pretraining (CPT) run. CPT hands over a full model in {model}, not an "
        f"adapter to put on model_name: pass it as the model instead (-p model_name {model}{or_run}) and leave "
        f"{parameter} empty, or give the SFT run trained on it as {parameter}.")


def _read_params(run_dir: Path | None) -> dict[str, Any]:
    return read_yaml(run_dir / PARAMS_FILE) if run_dir else {}


def newest_trained_run(output_dir: str | os.PathLike[str]) -> Path:
    """The most recently saved training run in ``output_dir`` (export runs hold adapters too: skipped).

    Raises:
        VinakitError: no run with an ``adapter/`` or ``model/`` folder.
    """
    output_dir = Path(output_dir).expanduser()
    candidates = []
    if output_dir.is_dir():
        for run_dir in output_dir.iterdir():
            if not run_dir.is_dir() or read_json(run_dir / MANIFEST_FILE).get("notebook") == "export":
                continue
            candidates += [run_dir / name for name in (ADAPTER_DIR, MODEL_DIR) if _holds_weights(run_dir / name)]
    if not candidates:
        raise VinakitError(f"No training run with an {ADAPTER_DIR}/ or {MODEL_DIR}/ folder in {output_dir}: run the "
                           f"SFT (or CPT) notebook first, or set adapter to the folder to use.")
    return max(candidates, key=lambda path: path.stat().st_mtime).parent


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


# --------------------------------------------------------------------------------------------------------------
# The 16-bit base
# --------------------------------------------------------------------------------------------------------------


def unquantized_name(name: str) -> str:
    """``name`` without a trailing ``-unsloth-bnb-4bit`` / ``-bnb-4bit`` (any case) or slash."""
    name = name.strip().rstrip("/")
    for suffix in QUANTIZED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def same_model(first: str, second: str) -> bool:
    """Whether two model names mean the same model: equal up to case and the 4-bit suffix (Unsloth records
    ``unsloth/llama-3.2-1b-instruct-unsloth-bnb-4bit`` for ``unsloth/Llama-3.2-1B-Instruct``), or the same
    folder (``tiny-vi`` and the folder it resolves to)."""
    if unquantized_name(first).lower() == unquantized_name(second).lower():
        return True
    from vinakit.model import resolve_model_name

    try:
        folders = [Path(resolve_model_name(unquantized_name(name))).expanduser() for name in (first, second)]
    except VinakitError:
        return False
    return folders[0].is_dir() and folders[0].resolve() == folders[1].resolve()


def base_model_16bit(run: TrainedRun) -> str:
    """The 16-bit original of an adapter's base: the folder or Hub id to merge onto and compare against.

    With ``load_in_4bit`` Unsloth loads ``<name>-unsloth-bnb-4bit`` (or ``-bnb-4bit``) and PEFT writes that name
    into ``adapter_config.json``. So the reference is the training run's ``model_name`` (``vinakit_training.json``
    ``base_model``, else ``params.yaml``), else the adapter's recorded base, with the 4-bit suffix stripped from
    either (a user may have trained from a pre-quantized repo or folder). A full model is its own reference.

    Raises:
        VinakitError: the reference is a folder that no longer exists, or it is itself quantized (its
            ``config.json`` has ``quantization_config``); the message says what to set instead.
    """
    if run.kind == "full":
        return str(run.weights_dir)
    from vinakit.model import resolve_model_name

    named = run.model_name
    candidate = unquantized_name(named)
    if Path(candidate).expanduser().is_absolute() and not Path(candidate).expanduser().is_dir():
        raise VinakitError(_missing_base_message(run, named, candidate))
    reference = resolve_model_name(candidate)
    _refuse_quantized(run, reference)
    return reference


def _fix_hint(run: TrainedRun) -> str:
    where = f"{run.weights_dir / TRAINING_INFO_FILE} (field base_model)"
    if run.run_dir is not None:
        where += f" or model_name in {run.run_dir / PARAMS_FILE}"
    return f"set {where} to the 16-bit model's folder or Hub id"


def _missing_base_message(run: TrainedRun, named: str, candidate: str) -> str:
    if candidate != named:
        return (f"The adapter in {run.weights_dir} was trained on the pre-quantized 4-bit model {named}; merging and "
                f"the fidelity check need its 16-bit original, expected at {candidate}, which does not exist. Put "
                f"the 16-bit model there, or {_fix_hint(run)}.")
    return (f"The adapter in {run.weights_dir} was trained on the base model folder {candidate}, which no longer "
            f"exists (a cleared cache, or another machine). Put the base model back there, or {_fix_hint(run)}, "
            f"or retrain the adapter.")


def _refuse_quantized(run: TrainedRun, reference: str) -> None:
    quantization = _local_config(reference).get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise VinakitError(
            f"The base model {reference} of the adapter in {run.weights_dir} is itself quantized ({method}: its "
            f"config.json has quantization_config). Merging into it would be the lossy merge into 4-bit weights. "
            f"Pass its 16-bit original instead: {_fix_hint(run)}.")


def _local_config(reference: str) -> dict[str, Any]:
    """``config.json`` of a folder, or of a Hub model already in the local cache ({} when not at hand: the
    check never downloads)."""
    folder = Path(reference).expanduser()
    if folder.is_dir():
        return read_json(folder / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "config.json")
    except (ImportError, ValueError):  # not a valid repo id: the loader will say so
        return {}
    return read_json(Path(cached)) if isinstance(cached, str) else {}


# --------------------------------------------------------------------------------------------------------------
# Validation splits
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationRows:
    """Rows a training run held out: chat rows (``{"messages"}``) of an SFT run or documents of a CPT run."""

    rows: list[Any]
    kind: SplitKind
    description: str


def run_params(values: Mapping[str, Any], cls: type[P], source: str = PARAMS_FILE) -> P:
    """A notebook's params dataclass from a run's ``params.yaml`` values (names of other notebooks ignored).

    Raises:
        ParamsError: a value is invalid (the message names ``source``).
    """
    known = cls.field_types()
    return cls.validate({k: v for k, v in values.items() if k in known}, source=source)  # type: ignore[return-value]


def load_sft_data(params: SFTParams) -> Any:
    """Load, clean and split chat data exactly as SFT training does (the SFT notebook loads through this too)."""
    from vinakit.data import load_chat_dataset

    return load_chat_dataset(params.dataset, val_source=params.val_dataset or None,
                             val_size=0.0 if params.val_dataset else params.val_split,
                             skip_bad_rows=params.skip_bad_rows, normalize=params.normalize_text,
                             tone_style=params.tone_style, seed=params.seed)


def load_cpt_corpus(params: CPTParams) -> tuple[list[str], list[str], Any, int]:
    """Load, clean, deduplicate (exact) and split a CPT corpus exactly as CPT training does (the CPT notebook loads
    through this too).

    Returns:
        ``(train, validation, data report, duplicates removed)``.

    Raises:
        DataError: an unreadable corpus, one without letters, or too few documents to split.
    """
    from vinakit.data import load_text_corpus, split_rows

    documents, report = load_text_corpus(params.dataset, text_field=params.text_field, normalize=params.normalize_text,
                                         tone_style=params.tone_style, skip_bad_rows=params.skip_bad_rows)
    if not any(character.isalpha() for character in "".join(documents)[:100_000]):
        raise DataError("the corpus holds no letters, so it is not text to pretrain on; check the file and "
                        "text_field", path=params.dataset)
    unique = list(dict.fromkeys(documents))
    if len(unique) < len(documents):  # counted in the manifest like any other skipped row
        report.skip_reasons["duplicate_document"] += len(documents) - len(unique)
        report.rows_used = len(unique)
    train, validation = split_rows(unique, params.val_split, params.seed, params.dataset, unit="documents",
                                   fix="add documents (a blank line separates the documents of a .txt file) or "
                                       "lower val_size")
    report.split = f"val_size={params.val_size} seed={params.seed}"
    report.train_rows, report.validation_rows = len(train), len(validation)
    return train, validation, report, len(documents) - len(unique)


def trained_adapter(spec: str, output_dir: str, model_name: str, parameter: str = "adapter") -> TrainedRun:
    """An SFT (or preference) run's adapter to continue training on ``model_name``.

    Raises:
        VinakitError: no adapter there, a CPT run or a full model, or an adapter of another base model.
    """
    trained = find_run(spec, output_dir, parameter=parameter)
    refuse_cpt_run(trained, spec, parameter)
    if trained.kind != "lora":
        raise VinakitError(f"{parameter}: {trained.weights_dir} is a full model, not an adapter: pass it as "
                           f"model_name and leave {parameter} empty.")
    if trained.model_name and not same_model(model_name, trained.model_name):
        raise VinakitError(f"{parameter}: the adapter in {trained.weights_dir} was trained on {trained.model_name!r}, "
                           f"but model_name is {model_name!r}: set model_name to {trained.model_name!r}.")
    return trained


def sft_validation_prompts(spec: str, output_dir: str) -> frozenset[str]:
    """The last user turns of the validation rows of the SFT run behind ``spec`` (empty when it has none), so a
    later stage can leave them out and evaluation stays held out."""
    trained = find_run(spec, output_dir)
    if not trained.sft_params.get("dataset") or not trained.sft_params.get("val_size"):
        return frozenset()
    sft = run_params(trained.sft_params, SFTParams)
    if sft.val_dataset:
        return frozenset()
    rows = load_sft_data(sft).validation
    return frozenset(message["content"] for row in rows for message in row["messages"] if message["role"] == "user")


def _preference_validation(run: TrainedRun, source: str) -> tuple[list[Any], Any]:
    """A preference run's held-out chat rows: those of the SFT run it continued, else its own validation pairs
    (prompt + chosen reply)."""
    from vinakit.pairs import load_preference_dataset

    if run.continued_from is not None:
        parent = find_run(run.continued_from)
        return validation_rows(parent, 10**9).rows, run_params(parent.params, SFTParams)
    params = run_params(run.params, PreferenceParams, source)
    data = load_preference_dataset(params.dataset, val_size=params.val_split, skip_bad_rows=params.skip_bad_rows,
                                   normalize=params.normalize_text, tone_style=params.tone_style, seed=params.seed)
    rows = [{"messages": [*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}]}
            for pair in data.validation]
    return rows, params


def validation_rows(run: TrainedRun, count: int) -> ValidationRows:
    """The first ``count`` rows of a training run's validation split, re-created as training made it.

    Raises:
        VinakitError: no training run folder, a run without a validation split, or data that cannot be re-read.
    """
    if not run.params.get("dataset") or run.notebook not in ("sft", "cpt", "preference"):
        raise VinakitError(f"{run.weights_dir} has no SFT, preference or CPT run folder with {PARAMS_FILE} next to "
                           f"it, so its validation split is unknown: set fidelity_dataset to a held-out chat file.")
    source = str(run.run_dir / PARAMS_FILE)
    try:
        if run.notebook == "sft":
            params = run_params(run.params, SFTParams, source)
            rows, kind = load_sft_data(params).validation, "chat"
        elif run.notebook == "preference":
            (rows, params), kind = _preference_validation(run, source), "chat"
        else:
            params = run_params(run.params, CPTParams, source)
            rows, kind = load_cpt_corpus(params)[1], "text"
    except DataError as error:
        raise VinakitError(f"Could not re-read the training data {run.params['dataset']!r} of {run.name} ({error}): "
                           f"set fidelity_dataset to a held-out chat file.") from error
    if not rows:
        raise VinakitError(f"The training run {run.run_dir} had no validation split (val_size 0): set "
                           f"fidelity_dataset to a held-out chat file.")
    what = "rows" if kind == "chat" else "documents"
    return ValidationRows(rows[:count], kind, f"validation split of {run.name} ({len(rows)} {what}, seed "
                                              f"{params.seed}), first {min(count, len(rows))}")
