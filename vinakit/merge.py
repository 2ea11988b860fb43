"""Merging LoRA adapters onto the original 16/32-bit base weights (never into 4-bit weights), and merging several
adapters of one base into one adapter (linear or TIES).

Two paths merge onto 16-bit weights:

* PEFT (:func:`merge_to_folder`): the base is loaded in :func:`vinakit.device.merge_dtype` (float32 on a CPU:
  exact sums, one rounding when saving; the saved dtype on a GPU, where a float32 copy may not fit), the adapter
  is added with ``merge_and_unload`` and the result is saved in the chosen dtype.
* Unsloth (:func:`merge_with_unsloth`, GPU): ``save_pretrained_merged(..., "merged_16bit")`` reads the original
  16-bit shards of a QLoRA base one by one, so models that do not fit in 16-bit on the GPU merge too; the saved
  shards are then cast to the chosen dtype when Unsloth wrote another one (:func:`cast_saved_weights`).

Every temporary model is loaded inside the function that uses it and freed before the next one is loaded.
Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal, Mapping, Sequence

from vinakit.device import dtype_name, free_memory, merge_dtype
from vinakit.errors import ParamsError
from vinakit.fidelity import Evaluate
from vinakit.record import read_json, write_json
from vinakit.runs import ADAPTER_DIR, TRAINING_INFO_FILE, base_model_16bit, find_run

MERGED_DIR = "merged_16bit"
UNSLOTH_METHOD = "Unsloth save_pretrained_merged (merged_16bit)"

Prepare = Callable[[Any], None]


@dataclass
class MergedModel:
    """The merged model folder.

    Attributes:
        path: ``<run>/merged_16bit``.
        dtype: the dtype of the saved weights (the base model's own unless ``merged_dtype`` says otherwise).
        method: who merged (PEFT ``merge_and_unload`` or Unsloth's ``save_pretrained_merged``).
        seconds: how long merging and saving took.
    """

    path: Path
    dtype: str
    method: str
    seconds: float

    def describe(self) -> Any:
        """A one-column table for the notebook."""
        import pandas as pd

        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        rows = {"folder": str(self.path), "weights dtype": self.dtype, "merged by": self.method,
                "size (MB)": round(size / 2**20, 1), "seconds": round(self.seconds, 1),
                "files": ", ".join(sorted(p.name for p in self.path.iterdir()))}
        return pd.DataFrame({"value": list(rows.values())}, index=list(rows))


# --------------------------------------------------------------------------------------------------------------
# Loading a base with an adapter
# --------------------------------------------------------------------------------------------------------------


def adapter_tokenizer(folder: Path, base_model: str, training: Mapping[str, Any]) -> Any:
    """The tokenizer saved with an adapter (it carries the training chat template), else the base's with the
    template recorded in ``vinakit_training.json``."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if training.get("chat_template"):
        tokenizer.chat_template = training["chat_template"]
    return tokenizer


def saved_dtype_name(config_source: str | os.PathLike[str], choice: str = "auto") -> str:
    """``choice``, or for "auto" the dtype the model ``config_source`` (a folder, a Hub id or ``tiny-vi``) was
    published in (bfloat16 when its config does not say)."""
    if choice != "auto":
        return dtype_name(choice)
    from transformers import AutoConfig

    from vinakit.model import resolve_model_name

    config = AutoConfig.from_pretrained(resolve_model_name(str(config_source)))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
    return name if name in ("float32", "float16", "bfloat16") else "bfloat16"


def fit_vocab(model: Any, tokenizer: Any) -> None:
    """Grow the base's embeddings when training added tokens (CPT vocabulary extension), as training did; the
    new rows' values come from the adapter, which trains ``embed_tokens``/``lm_head`` in full."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def load_adapter_model(model_name: str, adapter_dir: Path | None, tokenizer: Any, *, dtype: Any,
                       load_in_4bit: bool = False, prepare: Prepare | None = None, seed: int = 0,
                       adapter_name: str = "default") -> Any:
    """The base ``model_name`` with the adapter on top, unmerged, in eval mode; or the model itself when
    ``adapter_dir`` is None. Loaded with plain transformers + PEFT (the reference of every comparison).

    Args:
        model_name: the 16-bit base (:func:`vinakit.runs.base_model_16bit`) or a full model folder.
        adapter_dir: the adapter folder, or None.
        tokenizer: the adapter's tokenizer (the base's embeddings grow to it), or None.
        dtype: the weights' dtype (for 4-bit: the compute dtype).
        load_in_4bit: load the base in 4-bit (only for the comparison with the naive merge).
        prepare: called on the PEFT model before use (CPT ties its trained embeddings).
        seed: seeds the loader.
        adapter_name: the adapter's name in the PEFT model.
    """
    from vinakit.model import load_model

    model, _ = load_model(model_name, backend="hf", dtype=dtype, load_in_4bit=load_in_4bit, seed=seed)
    if adapter_dir is None:
        return model.eval()
    from peft import PeftModel

    if tokenizer is not None:
        fit_vocab(model, tokenizer)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    if prepare is not None:
        prepare(peft_model)
    return peft_model.eval()


def merged_lora(model_name: str, adapter_dir: Path, tokenizer: Any, *, dtype: Any, prepare: Prepare | None = None,
                seed: int = 0) -> Any:
    """The base in ``dtype`` with the adapter merged into its weights (PEFT ``merge_and_unload``)."""
    model = load_adapter_model(model_name, adapter_dir, tokenizer, dtype=dtype, prepare=prepare, seed=seed)
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    return merged


def cast_model(model: Any, saved_dtype: str) -> Any:
    """The model in ``saved_dtype``, with ``config.dtype`` saying so (what loaders with dtype="auto" pick)."""
    import torch

    model = model.to(getattr(torch, dtype_name(saved_dtype)))
    model.config.dtype = dtype_name(saved_dtype)
    return model


# --------------------------------------------------------------------------------------------------------------
# Merging onto 16/32-bit weights
# --------------------------------------------------------------------------------------------------------------


def merge_to_folder(model_name: str, adapter_dir: Path | None, tokenizer: Any, output: Path, *,
                    saved_dtype: str) -> str:
    """Merge with PEFT onto ``model_name`` loaded in :func:`vinakit.device.merge_dtype` and save the weights in
    ``saved_dtype`` to ``output``; without ``adapter_dir`` the model is re-saved. Returns how it was merged."""
    _save_merged(model_name, adapter_dir, tokenizer, output, saved_dtype)
    free_memory()
    if adapter_dir is None:
        return "re-saved (full model)"
    return f"PEFT merge_and_unload in {dtype_name(merge_dtype(saved_dtype))}"


def _save_merged(model_name: str, adapter_dir: Path | None, tokenizer: Any, output: Path, saved_dtype: str) -> None:
    model = load_adapter_model(model_name, adapter_dir, tokenizer, dtype=merge_dtype(saved_dtype))
    if adapter_dir is not None:
        model = model.merge_and_unload()
    cast_model(model, saved_dtype).save_pretrained(output, safe_serialization=True)


def merge_with_unsloth(adapter_dir: Path, output: Path, *, max_seq_length: int, load_in_4bit: bool,
                       saved_dtype: str) -> str:
    """Merge with Unsloth's ``save_pretrained_merged(..., "merged_16bit")`` (GPU), then cast the saved shards
    to ``saved_dtype`` when Unsloth wrote another dtype. Returns how it was merged."""
    _save_with_unsloth(adapter_dir, output, max_seq_length, load_in_4bit)
    free_memory()
    cast_saved_weights(output, saved_dtype)
    return UNSLOTH_METHOD


def _save_with_unsloth(adapter_dir: Path, output: Path, max_seq_length: int, load_in_4bit: bool) -> None:
    from vinakit.model import import_unsloth

    fast_language_model = import_unsloth()
    # Loaded as trained (4-bit for QLoRA): Unsloth merges the LoRA delta into the original 16-bit weights of the
    # base, which it reads shard by shard, so even models that do not fit in 16-bit on the GPU can be merged.
    model, tokenizer = fast_language_model.from_pretrained(model_name=str(adapter_dir), max_seq_length=max_seq_length,
                                                           load_in_4bit=load_in_4bit, dtype=None)
    model.save_pretrained_merged(str(output), tokenizer, save_method="merged_16bit")


def cast_saved_weights(folder: Path, saved_dtype: str) -> bool:
    """Cast a saved model's floating-point safetensors shards to ``saved_dtype`` one shard at a time (no model
    is loaded) and make ``config.json`` say so. Returns whether anything changed."""
    import torch
    from safetensors.torch import load_file, save_file

    target = dtype_name(saved_dtype)
    config = read_json(folder / "config.json")
    written = config.get("dtype") or config.get("torch_dtype")
    if written and dtype_name(written) == target:
        return False
    total = 0
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {name: value.to(getattr(torch, target)) if value.is_floating_point() else value
                   for name, value in load_file(shard).items()}
        total += sum(value.numel() * value.element_size() for value in tensors.values())
        partial = shard.with_name(shard.name + ".partial")
        save_file(tensors, partial, metadata={"format": "pt"})
        partial.replace(shard)
        del tensors
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path)
        index.setdefault("metadata", {})["total_size"] = total
        write_json(index_path, index)
    config["dtype"] = target
    if "torch_dtype" in config:
        config["torch_dtype"] = target
    write_json(folder / "config.json", config)
    return True


def write_generation_config(output: Path, tokenizer: Any) -> None:
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
# Merging several adapters into one
# --------------------------------------------------------------------------------------------------------------


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
    of rank = the sum of the ranks through an SVD (PEFT's ``ties_svd``). One base model is loaded, in
    :func:`vinakit.device.merge_dtype` of its own dtype.

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
    dirs = [Path(d).expanduser() for d in adapter_dirs]
    weights = _merge_weights(dirs, weights)
    base = _common_base(dirs)
    tokenizer = _common_tokenizer(dirs, base)
    output = Path(output_dir)
    rows = _merge_on_one_base(dirs, base, tokenizer, output, _Recipe(weights, method, density), evaluate)
    free_memory()
    tokenizer.save_pretrained(output)
    info = read_json(dirs[0] / TRAINING_INFO_FILE)
    info.update(merged_from=[str(d) for d in dirs], merge_method=method, merge_weights=list(weights),
                merge_density=density if method == "ties" else None)
    write_json(output / TRAINING_INFO_FILE, info)
    return MergedAdapters(output, _comparison_table(rows) if evaluate else None)


@dataclass(frozen=True)
class _Recipe:
    weights: list[float]
    method: str
    density: float


def _merge_on_one_base(dirs: list[Path], base: str, tokenizer: Any, output: Path, recipe: _Recipe,
                       evaluate: Evaluate | None) -> list[dict[str, Any]]:
    """Load the base once with every adapter, evaluate each, add the weighted one and save it alone."""
    names = [f"adapter_{i}" for i in range(len(dirs))]
    peft_model = load_adapter_model(base, dirs[0], tokenizer, dtype=merge_dtype(saved_dtype_name(base)),
                                    adapter_name=names[0])
    for name, folder in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(str(folder), adapter_name=name)
    rows = [_evaluated(peft_model, tokenizer, name, _adapter_label(folder), evaluate) for name, folder in
            zip(names, dirs)]
    ties = recipe.method == "ties"
    peft_model.add_weighted_adapter(
        names, list(recipe.weights), "merged", combination_type="ties_svd" if ties else "cat",
        svd_rank=sum(peft_model.peft_config[name].r for name in names) if ties else None,
        density=recipe.density if ties else None, svd_full_matrices=False)
    _use_unit_scaling(peft_model, "merged")
    rows.append(_evaluated(peft_model, tokenizer, "merged", f"merged ({recipe.method})", evaluate))
    _save_single_adapter(peft_model, "merged", output)
    return rows


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
        config = read_json(folder / "adapter_config.json")
        if config.get("use_dora"):
            raise ParamsError(f"{folder} is a DoRA adapter: merge_adapters merges plain LoRA adapters only.")
        if config.get("modules_to_save"):
            raise ParamsError(f"{folder} trains whole modules ({config['modules_to_save']}), which cannot be "
                              f"weight-merged with other adapters; merge the LoRA-only adapters.")
        base = base_model_16bit(find_run(folder))
        bases[folder] = str(Path(base).resolve()) if Path(base).exists() else base
    if len(set(bases.values())) != 1:
        listing = "; ".join(f"{folder}: {base}" for folder, base in bases.items())
        raise ParamsError(f"Adapters can only be merged when they share a base model, got {listing}.")
    return next(iter(bases.values()))


def _common_tokenizer(dirs: list[Path], base: str) -> Any:
    tokenizers = [adapter_tokenizer(d, base, read_json(d / TRAINING_INFO_FILE)) for d in dirs]
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
