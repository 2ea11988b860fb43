"""Notebook parameters: one frozen dataclass per notebook, validated the same way everywhere.

A notebook's ``parameters`` cell holds annotated literals (papermill overrides them); the next cell calls
``<Params>.from_namespace(globals())``, which collects those names, rejects unknown ones (suggesting the
closest valid name) and wrong types, and returns the frozen dataclass. ``vinakit run`` calls the same
validation before a kernel starts, so a typo fails in well under a second.

YAML presets in ``params/`` may hold keys for several notebooks: a top-level key applies to every notebook
that has that field, a section named after a notebook (``sft:``, ``cpt:`` ...) applies to that notebook only.
This module imports nothing heavy on purpose.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import yaml

from vinakit.errors import ParamsError

# Names IPython puts into a notebook's globals that are not parameters.
_IPYTHON_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


def _closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(name: str, value: Any, tp: Any, source: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ParamsError."""
    origin = typing.get_origin(tp)
    where = f" (from {source})" if source else ""
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _closest(str(value), [str(c) for c in choices])
            suggestion = f" Did you mean {hint!r}?" if hint else ""
            raise ParamsError(f"Parameter '{name}'{where} must be one of {list(choices)}, got {value!r}.{suggestion}")
        return value
    if origin in (list, tuple):
        (item_type,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"Parameter '{name}'{where} must be a list of {_type_name(item_type)}, "
                              f"got {type(value).__name__} {value!r}.")
        return [_check_value(f"{name}[{i}]", v, item_type, source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"Parameter '{name}'{where} must be a mapping, got {type(value).__name__}.")
        return dict(value)
    if tp is float:
        value = _float_from_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"Parameter '{name}'{where} must be a number, got {type(value).__name__} {value!r}.")
        return _finite(name, value, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"Parameter '{name}'{where} must be an integer, got {type(value).__name__} {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"Parameter '{name}'{where} must be true or false, got {type(value).__name__} "
                              f"{value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"Parameter '{name}'{where} must be a string, got {type(value).__name__} {value!r}.")
        return value
    return value


# A float as YAML 1.2 writes it. PyYAML reads YAML 1.1, where a float needs a dot: `1e-3` arrives as a string.
_FLOAT_TEXT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _float_from_text(value: Any) -> Any:
    """``value`` as a float when it is a string that YAML 1.2 reads as one (``"1e-3"``), else unchanged."""
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def _finite(name: str, value: Any, where: str) -> Any:
    """``value`` as a float; inf and nan are refused (``-p learning_rate inf`` trained NaN weights to the end)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value  # the type check reports it
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ParamsError(f"Parameter '{name}'{where} must be a finite number, got {value!r}: inf and nan are not "
                          f"allowed; give a plain number such as 2e-4.")
    return number


def _parse_cli_value(text: str, tp: Any) -> Any:
    """Turn a command-line string into the field's type (YAML rules, plus floats like 2e-4)."""
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return text
    if tp is float:
        try:
            return float(text)
        except ValueError:
            return text  # let validation report it with the field name
    return yaml.safe_load(text)


@dataclass(frozen=True)
class NotebookParams:
    """Base class: validation, YAML and namespace loading shared by every notebook's parameters."""

    notebook: ClassVar[str] = ""

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    @classmethod
    def validate(cls, values: Mapping[str, Any], source: str = "") -> "NotebookParams":
        """Build the dataclass from ``values``; unknown names and wrong types raise ParamsError."""
        types_ = cls.field_types()
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name not in types_:
                hint = _closest(name, types_)
                suggestion = f" Did you mean '{hint}'?" if hint else ""
                where = f" in {source}" if source else ""
                raise ParamsError(f"Unknown parameter '{name}'{where} for the {cls.notebook} notebook.{suggestion} "
                                  f"Valid names: {', '.join(sorted(types_))}.")
            checked[name] = _check_value(name, value, types_[name], source)
        return cls(**checked)

    def __post_init__(self) -> None:
        for name, tp in self.field_types().items():  # also when built directly, without validate()
            if tp is float or typing.get_args(tp) == (float,):
                value = getattr(self, name)
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    _finite(name, item, "")
        self.check()

    def check(self) -> None:
        """Cross-field checks; subclasses extend. Raise ParamsError with what to change."""

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> "NotebookParams":
        """Collect the parameters from a notebook's ``globals()`` (after papermill's injected cell).

        Names of other notebooks' parameters (from a shared YAML file) are ignored; a section named after this
        notebook is merged in; anything else unknown is an error naming the closest valid parameter.
        """
        values = {}
        for name, value in namespace.items():
            # Parameters are literals; objects made by later cells (a model, the run) are not, so re-running
            # this cell in an interactive session does not mistake them for parameters.
            if name.startswith("_") or name in _IPYTHON_NAMES or type(value) not in _LITERAL_TYPES:
                continue
            values[name] = value
        return cls.validate(_select_for_notebook(cls, values, "the notebook"), source="the notebook")

    @classmethod
    def from_sources(cls, yaml_files: typing.Sequence[str | Path] = (),
                     overrides: typing.Sequence[tuple[str, str]] = ()) -> "NotebookParams":
        """Resolve YAML files (later ones win) then ``-p NAME VALUE`` overrides (strings from a command line)."""
        values = cls.yaml_values(yaml_files)
        types_ = cls.field_types()
        for name, text in overrides:
            if name not in types_:
                hint = _closest(name, types_)
                suggestion = f" Did you mean '{hint}'?" if hint else ""
                raise ParamsError(f"Unknown parameter '{name}' (from -p) for the {cls.notebook} notebook."
                                  f"{suggestion}")
            values[name] = _parse_cli_value(text, types_[name])
        return cls.validate(values, source="the command line")

    @classmethod
    def yaml_values(cls, yaml_files: typing.Sequence[str | Path]) -> dict[str, Any]:
        """The values the YAML files give this notebook (validated, not yet turned into the dataclass)."""
        values: dict[str, Any] = {}
        for path in yaml_files:
            raw = read_yaml(path)
            selected = _select_for_notebook(cls, raw, str(path))
            cls.validate(selected, source=str(path))  # report errors against the right file
            values.update(selected)
        return values

    def to_dict(self) -> dict[str, Any]:
        """Plain values, ready for YAML/JSON and for papermill's ``parameters``."""
        return dataclasses.asdict(self)


_LITERAL_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file; it must be a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"Params file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"Params file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"Params file {path} must hold a mapping of parameter names to values.")
    return data


def _select_for_notebook(cls: type[NotebookParams], raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Pick this notebook's values from a mapping that may hold several notebooks' parameters."""
    own = cls.field_types()
    everyone = set().union(*(c.field_types() for c in NOTEBOOK_PARAMS.values()))
    selected: dict[str, Any] = {}
    section: dict[str, Any] = {}
    for name, value in raw.items():
        if name in NOTEBOOK_PARAMS:
            if not isinstance(value, dict):
                raise ParamsError(f"Section '{name}' in {source} must be a mapping of parameters.")
            if name == cls.notebook:
                section = dict(value)
        elif name in own:
            selected[name] = value
        elif name not in everyone:
            hint = _closest(name, everyone | set(NOTEBOOK_PARAMS))
            suggestion = f" Did you mean '{hint}'?" if hint else ""
            raise ParamsError(f"Unknown parameter '{name}' in {source}.{suggestion}")
    for key in section:
        if key not in own:
            hint = _closest(key, own)
            suggestion = f" Did you mean '{hint}'?" if hint else ""
            raise ParamsError(f"Unknown parameter '{key}' in section '{cls.notebook}' of {source}.{suggestion}")
    selected.update(section)  # a notebook's own section wins over shared top-level keys
    return selected


# --------------------------------------------------------------------------------------------------------------
# Shared fields
# --------------------------------------------------------------------------------------------------------------

Backend = Literal["unsloth", "hf"]
ToneStyle = Literal["old", "new", "off"]


@dataclass(frozen=True)
class RunParams(NotebookParams):
    """Fields every notebook has: where the run goes and how text is cleaned."""

    run_name: str = ""
    output_dir: str = "outputs"
    seed: int = 3407
    skip_bad_rows: bool = False
    normalize_text: bool = True
    tone_style: ToneStyle = "old"

    def check(self) -> None:
        super().check()
        if "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
            raise ParamsError(f"run_name {self.run_name!r} must be a plain folder name (no slashes).")


@dataclass(frozen=True)
class ModelParams(RunParams):
    """Fields of notebooks that load a model."""

    model_name: str = "unsloth/Llama-3.2-1B-Instruct"
    backend: Backend = "unsloth"
    load_in_4bit: bool = True
    max_seq_length: int = 2048
    chat_template: str = ""
    trust_remote_code: bool = False

    def check(self) -> None:
        super().check()
        if self.max_seq_length < 16:
            raise ParamsError(f"max_seq_length must be at least 16, got {self.max_seq_length}.")
        _backend_unsloth_patches(self, self.model_name)


def _backend_unsloth_patches(params: Any, model_name: str) -> None:
    """Derive ``backend: hf`` (one line says why) for a model Unsloth does not patch (MPT, custom modeling code).

    Decided here, before any step runs, so that loading, training, generation and the record all use one backend
    and a run is never half patched; the resolved params.yaml and the manifest show the backend used.
    """
    if params.backend != "unsloth" or not model_name:
        return
    from vinakit.families import unsloth_refusal  # light: reads config.json, imports no torch

    reason = unsloth_refusal(model_name)
    if reason:
        object.__setattr__(params, "backend", "hf")  # a derived value, like the dataclass's other derivations
        print(f"vinakit: using backend 'hf' instead of 'unsloth' for {model_name}: {reason}.", flush=True)


@dataclass(frozen=True)
class LoraParams(ModelParams):
    """Fields of notebooks that train."""

    full_finetuning: bool = False
    rank: int = 128
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    use_rslora: bool = True
    use_dora: bool = False
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.01
    optim: str = "adamw_8bit"
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 200
    save_total_limit: int = 2
    group_by_length: bool = True
    resume_from: str = ""

    def check(self) -> None:
        super().check()
        if self.rank < 1 and not self.full_finetuning:
            raise ParamsError(f"rank must be >= 1, got {self.rank}.")
        if self.learning_rate <= 0:
            raise ParamsError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ParamsError("Set max_steps > 0, or max_steps: -1 with num_train_epochs > 0.")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "eval_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ParamsError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.full_finetuning and self.load_in_4bit:
            raise ParamsError("full_finetuning cannot train 4-bit weights: set load_in_4bit: false.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ParamsError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")


# --------------------------------------------------------------------------------------------------------------
# Per-notebook parameters
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTParams(LoraParams):
    """Parameters of ``notebooks/sft.ipynb``: chat-template SFT with loss on assistant responses."""

    notebook: ClassVar[str] = "sft"

    dataset: str = "vinakit:chat"
    val_dataset: str = ""
    val_size: float = 0.05
    train_on: Literal["assistant", "last", "all"] = "assistant"
    sample_prompts: list[str] = field(default_factory=lambda: [
        "Giới thiệu ngắn gọn về Hà Nội.",
        "Hệ điều hành là gì?",
    ])
    max_new_tokens: int = 128
    preview_examples: int = 3

    def check(self) -> None:
        super().check()
        _check_val_size(self.val_size, "rows")

    @property
    def val_split(self) -> float | int:
        """``val_size`` as the data loader wants it: a fraction, or a row count when >= 1."""
        return _as_split(self.val_size)


def _check_val_size(val_size: float, unit: str, *, zero_allowed: bool = True) -> None:
    """A validation share is a fraction up to one half, or a whole number of ``unit`` (rows, pairs ...)."""
    too_small = val_size < 0 or (val_size == 0 and not zero_allowed)
    if too_small or val_size > 0.5 and not float(val_size).is_integer():
        interval = "[0, 0.5]" if zero_allowed else "(0, 0.5]"
        raise ParamsError(f"val_size must be a fraction in {interval} or a whole number of {unit}, got {val_size}.")


def _as_split(val_size: float) -> float | int:
    return int(val_size) if val_size >= 1 else val_size


SaveMethod = Literal["lora", "merged_16bit", "gguf"]
# llama.cpp quantisation types Unsloth's GGUF export accepts without an importance matrix (the common ones).
GGUF_QUANTIZATIONS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1",
                      "q5_k_s", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32")


@dataclass(frozen=True)
class ExportParams(RunParams):
    """Parameters of ``notebooks/export.ipynb``: keep the adapter, merge onto 16-bit, check fidelity, publish."""

    notebook: ClassVar[str] = "export"

    adapter: str = ""
    backend: Backend = "unsloth"
    max_seq_length: int = 2048
    trust_remote_code: bool = False
    save_methods: list[SaveMethod] = field(default_factory=lambda: ["merged_16bit"])
    merged_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    gguf_quantizations: list[str] = field(default_factory=lambda: ["q4_k_m", "q8_0"])
    merge_with: list[str] = field(default_factory=list)
    merge_weights: list[float] = field(default_factory=list)
    merge_method: Literal["linear", "ties"] = "linear"
    merge_density: float = 0.5
    fidelity_dataset: str = ""
    fidelity_rows: int = 16
    fidelity_max_tokens: int = 256
    max_logit_diff: float = 1.0
    max_kl: float = 0.01
    compare_naive_4bit: bool = True
    push_to_hub: bool = False
    repo_id: str = ""
    private: bool = True
    eval_run: str = ""
    license: str = ""

    def check(self) -> None:
        super().check()
        self._check_outputs()
        self._check_merge()
        self._check_fidelity()
        _backend_unsloth_patches(self, self.adapter)  # the adapter's base decides (empty: the newest run, later)

    def _check_outputs(self) -> None:
        if not self.save_methods or len(set(self.save_methods)) != len(self.save_methods):
            raise ParamsError(f"save_methods must list each of lora, merged_16bit, gguf at most once and not be "
                              f"empty, got {self.save_methods}.")
        for name in self.gguf_quantizations:
            if name not in GGUF_QUANTIZATIONS:
                hint = _closest(name.lower(), GGUF_QUANTIZATIONS)
                suggestion = f" Did you mean {hint!r}?" if hint else ""
                raise ParamsError(f"gguf_quantizations: unknown type {name!r}.{suggestion} Known: "
                                  f"{', '.join(GGUF_QUANTIZATIONS)}.")
        if "gguf" in self.save_methods and not self.gguf_quantizations:
            raise ParamsError("save_methods has gguf but gguf_quantizations is empty: list e.g. [q4_k_m, q8_0].")
        if self.push_to_hub and not self.repo_id:
            raise ParamsError("push_to_hub is true but repo_id is empty: set repo_id to 'your-user/model-name'.")
        self._check_repo_id()

    def _check_repo_id(self) -> None:
        """The Hub's naming rules, here rather than after the merge and the fidelity check have spent minutes."""
        if not self.repo_id:
            return
        problem = _repo_id_problem(self.repo_id)
        if not problem and self.push_to_hub and len(self.save_methods) > 1:
            # publish.repo_names puts the other forms in "<repo_id>-lora" / "<repo_id>-GGUF": they must fit too
            sibling = _repo_id_problem(f"{self.repo_id}-GGUF")
            problem = f"{sibling} once '-GGUF' (or '-lora') is added for the second repo" if sibling else ""
        if problem:
            raise ParamsError(f"repo_id {self.repo_id!r} breaks the Hugging Face Hub's naming rules: {problem}. "
                              f"Use 'owner/name' with letters, digits, '-', '_' and '.', no '--' or '..', not "
                              f"starting or ending with '-' or '.', at most {_REPO_PART_MAX} characters each, "
                              f"e.g. 'your-user/qwen2.5-vi-sft'.")

    def _check_merge(self) -> None:
        if self.merge_weights and not self.merge_with:
            raise ParamsError("merge_weights is set but merge_with is empty: list the adapters to merge with "
                              "adapter in merge_with, or clear merge_weights.")
        if self.merge_weights and len(self.merge_weights) != 1 + len(self.merge_with):
            raise ParamsError(f"merge_weights needs one weight for adapter and one for each of merge_with "
                              f"({1 + len(self.merge_with)}), got {len(self.merge_weights)}.")
        if not 0.0 < self.merge_density <= 1.0:
            raise ParamsError(f"merge_density must be in (0, 1], got {self.merge_density}.")

    def _check_fidelity(self) -> None:
        if self.fidelity_rows < 1:
            raise ParamsError(f"fidelity_rows must be >= 1, got {self.fidelity_rows}.")
        if self.fidelity_max_tokens < 8:
            raise ParamsError(f"fidelity_max_tokens must be >= 8, got {self.fidelity_max_tokens}.")
        if self.max_logit_diff <= 0 or self.max_kl <= 0:
            raise ParamsError("max_logit_diff and max_kl must be > 0 (they are the thresholds of the fidelity "
                              "check, which always runs).")


# The Hub's rules for an owner or a repo name (huggingface_hub.utils.validate_repo_id, stricter where the Hub
# is: ASCII only). Written out here because params imports nothing heavy.
_REPO_PART_MAX = 96
_REPO_PART = re.compile(r"[A-Za-z0-9_.-]+")


def _repo_id_problem(repo_id: str) -> str:
    """The first Hub naming rule ``repo_id`` breaks ("" when it is a valid 'owner/name')."""
    if repo_id.count("/") != 1:
        return "it needs exactly one '/' between owner and name"
    for label, part in zip(("owner", "name"), repo_id.split("/")):
        if not part:
            return f"the {label} is empty"
        if not _REPO_PART.fullmatch(part):
            bad = sorted({char for char in part if not _REPO_PART.fullmatch(char)})
            return f"the {label} {part!r} holds {', '.join(map(repr, bad))}"
        if "--" in part or ".." in part:
            return f"the {label} {part!r} holds '--' or '..'"
        if part[0] in "-." or part[-1] in "-.":
            return f"the {label} {part!r} starts or ends with '-' or '.'"
        if len(part) > _REPO_PART_MAX:
            return f"the {label} has {len(part)} characters"
    if repo_id.endswith(".git"):
        return "it ends with '.git'"
    return ""


@dataclass(frozen=True)
class EvalMCQParams(ModelParams):
    """Parameters of ``notebooks/eval_mcq.ipynb``: MCQ generation and VMLU-style answering, base vs fine-tuned."""

    notebook: ClassVar[str] = "eval_mcq"

    adapter: str = ""
    compare_base: bool = True
    dataset: str = "vinakit:mcq"
    context_field: str = ""
    holdout: bool = True
    max_items: int = 200
    max_new_tokens: int = 256
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    key_agreement: bool = True
    judge_model: str = ""
    vmlu_dataset: str = "vinakit:vmlu"
    vmlu_max_items: int = 0
    near_duplicate_threshold: float = 0.8
    show_examples: int = 5

    def check(self) -> None:
        super().check()
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ParamsError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_items < 0 or self.vmlu_max_items < 0 or self.show_examples < 0:
            raise ParamsError("max_items, vmlu_max_items and show_examples must be >= 0 (0 = all / none).")
        if self.max_new_tokens > self.max_seq_length - 64:
            raise ParamsError(f"max_new_tokens ({self.max_new_tokens}) leaves too little of max_seq_length "
                              f"({self.max_seq_length}) for the prompt: keep it below max_seq_length - 64.")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ParamsError("Sampling needs temperature > 0 and top_p in (0, 1].")
        if not 0 < self.near_duplicate_threshold <= 1:
            raise ParamsError(f"near_duplicate_threshold must be in (0, 1], got {self.near_duplicate_threshold}.")


# Stages of continued pretraining (EEVE-style staged unfreezing); what each one trains is in vinakit.cpt.
CPT_STAGES = ("new_embeddings", "all_embeddings", "full")


@dataclass(frozen=True)
class CPTParams(LoraParams):
    """Parameters of ``notebooks/cpt.ipynb``: continued pretraining on raw Vietnamese text.

    ``stages`` lists ``name`` or ``name:steps`` entries run in order (``new_embeddings``: only the rows of the
    added tokens; ``all_embeddings``: ``embed_tokens`` and ``lm_head``; ``full``: the body (LoRA or every
    weight) and the embeddings). A stage without ``:steps`` trains ``max_steps`` steps when that is > 0, else
    ``num_train_epochs`` epochs. Embeddings always train at ``embedding_learning_rate``, the body at
    ``learning_rate``.
    """

    notebook: ClassVar[str] = "cpt"

    dataset: str = "vinakit:corpus"
    text_field: str = "text"
    val_size: float = 0.05
    learning_rate: float = 5e-5
    embedding_learning_rate: float = 5e-6
    group_by_length: bool = False
    num_new_tokens: int = 0
    new_token_min_count: int = 2
    new_tokens: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: ["full"])
    sample_prompts: list[str] = field(default_factory=lambda: [
        "Hà Nội là thủ đô",
        "Sông Hồng bắt nguồn từ",
        "Phở là món ăn",
    ])
    max_new_tokens: int = 48

    def check(self) -> None:
        super().check()
        if self.embedding_learning_rate < 0:
            raise ParamsError(f"embedding_learning_rate must be >= 0 (0 freezes the embeddings), got "
                              f"{self.embedding_learning_rate}.")
        if self.num_new_tokens < 0 or self.new_token_min_count < 1:
            raise ParamsError(f"num_new_tokens must be >= 0 and new_token_min_count >= 1, got "
                              f"{self.num_new_tokens} and {self.new_token_min_count}.")
        _check_val_size(self.val_size, "documents", zero_allowed=False)
        plan = self.stage_plan
        adds_tokens = self.num_new_tokens > 0 or bool(self.new_tokens)
        if any(name == "new_embeddings" for name, _ in plan) and not adds_tokens:
            raise ParamsError("stage new_embeddings trains the rows of added tokens, but none are added: set "
                              "num_new_tokens > 0 (or new_tokens), or remove the stage.")

    @property
    def stage_plan(self) -> list[tuple[str, int]]:
        """``[(stage name, steps)]``; steps is -1 where the stage follows max_steps / num_train_epochs."""
        if not self.stages:
            raise ParamsError(f"stages must list at least one of {list(CPT_STAGES)}, e.g. ['full'].")
        return [_parse_stage(entry) for entry in self.stages]

    @property
    def val_split(self) -> float | int:
        """``val_size`` as a fraction, or a document count when >= 1."""
        return _as_split(self.val_size)


def _parse_stage(entry: str) -> tuple[str, int]:
    name, _, steps = entry.strip().partition(":")
    name = name.strip()
    if name not in CPT_STAGES:
        hint = _closest(name, CPT_STAGES)
        suggestion = f" Did you mean {hint!r}?" if hint else ""
        raise ParamsError(f"stages: unknown stage {name!r}.{suggestion} Use {list(CPT_STAGES)}, optionally with "
                          f"a step count such as 'full:200'.")
    if not steps.strip():
        return name, -1
    if not steps.strip().isdigit() or int(steps) < 1:
        raise ParamsError(f"stages: {entry!r} needs a whole number of steps >= 1 after the colon, e.g. "
                          f"'{name}:100'.")
    return name, int(steps)


@dataclass(frozen=True)
class PreferenceParams(LoraParams):
    """Parameters of ``notebooks/preference.ipynb``: ORPO or DPO on preference pairs, after (or without) SFT.

    ``adapter`` names an SFT run (or its adapter) to continue; DPO needs one (its reference is that adapter,
    frozen). ``max_seq_length`` bounds prompt + reply, ``max_prompt_length`` (0: no bound of its own) the prompt;
    prompts are cut from the left, replies never.
    """

    notebook: ClassVar[str] = "preference"

    method: Literal["orpo", "dpo"] = "orpo"
    adapter: str = ""
    dataset: str = "vinakit:preference"
    val_size: float = 0.05
    beta: float = 0.1
    max_prompt_length: int = 0
    learning_rate: float = 5e-5
    sample_prompts: list[str] = field(default_factory=lambda: ["Hệ điều hành là gì?"])
    max_new_tokens: int = 128

    def check(self) -> None:
        super().check()
        if self.method == "dpo" and not self.adapter:
            raise ParamsError("method dpo continues an SFT run: set adapter to its run folder (DPO's reference is "
                              "that model), or use method orpo, which needs no reference.")
        if self.beta <= 0:
            raise ParamsError(f"beta must be > 0, got {self.beta}.")
        if not 0 <= self.max_prompt_length < self.max_seq_length:
            raise ParamsError(f"max_prompt_length must be 0 (no limit of its own) or less than max_seq_length, got "
                              f"{self.max_prompt_length} with max_seq_length {self.max_seq_length}: the reply "
                              f"needs room too.")
        _check_val_size(self.val_size, "pairs")

    @property
    def val_split(self) -> float | int:
        """``val_size`` as a fraction, or a pair count when >= 1."""
        return _as_split(self.val_size)


NOTEBOOK_PARAMS: dict[str, type[NotebookParams]] = {
    "sft": SFTParams,
    "preference": PreferenceParams,
    "cpt": CPTParams,
    "eval_mcq": EvalMCQParams,
    "export": ExportParams,
}


def params_class(notebook: str) -> type[NotebookParams]:
    """The params dataclass of a notebook name (``sft``) or path (``notebooks/sft.ipynb``)."""
    name = Path(notebook).stem
    if name not in NOTEBOOK_PARAMS:
        hint = _closest(name, NOTEBOOK_PARAMS)
        suggestion = f" Did you mean '{hint}'?" if hint else ""
        raise ParamsError(f"Unknown notebook '{notebook}'.{suggestion} Known: {', '.join(NOTEBOOK_PARAMS)}.")
    return NOTEBOOK_PARAMS[name]
