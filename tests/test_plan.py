"""``vinakit plan`` and vinakit.plan: precision, optimizer and peak-memory estimates per device profile (CPU only)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from vinakit import device, plan
from vinakit.cli import main
from vinakit.errors import VinakitError
from vinakit.model_sizes import model_sizes
from vinakit.params import params_class
from vinakit.record import start_run

REPO = Path(__file__).resolve().parent.parent
T4_YAML = str(REPO / "params" / "colab_t4.yaml")
NOTEBOOKS = ("sft", "cpt", "eval_mcq", "export")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No profile from the environment, and an empty Hugging Face cache (the user's must not change answers)."""
    monkeypatch.delenv(device.PROFILE_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """An SFT run's adapter folder on the 4-bit Llama-3.2-1B (what the export notebook is given)."""
    folder = tmp_path / "sft-run" / "adapter"
    folder.mkdir(parents=True)
    config = {"base_model_name_or_path": "unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "r": 128, "peft_type": "LORA",
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def plan_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def params_for(notebook: str, **overrides: object):
    return params_class(notebook).from_sources([T4_YAML], [(name, str(value).lower() if isinstance(value, bool)
                                                               else str(value)) for name, value in overrides.items()])


# --------------------------------------------------------------------------------------------------------------
# Precision and optimizer
# --------------------------------------------------------------------------------------------------------------


def test_t4_sft_fits_in_float16_with_fp16_trainer_and_8bit_adam(capsys: pytest.CaptureFixture):
    code, out, _ = plan_cli(capsys, "sft", "-f", T4_YAML, "--device", "t4")
    assert code == 0, out
    assert "float16 weights" in out and "bfloat16" not in out
    assert "fp16=True" in out and "bf16=False" in out
    assert "optimizer: adamw_8bit" in out
    assert ": fits" in out


@pytest.mark.parametrize("profile", ["a100", "h100"])
def test_ampere_and_hopper_plan_bf16(capsys: pytest.CaptureFixture, profile: str):
    code, out, _ = plan_cli(capsys, "sft", "-f", T4_YAML, "--device", profile)
    assert code == 0
    assert "bfloat16 weights" in out and "bf16=True" in out and "fp16=False" in out


def test_profile_comes_from_the_environment_without_device(capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(device.PROFILE_ENV_VAR, "h100")
    code, out, _ = plan_cli(capsys, "sft", "-f", T4_YAML)
    assert code == 0 and "profile h100" in out and "bf16=True" in out


def _expected_precision(notebook: str, profile: device.DeviceProfile) -> tuple[str, dict[str, bool] | None]:
    """What the device policy itself answers (torch dtypes, a model stand-in for trainer_precision)."""
    if notebook == "export":  # the fidelity check compares in float32 when a float32 1B model fits easily
        return "float32", None
    dtype = device.load_dtype(profile)
    if notebook == "eval_mcq":
        return device.dtype_name(dtype), None
    model = SimpleNamespace(config=SimpleNamespace(dtype=dtype))
    return device.dtype_name(dtype), device.trainer_precision(model, profile)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
@pytest.mark.parametrize("profile_name", list(device.PROFILES))
def test_every_profile_and_notebook_plans_the_policy_precision(capsys: pytest.CaptureFixture, adapter_dir: Path,
                                                               notebook: str, profile_name: str):
    extra = ["-p", "adapter", str(adapter_dir)] if notebook == "export" else []
    code, out, err = plan_cli(capsys, notebook, "-f", T4_YAML, "--device", profile_name, *extra)
    assert code in (0, 3), err
    profile = device.profile_named(profile_name)
    dtype, flags = _expected_precision(notebook, profile)
    assert f"precision: {dtype} weights" in out
    if flags is not None:
        assert f"bf16={flags['bf16']} fp16={flags['fp16']}" in out
        assert f"optimizer: {device.optimizer_name('adamw_8bit', profile)}" in out
    assert ("does NOT fit" in out) == (code == 3)


# --------------------------------------------------------------------------------------------------------------
# Does not fit: suggestions and exit status 3
# --------------------------------------------------------------------------------------------------------------


def test_7b_in_16bit_on_a_t4_does_not_fit_and_suggests_4bit(capsys: pytest.CaptureFixture):
    code, out, _ = plan_cli(capsys, "sft", "-f", T4_YAML, "--device", "t4", "-p", "model_name",
                            "Qwen/Qwen2.5-7B-Instruct", "-p", "load_in_4bit", "false")
    assert code == 3
    assert "does NOT fit" in out
    assert "-p load_in_4bit true" in out
    suggestions = plan.estimate(params_for("sft", model_name="Qwen/Qwen2.5-7B-Instruct", load_in_4bit=False),
                                device.profile_named("t4")).suggestions
    names = [s.name for s in suggestions]
    assert names[0] == "load_in_4bit" and suggestions[0].fits  # the one change that fits comes first
    assert {"rank", "per_device_train_batch_size", "max_seq_length"} <= set(names)
    assert all(s.saves_gib > 0 for s in suggestions)


def test_invalid_parameters_fail_before_planning(capsys: pytest.CaptureFixture):
    code, _, err = plan_cli(capsys, "sft", "-f", T4_YAML, "--device", "t4", "-p", "rnak", "8")
    assert code == 2 and "Did you mean 'rank'" in err


def test_unknown_device_profile_is_an_error(capsys: pytest.CaptureFixture):
    code, _, err = plan_cli(capsys, "sft", "-f", T4_YAML, "--device", "v100")
    assert code == 2 and "t4" in err


# --------------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile_name", ["t4", "a100", "cpu"])
@pytest.mark.parametrize("loader", ["unsloth", "hf"])  # not "backend": conftest gives that name its own meaning
@pytest.mark.parametrize(("name", "values"), [("rank", [8, 16, 64, 128, 256]),
                                              ("per_device_train_batch_size", [1, 2, 4, 8]),
                                              ("max_seq_length", [256, 512, 1024, 2048, 4096])])
def test_estimate_grows_with_rank_batch_and_seq_length(profile_name: str, loader: str, name: str,
                                                       values: list[int]):
    profile = device.profile_named(profile_name)
    totals = [plan.estimate(params_for("sft", backend=loader, **{name: v}), profile).total_gib for v in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals), totals


def test_4bit_weights_are_well_under_16bit():
    t4 = device.profile_named("t4")
    four = plan.estimate(params_for("sft", load_in_4bit=True), t4).parts["weights"]
    sixteen = plan.estimate(params_for("sft", load_in_4bit=False), t4).parts["weights"]
    assert four < 0.5 * sixteen
    assert 0.8 < four < 1.1  # NF4 linear layers (0.47 GiB) + the float16 tied embedding (0.49 GiB)


@pytest.mark.parametrize(("name", "billions", "gib_16bit"), [("unsloth/Llama-3.2-1B-Instruct", 1.24, 2.3),
                                                             ("Qwen/Qwen2.5-7B-Instruct", 7.62, 14.2)])
def test_16bit_weights_match_the_known_parameter_counts(name: str, billions: float, gib_16bit: float):
    sizes = model_sizes(name)
    assert sizes.parameters / 1e9 == pytest.approx(billions, rel=0.01)
    weights = plan.estimate(params_for("sft", model_name=name, load_in_4bit=False), device.profile_named("a100"))
    assert weights.parts["weights"] == pytest.approx(gib_16bit, abs=0.1)


# Published parameter counts (model cards); a typo in the shipped table shows up here.
@pytest.mark.parametrize(("name", "billions"), [
    ("meta-llama/Llama-3.2-3B", 3.21), ("meta-llama/Llama-3.1-8B", 8.03), ("Qwen/Qwen2.5-0.5B", 0.49),
    ("Qwen/Qwen2.5-1.5B", 1.54), ("Qwen/Qwen2.5-3B", 3.09), ("Qwen/Qwen3-0.6B", 0.6), ("Qwen/Qwen3-1.7B", 1.7),
    ("Qwen/Qwen3-4B", 4.0), ("Qwen/Qwen3-8B", 8.2), ("google/gemma-3-1b-it", 1.0), ("HuggingFaceTB/SmolLM2-1.7B", 1.71),
    ("mistralai/Mistral-7B-v0.3", 7.25)])
def test_shipped_sizes_give_the_published_parameter_counts(name: str, billions: float):
    assert model_sizes(name).parameters / 1e9 == pytest.approx(billions, rel=0.03)


def test_cpt_trains_one_embedding_copy_when_tied_and_two_when_untied():
    t4 = device.profile_named("t4")
    tied = plan.estimate(params_for("cpt"), t4)
    untied = plan.estimate(params_for("cpt", model_name="unsloth/Llama-3.1-8B-Instruct"), t4)
    copy_bytes = 4 + 4 + 2 * plan.STATE_8BIT_BYTES  # float16 copies train in float32 (weights, grads, 8-bit Adam)
    one_llama_matrix = 128256 * 2048 * copy_bytes / plan.GIB
    assert tied.parts["trained embeddings"] == pytest.approx(one_llama_matrix, rel=1e-6)
    assert untied.parts["trained embeddings"] == pytest.approx(2 * 128256 * 4096 * copy_bytes / plan.GIB, rel=1e-6)
    full = plan.estimate(params_for("cpt", full_finetuning=True, load_in_4bit=False), device.profile_named("a100"))
    assert "trained embeddings" not in full.parts and {"gradients", "optimizer states"} <= set(full.parts)


def test_new_tokens_grow_the_vocabulary_of_a_cpt_plan():
    t4 = device.profile_named("t4")
    base = plan.estimate(params_for("cpt"), t4)
    grown = plan.estimate(params_for("cpt", num_new_tokens=2000), t4)
    assert grown.sizes.vocab_size == base.sizes.vocab_size + 2000
    assert grown.parts["trained embeddings"] > base.parts["trained embeddings"]


def test_full_finetuning_on_a_t4_keeps_float32_weights():
    t4 = device.profile_named("t4")
    full = plan.estimate(params_for("sft", full_finetuning=True, load_in_4bit=False, optim="adamw_torch"), t4)
    assert full.precision["load_dtype"] == "float32" and full.precision["fp16"] is True
    assert full.parts["weights"] == pytest.approx(full.sizes.parameters * 4 / plan.GIB)
    assert not full.fits and any(s.name == "full_finetuning" for s in full.suggestions)


def test_a_preference_batch_counts_chosen_and_rejected_with_the_whole_vocabulary_loss():
    profile = device.profile_named("t4")
    shared = {"per_device_train_batch_size": 2, "max_seq_length": 2048}
    sft = plan.estimate(params_for("sft", **shared), profile).parts
    pairs = plan.estimate(params_for("preference", **shared), profile).parts
    assert pairs["activations"] == pytest.approx(2 * sft["activations"], rel=0.05)  # + one dequantised weight
    sizes = model_sizes("unsloth/Llama-3.2-1B-Instruct")
    whole = 2 * 2 * 2048 * sizes.vocab_size * (2 + 12) / plan.GIB  # 16-bit logits, fp32 upcast, log_softmax, grad
    assert pairs["logits/loss"] == pytest.approx(whole, rel=1e-3) and sft["logits/loss"] < whole


def test_eval_mcq_counts_the_kv_cache_of_the_whole_batch():
    result = plan.estimate(params_for("eval_mcq"), device.profile_named("t4"))
    # 16 prompts x 2048 tokens x 16 layers x (K, V) x 8 KV heads x 64 dims x 2 bytes = 1 GiB
    assert result.parts["KV cache"] == pytest.approx(1.0)
    assert result.optimizer is None and "LoRA" not in result.parts


def test_export_plans_the_fidelity_reference_in_float32(adapter_dir: Path):
    result = plan.estimate(params_for("export", adapter=str(adapter_dir.parent)), device.profile_named("t4"))
    float32_model = result.sizes.parameters * 4 / plan.GIB
    lora = 128 * 44032 * 16 * 4 / plan.GIB  # r x (in + out) of the 7 projections x 16 layers, float32
    assert result.parts["model"] == pytest.approx(float32_model + lora)  # one model alive at a time
    assert result.precision["load_dtype"] == "float32" and result.fits
    big = plan.estimate(params_for("export", adapter=str(adapter_dir.parent)), replace(device.profile_named("t4"),
                                                                                      memory_gib=6.0))
    assert big.precision["load_dtype"] == "float16"  # a float32 copy would take over 60% of the GPU


# --------------------------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "meta-llama/Llama-3.2-1B-Instruct",
                                  "unsloth/llama-3.2-1b-instruct-unsloth-bnb-4bit", "LLAMA-3.2-1B"])
def test_table_names_match_variants_case_insensitively(name: str):
    sizes = model_sizes(name)
    assert (sizes.hidden_size, sizes.num_hidden_layers, sizes.vocab_size) == (2048, 16, 128256)
    assert sizes.prequantized_4bit == ("bnb-4bit" in name)


@pytest.mark.parametrize(("name", "vocab"), [("unsloth/Meta-Llama-3.1-8B-Instruct", 128256),
                                             ("google/gemma-3-4b-it", 262208), ("unsloth/gemma-3-1b-it", 262144),
                                             ("unsloth/mistral-7b-instruct-v0.3-bnb-4bit", 32768),
                                             ("Viet-Mistral/Vistral-7B-Chat", 38369), ("QWEN/qwen3-8b-base", 151936)])
def test_other_bases_resolve(name: str, vocab: int):
    assert model_sizes(name).vocab_size == vocab


def test_tiny_vi_resolves_from_its_local_folder():
    from vinakit.tiny import RECIPE, tiny_model_dir

    sizes = model_sizes("tiny-vi")
    assert str(tiny_model_dir()) in sizes.source and sizes.source.endswith("config.json")
    assert (sizes.hidden_size, sizes.num_hidden_layers) == (RECIPE["hidden_size"], RECIPE["num_hidden_layers"])


def test_a_local_folder_config_wins(tmp_path: Path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 3, "intermediate_size": 512,
              "vocab_size": 1000, "num_attention_heads": 4, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    sizes = model_sizes(str(folder))
    assert (sizes.num_key_value_heads, sizes.head_dim, sizes.tie_word_embeddings) == (4, 64, True)


def test_the_hugging_face_cache_is_read_offline(tmp_path: Path):
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "hf-cache" / "models--acme--vi-3b"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123", encoding="utf-8")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    config = {"model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 36, "intermediate_size": 11008,
              "vocab_size": 151936, "num_attention_heads": 16, "num_key_value_heads": 2,
              "tie_word_embeddings": True}
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    sizes = model_sizes("acme/vi-3b")
    assert "Hugging Face cache" in sizes.source and sizes.head_dim == 128


def test_an_unknown_hub_name_is_a_clear_error(capsys: pytest.CaptureFixture):
    code, _, err = plan_cli(capsys, "sft", "-f", T4_YAML, "--device", "t4", "-p", "model_name", "acme/vi-model-9b")
    assert code == 2
    assert "acme/vi-model-9b" in err and "local model folder" in err and "Qwen/Qwen2.5-7B" in err
    with pytest.raises(VinakitError, match="unknown"):
        model_sizes("someone/Llama-3.2-1B")  # a fine-tune by another owner may differ: not guessed


# --------------------------------------------------------------------------------------------------------------
# The check the notebooks run before loading
# --------------------------------------------------------------------------------------------------------------


def test_check_before_loading_records_the_estimate_and_warns_when_too_big(tmp_path: Path):
    params = params_for("sft", model_name="Qwen/Qwen2.5-7B-Instruct", load_in_4bit=False,
                        output_dir=str(tmp_path / "out"), run_name="big")
    run = start_run(params)
    with pytest.warns(plan.MemoryWarning, match="may run out of memory.*load_in_4bit"):
        result = plan.check_before_loading(params, run, profile=device.profile_named("t4"))
    assert not result.fits
    assert run.read_json("metrics.json")["estimated_peak_memory_gib"] == pytest.approx(result.total_gib, abs=0.01)
    recorded = run.read_json("manifest.json")["memory_plan"]
    assert recorded["fits"] is False and recorded["precision"]["load_dtype"] == "float16"
    assert recorded["suggestions"][0]["name"] == "load_in_4bit"


def test_check_before_loading_records_unknown_sizes_and_goes_on(tmp_path: Path, recwarn: pytest.WarningsRecorder):
    params = params_for("cpt", model_name="acme/vi-model-9b", output_dir=str(tmp_path / "out"), run_name="unknown")
    run = start_run(params)
    assert plan.check_before_loading(params, run, profile=device.profile_named("cpu")) is None
    assert run.read_json("metrics.json")["estimated_peak_memory_gib"] == "unknown"
    assert run.read_json("manifest.json")["memory_plan"]["status"] == "unknown"
    assert not [w for w in recwarn if issubclass(w.category, plan.MemoryWarning)]


def test_plan_imports_neither_torch_nor_transformers(tmp_path: Path):
    code = ("import sys; from vinakit.cli import main; rc = main(['plan', 'sft', '-f', %r, '--device', 't4']); "
            "heavy = [m for m in ('torch', 'transformers', 'unsloth') if m in sys.modules]; "
            "assert not heavy, heavy; sys.exit(rc)") % T4_YAML
    environment = {"PATH": "", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "adamw_8bit" in result.stdout
