"""The one device policy: every decision about dtype, trainer precision, optimizer, input device and memory.

Nothing else in the kit asks torch which device it runs on. Each decision is a function of a
:class:`DeviceProfile`, so tests can check the decisions of a T4, an A100 or an H100 on a CPU machine, and
``VINAKIT_DEVICE_PROFILE=t4`` makes a bigger GPU behave like a T4 (fp16, memory capped at 15 GiB).

Why this exists: ``torch.cuda.is_bf16_supported()`` answers True on a T4 (compute capability 7.5) because it
counts emulation. Unsloth checks the capability itself, loads float16 there, and its trainer then refuses a run
whose arguments say bf16 ("Model is in float16 precision but you want to use bfloat16 precision"). So native
bf16 here means capability >= 8.0, and the trainer's precision flags are taken from the *loaded* model's dtype.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

from vinakit.errors import ParamsError, VinakitError

PROFILE_ENV_VAR = "VINAKIT_DEVICE_PROFILE"
DISTRIBUTED_MODE_ENV = "VINAKIT_DISTRIBUTED"  # set by vinakit.launch: ddp, fsdp, deepspeed2 or deepspeed3
SHARDED_MODES = ("fsdp", "deepspeed3")  # modes whose ranks hold a shard of the weights, not a whole copy
NATIVE_BF16_CAPABILITY = (8, 0)

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}

__all__ = [
    "DeviceError", "DeviceProfile", "PROFILES", "PROFILE_ENV_VAR", "active_profile", "compare_dtype",
    "compare_dtype_name", "device_summary", "dtype_name", "free_memory", "input_device", "is_distributed",
    "load_dtype", "load_dtype_name", "local_device_map", "merge_dtype", "merge_dtype_name", "model_dtype",
    "optimizer_name", "peak_memory_gib", "pin_single_gpu", "profile_named", "reset_peak_memory", "trainer_flags",
    "trainer_precision", "distributed_summary", "process_rank", "world_size",
]


class DeviceError(VinakitError):
    """The device cannot do what was asked (a simulated GPU profile on a machine without a GPU ...)."""


@dataclass(frozen=True)
class DeviceProfile:
    """What the kit needs to know about one accelerator (or the CPU).

    Attributes:
        name: short name (``cpu``, ``t4``, ``a100`` ...).
        kind: ``"cpu"`` or ``"cuda"``.
        capability: CUDA compute capability ``(major, minor)``; None on CPU.
        memory_gib: memory the run may use, GiB (GPU memory; system memory on CPU).
        label: what a person calls it ("NVIDIA T4").
        simulated: True when chosen by name (``VINAKIT_DEVICE_PROFILE`` or ``--device``), not detected.
    """

    name: str
    kind: str
    capability: tuple[int, int] | None
    memory_gib: float
    label: str
    simulated: bool = False

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    @property
    def native_bf16(self) -> bool:
        """bfloat16 in hardware (Ampere and newer); never the emulation answer of ``is_bf16_supported()``."""
        return self.is_gpu and self.capability is not None and tuple(self.capability) >= NATIVE_BF16_CAPABILITY

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the manifest and ``vinakit plan``."""
        return {"profile": self.name, "device": self.label, "kind": self.kind,
                "capability": ".".join(map(str, self.capability)) if self.capability else None,
                "memory_gib": round(self.memory_gib, 2), "native_bf16": self.native_bf16,
                "simulated": self.simulated}


# Memory is what a run can use, as the hosted runtimes report it (a "16 GB" T4 shows 15 GiB).
PROFILES: dict[str, DeviceProfile] = {
    "cpu": DeviceProfile("cpu", "cpu", None, 16.0, "CPU"),
    "t4": DeviceProfile("t4", "cuda", (7, 5), 15.0, "NVIDIA T4 (Colab/Kaggle)"),
    "l4": DeviceProfile("l4", "cuda", (8, 9), 22.0, "NVIDIA L4"),
    "rtx4090": DeviceProfile("rtx4090", "cuda", (8, 9), 24.0, "NVIDIA RTX 4090"),
    "a100": DeviceProfile("a100", "cuda", (8, 0), 40.0, "NVIDIA A100 40GB"),
    "a100-80": DeviceProfile("a100-80", "cuda", (8, 0), 80.0, "NVIDIA A100 80GB"),
    "h100": DeviceProfile("h100", "cuda", (9, 0), 80.0, "NVIDIA H100 80GB"),
}


def profile_named(name: str) -> DeviceProfile:
    """The simulated profile called ``name``.

    Raises:
        ParamsError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower()
    if key not in PROFILES:
        raise ParamsError(f"Unknown device profile {name!r}: use one of {', '.join(PROFILES)}.")
    return replace(PROFILES[key], simulated=True)


def detected_profile() -> DeviceProfile:
    """The machine's own accelerator (the current CUDA device), or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return replace(PROFILES["cpu"], memory_gib=_system_memory_gib() or PROFILES["cpu"].memory_gib,
                       label=f"CPU ({os.cpu_count()} cores)")
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return DeviceProfile(name="cuda", kind="cuda", capability=tuple(torch.cuda.get_device_capability(index)),
                         memory_gib=properties.total_memory / 2**30, label=properties.name)


_memory_capped = False


def active_profile() -> DeviceProfile:
    """The profile runs follow: ``VINAKIT_DEVICE_PROFILE`` when set, else the detected device.

    On a real GPU a simulated profile also caps this process's GPU memory to the profile's size, so a T4 run can
    be rehearsed on a bigger card.

    Raises:
        DeviceError: a GPU profile is asked for on a machine without a GPU (only ``vinakit plan --device``
            simulates GPUs there).
    """
    name = os.environ.get(PROFILE_ENV_VAR, "").strip()
    if not name:
        return detected_profile()
    profile = profile_named(name)
    real = detected_profile()
    if profile.is_gpu and not real.is_gpu:
        raise DeviceError(f"{PROFILE_ENV_VAR}={name} simulates a GPU, but this machine has none. Unset it to run "
                          f"on the CPU, or see the {name} decisions with: vinakit plan NOTEBOOK --device {name}")
    if profile.is_gpu:
        _cap_gpu_memory(profile, real)
    return profile


def _cap_gpu_memory(profile: DeviceProfile, real: DeviceProfile) -> None:
    global _memory_capped
    if _memory_capped or profile.memory_gib >= real.memory_gib:
        return
    import torch

    torch.cuda.set_per_process_memory_fraction(profile.memory_gib / real.memory_gib)
    _memory_capped = True


def device_summary(profile: DeviceProfile | None = None) -> dict[str, Any]:
    """Describe the device a run uses, JSON-ready, for the run manifest.

    Returns:
        ``device_type`` ("cuda" or "cpu"), ``device_name``, ``profile`` (the policy's profile and whether it is
        simulated), ``capability``, ``native_bf16``, ``dtype`` (what :func:`load_dtype` chooses),
        ``memory_gib`` (what the run may use), ``device_count`` (GPUs), ``cpu_count``, ``torch_version`` and
        ``cuda_version`` (None on CPU builds).
    """
    import torch

    profile = profile or active_profile()
    return {
        "device_type": profile.kind,
        "device_name": profile.label,
        **profile.describe(),
        "dtype": dtype_name(load_dtype(profile)),
        "device_count": torch.cuda.device_count(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
    }


def _system_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None  # not available on this OS (e.g. Windows)


# --------------------------------------------------------------------------------------------------------------
# Dtypes and trainer precision
# --------------------------------------------------------------------------------------------------------------


def dtype_name(dtype: Any) -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for a torch dtype or any of its names.

    Raises:
        ParamsError: not one of those dtypes.
    """
    name = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ParamsError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}.")
    return name


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, dtype_name(name))


def load_dtype(profile: DeviceProfile | None = None, *, full_finetuning: bool = False,
               requested: Any = None) -> Any:
    """The dtype to load weights in (for 4-bit models: the compute dtype of the non-quantised parts).

    * CPU: float32 (CPU matmuls are fastest and exact in float32).
    * GPU with native bf16 (capability >= 8.0): bfloat16.
    * GPU without (T4, V100): float16; full fine-tuning float32, so that the master weights stay fp32 and
      training runs in fp16 autocast (pure fp16 weights lose small updates).

    Args:
        profile: the device (default :func:`active_profile`).
        full_finetuning: every weight is trained.
        requested: an explicit dtype (name or torch dtype) or None/"auto" to choose.

    Raises:
        ParamsError: bfloat16 requested on a GPU without native bf16.
    """
    return _torch_dtype(load_dtype_name(profile or active_profile(), full_finetuning=full_finetuning,
                                        requested=requested))


def model_dtype(model: Any) -> Any:
    """The dtype a loaded model computes in, read the way Unsloth's trainer reads it.

    ``config.dtype`` (``torch_dtype`` in older configs), else the input embeddings' weight dtype. For a 4-bit
    model this is the compute dtype of its non-quantised parts.
    """
    import torch

    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype_name(dtype))
    if dtype is None:
        dtype = model.get_input_embeddings().weight.dtype
    return dtype


def trainer_precision(model: Any, profile: DeviceProfile | None = None) -> dict[str, bool]:
    """``bf16``/``fp16``/``use_cpu`` for the trainer, from the loaded model's dtype (the invariant Unsloth checks).

    * CPU: no autocast (the float32 weights train as loaded).
    * float16 model: fp16. bfloat16 model: bf16.
    * float32 model on a GPU: autocast with fp32 master weights, bf16 where native, else fp16.
    """
    profile = profile or active_profile()
    # On a CPU the dtype does not matter (no autocast), so the model is not even asked.
    return trainer_flags(dtype_name(model_dtype(model)) if profile.is_gpu else "float32", profile)


def optimizer_name(requested: str, profile: DeviceProfile | None = None) -> str:
    """The optimizer to use: bitsandbytes' 8-bit optimizers need a GPU; on a CPU plain AdamW instead."""
    profile = profile or active_profile()
    if "8bit" in requested and not profile.is_gpu:
        return "adamw_torch"
    return requested


def merge_dtype(saved_dtype: str, profile: DeviceProfile | None = None) -> Any:
    """The torch dtype to merge models in (see :func:`merge_dtype_name`)."""
    return _torch_dtype(merge_dtype_name(saved_dtype, profile or active_profile()))


def merge_dtype_name(saved_dtype: str, profile: DeviceProfile) -> str:
    """The dtype to merge and compare models in: float32 on a CPU (exact sums, one rounding when saving), the
    saved dtype on a GPU (a float32 copy of a 3B model alone fills most of a T4), float16 for bfloat16 weights on
    a GPU without native bf16 (the save casts back)."""
    if not profile.is_gpu:
        return "float32"
    name = dtype_name(saved_dtype)
    return "float16" if name == "bfloat16" and not profile.native_bf16 else name


def compare_dtype(parameters: int, saved_dtype: str, profile: DeviceProfile | None = None) -> Any:
    """The torch dtype to compare models in (see :func:`compare_dtype_name`)."""
    return _torch_dtype(compare_dtype_name(parameters, saved_dtype, profile or active_profile()))


def compare_dtype_name(parameters: int, saved_dtype: str, profile: DeviceProfile) -> str:
    """The dtype the export's fidelity check compares in: float32, exact, on a CPU and wherever a float32 copy of
    the model takes under 60% of the GPU; else the merge dtype."""
    if not profile.is_gpu or parameters * 4 < 0.6 * profile.memory_gib * 2**30:
        return "float32"
    return merge_dtype_name(saved_dtype, profile)


def single_gpu_arguments(arguments: Any) -> Any:
    """Keep a single-process run on one GPU.

    With two GPUs visible (Kaggle's 2 x T4) the HF Trainer wraps the model in ``DataParallel``, which fails with
    4-bit models; several GPUs are used through torchrun/accelerate (one process per GPU) instead.
    """
    if not is_distributed() and getattr(arguments, "_n_gpu", 1) > 1:
        arguments._n_gpu = 1
    return arguments


def is_distributed() -> bool:
    """Whether this process is one rank of several (torchrun/accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device_map() -> dict[str, int] | None:
    """One whole model per process on its own GPU (``accelerate launch`` sets LOCAL_RANK per process); None on a
    CPU. ``device_map="auto"`` would split one model over every GPU, which breaks data-parallel training."""
    if not active_profile().is_gpu:
        return None
    if os.environ.get(DISTRIBUTED_MODE_ENV) in SHARDED_MODES:
        return None  # FSDP and ZeRO-3 place the shards; a whole copy per GPU first would defeat them (and ZeRO-3
        # refuses a device_map)
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def world_size() -> int:
    """Processes training together (1 outside torchrun/accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's global rank (0 outside torchrun/accelerate)."""
    return int(os.environ.get("RANK", "0"))


def distributed_summary(arguments: Any) -> dict[str, Any]:
    """The manifest's ``distributed`` entry: world size, mode, every rank's device and the effective batch.

    Every rank must call it (the devices are gathered from all ranks); on one process nothing is gathered.

    Args:
        arguments: the trainer's arguments (per-device batch and gradient accumulation).
    """
    ranks = world_size()
    mine = {"rank": process_rank(), "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "host": os.uname().nodename, "device": str(getattr(arguments, "device", "cpu"))}
    devices = [mine]
    if ranks > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            devices = [None] * dist.get_world_size()
            dist.all_gather_object(devices, mine)
    per_device = int(arguments.per_device_train_batch_size)
    accumulation = int(arguments.gradient_accumulation_steps)
    mode = os.environ.get(DISTRIBUTED_MODE_ENV) or ("ddp" if ranks > 1 else "none")  # one rank of ZeRO-2 is one
    return {"world_size": ranks, "mode": mode,
            "rank_devices": devices, "per_device_batch": per_device, "gradient_accumulation_steps": accumulation,
            "effective_global_batch": per_device * accumulation * ranks}


def pin_single_gpu() -> None:
    """Show one GPU to this process unless it runs under torchrun/accelerate (call before torch starts CUDA)."""
    if not is_distributed() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"


# --------------------------------------------------------------------------------------------------------------
# Devices of tensors, and memory
# --------------------------------------------------------------------------------------------------------------


def input_device(model: Any) -> Any:
    """The device input ids must be on: that of the (trainable copy of the) input embeddings.

    Not ``next(model.parameters()).device``: with ``embed_tokens`` in ``modules_to_save`` and Unsloth's gradient
    checkpointing, the original embedding stays on the CPU and is the model's first parameter.
    """
    embeddings = model.get_input_embeddings()
    copies = getattr(embeddings, "modules_to_save", None)
    if copies is not None and len(copies):
        active = getattr(embeddings, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        embeddings = copies[active] if active in copies else next(iter(copies.values()))
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.device
    return next(p for p in model.parameters() if p.requires_grad or p.device.type != "meta").device


def free_memory() -> None:
    """Collect garbage and return cached GPU blocks to the driver.

    This frees a model only once no name refers to it any more: the kit loads temporary models inside the
    function that uses them, so that they are gone when it returns (``del`` in a helper frees nothing while the
    caller still holds the model).
    """
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    """Start measuring peak GPU memory from here (a no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak GPU memory allocated since the last reset, GiB; None on CPU."""
    if "torch" not in sys.modules:
        return None  # nothing ran on a GPU in this process (and importing torch here would only cost time)
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


# --------------------------------------------------------------------------------------------------------------
# The same decisions by dtype name, without torch (``vinakit plan`` answers before any model or torch loads)
# --------------------------------------------------------------------------------------------------------------


def load_dtype_name(profile: DeviceProfile, *, full_finetuning: bool = False, requested: Any = None) -> str:
    """The name of the dtype :func:`load_dtype` chooses (``"float32"``, ``"bfloat16"`` or ``"float16"``).

    Raises:
        ParamsError: bfloat16 requested on a GPU without native bf16.
    """
    if requested is not None and requested != "auto":
        name = dtype_name(requested)
        if name == "bfloat16" and profile.is_gpu and not profile.native_bf16:
            raise ParamsError(f"bfloat16 was requested, but the {profile.label} has no native bfloat16 "
                              f"(compute capability {profile.capability}); use float16 or float32.")
        return name
    if not profile.is_gpu:
        return "float32"
    if profile.native_bf16:
        return "bfloat16"
    return "float32" if full_finetuning else "float16"


def trainer_flags(dtype: Any, profile: DeviceProfile) -> dict[str, bool]:
    """``bf16``/``fp16``/``use_cpu`` for a model that computes in ``dtype`` (a name or torch dtype).

    What :func:`trainer_precision` answers for a loaded model; ``vinakit plan`` passes :func:`load_dtype_name`.

    Raises:
        DeviceError: a bfloat16 model on a GPU without native bf16.
    """
    if not profile.is_gpu:
        return {"bf16": False, "fp16": False, "use_cpu": True}
    name = dtype_name(dtype)
    if name == "float16":
        return {"bf16": False, "fp16": True, "use_cpu": False}
    if name == "bfloat16":
        if not profile.native_bf16:
            raise DeviceError(f"The model was loaded in bfloat16, which the {profile.label} does not support "
                              f"natively; load it with the device policy's dtype (float16).")
        return {"bf16": True, "fp16": False, "use_cpu": False}
    # float32 weights: autocast with fp32 master weights.
    return {"bf16": profile.native_bf16, "fp16": not profile.native_bf16, "use_cpu": False}
