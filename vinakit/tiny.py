"""The embedded default model ``tiny-vi``: a few-MB Llama built on the fly from the kit's own Vietnamese text.

It lets every notebook run end to end on a CPU without the Hugging Face Hub (CI, newcomers). The tokenizer
is a byte-level BPE trained on ``vinakit/sample_data``; the model is a randomly initialised Llama (seed 0).
The build is cached in a folder named after a hash of the recipe and of the corpus, so changing either
rebuilds, and it is written atomically (temp folder + rename), so parallel processes never see half a model.
A stamp file written last records every file's size; a cached folder whose files no longer match it (a
truncated ``model.safetensors``, a deleted tokenizer file) is rebuilt once, with a line saying so.

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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from vinakit.errors import VinakitError

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
BUILD_STAMP = "vinakit_build.json"  # written last into a build: the size of every file the build wrote
# What a complete build holds at least; checked (with the weights' own header) in folders built before stamps.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


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
    """The folder of the embedded ``tiny-vi`` model, built first if missing and rebuilt once if damaged.

    The folder is a normal Hugging Face model folder, usable as ``model_name`` by any loader. A cached
    folder is checked against its stamp (file sizes) on every call; a damaged one is rebuilt, and a line on
    stderr says so.

    Args:
        cache_dir: where builds are cached; defaults to ``$VINAKIT_CACHE`` or ``~/.cache/vinakit``.

    Returns:
        The model folder.

    Raises:
        VinakitError: the build (or the rebuild of a damaged folder) failed; the message names the folder.
    """
    texts = corpus_texts()
    # build_tiny_model is looked up when the build runs, so a test can replace it.
    return cached_build(TINY_MODEL_NAME, tiny_folder_name(texts), lambda folder: build_tiny_model(folder, texts),
                        cache_dir=cache_dir, version=RECIPE["version"])


def cached_build(label: str, folder_name: str, build: Callable[[Path], None], *,
                 cache_dir: str | os.PathLike[str] | None = None, version: int = 1) -> Path:
    """The cached build ``folder_name`` under the cache root: built atomically if missing, rebuilt once if damaged.

    Shared by ``tiny-vi`` and the tiny model of every family (:mod:`vinakit.families`).

    Args:
        label: the model's name in messages (``tiny-vi``, ``tiny-qwen3`` ...); temp folders start with it.
        folder_name: the cache folder's name (the recipe's hash in it, so a changed recipe rebuilds).
        build: writes the model into an existing, empty folder.
        cache_dir: where builds are cached; defaults to ``$VINAKIT_CACHE`` or ``~/.cache/vinakit``.
        version: the recipe version written into the stamp.

    Returns:
        The model folder.

    Raises:
        VinakitError: the build (or the rebuild of a damaged folder) failed; the message names the folder.
    """
    root = cache_root(cache_dir)
    target = root / folder_name
    problem = _cache_problem(target, version) if target.is_dir() else None
    if target.is_dir() and problem is None:
        return target
    if problem:
        print(f"vinakit: the cached {label} model in {target} is damaged ({problem}); rebuilding it.",
              file=sys.stderr, flush=True)
        _set_aside(target, root, version)
    try:
        _build_atomically(target, root, build, label, version)
        still = _cache_problem(target, version)
        if still:
            raise OSError(f"the new build is damaged too ({still})")
    except Exception as error:  # any failure of a build ends the same way: name the folder and the way out
        raise _build_error(label, target, root, problem, error) from error
    return target


def _build_atomically(target: Path, root: Path, build: Callable[[Path], None], label: str, version: int) -> None:
    """Build into a temp folder, stamp it, then rename it to ``target`` (readers never see half a model)."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(root, label)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        build(temp)
        _write_stamp(temp, version)
        os.rename(temp, target)  # atomic: readers see no folder or a complete one
    except OSError:
        if not target.is_dir():
            raise
        # Another process finished the same build first; its folder is identical, use it.
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _build_error(label: str, target: Path, root: Path, problem: str | None, error: BaseException) -> VinakitError:
    what = (f"The cached {label} model in {target} was damaged ({problem}) and rebuilding it failed"
            if problem else f"Building the {label} model into {target} failed")
    return VinakitError(f"{what}: {type(error).__name__}: {error}. Delete {target} and run again, check that "
                        f"{root} is writable and has free space, or set VINAKIT_CACHE to another folder.")


def _write_stamp(folder: Path, version: int) -> None:
    from vinakit.record import write_json

    sizes = {path.relative_to(folder).as_posix(): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file()}
    write_json(folder / BUILD_STAMP, {"recipe": version, "files": sizes})


def _cache_problem(folder: Path, version: int) -> str | None:
    """What is wrong with a cached build ("config.json is missing" ...), or None when it is intact.

    Sizes catch what damages a cache in practice (a copy or a disk that ran out midway, a deleted file) at the
    cost of a few ``stat`` calls, cheap enough to run on every load.
    """
    try:
        stamp = json.loads((folder / BUILD_STAMP).read_text(encoding="utf-8"))
        sizes = {str(name): int(size) for name, size in stamp["files"].items()}
    except FileNotFoundError:
        return _adopt_unstamped(folder, version)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {BUILD_STAMP} is unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}: cut short"
    return None


def _adopt_unstamped(folder: Path, version: int) -> str | None:
    """A folder built before stamps existed: check it by its own contents, then stamp it (no needless rebuild)."""
    for name in _REQUIRED_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    problem = _safetensors_problem(folder / "model.safetensors")
    if problem:
        return problem
    try:
        _write_stamp(folder, version)
    except OSError:
        pass  # a read-only cache still works; it is checked this way again next time
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Whether the file is as long as its header says (an 8-byte length, a JSON header, then the tensors)."""
    try:
        with path.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} has an unreadable header"
    expected = 8 + header_size + end
    actual = path.stat().st_size
    return None if actual == expected else f"{path.name} has {actual} bytes instead of {expected}: cut short"


def _set_aside(target: Path, root: Path, version: int) -> None:
    """Move a damaged build out of the way, then delete it (a rename first, so no reader sees it half deleted)."""
    if _cache_problem(target, version) is None:
        return  # another process has just rebuilt it
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-damaged-", dir=root))
    try:
        os.replace(target, aside / target.name)
    except OSError:
        pass  # gone already (another process set it aside): the build below recreates it
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temp_folders(root: Path, label: str) -> None:
    """Delete temp folders left by builds that crashed (old enough that no build is still writing them)."""
    for folder in root.glob(f".{label}-*.tmp-*"):
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
    tokenizer = build_tiny_tokenizer(texts)
    tokenizer.save_pretrained(folder)
    save_quietly(_random_llama(tokenizer), folder)


def save_quietly(model: Any, folder: Path) -> None:
    """``model.save_pretrained(folder)`` (safetensors) without transformers' progress bar."""
    from transformers.utils import logging as transformers_logging

    # A one-shard progress bar would only clutter the notebook that happens to build the model.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def build_tiny_tokenizer(texts: list[str], *, special_tokens: tuple[str, ...] | None = None,
                         eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN, bos_token: str | None = None,
                         chat_template: str | None = None) -> Any:
    """Train the byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Args:
        texts: training texts (any Unicode form: the NFC normaliser runs first).
        special_tokens: every special token, ids in this order (default: the recipe's); the family tiny models
            (:mod:`vinakit.families`) give their own chat-format tokens.
        eos_token: the end-of-text token (one of ``special_tokens``).
        pad_token: the padding token (one of ``special_tokens``).
        bos_token: a begin-of-text token (one of ``special_tokens``), or None.
        chat_template: the Jinja chat template (default: the recipe's ChatML).

    Returns:
        A ``PreTrainedTokenizerFast`` with the chat template and the special tokens.
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
        special_tokens=list(special_tokens or RECIPE["special_tokens"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown token needed
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    named = {eos_token, pad_token, bos_token}
    extra = {"bos_token": bos_token} if bos_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=[t for t in special_tokens or RECIPE["special_tokens"] if t not in named],
        chat_template=chat_template or RECIPE["chat_template"],
        model_max_length=RECIPE["max_position_embeddings"],
        **extra,
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
