"""Export: a QLoRA adapter becomes a merged 16/32-bit model that behaves like the adapter; the naive merge into 4-bit
is measurably worse; the exported folder tokenises exactly like training; nothing is published without the adapter
and a passed fidelity check; a failed upload keeps every file; the token never reaches a file."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest

from vinakit import export
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


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short QLoRA SFT run on the tiny model (4-bit base, hf backend), saved the way the SFT notebook saves."""
    from vinakit import sft
    from vinakit.train import save_trained

    params = SFTParams(model_name="tiny-vi", backend="hf", load_in_4bit=True, max_seq_length=256, rank=8,
                       lora_alpha=16, use_rslora=False, dataset="vinakit:chat", val_size=0.1, seed=0,
                       output_dir=str(tmp_path_factory.mktemp("train")), run_name="qlora")
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    tokenized = sft.tokenize(params, tokenizer, data, run)
    _train_briefly(model, tokenized.train)
    save_trained(model, tokenizer, run, params)
    run.finish()
    return run.path


@pytest.fixture(scope="module")
def exported(qlora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The export notebook's steps, in process, with params/cpu_tiny.yaml and no llama.cpp."""
    params = ExportParams.from_sources([CPU_TINY], [("adapter", str(qlora_run)), ("run_name", "export"),
                                                    ("output_dir", str(tmp_path_factory.mktemp("export")))])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(export.LLAMA_CPP_ENV_VAR, str(tmp_path_factory.mktemp("no-llama-cpp")))
        run = start_run(params)
        source = export.load_source(params, run)
        heldout = export.load_heldout(source, params, run)
        kept = export.keep_adapter(source, heldout, params, run)
        merged = export.merge_to_16bit(kept, params, run)
        fidelity = export.check_fidelity(kept, merged, heldout, params, run)
        gguf = export.save_gguf(merged, params, run)
        cards = export.write_cards(kept, merged, gguf, fidelity, params, run)
    return SimpleNamespace(params=params, run=run, source=source, heldout=heldout, kept=kept, merged=merged,
                           fidelity=fidelity, gguf=gguf, cards=cards)


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
    assert metrics["merge_max_abs_logit_diff"] < 1e-2
    assert metrics["merge_mean_kl"] < 1e-6
    assert abs(metrics["merge_perplexity"] / metrics["adapter_perplexity"] - 1) < 1e-4
    # the naive merge into 4-bit weights: measurably worse on every figure
    assert metrics["naive_4bit_max_abs_logit_diff"] > 0.05
    assert metrics["naive_4bit_max_abs_logit_diff"] > 100 * metrics["merge_max_abs_logit_diff"]
    assert metrics["naive_4bit_mean_kl"] > 100 * max(metrics["merge_mean_kl"], 1e-9)
    table = exported.fidelity.table
    assert list(table["role"]) == ["reference", "checked: exported", "for comparison", "for comparison"]
    assert (exported.run.path / "fidelity.csv").read_text(encoding="utf-8-sig").startswith("model,")


def test_fidelity_failure_stops_the_export_and_blocks_publishing(exported: SimpleNamespace, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    copy = _copy_run(exported, tmp_path)
    strict = dataclasses.replace(exported.params, max_logit_diff=1e-12, compare_naive_4bit=False)
    with pytest.raises(export.FidelityError, match="nothing will be published") as caught:
        export.check_fidelity(exported.kept, exported.merged, exported.heldout, strict, Run(copy, "export"))
    assert "max_logit_diff" in str(caught.value)
    assert json.loads((copy / export.FIDELITY_FILE).read_text(encoding="utf-8"))["passed"] is False
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub = LocalHub(tmp_path / "hub")
    with pytest.raises(export.PublishBlockedError, match="fidelity check failed"):
        export.publish_run(copy, REPO_ID, hub=hub)
    assert hub.calls() == []


def test_publishing_needs_the_adapter_and_unchanged_checked_weights(exported: SimpleNamespace, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    hub = LocalHub(tmp_path / "hub")
    copy = _copy_run(exported, tmp_path)
    weights = copy / export.MERGED_DIR / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(export.PublishBlockedError, match="changed after the fidelity check"):
        export.publish_run(copy, REPO_ID, hub=hub)
    weights.write_bytes(original)
    shutil.rmtree(copy / export.ADAPTER_DIR)
    with pytest.raises(export.PublishBlockedError, match="adapter is not saved"):
        export.publish_run(copy, REPO_ID, hub=hub)
    assert hub.calls() == []


def test_merge_refuses_an_adapter_that_was_not_kept(exported: SimpleNamespace, tmp_path: Path):
    missing = export.KeptAdapter(tmp_path / "nowhere", exported.source)
    with pytest.raises(VinakitError, match="kept before merging"):
        export.merge_to_16bit(missing, exported.params, Run(tmp_path, "export"))


# --------------------------------------------------------------------------------------------------------------
# The exported folders
# --------------------------------------------------------------------------------------------------------------


def test_adapter_is_kept_unchanged_with_tokenizer_and_training_info(exported: SimpleNamespace, qlora_run: Path):
    kept = exported.run.path / export.ADAPTER_DIR
    assert export.folder_fingerprint(kept) == export.folder_fingerprint(qlora_run / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 export.TRAINING_INFO_FILE, "README.md"):
        assert (kept / name).is_file(), name
    manifest = json.loads((exported.run.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["adapter"]["weights_sha256"] == manifest["source"]["weights_sha256"]


def test_exported_folder_tokenises_exactly_like_training(exported: SimpleNamespace, qlora_run: Path):
    from transformers import AutoTokenizer, GenerationConfig

    from vinakit.chat import render_prompt, tokenize_conversation

    trained = AutoTokenizer.from_pretrained(qlora_run / "adapter")
    reloaded = AutoTokenizer.from_pretrained(exported.merged.path)
    info = json.loads((exported.merged.path / export.TRAINING_INFO_FILE).read_text(encoding="utf-8"))
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
    assert "llama.cpp was not found" in exported.gguf.message
    assert str(exported.merged.path) in exported.gguf.message
    assert not (exported.run.path / export.GGUF_DIR).exists()
    # detection only (no conversion): a folder with both tools counts, one with the converter alone does not
    monkeypatch.setenv(export.LLAMA_CPP_ENV_VAR, str(tmp_path))
    (tmp_path / "convert_hf_to_gguf.py").write_text("# converter\n", encoding="utf-8")
    assert export.find_llama_cpp() is None
    quantizer = tmp_path / "llama-quantize"
    quantizer.write_text("#!/bin/sh\necho usage\n", encoding="utf-8")
    quantizer.chmod(0o755)
    assert export.find_llama_cpp() == (quantizer, tmp_path / "convert_hf_to_gguf.py")


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
    report = export.publish_run(_copy_run(exported, tmp_path), REPO_ID, methods=["lora", "merged_16bit", "gguf"],
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
        export.publish_run(copy, REPO_ID, hub=hub)
    assert "HF_TOKEN" in str(caught.value) and "intact" in str(caught.value)
    assert hub.calls() == []


def test_sentinel_token_never_reaches_a_file(qlora_run: Path, tmp_path: Path):
    """The whole notebook, headless, pushing to the local stand-in with a sentinel HF_TOKEN."""
    hub_dir = tmp_path / "hub"
    env = {**os.environ, "HF_TOKEN": SENTINEL, "VINAKIT_HUB": f"local:{hub_dir}",
           export.LLAMA_CPP_ENV_VAR: str(tmp_path / "no-llama-cpp")}
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


def test_find_source_accepts_run_adapter_and_model_folders(qlora_run: Path, tiny_dir: Path, tmp_path: Path):
    by_run, by_adapter = export.find_source(str(qlora_run)), export.find_source(str(qlora_run / "adapter"))
    assert by_run == by_adapter and by_run.kind == "lora" and by_run.run_dir == qlora_run.resolve()
    assert by_run.training_params["dataset"] == "vinakit:chat"
    full = export.find_source(str(tiny_dir))
    assert full.kind == "full" and full.run_dir is None
    with pytest.raises(VinakitError, match="does not exist"):
        export.find_source(str(tmp_path / "không-có"))
    # empty: the newest training run in output_dir, never an export run
    outputs = tmp_path / "outputs"
    shutil.copytree(qlora_run, outputs / "sft-a")
    newer = outputs / "export-b"
    shutil.copytree(qlora_run, newer)
    (newer / "manifest.json").write_text(json.dumps({"notebook": "export"}), encoding="utf-8")
    assert export.find_source("", outputs).run_dir == (outputs / "sft-a").resolve()
    with pytest.raises(VinakitError, match="run the SFT"):
        export.find_source("", tmp_path / "empty")


def test_full_model_export_needs_no_merge_and_is_exact(tiny_dir: Path, tmp_path: Path):
    params = ExportParams.from_sources([CPU_TINY], [("adapter", str(tiny_dir)), ("output_dir", str(tmp_path)),
                                                    ("fidelity_dataset", "vinakit:chat"), ("fidelity_rows", "4")])
    run = start_run(params)
    source = export.load_source(params, run)
    heldout = export.load_heldout(source, params, run)
    kept = export.keep_adapter(source, heldout, params, run)
    assert kept.path == tiny_dir.resolve() and not (run.path / export.ADAPTER_DIR).exists()
    merged = export.merge_to_16bit(kept, params, run)
    report = export.check_fidelity(kept, merged, heldout, params, run)
    assert report.metrics["merge_max_abs_logit_diff"] == 0.0
    assert report.metrics["naive_4bit_max_abs_logit_diff"] > 0.01  # 4-bit quantisation alone costs this much


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
    assert export.repo_names(REPO_ID, ["merged_16bit", "lora", "gguf"]) == {
        "merged_16bit": REPO_ID, "lora": f"{REPO_ID}-lora", "gguf": f"{REPO_ID}-GGUF"}
    assert export.repo_names(REPO_ID, ["lora"]) == {"lora": REPO_ID}


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

    result = export.merge_adapters([first, second], tmp_path / "merged", weights=[0.7, 0.3], evaluate=evaluate)
    assert hook_calls == ["adapter_0", "adapter_1", "merged"]
    assert list(result.table.index) == ["chat", "instruct", "merged (linear)"]
    config = json.loads((result.path / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 12 and config["use_rslora"] is False
    info = json.loads((result.path / export.TRAINING_INFO_FILE).read_text(encoding="utf-8"))
    assert info["merge_weights"] == [0.7, 0.3] and len(info["merged_from"]) == 2
    d1, d2, merged = _deltas(tiny_dir, first), _deltas(tiny_dir, second), _deltas(tiny_dir, result.path)
    assert set(merged) == set(d1)
    for name in merged:
        torch.testing.assert_close(merged[name], 0.7 * d1[name] + 0.3 * d2[name], atol=1e-6, rtol=1e-5)


def test_ties_merge_of_an_adapter_with_itself_gives_it_back(tiny_dir: Path, tmp_path: Path):
    import torch

    adapter = _random_adapter(tiny_dir, tmp_path / "chat", seed=3, rank=4)
    copy = shutil.copytree(adapter, tmp_path / "chat-copy")
    result = export.merge_adapters([adapter, copy], tmp_path / "ties", weights=[1.0, 1.0], method="ties",
                                   density=1.0)
    original, merged = _deltas(tiny_dir, adapter), _deltas(tiny_dir, result.path)
    for name in merged:
        torch.testing.assert_close(merged[name], original[name], atol=1e-5, rtol=1e-4)


def test_merge_adapters_refuses_what_cannot_be_merged(tiny_dir: Path, tmp_path: Path):
    good = _random_adapter(tiny_dir, tmp_path / "good", seed=4, rank=4)
    other_base = shutil.copytree(tiny_dir, tmp_path / "other-base")
    foreign = _random_adapter(other_base, tmp_path / "foreign", seed=5, rank=4)
    with pytest.raises(ParamsError, match="share a base model"):
        export.merge_adapters([good, foreign], tmp_path / "out1")
    full = _random_adapter(tiny_dir, tmp_path / "full", seed=6, rank=4, modules_to_save=["lm_head"])
    with pytest.raises(ParamsError, match="trains whole modules"):
        export.merge_adapters([good, full], tmp_path / "out2")
    with pytest.raises(ParamsError, match="at least two"):
        export.merge_adapters([good], tmp_path / "out3")


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
    assert (run.path / export.ADAPTER_DIR / "adapter_config.json").is_file()
