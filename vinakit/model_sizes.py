"""The sizes of the common base models that memory depends on, from a local folder, the HF cache or a table.

``vinakit plan`` and the GPU check read model sizes through :func:`model_sizes`: a local folder's
``config.json`` first (``tiny-vi`` too), then the Hugging Face cache (offline only), then the table below of the
bases Vietnamese fine-tuners start from. Nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vinakit.errors import VinakitError
from vinakit.record import read_json

@dataclass(frozen=True)
class ModelSizes:
    """The sizes of a decoder-only model (Llama/Qwen/Mistral/Gemma layout) that memory depends on.

    Attributes:
        hidden_size, num_hidden_layers, intermediate_size, vocab_size, num_attention_heads, num_key_value_heads,
        head_dim, tie_word_embeddings: as in the model's ``config.json``.
        prequantized_4bit: a bitsandbytes 4-bit checkpoint (it always loads in 4-bit).
        source: where the sizes come from.
        layout: ``"llama"`` (q/k/v/o and a gated MLP; Qwen, Mistral, Gemma, SmolLM too), ``"phi3"`` (fused
            ``qkv_proj`` and ``gate_up_proj``) or ``"mpt"`` (fused ``Wqkv``, ``out_proj``, an ungated MLP).
    """

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    prequantized_4bit: bool = False
    source: str = ""
    layout: str = "llama"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` features of each linear projection of one layer, under the family's module names."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        if self.layout == "mpt":
            return {"Wqkv": (h, q + 2 * kv), "out_proj": (q, h), "up_proj": (h, i), "down_proj": (i, h)}
        if self.layout == "phi3":
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear projections (what 4-bit quantises)."""
        return self.num_hidden_layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_matrices(self) -> int:
        """1 when ``lm_head`` is tied to ``embed_tokens``, else 2."""
        return 1 if self.tie_word_embeddings else 2

    @property
    def other_params(self) -> int:
        """Embeddings, output head and norms: always kept in 16/32-bit."""
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return self.embedding_matrices * self.vocab_size * self.hidden_size + norms

    @property
    def parameters(self) -> int:
        return self.linear_params + self.other_params

    def describe(self) -> str:
        tied = "tied" if self.tie_word_embeddings else "untied"
        count = f"{self.parameters / 1e9:.2f}B" if self.parameters >= 1e9 else f"{self.parameters / 1e6:.1f}M"
        return (f"{count} parameters, {self.num_hidden_layers} layers, hidden "
                f"{self.hidden_size}, vocab {self.vocab_size}, {tied} embeddings (sizes from {self.source})")


# hidden, layers, intermediate, vocab, heads, KV heads, head_dim, tied: from each model's public config.json.
_TABLE: dict[str, tuple[int, int, int, int, int, int, int, bool]] = {
    "meta-llama/Llama-3.2-1B": (2048, 16, 8192, 128256, 32, 8, 64, True),
    "meta-llama/Llama-3.2-3B": (3072, 28, 8192, 128256, 24, 8, 128, True),
    "meta-llama/Llama-3.1-8B": (4096, 32, 14336, 128256, 32, 8, 128, False),
    "Qwen/Qwen2.5-0.5B": (896, 24, 4864, 151936, 14, 2, 64, True),
    "Qwen/Qwen2.5-1.5B": (1536, 28, 8960, 151936, 12, 2, 128, True),
    "Qwen/Qwen2.5-3B": (2048, 36, 11008, 151936, 16, 2, 128, True),
    "Qwen/Qwen2.5-7B": (3584, 28, 18944, 152064, 28, 4, 128, False),
    "Qwen/Qwen3-0.6B": (1024, 28, 3072, 151936, 16, 8, 128, True),
    "Qwen/Qwen3-1.7B": (2048, 28, 6144, 151936, 16, 8, 128, True),
    "Qwen/Qwen3-4B": (2560, 36, 9728, 151936, 32, 8, 128, True),
    "Qwen/Qwen3-8B": (4096, 36, 12288, 151936, 32, 8, 128, False),
    "google/gemma-3-1b": (1152, 26, 6912, 262144, 4, 1, 256, True),
    # The text model; the multimodal checkpoint adds a ~0.4B-parameter vision tower.
    "google/gemma-3-4b": (2560, 34, 10240, 262208, 8, 4, 256, True),
    "HuggingFaceTB/SmolLM2-1.7B": (2048, 24, 8192, 49152, 32, 32, 64, True),
    "mistralai/Mistral-7B-v0.3": (4096, 32, 14336, 32768, 32, 8, 128, False),
    "Viet-Mistral/Vistral-7B-Chat": (4096, 32, 14336, 38369, 32, 8, 128, False),
}
# MPT-layout bases (PhoGPT): d_model, layers, heads, vocab; the MLP is 4 x d_model, embeddings tied, ALiBi. From
# the PhoGPT paper (Nguyen et al., 2023): 7.5B = 32 layers x 12 x 4096^2 + 250,368 x 4096; 3.7B likewise.
_MPT_TABLE: dict[str, tuple[int, int, int, int]] = {
    "vinai/PhoGPT-7B5": (4096, 32, 32, 250368),
    "vinai/PhoGPT-4B": (3072, 32, 24, 20480),
}
# Words of a name that do not change the sizes: chat/base variants and Unsloth's pre-quantised uploads.
_VARIANT_WORDS = frozenset({"instruct", "it", "pt", "base", "chat", "unsloth", "bnb", "4bit"})
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")


def known_models() -> list[str]:
    """The hub ids whose sizes are shipped with vinakit (chat variants and ``unsloth/`` copies match too)."""
    return [*_TABLE, *_MPT_TABLE]


def _name_key(name: str) -> tuple[str, str]:
    """``(owner, model)`` lower-cased, without variant words: ``unsloth/Llama-3.2-1B-Instruct-bnb-4bit`` and
    ``meta-llama/Llama-3.2-1B`` both give ``llama-3.2-1b``."""
    owner, _, model = name.strip().rpartition("/")
    words = [word for word in model.lower().split("-") if word not in _VARIANT_WORDS]
    if words[:1] == ["meta"]:  # unsloth/Meta-Llama-3.1-8B
        words = words[1:]
    return owner.lower(), "-".join(words)


def _table_entry(name: str) -> ModelSizes | None:
    owner, key = _name_key(name)
    for hub_id, values in _TABLE.items():
        table_owner, table_key = _name_key(hub_id)
        if key == table_key and owner in ("", "unsloth", table_owner):
            return ModelSizes(*values, prequantized_4bit="bnb-4bit" in name.lower(),
                              source=f"vinakit's table ({hub_id})")
    for hub_id, (hidden, layers, heads, vocab) in _MPT_TABLE.items():
        table_owner, table_key = _name_key(hub_id)
        if key == table_key and owner in ("", table_owner):
            return ModelSizes(hidden, layers, 4 * hidden, vocab, heads, heads, hidden // heads, True,
                              prequantized_4bit="bnb-4bit" in name.lower(), source=f"vinakit's table ({hub_id})",
                              layout="mpt")
    return None


def model_sizes(model_name: str) -> ModelSizes:
    """The sizes of ``model_name``: a local folder's ``config.json`` (``tiny-vi`` too), else the Hugging Face
    cache (offline lookup, nothing is downloaded), else vinakit's table of common bases.

    Raises:
        VinakitError: the sizes cannot be found (the message says what to do and lists the known names).
    """
    folder = _local_folder(model_name)
    if folder is not None:
        return _sizes_from_folder(folder, model_name)
    config = _cached_config(model_name)
    if config is not None:
        return _sizes_from_config(config, f"the Hugging Face cache ({model_name})", model_name)
    entry = _table_entry(model_name)
    if entry is None:
        raise VinakitError(
            f"The sizes of model {model_name!r} are unknown: it is not a local folder, its config.json is not in "
            f"the Hugging Face cache, and it is not one of the bases vinakit knows. Pass a local model folder "
            f"(with config.json) as model_name, or put the config in the cache (huggingface-cli download "
            f"{model_name} config.json). Known: {', '.join(known_models())} (also with unsloth/, -Instruct, -it, "
            f"-bnb-4bit).")
    return entry


def _local_folder(model_name: str) -> Path | None:
    from vinakit.model import resolve_model_name  # tiny-vi -> its (built) folder; a path-like name must exist

    resolved = Path(resolve_model_name(model_name))
    return resolved if resolved.is_dir() else None


def _sizes_from_folder(folder: Path, model_name: str) -> ModelSizes:
    config_path = folder / "config.json"
    if config_path.is_file():
        return _sizes_from_config(read_json(config_path), f"{config_path}", model_name)
    adapter_path = folder / "adapter_config.json"
    base = read_json(adapter_path).get("base_model_name_or_path") if adapter_path.is_file() else None
    if base and base != model_name:
        return model_sizes(base)  # an adapter folder: the base model's sizes
    raise VinakitError(f"{folder} holds no config.json, so its model sizes are unknown.")


def _cached_config(model_name: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(model_name, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError)
        return None
    return read_json(Path(path)) if isinstance(path, str) else None


def _sizes_from_config(config: Mapping[str, Any], source: str, model_name: str) -> ModelSizes:
    """Sizes from a ``config.json``; values it leaves to transformers' defaults come from the table."""
    if config.get("model_type") == "mpt" or "d_model" in config:
        return _mpt_sizes(config, source, model_name)
    text = config.get("text_config") or config  # multimodal checkpoints (Gemma 3): the language model
    fallback = _table_entry(model_name)
    values = {key: text.get(key, getattr(fallback, key, None)) for key in _SIZE_KEYS}
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise VinakitError(f"The config in {source} has no {', '.join(missing)}: is it a decoder-only language "
                           f"model? Pass a folder whose config.json has them.")
    heads = values["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or getattr(fallback, "num_key_value_heads", None) or heads
    head_dim = text.get("head_dim") or getattr(fallback, "head_dim", None) or values["hidden_size"] // heads
    return ModelSizes(**values, num_key_value_heads=kv_heads, head_dim=head_dim,
                      tie_word_embeddings=_tied(config, text, fallback),
                      prequantized_4bit=_prequantized(config) or "bnb-4bit" in model_name.lower(), source=source,
                      layout="phi3" if text.get("model_type") == "phi3" else "llama")


def _mpt_sizes(config: Mapping[str, Any], source: str, model_name: str) -> ModelSizes:
    """MPT's own names (``d_model``, ``n_layers``, ``n_heads``, ``expansion_ratio``); PhoGPT's custom code too."""
    try:
        hidden, layers, heads = int(config["d_model"]), int(config["n_layers"]), int(config["n_heads"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        raise VinakitError(f"The MPT config in {source} lacks {error}: pass a folder whose config.json has "
                           f"d_model, n_layers, n_heads and vocab_size.") from error
    ratio = int(config.get("expansion_ratio", 4))
    return ModelSizes(hidden, layers, ratio * hidden, vocab, heads, heads, hidden // heads,
                      bool(config.get("tie_word_embeddings", True)),
                      prequantized_4bit=_prequantized(config) or "bnb-4bit" in model_name.lower(), source=source,
                      layout="mpt")


def _tied(config: Mapping[str, Any], text: Mapping[str, Any], fallback: ModelSizes | None) -> bool:
    for mapping in (text, config):
        if "tie_word_embeddings" in mapping:
            return bool(mapping["tie_word_embeddings"])
    if fallback is not None:
        return fallback.tie_word_embeddings
    # transformers' defaults: Gemma ties, Llama/Qwen2/Mistral do not.
    return "gemma" in str(text.get("model_type") or config.get("model_type") or "")


def _prequantized(config: Mapping[str, Any]) -> bool:
    quantization = config.get("quantization_config") or {}
    return bool(quantization.get("load_in_4bit")) or quantization.get("bnb_4bit_quant_type") is not None


