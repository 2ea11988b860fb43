"""Plan the memory of a run before anything loads: ``vinakit plan`` and the check the notebooks run first.

:func:`estimate` turns a notebook's validated parameters and a :class:`~vinakit.device.DeviceProfile` into a
:class:`MemoryPlan`: the precision and optimizer the device policy will choose, and the peak GPU memory broken
into parts (weights, LoRA, trained embeddings, activations, logits/loss, KV cache, overhead), compared with
the profile's memory. When it does not fit, the plan names the parameters to change and what each saves.

It is an estimate from the model's sizes (a local ``config.json``, the Hugging Face cache, or a small table of
common bases), not a measurement: ``metrics.json`` of a run holds both ``estimated_peak_memory_gib`` and the
measured peak, so the two can be compared. Nothing heavy is imported here (no torch): ``vinakit plan`` answers
in well under two seconds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace

from typing import Any, Iterable, Mapping, Sequence

from vinakit.device import (PROFILE_ENV_VAR, DeviceProfile, active_profile, compare_dtype_name, detected_profile,
                            load_dtype_name, optimizer_name, profile_named, trainer_flags)
from vinakit.errors import ParamsError
from vinakit.model_sizes import ModelSizes, model_sizes
from vinakit.record import read_json

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4 with double quantisation (the kit's config): 4 bits a weight, an 8-bit absmax per block of 64
# and a float32 constant per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes 8-bit optimizer state: one byte an element plus a float32 absmax per block of 256.
STATE_8BIT_BYTES = 1 + 4 / 256
# CUDA context, cuBLAS/attention workspaces and allocator fragmentation (a CPU: Python, torch and libraries).
OVERHEAD_GIB = 1.0
# Unsloth's fused loss computes the logits in chunks sized to half the free memory, at most 4 GiB
# (unsloth_zoo.fused_losses.cross_entropy_loss: _CE_TARGET_GB_CAP); the floor keeps one chunk in the plan.
FUSED_LOSS_CAP_GIB = 4.0
FUSED_LOSS_FLOOR_GIB = 0.125
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj", "Wqkv", "out_proj")  # the last four: Phi-3's and MPT's fused names
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
ALL_LINEAR = "all-linear"

__all__ = ["MemoryPlan", "MemoryWarning", "Suggestion", "check_before_loading", "estimate", "plan_profile"]


class MemoryWarning(UserWarning):
    """The estimated peak memory of a run exceeds the device's memory."""


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """One parameter change that lowers the estimate.

    Attributes:
        name: the parameter.
        value: its proposed value (the largest of the tried values that fits, else the smallest tried).
        saves_gib: how much lower the estimate is.
        total_gib: the estimate with the change.
        fits: whether that estimate fits.
        note: what else to change with it.
    """

    name: str
    value: Any
    saves_gib: float
    total_gib: float
    fits: bool
    note: str = ""

    def __str__(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        verdict = "fits" if self.fits else "still too much"
        return (f"-p {self.name} {value}: saves {self.saves_gib:.2f} GiB -> {self.total_gib:.2f} GiB ({verdict}"
                f"{self.note})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "saves_gib": round(self.saves_gib, 3),
                "total_gib": round(self.total_gib, 3), "fits": self.fits}


@dataclass
class MemoryPlan:
    """Estimated peak memory of one notebook's run on one device.

    Attributes:
        notebook: ``sft``, ``cpt``, ``eval_mcq`` or ``export``.
        model: what is loaded (a name, folder or the adapter's base model).
        sizes: its sizes.
        profile: the device.
        precision: ``load_dtype`` (and for training the trainer's ``bf16``/``fp16``/``use_cpu``, and
            ``load_in_4bit``).
        optimizer: the optimizer the trainer uses (None when nothing trains).
        parts: GiB per part, in order.
        details: how each part was counted.
        suggestions: parameter changes that lower the estimate (only when it does not fit).
    """

    notebook: str
    model: str
    sizes: ModelSizes
    profile: DeviceProfile
    precision: dict[str, Any]
    optimizer: str | None
    parts: dict[str, float]
    details: dict[str, str]
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values())

    @property
    def budget_gib(self) -> float:
        return self.profile.memory_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the run manifest."""
        return {"notebook": self.notebook, "model": self.model, "sizes": self.sizes.describe(),
                "device": self.profile.describe(), "precision": self.precision, "optimizer": self.optimizer,
                "parts_gib": {name: round(gib, 3) for name, gib in self.parts.items()}, "details": self.details,
                "total_gib": round(self.total_gib, 3), "budget_gib": round(self.budget_gib, 3), "fits": self.fits,
                "suggestions": [suggestion.to_dict() for suggestion in self.suggestions]}

    def to_table(self) -> str:
        """The plan as ``vinakit plan`` prints it."""
        memory = "system memory" if not self.profile.is_gpu else "GPU memory"
        simulated = ", simulated" if self.profile.simulated else ""
        lines = [f"{self.notebook}: {self.model} on {self.profile.label} (profile {self.profile.name}{simulated}, "
                 f"{self.budget_gib:.2f} GiB {memory})",
                 f"model: {self.sizes.describe()}",
                 f"precision: {_precision_text(self.precision)}"]
        if self.optimizer:
            lines.append(f"optimizer: {self.optimizer}")
        lines.append("estimated peak memory:")
        lines += [f"  {name:<20}{gib:>7.2f} GiB  {self.details.get(name, '')}" for name, gib in self.parts.items()]
        verdict = "fits" if self.fits else f"does NOT fit ({self.total_gib - self.budget_gib:.2f} GiB over)"
        lines.append(f"  {'total':<20}{self.total_gib:>7.2f} GiB  of {self.budget_gib:.2f} GiB: {verdict}")
        if not self.fits:
            lines.append("change one of:" if self.suggestions else "no parameter of this notebook lowers it enough: "
                         "use a device with more memory.")
            lines += [f"  {suggestion}" for suggestion in self.suggestions]
        return "\n".join(lines)

    __str__ = to_table


def _precision_text(precision: Mapping[str, Any]) -> str:
    text = f"{precision['load_dtype']} weights"
    if precision.get("load_in_4bit"):
        text += " (linear layers 4-bit NF4)"
    if "fp16" in precision:
        text += f"; trainer bf16={precision['bf16']} fp16={precision['fp16']}"
        text += " use_cpu=True" if precision.get("use_cpu") else ""
    return text


def plan_profile(device: str | None = None) -> DeviceProfile:
    """The profile ``vinakit plan`` uses: ``device`` by name, else ``VINAKIT_DEVICE_PROFILE``, else this machine.

    A GPU profile is simulated here even on a machine without a GPU (nothing runs).
    """
    name = device or os.environ.get(PROFILE_ENV_VAR, "").strip()
    return profile_named(name) if name else detected_profile()


def estimate(params: Any, profile: DeviceProfile | None = None, *,
             modules_to_save: Sequence[str] | None = None) -> MemoryPlan:
    """Estimate the peak memory of a notebook's run.

    Args:
        params: a notebook's validated parameters (``SFTParams``, ``CPTParams``, ``EvalMCQParams``,
            ``ExportParams``).
        profile: the device (default: :func:`plan_profile`).
        modules_to_save: modules trained in full beside LoRA (CPT: ``embed_tokens`` and ``lm_head``, its
            default; SFT: none unless given).

    Returns:
        The plan, with suggestions when it does not fit.

    Raises:
        VinakitError: the model's sizes are unknown, or an export finds nothing to export.
    """
    profile = profile or plan_profile()
    models = _resolve(params, modules_to_save)
    plan = _plan(params, profile, models)
    if not plan.fits:
        plan.suggestions = _suggestions(params, profile, models, plan.total_gib)
    return plan


def check_before_loading(params: Any, run: Any, *, modules_to_save: Sequence[str] | None = None,
                         profile: DeviceProfile | None = None) -> MemoryPlan | None:
    """Record the memory plan of this run and warn (one line) when it will not fit; never raises.

    ``metrics.json`` gets ``estimated_peak_memory_gib`` ("unknown" when the model's sizes are unknown) and the
    manifest the whole plan. The run goes on either way: the estimate may be wrong, and the user may know better.

    Returns:
        The plan, or None when it could not be made.
    """
    try:
        plan = estimate(params, profile or active_profile(), modules_to_save=modules_to_save)
    except Exception as error:  # an estimate must never stop the run it is about
        run.log_metrics(estimated_peak_memory_gib="unknown")
        run.update_manifest(memory_plan={"status": "unknown", "reason": str(error)})
        return None
    run.log_metrics(estimated_peak_memory_gib=round(plan.total_gib, 2))
    run.update_manifest(memory_plan=plan.to_dict())
    if not plan.fits:
        hint = f" Try {plan.suggestions[0]}." if plan.suggestions else ""
        warnings.warn(f"vinakit: estimated peak memory {plan.total_gib:.1f} GiB exceeds the {plan.budget_gib:.1f} "
                      f"GiB of the {plan.profile.label}: this run may run out of memory.{hint}", MemoryWarning,
                      stacklevel=2)
    return plan


# --------------------------------------------------------------------------------------------------------------
# What is loaded
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Models:
    """What a notebook loads, resolved once (suggestions change only parameters that keep it)."""

    name: str
    sizes: ModelSizes
    modules_to_save: tuple[str, ...] = ()
    adapter: Mapping[str, Any] = field(default_factory=dict)  # adapter_config.json of an evaluated/exported adapter
    judge: ModelSizes | None = None


def _resolve(params: Any, modules_to_save: Sequence[str] | None) -> _Models:
    if params.notebook == "export":
        return _resolve_export(params)
    sizes = model_sizes(params.model_name)
    if params.notebook == "eval_mcq":
        judge = model_sizes(params.judge_model) if params.key_agreement and params.judge_model else None
        return _Models(params.model_name, sizes, adapter=_adapter_config(params.adapter), judge=judge)
    if params.notebook == "cpt":
        added = params.num_new_tokens + len(params.new_tokens)  # at most: some may be in the vocabulary already
        sizes = replace(sizes, vocab_size=sizes.vocab_size + added)
        modules_to_save = EMBEDDING_MODULES if modules_to_save is None else modules_to_save
    return _Models(params.model_name, sizes, modules_to_save=tuple(modules_to_save or ()))


def _resolve_export(params: Any) -> _Models:
    from vinakit.runs import base_model_16bit, find_run

    source = find_run(params.adapter, params.output_dir)
    base = base_model_16bit(source)
    adapter = read_json(source.weights_dir / "adapter_config.json") if source.kind == "lora" else {}
    return _Models(base, model_sizes(base), adapter=adapter)


def _adapter_config(spec: str) -> dict[str, Any]:
    """The adapter_config.json of an adapter folder or run folder ({} when there is none)."""
    if not spec:
        return {}
    from vinakit.runs import find_run

    run = find_run(spec)
    return read_json(run.weights_dir / "adapter_config.json") if run.kind == "lora" else {}


def _target_names(spec: str | Iterable[str], *, strict: bool = True) -> set[str]:
    """LoRA target module names, ``all-linear`` expanded (as :func:`vinakit.model.lora_target_modules` does).

    Raises:
        ParamsError: with ``strict``, a name that is no module of the supported layouts.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    targets: set[str] = set()
    for name in (n.strip() for n in names if n and n.strip()):
        if name == ALL_LINEAR:
            targets.update(LINEAR_MODULES)
        elif name in LINEAR_MODULES or name in EMBEDDING_MODULES:
            targets.add(name)
        elif strict:
            raise ParamsError(f"target_modules: the plan knows no module {name!r}; use '{ALL_LINEAR}' or some of "
                              f"{', '.join(LINEAR_MODULES + EMBEDDING_MODULES)}.")
        else:
            targets.update(LINEAR_MODULES)  # a regex in a saved adapter config: assume every linear layer
    return targets


# --------------------------------------------------------------------------------------------------------------
# The parts, in bytes
# --------------------------------------------------------------------------------------------------------------


def _plan(params: Any, profile: DeviceProfile, models: _Models) -> MemoryPlan:
    build = {"sft": _training_parts, "cpt": _training_parts, "preference": _training_parts, "eval_mcq": _eval_parts,
             "export": _export_parts}
    precision, optimizer, parts, details = build[params.notebook](params, profile, models)
    overhead = "CUDA context, kernels, allocator slack" if profile.is_gpu else "Python, torch and the libraries"
    parts["overhead"], details["overhead"] = OVERHEAD_GIB * GIB, overhead
    return MemoryPlan(params.notebook, models.name, models.sizes, profile, precision, optimizer,
                      {name: size / GIB for name, size in parts.items()}, details)


def _weight_bytes(sizes: ModelSizes, dtype: str, four_bit: bool, *, offloaded_matrices: int = 0) -> float:
    """Linear layers in NF4 (or the load dtype); embeddings, head and norms in the load dtype (bitsandbytes
    never quantises them). ``offloaded_matrices`` embedding matrices are not on the device."""
    linear = sizes.linear_params * (NF4_BYTES if four_bit else DTYPE_BYTES[dtype])
    others = sizes.other_params - offloaded_matrices * sizes.vocab_size * sizes.hidden_size
    return linear + others * DTYPE_BYTES[dtype]


def _weights_detail(dtype: str, four_bit: bool) -> str:
    return f"linear layers 4-bit NF4, embeddings/norms {dtype}" if four_bit else f"all {dtype}"


def _state_bytes(optimizer: str, weight_bytes: float) -> float:
    """Optimizer state bytes per trained element. torch's Adam keeps two moments in the weight's dtype;
    bitsandbytes' 8-bit optimizers keep them in 8 bits, its 32-bit ones in float32."""
    name = optimizer.lower()
    if "sgd" in name or "adafactor" in name:  # no moments (plain SGD) or a factored, negligible second moment
        return 0.0
    moments = 1 if "lion" in name else 2
    if "8bit" in name:
        return moments * STATE_8BIT_BYTES
    return moments * (4.0 if "32bit" in name else weight_bytes)


def _lora_params(sizes: ModelSizes, rank: int, targets: set[str]) -> int:
    """r x (in + out) for each targeted linear layer; embed_tokens and lm_head take r x (vocab + hidden)."""
    per_layer = sum(i + o for name, (i, o) in sizes.linear_shapes().items() if name in targets)
    extra = sum(sizes.vocab_size + sizes.hidden_size for name in EMBEDDING_MODULES if name in targets)
    return rank * (per_layer * sizes.num_hidden_layers + extra)


def _trained_copies(sizes: ModelSizes, modules: Sequence[str]) -> int:
    """Full copies of embed_tokens/lm_head that modules_to_save trains. Tied embeddings need one: the kit
    re-ties the trained copies (vinakit.cpt.tie_trained_embeddings)."""
    count = len(set(modules) & set(EMBEDDING_MODULES))
    return min(count, 1) if sizes.tie_word_embeddings else count


def _training_parts(params: Any, profile: DeviceProfile, models: _Models) -> tuple[Any, ...]:
    sizes = models.sizes
    dtype = load_dtype_name(profile, full_finetuning=params.full_finetuning)
    four_bit = (params.load_in_4bit or sizes.prequantized_4bit) and not params.full_finetuning
    optimizer = optimizer_name(params.optim, profile)
    precision = {"load_dtype": dtype, "load_in_4bit": four_bit, **trainer_flags(dtype, profile)}
    copies = 0 if params.full_finetuning else _trained_copies(sizes, models.modules_to_save)
    # Unsloth moves the frozen originals of trained embeddings off the GPU (disk/CPU) with its checkpointing.
    offloaded = copies if params.backend == "unsloth" and profile.is_gpu else 0
    parts = {"weights": _weight_bytes(sizes, dtype, four_bit, offloaded_matrices=offloaded)}
    details = {"weights": _weights_detail(dtype, four_bit)}
    if params.full_finetuning:
        _full_finetuning_parts(sizes, dtype, optimizer, parts, details)
    else:
        _lora_parts(params, sizes, dtype, optimizer, copies, parts, details)
    _activation_parts(params, sizes, profile, four_bit, parts, details)
    return precision, optimizer, parts, details


def _full_finetuning_parts(sizes: ModelSizes, dtype: str, optimizer: str, parts: dict, details: dict) -> None:
    weight = DTYPE_BYTES[dtype]
    parts["gradients"], details["gradients"] = sizes.parameters * weight, f"every weight, {dtype}"
    parts["optimizer states"] = sizes.parameters * _state_bytes(optimizer, weight)
    details["optimizer states"] = f"{optimizer} for every weight"


def _lora_parts(params: Any, sizes: ModelSizes, dtype: str, optimizer: str, copies: int, parts: dict,
                details: dict) -> None:
    targets = _target_names(params.target_modules)
    lora = _lora_params(sizes, params.rank, targets)
    # LoRA weights are float32 (PEFT and Unsloth upcast them: fp16 gradients cannot be unscaled).
    parts["LoRA"] = lora * (4 + 4 + _state_bytes(optimizer, 4))
    details["LoRA"] = (f"r={params.rank} on {len(targets)} module kinds, {lora / 1e6:.0f}M float32 params + grads "
                       f"+ {optimizer} states")
    if copies:
        # Unsloth trains float16 copies in float32 (unsloth.models.llama._offload_frozen_module_for_training).
        weight = 4 if dtype in ("float16", "float32") else 2
        elements = copies * sizes.vocab_size * sizes.hidden_size
        parts["trained embeddings"] = elements * (2 * weight + _state_bytes(optimizer, weight))
        details["trained embeddings"] = (f"{copies} full {'copy' if copies == 1 else 'copies'} of embed_tokens/"
                                         f"lm_head (modules_to_save): weights + grads + states")


def _activation_parts(params: Any, sizes: ModelSizes, profile: DeviceProfile, four_bit: bool, parts: dict,
                      details: dict) -> None:
    """Activations with gradient checkpointing, then the logits and loss."""
    act = 2 if profile.is_gpu else 4  # 16-bit autocast on a GPU (fp32 master weights too); float32 on a CPU
    # A preference batch holds each pair's chosen and rejected sequence (TRL concatenates them into one forward).
    sequences = 2 if params.notebook == "preference" else 1
    tokens = sequences * params.per_device_train_batch_size * params.max_seq_length
    h, i = sizes.hidden_size, sizes.intermediate_size
    # One layer's saved tensors per token (2 norms, 2 residuals, q/k/v/o, attention, MLP gate/up/act) and its
    # MLP backward: the count of unsloth_zoo.tiled_mlp. Attention is SDPA/flash (no seq x seq matrix).
    layer, backward = 10 * h + 3 * i, 2 * h + 3 * i
    checkpointing = profile.is_gpu or params.backend == "hf"  # the kit's Unsloth path turns it off on a CPU
    if checkpointing:
        # Unsloth's checkpointing offloads the stored layer inputs to CPU RAM (two in flight); plain
        # checkpointing keeps one per layer on the device. One layer is recomputed at a time.
        stored = 2 if params.backend == "unsloth" and profile.is_gpu else sizes.num_hidden_layers
        per_token, how = stored * h + layer + backward, f"{stored} stored layer inputs + one layer recomputed"
    else:
        per_token, how = sizes.num_hidden_layers * layer + backward, "every layer's activations (no checkpointing)"
    parts["activations"] = tokens * per_token * act
    if four_bit and profile.is_gpu:
        parts["activations"] += max(a * b for a, b in sizes.linear_shapes().values()) * act  # one dequantised weight
    pairs = " pairs x 2 (chosen, rejected)" if sequences == 2 else ""
    details["activations"] = (f"batch {params.per_device_train_batch_size}{pairs} x {params.max_seq_length} tokens: "
                              f"{how}")
    _loss_part(params, sizes, profile, tokens, act, parts, details)


def _loss_part(params: Any, sizes: ModelSizes, profile: DeviceProfile, tokens: int, act: int, parts: dict,
               details: dict) -> None:
    # The eager chain per (token x vocab) element: the logits, their float32 upcast, the saved log_softmax and
    # its gradient (14 bytes in 16-bit, as unsloth_zoo counts). The hf backend is assumed to run it whole (TRL may
    # patch in a fused loss, which only lowers it); Unsloth's fused loss runs it in chunks (FUSED_LOSS_CAP_GIB).
    eager = tokens * sizes.vocab_size * (act + 12)
    # TRL's ORPO/DPO take log-probabilities over the whole vocabulary (Unsloth's fused loss is for SFT/CPT only).
    if params.backend != "unsloth" or params.notebook == "preference":
        parts["logits/loss"], details["logits/loss"] = eager, f"batch x seq x vocab {sizes.vocab_size}, whole"
        return
    room = profile.memory_gib * GIB - sum(parts.values()) - OVERHEAD_GIB * GIB
    chunk = min(FUSED_LOSS_CAP_GIB * GIB, max(FUSED_LOSS_FLOOR_GIB * GIB, room / 2))
    parts["logits/loss"] = min(eager, chunk)
    details["logits/loss"] = (f"Unsloth's fused loss in chunks (whole: {eager / GIB:.2f} GiB; a chunk uses half "
                              f"the free memory, at most {FUSED_LOSS_CAP_GIB:.0f} GiB)")


def _adapter_bytes(sizes: ModelSizes, adapter: Mapping[str, Any], dtype: str) -> float:
    """A loaded adapter: float32 LoRA weights (PEFT upcasts them) and its modules_to_save in the load dtype."""
    targets = _target_names(adapter.get("target_modules") or ALL_LINEAR, strict=False)
    copies = _trained_copies(sizes, adapter.get("modules_to_save") or ())
    return (_lora_params(sizes, int(adapter.get("r") or 0), targets) * 4
            + copies * sizes.vocab_size * sizes.hidden_size * DTYPE_BYTES[dtype])


def _inference_bytes(sizes: ModelSizes, rows: int, length: int, act: int) -> float:
    """One forward over ``rows`` x ``length`` tokens: one layer's working set (hidden states, q/k/v/o, MLP)."""
    return rows * length * (4 * sizes.hidden_size + 3 * sizes.intermediate_size) * act


def _eval_parts(params: Any, profile: DeviceProfile, models: _Models) -> tuple[Any, ...]:
    sizes, dtype = models.sizes, load_dtype_name(profile)
    four_bit = params.load_in_4bit or sizes.prequantized_4bit
    act = DTYPE_BYTES[dtype]
    parts = {"weights": _weight_bytes(sizes, dtype, four_bit)}
    details = {"weights": _weights_detail(dtype, four_bit) + " (base and fine-tuned load one after the other)"}
    if models.adapter:
        parts["LoRA adapter"] = _adapter_bytes(sizes, models.adapter, dtype)
        details["LoRA adapter"] = f"r={models.adapter.get('r')}, float32"
    if models.judge is not None:
        parts["judge weights"] = _weight_bytes(models.judge, dtype, params.load_in_4bit)
        details["judge weights"] = f"{params.judge_model}, loaded beside the evaluated model"
    # Prompts are cut to max_seq_length - max_new_tokens, so a sequence is at most max_seq_length long.
    batch, length = params.batch_size, params.max_seq_length
    parts["KV cache"] = (batch * length * sizes.num_hidden_layers * 2 * sizes.num_key_value_heads * sizes.head_dim
                         * act)
    details["KV cache"] = f"batch {batch} x {length} tokens (prompt + new tokens), every layer"
    parts["forward"] = _inference_bytes(sizes, batch, length, act)
    details["forward"] = "the prompts' prefill, one layer at a time"
    # generate() and the letter scoring keep only the last positions' logits (logits_to_keep).
    parts["logits"], details["logits"] = batch * sizes.vocab_size * (act + 8), "last position only"
    return {"load_dtype": dtype, "load_in_4bit": four_bit}, None, parts, details


def _export_parts(params: Any, profile: DeviceProfile, models: _Models) -> tuple[Any, ...]:
    """The fidelity check, the export's peak: the adapter on the 16/32-bit base (the reference), then the merged
    model. vinakit.fidelity.measure keeps one model alive at a time (the reference's logits wait on the CPU),
    and the merge before it holds one model too, so the larger of the two counts."""
    sizes = models.sizes
    dtype = _fidelity_dtype(sizes, profile)
    adapter = _adapter_bytes(sizes, models.adapter, dtype) if models.adapter else 0.0
    parts = {"model": _weight_bytes(sizes, dtype, False) + adapter}
    details = {"model": f"base + adapter (the fidelity reference), {dtype}; one model alive at a time"}
    act = DTYPE_BYTES[dtype]
    tokens = params.fidelity_max_tokens
    parts["forward"] = _inference_bytes(sizes, 1, tokens, act) + tokens * sizes.vocab_size * (act + 4)
    details["forward"] = f"one held-out row of {tokens} tokens, all logits"
    return {"load_dtype": dtype, "load_in_4bit": False}, None, parts, details


def _fidelity_dtype(sizes: ModelSizes, profile: DeviceProfile) -> str:
    """The dtype the fidelity check compares in, as the device policy decides for this model."""
    return compare_dtype_name(sizes.parameters, load_dtype_name(profile), profile)


# --------------------------------------------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------------------------------------------


def _halvings(value: int, floor: int) -> list[int]:
    values = []
    while value // 2 >= floor:
        value //= 2
        values.append(value)
    return values


def _candidates(params: Any) -> list[tuple[str, list[Any], str]]:
    """``(parameter, values to try from the mildest, note)`` for each parameter that lowers the estimate."""
    if params.notebook == "export":
        return []
    full = getattr(params, "full_finetuning", False)
    found: list[tuple[str, list[Any], str]] = []
    if params.notebook in ("sft", "cpt", "preference"):
        if not full:
            found.append(("rank", _halvings(params.rank, 8), ""))
        found.append(("per_device_train_batch_size", _halvings(params.per_device_train_batch_size, 1),
                      "; raise gradient_accumulation_steps to keep the effective batch"))
    else:
        found.append(("batch_size", _halvings(params.batch_size, 1), ""))
    found.append(("max_seq_length", _halvings(params.max_seq_length, 256), ""))
    if full:
        found.append(("full_finetuning", [False], "; LoRA instead, and load_in_4bit true saves more"))
    elif not params.load_in_4bit:
        found.append(("load_in_4bit", [True], ""))
    return found


def _suggestions(params: Any, profile: DeviceProfile, models: _Models, total_gib: float) -> list[Suggestion]:
    """For each parameter: the mildest tried value that fits, else the strongest; those that fit first."""
    found = []
    for name, values, note in _candidates(params):
        best = None
        for value in values:
            try:
                changed = replace(params, **{name: value})
            except ParamsError:
                continue  # a value the notebook rejects (e.g. max_seq_length below max_new_tokens + 64)
            plan = _plan(changed, profile, models)
            best = Suggestion(name, value, total_gib - plan.total_gib, plan.total_gib, plan.fits, note)
            if plan.fits:
                break
        if best is not None and best.saves_gib > 0:
            found.append(best)
    return sorted(found, key=lambda suggestion: (not suggestion.fits, -suggestion.saves_gib))


# --------------------------------------------------------------------------------------------------------------
# One rank of several (vinakit run --nproc N, vinakit plan --nproc N)
# --------------------------------------------------------------------------------------------------------------

# The share of each part one rank holds: DDP keeps a whole copy per GPU; ZeRO-2 shards gradients and optimizer
# states; FSDP and ZeRO-3 shard the weights too. Activations and logits belong to the rank's own batch.
_SHARDED_PARTS = {
    "ddp": (),
    "deepspeed2": ("gradients", "optimizer states"),
    "deepspeed3": ("weights", "gradients", "optimizer states", "LoRA", "trained embeddings"),
    "fsdp": ("weights", "gradients", "optimizer states", "LoRA", "trained embeddings"),
}


def per_rank(plan: MemoryPlan, nproc: int, mode: str = "ddp") -> MemoryPlan:
    """The peak memory of one rank when ``nproc`` ranks train together in ``mode`` (per GPU).

    DDP adds its gradient buckets (about one more copy of the trained weights' gradients); sharded parts are
    divided by ``nproc`` (the LoRA part of ZeRO-2 keeps its weights whole and shards the rest). Estimates, like
    the single-GPU plan: the per-rank peak adds what a shard gathers for one layer at a time.
    """
    if nproc <= 1:
        return plan
    sharded = _SHARDED_PARTS[mode]
    parts, details = dict(plan.parts), dict(plan.details)
    for name in sharded:
        if name in parts:
            parts[name] /= nproc
            details[name] = f"{details.get(name, '')}; 1/{nproc} per rank ({mode})".lstrip("; ")
    if mode == "deepspeed2" and "LoRA" in parts:  # float32 weights whole, gradients and states sharded
        weights = parts["LoRA"] / (8 + _state_bytes(plan.optimizer or "adamw_torch", 4)) * 4
        parts["LoRA"] = weights + (parts["LoRA"] - weights) / nproc
    if mode == "ddp":
        trained = parts.get("gradients", 0.0) or parts.get("LoRA", 0.0) / 4 + parts.get("trained embeddings", 0) / 4
        parts["DDP buckets"], details["DDP buckets"] = trained, "one more copy of the trained weights' gradients"
    profile = replace(plan.profile, label=f"{plan.profile.label}, 1 of {nproc} ranks ({mode})")
    return replace(plan, profile=profile, parts=parts, details=details, suggestions=[])
