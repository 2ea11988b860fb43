"""Every architecture family the README promises, through every notebook step, on the tiny model of each family.

One parametrised test per notebook step (SFT with LoRA and QLoRA, CPT with vocabulary extension, batched generation
and MCQ evaluation, export with the fidelity check), each a few optimizer steps in-process through the package's
step functions; the notebooks themselves run via ``vinakit run`` for a small representative subset. Unsloth cases
run last (conftest), after the hf cases, since importing Unsloth patches transformers for the whole process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from vinakit.errors import VinakitError
from vinakit.families import FAMILIES, FAMILY_NAMES, tiny_family_dir
from vinakit.record import start_run

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"
TIED = {"llama": False, "qwen2": True, "qwen3": True, "gemma3": True, "mistral": False, "phi3": False,
        "smollm": True, "mpt": True}
GATED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LINEAR = {**{name: GATED for name in FAMILY_NAMES}, "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
          "mpt": {"Wqkv", "out_proj", "up_proj", "down_proj"}}
UNSLOTH_REFUSES = {"mpt"}  # vinakit.families.UNSLOTH_UNPATCHED_MODEL_TYPES: the hf backend takes these

CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Bạn là trợ lý tiếng Việt, trả lời ngắn gọn."},
                  {"role": "user", "content": f"Câu hỏi số {i}: Hà Nội có gì nổi tiếng?"},
                  {"role": "assistant", "content": f"Hồ Gươm, phố cổ và phở, câu trả lời số {i}."},
                  {"role": "user", "content": "Còn Huế thì sao?"},
                  {"role": "assistant", "content": f"Huế có Đại Nội và sông Hương ({i})."}]}
    for i in range(10)
]


def _model_name(family: str) -> str:
    return f"tiny-{family}"


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in CHAT_ROWS) + "\n", encoding="utf-8")
    return path


def _sft_params(tmp_path: Path, family: str, backend: str, chat_file: Path, **overrides: Any) -> Any:
    from vinakit.params import SFTParams

    values = dict(model_name=_model_name(family), backend=backend, load_in_4bit=False, max_seq_length=256,
                  output_dir=str(tmp_path), run_name=f"sft-{family}-{backend}", dataset=str(chat_file), val_size=2,
                  rank=8, lora_alpha=16, use_rslora=False, learning_rate=5e-3, max_steps=2,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch",
                  logging_steps=1, eval_steps=2, save_steps=100, warmup_ratio=0.0, seed=3)
    values.update(overrides)
    return SFTParams(**values)


# --------------------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_family_is_its_architecture_scaled_down(family: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny_family_dir(_model_name(family))
    assert tiny_family_dir(_model_name(family)) == folder  # cached: the same folder, no rebuild
    config = AutoConfig.from_pretrained(folder)
    layers = getattr(config, "num_hidden_layers", getattr(config, "n_layers", None))
    hidden = getattr(config, "hidden_size", getattr(config, "d_model", None))
    assert (layers, hidden) == (4, 128)
    assert bool(config.tie_word_embeddings) is TIED[family]
    if family != "llama":
        assert type(config).__name__ == FAMILIES[family].config_class
    features = {"gemma3": lambda c: c.final_logit_softcapping == 30.0 and "sliding_attention" in c.layer_types,
                "mistral": lambda c: c.sliding_window == 64, "phi3": lambda c: c.sliding_window == 64,
                "mpt": lambda c: c.attn_config.alibi and c.no_bias, "qwen2": lambda c: not c.use_sliding_window}
    assert features.get(family, lambda c: True)(config), f"{family} lost its distinctive feature"
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reply = tokenizer.apply_chat_template(CHAT_ROWS[0]["messages"][:3], tokenize=False).split("câu trả lời số 0.")[1]
    end_of_turn = tokenizer(reply, add_special_tokens=False)["input_ids"][0]  # what the template writes after it
    assert end_of_turn in generation["eos_token_id"] and tokenizer.eos_token_id in generation["eos_token_id"]


def test_an_unknown_tiny_name_lists_the_families() -> None:
    from vinakit.errors import ParamsError
    from vinakit.model import resolve_model_name

    with pytest.raises(ParamsError, match="tiny-qwen3") as caught:
        resolve_model_name("tiny-qwen4")
    assert "tiny-mpt" in str(caught.value) and "tiny-vi" in str(caught.value)


def test_qwen_families_use_the_real_qwen3_tokenizer(shared_dir: Path) -> None:
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "qwen3")
    for family in ("qwen2", "qwen3"):
        tokenizer = AutoTokenizer.from_pretrained(tiny_family_dir(_model_name(family)))
        text = "Hòa bình và thủy triều ở Việt Nam"
        assert tokenizer(text)["input_ids"] == real(text)["input_ids"]
    qwen3 = AutoTokenizer.from_pretrained(tiny_family_dir("tiny-qwen3"))
    rendered = qwen3.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=False)
    assert "<think>" in rendered, "tiny-qwen3 keeps Qwen3's own template with its think block"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_all_linear_and_embeddings_resolve_per_family(family: str) -> None:
    """Every linear layer but the output head gets an adapter, fused ones included; the embeddings are found."""
    import torch

    from vinakit import model as model_lib
    from vinakit.model_sizes import model_sizes

    model, _ = model_lib.load_model(_model_name(family), backend="hf", max_seq_length=128)
    head = model.get_output_embeddings()
    assert set(model_lib.lora_target_modules(model, "all-linear")) == LINEAR[family]
    assert model_lib.embedding_module_names(model) == ["wte" if family == "mpt" else "embed_tokens", "lm_head"]
    sizes = model_sizes(_model_name(family))  # what `vinakit plan` counts, from config.json alone
    assert sizes.parameters == pytest.approx(sum(p.numel() for p in model.parameters()), rel=0.02)
    assert set(sizes.linear_shapes()) == LINEAR[family]
    peft_model = model_lib.add_lora(model, backend="hf", rank=4, target_modules="all-linear")
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    plain = [name for name, module in peft_model.named_modules() if isinstance(module, torch.nn.Linear)
             and module is not head and "lora_" not in name and name.removesuffix(".base_layer") not in wrapped]
    assert len(wrapped) == 4 * len(LINEAR[family]) and not plain, f"linear layers without an adapter: {plain}"
    assert model_lib.adapter_modules(peft_model)["target_modules"] == sorted(LINEAR[family])


@pytest.mark.parametrize("family", ["smollm", "mistral"])
def test_a_tied_output_head_gets_no_lora(family: str) -> None:
    """Merging a LoRA into a head tied to the input embeddings would change both: it is left out, with a line."""
    from vinakit import model as model_lib

    model, _ = model_lib.load_model(_model_name(family), backend="hf", max_seq_length=128)
    peft_model = model_lib.add_lora(model, backend="hf", rank=4, target_modules="all-linear,lm_head")
    targets = set(model_lib.adapter_modules(peft_model)["target_modules"])
    assert targets == (LINEAR[family] if TIED[family] else LINEAR[family] | {"lm_head"})


# --------------------------------------------------------------------------------------------------------------
# SFT: LoRA and QLoRA, both backends, exact responses-only labels
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_step(family: str, backend: str, four_bit: bool, tmp_path: Path, chat_file: Path) -> None:
    from vinakit import sft

    params = _sft_params(tmp_path, family, backend, chat_file, load_in_4bit=four_bit)
    expected_backend = "hf" if family in UNSLOTH_REFUSES else backend
    assert params.backend == expected_backend
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    tokenized = sft.tokenize(params, tokenizer, data, run)
    _assert_exact_labels(tokenizer, tokenized.train[0], data.train)
    metrics = sft.train(params, model, tokenizer, tokenized, run)
    assert metrics["global_step"] == 2 and all(loss == loss for loss in metrics["train_loss_history"])
    manifest = run.read_json("manifest.json")
    assert manifest["backend"] == expected_backend
    assert set(manifest["adapter_modules"]["target_modules"]) == LINEAR[family]
    assert (run.path / "adapter" / "adapter_config.json").is_file()


def _assert_exact_labels(tokenizer: Any, row: dict[str, Any], conversations: list[dict[str, Any]]) -> None:
    """The trained tokens are exactly the row's assistant replies, each followed by the end-of-turn token."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    texts = [tokenizer.decode(span[:-1]) for span in spans]
    ends = {tokenizer.convert_ids_to_tokens(span[-1]) for span in spans}
    replies = [[m["content"] for m in c["messages"] if m["role"] == "assistant"] for c in conversations]
    assert texts in replies, f"trained text {texts} is not the replies of any conversation"
    assert len(ends) == 1 and next(iter(ends)) in tokenizer.all_special_tokens


# --------------------------------------------------------------------------------------------------------------
# CPT: embedding_learning_rate and vocabulary extension
# --------------------------------------------------------------------------------------------------------------


# The Qwen families carry the real 151k-token vocabulary: training both embedding matrices in full takes ~100 s
# a step on a CPU, so CPT runs on the families with the kit's 4k BPE (tied: gemma3, smollm, mpt; untied: the rest).
CPT_FAMILIES = [family for family in FAMILY_NAMES if family not in ("qwen2", "qwen3")]


@pytest.mark.parametrize("family", CPT_FAMILIES)
def test_cpt_step_with_vocabulary_extension(family: str, tmp_path: Path) -> None:
    import torch

    from vinakit import cpt
    from vinakit.params import CPTParams

    params = CPTParams(model_name=_model_name(family), backend="hf", load_in_4bit=False, max_seq_length=64,
                       output_dir=str(tmp_path), run_name=f"cpt-{family}", val_size=0.1,
                       num_new_tokens=2, new_token_min_count=1, stages=["new_embeddings:1", "full:1"], rank=4,
                       lora_alpha=8, use_rslora=False, learning_rate=1e-3, embedding_learning_rate=1e-2,
                       per_device_train_batch_size=2, gradient_accumulation_steps=1, optim="adamw_torch",
                       logging_steps=1, eval_steps=100, save_steps=1000, warmup_ratio=0.0, max_new_tokens=4,
                       seed=3)
    run = start_run(params)
    corpus = cpt.load_corpus(params, run)
    model, tokenizer = cpt.load_model(params, run)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    vocabulary = cpt.extend_vocabulary(params, model, tokenizer, corpus, run)
    grown = vocabulary.model
    assert len(vocabulary.added) == 2
    for token in vocabulary.added:
        assert tokenizer(" " + token.word, add_special_tokens=False)["input_ids"] == list(token.old_ids)
        assert vocabulary.tokenizer(" " + token.word, add_special_tokens=False)["input_ids"] == [token.token_id]
        for weight, before in ((grown.get_input_embeddings().weight, before_in),
                               (grown.get_output_embeddings().weight, before_out)):
            torch.testing.assert_close(weight[token.token_id].float(), before[list(token.old_ids)].float().mean(0))
    tied = TIED[family]
    assert (grown.get_output_embeddings().weight.data_ptr() == grown.get_input_embeddings().weight.data_ptr()) \
        is tied
    packed = cpt.pack(params, grown, vocabulary.tokenizer, corpus, run)
    model = cpt.prepare_for_training(params, grown, run)
    training = cpt.train_stages(params, model, vocabulary.tokenizer, packed, run, vocabulary.new_token_ids)
    assert training.metrics["embedding_update_norm"] > 0
    trained_in = model.get_input_embeddings().modules_to_save["default"].weight
    trained_out = model.get_output_embeddings().modules_to_save["default"].weight
    assert (trained_in is trained_out) is tied, "a tied family stays tied, an untied one untied"
    assert run.read_json("manifest.json")["tied_embeddings"] is tied


# --------------------------------------------------------------------------------------------------------------
# Generation and evaluation, export with the fidelity check
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _trained_run(family: str, root: str, chat_file: str) -> Path:
    """One short hf SFT run per family, shared by the generation, eval and export tests."""
    from vinakit import sft

    params = _sft_params(Path(root), family, "hf", Path(chat_file))
    run = start_run(params)
    data = sft.load_data(params, run)
    model, tokenizer = sft.load_model(params, run)
    sft.train(params, model, tokenizer, sft.tokenize(params, tokenizer, data, run), run)
    return run.path


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("family-runs")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batched_generation_and_mcq_eval(family: str, runs_root: Path, chat_file: Path) -> None:
    from vinakit.chat import render_prompt
    from vinakit.generation import continuation_logprobs, generate_chat
    from vinakit.model import load_for_inference

    adapter = _trained_run(family, str(runs_root), str(chat_file)) / "adapter"
    model, tokenizer = load_for_inference(adapter, backend="hf", max_seq_length=256)
    prompts = ["Hà Nội có gì?", "Viết một câu hỏi trắc nghiệm về hệ điều hành máy tính cho học sinh.", "Huế?"]
    batched = generate_chat(model, tokenizer, prompts, max_new_tokens=8)
    alone = [generate_chat(model, tokenizer, [prompt], max_new_tokens=8)[0] for prompt in prompts]
    assert batched == alone, "left padding changed the greedy replies (position ids / ALiBi / sliding window)"
    # eval_mcq answers by letter log-probabilities, batched: each prompt must score as it does alone.
    rendered = [render_prompt(tokenizer, [{"role": "user", "content": p}]) + "Đáp án:" for p in prompts]
    letters = [" A", " B", " C", " D"]
    together = continuation_logprobs(model, tokenizer, rendered, letters)
    for prompt, scores in zip(rendered, together):
        assert scores == pytest.approx(continuation_logprobs(model, tokenizer, [prompt], letters)[0], abs=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_export_fidelity_passes(family: str, runs_root: Path, chat_file: Path, tmp_path: Path) -> None:
    from vinakit import export
    from vinakit.params import ExportParams

    trained = _trained_run(family, str(runs_root), str(chat_file))
    params = ExportParams(adapter=str(trained), backend="hf", output_dir=str(tmp_path), run_name=f"export-{family}",
                          save_methods=["lora", "merged_16bit"], fidelity_rows=2, fidelity_max_tokens=64,
                          max_logit_diff=0.01, max_kl=1e-4, compare_naive_4bit=False)
    run = start_run(params)
    source = export.load_source(params, run)
    heldout = export.load_heldout(source, params, run)
    kept = export.keep_adapter(source, heldout, params, run)
    merged = export.merge_to_16bit(kept, params, run)
    fidelity = export.check_fidelity(kept, merged, heldout, params, run)
    metrics = run.read_json("metrics.json")
    assert metrics["fidelity_passed"] is True, fidelity
    assert metrics["merge_max_abs_logit_diff"] < 0.01 and metrics["chat_template_identical"]
    saved = json.loads((Path(merged.path) / "config.json").read_text(encoding="utf-8"))
    assert bool(saved.get("tie_word_embeddings", False)) is TIED[family]


# --------------------------------------------------------------------------------------------------------------
# The notebooks, headless, for a representative subset
# --------------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vinakit.cli", "run", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.mark.parametrize("family", ["mpt", "gemma3"])
def test_sft_eval_and_export_notebooks_run(family: str, tmp_path: Path) -> None:
    """MPT: the hf fallback announced in one line and recorded; Gemma 3: Unsloth, tied, soft-capped, no system."""
    short = ["-p", "max_steps", "3", "-p", "eval_steps", "3", "-p", "logging_steps", "1", "-p", "output_dir",
             str(tmp_path)]
    result = _cli("sft", "-f", str(CPU_TINY), "-p", "model_name", f"tiny-{family}", "-p", "run_name", "sft", *short)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    fallback = [line for line in result.stdout.splitlines() if "instead of 'unsloth'" in line]
    assert len(fallback) == (1 if family == "mpt" else 0), result.stdout
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["backend"] == ("hf" if family == "mpt" else "unsloth")
    result = _cli("eval_mcq", "-f", str(CPU_TINY), "-p", "model_name", f"tiny-{family}", "-p", "adapter",
                  str(tmp_path / "sft"), "-p", "run_name", "eval", "-p", "output_dir", str(tmp_path), "-p", "max_items",
                  "4", "-p", "vmlu_max_items", "4", "-p", "max_new_tokens", "16")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert evaluated["n_items"] == 4 and evaluated["vmlu_accuracy"] is not None
    result = _cli("export", "-f", str(CPU_TINY), "-p", "adapter", str(tmp_path / "sft"), "-p", "run_name", "export",
                  "-p", "output_dir", str(tmp_path), "-p", "save_methods", "[lora, merged_16bit]")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    metrics = json.loads((tmp_path / "export" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["fidelity_passed"] is True


def test_unsloth_is_never_imported_for_a_family_it_does_not_patch(tmp_path: Path, chat_file: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from vinakit.params import SFTParams
        from vinakit.record import start_run
        from vinakit import sft
        params = SFTParams(model_name="tiny-mpt", backend="unsloth", load_in_4bit=False, output_dir={str(tmp_path)!r},
                           dataset={str(chat_file)!r}, val_size=2, max_steps=1, rank=4, optim="adamw_torch")
        run = start_run(params)
        model, tokenizer = sft.load_model(params, run)
        assert "unsloth" not in sys.modules, "half patched"
        print("backend", params.backend)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line for line in lines if "instead of 'unsloth'" in line] == [
        "vinakit: using backend 'hf' instead of 'unsloth' for tiny-mpt: Unsloth does not patch the mpt architecture."]
    assert "backend hf" in lines


# --------------------------------------------------------------------------------------------------------------
# Remote code, opt-in
# --------------------------------------------------------------------------------------------------------------

_CONFIGURATION = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
_MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 0.5  # its own modeling code: halves the logits
        return output
'''


@pytest.fixture(scope="module")
def remote_code_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-vi's weights under a custom architecture whose code lives in the folder (auto_map), as PhoGPT's does."""
    import shutil

    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    shutil.copytree(tiny_family_dir("tiny-vi"), folder)
    (folder / "configuration_tiny_remote.py").write_text(_CONFIGURATION, encoding="utf-8")
    (folder / "modeling_tiny_remote.py").write_text(_MODELING, encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_remote_code_needs_trust_remote_code(remote_code_folder: Path) -> None:
    import torch

    from vinakit import model as model_lib
    from vinakit.params import NOTEBOOK_PARAMS, SFTParams

    with pytest.raises(VinakitError, match="trust_remote_code") as caught:
        model_lib.load_model(str(remote_code_folder), backend="hf", trust_remote_code=False)
    assert "modeling_tiny_remote.py" in str(caught.value)
    model, tokenizer = model_lib.load_model(str(remote_code_folder), backend="hf", trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    plain, _ = model_lib.load_model("tiny-vi", backend="hf")
    ids = tokenizer("Xin chào Việt Nam", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, plain(**ids).logits * 0.5)
    assert SFTParams(model_name=str(remote_code_folder), trust_remote_code=True).backend == "hf"
    for name, cls in NOTEBOOK_PARAMS.items():
        if "trust_remote_code" in cls.field_types():
            assert cls().trust_remote_code is False, name
    missing = [name for name in ("sft", "cpt", "eval_mcq", "export") if "trust_remote_code" not in
               NOTEBOOK_PARAMS[name].field_types()]
    assert not missing


@pytest.mark.parametrize("notebook", ["sft", "cpt", "eval_mcq", "export"])
def test_every_notebook_has_trust_remote_code_off(notebook: str) -> None:
    nb = json.loads((REPO / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    assert any(line.startswith("trust_remote_code: bool = False") for line in cell["source"])


# --------------------------------------------------------------------------------------------------------------
# The PhoGPT preset
# --------------------------------------------------------------------------------------------------------------


def test_phogpt_preset_fits_a_t4() -> None:
    from vinakit import plan
    from vinakit.device import profile_named
    from vinakit.params import SFTParams

    params = SFTParams.from_sources([REPO / "params" / "phogpt_t4.yaml"])
    assert params.backend == "hf" and params.trust_remote_code and params.load_in_4bit
    estimate = plan.estimate(params, profile_named("t4"))
    assert estimate.sizes.layout == "mpt" and 7.0e9 < estimate.sizes.parameters < 8.0e9
    assert estimate.fits, estimate
