"""Export: a QLoRA adapter becomes a merged 16/32-bit model that behaves like the adapter; the naive merge into 4-bit
is measurably worse; an adapter trained from a pre-quantized model is merged onto its 16-bit original; at most two
models are alive at once; the exported folder tokenises exactly like training; nothing is published without the
adapter and a passed fidelity check; a failed upload keeps every file; the token never reaches a file; the fidelity
figures of a fixed recipe match tests/golden/export.json."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest

from vinakit import export, fidelity, merge, publish, runs
from vinakit.errors import ParamsError, VinakitError
from vinakit.hub import HubAuthError, HubNetworkError, HubRejectedError, LocalHub
from vinakit.params import ExportParams, SFTParams
from vinakit.record import Run, start_run

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"
SENTINEL = "hf_SENTINEL0123456789abcdefXYZ"
REPO_ID = "vina-user/tiny-vi-chat"

# The same conversation in NFC and NFD, with both tone-mark placements (hòa/hoà, thủy/thuỷ).
CONVERSATION = [
    {"role": "system", "content": "Bạn là trợ lý tiếng Việt."},
    {"role": "user", "content": "Hòa bình và thủy lợi quan trọng thế nào?"},
    {"role": "assistant", "content": "Hoà bình giúp phát triển; thuỷ lợi giúp nông nghiệp."},
]
VARIANTS = [CONVERSATION, [{**m, "content": unicodedata.normalize("NFD", m["content"])} for m in CONVERSATION]]


def _train_briefly(model, rows, steps: int = 20, batch: int = 2, lr: float = 1e-2) -> None:
    """A few optimizer steps so the adapter's B matrices are far from their zero init (a plain loop: fast on CPU)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = 0.0
        for i in range(batch):
            row = rows[(step * batch + i) % len(rows)]
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            loss = loss + out.loss / batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _qlora_run(model_name: str, output_dir: Path, run_name: str) -> Path:
    """A short QLoRA SFT run (4-bit base, hf backend), saved the way the SFT notebook saves."""
    from vinakit import sft
    from vinakit.train import save_trained

    params = SFTParams(model_name=model_name, backend="hf", load_in_4bit=True, max_seq_length=256, rank=8,
                       lora_alpha=16, use_rslora=False, dataset="vinakit:chat", val_size=0.1, seed=0,
                       output_dir=str(output_dir), run_name=run_name)
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    tokenized = sft.tokenize(params, tokenizer, data, run)
    _train_briefly(model, tokenized.train)
    save_trained(model, tokenizer, run, params)
    run.finish()
    return run.path


def _export_steps(adapter: Path, output_dir: Path, **overrides: str) -> SimpleNamespace:
    """The export notebook's steps, in process, with params/cpu_tiny.yaml and no llama.cpp."""
    params = ExportParams.from_sources([CPU_TINY], [("adapter", str(adapter)), ("run_name", "export"),
                                                    ("output_dir", str(output_dir)), *overrides.items()])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(publish.LLAMA_CPP_ENV_VAR, str(output_dir / "no-llama-cpp"))
        run = start_run(params)
        source = export.load_source(params, run)
        heldout = export.load_heldout(source, params, run)
        kept = export.keep_adapter(source, heldout, params, run)
        merged = export.merge_to_16bit(kept, params, run)
        report = export.check_fidelity(kept, merged, heldout, params, run)
        gguf = export.save_gguf(merged, params, run)
        cards = export.write_cards(kept, merged, gguf, report, params, run)
    return SimpleNamespace(params=params, run=run, source=source, heldout=heldout, kept=kept, merged=merged,
                           fidelity=report, gguf=gguf, cards=cards)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short QLoRA SFT run on the tiny model."""
    return _qlora_run("tiny-vi", tmp_path_factory.mktemp("train"), "qlora")


@pytest.fixture(scope="module")
def exported(qlora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The QLoRA run exported."""
    return _export_steps(qlora_run, tmp_path_factory.mktemp("export"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(exported: SimpleNamespace, tmp_path: Path) -> Path:
    """A copy of the export run folder (the module fixture stays pristine); fidelity.json paths still match."""
    copy = tmp_path / "export-copy"
    shutil.copytree(exported.run.path, copy)
    return copy


# --------------------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------------------


def test_qlora_adapter_merges_onto_16bit_faithfully_and_naive_4bit_merge_is_worse(exported: SimpleNamespace):
    metrics = json.loads((exported.run.path / "metrics.json").read_text(encoding="utf-8"))
    assert exported.source.trained_in_4bit, "the fixture must be a QLoRA adapter"
    assert metrics["fidelity_passed"] is True
    # float32 merge onto the 16-bit (here float32) weights: rounding only, far inside cpu_tiny's thresholds
    assert metrics["merge_max_abs_logit_diff"] < metrics["fidelity_max_logit_diff_threshold"] / 100
    assert metrics["merge_mean_kl"] < metrics["fidelity_max_kl_threshold"] / 100
    assert math.isclose(metrics["merge_perplexity"], metrics["adapter_perplexity"], rel_tol=1e-4)
    # the naive merge into 4-bit weights: measurably worse than the exported merge, measured in the same run
    # (no fixed threshold: its size depends on the trained deltas and the 4-bit grid of this tiny model)
    assert metrics["naive_4bit_max_abs_logit_diff"] > 100 * metrics["merge_max_abs_logit_diff"]
    assert metrics["naive_4bit_mean_kl"] > 100 * max(metrics["merge_mean_kl"], 1e-12)
    table = exported.fidelity.table
    assert list(table["role"]) == ["reference", "checked: exported", "for comparison", "for comparison"]
    assert (exported.run.path / "fidelity.csv").read_text(encoding="utf-8-sig").startswith("model,")


def test_fidelity_failure_stops_the_export_and_blocks_publishing(exported: SimpleNamespace, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    copy = _copy_run(exported, tmp_path)
    strict = dataclasses.replace(exported.params, max_logit_diff=1e-12, compare_naive_4bit=False)
    with pytest.raises(fidelity.FidelityError, match="nothing will be published") as caught:
        export.check_fidelity(exported.kept, exported.merged, exported.heldout, strict, Run(copy, "export"))
    assert "max_logit_diff" in str(caught.value)
    assert json.loads((copy / fidelity.FIDELITY_FILE).read_text(encoding="utf-8"))["passed"] is False
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub = LocalHub(tmp_path / "hub")
    with pytest.raises(publish.PublishBlockedError, match="fidelity check failed"):
        publish.publish_run(copy, REPO_ID, hub=hub)
    assert hub.calls() == []


def test_publishing_needs_the_adapter_and_unchanged_checked_weights(exported: SimpleNamespace, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub = LocalHub(tmp_path / "hub")
    copy = _copy_run(exported, tmp_path)
    weights = copy / merge.MERGED_DIR / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(publish.PublishBlockedError, match="changed after the fidelity check"):
        publish.publish_run(copy, REPO_ID, hub=hub)
    weights.write_bytes(original)
    shutil.rmtree(copy / runs.ADAPTER_DIR)
    with pytest.raises(publish.PublishBlockedError, match="adapter is not saved"):
        publish.publish_run(copy, REPO_ID, hub=hub)
    assert hub.calls() == []


def test_merge_refuses_an_adapter_that_was_not_kept(exported: SimpleNamespace, tmp_path: Path):
    missing = export.KeptAdapter(tmp_path / "nowhere", exported.source)
    with pytest.raises(VinakitError, match="kept before merging"):
        export.merge_to_16bit(missing, exported.params, Run(tmp_path, "export"))


# --------------------------------------------------------------------------------------------------------------
# The exported folders
# --------------------------------------------------------------------------------------------------------------


def test_adapter_is_kept_unchanged_with_tokenizer_and_training_info(exported: SimpleNamespace, qlora_run: Path):
    kept = exported.run.path / runs.ADAPTER_DIR
    assert runs.folder_fingerprint(kept) == runs.folder_fingerprint(qlora_run / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 runs.TRAINING_INFO_FILE, "README.md"):
        assert (kept / name).is_file(), name
    manifest = json.loads((exported.run.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["adapter"]["weights_sha256"] == manifest["source"]["weights_sha256"]


def test_exported_folder_tokenises_exactly_like_training(exported: SimpleNamespace, qlora_run: Path):
    from transformers import AutoTokenizer, GenerationConfig

    from vinakit.chat import render_prompt, tokenize_conversation

    trained = AutoTokenizer.from_pretrained(qlora_run / "adapter")
    reloaded = AutoTokenizer.from_pretrained(exported.merged.path)
    info = json.loads((exported.merged.path / runs.TRAINING_INFO_FILE).read_text(encoding="utf-8"))
    assert reloaded.chat_template == trained.chat_template == info["chat_template"]
    for conversation in VARIANTS:
        assert tokenize_conversation(reloaded, conversation) == tokenize_conversation(trained, conversation)
        assert render_prompt(reloaded, conversation[:2]) == render_prompt(trained, conversation[:2])
    nfc, nfd = (tokenize_conversation(reloaded, v)["input_ids"] for v in VARIANTS)
    assert nfc == nfd  # the tokenizer's NFC normaliser travelled with the export
    stops = GenerationConfig.from_pretrained(exported.merged.path).eos_token_id
    assert reloaded.convert_tokens_to_ids("<|im_end|>") in stops
    assert exported.fidelity.checks == {"chat_template_identical": True, "tokenized_example_identical": True,
                                        "generation_config_stops_at_end_of_turn": True}


def test_merged_model_loads_with_plain_transformers_in_its_base_dtype(exported: SimpleNamespace):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported.merged.path, dtype="auto")
    assert str(model.dtype) == "torch.float32" == f"torch.{exported.merged.dtype}"  # tiny-vi is float32
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert "Linear4bit" not in {type(m).__name__ for m in model.modules()}


def test_gguf_without_llama_cpp_says_so_and_points_to_the_merged_folder(exported: SimpleNamespace, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    assert exported.gguf.status == "unavailable"
    message = exported.gguf.message
    assert "llama.cpp was not found" in message and str(exported.merged.path) in message
    assert publish.LLAMA_CPP_BUILD in message and publish.LLAMA_CPP_ENV_VAR in message  # how to build it, one cell
    assert not (exported.run.path / publish.GGUF_DIR).exists()
    # detection only (no conversion): a folder with both tools counts, one with the converter alone does not
    monkeypatch.setenv(publish.LLAMA_CPP_ENV_VAR, str(tmp_path))
    (tmp_path / "convert_hf_to_gguf.py").write_text("# converter\n", encoding="utf-8")
    assert publish.find_llama_cpp() is None
    quantizer = tmp_path / "llama-quantize"
    quantizer.write_text("#!/bin/sh\necho usage\n", encoding="utf-8")
    quantizer.chmod(0o755)
    assert publish.find_llama_cpp() == (quantizer, tmp_path / "convert_hf_to_gguf.py")


def _fake_llama_cpp(folder: Path) -> Path:
    """A llama.cpp checkout built with CMake (quantizer in build/bin/) whose tools only write what they were asked."""
    (folder / "build" / "bin").mkdir(parents=True)
    (folder / "convert_hf_to_gguf.py").write_text(
        "import sys\nargs = sys.argv\nassert (__import__('pathlib').Path(args[1]) / 'config.json').is_file()\n"
        "open(args[args.index('--outfile') + 1], 'w').write('GGUF ' + args[args.index('--outtype') + 1])\n",
        encoding="utf-8")
    quantizer = folder / "build" / "bin" / "llama-quantize"
    quantizer.write_text('#!/bin/sh\ntest -f "$1" && echo "GGUF $3" > "$2"\n', encoding="utf-8")
    quantizer.chmod(0o755)
    return quantizer


def test_gguf_with_a_cmake_build_of_llama_cpp(exported: SimpleNamespace, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    quantizer = _fake_llama_cpp(tmp_path / "llama.cpp")
    monkeypatch.setenv(publish.LLAMA_CPP_ENV_VAR, str(tmp_path / "llama.cpp"))
    assert publish.find_llama_cpp() == (quantizer, tmp_path / "llama.cpp" / "convert_hf_to_gguf.py")
    params = dataclasses.replace(exported.params, gguf_quantizations=["q4_k_m", "q8_0"], repo_id=REPO_ID)
    copy = _copy_run(exported, tmp_path)
    result = export.save_gguf(exported.merged, params, Run(copy, "export"))
    assert result.status == "written", result.message
    assert result.files == ["tiny-vi-chat.Q4_K_M.gguf", "tiny-vi-chat.Q8_0.gguf"]  # the F16 source is not kept
    assert (copy / publish.GGUF_DIR / "tiny-vi-chat.Q8_0.gguf").read_text(encoding="utf-8").strip() == "GGUF Q8_0"
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["gguf"]["files"] == result.files


def test_model_cards_are_bilingual_and_complete(exported: SimpleNamespace, tmp_path: Path):
    merged_card = exported.cards.text("merged_16bit")
    for expected in ("## Tiếng Việt", "## English", "Cách dùng", "How to use", "`tiny-vi`", "vinakit:chat",
                     "QLoRA", "r=8", "AutoModelForCausalLM", "Giới thiệu ngắn gọn về Hà Nội.", "Merge fidelity",
                     "Độ trung thực", "rank: 8", "fidelity_max_tokens: 128", "language:\n- vi"):
        assert expected in merged_card, expected
    assert f"{exported.fidelity.metrics['merge_max_abs_logit_diff']:.4g}" in merged_card
    assert "No evaluation results yet" in merged_card
    adapter_card = exported.cards.text("lora")
    assert "library_name: peft" in adapter_card and "AutoPeftModelForCausalLM" in adapter_card
    # with an eval run, its results go into the card
    eval_run = tmp_path / "eval-mcq"
    eval_run.mkdir()
    (eval_run / "metrics.json").write_text(json.dumps({"format_valid_rate": 0.625, "tuned": {"distinct_2": 0.41},
                                                       "note": "chữ"}), encoding="utf-8")
    params = dataclasses.replace(exported.params, eval_run=str(eval_run), push_to_hub=True, repo_id=REPO_ID)
    cards = export.write_cards(exported.kept, exported.merged, exported.gguf, exported.fidelity, params,
                               Run(_copy_run(exported, tmp_path), "export"))
    text = cards.text("merged_16bit")
    assert "| format_valid_rate | 0.625 |" in text and "| tuned.distinct_2 | 0.41 |" in text
    assert f'model_id = "{REPO_ID}"' in text and f"{REPO_ID}-lora" in text


# --------------------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------------------


def test_publish_uploads_private_repos_with_their_cards(exported: SimpleNamespace, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub = LocalHub(tmp_path / "hub")
    report = publish.publish_run(_copy_run(exported, tmp_path), REPO_ID, methods=["lora", "merged_16bit", "gguf"],
                                hub=hub)
    assert report.status == "uploaded"
    assert [(r.repo_id, r.private) for r in report.repos] == [(REPO_ID, True), (f"{REPO_ID}-lora", True)]
    creates = [c for c in hub.calls() if c["call"] == "create_repo"]
    assert all(c["private"] and c["token_given"] for c in creates)  # gguf skipped: no GGUF files were made
    merged_files = set(hub.repo_path(REPO_ID).iterdir())
    assert {p.name for p in merged_files} >= {"README.md", "model.safetensors", "config.json", "chat_template.jinja",
                                              "generation_config.json", "tokenizer.json", "vinakit_training.json"}
    assert "library_name: peft" in (hub.repo_path(f"{REPO_ID}-lora") / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("mode,error_type", [("network", HubNetworkError), ("rejected", HubRejectedError),
                                             ("auth", HubAuthError)])
def test_failed_upload_keeps_every_local_file_and_says_what_to_do(exported: SimpleNamespace, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, mode: str,
                                                                  error_type: type):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    copy = _copy_run(exported, tmp_path)
    before = _snapshot(copy)
    params = dataclasses.replace(exported.params, push_to_hub=True, repo_id=REPO_ID)
    with pytest.raises(error_type) as caught:
        export.publish(params, Run(copy, "export"), hub=LocalHub(tmp_path / "hub", fail=mode))
    message = str(caught.value)
    assert "No local file was changed" in message and "publish_run(" in message and SENTINEL not in message
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "upload_failed" and manifest["hub"]["status"] == "failed"
    after = _snapshot(copy)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def test_no_token_fails_clearly_and_uploads_nothing(exported: SimpleNamespace, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    copy = _copy_run(exported, tmp_path)
    hub = LocalHub(tmp_path / "hub")
    with pytest.raises(HubAuthError, match="no Hugging Face token was found") as caught:
        publish.publish_run(copy, REPO_ID, hub=hub)
    assert "HF_TOKEN" in str(caught.value) and "intact" in str(caught.value)
    assert hub.calls() == []


def test_sentinel_token_never_reaches_a_file(qlora_run: Path, tmp_path: Path):
    """The whole notebook, headless, pushing to the local stand-in with a sentinel HF_TOKEN."""
    hub_dir = tmp_path / "hub"
    env = {**os.environ, "HF_TOKEN": SENTINEL, "VINAKIT_HUB": f"local:{hub_dir}",
           publish.LLAMA_CPP_ENV_VAR: str(tmp_path / "no-llama-cpp")}
    result = subprocess.run(
        [sys.executable, "-m", "vinakit.cli", "run", "export", "-f", str(CPU_TINY), "-p", "adapter", str(qlora_run),
         "-p", "output_dir", str(tmp_path / "runs"), "-p", "run_name", "push", "-p", "push_to_hub", "true",
         "-p", "repo_id", REPO_ID, "--no-progress"], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert SENTINEL not in result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "push"
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "completed" and manifest["hub"]["status"] == "uploaded"
    assert LocalHub(hub_dir).calls()[0]["token_given"] is True  # the token was used ...
    written = [p for root in (run_dir, hub_dir) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "export.ipynb" for p in written) and any(p.name == "README.md" for p in written)
    leaks = [str(p) for p in written if SENTINEL.encode() in p.read_bytes()]
    assert leaks == []  # ... and never written: notebook, params, manifest, metrics, cards, uploaded files


# --------------------------------------------------------------------------------------------------------------
# Sources and parameters
# --------------------------------------------------------------------------------------------------------------


def test_find_source_resolves_the_run_and_the_16bit_base(qlora_run: Path, tiny_dir: Path):
    """The folder rules themselves are tested in test_runs.py; here: what the export step makes of them."""
    by_run, by_adapter = export.find_source(str(qlora_run)), export.find_source(str(qlora_run / "adapter"))
    assert by_run == by_adapter and by_run.kind == "lora" and by_run.run_dir == qlora_run.resolve()
    assert by_run.training_params["dataset"] == "vinakit:chat" and by_run.trained_in_4bit
    assert by_run.base_model == str(tiny_dir)
    full = export.find_source(str(tiny_dir))
    assert full.kind == "full" and full.run_dir is None and full.base_model == str(tiny_dir.resolve())


def test_full_model_export_needs_no_merge_and_is_exact(tiny_dir: Path, tmp_path: Path):
    params = ExportParams.from_sources([CPU_TINY], [("adapter", str(tiny_dir)), ("output_dir", str(tmp_path)),
                                                    ("fidelity_dataset", "vinakit:chat"), ("fidelity_rows", "4")])
    run = start_run(params)
    source = export.load_source(params, run)
    heldout = export.load_heldout(source, params, run)
    kept = export.keep_adapter(source, heldout, params, run)
    assert kept.path == tiny_dir.resolve() and not (run.path / runs.ADAPTER_DIR).exists()
    merged = export.merge_to_16bit(kept, params, run)
    report = export.check_fidelity(kept, merged, heldout, params, run)
    assert report.metrics["merge_max_abs_logit_diff"] == 0.0
    # 4-bit quantisation alone moves the logits; the exported (re-saved) model does not move them at all
    assert report.metrics["naive_4bit_max_abs_logit_diff"] > 0 and report.metrics["naive_4bit_mean_kl"] > 0


@pytest.mark.parametrize("values,message", [
    ({"push_to_hub": True}, "repo_id is empty"),
    ({"repo_id": "chỉ-một-tên"}, "owner/name"),
    ({"save_methods": ["merged16"]}, "Did you mean 'merged_16bit'"),
    ({"save_methods": []}, "not be empty"),
    ({"gguf_quantizations": ["Q4_K_M"]}, "Did you mean 'q4_k_m'"),
    ({"merge_with": ["a"], "merge_weights": [1.0]}, "one weight for adapter"),
    ({"merge_weights": [1.0]}, "merge_with is empty"),
    ({"merge_density": 0.0}, "merge_density"),
    ({"max_kl": 0.0}, "thresholds"),
    ({"hf_token": "x"}, "Unknown parameter 'hf_token'"),
])
def test_export_params_are_checked(values: dict, message: str):
    with pytest.raises(ParamsError, match=message):
        ExportParams.validate(values)


def test_repo_names_follow_hub_conventions():
    assert publish.repo_names(REPO_ID, ["merged_16bit", "lora", "gguf"]) == {
        "merged_16bit": REPO_ID, "lora": f"{REPO_ID}-lora", "gguf": f"{REPO_ID}-GGUF"}
    assert publish.repo_names(REPO_ID, ["lora"]) == {"lora": REPO_ID}


# --------------------------------------------------------------------------------------------------------------
# Merging several adapters
# --------------------------------------------------------------------------------------------------------------


def _random_adapter(tiny_dir: Path, folder: Path, *, seed: int, rank: int, use_rslora: bool = False,
                    modules_to_save: list[str] | None = None) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved with the tokenizer like a trained one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, use_rslora=use_rslora, modules_to_save=modules_to_save,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # keep deltas small, as trained ones are
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    return folder


def _deltas(tiny_dir: Path, adapter: Path) -> dict[str, object]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                      str(adapter))
    return {name: module.get_delta_weight("default") for name, module in model.named_modules()
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})}


def test_linear_merge_is_the_exact_weighted_sum_of_deltas(tiny_dir: Path, tmp_path: Path):
    import torch

    first = _random_adapter(tiny_dir, tmp_path / "chat", seed=1, rank=4, use_rslora=True)
    second = _random_adapter(tiny_dir, tmp_path / "instruct", seed=2, rank=8)
    hook_calls = []

    def evaluate(model, tokenizer):
        hook_calls.append(model.active_adapter)
        return {"vocab": float(len(tokenizer))}

    result = merge.merge_adapters([first, second], tmp_path / "merged", weights=[0.7, 0.3], evaluate=evaluate)
    assert hook_calls == ["adapter_0", "adapter_1", "merged"]
    assert list(result.table.index) == ["chat", "instruct", "merged (linear)"]
    config = json.loads((result.path / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 12 and config["use_rslora"] is False
    info = json.loads((result.path / runs.TRAINING_INFO_FILE).read_text(encoding="utf-8"))
    assert info["merge_weights"] == [0.7, 0.3] and len(info["merged_from"]) == 2
    d1, d2, merged = _deltas(tiny_dir, first), _deltas(tiny_dir, second), _deltas(tiny_dir, result.path)
    assert set(merged) == set(d1)
    for name in merged:
        torch.testing.assert_close(merged[name], 0.7 * d1[name] + 0.3 * d2[name], atol=1e-6, rtol=1e-5)


def test_ties_merge_of_an_adapter_with_itself_gives_it_back(tiny_dir: Path, tmp_path: Path):
    import torch

    adapter = _random_adapter(tiny_dir, tmp_path / "chat", seed=3, rank=4)
    copy = shutil.copytree(adapter, tmp_path / "chat-copy")
    result = merge.merge_adapters([adapter, copy], tmp_path / "ties", weights=[1.0, 1.0], method="ties",
                                   density=1.0)
    original, merged = _deltas(tiny_dir, adapter), _deltas(tiny_dir, result.path)
    for name in merged:
        torch.testing.assert_close(merged[name], original[name], atol=1e-5, rtol=1e-4)


def test_merge_adapters_refuses_what_cannot_be_merged(tiny_dir: Path, tmp_path: Path):
    good = _random_adapter(tiny_dir, tmp_path / "good", seed=4, rank=4)
    other_base = shutil.copytree(tiny_dir, tmp_path / "other-base")
    foreign = _random_adapter(other_base, tmp_path / "foreign", seed=5, rank=4)
    with pytest.raises(ParamsError, match="share a base model"):
        merge.merge_adapters([good, foreign], tmp_path / "out1")
    full = _random_adapter(tiny_dir, tmp_path / "full", seed=6, rank=4, modules_to_save=["lm_head"])
    with pytest.raises(ParamsError, match="trains whole modules"):
        merge.merge_adapters([good, full], tmp_path / "out2")
    with pytest.raises(ParamsError, match="at least two"):
        merge.merge_adapters([good], tmp_path / "out3")


def test_notebook_steps_merge_adapters_given_in_merge_with(tiny_dir: Path, tmp_path: Path):
    first = _random_adapter(tiny_dir, tmp_path / "chat", seed=7, rank=4)
    second = _random_adapter(tiny_dir, tmp_path / "multi-turn", seed=8, rank=4)
    params = ExportParams.from_sources([CPU_TINY], [
        ("adapter", str(first)), ("merge_with", f"[{second}]"), ("merge_weights", "[0.5, 0.5]"),
        ("fidelity_dataset", "vinakit:chat"), ("fidelity_rows", "3"), ("output_dir", str(tmp_path / "runs"))])
    run = start_run(params)
    source = export.load_source(params, run)
    kept = export.keep_adapter(source, export.load_heldout(source, params, run), params, run)
    table = kept.comparison_table()
    assert list(table.index) == ["chat", "multi-turn", "merged (linear)"]
    assert (table["perplexity"] > 1).all()
    assert (run.path / runs.ADAPTER_DIR / "adapter_config.json").is_file()


def test_cast_saved_weights_changes_the_dtype_shard_by_shard(tiny_dir: Path, tmp_path: Path):
    """The Unsloth merge path writes its own dtype; merged_dtype is honoured by casting the saved shards."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).save_pretrained(folder, max_shard_size="500KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    original = {name: value for shard in shards for name, value in load_file(shard).items()}
    assert merge.cast_saved_weights(folder, "float32") is False  # already float32: nothing rewritten
    assert merge.cast_saved_weights(folder, "bfloat16") is True
    cast = {name: value for shard in shards for name, value in load_file(shard).items()}
    assert set(cast) == set(original)
    for name, value in cast.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, original[name].to(torch.bfloat16)), name
    index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in cast.values())
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------------------
# A base trained from a pre-quantized model, and memory
# --------------------------------------------------------------------------------------------------------------


def _prequantized_copy(tiny_dir: Path) -> Path:
    """``<tiny_dir>-bnb-4bit``: tiny-vi saved pre-quantized (NF4), like the Hub's ``-bnb-4bit`` uploads; built once
    next to tiny-vi in the cache (atomically: a concurrent build of the same folder is kept)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tiny_dir.with_name(f"{tiny_dir.name}-bnb-4bit")
    if (folder / "config.json").is_file():
        return folder
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, quantization_config=nf4).save_pretrained(temp)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(temp)
    try:
        temp.rename(folder)
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def test_adapter_of_a_prequantized_base_merges_onto_the_16bit_original(tiny_dir: Path, tmp_path: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prequantized = _prequantized_copy(tiny_dir)
    assert "quantization_config" in json.loads((prequantized / "config.json").read_text(encoding="utf-8"))
    trained = _qlora_run(str(prequantized), tmp_path / "train", "from-bnb-4bit")
    adapter_config = json.loads((trained / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["base_model_name_or_path"] == str(prequantized)  # what PEFT recorded
    result = _export_steps(trained, tmp_path / "export")
    assert result.source.base_model == str(tiny_dir)  # the 16-bit original, not the 4-bit copy
    metrics = result.fidelity.metrics
    assert result.fidelity.passed
    assert metrics["merge_max_abs_logit_diff"] < metrics["naive_4bit_max_abs_logit_diff"] / 100
    merged_config = json.loads((result.merged.path / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "float32"
    # the merged weights are tiny-vi's float32 weights plus the LoRA deltas, to float32 rounding
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                         str(trained / "adapter")).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(result.merged.path, dtype="auto").state_dict()
    assert set(merged) == set(expected)
    for name, value in merged.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Weak references to every model the kit loads; loading fails while two earlier models are still alive."""
    import weakref

    from vinakit import model as model_lib

    original, loaded = model_lib.load_model, []

    def load_model(*args, **kwargs):
        alive = sum(ref() is not None for ref in loaded)
        assert alive <= 1, f"{alive} models loaded earlier are still alive while another one loads (at most 2)"
        model, tokenizer = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(model_lib, "load_model", load_model)
    return loaded


def test_at_most_two_models_are_alive_in_the_fidelity_check_and_merge_adapters(
        exported: SimpleNamespace, tiny_dir: Path, tmp_path: Path, model_loads: list):
    params = dataclasses.replace(exported.params, compare_naive_4bit=True)
    export.check_fidelity(exported.kept, exported.merged, exported.heldout, params,
                          Run(_copy_run(exported, tmp_path), "export"))
    assert len(model_loads) == 3  # reference, merged, 4-bit (merged naively in place)
    first = _random_adapter(tiny_dir, tmp_path / "chat", seed=9, rank=4)
    second = _random_adapter(tiny_dir, tmp_path / "instruct", seed=10, rank=4)
    merge.merge_adapters([first, second], tmp_path / "merged", evaluate=fidelity.perplexity_hook(
        exported.heldout.examples))
    assert len(model_loads) == 4  # one base for every adapter
    gc.collect()
    assert [ref() for ref in model_loads] == [None] * 4  # nothing outlives the step that loaded it


# --------------------------------------------------------------------------------------------------------------
# Golden fidelity figures
# --------------------------------------------------------------------------------------------------------------

GOLDEN_FILE = REPO / "tests" / "golden" / "export.json"
UPDATE_ENV_VAR = "VINAKIT_UPDATE_GOLDEN"
REFRESH = f"{UPDATE_ENV_VAR}=1 .venv/bin/python -m pytest tests/test_export.py -k golden"
# How each figure is compared: a relative tolerance, or None for its order of magnitude only (the merge's max
# |logit diff| is float32 rounding noise: its exact value may move with summation order, its size may not).
GOLDEN_TOLERANCES = {
    "adapter_perplexity": 1e-4, "merge_perplexity": 1e-4, "merge_max_abs_logit_diff": None,
    "qlora_4bit_perplexity": 1e-4, "naive_4bit_perplexity": 1e-4, "naive_4bit_max_abs_logit_diff": 1e-3,
    "naive_4bit_mean_kl": 1e-3,
}
GOLDEN_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "unsloth")


def _golden_figures(backend: str, tmp_path: Path) -> dict[str, float]:
    """QLoRA SFT through the notebook's steps (8 steps, fixed seed), then the export steps; the fidelity figures."""
    from vinakit import sft

    params = SFTParams.validate(dict(
        model_name="tiny-vi", backend=backend, load_in_4bit=True, max_seq_length=256, rank=8, lora_alpha=16,
        use_rslora=False, learning_rate=3e-3, max_steps=8, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=4, eval_steps=1000, save_steps=1000,
        val_size=8, output_dir=str(tmp_path), run_name="golden-sft", dataset="vinakit:chat", seed=3407))
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    sft.train(params, model, tokenizer, sft.tokenize(params, tokenizer, data, run), run)
    del model
    result = _export_steps(run.path, tmp_path / "export", backend=backend, compare_naive_4bit="true")
    return {name: result.fidelity.metrics[name] for name in GOLDEN_TOLERANCES}


def _matches(got: float, want: float, rtol: float | None) -> bool:
    if rtol is not None:
        return math.isclose(got, want, rel_tol=rtol)
    if got == 0 or want == 0:
        return got == want
    return abs(math.log10(got / want)) <= 1.0


def _golden_libraries() -> dict[str, str | None]:
    from vinakit.record import package_versions

    return {name: version for name, version in package_versions().items() if name in GOLDEN_LIBRARIES}


def test_fidelity_figures_match_the_golden_values(backend: str, tiny_dir: Path, tmp_path: Path):
    from vinakit.device import active_profile
    from vinakit.record import read_json, write_json

    key = f"{active_profile().name}-{backend}"
    figures = _golden_figures(backend, tmp_path)
    stored = read_json(GOLDEN_FILE)
    if os.environ.get(UPDATE_ENV_VAR) == "1":
        stored[key] = {"figures": figures, "tiny_model": tiny_dir.name, "libraries": _golden_libraries()}
        write_json(GOLDEN_FILE, dict(sorted(stored.items())))
        return
    golden = stored.get(key)
    if golden is None:
        message = f"no golden export figures for {key} in {GOLDEN_FILE}; record them on purpose with: {REFRESH}"
        if not key.startswith("cpu-"):
            pytest.skip(message)  # recorded on the CPU, where CI runs; a GPU gives other (valid) numbers
        pytest.fail(message)
    moved = {name: (figures[name], golden["figures"][name]) for name, rtol in GOLDEN_TOLERANCES.items()
             if not _matches(figures[name], golden["figures"][name], rtol)}
    assert not moved, (
        f"The export fidelity figures of the fixed tiny-vi QLoRA recipe ({key}) moved (name: (got, golden)): "
        f"{moved}. Tolerances: {GOLDEN_TOLERANCES} (None: same order of magnitude).\n"
        f"  recorded with {golden['tiny_model']} and {golden['libraries']};\n  now {tiny_dir.name} and "
        f"{_golden_libraries()}.\nIf the change is intended (a fix, a new recipe, new sample data, a library "
        f"upgrade), refresh the values on purpose and say why in the commit: {REFRESH}")


def test_fidelity_gguf_and_publish_results_show_tables_and_one_line_reprs(exported: SimpleNamespace):
    from vinakit.hub import PushedRepo

    page = exported.fidelity._repr_html_()
    assert "Fidelity check passed" in page and "max_abs_logit_diff" in page
    assert "chat_template_identical</th><td style=\"text-align:left\">True<" in page
    assert repr(exported.fidelity) == "FidelityReport(passed=True, problems=0)"
    assert "status</th><td style=\"text-align:left\">unavailable<" in exported.gguf._repr_html_()
    assert repr(exported.gguf) == "GGUFResult(status='unavailable', files=[])"
    repo = PushedRepo(REPO_ID, "https://hub/x", "https://hub/x/commit/1", True, "merged_16bit")
    report = publish.PublishReport("uploaded", "done", [repo])
    assert "Publish: uploaded" in report._repr_html_() and REPO_ID in report._repr_html_()
    assert repr(report) == f"PublishReport(status='uploaded', repos=[{REPO_ID!r}])"
