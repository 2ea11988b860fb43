"""Packing raw documents into fixed-length blocks for continued pretraining, and the kit's token counting.

Documents end with EOS and are cut into blocks of ``block_size`` tokens. Where the model honours per-document
position ids (checked on the model itself, :func:`packing_isolates_documents`), positions restart at every
document start and attention stays inside each document. :func:`validation_loss` sums the loss over packed
blocks (CPT's perplexity).

:class:`TokenCountingCollator` is the base of both of the kit's collators (this module's :class:`PackedCollator`
and :class:`vinakit.train.PaddingCountingCollator`): it counts the real and padded tokens of the batches it
makes, so every run reports the same non-pad share. Nothing heavy is imported at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from vinakit.chat import IGNORE_INDEX
from vinakit.errors import ParamsError

_PROBE_DOCUMENTS = ("Hà Nội là thủ đô của Việt Nam.", "Sông Hồng chảy qua nhiều tỉnh phía bắc.")


class TokenCountingCollator:
    """Counts real and padded tokens of the batches a collator makes (the non-pad share of training).

    Subclasses build the batch and call :meth:`count` with its mask of real tokens.
    """

    def __init__(self) -> None:
        self.real_tokens = 0
        self.padded_tokens = 0

    def count(self, real: Any) -> None:
        """Add a batch: ``real`` is a tensor, true (or 1) where a token is not padding."""
        self.real_tokens += int(real.sum())
        self.padded_tokens += int(real.numel())

    @property
    def nonpad_share(self) -> float | None:
        """Real tokens over all tokens of the batches so far; None before the first batch."""
        return self.real_tokens / self.padded_tokens if self.padded_tokens else None


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
        """Blocks ``start`` to ``stop`` as collator rows."""
        stop = len(self) if stop is None else min(stop, len(self))
        rows = []
        for index in range(start, stop):
            row = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
            if self.position_ids is not None:
                row["position_ids"] = self.position_ids[index]
            rows.append(row)
        return rows

    def to_dataset(self) -> Any:
        """The blocks as a ``datasets.Dataset`` for the trainer."""
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

    Raises:
        ParamsError: ``block_size`` below 2.
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
        labels.append(block + [IGNORE_INDEX] * padding)
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


class PackedCollator(TokenCountingCollator):
    """Stacks packed blocks into a batch without an attention mask.

    transformers builds a block-diagonal causal mask from position ids that restart (``find_packed_sequence_
    indices``) only when no attention mask is given and no cache is in use, hence ``use_cache=False``.
    """

    def __init__(self, isolate: bool) -> None:
        super().__init__()
        self.isolate = isolate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = {
            "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
            "use_cache": False,
        }
        if self.isolate:
            batch["position_ids"] = torch.tensor([e["position_ids"] for e in examples], dtype=torch.long)
        else:  # blocks are full (no padding), so an all-ones mask changes nothing; TRL counts tokens with it (MPT)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        self.count(batch["labels"] != IGNORE_INDEX)
        return batch


def packing_isolates_documents(model: Any, tokenizer: Any) -> bool:
    """Whether this model keeps attention inside each document when position ids restart.

    Checked, not assumed: the logits of a second document packed after a first one must equal its logits
    alone (and must differ when the documents are plainly concatenated, so the check can tell).
    """
    import torch

    from vinakit.device import input_device
    from vinakit.generation import eval_mode

    first, second = ([*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                     for text in _PROBE_DOCUMENTS)
    device = input_device(model)
    packed = torch.tensor([first + second], device=device)
    reset = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
    with eval_mode(model), torch.no_grad():
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

    def _repr_html_(self) -> str:
        from vinakit.display import html_table

        return html_table(self.summary(), "Packing")

    def __repr__(self) -> str:
        from vinakit.display import one_line

        return one_line("PackedCorpus", **{key: value for key, value in self.summary().items() if key != "packing"})


def validation_loss(model: Any, blocks: PackedBlocks, batch_size: int) -> tuple[float, int]:
    """Summed next-token loss (nats) and the number of predicted tokens over packed blocks (perplexity)."""
    import torch

    from vinakit.device import input_device
    from vinakit.generation import eval_mode

    collator = PackedCollator(isolate=blocks.position_ids is not None)
    device = input_device(model)
    loss_sum, tokens = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = {key: value.to(device) if hasattr(value, "to") else value
                     for key, value in collator(blocks.rows(start, start + batch_size)).items()}
            predicted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if predicted == 0:
                continue
            output = model(**batch)
            loss_sum += float(output.loss) * predicted  # the loss is the mean over predicted tokens
            tokens += predicted
    return loss_sum, tokens
