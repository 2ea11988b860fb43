"""Continued pretraining: corpus hygiene, packing, embedding learning rate, staged training, resume, saving."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from vinakit import cpt
from vinakit.errors import DataError, ParamsError
from vinakit.fidelity import max_logit_difference
from vinakit.packing import pack_documents
from vinakit.params import CPTParams
from vinakit.record import start_run
from vinakit.stages import STAGE_FILE

CORPUS_DOCS = [
    "Hà Nội là thủ đô của Việt Nam, nằm bên bờ sông Hồng.",
    "Thủy triều lên xuống hai lần mỗi ngày ở vùng biển phía nam.",
    "Hòa bình là mong ước của mọi người dân trên thế giới.",
    "Phở bò là món ăn sáng quen thuộc của người Hà Nội.",
    "Khuỷu tay bị đau sau khi chơi cầu lông quá lâu.",
    "Ruộng bậc thang ở Mù Cang Chải đẹp nhất vào mùa lúa chín.",
]


def tiny_params(tmp_path: Path, **overrides: Any) -> CPTParams:
    """CPT on the embedded tiny model, a few steps, short blocks: seconds on a CPU."""
    values = dict(model_name="tiny-vi", backend="hf", load_in_4bit=False, max_seq_length=64, output_dir=str(tmp_path),
                  run_name="cpt", val_size=0.1, num_new_tokens=30, new_token_min_count=1,
                  stages=["new_embeddings:2", "all_embeddings:2", "full:2"], rank=4, lora_alpha=8,
                  use_rslora=False, learning_rate=2e-3, embedding_learning_rate=1e-3, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=1, eval_steps=100,
                  save_steps=100, max_new_tokens=4, sample_prompts=["Hà Nội là"], warmup_ratio=0.0)
    values.update(overrides)
    return CPTParams.validate(values)


def write_corpus(path: Path, docs: list[str]) -> str:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


class Trained:
    """One CPT run through the notebook's steps, with the objects the tests look at."""

    def __init__(self, params: CPTParams, model_name: str | None = None) -> None:
        if model_name:
            params = CPTParams.validate({**params.to_dict(), "model_name": model_name})
        self.params = params
        self.run = start_run(params)
        self.corpus = cpt.load_corpus(params, self.run)
        model, tokenizer = cpt.load_model(params, self.run)
        self.base_tokenizer = tokenizer
        self.vocabulary = cpt.extend_vocabulary(params, model, tokenizer, self.corpus, self.run)
        self.packed = cpt.pack(params, self.vocabulary.model, self.vocabulary.tokenizer, self.corpus, self.run)
        self.model = cpt.prepare_for_training(params, self.vocabulary.model, self.run)
        self.initial = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.training = cpt.train_stages(params, self.model, self.vocabulary.tokenizer, self.packed, self.run,
                                         self.vocabulary.new_token_ids)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.run.read_json("metrics.json")

    def embedding(self) -> Any:
        return self.model.get_input_embeddings().weight


_RUNS: dict[tuple[str, str], Trained] = {}


def staged_run(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The three-stage run of a backend, trained once per session."""
    key = ("staged", backend)
    if key not in _RUNS:
        _RUNS[key] = Trained(tiny_params(tmp_path_factory.mktemp(f"cpt-{backend}"), backend=backend))
    return _RUNS[key]


# ------------------------------------------------------------------------------------------------ parameters


def test_stage_parameters_are_checked():
    assert CPTParams(stages=["new_embeddings:10", "all_embeddings", "full:5"], num_new_tokens=5).stage_plan == [
        ("new_embeddings", 10), ("all_embeddings", -1), ("full", 5)]
    with pytest.raises(ParamsError, match="Did you mean 'all_embeddings'"):
        CPTParams(stages=["all_embedding:10"])
    with pytest.raises(ParamsError, match="whole number of steps"):
        CPTParams(stages=["full:ten"])
    with pytest.raises(ParamsError, match="none are added"):
        CPTParams(stages=["new_embeddings:10", "full"])
    with pytest.raises(ParamsError, match="at least one"):
        CPTParams(stages=[])
    with pytest.raises(ParamsError, match="embedding_learning_rate"):
        CPTParams(embedding_learning_rate=-1e-5)
    with pytest.raises(ParamsError, match="Did you mean 'embedding_learning_rate'"):
        CPTParams.validate({"embeding_learning_rate": 1e-5})


# ------------------------------------------------------------------------------------------------ corpus


def test_corpus_is_normalised_deduplicated_and_split(tmp_path: Path):
    nfd_duplicate = unicodedata.normalize("NFD", CORPUS_DOCS[0])
    new_style_duplicate = CORPUS_DOCS[1].replace("Thủy", "Thuỷ")
    source = write_corpus(tmp_path / "corpus.txt", CORPUS_DOCS + [nfd_duplicate, new_style_duplicate, CORPUS_DOCS[2]])
    params = tiny_params(tmp_path / "runs", dataset=source, val_size=2.0, tone_style="old")
    run = start_run(params)
    corpus = cpt.load_corpus(params, run)
    assert corpus.duplicates_removed == 3
    assert len(corpus.train) == 4 and len(corpus.validation) == 2
    assert sorted(corpus.train + corpus.validation) == sorted(CORPUS_DOCS)
    manifest = run.read_json("manifest.json")
    assert manifest["corpus"]["duplicates_removed"] == 3
    assert manifest["data"]["corpus"]["validation_rows"] == 2
    assert manifest["data"]["corpus"]["skip_reasons"] == {"duplicate_document": 3}


@pytest.mark.parametrize("content,name,message", [
    (b"", "empty.txt", "file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "anh.txt", "binary file"),
    ("Hà Nội mùa thu\n".encode("cp1258", errors="replace") + b"\xec\xf0 \xd2\n", "cu.txt", "not valid UTF-8"),
    (b'{"text": 12}\n{"text": 13}\n', "so.jsonl", "must be a string"),
    (b'{"noi_dung": "Xin ch\xc3\xa0o"}\n', "cot.jsonl", "text_field"),
    (b"1 2 3\n\n4 5 6\n\n7, 8.\n", "so.txt", "no letters"),
    ("Chỉ một tài liệu về Hà Nội.\n".encode(), "mot.txt", "would leave no training documents"),
])
def test_bad_corpora_get_errors_that_name_the_fix(tmp_path: Path, content: bytes, name: str, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    params = tiny_params(tmp_path / "runs", dataset=str(path))
    with pytest.raises(DataError, match=message) as error:
        cpt.load_corpus(params, start_run(params))
    assert name in str(error.value)


# ------------------------------------------------------------------------------------------------ packing


def test_packing_ends_documents_with_eos_and_restarts_positions(tiny_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in CORPUS_DOCS]
    blocks = pack_documents(tokenizer, CORPUS_DOCS, 32, isolate=True)
    stream = [t for block, labels in zip(blocks.input_ids, blocks.labels) for t, l in zip(block, labels) if l != -100]
    assert stream == [t for ids in encoded for t in (*ids, tokenizer.eos_token_id)]
    assert all(len(block) == 32 for block in blocks.input_ids)
    assert blocks.real_tokens == sum(len(ids) + 1 for ids in encoded) == len(stream)
    # positions restart at every document start and at every block start
    flat_positions = [p for block in blocks.position_ids for p in block][:len(stream)]
    starts = {sum(len(ids) + 1 for ids in encoded[:i]) for i in range(len(encoded))}
    for index, position in enumerate(flat_positions):
        if index in starts or index % 32 == 0:
            assert position == 0
        else:
            assert position == flat_positions[index - 1] + 1
    # padding only at the end of the last block, never trained
    padded = blocks.labels[-1].count(-100)
    assert blocks.input_ids[-1][32 - padded:] == [tokenizer.pad_token_id] * padded
    assert pack_documents(tokenizer, CORPUS_DOCS, 32, isolate=False).position_ids is None


def test_packing_the_embedded_corpus_wastes_under_one_percent(tiny_dir: Path):
    from transformers import AutoTokenizer

    from vinakit.data import load_text_corpus

    documents, _ = load_text_corpus("vinakit:corpus")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    train = pack_documents(tokenizer, documents, 512, isolate=True, drop_last=True)
    assert train.nonpad_share >= 0.99 and train.dropped_tokens < 512
    padded = pack_documents(tokenizer, documents, 512, isolate=True)
    assert padded.real_tokens == train.real_tokens + train.dropped_tokens and len(padded) == len(train) + 1


def test_both_collators_count_real_tokens_the_same_way(tiny_dir: Path):
    from transformers import AutoTokenizer

    from vinakit.packing import PackedCollator
    from vinakit.train import PaddingCountingCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    blocks = pack_documents(tokenizer, CORPUS_DOCS, 32, isolate=True)
    packed = PackedCollator(isolate=True)
    batch = packed(blocks.rows())
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert (packed.real_tokens, packed.padded_tokens) == (blocks.real_tokens, 32 * len(blocks))
    assert packed.nonpad_share == pytest.approx(blocks.nonpad_share)
    padding = PaddingCountingCollator(tokenizer.pad_token_id)
    assert padding.nonpad_share is None
    padding([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert (padding.real_tokens, padding.padded_tokens, padding.nonpad_share) == (4, 6, 4 / 6)


# ------------------------------------------------------------------------------------------------ corpus split


def test_documents_and_chat_rows_share_one_seeded_split(tmp_path: Path):
    from vinakit.data import split_rows
    from vinakit.runs import load_cpt_corpus

    documents = [f"Tài liệu số {n} về lịch sử Việt Nam." for n in range(20)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents + documents[:3]), encoding="utf-8")  # three exact duplicates
    params = CPTParams(dataset=str(corpus), val_size=0.1, seed=3407)
    train, validation, report, duplicates = load_cpt_corpus(params)
    assert duplicates == 3 and report.skip_reasons["duplicate_document"] == 3
    assert (train, validation) == split_rows(documents, 0.1, 3407)
    assert len(validation) == 2 and sorted(train + validation) == sorted(documents)
    assert [documents.index(doc) for doc in validation] == sorted(documents.index(doc) for doc in validation)
    assert split_rows(documents, 3, 1) != split_rows(documents, 3, 2)


# ------------------------------------------------------------------------------------------------ completions


def test_completions_are_batched_like_one_at_a_time_and_keep_training_mode():
    from vinakit.generation import complete
    from vinakit.tiny import load_tiny

    model, tokenizer = load_tiny()
    model.train()
    model.config.use_cache = False  # as CPT leaves it during training
    prompts = ["Hà Nội là", "Sông Hồng bắt nguồn từ vùng núi", "Phở"]  # lengths differ: left padding
    batched = complete(model, tokenizer, prompts, backend="hf", max_new_tokens=6, batch_size=2)
    alone = [complete(model, tokenizer, [prompt], backend="hf", max_new_tokens=6)[0] for prompt in prompts]
    assert batched == alone and all(text.startswith(prompt) for text, prompt in zip(batched, prompts))
    assert model.training and complete(model, tokenizer, [], backend="hf") == []


# ------------------------------------------------------------------------------------------------ training


def test_stages_embedding_group_and_update_norms(backend: str, tmp_path_factory: pytest.TempPathFactory):
    trained = staged_run(backend, tmp_path_factory)
    params, stages = trained.params, trained.training.stages
    assert [s["name"] for s in stages] == ["new_embeddings", "all_embeddings", "full"]
    assert trained.packed.isolates_documents  # both backends honour per-document position ids here
    # the optimizer keeps the embeddings in their own group at their own rate
    for stage in stages:
        embedding_groups = [g for g in stage["optimizer_groups"] if g["embeddings"]]
        assert embedding_groups and all(g["lr"] == params.embedding_learning_rate for g in embedding_groups)
    body_groups = [g for g in stages[2]["optimizer_groups"] if not g["embeddings"]]
    assert body_groups and all(g["lr"] == params.learning_rate for g in body_groups)
    assert not [g for g in stages[0]["optimizer_groups"] if not g["embeddings"]]  # body frozen in stage 1
    # stage 1 moves only the new rows; the body starts moving in stage 3
    assert stages[0]["embedding_update_norm"] > 0
    assert stages[0]["old_embedding_rows_update_norm"] == 0.0
    assert stages[0]["body_update_norm"] == stages[1]["body_update_norm"] == 0.0
    assert stages[1]["old_embedding_rows_update_norm"] > 0
    assert stages[2]["body_update_norm"] > 0
    metrics = trained.metrics
    assert metrics["embedding_update_norm"] == stages[2]["embedding_update_norm"] > 0
    assert metrics["body_update_norm"] == stages[2]["body_update_norm"] > 0
    assert metrics["nonpad_token_share"] == 1.0  # the partial last training block is dropped
    for index, stage in enumerate(stages, start=1):
        folder = Path(stage["folder"])
        assert folder.name == f"{index:02d}-{stage['name']}"
        assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / STAGE_FILE).is_file()


def test_embeddings_do_not_move_at_embedding_learning_rate_zero(backend: str, tmp_path: Path):
    import torch

    trained = Trained(tiny_params(tmp_path, backend=backend, embedding_learning_rate=0.0, num_new_tokens=0,
                                  stages=["full:3"]))
    assert trained.metrics["embedding_update_norm"] == 0.0
    assert trained.metrics["body_update_norm"] > 0
    for name, param in trained.model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(param, trained.initial[name]), name


def test_tied_embeddings_are_trained_as_one_matrix_and_stay_tied(backend: str, tmp_path: Path):
    import torch

    from vinakit.tiny import load_tiny

    model, tokenizer = load_tiny()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied_folder = tmp_path / "tiny-tied"
    model.save_pretrained(tied_folder)
    tokenizer.save_pretrained(tied_folder)
    trained = Trained(tiny_params(tmp_path / "runs", backend=backend, stages=["new_embeddings:2", "full:2"]),
                      model_name=str(tied_folder))
    input_weight = trained.model.get_input_embeddings().weight
    output_weight = trained.model.get_output_embeddings().weight
    assert input_weight.data_ptr() == output_weight.data_ptr()
    assert trained.metrics["embedding_update_norm"] > 0
    assert trained.run.read_json("manifest.json")["tied_embeddings"] is True
    folder = cpt.save_model(trained.params, trained.model, trained.vocabulary.tokenizer, trained.run)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(merged.model.embed_tokens.weight, input_weight.detach(), atol=1e-6)


def test_saved_model_is_a_plain_folder_equal_to_the_trained_model(backend: str,
                                                                  tmp_path_factory: pytest.TempPathFactory):
    from vinakit import model as model_lib

    trained = staged_run(backend, tmp_path_factory)
    tokenizer = trained.vocabulary.tokenizer
    folder = cpt.save_model(trained.params, trained.model, tokenizer, trained.run)
    assert folder == trained.run.path / "model" and (trained.run.path / "adapter").is_dir()
    assert trained.metrics["merge_max_logit_diff"] < 1e-3
    loaded, loaded_tokenizer = model_lib.load_model(str(folder), backend="hf", max_seq_length=64)
    assert max_logit_difference(trained.model, loaded, tokenizer) < 1e-3
    word = trained.vocabulary.added[0]
    assert loaded_tokenizer(" " + word.word, add_special_tokens=False)["input_ids"] == [word.token_id]
    assert loaded.get_input_embeddings().weight.shape[0] == len(loaded_tokenizer)
    assert loaded_tokenizer.chat_template == trained.base_tokenizer.chat_template
    info = json.loads((folder / "vinakit_training.json").read_text(encoding="utf-8"))
    assert info["kind"] == "continued_pretraining" and info["new_tokens"] == len(trained.vocabulary.added)


def test_fertility_and_perplexity_are_recorded(tmp_path_factory: pytest.TempPathFactory):
    trained = staged_run("hf", tmp_path_factory)
    after = cpt.evaluate(trained.params, trained.model, trained.vocabulary.tokenizer, trained.corpus, trained.run,
                         "after")
    metrics = trained.metrics
    assert metrics["fertility_after"] <= metrics["fertility_before"]
    assert metrics["new_tokens_added"] == len(trained.vocabulary.added) > 0
    assert metrics["perplexity_after"] == pytest.approx(after.perplexity, rel=1e-3)
    assert 1 < after.perplexity < 10 * len(trained.vocabulary.tokenizer)
    assert after.completions[0].startswith("Hà Nội là")
    words = json.loads((trained.run.path / cpt.NEW_TOKENS_FILE).read_text(encoding="utf-8"))
    assert [w["word"] for w in words] == [t.word for t in trained.vocabulary.added]


def test_explicit_new_tokens_are_normalised_and_existing_ones_refused(tmp_path: Path):
    params = tiny_params(tmp_path, new_tokens=["thuỵ", "xoã", "khuỷu"], num_new_tokens=0, tone_style="old")
    run = start_run(params)
    corpus = cpt.load_corpus(params, run)
    model, tokenizer = cpt.load_model(params, run)
    vocabulary = cpt.extend_vocabulary(params, model, tokenizer, corpus, run)
    assert [t.word for t in vocabulary.added] == ["thụy", "xõa", "khuỷu"]
    existing = tiny_params(tmp_path, run_name="again", new_tokens=["của"], num_new_tokens=0)
    run = start_run(existing)
    model, tokenizer = cpt.load_model(existing, run)
    with pytest.raises(ParamsError, match="'của'.*already exist"):
        cpt.extend_vocabulary(existing, model, tokenizer, corpus, run)


def test_a_run_resumes_after_its_completed_stages(tmp_path: Path):
    import torch

    first = Trained(tiny_params(tmp_path, run_name="first", stages=["new_embeddings:2"]))
    resumed = Trained(tiny_params(tmp_path, run_name="second", stages=["new_embeddings:2", "full:2"],
                                  resume_from=str(first.run.path)))
    assert [s["name"] for s in resumed.training.stages] == ["new_embeddings", "full"]
    assert resumed.training.stages[0]["resumed"] is True and resumed.training.stages[1]["resumed"] is False
    assert [t.word for t in resumed.vocabulary.added] == [t.word for t in first.vocabulary.added]
    # training started from the first run's weights, not from the base model
    start = next(v for k, v in resumed.initial.items() if "embed_tokens.modules_to_save" in k)
    assert torch.equal(start, first.embedding().detach())
    assert [p.name for p in (resumed.run.path / "stages").iterdir()] == ["02-full"]
    with pytest.raises(ParamsError, match="do not start"):
        cpt.completed_stages(tiny_params(tmp_path, stages=["full:2"], resume_from=str(first.run.path)))
    with pytest.raises(ParamsError, match="already completed every stage"):
        cpt.completed_stages(tiny_params(tmp_path, stages=["new_embeddings:2"], resume_from=str(first.run.path)))


def test_full_finetuning_stages_and_saves_a_model_folder(tmp_path: Path):
    from vinakit import model as model_lib

    trained = Trained(tiny_params(tmp_path, full_finetuning=True, stages=["new_embeddings:2", "full:2"]))
    first, second = trained.training.stages
    assert first["old_embedding_rows_update_norm"] == 0.0 and first["body_update_norm"] == 0.0
    assert second["body_update_norm"] > 0 and first["embedding_update_norm"] > 0
    assert (Path(first["folder"]) / "model" / "config.json").is_file()
    folder = cpt.save_model(trained.params, trained.model, trained.vocabulary.tokenizer, trained.run)
    loaded, _ = model_lib.load_model(str(folder), backend="hf", max_seq_length=64)
    assert max_logit_difference(trained.model, loaded, trained.vocabulary.tokenizer) < 1e-4


# ------------------------------------------------------------------------------------------------ displays


def test_packing_and_vocabulary_show_tables_with_integer_counts(tiny_dir: Path):
    from transformers import AutoTokenizer

    from vinakit.packing import PackedCorpus
    from vinakit.sources import DataReport
    from vinakit.vocab import fertility_report

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    blocks = pack_documents(tokenizer, CORPUS_DOCS, 32, isolate=True)
    packed = PackedCorpus(blocks, blocks, 32, True, blocks)
    page = packed._repr_html_()
    assert f"train_tokens</th><td style=\"text-align:left\">{blocks.real_tokens}<" in page and ".0<" not in page
    assert "\n" not in repr(packed) and repr(packed).startswith("PackedCorpus(block_size=32, ")
    fertility = fertility_report(tokenizer, tokenizer, CORPUS_DOCS)
    vocabulary = cpt.VocabularyExtension(model=None, tokenizer=tokenizer, added=[], fertility=fertility)
    page = vocabulary._repr_html_()
    assert f"tokens before</th><td style=\"text-align:left\">{fertility.tokens_before}<" in page
    assert f"{fertility.before:.4g}<" in page and "new tokens</th><td style=\"text-align:left\">0<" in page
    corpus = cpt.Corpus(CORPUS_DOCS[1:], CORPUS_DOCS[:1], DataReport("corpus.txt", rows_read=len(CORPUS_DOCS),
                                                                     rows_used=len(CORPUS_DOCS)), 0)
    page = corpus._repr_html_()
    assert "validation_documents</th><td style=\"text-align:left\">1<" in page and "Data report" in page
    assert "\n" not in repr(corpus) and repr(corpus).startswith("Corpus(documents_read=")


def test_the_stage_table_shows_losses_with_four_significant_digits():
    from vinakit.stages import StagedTraining

    table = StagedTraining([{"stage": 1, "name": "full", "global_step": 50.0, "train_loss": 6.697938,
                             "eval_loss": 6.593459, "embedding_update_norm": 0.0123456}], {}).to_frame()
    assert table.loc[0, ["global_step", "train_loss", "eval_loss", "embedding_update_norm"]].tolist() == \
        [50, 6.698, 6.593, 0.01235]
    assert "50.0" not in table.to_string()
