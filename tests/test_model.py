"""Tests of vinakit.model and vinakit.tiny: the embedded tiny model and loading on both backends.

The ``backend`` argument is parametrised by conftest.py (hf first, Unsloth cases last). Every test builds
into its own cache folder or the module's, never into the user's ~/.cache.
"""

from __future__ import annotations

import json
import os
import threading
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest

from vinakit.errors import ParamsError, VinakitError
from vinakit.tiny import END_OF_TURN_TOKEN, EOS_TOKEN, PAD_TOKEN, TURN_START_TOKEN

SENTENCE_NFC = unicodedata.normalize("NFC", "Thủy điện Hòa Bình ở miền Bắc, hoà bình và thuỷ lợi cho Việt Nam.")
SENTENCE_NFD = unicodedata.normalize("NFD", SENTENCE_NFC)
ALL_LINEAR_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for this module, so ``"tiny-vi"`` builds once here and never in the user's cache."""
    folder = tmp_path_factory.mktemp("vinakit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VINAKIT_CACHE", str(folder))
        yield folder


def _load(backend: str, **kwargs):
    from vinakit.model import load_model

    return load_model("tiny-vi", backend=backend, max_seq_length=128, **kwargs)


def _loss_and_backward(model, tokenizer):
    batch = tokenizer(SENTENCE_NFC, return_tensors="pt")
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss


def _trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# The embedded tiny model
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_model_folder_has_the_recipe(module_cache: Path) -> None:
    from vinakit.model import tiny_model_dir

    folder = tiny_model_dir()
    assert folder.parent == module_cache and folder.name.startswith("tiny-vi-")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (128, 4, 4, 2, 384)
    assert config["max_position_embeddings"] == 2048 and config["tie_word_embeddings"] is False
    assert (folder / "model.safetensors").is_file()

    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        dtypes = {str(weights.get_tensor(key).dtype) for key in weights.keys()}
    assert dtypes == {"torch.float32"}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN),
                                          tokenizer.convert_tokens_to_ids(EOS_TOKEN)]
    assert generation["pad_token_id"] == tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert (tokenizer.eos_token, tokenizer.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert 1000 < len(tokenizer) <= 4096 and config["vocab_size"] == len(tokenizer)


def test_tiny_model_second_call_reuses_the_cache(module_cache: Path) -> None:
    from vinakit.model import tiny_model_dir

    first = tiny_model_dir()
    built_at = (first / "model.safetensors").stat().st_mtime_ns
    second = tiny_model_dir()
    assert second == first and (second / "model.safetensors").stat().st_mtime_ns == built_at
    assert [p.name for p in module_cache.iterdir()] == [first.name]  # no temp folders left behind


def test_tiny_model_explicit_cache_dir_and_concurrent_builds(tmp_path: Path) -> None:
    from vinakit.model import tiny_model_dir

    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(tiny_model_dir(tmp_path))
        except BaseException as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(results)) == 1 and results[0].parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].name]  # loser's temp folder removed
    assert (results[0] / "model.safetensors").is_file() and (results[0] / "tokenizer.json").is_file()


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    from vinakit.tiny import build_tiny_model, corpus_texts

    texts = corpus_texts()
    builds = [tmp_path / "a", tmp_path / "b"]
    for folder in builds:
        folder.mkdir()
        build_tiny_model(folder, texts)
    contents = [{path.name: path.read_bytes() for path in sorted(folder.iterdir())} for folder in builds]
    assert contents[0] == contents[1] and "model.safetensors" in contents[0]


def test_tiny_folder_name_follows_corpus_and_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from vinakit import tiny

    base = tiny.tiny_folder_name(["Hòa bình"])
    assert tiny.tiny_folder_name(["Hòa bình"]) == base
    assert tiny.tiny_folder_name(["Hoà bình"]) != base  # another tone-mark placement is another corpus
    monkeypatch.setitem(tiny.RECIPE, "hidden_size", 64)
    assert tiny.tiny_folder_name(["Hòa bình"]) != base


def test_corpus_survives_missing_and_broken_files(tmp_path: Path) -> None:
    from vinakit.tiny import SEED_TEXT, corpus_texts

    assert corpus_texts(tmp_path) == list(SEED_TEXT)  # no sample data at all: still a corpus
    (tmp_path / "chat_vi.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "Thủy triều là gì?"}]}\n{hỏng\n', encoding="utf-8")
    (tmp_path / "mcq_tinhoc.csv").write_text(
        "context,question\n\"Bộ nhớ RAM mất dữ liệu khi tắt máy.\",RAM là gì?\n\"dòng lỗi\n", encoding="utf-8")
    texts = corpus_texts(tmp_path)
    assert "Thủy triều là gì?" in texts and "{hỏng" in texts
    assert "Bộ nhớ RAM mất dữ liệu khi tắt máy." in texts and "context" not in texts



def _damaged_copy(root: Path, damage: str) -> tuple[Path, Path]:
    """(the module's good build, a copy of it under ``root`` with ``damage`` done to it)."""
    import shutil

    from vinakit.model import tiny_model_dir

    good = tiny_model_dir()
    copy = root / good.name
    shutil.copytree(good, copy)
    if damage == "truncate":
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut off midway
    elif damage == "no_tokenizer":
        (copy / "tokenizer.json").unlink()
    elif damage == "no_stamp":
        (copy / "vinakit_build.json").unlink()
    return good, copy


def _copying_build(good: Path, calls: list[Path]):
    """A stand-in for build_tiny_model that copies the good build (a real build takes seconds)."""
    import shutil

    def build(folder: Path, texts: list[str]) -> None:
        calls.append(folder)
        for path in good.iterdir():
            if path.name != "vinakit_build.json":
                shutil.copy2(path, folder / path.name)

    return build


def test_truncated_cached_weights_are_rebuilt_once_with_a_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from vinakit.tiny import load_tiny

    good, copy = _damaged_copy(tmp_path, "truncate")
    model, tokenizer = load_tiny(tmp_path)  # a real rebuild: before, this raised SafetensorError with no path
    assert model.config.vocab_size == len(tokenizer)
    err = capfd.readouterr().err
    assert f"the cached tiny-vi model in {copy} is damaged" in err and "model.safetensors" in err
    assert "rebuilding it" in err
    assert (copy / "model.safetensors").read_bytes() == (good / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [copy.name]  # the damaged folder is gone
    load_tiny(tmp_path)
    assert "damaged" not in capfd.readouterr().err  # rebuilt once, then used as it is


def test_missing_tokenizer_file_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capfd: pytest.CaptureFixture) -> None:
    from vinakit import tiny

    good, copy = _damaged_copy(tmp_path, "no_tokenizer")
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_model", _copying_build(good, calls))
    assert tiny.tiny_model_dir(tmp_path) == copy and len(calls) == 1
    assert "tokenizer.json is missing" in capfd.readouterr().err
    assert (copy / "tokenizer.json").read_bytes() == (good / "tokenizer.json").read_bytes()
    assert tiny.tiny_model_dir(tmp_path) == copy and len(calls) == 1


def test_a_rebuild_that_fails_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vinakit import tiny

    _, copy = _damaged_copy(tmp_path, "truncate")

    def full_disk(folder: Path, texts: list[str]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny, "build_tiny_model", full_disk)
    with pytest.raises(VinakitError) as caught:
        tiny.tiny_model_dir(tmp_path)
    message = str(caught.value)
    assert f"The cached tiny-vi model in {copy} was damaged" in message and "rebuilding it failed" in message
    assert "No space left on device" in message and "VINAKIT_CACHE" in message


def test_a_build_without_a_stamp_is_checked_by_its_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches built before stamps existed are adopted when intact (no needless rebuild) and rebuilt when cut."""
    from vinakit import tiny

    good, copy = _damaged_copy(tmp_path / "intact", "no_stamp")
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_model", _copying_build(good, calls))
    assert tiny.tiny_model_dir(tmp_path / "intact") == copy and calls == []
    assert (copy / "vinakit_build.json").is_file()  # stamped now: later calls check sizes only

    _, cut = _damaged_copy(tmp_path / "cut", "truncate")
    (cut / "vinakit_build.json").unlink()
    assert tiny.tiny_model_dir(tmp_path / "cut") == cut and len(calls) == 1
    assert (cut / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size

# ----------------------------------------------------------------------------------------------------------------
# Loading on both backends
# ----------------------------------------------------------------------------------------------------------------


def test_tokenizer_reload_keeps_ids_and_chat_template(backend: str) -> None:
    from tokenizers import Tokenizer

    from vinakit.model import tiny_model_dir

    _, tokenizer = _load(backend)
    saved = Tokenizer.from_file(str(tiny_model_dir() / "tokenizer.json"))
    ids = tokenizer(SENTENCE_NFC, add_special_tokens=False)["input_ids"]
    assert ids == saved.encode(SENTENCE_NFC).ids
    assert tokenizer(SENTENCE_NFD, add_special_tokens=False)["input_ids"] == ids  # NFC normaliser
    assert tokenizer.decode(ids) == SENTENCE_NFC
    assert len(ids) < len(SENTENCE_NFC.encode("utf-8")) / 2  # trained merges, not raw bytes

    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Xin chào"}, {"role": "assistant", "content": "Chào bạn!"}], tokenize=False)
    assert rendered == "<|im_start|>user\nXin chào<|im_end|>\n<|im_start|>assistant\nChào bạn!<|im_end|>\n"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hà Nội ở đâu?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    for special in (TURN_START_TOKEN, END_OF_TURN_TOKEN, EOS_TOKEN, PAD_TOKEN):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1


def test_lora_trains_only_the_adapter(backend: str) -> None:
    from vinakit.model import add_lora, trainable_parameter_summary

    model, tokenizer = _load(backend)
    model = add_lora(model, backend=backend, rank=8, target_modules="all-linear")
    config = model.peft_config["default"]
    assert config.r == 8 and sorted(config.target_modules) == ALL_LINEAR_NAMES
    trainable = _trainable_names(model)
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    # 4 layers x 7 projections x (A, B)
    assert len(trainable) == 4 * 7 * 2
    summary = trainable_parameter_summary(model)
    assert 0 < summary["trainable"] < summary["total"] and summary["share"] == pytest.approx(
        summary["trainable"] / summary["total"])
    json.dumps(summary)

    loss = _loss_and_backward(model, tokenizer)
    assert loss.isfinite()
    lora_b_grads = {name: param.grad for name, param in model.named_parameters() if "lora_B" in name}
    assert all(grad is not None and grad.abs().sum() > 0 for grad in lora_b_grads.values())


def test_rslora_and_dora_reach_the_peft_config(backend: str) -> None:
    from vinakit.model import add_lora

    model, tokenizer = _load(backend)
    model = add_lora(model, backend=backend, rank=4, lora_alpha=8, use_rslora=True, use_dora=True,
                     target_modules="q_proj, v_proj")
    config = model.peft_config["default"]
    assert config.use_rslora is True and config.use_dora is True
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert any("lora_magnitude_vector" in name for name in _trainable_names(model))
    assert _loss_and_backward(model, tokenizer).isfinite()


def test_4bit_loads_bitsandbytes_linear4bit_on_cpu(backend: str) -> None:
    import bitsandbytes as bnb

    from vinakit.model import add_lora, trainable_parameter_summary

    full_size = trainable_parameter_summary(_load(backend)[0])["total"]
    model, tokenizer = _load(backend, load_in_4bit=True)
    projections = [module for name, module in model.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert len(projections) == 8 and all(isinstance(module, bnb.nn.Linear4bit) for module in projections)
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    assert trainable_parameter_summary(model)["total"] == full_size  # packed 4-bit weights count unpacked

    model = add_lora(model, backend=backend, rank=8)
    assert sorted(model.peft_config["default"].target_modules) == ALL_LINEAR_NAMES
    assert _loss_and_backward(model, tokenizer).isfinite()


def test_full_finetuning_trains_every_weight(backend: str) -> None:
    from vinakit.model import prepare_for_training, trainable_parameter_summary

    params = SimpleNamespace(backend=backend, full_finetuning=True, rank=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules="all-linear", use_rslora=False, use_dora=False, seed=0)
    model, tokenizer = _load(backend, full_finetuning=True)
    model = prepare_for_training(model, params)
    assert not hasattr(model, "peft_config")
    summary = trainable_parameter_summary(model)
    assert summary["trainable"] == summary["total"] and summary["share"] == 1.0
    assert _loss_and_backward(model, tokenizer).isfinite()
    assert all(param.grad is not None for param in model.parameters())

    with pytest.raises(ParamsError, match="load_in_4bit"):
        _load(backend, full_finetuning=True, load_in_4bit=True)


def test_prepare_for_training_adds_lora_when_not_full(backend: str) -> None:
    from vinakit.model import prepare_for_training

    params = SimpleNamespace(backend=backend, full_finetuning=False, rank=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules="all-linear", use_rslora=True, use_dora=False, seed=0)
    model = prepare_for_training(_load(backend)[0], params, modules_to_save=["lm_head"])
    config = model.peft_config["default"]
    assert config.r == 8 and config.use_rslora is True and "lm_head" in config.modules_to_save
    assert any("lm_head" in name and "lora" not in name for name in _trainable_names(model))


def test_saved_adapter_reloads_with_the_same_logits(backend: str, tmp_path: Path) -> None:
    import torch

    from vinakit.model import add_lora, load_for_inference, prepare_for_inference

    model, tokenizer = _load(backend)
    model = add_lora(model, backend=backend, rank=8)
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0); give it weights that change the logits
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.train()  # as a model is right after training
    model = prepare_for_inference(model, backend=backend)
    assert not model.training and not any(module.training for module in model.modules())
    batch = tokenizer([SENTENCE_NFC], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))

    reloaded, reloaded_tokenizer = load_for_inference(adapter_dir, backend=backend, max_seq_length=128)
    assert not reloaded.training
    assert reloaded_tokenizer(SENTENCE_NFC)["input_ids"] == tokenizer(SENTENCE_NFC)["input_ids"]
    with torch.no_grad():
        actual = reloaded(**batch).logits
    base, _ = load_for_inference("tiny-vi", backend=backend, max_seq_length=128)
    with torch.no_grad():
        base_logits = base(**batch).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters ...
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)  # ... and comes back intact


def test_missing_hub_model_is_wrapped_with_a_clear_message(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from vinakit.model import load_model

    # Offline mode fails at once instead of retrying a network that is not there.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VinakitError, match="vinakit-test/mo-hinh-khong-ton-tai") as caught:
        load_model("vinakit-test/mo-hinh-khong-ton-tai", backend=backend)
    assert "Hugging Face Hub" in str(caught.value) and caught.value.__cause__ is not None


# ----------------------------------------------------------------------------------------------------------------
# Names, options and summaries (backend-independent)
# ----------------------------------------------------------------------------------------------------------------


def test_missing_local_folder_and_bad_options_raise_actionable_errors(tmp_path: Path) -> None:
    from vinakit.model import load_model, pick_dtype

    with pytest.raises(VinakitError, match="does not exist"):
        load_model(str(tmp_path / "không-có"), backend="hf")
    with pytest.raises(ParamsError, match="backend"):
        load_model("tiny-vi", backend="vllm")
    with pytest.raises(ParamsError, match="dtype"):
        pick_dtype("float8")


def test_target_modules_expand_and_reject_typos() -> None:
    from vinakit.model import add_lora, lora_target_modules
    from vinakit.tiny import load_tiny

    model, _ = load_tiny()
    assert lora_target_modules(model, "all-linear") == ALL_LINEAR_NAMES  # never lm_head by default
    assert lora_target_modules(model, "all-linear,lm_head") == sorted([*ALL_LINEAR_NAMES, "lm_head"])
    assert lora_target_modules(model, ["q_proj", "k_proj"]) == ["k_proj", "q_proj"]
    with pytest.raises(ParamsError, match="q_prj"):
        lora_target_modules(model, "q_prj")
    with pytest.raises(ParamsError, match="rank"):
        add_lora(model, backend="hf", rank=0)


def test_dtype_and_device_summary_on_this_machine() -> None:
    import torch

    from vinakit.device import device_summary
    from vinakit.model import pick_dtype

    assert pick_dtype("bf16") is torch.bfloat16 and pick_dtype(torch.float16) is torch.float16
    summary = device_summary()
    json.dumps(summary)
    assert summary["torch_version"] == torch.__version__ and summary["memory_gib"] > 0
    if not torch.cuda.is_available():
        assert pick_dtype() is torch.float32
        assert summary["device_type"] == "cpu" and summary["dtype"] == "float32"
        assert summary["native_bf16"] is False and summary["device_count"] == 0
    else:
        assert summary["device_type"] == "cuda" and summary["capability"]


def test_a_cpt_run_folder_as_model_name_stands_for_its_model(tmp_path: Path) -> None:
    from vinakit.model import resolve_model_name

    run = tmp_path / "outputs" / "cpt-hòa-bình"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}", encoding="utf-8")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert resolve_model_name(str(run)) == str(run / "model")
    assert resolve_model_name(str(run / "model")) == str(run / "model")
    assert resolve_model_name(str(run / "adapter")) == str(run / "adapter")  # an adapter folder stays itself
    (tmp_path / "plain").mkdir()
    assert resolve_model_name(str(tmp_path / "plain")) == str(tmp_path / "plain")  # the loader says what is missing


def test_importing_the_module_stays_cheap() -> None:
    import subprocess
    import sys

    code = ("import sys, vinakit.model, vinakit.tiny; "
            "print(sorted(m for m in ('torch', 'transformers', 'unsloth', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "PYTHONPATH": "."})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_display_names_are_short_and_never_machine_paths(tmp_path: Path) -> None:
    from vinakit.model import display_name
    from vinakit.tiny import tiny_model_dir

    assert display_name("unsloth/Llama-3.2-1B-Instruct") == "Llama-3.2-1B-Instruct"
    assert display_name(str(tmp_path / "outputs" / "cpt-20261129-1655" / "model")) == "cpt-20261129-1655/model"
    assert display_name(str(tiny_model_dir())) == "tiny-vi" and display_name("tiny-vi") == "tiny-vi"
    assert display_name("/data/models/vistral-7b/") == "vistral-7b"
