"""Preference tuning: exact pair tokenisation on every template here, the pair formats and checks, the embedded
set, and the notebook (ORPO and DPO after SFT, both backends) with eval_mcq and export taking its run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_chat import (
    CONVERSATIONS,
    MISTRAL_STYLE,
    NAMED,
    REAL,
    TRIMMING_CHATML,
    make_tokenizer,
    named,
    shared_tokenizer,
)
from test_notebooks import CPU_TINY, check_run_folder, run_cli

from vinakit.chat import ResponseTruncatedError, tokenize_preference
from vinakit.errors import DataError
from vinakit.mcq import item_metrics, parse_mcq
from vinakit.pairs import (
    MCQ_DEFECTS,
    SAMPLE_FILE,
    build_embedded_set,
    load_preference_dataset,
    naive_mismatches,
    tokenize_pairs,
)

SAMPLE_DIR = SAMPLE_FILE.parent
REJECTED = "  Tôi không biết, có lẽ là thành phố Hồ Chí Minh.\n"


def pair_cases() -> list[tuple[list[dict[str, Any]], str, str]]:
    """(prompt, chosen, rejected): every test conversation cut before its last reply."""
    cases = []
    for messages in CONVERSATIONS.values():
        cases.append((messages[:-1], messages[-1]["content"], REJECTED))
    return cases


def assert_exact(tokenizer: Any, prompt: list[dict[str, Any]], chosen: str, rejected: str) -> dict[str, list[int]]:
    """prompt + completion == the template's own ids of prompt + reply, up to and including the end-of-turn token
    (plus an appended eos when the template writes nothing after the reply); only whitespace is cut away."""
    out = tokenize_preference(tokenizer, prompt, chosen, rejected)
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        ids = out["prompt_input_ids"] + out[f"{side}_input_ids"]
        full = list(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reply}],
                                                  tokenize=True)["input_ids"])
        if ids[-1] == tokenizer.eos_token_id and ids[:-1] == full:
            continue  # the template ends with the reply: eos appended, as SFT trains it
        assert ids == full[:len(ids)], f"{side}: not the template's own tokenisation"
        assert tokenizer.decode(full[len(ids):]).strip() == "", "more than whitespace after the end-of-turn token"
        assert reply.strip() in tokenizer.decode(out[f"{side}_input_ids"])
    return out


TEMPLATES = {**{name: (lambda name=name: named(name)) for name in NAMED},
             "mistral_style": lambda: make_tokenizer(template=MISTRAL_STYLE),
             "trimming_chatml": lambda: make_tokenizer(template=TRIMMING_CHATML)}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_pairs_are_exact_on_every_kit_template(template: str) -> None:
    tokenizer = TEMPLATES[template]()
    for prompt, chosen, rejected in pair_cases():
        out = assert_exact(tokenizer, prompt, chosen, rejected)
        assert out["chosen_input_ids"] != out["rejected_input_ids"]


@pytest.mark.parametrize("family", list(REAL))
def test_pairs_are_exact_on_real_templates(family: str) -> None:
    tokenizer = shared_tokenizer(family)
    eot = REAL[family][0]
    for prompt, chosen, rejected in pair_cases():
        out = assert_exact(tokenizer, prompt, chosen, rejected)
        assert tokenizer.decode(out["chosen_input_ids"]).endswith(eot)
        if family == "qwen3":  # the empty think block the template writes before a final reply is prompt
            assert tokenizer.decode(out["prompt_input_ids"]).endswith("<think>\n\n</think>\n\n")


def test_naive_tokenisation_is_wrong_on_qwen3_and_measured() -> None:
    pairs = load_preference_dataset("vinakit:preference").train[::40]
    differ, total = naive_mismatches(shared_tokenizer("qwen3"), pairs)
    assert total == 2 * len(pairs) and differ == total  # the generation prompt alone lacks the think block


def test_truncation_cuts_the_prompt_from_the_left_and_drops_what_cannot_fit() -> None:
    tokenizer = named("chatml")
    prompt, chosen, rejected = pair_cases()[1]
    whole = tokenize_preference(tokenizer, prompt, chosen, rejected)
    longest = max(len(whole["chosen_input_ids"]), len(whole["rejected_input_ids"]))
    cut = tokenize_preference(tokenizer, prompt, chosen, rejected, max_length=longest + 5)
    assert cut["prompt_input_ids"] == whole["prompt_input_ids"][-5:]
    assert cut["chosen_input_ids"] == whole["chosen_input_ids"]
    short = tokenize_preference(tokenizer, prompt, chosen, rejected, max_prompt_length=3)
    assert short["prompt_input_ids"] == whole["prompt_input_ids"][-3:]
    with pytest.raises(ResponseTruncatedError):
        tokenize_preference(tokenizer, prompt, chosen, rejected, max_length=longest)
    pairs = [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "defect": "x"}] * 2
    assert tokenize_pairs(tokenizer, pairs, max_length=longest).summary() == {
        "pairs": 0, "dropped": {"pair longer than max_length": 2}}
    with pytest.raises(DataError, match="end with a user turn"):
        tokenize_preference(tokenizer, [*prompt, {"role": "assistant", "content": "x"}], chosen, rejected)


# --------------------------------------------------------------------------------------------------------------
# Formats and checks

GOOD_ROWS = [
    {"prompt": "Thủ đô của Việt Nam?", "chosen": "Hà Nội.", "rejected": "Hanoi."},
    {"prompt": [{"role": "system", "content": "Trả lời ngắn."}, {"role": "user", "content": "Một byte?"}],
     "chosen": [{"role": "assistant", "content": "8 bit."}], "rejected": [{"role": "assistant", "content": "10 bit."}]},
    {"chosen": [{"role": "user", "content": "Phở từ đâu?"}, {"role": "assistant", "content": "Miền Bắc."}],
     "rejected": [{"role": "user", "content": "Phở từ đâu?"}, {"role": "assistant", "content": "Nước Ý."}]},
]
BAD_ROWS = {
    "same_reply": {"prompt": "Một byte?", "chosen": "8 bit.", "rejected": " 8  bit. "},
    "prompts_differ": {"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "Có."}],
                       "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "Không."}]},
    "empty_reply": {"prompt": "Một byte?", "chosen": "8 bit.", "rejected": "\u200b "},
    "unpaired_row": {"prompt": "Một byte?", "completion": "8 bit.", "label": True},
    "missing_field": {"prompt": "Một byte?", "chosen": "8 bit."},
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_every_format_is_read_into_prompt_messages_and_reply_strings(tmp_path: Path) -> None:
    data = load_preference_dataset(str(write_jsonl(tmp_path / "p.jsonl", GOOD_ROWS)))
    assert dict(data.report.formats) == {"standard": 1, "conversational": 1, "implicit_prompt": 1}
    assert [pair["chosen"] for pair in data.train] == ["Hà Nội.", "8 bit.", "Miền Bắc."]
    assert data.train[1]["prompt"][0] == {"role": "system", "content": "Trả lời ngắn."}
    assert data.train[2]["prompt"] == [{"role": "user", "content": "Phở từ đâu?"}]


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_a_bad_pair_is_located_or_skipped_and_counted(reason: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_ROWS[0], BAD_ROWS[reason]])
    with pytest.raises(DataError, match=f"{path}.*line 2"):
        load_preference_dataset(str(path))
    data = load_preference_dataset(str(path), skip_bad_rows=True)
    assert len(data.train) == 1 and dict(data.report.skip_reasons) == {reason: 1}


def test_embedded_set_is_the_builder_output_and_each_mcq_defect_is_what_eval_measures() -> None:
    rows = [json.loads(line) for line in SAMPLE_FILE.read_text(encoding="utf-8").splitlines()]
    assert rows == build_embedded_set(SAMPLE_DIR / "mcq_tinhoc.csv", SAMPLE_DIR / "preference_chat_items.jsonl")
    assert len(rows) >= 200 and {row["defect"] for row in rows} >= set(MCQ_DEFECTS)
    for row in rows:
        if row["source"] != "mcq_tinhoc.csv":
            continue
        chosen, rejected = parse_mcq(row["chosen"]), parse_mcq(row["rejected"])
        clean, bad, defect = item_metrics(chosen, ""), item_metrics(rejected, ""), row["defect"]
        assert clean["format_valid"]
        if defect == "duplicate_options":  # a few source options are only punctuation: eval sees those as equal
            assert bad["duplicate_options"] > clean["duplicate_options"]
        elif defect == "key_in_question":
            assert bad["key_in_question"] and not clean["key_in_question"]
        elif defect == "catch_all_option":
            assert bad["catch_all_option"] and not clean["catch_all_option"]
        elif defect == "wrong_key":
            assert bad["format_valid"] and rejected.answer != chosen.answer
        elif defect == "missing_answer_line":
            assert not bad["format_valid"]
        else:
            assert not bad["format_strict"] and "Question:" in row["rejected"]


def test_orpo_nll_term_covers_the_chosen_reply_only() -> None:
    import torch

    from vinakit.preference_train import reply_nll

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)  # ORPO's chosen logits: [batch, padded length - 1, vocab]
    labels = torch.tensor([[-100, -100, -100, 3, 4], [-100, 7, 8, 9, -100]])  # collator's: shorter than the batch
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = [-log_probs[row, position - 1, labels[row, position]] for row in range(2) for position in range(1, 5)
              if labels[row, position] >= 0]
    assert torch.allclose(reply_nll(logits, labels), torch.stack(picked).mean())


# --------------------------------------------------------------------------------------------------------------
# The notebook, after one SFT run (the session's), and the notebooks that take its run

# ORPO from the base model with the preset (tests/test_notebooks.py runs it on top of the SFT run); DPO continues
# the session's SFT run, a few steps. After SFT the clean MCQs are already the likelier replies (ORPO's reward
# accuracy starts near 0.9 there), so the rise is measured where it can show: ORPO from the base, DPO (0 before).
RUNS = {"orpo": [], "dpo": ["-p", "max_steps", "12", "-p", "learning_rate", "5e-4"]}


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory: pytest.TempPathFactory, sft_run: Path) -> dict[str, Any]:
    """Runs the notebook once per (method, backend) on demand; the folders are shared by the tests below."""
    out, made = tmp_path_factory.mktemp("preference"), {}

    def run(method: str, backend: str) -> Path:
        name = f"{method}-{backend}"
        if name not in made:
            adapter = ["-p", "adapter", str(sft_run)] if method == "dpo" else []
            result = run_cli("run", "preference", "-f", str(CPU_TINY), "-p", "output_dir", str(out), "-p",
                             "run_name", name, "-p", "method", method, "-p", "backend", backend, *adapter,
                             *RUNS[method], "--no-progress")
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
            made[name] = out / name
        return made[name]

    return {"run": run, "out": out}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RUNS))
def test_preference_notebook_raises_reward_accuracy(method: str, backend: str, preference_runs: dict[str, Any],
                                                    sft_run: Path) -> None:
    run = preference_runs["run"](method, backend)
    manifest = check_run_folder(run, "preference")
    for name in ("loss.png", "rewards.png", "pairs_preview.csv", "samples.csv", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / "adapter" / "ref").exists()  # DPO's frozen reference copy is not the result
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["method"] == method and metrics["global_step"] == (12 if method == "dpo" else 30)
    assert metrics["rewards_accuracy"] > max(0.5, metrics["rewards_accuracy_before"])
    assert metrics["rewards_margin"] > metrics["rewards_margin_before"]
    if method == "dpo":
        assert manifest["continued_from"] == str(sft_run.resolve())
        # the pairs built from the SFT run's validation prompts were left out (eval_mcq holds them out)
        assert manifest["data"]["train"]["skip_reasons"]["held_out_by_sft_run"] > 0


@pytest.mark.slow
def test_eval_and_export_take_a_preference_run(preference_runs: dict[str, Any], sft_run: Path) -> None:
    run, out = preference_runs["run"]("dpo", "hf"), preference_runs["out"]
    evaluated = run_cli("run", "eval_mcq", "-f", str(CPU_TINY), "-p", "output_dir", str(out), "-p", "run_name",
                        "eval", "-p", "adapter", str(run), "-p", "max_items", "4", "-p", "compare_base", "false",
                        "-p", "vmlu_max_items", "2", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-5000:]
    manifest = json.loads((out / "eval" / "manifest.json").read_text(encoding="utf-8"))
    # the SFT run's held-out rows, re-created through the preference run (29 of the 290 embedded MCQs)
    assert "held out: the 29 of 290 rows" in json.dumps(manifest, ensure_ascii=False)
    exported = run_cli("run", "export", "-f", str(CPU_TINY), "-p", "output_dir", str(out), "-p", "run_name",
                       "export", "-p", "adapter", str(run), "-p", "save_methods", "[lora]", "--no-progress")
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-5000:]
    assert (out / "export" / "adapter" / "adapter_config.json").is_file()
    fidelity = json.loads((out / "export" / "manifest.json").read_text(encoding="utf-8"))
    assert f"validation split of {run.name}" in json.dumps(fidelity, ensure_ascii=False)
