"""The embedded default model ``tiny-vi``: a few-MB Llama built on the fly from the kit's own Vietnamese text.

It lets every notebook run end to end on a CPU without the Hugging Face Hub (CI, newcomers). The tokenizer
is a byte-level BPE trained on ``vinakit/sample_data``; the model is a randomly initialised Llama (seed 0).
The build is cached in a folder named after a hash of the recipe and of the corpus, so changing either
rebuilds, and it is written atomically (temp folder + rename), so parallel processes never see half a model.

The architecture is Llama on purpose: transformers 5 keeps a Llama folder's tokenizer exactly as saved,
whereas ``model_type=qwen2`` forces Qwen2's pre-tokenizer regex and the ids change on reload.

Importing this module is cheap (no torch/transformers at top level) because Unsloth must be imported
before transformers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

TINY_MODEL_NAME = "tiny-vi"

SAMPLE_DATA_DIR = Path(__file__).parent / "sample_data"

EOS_TOKEN = "<|endoftext|>"
TURN_START_TOKEN = "<|im_start|>"
END_OF_TURN_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, TURN_START_TOKEN, END_OF_TURN_TOKEN, PAD_TOKEN)

# ChatML, the shape of Qwen2.5's template without its default system prompt and tool calls.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Everything that shapes the built folder besides the corpus. Bump "version" when the build code changes
# in a way these values do not capture, so existing caches rebuild.
RECIPE: dict[str, Any] = {
    "version": 1,
    "vocab_size": 4096,
    "special_tokens": list(SPECIAL_TOKENS),
    "chat_template": CHAT_TEMPLATE,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "dtype": "float32",
    "seed": 0,
}

# Always part of the corpus: the chat roles get their own tokens, and the tokenizer stays usable even
# before (or without) the sample data files.
SEED_TEXT = (
    "system\nuser\nassistant\n",
    "Xin chào! Tôi là trợ lý ảo, tôi có thể giúp gì cho bạn hôm nay?",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "Hoà bình, thuỷ lợi, hòa hợp, thủy triều, khoẻ mạnh, khỏe khoắn, loà xoà, lòa xòa.",
    "Câu hỏi: Đâu là đáp án đúng? A. Một B. Hai C. Ba D. Bốn Đáp án: A",
)

_STALE_TEMP_SECONDS = 3600


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds vinakit's cached builds.

    Args:
        cache_dir: explicit folder; else ``$VINAKIT_CACHE``; else ``~/.cache/vinakit``.

    Returns:
        The folder (not created).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get("VINAKIT_CACHE")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "vinakit"


def corpus_texts(data_dir: Path = SAMPLE_DATA_DIR) -> list[str]:
    """The tokenizer's training texts: seed text plus whatever sample data exists, duplicates removed.

    Missing or malformed files are skipped, never fatal: the sample data is written by others and may be
    incomplete, and the cache hash picks up any later change.

    Args:
        data_dir: folder with ``corpus_vi.txt``, ``chat_vi.jsonl`` and ``mcq_tinhoc.csv``.

    Returns:
        Texts in a stable order.
    """
    texts = [*SEED_TEXT, *_corpus_lines(data_dir / "corpus_vi.txt"), *_chat_strings(data_dir / "chat_vi.jsonl"),
             *_csv_cells(data_dir / "mcq_tinhoc.csv")]
    return list(dict.fromkeys(text for text in texts if text.strip()))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _corpus_lines(path: Path) -> list[str]:
    return _read_text(path).splitlines()


def _chat_strings(path: Path) -> Iterator[str]:
    for line in _read_text(path).splitlines():
        try:
            yield from _strings_in(json.loads(line))
        except ValueError:
            yield line  # a broken line is still Vietnamese text worth learning merges from


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def _csv_cells(path: Path) -> Iterator[str]:
    text = _read_text(path).lstrip("\ufeff")
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error:
        return
    for row in rows[1:]:  # the header holds English column names
        yield from row


def tiny_folder_name(texts: Iterable[str]) -> str:
    """``tiny-vi-r<recipe hash>-c<corpus hash>``: a changed recipe or corpus gets a new folder."""
    recipe_hash = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode("utf-8")).hexdigest()[:8]
    corpus_hash = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:8]
    return f"{TINY_MODEL_NAME}-r{recipe_hash}-c{corpus_hash}"


def tiny_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the embedded ``tiny-vi`` model, built first if missing.

    The folder is a normal Hugging Face model folder, usable as ``model_name`` by any loader.

    Args:
        cache_dir: where builds are cached; defaults to ``$VINAKIT_CACHE`` or ``~/.cache/vinakit``.

    Returns:
        The model folder.
    """
    texts = corpus_texts()
    root = cache_root(cache_dir)
    target = root / tiny_folder_name(texts)
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(root)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        build_tiny_model(temp, texts)
        os.rename(temp, target)  # atomic: readers see no folder or a complete one
    except OSError:
        if not target.is_dir():
            raise
        # Another process finished the same build first; its folder is identical, use it.
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _remove_stale_temp_folders(root: Path) -> None:
    """Delete temp folders left by builds that crashed (old enough that no build is still writing them)."""
    for folder in root.glob(f".{TINY_MODEL_NAME}-*.tmp-*"):
        try:
            if time.time() - folder.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def build_tiny_model(folder: Path, texts: list[str]) -> None:
    """Write the tokenizer, model weights and generation config of ``tiny-vi`` into ``folder``.

    Args:
        folder: an existing, empty folder.
        texts: the tokenizer's training corpus.
    """
    from transformers.utils import logging as transformers_logging

    tokenizer = build_tiny_tokenizer(texts)
    tokenizer.save_pretrained(folder)
    model = _random_llama(tokenizer)
    # A one-shard progress bar would only clutter the notebook that happens to build the model.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def build_tiny_tokenizer(texts: list[str]) -> Any:
    """Train the byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Args:
        texts: training texts (any Unicode form: the NFC normaliser runs first).

    Returns:
        A ``PreTrainedTokenizerFast`` with the ChatML template and the special tokens of the recipe.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()  # NFD input must cost no more tokens than NFC
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"],
        special_tokens=RECIPE["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown token needed
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[TURN_START_TOKEN, END_OF_TURN_TOKEN],
        chat_template=RECIPE["chat_template"],
        model_max_length=RECIPE["max_position_embeddings"],
    )


def _random_llama(tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=RECIPE["hidden_size"],
        num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"],
        num_key_value_heads=RECIPE["num_key_value_heads"],
        intermediate_size=RECIPE["intermediate_size"],
        max_position_embeddings=RECIPE["max_position_embeddings"],
        tie_word_embeddings=RECIPE["tie_word_embeddings"],
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=RECIPE["dtype"],
    )
    torch.manual_seed(RECIPE["seed"])
    model = LlamaForCausalLM(config).to(torch.float32)
    # Chat generation stops at the end of a turn; a base-style continuation stops at end of text.
    model.generation_config = GenerationConfig(
        eos_token_id=[end_of_turn_id, eos_id], pad_token_id=pad_id, bos_token_id=None)
    return model


def load_tiny(cache_dir: str | os.PathLike[str] | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """Load the embedded ``tiny-vi`` model with plain transformers, building it first if needed.

    Args:
        cache_dir: where builds are cached; defaults to ``$VINAKIT_CACHE`` or ``~/.cache/vinakit``.
        dtype: the weights' dtype (default float32).

    Returns:
        ``(model, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)
