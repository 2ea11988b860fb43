"""Model loading on two backends, LoRA, and the embedded ``tiny-vi`` model.

Backends:

* ``"unsloth"``: ``unsloth.FastLanguageModel`` (fast on a GPU; Unsloth 2026.10.9 also runs on a CPU).
* ``"hf"``: plain transformers + PEFT + bitsandbytes, for machines or models Unsloth does not support and for
  ``accelerate launch`` on several GPUs.

Both return a ``(model, tokenizer)`` pair and are driven by the same arguments, so a notebook switches with
one parameter. The tokenizer keeps its own chat template (``vinakit.chat`` chooses templates).

Nothing heavy is imported at module level: Unsloth must be imported before transformers, so each function
imports what it needs, Unsloth first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Literal

from vinakit.device import is_distributed, local_device_map
from vinakit.errors import ParamsError, VinakitError
from vinakit.families import FAMILY_PREFIX, is_tiny_name, tiny_family_dir, tiny_model_names, unsloth_refusal
from vinakit.tiny import TINY_MODEL_NAME, tiny_model_dir

Backend = Literal["unsloth", "hf"]
BACKENDS: tuple[str, ...] = ("unsloth", "hf")

ALL_LINEAR = "all-linear"

__all__ = [
    "ALL_LINEAR", "BACKENDS", "Backend", "adapter_base_model", "add_lora", "back_to_training", "display_name",
    "adapter_modules", "embedding_module_names", "import_unsloth", "set_trust_remote_code", "usable_backend",
    "load_for_inference", "load_model", "lora_target_modules", "pick_dtype",
    "prepare_for_inference", "prepare_for_training", "resolve_model_name", "tiny_model_dir",
    "trainable_parameter_summary",
]


# --------------------------------------------------------------------------------------------------------------
# Names, devices and dtypes
# --------------------------------------------------------------------------------------------------------------


def resolve_model_name(model_name: str) -> str:
    """Turn ``model_name`` into what a loader takes: a local folder or a Hugging Face Hub id.

    Args:
        model_name: ``"tiny-vi"``, a local model folder, a training run folder that hands over a model (a CPT
            run: its ``model/``), or a hub id such as ``"unsloth/Qwen2.5-0.5B"``.

    Returns:
        The folder path (as a string) or the hub id unchanged.

    Raises:
        VinakitError: the name is written as a path (``./x``, ``/x``, ``~/x``) but no such folder exists.
    """
    if is_tiny_name(model_name) or (model_name.startswith(FAMILY_PREFIX) and "/" not in model_name
                                    and not Path(model_name).is_dir()):
        return str(tiny_family_dir(model_name))  # an unknown tiny-<name> is an error listing the known ones
    path = Path(model_name).expanduser()
    if path.is_dir():
        from vinakit.runs import model_folder  # the one rule for what a run folder stands for

        return str(model_folder(path))
    if _looks_like_path(model_name):
        raise VinakitError(f"Model folder {model_name!r} does not exist. Give an existing folder, "
                           f"one of {', '.join(tiny_model_names())}, or a Hugging Face Hub id like "
                           f"'unsloth/Qwen2.5-0.5B-Instruct'.")
    return model_name


def display_name(model_name: str) -> str:
    """A short name for titles and tables: ``Llama-3.2-1B-Instruct`` for ``unsloth/Llama-3.2-1B-Instruct``,
    ``cpt-20261129-1655/model`` for ``/abs/outputs/cpt-20261129-1655/model``, ``tiny-vi`` for its cache folder."""
    path = Path(str(model_name).rstrip("/\\"))
    if is_tiny_name(model_name):
        return model_name
    for name in tiny_model_names():
        if path.name.startswith(f"{name}-r"):  # a cached build: tiny-vi-r<recipe>-c<corpus>
            return name
    if path.name in ("model", "adapter", "merged_16bit") and path.parent.name:
        return f"{path.parent.name}/{path.name}"  # a run folder's output: the run names it
    return path.name or str(model_name)


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with a separator is meant as a folder.
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ParamsError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")


def _cuda_available() -> bool:
    from vinakit.device import active_profile

    return active_profile().is_gpu


def pick_dtype(dtype: Any = None, *, full_finetuning: bool = False) -> Any:
    """The torch dtype to load weights in, as the device policy decides (:func:`vinakit.device.load_dtype`).

    Args:
        dtype: ``None`` or ``"auto"`` to choose (float32 on CPU; bfloat16 on a GPU with native bf16, else
            float16), a name (``"float32"``, ``"bf16"``, ``"fp16"`` ...) or a ``torch.dtype``.
        full_finetuning: every weight is trained (float32 master weights on a GPU without bf16).

    Returns:
        A ``torch.dtype``.

    Raises:
        ParamsError: unknown dtype name, or bfloat16 on a GPU without native bf16.
    """
    from vinakit.device import load_dtype

    return load_dtype(requested=dtype, full_finetuning=full_finetuning)


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_model(
    model_name: str,
    *,
    backend: Backend = "unsloth",
    max_seq_length: int = 2048,
    load_in_4bit: bool = False,
    full_finetuning: bool = False,
    dtype: Any = None,
    seed: int = 0,
    trust_remote_code: bool | None = None,
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer for training.

    Args:
        model_name: ``"tiny-vi"`` (the embedded model), a local folder, or a Hugging Face Hub id.
        backend: ``"unsloth"`` or ``"hf"`` (transformers + PEFT + bitsandbytes).
        max_seq_length: longest sequence the run will use (Unsloth sizes its kernels with it; both backends
            set it as the tokenizer's ``model_max_length``).
        load_in_4bit: quantise linear layers to NF4 with bitsandbytes (QLoRA).
        full_finetuning: train every weight instead of a LoRA adapter (needs 16/32-bit weights).
        dtype: weight dtype; ``None`` chooses per device (see :func:`pick_dtype`).
        seed: seeds Python, NumPy and torch before loading.
        trust_remote_code: run the modeling code a model folder brings (``auto_map``: PhoGPT does); None takes
            the notebook's choice (:func:`set_trust_remote_code`, False unless set). Such models load on the hf
            backend.

    Returns:
        ``(model, tokenizer)``; with ``load_in_4bit`` on the hf backend the model is already prepared with
        ``peft.prepare_model_for_kbit_training``.

    Raises:
        ParamsError: unknown backend or dtype, or 4-bit together with full fine-tuning.
        VinakitError: the model could not be found or loaded (wraps the backend's error), or it brings its own
            modeling code and ``trust_remote_code`` is off (the message names the parameter).
    """
    _check_backend(backend)
    if full_finetuning and load_in_4bit:
        raise ParamsError("full_finetuning cannot train 4-bit weights: set load_in_4bit to False.")
    allowed = _TRUST_REMOTE_CODE[0] if trust_remote_code is None else trust_remote_code
    backend = usable_backend(model_name, backend)  # decided before Unsloth patches anything: never half-patched
    if backend == "unsloth":
        import_unsloth()  # before anything below imports transformers
    source = resolve_model_name(model_name)
    _check_remote_code(model_name, allowed)
    torch_dtype = pick_dtype(dtype, full_finetuning=full_finetuning)
    _seed_everything(seed)
    loader = _load_with_unsloth if backend == "unsloth" else _load_with_hf
    extra = {"trust_remote_code": True} if allowed else {}
    try:
        return loader(source, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit,
                      full_finetuning=full_finetuning, dtype=torch_dtype, **extra)
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, VinakitError):
            raise
        raise VinakitError(_load_failure_message(model_name, source, backend, error)) from error


# The notebook's trust_remote_code, for loads deep inside a step (export's merge loads the base model again).
_TRUST_REMOTE_CODE = [False]


def set_trust_remote_code(allowed: bool) -> None:
    """Allow (or forbid) custom modeling code for every later :func:`load_model` in this process.

    Each notebook step that loads a model calls it with the notebook's ``trust_remote_code`` parameter, so loads
    made by building blocks (merging, fidelity) follow the same choice without threading it through each call.
    """
    _TRUST_REMOTE_CODE[0] = bool(allowed)


def usable_backend(model_name: str, backend: str) -> str:
    """``backend``, or ``"hf"`` with one line saying why when Unsloth does not patch this model's architecture.

    Decided from the model's ``config.json`` before Unsloth is imported, so a run is never half patched.
    """
    if backend != "unsloth":
        return backend
    reason = unsloth_refusal(model_name)
    if reason is None:
        return backend
    print(f"vinakit: using backend 'hf' instead of 'unsloth' for {display_name(model_name)}: {reason}.", flush=True)
    return "hf"


def _check_remote_code(model_name: str, allowed: bool) -> None:
    from vinakit.families import custom_code_files

    files = custom_code_files(model_name)
    if files and not allowed:
        raise VinakitError(
            f"Model {model_name!r} brings its own modeling code ({', '.join(files)}), which runs only with "
            f"trust_remote_code: true. Read that code first; then set the parameter trust_remote_code to true "
            f"(-p trust_remote_code true) to load it on the hf backend.")


def _load_failure_message(model_name: str, source: str, backend: str, error: BaseException) -> str:
    if "trust_remote_code" in str(error):
        return (f"Model {model_name!r} needs its own modeling code: set the parameter trust_remote_code to true "
                f"(-p trust_remote_code true) once you have read that code. ({error})")
    if Path(source).is_dir():
        return f"Could not load the model in folder {source} with backend {backend!r}: {error}"
    if not isinstance(error, OSError):  # found, but failed later (memory, unsupported architecture ...)
        return f"Could not load model {model_name!r} with backend {backend!r}: {error}"
    return (f"Could not load model {model_name!r} with backend {backend!r}. It is not a local folder, so it was "
            f"looked up on the Hugging Face Hub, which failed: {error}\nCheck the spelling, the network (or set "
            f"HF_HUB_OFFLINE=1 to use only the local cache), and HF_TOKEN for gated models; or use "
            f"'{TINY_MODEL_NAME}' to run without the Hub.")


def import_unsloth() -> Any:
    try:
        import unsloth  # noqa: F401  (patches transformers/trl/peft on import)
        from unsloth import FastLanguageModel
    except ImportError as error:
        raise VinakitError(f"backend 'unsloth' needs the unsloth package, which failed to import ({error}). "
                           f"Install it (see requirements-unsloth.txt) or use backend 'hf'.") from error
    return FastLanguageModel


def _load_with_unsloth(source: str, *, max_seq_length: int, load_in_4bit: bool, full_finetuning: bool,
                       dtype: Any, trust_remote_code: bool = False) -> tuple[Any, Any]:
    fast_language_model = import_unsloth()
    extra: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    if is_distributed():
        extra["device_map"] = local_device_map()
    return fast_language_model.from_pretrained(
        model_name=source, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
        full_finetuning=full_finetuning, **extra)


def _load_with_hf(source: str, *, max_seq_length: int, load_in_4bit: bool, full_finetuning: bool,
                  dtype: Any, trust_remote_code: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    device_map = local_device_map()
    if device_map is not None:
        kwargs["device_map"] = device_map
    if load_in_4bit:
        kwargs["quantization_config"] = _nf4_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer.model_max_length = max_seq_length
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # Checkpointing saves GPU memory; on a CPU it only costs time.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_cuda_available())
    if full_finetuning:
        model.requires_grad_(True)
    return model, tokenizer


def _nf4_config(dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    # dtype comes from the device policy: float32 on a CPU, the GPU's 16-bit type otherwise.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# LoRA and full fine-tuning
# --------------------------------------------------------------------------------------------------------------


def lora_target_modules(model: Any, target_modules: str | Iterable[str] = ALL_LINEAR) -> list[str]:
    """Expand and check LoRA target module names.

    Args:
        model: the loaded model.
        target_modules: ``"all-linear"`` (every linear projection: q, k, v, o, gate, up, down; never the
            output head), a comma-separated string or a list of module names; ``"all-linear"`` may be combined
            with extra names, e.g. ``"all-linear,lm_head"``.

    Returns:
        Sorted unique module names.

    Raises:
        ParamsError: a name matches no module of the model.
    """
    names = _split_names(target_modules)
    linear = _linear_projection_names(model)
    known = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    expanded: set[str] = set()
    for name in names:
        if name == ALL_LINEAR:
            expanded |= linear
        elif name in known:
            expanded.add(name)
        else:
            raise ParamsError(f"target_modules: the model has no module named {name!r}. Use '{ALL_LINEAR}' or "
                              f"some of {sorted(linear)}.")
    if not expanded:
        raise ParamsError(f"target_modules is empty: use '{ALL_LINEAR}' or some of {sorted(linear)}.")
    return sorted(expanded)


def embedding_module_names(model: Any) -> list[str]:
    """The names of the input embeddings and the output head, as ``modules_to_save`` takes them.

    ``["embed_tokens", "lm_head"]`` for Llama, Qwen, Gemma, Mistral and Phi-3; ``["wte", "lm_head"]`` for MPT.
    """
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    found = [names.get(id(model.get_input_embeddings()))]
    output = model.get_output_embeddings()
    if output is not None:
        found.append(names.get(id(output)))
    return [name for name in found if name]


def adapter_modules(model: Any) -> dict[str, list[str]]:
    """The module names the adapter resolved to (``all-linear`` expanded per family), for the run manifest.

    Returns:
        ``{"target_modules": [...], "modules_to_save": [...]}``; empty lists for a model without an adapter.
    """
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return {"target_modules": [], "modules_to_save": []}
    targets = config.target_modules
    return {"target_modules": sorted(targets) if not isinstance(targets, str) else [targets],
            "modules_to_save": sorted(config.modules_to_save or [])}


def _split_names(names: str | Iterable[str] | None) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return [name.strip() for name in names if name and name.strip()]


def _linear_projection_names(model: Any) -> set[str]:
    import torch

    output_head = model.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        # bitsandbytes' Linear4bit subclasses nn.Linear, so QLoRA models match too.
        if isinstance(module, torch.nn.Linear) and module is not output_head
    }


def add_lora(
    model: Any,
    *,
    backend: Backend,
    rank: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: str | Iterable[str] = ALL_LINEAR,
    use_rslora: bool = False,
    use_dora: bool = False,
    modules_to_save: str | Iterable[str] | None = None,
    seed: int = 0,
) -> Any:
    """Wrap ``model`` in a LoRA adapter; only the adapter (and ``modules_to_save``) is then trainable.

    Args:
        model: a model from :func:`load_model` with the same backend.
        backend: ``"unsloth"`` (``FastLanguageModel.get_peft_model``) or ``"hf"`` (``peft.get_peft_model``).
        rank: LoRA rank r.
        lora_alpha: LoRA scaling numerator (alpha / r, or alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout on the adapter input.
        target_modules: see :func:`lora_target_modules`.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: weight-decomposed LoRA (DoRA).
        modules_to_save: modules trained in full and saved with the adapter, e.g. ``["embed_tokens",
            "lm_head"]`` for continued pretraining (a comma-separated string works too).
        seed: seeds the adapter's random initialisation.

    Returns:
        The PEFT model.

    Raises:
        ParamsError: bad backend, rank, dropout or module names.
    """
    _check_backend(backend)
    if rank < 1:
        raise ParamsError(f"LoRA rank must be >= 1, got {rank}.")
    if not 0.0 <= lora_dropout < 1.0:
        raise ParamsError(f"lora_dropout must be in [0, 1), got {lora_dropout}.")
    targets = _without_tied_head(model, lora_target_modules(model, target_modules))
    saved = _split_names(modules_to_save) or None
    if backend == "unsloth":
        fast_language_model = import_unsloth()
        return fast_language_model.get_peft_model(
            model, r=rank, target_modules=targets, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias="none", use_gradient_checkpointing="unsloth" if _cuda_available() else False,
            random_state=seed, use_rslora=use_rslora, use_dora=use_dora, modules_to_save=saved)
    from peft import LoraConfig, get_peft_model

    _seed_everything(seed)
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                        use_rslora=use_rslora, use_dora=use_dora, modules_to_save=saved, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _without_tied_head(model: Any, targets: list[str]) -> list[str]:
    """``targets`` without the output head when it shares its weight with the input embeddings (Gemma, Qwen-small,
    SmolLM, MPT): merging a LoRA into that one weight would change the inputs too, and the merged model would no
    longer be the trained one (PEFT 0.21 merges it so). Train tied embeddings in full instead (CPT does)."""
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        return targets
    head = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is output}
    if not head & set(targets):
        return targets
    print(f"vinakit: no LoRA on {', '.join(sorted(head))}: it is tied to the input embeddings, and a merged LoRA "
          f"would change both; the other {len(set(targets) - head)} target modules keep theirs.", flush=True)
    return [name for name in targets if name not in head]


def prepare_for_training(model: Any, params: Any, *, modules_to_save: str | Iterable[str] | None = None) -> Any:
    """Make ``model`` ready to train as ``params`` says: a LoRA adapter, or every weight (full fine-tuning).

    This is the one place that decides between the two, so notebooks never branch on it.

    Args:
        model: a model from :func:`load_model` loaded with the same ``params``.
        params: an object with the fields of ``vinakit.params.LoraParams``: ``backend``, ``full_finetuning``,
            ``rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_rslora``, ``use_dora``,
            ``seed``.
        modules_to_save: modules trained in full beside the adapter (see :func:`add_lora`); defaults to
            ``params.modules_to_save`` when ``params`` has that field.

    Returns:
        The model to train (a PEFT model unless full fine-tuning).
    """
    if params.full_finetuning:
        return model  # load_model(full_finetuning=True) already left every weight trainable
    return add_lora(
        model, backend=params.backend, rank=params.rank, lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout, target_modules=params.target_modules, use_rslora=params.use_rslora,
        use_dora=params.use_dora, modules_to_save=modules_to_save or getattr(params, "modules_to_save", None),
        seed=params.seed)


# --------------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------------


def load_for_inference(
    model_name_or_adapter_dir: str | os.PathLike[str],
    *,
    backend: Backend = "unsloth",
    max_seq_length: int = 2048,
    load_in_4bit: bool = False,
    dtype: Any = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Load a model for generation: a base model, or a saved adapter folder on top of its base model.

    An adapter folder is one with ``adapter_config.json``; its ``base_model_name_or_path`` names the base.
    When the adapter folder holds a tokenizer (saved with its chat template), that tokenizer is used, so
    inference renders prompts exactly as training did.

    Args:
        model_name_or_adapter_dir: ``"tiny-vi"``, a model folder, a hub id, or an adapter folder.
        backend: ``"unsloth"`` or ``"hf"``.
        max_seq_length: see :func:`load_model`.
        load_in_4bit: load the base model in 4 bit.
        dtype: see :func:`pick_dtype`.
        seed: see :func:`load_model`.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.
    """
    name = str(model_name_or_adapter_dir)
    backend = usable_backend(name, backend)  # an adapter folder: its base model decides
    adapter_dir = _adapter_folder(name)
    if adapter_dir is None:
        model, tokenizer = load_model(name, backend=backend, max_seq_length=max_seq_length,
                                      load_in_4bit=load_in_4bit, dtype=dtype, seed=seed)
    else:
        model, tokenizer = _load_adapter(adapter_dir, backend=backend, max_seq_length=max_seq_length,
                                         load_in_4bit=load_in_4bit, dtype=dtype, seed=seed)
    return prepare_for_inference(model, backend=backend), tokenizer


def _adapter_folder(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if (path / "adapter_config.json").is_file() else None


def adapter_base_model(adapter_dir: str | os.PathLike[str]) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path``).

    Raises:
        VinakitError: the adapter config is unreadable or names no base model.
    """
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise VinakitError(f"Cannot read {config_path}: {error}") from error
    if not base:
        raise VinakitError(f"{config_path} names no base model (base_model_name_or_path is empty).")
    return base


def _load_adapter(adapter_dir: Path, *, backend: Backend, max_seq_length: int, load_in_4bit: bool,
                  dtype: Any, seed: int) -> tuple[Any, Any]:
    _check_backend(backend)
    if backend == "unsloth":
        import_unsloth()
    base = adapter_base_model(adapter_dir)
    if not Path(base).is_dir() and Path(base).name.startswith(FAMILY_PREFIX) and display_name(base) != base:
        raise VinakitError(f"The adapter in {adapter_dir} was trained on a {display_name(base)} build at {base}, "
                           f"which is no longer there (the cache was cleared or the sample data changed). Retrain it.")
    model, tokenizer = load_model(base, backend=backend, max_seq_length=max_seq_length,
                                  load_in_4bit=load_in_4bit, dtype=dtype, seed=seed)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        tokenizer.model_max_length = max_seq_length
    return model, tokenizer


def prepare_for_inference(model: Any, *, backend: Backend) -> Any:
    """Switch a loaded or just-trained model to generation: eval mode, Unsloth's fast inference path.

    Args:
        model: a model from :func:`load_model` (with or without an adapter) on ``backend``.
        backend: ``"unsloth"`` or ``"hf"``.

    Returns:
        The same model, in eval mode.
    """
    _check_backend(backend)
    if backend == "unsloth":
        fast_language_model = import_unsloth()
        fast_language_model.for_inference(model)
    model.eval()
    return model


def back_to_training(model: Any, *, backend: Backend) -> Any:
    """Undo :func:`prepare_for_inference`: Unsloth's training path again, training mode."""
    _check_backend(backend)
    if backend == "unsloth":
        import_unsloth().for_training(model)
    model.train()
    return model


# --------------------------------------------------------------------------------------------------------------
# Summaries (JSON-ready, for the run manifest and the notebooks)
# --------------------------------------------------------------------------------------------------------------


def trainable_parameter_summary(model: Any) -> dict[str, Any]:
    """Count trainable and total parameters; 4-bit weights count as their unpacked size.

    Returns:
        ``{"trainable": int, "total": int, "share": float}`` (share of trainable parameters, 0..1).
    """
    trainable = total = 0
    for parameter in model.parameters():
        count = _parameter_count(parameter)
        total += count
        if parameter.requires_grad:
            trainable += count
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}


def _parameter_count(parameter: Any) -> int:
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        # bitsandbytes packs two 4-bit values per byte; the quant state keeps the real shape.
        count = 1
        for size in shape:
            count *= int(size)
        return count
    return int(parameter.numel())
