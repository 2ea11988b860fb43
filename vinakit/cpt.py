"""The steps of ``notebooks/cpt.ipynb``: continued pretraining (CPT) on raw Vietnamese text.

Pipeline, one call per notebook cell:

1. :func:`load_corpus`: documents from a file, the embedded corpus or a hub dataset; normalised, exact
   duplicates removed, split into train/validation.
2. :func:`load_model` and :func:`evaluate` (``"before"``): validation perplexity and a few completions of the
   model as it comes.
3. :func:`extend_vocabulary`: optionally add Vietnamese words the tokenizer splits (:mod:`vinakit.vocab`);
   fertility before/after on the validation split.
4. :func:`pack`: documents end with EOS and are packed into fixed-length blocks (:mod:`vinakit.packing`); where
   the model honours per-document position ids (checked on the model itself), attention does not cross documents.
5. :func:`prepare_for_training` and :func:`train_stages`: LoRA (or full fine-tuning) with ``embed_tokens`` and
   ``lm_head`` trained in full at their own learning rate, stage by stage (``new_embeddings``,
   ``all_embeddings``, ``full``), each stage saved and resumable.
6. :func:`evaluate` (``"after"``), :func:`compare` and :func:`save_model`: a merged model folder the SFT
   notebook takes as ``model_name``.

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vinakit.errors import VinakitError
from vinakit.fidelity import text_logits
from vinakit.generation import complete
from vinakit.packing import PackedCorpus, pack_documents, packing_isolates_documents, validation_loss
from vinakit.params import CPTParams
from vinakit.record import Run, write_json
from vinakit.stages import (StagedTraining, completed_stages, embeddings_tied, load_stage_weights, plot_stage_losses,
                            quiet_embedding_save, tie_trained_embeddings, train_stages)
from vinakit.stages import embeddings_tied_in_config as _embeddings_tied_in_config

# What the notebook calls (some of it lives in the modules imported above).
__all__ = ["Corpus", "Evaluation", "PackedCorpus", "StagedTraining", "VocabularyExtension", "compare", "evaluate",
           "extend_vocabulary", "load_corpus", "load_model", "pack", "plot_stage_losses", "prepare_for_training",
           "save_model", "train_stages"]

EMBEDDING_MODULES = ["embed_tokens", "lm_head"]
NEW_TOKENS_FILE = "new_tokens.json"


# --------------------------------------------------------------------------------------------------------------
# 1. Corpus
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Raw documents split for continued pretraining.

    Attributes:
        train: training documents (normalised, deduplicated).
        validation: held-out documents: validation loss, perplexity and fertility are measured on them.
        report: the data report (file hash, rows read/used/skipped, text normalisation).
        duplicates_removed: exact duplicate documents dropped (after normalisation).
    """

    train: list[str]
    validation: list[str]
    report: Any
    duplicates_removed: int

    def summary(self) -> dict[str, Any]:
        """Counts for the manifest and the notebook."""
        return {
            "source": self.report.source,
            "documents_read": self.report.rows_read,
            "documents_skipped": self.report.rows_skipped,
            "duplicates_removed": self.duplicates_removed,
            "train_documents": len(self.train),
            "validation_documents": len(self.validation),
            "train_characters": sum(len(doc) for doc in self.train),
        }

    def _repr_html_(self) -> str:
        from vinakit.display import html_table

        return html_table(self.summary(), "Corpus") + self.report._repr_html_()

    def __repr__(self) -> str:
        from vinakit.display import one_line

        return one_line("Corpus", **{key: value for key, value in self.summary().items() if key != "source"})


def load_corpus(params: CPTParams, run: Run) -> Corpus:
    """Load, normalise, deduplicate (exact) and split the raw-text corpus; the report goes into the manifest.

    Through :func:`vinakit.runs.load_cpt_corpus`, which the export uses to re-create the validation split.

    Raises:
        DataError: a missing, empty, binary or non-UTF-8 file, rows without text, a corpus without letters, or
            too few documents to split.
    """
    from vinakit.runs import load_cpt_corpus

    train, validation, report, duplicates = load_cpt_corpus(params)
    corpus = Corpus(train, validation, report, duplicates_removed=duplicates)
    run.add_data_report("corpus", report)
    run.update_manifest(corpus=corpus.summary())
    return corpus


# --------------------------------------------------------------------------------------------------------------
# 2. Model and evaluation
# --------------------------------------------------------------------------------------------------------------


def load_model(params: CPTParams, run: Run) -> tuple[Any, Any]:
    """Load the model to continue pretraining (no adapter yet: the vocabulary may grow first).

    Raises:
        VinakitError: the model cannot be loaded, or its tokenizer has no EOS token to end documents with.
    """
    from vinakit import model as model_lib
    from vinakit.device import device_summary
    from vinakit.plan import check_before_loading

    check_before_loading(params, run)  # records the estimate (embeddings trained in full), warns if too big
    model_lib.set_trust_remote_code(params.trust_remote_code)
    model, tokenizer = model_lib.load_model(
        params.model_name, backend=params.backend, max_seq_length=params.max_seq_length,
        load_in_4bit=params.load_in_4bit, full_finetuning=params.full_finetuning, seed=params.seed)
    if params.chat_template:
        from vinakit.chat import use_chat_template

        tokenizer = use_chat_template(tokenizer, params.chat_template)  # carried to the SFT notebook
    if tokenizer.eos_token_id is None:
        raise VinakitError(f"The tokenizer of {params.model_name} has no EOS token, which CPT puts at the end of "
                           f"every document; use a model whose tokenizer defines one.")
    run.update_manifest(device=device_summary(), eos_token=tokenizer.eos_token)
    return model, tokenizer


@dataclass
class Evaluation:
    """Validation perplexity and sample completions of one model state.

    Attributes:
        label: "before" (the model as loaded) or "after" (after CPT).
        perplexity: exp(mean token loss) in this model's own tokenization.
        syllable_perplexity: exp(total loss / validation syllables): comparable across tokenizers, so across a
            vocabulary extension.
        loss_sum: summed token loss (nats).
        tokens: predicted tokens.
        syllables: syllables of the validation text.
        prompts: the sample prompts.
        completions: the model's greedy continuations of them.
    """

    label: str
    perplexity: float
    syllable_perplexity: float
    loss_sum: float
    tokens: int
    syllables: int
    prompts: list[str]
    completions: list[str]

    def metrics(self) -> dict[str, Any]:
        return {f"perplexity_{self.label}": round(self.perplexity, 4),
                f"syllable_perplexity_{self.label}": round(self.syllable_perplexity, 4),
                f"validation_tokens_{self.label}": self.tokens}

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"prompt": self.prompts, f"completion ({self.label})": self.completions})


def evaluate(params: CPTParams, model: Any, tokenizer: Any, corpus: Corpus, run: Run, label: str) -> Evaluation:
    """Perplexity on the validation split and completions of the sample prompts; logged to metrics.json.

    Args:
        label: "before" or "after" (the metric names end with it).
    """
    from vinakit.vocab import count_syllables

    blocks = pack_documents(tokenizer, corpus.validation, params.max_seq_length,
                            isolate=packing_isolates_documents(model, tokenizer))
    loss_sum, tokens = validation_loss(model, blocks, params.per_device_train_batch_size)
    syllables = sum(count_syllables(doc) for doc in corpus.validation)
    prompts = _normalized(params, params.sample_prompts)
    completions = complete(model, tokenizer, prompts, backend=params.backend, max_new_tokens=params.max_new_tokens)
    evaluation = Evaluation(label, _safe_exp(loss_sum / max(tokens, 1)), _safe_exp(loss_sum / max(syllables, 1)),
                            loss_sum, tokens, syllables, prompts, completions)
    run.log_metrics(**evaluation.metrics())
    return evaluation


def _safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else float("inf")


def _normalized(params: CPTParams, texts: list[str]) -> list[str]:
    """Prompts and words written in the parameters, normalised like the corpus."""
    if not params.normalize_text:
        return list(texts)
    from vinakit.text import normalize_vietnamese

    return [normalize_vietnamese(text, params.tone_style) for text in texts]


def compare(before: Evaluation, after: Evaluation, run: Run) -> Any:
    """Perplexity before/after as a table; the completions side by side go to ``completions.csv``.

    Returns:
        ``(perplexity table, completions table)`` as DataFrames.
    """
    import pandas as pd

    rows = [{"model": e.label, "validation tokens": e.tokens, "token perplexity": round(e.perplexity, 2),
             "syllable perplexity": round(e.syllable_perplexity, 2)} for e in (before, after)]
    completions = pd.DataFrame({"prompt": before.prompts, "before": before.completions, "after": after.completions})
    completions.to_csv(run.path / "completions.csv", index=False, encoding="utf-8-sig")
    return pd.DataFrame(rows).set_index("model"), completions


# --------------------------------------------------------------------------------------------------------------
# 3. Vocabulary
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VocabularyExtension:
    """The model and tokenizer after the (optional) vocabulary extension.

    Attributes:
        model: the model (embedding matrix grown by the new rows).
        tokenizer: the tokenizer to train and save with.
        added: the words added (:class:`vinakit.vocab.NewToken`), in id order.
        fertility: tokens per syllable on the validation split, before and after.
        proposal: the ranked proposal, when the words were proposed from the corpus.
    """

    model: Any
    tokenizer: Any
    added: list[Any]
    fertility: Any
    proposal: Any = None

    @property
    def new_token_ids(self) -> list[int]:
        return [token.token_id for token in self.added]

    def tokens_frame(self) -> Any:
        """The added words: id, the pieces they replaced, and (when proposed) count and tokens saved."""
        import pandas as pd

        details = {c.word: c for c in getattr(self.proposal, "candidates", [])}
        return pd.DataFrame([{"word": t.word, "id": t.token_id, "old pieces": len(t.old_ids),
                              "split as": " | ".join(t.old_pieces),
                              "corpus count": getattr(details.get(t.word), "count", None),
                              "tokens saved": getattr(details.get(t.word), "tokens_saved", None)}
                             for t in self.added], columns=["word", "id", "old pieces", "split as",
                                                            "corpus count", "tokens saved"])

    def _repr_html_(self) -> str:
        from vinakit.display import html_table

        return html_table({"new tokens": len(self.added), "validation texts": self.fertility.texts,
                           "syllables": self.fertility.syllables, "tokens before": self.fertility.tokens_before,
                           "tokens after": self.fertility.tokens_after,
                           "tokens per syllable before": self.fertility.before,
                           "tokens per syllable after": self.fertility.after,
                           "tokens saved": f"{self.fertility.tokens_saved_share:.1%}"}, "Vocabulary extension")

    def __repr__(self) -> str:
        return (f"{len(self.added)} new tokens; fertility on the validation split {self.fertility.before:.4f} -> "
                f"{self.fertility.after:.4f} tokens per syllable ({self.fertility.tokens_saved_share:.1%} fewer "
                f"tokens)")


def extend_vocabulary(params: CPTParams, model: Any, tokenizer: Any, corpus: Corpus, run: Run) -> VocabularyExtension:
    """Add ``new_tokens``, or the ``num_new_tokens`` best proposals from the training split, to the vocabulary.

    With neither set the vocabulary is unchanged (fertility is still reported). When resuming, the words the
    resumed run added are added again, in the same order, so ids match its saved weights. The words go to
    ``new_tokens.json``; ``fertility_before``/``fertility_after`` to metrics.json.

    Raises:
        ParamsError: a given word is not one word or already a single token.
    """
    from vinakit import vocab

    words, proposal = _words_to_add(params, tokenizer, corpus)
    model, new_tokenizer, added = vocab.extend_vocabulary(model, tokenizer, words)
    fertility = vocab.fertility_report(tokenizer, new_tokenizer, corpus.validation)
    write_json(run.path / NEW_TOKENS_FILE, [dataclasses.asdict(token) for token in added])
    run.log_metrics(fertility_before=round(fertility.before, 4), fertility_after=round(fertility.after, 4),
                    new_tokens_added=len(added), fertility=fertility.to_dict())
    return VocabularyExtension(model, new_tokenizer, added, fertility, proposal)


def _words_to_add(params: CPTParams, tokenizer: Any, corpus: Corpus) -> tuple[list[str], Any]:
    from vinakit import vocab

    if params.resume_from:
        return _resumed_words(Path(params.resume_from).expanduser()), None
    if params.new_tokens:
        return _normalized(params, params.new_tokens), None
    if params.num_new_tokens > 0:
        proposal = vocab.train_new_tokens(corpus.train, params.num_new_tokens, tokenizer,
                                          min_count=params.new_token_min_count)
        return list(proposal), proposal
    return [], None


def _resumed_words(folder: Path) -> list[str]:
    path = folder / NEW_TOKENS_FILE
    if not path.is_file():
        return []
    return [entry["word"] for entry in json.loads(path.read_text(encoding="utf-8"))]


# --------------------------------------------------------------------------------------------------------------
# 4. Packing
# --------------------------------------------------------------------------------------------------------------


def pack(params: CPTParams, model: Any, tokenizer: Any, corpus: Corpus, run: Run) -> PackedCorpus:
    """Pack both splits into ``max_seq_length`` blocks; the packing mode and non-pad share go to the manifest."""
    isolate = packing_isolates_documents(model, tokenizer)
    train = pack_documents(tokenizer, corpus.train, params.max_seq_length, isolate=isolate, drop_last=True)
    validation = pack_documents(tokenizer, corpus.validation, params.max_seq_length, isolate=isolate)
    packed = PackedCorpus(train.to_dataset(), validation.to_dataset(), params.max_seq_length, isolate, train)
    run.update_manifest(packing=packed.summary())
    return packed


# --------------------------------------------------------------------------------------------------------------
# 5. Training in stages: train_stages, StagedTraining, plot_stage_losses and completed_stages come from vinakit.stages
# --------------------------------------------------------------------------------------------------------------


def prepare_for_training(params: CPTParams, model: Any, run: Run) -> Any:
    """LoRA on the body (unless full fine-tuning) with ``embed_tokens`` and ``lm_head`` trained in full.

    Tied embeddings stay tied: the trained copies of both modules share one weight. When resuming, the weights
    of the last completed stage of ``resume_from`` are loaded.
    """
    from vinakit import model as model_lib

    tied = embeddings_tied(model)
    # embed_tokens and lm_head in most families; MPT calls its input embeddings wte
    model = model_lib.prepare_for_training(model, params, modules_to_save=model_lib.embedding_module_names(model))
    if tied:
        tie_trained_embeddings(model)
    if params.resume_from:
        load_stage_weights(model, completed_stages(params)[-1:], params)
    model.config.use_cache = False  # packed blocks need no cache (see PackedCollator)
    run.update_manifest(trainable_parameters=model_lib.trainable_parameter_summary(model), tied_embeddings=tied,
                        backend=params.backend, adapter_modules=model_lib.adapter_modules(model))
    return model


# --------------------------------------------------------------------------------------------------------------
# 6. Saving
# --------------------------------------------------------------------------------------------------------------


def save_model(params: CPTParams, model: Any, tokenizer: Any, run: Run) -> Path:
    """Save the result as a plain model folder ``<run>/model`` that the SFT notebook takes as ``model_name``.

    A LoRA run saves its adapter (``<run>/adapter``) first, then merges it onto a fresh 16-bit copy of the base
    model (never onto 4-bit weights), with the grown vocabulary and the trained embeddings, saved in the base's
    dtype. The trained model's check logits are taken before the base loads: at most two models are alive.
    """
    from vinakit.device import free_memory
    from vinakit.train import save_trained

    model.config.use_cache = True
    if params.full_finetuning:
        folder = save_trained(model, tokenizer, run, params, name="model")
    else:
        with quiet_embedding_save():
            adapter = save_trained(model, tokenizer, run, params, name="adapter")
        trained_logits = text_logits(model, tokenizer)
        folder, merged_logits = _save_merged(params, adapter, tokenizer, run)
        free_memory()  # the merged model is gone with _save_merged's frame
        run.log_metrics(merge_max_logit_diff=round(float((trained_logits - merged_logits).abs().max()), 6))
    _add_training_info(folder, run)
    return folder


def _save_merged(params: CPTParams, adapter: Path, tokenizer: Any, run: Run) -> tuple[Path, Any]:
    """Merge and save ``<run>/model``; only the folder and the merged model's check logits (CPU) leave."""
    from vinakit.train import save_trained

    merged = merge_adapter(params, adapter, tokenizer)
    return save_trained(merged, tokenizer, run, params, name="model"), text_logits(merged, tokenizer)


def merge_adapter(params: CPTParams, adapter_dir: Path, tokenizer: Any) -> Any:
    """The base model grown to the tokenizer with the CPT adapter merged in (:mod:`vinakit.merge`): merged in
    float32 on a CPU and in the base's dtype on a GPU, returned in the base's dtype."""
    from vinakit.device import merge_dtype
    from vinakit.merge import cast_model, merged_lora, saved_dtype_name

    saved = saved_dtype_name(params.model_name)
    merged = merged_lora(params.model_name, adapter_dir, tokenizer, dtype=merge_dtype(saved),
                         prepare=_tie_trained_copies, seed=params.seed)
    return cast_model(merged, saved)


def _tie_trained_copies(peft_model: Any) -> None:
    if _embeddings_tied_in_config(peft_model):
        tie_trained_embeddings(peft_model)  # as training did: one weight for embed_tokens and lm_head


def _add_training_info(folder: Path, run: Run) -> None:
    from vinakit.record import read_json
    from vinakit.runs import TRAINING_INFO_FILE

    path = folder / TRAINING_INFO_FILE
    info = read_json(path)
    metrics = run.read_json("metrics.json")
    info.update(kind="continued_pretraining", new_tokens=metrics.get("new_tokens_added", 0),
                stages=[stage.get("name") for stage in metrics.get("stages", [])])
    write_json(path, info)
