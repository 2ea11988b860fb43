"""The steps of ``notebooks/cpt.ipynb``: continued pretraining (CPT) on raw Vietnamese text.

Pipeline, one call per notebook cell:

1. :func:`load_corpus`: documents from a file, the embedded corpus or a hub dataset; normalised, exact
   duplicates removed, split into train/validation.
2. :func:`load_model` and :func:`evaluate` (``"before"``): validation perplexity and a few completions of the
   model as it comes.
3. :func:`extend_vocabulary`: optionally add Vietnamese words the tokenizer splits (:mod:`vinakit.vocab`);
   fertility before/after on the validation split.
4. :func:`pack`: documents end with EOS and are packed into fixed-length blocks; where the model honours
   per-document position ids (checked on the model itself), attention does not cross documents.
5. :func:`prepare_for_training` and :func:`train_stages`: LoRA (or full fine-tuning) with ``embed_tokens`` and
   ``lm_head`` trained in full at their own learning rate, stage by stage (``new_embeddings``,
   ``all_embeddings``, ``full``), each stage saved and resumable.
6. :func:`evaluate` (``"after"``), :func:`compare` and :func:`save_model`: a merged model folder the SFT
   notebook takes as ``model_name``.

Nothing heavy is imported at module level (Unsloth must be imported before transformers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vinakit.errors import DataError, ParamsError, VinakitError
from vinakit.params import CPTParams
from vinakit.record import Run, write_json

EMBEDDING_MODULES = ["embed_tokens", "lm_head"]
NEW_TOKENS_FILE = "new_tokens.json"
STAGE_FILE = "stage.json"
STAGES_DIR = "stages"
_LETTER_CHECK_CHARS = 100_000


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

    def __repr__(self) -> str:
        return "\n".join(f"{name}: {value}" for name, value in self.summary().items())


def load_corpus(params: CPTParams, run: Run) -> Corpus:
    """Load, normalise, deduplicate (exact) and split the raw-text corpus; the report goes into the manifest.

    Raises:
        DataError: a missing, empty, binary or non-UTF-8 file, rows without text, a corpus without letters, or
            too few documents to split.
    """
    from vinakit.data import load_text_corpus

    documents, report = load_text_corpus(params.dataset, text_field=params.text_field,
                                         normalize=params.normalize_text, tone_style=params.tone_style,
                                         skip_bad_rows=params.skip_bad_rows)
    _check_has_letters(documents, params.dataset)
    unique = list(dict.fromkeys(documents))
    if len(unique) < len(documents):  # counted in the manifest like any other skipped row
        report.skip_reasons["duplicate_document"] += len(documents) - len(unique)
        report.rows_used = len(unique)
    train, validation = split_documents(unique, params.val_split, params.seed, params.dataset)
    report.split = f"val_size={params.val_size} seed={params.seed}"
    report.train_rows, report.validation_rows = len(train), len(validation)
    corpus = Corpus(train, validation, report, duplicates_removed=len(documents) - len(unique))
    run.add_data_report("corpus", report)
    run.update_manifest(corpus=corpus.summary())
    return corpus


def _check_has_letters(documents: list[str], source: str) -> None:
    sample = "".join(documents)[:_LETTER_CHECK_CHARS]
    if not any(character.isalpha() for character in sample):
        raise DataError("the corpus holds no letters, so it is not text to pretrain on; check the file and "
                        "text_field", path=source)


def split_documents(documents: list[str], val_size: float | int, seed: int,
                    source: str = "") -> tuple[list[str], list[str]]:
    """Split documents into train and validation (a seeded sample, file order kept in both).

    Args:
        documents: the documents.
        val_size: a fraction in (0, 0.5] or a document count >= 1.
        seed: seed of the sample.
        source: named in errors.

    Returns:
        ``(train, validation)``, both non-empty.

    Raises:
        DataError: fewer than two documents, or a validation size that leaves no training document.
    """
    count = int(val_size) if val_size >= 1 else max(1, round(len(documents) * val_size))
    if len(documents) < 2 or count >= len(documents):
        raise DataError(f"{len(documents)} document(s) cannot give {count} validation document(s) and at least "
                        f"one training document; add documents (separate .txt documents with a blank line) or "
                        f"lower val_size", path=source or None)
    chosen = set(random.Random(seed).sample(range(len(documents)), count))
    train = [doc for index, doc in enumerate(documents) if index not in chosen]
    validation = [doc for index, doc in enumerate(documents) if index in chosen]
    return train, validation


# --------------------------------------------------------------------------------------------------------------
# 2. Model and evaluation
# --------------------------------------------------------------------------------------------------------------


def load_model(params: CPTParams, run: Run) -> tuple[Any, Any]:
    """Load the model to continue pretraining (no adapter yet: the vocabulary may grow first).

    Raises:
        VinakitError: the model cannot be loaded, or its tokenizer has no EOS token to end documents with.
    """
    from vinakit import model as model_lib

    model, tokenizer = model_lib.load_model(
        params.model_name, backend=params.backend, max_seq_length=params.max_seq_length,
        load_in_4bit=params.load_in_4bit, full_finetuning=params.full_finetuning, seed=params.seed)
    if params.chat_template:
        from vinakit.chat import use_chat_template

        tokenizer = use_chat_template(tokenizer, params.chat_template)  # carried to the SFT notebook
    if tokenizer.eos_token_id is None:
        raise VinakitError(f"The tokenizer of {params.model_name} has no EOS token, which CPT puts at the end of "
                           f"every document; use a model whose tokenizer defines one.")
    run.update_manifest(device=model_lib.device_summary(), eos_token=tokenizer.eos_token)
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
    prompts = _normalized_prompts(params)
    completions = complete(model, tokenizer, prompts, backend=params.backend, max_new_tokens=params.max_new_tokens)
    evaluation = Evaluation(label, _safe_exp(loss_sum / max(tokens, 1)), _safe_exp(loss_sum / max(syllables, 1)),
                            loss_sum, tokens, syllables, prompts, completions)
    run.log_metrics(**evaluation.metrics())
    return evaluation


def _safe_exp(value: float) -> float:
    return math.exp(value) if value < 700 else float("inf")


def _normalized_prompts(params: CPTParams) -> list[str]:
    if not params.normalize_text:
        return list(params.sample_prompts)
    from vinakit.text import normalize_vietnamese

    return [normalize_vietnamese(prompt, params.tone_style) for prompt in params.sample_prompts]


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


def validation_loss(model: Any, blocks: "PackedBlocks", batch_size: int) -> tuple[float, int]:
    """Summed next-token loss (nats) and the number of predicted tokens over packed blocks."""
    import torch

    collator = PackedCollator(isolate=blocks.position_ids is not None)
    loss_sum, tokens = 0.0, 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = _to_device(collator(blocks.rows(start, start + batch_size)), model)
            predicted = int((batch["labels"][:, 1:] != -100).sum())
            if predicted == 0:
                continue
            output = model(**batch)
            loss_sum += float(output.loss) * predicted  # the loss is the mean over predicted tokens
            tokens += predicted
    return loss_sum, tokens


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _to_device(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}


def complete(model: Any, tokenizer: Any, prompts: Sequence[str], *, backend: str,
             max_new_tokens: int = 48) -> list[str]:
    """Greedy raw-text continuations (no chat template: CPT teaches text, not turns), batched, left-padded."""
    import torch

    from vinakit import model as model_lib

    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    with _generation_mode(model, backend, model_lib), torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, use_cache=True)
    texts = []
    for prompt, row in zip(prompts, output[:, width:].tolist()):
        cut = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        texts.append(prompt + tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


@contextlib.contextmanager
def _generation_mode(model: Any, backend: str, model_lib: Any) -> Iterator[None]:
    """Unsloth's fast inference path while generating, back to training mode afterwards."""
    was_training = model.training
    model_lib.prepare_for_inference(model, backend=backend)
    try:
        yield
    finally:
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            FastLanguageModel.for_training(model)
        model.train(was_training)


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
        return _normalized_words(params), None
    if params.num_new_tokens > 0:
        proposal = vocab.train_new_tokens(corpus.train, params.num_new_tokens, tokenizer,
                                          min_count=params.new_token_min_count)
        return list(proposal), proposal
    return [], None


def _normalized_words(params: CPTParams) -> list[str]:
    if not params.normalize_text:
        return list(params.new_tokens)
    from vinakit.text import normalize_vietnamese

    return [normalize_vietnamese(word, params.tone_style) for word in params.new_tokens]


def _resumed_words(folder: Path) -> list[str]:
    path = folder / NEW_TOKENS_FILE
    if not path.is_file():
        return []
    return [entry["word"] for entry in json.loads(path.read_text(encoding="utf-8"))]


# --------------------------------------------------------------------------------------------------------------
# 4. Packing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PackedBlocks:
    """Fixed-length blocks of concatenated documents (each ending with EOS).

    Attributes:
        input_ids: one list of ``block_size`` ids per block (the last block padded).
        labels: the same ids, -100 on padding.
        position_ids: per-block positions restarting at 0 at each document start, or None for plain
            concatenation (positions 0..block_size-1, attention may cross documents).
        real_tokens: tokens that are not padding.
        documents: documents packed.
        dropped_tokens: tokens of a partial last block left out (``drop_last``).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None
    real_tokens: int
    documents: int
    dropped_tokens: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def nonpad_share(self) -> float:
        total = sum(len(block) for block in self.input_ids)
        return self.real_tokens / total if total else 0.0

    def rows(self, start: int = 0, stop: int | None = None) -> list[dict[str, list[int]]]:
        stop = len(self) if stop is None else min(stop, len(self))
        rows = []
        for index in range(start, stop):
            row = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
            if self.position_ids is not None:
                row["position_ids"] = self.position_ids[index]
            rows.append(row)
        return rows

    def to_dataset(self) -> Any:
        from datasets import Dataset

        columns = {"input_ids": self.input_ids, "labels": self.labels,
                   "length": [len(block) for block in self.input_ids]}
        if self.position_ids is not None:
            columns["position_ids"] = self.position_ids
        return Dataset.from_dict(columns)


def pack_documents(tokenizer: Any, documents: Sequence[str], block_size: int, *, isolate: bool,
                   drop_last: bool = False) -> PackedBlocks:
    """Tokenise documents, end each with EOS, and cut the stream into blocks of ``block_size`` tokens.

    A document longer than a block continues in the next one (its positions restart there). The last, partial
    block is padded (pad tokens get label -100), or dropped with ``drop_last`` when there is a full block.

    Args:
        tokenizer: the tokenizer (its EOS ends every document).
        documents: the texts.
        block_size: tokens per block (the training sequence length).
        isolate: give per-document position ids (the model then keeps attention inside each document).
        drop_last: drop a partial last block instead of padding it (training: no padding at all).

    Returns:
        The blocks.
    """
    if block_size < 2:
        raise ParamsError(f"block_size must be >= 2, got {block_size}.")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # verbose=False: documents longer than model_max_length are expected here (they are cut into blocks)
    encoded = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"] if documents else []
    stream = [token for ids in encoded for token in (*ids, eos)]
    positions = [position for ids in encoded for position in range(len(ids) + 1)]
    input_ids, labels, position_ids = [], [], []
    for start in range(0, len(stream), block_size):
        block = stream[start:start + block_size]
        padding = block_size - len(block)
        input_ids.append(block + [pad] * padding)
        labels.append(block + [-100] * padding)
        position_ids.append(_block_positions(positions[start:start + block_size], padding))
    dropped = 0
    if drop_last and len(input_ids) > 1 and len(stream) % block_size:
        dropped = len(stream) % block_size
        del input_ids[-1], labels[-1], position_ids[-1]
    return PackedBlocks(input_ids, labels, position_ids if isolate else None, len(stream) - dropped, len(encoded),
                        dropped)


def _block_positions(positions: list[int], padding: int) -> list[int]:
    """Positions of one block: a document continued from the previous block restarts at 0."""
    offset = positions[0] if positions else 0
    block = []
    for position in positions:
        if position == 0:
            offset = 0
        block.append(position - offset)
    return block + list(range(padding))


class PackedCollator:
    """Stacks packed blocks into a batch without an attention mask.

    transformers builds a block-diagonal causal mask from position ids that restart (``find_packed_sequence_
    indices``) only when no attention mask is given and no cache is in use, hence ``use_cache=False``.
    Counts real and padded tokens like :class:`vinakit.train.PaddingCountingCollator`.
    """

    def __init__(self, isolate: bool) -> None:
        self.isolate = isolate
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = {
            "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
            "use_cache": False,
        }
        if self.isolate:
            batch["position_ids"] = torch.tensor([e["position_ids"] for e in examples], dtype=torch.long)
        self.real_tokens += int((batch["labels"] != -100).sum())
        self.padded_tokens += int(batch["labels"].numel())
        return batch

    @property
    def nonpad_share(self) -> float | None:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else None


def packing_isolates_documents(model: Any, tokenizer: Any) -> bool:
    """Whether this model keeps attention inside each document when position ids restart.

    Checked, not assumed: the logits of a second document packed after a first one must equal its logits
    alone (and must differ when the documents are plainly concatenated, so the check can tell).
    """
    import torch

    first = tokenizer("Hà Nội là thủ đô của Việt Nam.", add_special_tokens=False)["input_ids"]
    second = tokenizer("Sông Hồng chảy qua nhiều tỉnh phía bắc.", add_special_tokens=False)["input_ids"]
    first, second = first + [tokenizer.eos_token_id], second + [tokenizer.eos_token_id]
    device = next(model.parameters()).device
    packed = torch.tensor([first + second], device=device)
    reset = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    with _eval_mode(model), torch.no_grad():
        alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0].float()
        isolated = model(input_ids=packed, position_ids=reset, use_cache=False).logits[0, len(first):].float()
        plain = model(input_ids=packed, use_cache=False).logits[0, len(first):].float()
    leak = (plain - alone).abs().max().item()
    error = (isolated - alone).abs().max().item()
    return leak > 0 and error < 0.1 * leak


@dataclass
class PackedCorpus:
    """The packed train/validation splits ready for the trainer."""

    train: Any  # datasets.Dataset
    validation: Any
    block_size: int
    isolates_documents: bool
    train_blocks: PackedBlocks

    def summary(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "train_blocks": len(self.train),
            "validation_blocks": len(self.validation),
            "train_tokens": self.train_blocks.real_tokens,
            "train_tokens_dropped_at_end": self.train_blocks.dropped_tokens,
            "nonpad_token_share": round(self.train_blocks.nonpad_share, 4),
            "packing": ("blocks of whole documents with position ids restarting per document: attention stays "
                        "inside each document" if self.isolates_documents else
                        "plain concatenation with EOS separators: this backend ignores per-document position "
                        "ids, so attention can cross document boundaries inside a block"),
        }

    def __repr__(self) -> str:
        return "\n".join(f"{name}: {value}" for name, value in self.summary().items())


def pack(params: CPTParams, model: Any, tokenizer: Any, corpus: Corpus, run: Run) -> PackedCorpus:
    """Pack both splits into ``max_seq_length`` blocks; the packing mode and non-pad share go to the manifest."""
    isolate = packing_isolates_documents(model, tokenizer)
    train = pack_documents(tokenizer, corpus.train, params.max_seq_length, isolate=isolate, drop_last=True)
    validation = pack_documents(tokenizer, corpus.validation, params.max_seq_length, isolate=isolate)
    packed = PackedCorpus(train.to_dataset(), validation.to_dataset(), params.max_seq_length, isolate, train)
    run.update_manifest(packing=packed.summary())
    return packed


# --------------------------------------------------------------------------------------------------------------
# 5. Training in stages
# --------------------------------------------------------------------------------------------------------------


def prepare_for_training(params: CPTParams, model: Any, run: Run) -> Any:
    """LoRA on the body (unless full fine-tuning) with ``embed_tokens`` and ``lm_head`` trained in full.

    Tied embeddings stay tied: the trained copies of both modules share one weight. When resuming, the weights
    of the last completed stage of ``resume_from`` are loaded.
    """
    from vinakit import model as model_lib

    tied = _embeddings_tied(model)
    model = model_lib.prepare_for_training(model, params, modules_to_save=EMBEDDING_MODULES)
    if tied:
        tie_trained_embeddings(model)
    if params.resume_from:
        _load_stage_weights(model, completed_stages(params)[-1:], params)
    model.config.use_cache = False  # packed blocks need no cache (see PackedCollator)
    run.update_manifest(trainable_parameters=model_lib.trainable_parameter_summary(model), tied_embeddings=tied)
    return model


def _embeddings_tied(model: Any) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def tie_trained_embeddings(model: Any) -> None:
    """Make the trained copies of ``embed_tokens`` and ``lm_head`` share one weight (a tied model stays tied).

    PEFT's ``modules_to_save`` copies each module separately, which silently unties them: the output head would
    then be trained (or merged) apart from the input embeddings.
    """
    input_copy = _trained_copy(model.get_input_embeddings())
    output_copy = _trained_copy(model.get_output_embeddings())
    if input_copy is not None and output_copy is not None:
        output_copy.weight = input_copy.weight


def _trained_copy(module: Any) -> Any | None:
    copies = getattr(module, "modules_to_save", None)
    if copies is None or not len(copies):
        return None
    return copies[next(iter(copies.keys()))]


@dataclass
class StagedTraining:
    """What :func:`train_stages` did.

    Attributes:
        stages: one dict per stage: name, steps, train/eval loss history, update norms after it, folder.
        metrics: the run's metrics.json content after training.
    """

    stages: list[dict[str, Any]]
    metrics: Any

    def to_frame(self) -> Any:
        import pandas as pd

        keys = ("stage", "name", "global_step", "train_loss", "eval_loss", "embedding_update_norm",
                "old_embedding_rows_update_norm", "body_update_norm", "resumed")
        return pd.DataFrame([{key: stage.get(key) for key in keys} for stage in self.stages])


def train_stages(params: CPTParams, model: Any, tokenizer: Any, packed: PackedCorpus, run: Run,
                 new_token_ids: Sequence[int] = ()) -> StagedTraining:
    """Run the stages of ``params.stages`` in order; each stage's weights are saved under ``stages/``.

    ``embedding_update_norm`` and ``body_update_norm`` in metrics.json are L2 norms of the change of the
    embedding matrices and of every other trained weight over this run.
    """
    from vinakit.train import embedding_parameter_ids

    embeddings, body = _split_trainable(model, embedding_parameter_ids)
    start = _Snapshot(embeddings, body)
    completed = completed_stages(params) if params.resume_from else []
    stages = [_resumed_record(folder, index) for index, folder in enumerate(completed, start=1)]
    for index, (name, steps) in enumerate(params.stage_plan, start=1):
        if index <= len(completed):
            continue
        record = _train_one_stage(params, model, tokenizer, packed, run, index, name, steps,
                                  embeddings, body, new_token_ids)
        record.update(start.norms(embeddings, body, new_token_ids))
        _save_stage(params, model, tokenizer, run, index, name, record)
        stages.append(record)
    _set_trainable(embeddings, True)
    _set_trainable(body, True)
    metrics = run.log_metrics(**start.norms(embeddings, body, new_token_ids), **_summary_metrics(stages, packed))
    return StagedTraining(stages, metrics)


def _split_trainable(model: Any, embedding_parameter_ids: Any) -> tuple[list[Any], list[Any]]:
    embed_ids = embedding_parameter_ids(model)
    trainable = [param for param in model.parameters() if param.requires_grad]
    embeddings = [param for param in trainable if id(param) in embed_ids]
    body = [param for param in trainable if id(param) not in embed_ids]
    if not embeddings:
        raise VinakitError("No trainable embedding weights found: CPT trains embed_tokens and lm_head as "
                           "modules_to_save; check that the model has modules named embed_tokens and lm_head.")
    return embeddings, body


def _set_trainable(params: list[Any], trainable: bool) -> None:
    for param in params:
        param.requires_grad_(trainable)


class _Snapshot:
    """A CPU copy of the trained weights at the start of the run, to measure how far they moved."""

    def __init__(self, embeddings: list[Any], body: list[Any]) -> None:
        self.embeddings = [param.detach().to("cpu", copy=True) for param in embeddings]
        self.body = [param.detach().to("cpu", copy=True) for param in body]

    def norms(self, embeddings: list[Any], body: list[Any], new_token_ids: Sequence[int]) -> dict[str, float]:
        old_rows = _old_rows_mask(self.embeddings, new_token_ids)
        return {
            "embedding_update_norm": _change_norm(self.embeddings, embeddings),
            "old_embedding_rows_update_norm": _change_norm(self.embeddings, embeddings, old_rows),
            "body_update_norm": _change_norm(self.body, body),
        }


def _old_rows_mask(snapshots: list[Any], new_token_ids: Sequence[int]) -> list[Any]:
    import torch

    masks = []
    for snapshot in snapshots:
        mask = torch.ones(snapshot.shape[0], dtype=torch.bool)
        if new_token_ids:
            mask[torch.tensor(list(new_token_ids))] = False
        masks.append(mask)
    return masks


def _change_norm(before: list[Any], after: list[Any], row_masks: list[Any] | None = None) -> float:
    total = 0.0
    for index, (old, param) in enumerate(zip(before, after)):
        change = param.detach().to("cpu").float() - old.float()
        if row_masks is not None:
            change = change[row_masks[index]]
        total += float(change.pow(2).sum())
    return math.sqrt(total)


def _train_one_stage(params: CPTParams, model: Any, tokenizer: Any, packed: PackedCorpus, run: Run, index: int,
                     name: str, steps: int, embeddings: list[Any], body: list[Any],
                     new_token_ids: Sequence[int]) -> dict[str, Any]:
    from vinakit.train import build_trainer, run_training

    _set_trainable(embeddings, True)
    _set_trainable(body, name == "full")
    hooks = _only_new_rows(embeddings, new_token_ids) if name == "new_embeddings" else []
    stage_run = _stage_run(run, index, name)
    stage_params = _stage_params(params, index, name, steps)
    try:
        trainer = build_trainer(model, tokenizer, packed.train, packed.validation, stage_params, stage_run,
                                embedding_learning_rate=params.embedding_learning_rate)
        trainer.data_collator = trainer.vinakit_collator = PackedCollator(packed.isolates_documents)
        metrics = run_training(trainer, stage_params, stage_run)
        # The trainer wrapped model.forward (mixed-precision autocast); later stages, evaluation and the merge
        # check must see the model's own forward.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {"stage": index, "name": name, "folder": str(stage_run.path), "resumed": False,
            "optimizer_groups": _optimizer_groups(trainer), **dict(metrics)}


def _only_new_rows(embeddings: list[Any], new_token_ids: Sequence[int]) -> list[Any]:
    """Gradient hooks that zero every row but the new tokens' (the new_embeddings stage)."""
    import torch

    if not new_token_ids:
        raise VinakitError("Stage new_embeddings needs added tokens, but the vocabulary extension added none.")
    hooks = []
    for param in embeddings:
        mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
        mask[torch.tensor(list(new_token_ids), device=param.device)] = 1
        hooks.append(param.register_hook(lambda grad, mask=mask: grad * mask))
    return hooks


def _stage_run(run: Run, index: int, name: str) -> Run:
    folder = run.path / STAGES_DIR / f"{index:02d}-{name}"
    if folder.exists():
        raise VinakitError(f"{folder} exists: this run already trained stage {index} ({name}) and runs are never "
                           f"overwritten. Start a new run, with resume_from: {run.path} to continue after it.")
    folder.mkdir(parents=True)
    return Run(path=folder, notebook=run.notebook)


def _stage_params(params: CPTParams, index: int, name: str, steps: int) -> CPTParams:
    """The parameters one stage trains with (its step budget; its own checkpoint to resume from)."""
    changes: dict[str, Any] = {"resume_from": _partial_stage_folder(params, index, name), "group_by_length": False}
    if steps > 0:
        changes["max_steps"] = steps
    if name == "new_embeddings":
        changes["weight_decay"] = 0.0  # decay would shrink the frozen rows, which get no gradient but do get decay
    return dataclasses.replace(params, **changes)


def _partial_stage_folder(params: CPTParams, index: int, name: str) -> str:
    """The resumed run's folder of this stage when it stopped mid-way with a checkpoint, else ""."""
    if not params.resume_from:
        return ""
    folder = Path(params.resume_from).expanduser() / STAGES_DIR / f"{index:02d}-{name}"
    has_checkpoint = any((folder / "checkpoints").glob("checkpoint-*"))
    return str(folder) if has_checkpoint and not (folder / STAGE_FILE).is_file() else ""


def _optimizer_groups(trainer: Any) -> list[dict[str, Any]]:
    """Learning rate and size of each optimizer parameter group (the embedding group must be there)."""
    from vinakit.train import embedding_parameter_ids

    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return []
    embed_ids = embedding_parameter_ids(trainer.model)
    groups = []
    for group in optimizer.param_groups:
        groups.append({"lr": group.get("initial_lr", group["lr"]), "weight_decay": group.get("weight_decay"),
                       "parameters": len(group["params"]),
                       "embeddings": all(id(p) in embed_ids for p in group["params"]) and bool(group["params"])})
    return groups


def _save_stage(params: CPTParams, model: Any, tokenizer: Any, run: Run, index: int, name: str,
                record: dict[str, Any]) -> None:
    from vinakit.train import save_trained

    stage_run = Run(path=Path(record["folder"]), notebook=run.notebook)
    with _quiet_embedding_save():
        save_trained(model, tokenizer, stage_run, params, name="model" if params.full_finetuning else "adapter")
    write_json(stage_run.path / STAGE_FILE, {"stage": index, "name": name, "status": "completed", **record})


def completed_stages(params: CPTParams) -> list[Path]:
    """Folders of the stages the run ``resume_from`` completed, in order.

    Raises:
        VinakitError: ``resume_from`` is not a CPT run folder.
        ParamsError: its completed stages are not the first stages of ``params.stages``, or it completed all.
    """
    root = Path(params.resume_from).expanduser()
    if not (root / STAGES_DIR).is_dir():
        raise VinakitError(f"resume_from={params.resume_from}: no {STAGES_DIR}/ folder there; give the folder of "
                           f"a CPT run.")
    done = sorted(p for p in (root / STAGES_DIR).iterdir() if (p / STAGE_FILE).is_file())
    names = [json.loads((p / STAGE_FILE).read_text(encoding="utf-8"))["name"] for p in done]
    planned = [name for name, _ in params.stage_plan]
    if names != planned[:len(names)]:
        raise ParamsError(f"resume_from={params.resume_from} completed the stages {names}, which do not start "
                          f"stages {planned}; resume with the same stages.")
    if len(names) == len(planned):
        raise ParamsError(f"resume_from={params.resume_from} already completed every stage in {planned}; add a "
                          f"stage to continue training.")
    return done


def _resumed_record(folder: Path, index: int) -> dict[str, Any]:
    record = json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))
    record.update(stage=index, resumed=True)
    return record


def _load_stage_weights(model: Any, folders: list[Path], params: CPTParams) -> None:
    """Load the trained weights a completed stage saved (adapter, or the full model) into ``model``."""
    if not folders:
        return
    from safetensors.torch import load_file

    saved = folders[0] / ("model" if params.full_finetuning else "adapter")
    files = sorted(saved.glob("*.safetensors"))
    if not files:
        raise VinakitError(f"resume_from: no weights (*.safetensors) in {saved}.")
    state = {key: value for file in files for key, value in load_file(str(file)).items()}
    if params.full_finetuning:
        result = model.load_state_dict(state, strict=False)
        misfits = list(result.unexpected_keys)
    else:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        # PEFT also saves the base embedding layers of a resized vocabulary (original_module ...): not needed here.
        misfits = [k for k in result.unexpected_keys if ".original_module." not in k and ".modules_to_save." not in k]
        misfits += [k for k in result.missing_keys if "lora_" in k or ".modules_to_save." in k]
    if misfits:
        raise VinakitError(f"resume_from: the weights in {saved} do not fit this model (e.g. {misfits[:3]}); "
                           f"resume with the same model_name, rank and target_modules.")
    if _trained_copy(model.get_input_embeddings()) is not None and _embeddings_tied_in_config(model):
        tie_trained_embeddings(model)


def _embeddings_tied_in_config(model: Any) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _summary_metrics(stages: list[dict[str, Any]], packed: PackedCorpus) -> dict[str, Any]:
    last = stages[-1] if stages else {}
    return {
        "stages": [{key: value for key, value in stage.items() if key != "optimizer_groups"} for stage in stages],
        "train_loss": last.get("train_loss"),
        "eval_loss": last.get("eval_loss"),
        # of the training blocks (the trainer's own count mixes in the padded validation blocks)
        "nonpad_token_share": round(packed.train_blocks.nonpad_share, 4),
        "global_step": sum(int(stage.get("global_step") or 0) for stage in stages),
    }


def plot_stage_losses(training: StagedTraining, title: str = "CPT loss") -> Any:
    """Train and validation loss of every stage on one step axis, stage boundaries marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for stage in training.stages:
        steps = [offset + s for s in stage.get("train_loss_steps", [])]
        ax.plot(steps, stage.get("train_loss_history", []), label=f"{stage['name']} train")
        if stage.get("eval_loss_history"):
            ax.plot([offset + s for s in stage["eval_loss_steps"]], stage["eval_loss_history"], "o--",
                    label=f"{stage['name']} validation")
        offset += int(stage.get("global_step") or 0)
        ax.axvline(offset, color="grey", alpha=0.3)
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------------------------
# 6. Saving
# --------------------------------------------------------------------------------------------------------------


def save_model(params: CPTParams, model: Any, tokenizer: Any, run: Run) -> Path:
    """Save the result as a plain model folder ``<run>/model`` that the SFT notebook takes as ``model_name``.

    A LoRA run saves its adapter (``<run>/adapter``) first, then merges it onto a fresh 16-bit copy of the base
    model (never onto 4-bit weights), with the grown vocabulary and the trained embeddings.
    """
    from vinakit.train import save_trained

    model.config.use_cache = True
    if params.full_finetuning:
        folder = save_trained(model, tokenizer, run, params, name="model")
    else:
        with _quiet_embedding_save():
            adapter = save_trained(model, tokenizer, run, params, name="adapter")
        merged = merge_adapter(params, adapter, tokenizer)
        run.log_metrics(merge_max_logit_diff=round(max_logit_difference(model, merged, tokenizer), 6))
        folder = save_trained(merged, tokenizer, run, params, name="model")
    _add_training_info(folder, run)
    return folder


MERGE_CHECK_TEXT = "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam."


def max_logit_difference(model: Any, other: Any, tokenizer: Any, text: str = MERGE_CHECK_TEXT) -> float:
    """Largest absolute logit difference between two models on a Vietnamese sentence (merge fidelity)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with _eval_mode(model), _eval_mode(other), torch.no_grad():
        first = model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), use_cache=False)
        second = other(input_ids=torch.tensor([ids], device=next(other.parameters()).device), use_cache=False)
    return float((first.logits.float().cpu() - second.logits.float().cpu()).abs().max())


@contextlib.contextmanager
def _quiet_embedding_save() -> Iterator[None]:
    """PEFT warns that it saves the resized embedding layers too: expected here, so not shown in the notebook."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
        yield


def merge_adapter(params: CPTParams, adapter_dir: Path, tokenizer: Any) -> Any:
    """The base model in 16/32 bit, grown to the tokenizer, with the CPT adapter merged in."""
    import torch
    from peft import PeftModel

    from vinakit import model as model_lib

    base, _ = model_lib.load_model(params.model_name, backend="hf", max_seq_length=params.max_seq_length,
                                   load_in_4bit=False, dtype=None if torch.cuda.is_available() else "float32",
                                   seed=params.seed)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
    tied = _embeddings_tied(base)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    if tied:
        tie_trained_embeddings(peft_model)
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    return merged


def _add_training_info(folder: Path, run: Run) -> None:
    from vinakit.train import TRAINING_INFO_FILE

    path = folder / TRAINING_INFO_FILE
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    metrics = run.read_json("metrics.json")
    info.update(kind="continued_pretraining", new_tokens=metrics.get("new_tokens_added", 0),
                stages=[stage.get("name") for stage in metrics.get("stages", [])])
    write_json(path, info)
