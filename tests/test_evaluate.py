"""The evaluation steps on the embedded tiny model: items, bad input, letter scoring, VMLU, base vs fine-tuned."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from vinakit.errors import DataError, VinakitError
from vinakit.params import EvalMCQParams
from vinakit.record import start_run

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "data"
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"
PASSAGE = ("Thủy điện Hòa Bình được xây dựng trên sông Đà, là một trong những công trình thủy điện lớn của Việt Nam. "
           "Nhà máy cung cấp điện cho miền Bắc và giúp điều tiết lũ cho đồng bằng sông Hồng.")


def make_params(tmp_path: Path, **values) -> EvalMCQParams:
    base = {"model_name": "tiny-vi", "backend": "hf", "load_in_4bit": False, "max_seq_length": 512,
            "max_new_tokens": 48, "batch_size": 8, "output_dir": str(tmp_path / "runs")}
    return EvalMCQParams.validate({**base, **values})


def items_of(tmp_path: Path, dataset: str | Path, **values):
    from vinakit import evaluate

    params = make_params(tmp_path, dataset=str(dataset), **values)
    run = start_run(params)
    return evaluate.load_items(params, run, evaluate.TrainedModel()), run


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from vinakit.model import tiny_model_dir

    return AutoTokenizer.from_pretrained(tiny_model_dir())


# --- items -------------------------------------------------------------------------------------------------------


def test_items_from_both_mcq_schemas(tmp_path: Path):
    items, run = items_of(tmp_path, FIXTURES / "mcq_context.csv")
    assert items.table["reference_answer"].tolist() == ["A", "B", "C"]  # "A", "b", "C." in the file
    assert items.table["item"].tolist() == [1, 2, 3] and items.table["source_line"].tolist() == [2, 3, 6]
    assert items.table.at[0, "reference_a"] == "Central Processing Unit"
    assert "no fine-tuned model" in items.note
    manifest = json.loads((run.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["data"]["eval_items"]["rows_used"] == 3 and manifest["eval_items"]["count"] == 3

    para, _ = items_of(tmp_path, FIXTURES / "mcq_para.csv", run_name="para")
    assert para.table["context"].tolist()[0] == "Bàn phím là thiết bị nhập dữ liệu."
    assert para.table["reference_answer"].tolist() == ["B", "D"]


def test_contexts_only_files_in_nfd_and_other_tone_style(tmp_path: Path):
    nfd = unicodedata.normalize("NFD", "Thuỷ triều lên xuống mỗi ngày hai lần.")
    (tmp_path / "contexts.csv").write_text(f"context\n{nfd}\n\"{PASSAGE}\"\n", encoding="utf-8")
    items, _ = items_of(tmp_path, tmp_path / "contexts.csv")
    assert items.table["context"].tolist() == ["Thủy triều lên xuống mỗi ngày hai lần.", PASSAGE]  # NFC, old style
    assert items.table["reference_question"].tolist() == ["", ""]

    (tmp_path / "paras.jsonl").write_text(json.dumps({"para": PASSAGE}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "passages.txt").write_text(f"{PASSAGE}\n\nHà Nội là thủ đô của Việt Nam.\n", encoding="utf-8")
    jsonl, _ = items_of(tmp_path, tmp_path / "paras.jsonl", run_name="jsonl")
    txt, _ = items_of(tmp_path, tmp_path / "passages.txt", run_name="txt")
    assert len(jsonl) == 1 and txt.table["context"].tolist()[1] == "Hà Nội là thủ đô của Việt Nam."


def test_contexts_file_missing_the_column_or_with_empty_contexts(tmp_path: Path):
    (tmp_path / "wrong.csv").write_text("đoạn_văn,chủ_đề\nHà Nội là thủ đô.,Địa lý\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2.*no context column: expected 'context' or 'para'.*đoạn_văn"):
        items_of(tmp_path, tmp_path / "wrong.csv")
    with pytest.raises(DataError, match=r"no column 'noi_dung' \(context_field\)"):
        items_of(tmp_path, tmp_path / "wrong.csv", context_field="noi_dung", run_name="field")
    items, _ = items_of(tmp_path, tmp_path / "wrong.csv", context_field="đoạn_văn", run_name="renamed")
    assert items.table["context"].tolist() == ["Hà Nội là thủ đô."]

    (tmp_path / "empty.csv").write_text(f"context,topic\n\"{PASSAGE}\",Năng lượng\n\"   \",Địa lý\n",
                                        encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3, field 'context': empty context in column 'context'"):
        items_of(tmp_path, tmp_path / "empty.csv", run_name="strict")
    items, _ = items_of(tmp_path, tmp_path / "empty.csv", skip_bad_rows=True, run_name="lenient")
    assert len(items) == 1 and items.report.skip_reasons["empty_context"] == 1


INVISIBLE = "\u200b\u200c\ufeff\u00ad"  # nothing a reader sees


@pytest.mark.parametrize("normalize", [True, False])
def test_a_context_of_only_invisible_characters_is_empty(tmp_path: Path, normalize: bool):
    """Before, such a row was scored as an empty passage in strict mode."""
    (tmp_path / "contexts.jsonl").write_text(json.dumps({"context": PASSAGE}, ensure_ascii=False) + "\n"
                                             + json.dumps({"context": INVISIBLE}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2, field 'context': empty context .*invisible"):
        items_of(tmp_path, tmp_path / "contexts.jsonl", normalize_text=normalize, run_name="strict")
    items, _ = items_of(tmp_path, tmp_path / "contexts.jsonl", normalize_text=normalize, skip_bad_rows=True,
                        run_name="lenient")
    assert len(items) == 1 and items.report.skip_reasons["empty_context"] == 1


def test_a_vmlu_question_or_choice_of_only_invisible_characters_is_refused(tmp_path: Path):
    from vinakit.evaluate import load_vmlu

    rows = [{"question": INVISIBLE, "choices": ["Huế", "Hà Nội"], "answer": "B"},
            {"question": "Thủ đô của Việt Nam là gì?", "choices": ["A. Huế", f"B. {INVISIBLE}"], "answer": "B"},
            {"question": "Sông nào chảy qua Hà Nội?", "choices": ["Sông Hồng", "Sông Hương"], "answer": "A"}]
    (tmp_path / "vmlu.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    strict = make_params(tmp_path, vmlu_dataset=str(tmp_path / "vmlu.jsonl"), run_name="strict")
    with pytest.raises(DataError, match=r"line 1, field 'question': no question \(empty, or only invisible"):
        load_vmlu(strict, start_run(strict))
    lenient = make_params(tmp_path, vmlu_dataset=str(tmp_path / "vmlu.jsonl"), skip_bad_rows=True, run_name="ok")
    vmlu = load_vmlu(lenient, start_run(lenient))
    assert vmlu.table["question"].tolist() == ["Sông nào chảy qua Hà Nội?"]


def test_long_context_is_cut_in_the_middle_never_crashes(tiny_tokenizer, tmp_path: Path):
    from vinakit.evaluate import TRUNCATION_MARK, generation_prompts

    params = make_params(tmp_path, max_seq_length=256, max_new_tokens=64)
    long_context = "Mở đầu đoạn văn. " + " ".join([PASSAGE] * 30) + " Kết thúc đoạn văn."
    prompts, cut = generation_prompts(tiny_tokenizer, [long_context, PASSAGE], params)
    assert cut == [True, False]
    assert PASSAGE in prompts[1]
    assert "Mở đầu" in prompts[0] and prompts[0].endswith("Kết thúc đoạn văn.") and TRUNCATION_MARK in prompts[0]
    assert len(tiny_tokenizer(prompts[0])["input_ids"]) <= 256 - 64


# --- the fine-tuned model ----------------------------------------------------------------------------------------


def test_adapter_folder_errors(tmp_path: Path):
    from vinakit.evaluate import find_trained_model

    assert not find_trained_model(make_params(tmp_path)).present
    with pytest.raises(VinakitError, match="does not exist"):
        find_trained_model(make_params(tmp_path, adapter=str(tmp_path / "không-có")))
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(VinakitError, match="holds no adapter"):
        find_trained_model(make_params(tmp_path, adapter=str(tmp_path / "empty-run")))


def fake_cpt_run(root: Path) -> Path:
    """The shape of a CPT run folder (LoRA CPT saves adapter/ and the merged model/), without training."""
    run = root / "cpt-thử"
    for folder, name in (("adapter", "adapter_config.json"), ("model", "config.json")):
        (run / folder).mkdir(parents=True)
        (run / folder / name).write_text(json.dumps({"base_model_name_or_path": "tiny-vi"}), encoding="utf-8")
    (run / "params.yaml").write_text("model_name: tiny-vi\ndataset: vinakit:corpus\nstages: [full]\n", encoding="utf-8")
    (run / "manifest.json").write_text(json.dumps({"notebook": "cpt"}), encoding="utf-8")
    return run


def test_a_cpt_run_as_adapter_is_refused_before_loading_with_the_model_name_hint(tmp_path: Path):
    from vinakit.evaluate import find_trained_model

    run = fake_cpt_run(tmp_path)
    for spec in (run, run / "adapter", run / "model"):
        with pytest.raises(VinakitError) as caught:
            find_trained_model(make_params(tmp_path, adapter=str(spec)))
        message = str(caught.value)
        assert message.startswith(f"adapter: {spec} is a continued-pretraining (CPT) run")
        assert f"-p model_name {run.resolve() / 'model'}" in message and "leave adapter empty" in message


def test_adapter_of_another_base_model_is_a_clear_error(tmp_path: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from vinakit.evaluate import find_trained_model

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other-base")
    other = LlamaForCausalLM.from_pretrained(tmp_path / "other-base")
    peft_model = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "run" / "adapter")
    with pytest.raises(VinakitError, match=r"trained on base model '.*other-base', but model_name is 'tiny-vi'.*"
                                           r"set model_name to"):
        find_trained_model(make_params(tmp_path, adapter=str(tmp_path / "run")))
    found = find_trained_model(make_params(tmp_path, adapter=str(tmp_path / "run"),
                                           model_name=str(tmp_path / "other-base")))
    assert found.weights_dir == tmp_path / "run" / "adapter" and found.run_dir is None


def test_holdout_rows_are_the_sft_run_s_own_validation_split(tmp_path: Path):
    """The split is re-created through vinakit.runs with the run's own seed, size and tone style."""
    from vinakit import evaluate
    from vinakit.params import SFTParams
    from vinakit.runs import load_sft_data

    sft = SFTParams.validate({"dataset": "vinakit:mcq", "val_size": 0.2, "seed": 7, "tone_style": "new"})
    trained = evaluate.TrainedModel(weights_dir=tmp_path, run_dir=tmp_path, base_model="tiny-vi",
                                    sft_params=sft.to_dict())
    params = make_params(tmp_path, dataset="vinakit:mcq")
    items = evaluate.load_items(params, start_run(params), trained)
    assert len(items) == len(load_sft_data(sft).validation) and "val_size=0.2, seed=7" in items.note


# --- letter scoring ----------------------------------------------------------------------------------------------


def test_continuation_logprobs_match_a_plain_forward(backend: str):
    import torch

    from vinakit.generation import continuation_logprobs
    from vinakit.model import load_for_inference

    model, tokenizer = load_for_inference("tiny-vi", backend=backend, max_seq_length=256)
    prompts = ["Câu hỏi: Thủ đô của Việt Nam là gì?\nĐáp án:", f"{PASSAGE}\nĐáp án:"]  # different lengths
    for continuations in ([" A", " B", " C", " D"], [" Hà Nội", " thủy điện Hòa Bình"]):
        batched = continuation_logprobs(model, tokenizer, prompts, continuations, batch_size=2)
        for prompt, scores in zip(prompts, batched):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for continuation, score in zip(continuations, scores):
                ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                expected = sum(float(logprobs[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(ids))
                assert score == pytest.approx(expected, abs=2e-3), (backend, continuation)


def test_batched_generation_equals_one_at_a_time_in_order(backend: str):
    from vinakit.data import mcq_user_prompt
    from vinakit.generation import generate_chat
    from vinakit.model import load_for_inference

    model, tokenizer = load_for_inference("tiny-vi", backend=backend, max_seq_length=512)
    prompts = [mcq_user_prompt(PASSAGE), "Xin chào", mcq_user_prompt("Hà Nội là thủ đô."), "Hòa bình là gì?",
               mcq_user_prompt(PASSAGE + " " + PASSAGE)]  # lengths differ: left padding and reordering
    batched = generate_chat(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    alone = [generate_chat(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1)[0] for prompt in prompts]
    assert batched == alone


def test_vmlu_sample_and_files(tmp_path: Path):
    from vinakit.evaluate import load_vmlu

    params = make_params(tmp_path)
    vmlu = load_vmlu(params, start_run(params))
    table = vmlu.table
    assert len(table) >= 40 and table["subject"].nunique() >= 8
    assert all(not choice.startswith(("A.", "B.", "C.", "D.", "E.")) for row in table["choices"] for choice in row)
    assert table["answer"].value_counts(normalize=True).max() < 0.35  # a constant guess must not look good

    rows = [{"question": "Số nào là số nguyên tố?", "choices": ["A. 21", "B. 27", "C. 29", "D. 33", "E. 39"],
             "answer": "C", "subject": "Toán học"}]
    (tmp_path / "vmlu.csv").write_text("question,choices,answer\n\"Thủ đô của Việt Nam là gì?\","
                                       "\"[\"\"Huế\"\", \"\"Hà Nội\"\"]\",B\n", encoding="utf-8")
    (tmp_path / "vmlu.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    five = load_vmlu(make_params(tmp_path, vmlu_dataset=str(tmp_path / "vmlu.jsonl"), run_name="j"),
                     start_run(make_params(tmp_path, run_name="j")))
    assert five.table.at[0, "choices"] == ["21", "27", "29", "33", "39"]
    csv = load_vmlu(make_params(tmp_path, vmlu_dataset=str(tmp_path / "vmlu.csv"), run_name="c"),
                    start_run(make_params(tmp_path, run_name="c")))
    assert csv.table.at[0, "choices"] == ["Huế", "Hà Nội"] and csv.table.at[0, "subject"] == "unknown"
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "Hỏi?", "choices": ["A. x", "B. y"]}) + "\n",
                                         encoding="utf-8")
    with pytest.raises(DataError, match="no answer key.*dev or valid split"):
        load_vmlu(make_params(tmp_path, vmlu_dataset=str(tmp_path / "test.jsonl"), run_name="t"),
                  start_run(make_params(tmp_path, run_name="t")))


# --- base vs fine-tuned, end to end ------------------------------------------------------------------------------


def test_base_vs_fine_tuned_end_to_end(sft_run: Path, tmp_path: Path):
    import pandas as pd

    from vinakit import evaluate

    params = EvalMCQParams.from_sources([CPU_TINY], [("adapter", str(sft_run)), ("backend", "hf"),
                                                     ("output_dir", str(tmp_path)), ("run_name", "eval")])
    run = start_run(params)
    trained = evaluate.find_trained_model(params)
    assert trained.run_dir == sft_run and trained.base_model == "tiny-vi" and "<|im_start|>" in trained.chat_template
    items = evaluate.load_items(params, run, trained)
    sft_manifest = json.loads((sft_run / "manifest.json").read_text(encoding="utf-8"))
    assert len(items) == sft_manifest["data"]["train"]["validation_rows"]  # exactly the held-out rows
    assert items.note.startswith("held out") and items.table["context_seen_in_training"].map(type).eq(bool).all()
    evaluation = evaluate.evaluate_models(params, run, items, evaluate.load_vmlu(params, run), trained)

    base, tuned = evaluation.results
    assert (base.label, tuned.label) == ("base", "fine-tuned")
    assert tuned.summary["format_valid_rate"] > base.summary["format_valid_rate"]
    raw = (run.path / "predictions.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM: Excel shows Vietnamese correctly
    table = pd.read_csv(run.path / "predictions.csv", encoding="utf-8-sig", keep_default_na=False)
    for column in ("context", "raw_output", "question", "option_a", "option_b", "option_c", "option_d", "answer",
                   "format_valid", "format_strict", "errors", "question_grounding", "key_agrees", "rouge_l"):
        assert column in table.columns, column
    assert table["context"].tolist() == items.table["context"].tolist()
    assert (run.path / "predictions_base.csv").is_file() and (run.path / "vmlu_predictions.csv").is_file()

    metrics = json.loads((run.path / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics)[0] == "format_valid_rate" and metrics["model"] == "fine-tuned"
    assert metrics["base"]["format_valid_rate"] == base.summary["format_valid_rate"]
    assert 0 <= metrics["vmlu_accuracy"] <= 1 and set(metrics["vmlu_per_subject"]) == set(
        evaluation.vmlu_subjects()["subject"])
    comparison = evaluation.comparison()
    assert list(comparison.columns) == ["metric", "base", "fine-tuned", "change"]
    assert "format_valid_rate" in comparison["metric"].tolist()
    assert run.save_figure(evaluate.plot_comparison(evaluation), "comparison").stat().st_size > 1000
    assert run.save_figure(evaluate.plot_answer_letters(evaluation), "answer_letters").is_file()
    examples = evaluation.examples(3)
    assert list(examples.columns) == ["context", "base: output", "base: valid", "fine-tuned: output",
                                      "fine-tuned: valid"]
    assert "format valid" in evaluate.summary_text(evaluation)


def test_evaluation_shows_the_comparison_table_and_one_line_reprs():
    import pandas as pd

    from vinakit.evaluate import Evaluation, ModelResult
    from vinakit.record import Metrics

    predictions = pd.DataFrame({"context": ["a", "b"]})
    results = [ModelResult(label, "tiny-vi", predictions, {"format_valid_rate": rate, "items": 2.0},
                           pd.DataFrame(), pd.DataFrame()) for label, rate in (("base", 0.5), ("fine-tuned", 2 / 3))]
    evaluation = Evaluation(results, note="", metrics=Metrics())
    page = evaluation._repr_html_()
    assert "Evaluation: base vs fine-tuned" in page and "format_valid_rate" in page and "0.6667" in page
    assert "0.666666" not in page
    assert repr(evaluation) == "Evaluation(models=['base', 'fine-tuned'], items=2)"
    assert "items</th><td style=\"text-align:left\">2<" in results[0]._repr_html_()
    assert repr(results[0]) == "ModelResult(label='base', model='tiny-vi', items=2)"
