"""The one device policy: every notebook's dtype, trainer precision and optimizer under simulated GPUs.

A CPU machine cannot run a T4, but the decisions are functions of a device profile, so each profile's decisions
are checked here on real (tiny) models loaded in the dtype the policy picks. The invariant is the one Unsloth's
trainer enforces: a float16 model never trains with bf16, a bfloat16 model never with fp16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vinakit.device import (PROFILE_ENV_VAR, PROFILES, DeviceError, active_profile, input_device, load_dtype,
                            model_dtype, optimizer_name, profile_named, trainer_precision)
from vinakit.errors import ParamsError
from vinakit.params import NOTEBOOK_PARAMS

REPO = Path(__file__).resolve().parent.parent
PRESETS = [REPO / "params" / "colab_t4.yaml", REPO / "params" / "cpu_tiny.yaml"]
TRAINING_NOTEBOOKS = [name for name, cls in NOTEBOOK_PARAMS.items() if "full_finetuning" in cls.field_types()]


def _load_tiny_in(dtype):
    """tiny-vi loaded from its folder in ``dtype``, as a loader on that device would load it."""
    from vinakit.tiny import load_tiny

    return load_tiny(dtype=dtype)[0]


def test_native_bf16_means_capability_8_or_more_never_emulation() -> None:
    expected = {"cpu": False, "t4": False, "l4": True, "rtx4090": True, "a100": True, "a100-80": True,
                "h100": True}
    assert {name: profile.native_bf16 for name, profile in PROFILES.items()} == expected
    assert PROFILES["t4"].capability == (7, 5) and PROFILES["t4"].memory_gib == 15.0


@pytest.mark.parametrize("profile_name", list(PROFILES))
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("notebook", TRAINING_NOTEBOOKS)
def test_every_training_notebook_gets_consistent_dtype_precision_and_optimizer(notebook, preset, profile_name):
    import torch

    profile = profile_named(profile_name)
    params = NOTEBOOK_PARAMS[notebook].from_sources([preset])
    dtype = load_dtype(profile, full_finetuning=params.full_finetuning)
    model = _load_tiny_in(dtype)
    flags = trainer_precision(model, profile)
    loaded = model_dtype(model)
    # Unsloth's check: "Model is in float16 precision but you want to use bfloat16 precision" and the reverse.
    assert not (loaded == torch.float16 and flags["bf16"])
    assert not (loaded == torch.bfloat16 and flags["fp16"])
    if profile.is_gpu:
        assert flags["bf16"] != flags["fp16"], "a GPU trains in exactly one mixed precision"
        assert flags["bf16"] == profile.native_bf16
        assert not flags["use_cpu"]
    else:
        assert loaded == torch.float32 and flags == {"bf16": False, "fp16": False, "use_cpu": True}
    optimizer = optimizer_name(params.optim, profile)
    assert ("8bit" in optimizer) == ("8bit" in params.optim and profile.is_gpu)


@pytest.mark.parametrize("profile_name", [n for n, p in PROFILES.items() if p.is_gpu and not p.native_bf16])
def test_t4_loads_float16_and_keeps_fp32_master_weights_for_full_finetuning(profile_name: str) -> None:
    import torch

    profile = profile_named(profile_name)
    assert load_dtype(profile) == torch.float16
    assert load_dtype(profile, full_finetuning=True) == torch.float32
    assert trainer_precision(_load_tiny_in(torch.float32), profile) == {"bf16": False, "fp16": True,
                                                                         "use_cpu": False}
    with pytest.raises(ParamsError, match="no native bfloat16"):
        load_dtype(profile, requested="bf16")
    with pytest.raises(DeviceError, match="bfloat16"):
        trainer_precision(_load_tiny_in(torch.bfloat16), profile)


def test_explicit_dtypes_and_unknown_names() -> None:
    import torch

    a100 = profile_named("a100")
    assert load_dtype(a100, requested="bf16") == torch.bfloat16
    assert load_dtype(a100, requested=torch.float16) == torch.float16
    assert load_dtype(a100, requested="auto") == torch.bfloat16
    with pytest.raises(ParamsError, match="dtype"):
        load_dtype(a100, requested="float8")
    with pytest.raises(ParamsError, match="t4, l4"):
        profile_named("v100")


def test_profile_env_var_on_a_cpu_machine_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv(PROFILE_ENV_VAR, "cpu")
    assert active_profile().name == "cpu" and active_profile().simulated
    monkeypatch.setenv(PROFILE_ENV_VAR, "t4")
    with pytest.raises(DeviceError, match="vinakit plan NOTEBOOK --device t4"):
        active_profile()
    monkeypatch.delenv(PROFILE_ENV_VAR)
    assert active_profile().kind == "cpu" and not active_profile().simulated


def test_input_device_follows_the_trainable_embeddings_not_the_first_parameter() -> None:
    """Unsloth keeps the original embedding on the CPU as the model's first parameter when embed_tokens is in
    modules_to_save; inputs must go where the trainable copy is. The meta device stands in for the GPU."""
    import torch

    from vinakit.model import add_lora

    model = add_lora(_load_tiny_in(torch.float32), backend="hf", rank=4, target_modules="q_proj",
                     modules_to_save=["embed_tokens", "lm_head"])
    wrapper = model.get_input_embeddings()
    copy = wrapper.modules_to_save[wrapper.active_adapter]
    copy.to("meta")
    assert next(model.parameters()).device.type == "cpu", "the first parameter stays behind, as with Unsloth"
    assert input_device(model).type == "meta"
    plain = _load_tiny_in(torch.float32)
    plain.get_input_embeddings().to("meta")
    assert input_device(plain).type == "meta"


def test_no_device_decision_outside_the_policy() -> None:
    """The emulation answer of is_bf16_supported() and the first parameter's device are asked nowhere else."""
    offenders = []
    for path in sorted((REPO / "vinakit").rglob("*.py")):
        if path.name == "device.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("is_bf16_supported(", "parameters()).device", "cuda.is_available()"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert not offenders, offenders


def test_trainer_arguments_follow_the_loaded_model(tmp_path: Path) -> None:
    """The kit's SFT config gets its precision flags from the policy; on this CPU: no autocast."""
    import torch

    from vinakit.params import SFTParams
    from vinakit.record import start_run
    from vinakit.train import training_arguments

    if torch.cuda.is_available():
        pytest.skip("checks the CPU flags")
    params = SFTParams(model_name="tiny-vi", backend="hf", load_in_4bit=False, output_dir=str(tmp_path),
                       optim="adamw_8bit")
    config = training_arguments(params, start_run(params), _load_tiny_in(torch.float32), has_eval=False)
    assert (config.bf16, config.fp16, config.use_cpu) == (False, False, True)
    assert config.optim == "adamw_torch" and config.embedding_learning_rate is None and config.length_buckets


def test_simulated_gpu_profile_in_a_fresh_process_is_refused_on_cpu() -> None:
    code = "from vinakit.device import active_profile; active_profile()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, PROFILE_ENV_VAR: "t4"}, cwd=REPO)
    import torch

    if torch.cuda.is_available():
        assert result.returncode == 0
    else:
        assert result.returncode != 0 and "simulates a GPU" in result.stderr


def test_merge_and_compare_dtypes_follow_the_device_and_its_memory() -> None:
    import torch

    from vinakit.device import compare_dtype, merge_dtype

    cpu, t4, a100 = profile_named("cpu"), profile_named("t4"), profile_named("a100")
    assert merge_dtype("bfloat16", cpu) == torch.float32, "a CPU merges exactly, in float32"
    assert merge_dtype("bfloat16", a100) == torch.bfloat16
    assert merge_dtype("bfloat16", t4) == torch.float16, "a T4 has no native bf16"
    assert merge_dtype("float16", t4) == torch.float16
    one_b, seven_b = 1_240_000_000, 7_620_000_000
    assert compare_dtype(seven_b, "bfloat16", cpu) == torch.float32
    assert compare_dtype(one_b, "bfloat16", t4) == torch.float32, "a float32 1B model (5 GB) fits a T4"
    assert compare_dtype(seven_b, "bfloat16", t4) == torch.float16
    assert compare_dtype(seven_b, "bfloat16", a100) == torch.bfloat16, "28 GiB is over 60% of 40 GiB"
    assert compare_dtype(seven_b, "bfloat16", profile_named("a100-80")) == torch.float32


def test_one_gpu_is_pinned_only_for_a_single_process_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from vinakit.device import pin_single_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: every rank keeps its own GPU
    pin_single_gpu()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.delenv("WORLD_SIZE")
    pin_single_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the user's own choice wins
    pin_single_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
