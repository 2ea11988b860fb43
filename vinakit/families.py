"""A tiny model per architecture family: ``model_name: tiny-<family>`` for CPU runs of every notebook.

The README promises Llama, Qwen2.5, Qwen3, Gemma 3, Mistral/Vistral, Phi-3, SmolLM2 and MPT (PhoGPT). Each
family breaks kits in its own way (tied embeddings, fused projections, no system role, think blocks, sliding
windows, ALiBi, logit soft-capping, whether Unsloth patches it), so each gets a tiny model built from the real
architecture's config class, scaled down to 4 layers and hidden size 128 with the distinctive features kept:

======== ===================== ====================================================================
family   config class          kept
======== ===================== ====================================================================
llama    (= ``tiny-vi``)       untied, ChatML (the golden-loss model, unchanged)
qwen2    Qwen2Config           tied, q/k/v biases, Qwen2.5 ChatML
qwen3    Qwen3Config           tied, q/k norms, the real Qwen3 template with its think block
gemma3   Gemma3TextConfig      tied, scaled embeddings, final logit soft-capping 30, 3 sliding : 1 global
mistral  MistralConfig         untied, sliding window, ``[INST]`` template (no system role)
phi3     Phi3Config            untied, fused ``qkv_proj`` and ``gate_up_proj``, sliding window
smollm   LlamaConfig           Llama layout with tied embeddings, ChatML
mpt      MptConfig             ALiBi (no position embeddings), fused ``Wqkv``, no biases, tied, PhoGPT prompt
======== ===================== ====================================================================

Tokenizers: the real Qwen3 tokenizer (``$VINAKIT_SHARED_DIR/tokenizers/qwen3``) for qwen2 and qwen3 when it is
there; otherwise, and for every other family, tiny-vi's byte-level BPE trained on the kit's sample data with the
family's own special tokens and chat template. Builds are cached like ``tiny-vi`` (:func:`vinakit.tiny.cached_build`)
in a folder named after a hash of the recipe, the corpus and the tokenizer source, and take a few seconds.

Importing this module is cheap (no torch/transformers at top level).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vinakit.errors import ParamsError
from vinakit.tiny import (END_OF_TURN_TOKEN, EOS_TOKEN, PAD_TOKEN, RECIPE, TINY_MODEL_NAME, TURN_START_TOKEN,
                          build_tiny_tokenizer, cached_build, corpus_texts, save_quietly, tiny_model_dir)

FAMILY_PREFIX = "tiny-"
RECIPE_VERSION = 1  # bump when the build code changes in a way the recipes below do not capture

# ChatML as Qwen2.5 and SmolLM2 write it (without their default system prompt), as tiny-vi has it.
CHATML = RECIPE["chat_template"]

# Gemma: no system role (the system text goes in front of the first user turn), the assistant is "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content']"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)

# Mistral v0.1 / Vistral: no system role (it joins the next user turn), the reply ends with </s>.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- set ns = namespace(system='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] + '\\n\\n' %}"
    "{%- elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{%- set ns.system = '' %}"
    "{%- else %}{{ message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Phi-3: <|role|> headers, <|end|> after every turn.
PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
)

# PhoGPT-4B-Chat's instruction format ("### Câu hỏi: ...\n### Trả lời:"), the reply ending with eos.
PHOGPT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '### Câu hỏi: ' + message['content'] + '\\n' }}"
    "{%- else %}{{ '### Trả lời:\\n' + message['content'] + eos_token + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '### Trả lời:\\n' }}{%- endif %}"
)

_CHATML_TOKENS = (EOS_TOKEN, TURN_START_TOKEN, END_OF_TURN_TOKEN, PAD_TOKEN)


@dataclass(frozen=True)
class TokenizerSpec:
    """The family's BPE special tokens (ids in this order) and chat template, for the fallback tokenizer.

    ``end_of_turn`` is the token generation stops at besides ``eos``; ``real`` names a folder under
    ``$VINAKIT_SHARED_DIR/tokenizers`` whose real tokenizer is used instead when it is there.
    """

    special_tokens: tuple[str, ...]
    chat_template: str
    eos: str = EOS_TOKEN
    pad: str = PAD_TOKEN
    bos: str | None = None
    end_of_turn: str = END_OF_TURN_TOKEN
    real: str = ""
    real_chat_template: str = ""  # "" keeps the real tokenizer's own template


@dataclass(frozen=True)
class Family:
    """One architecture family's tiny model: the config class, its arguments, the tokenizer.

    Attributes:
        name: ``qwen3`` ... (``model_name: tiny-qwen3``).
        config_class: the transformers config class (name), e.g. ``Qwen3Config``.
        model_class: the causal-LM class (name) built from it.
        config: arguments of the config class besides vocabulary and special-token ids.
        tokenizer: the tokenizer recipe.
        features: what the tiny model keeps of the family (README and bench tables).
    """

    name: str
    config_class: str
    model_class: str
    config: Mapping[str, Any]
    tokenizer: TokenizerSpec
    features: str = ""

    @property
    def model_name(self) -> str:
        return f"{FAMILY_PREFIX}{self.name}"


_SIZES = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 384, "max_position_embeddings": 2048}
_QWEN_TOKENIZER = TokenizerSpec(_CHATML_TOKENS, CHATML, real="qwen3")
_WINDOW = 64  # shorter than the kit's CPU rows, so the sliding window really masks something

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM",
           {**_SIZES, "tie_word_embeddings": True, "use_sliding_window": False},
           TokenizerSpec(_CHATML_TOKENS, CHATML, real="qwen3", real_chat_template=CHATML),
           "tied, q/k/v biases, ChatML"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM",
           {**_SIZES, "head_dim": 32, "tie_word_embeddings": True},
           _QWEN_TOKENIZER, "tied, q/k norms, think-block template"),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
           {**_SIZES, "head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True,
            "sliding_window": _WINDOW, "final_logit_softcapping": 30.0,
            "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
           TokenizerSpec(("<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"), GEMMA_TEMPLATE,
                         eos="<eos>", pad="<pad>", bos="<bos>", end_of_turn="<end_of_turn>"),
           "tied, scaled embeddings, logit soft-capping, sliding window, no system role"),
    Family("mistral", "MistralConfig", "MistralForCausalLM",
           {**_SIZES, "head_dim": 32, "tie_word_embeddings": False, "sliding_window": _WINDOW},
           TokenizerSpec(("</s>", "<s>", "[INST]", "[/INST]", "<pad>"), MISTRAL_TEMPLATE, eos="</s>", pad="<pad>",
                         bos="<s>", end_of_turn="</s>"),
           "untied, sliding window, [INST] template without system role"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM",
           {**_SIZES, "tie_word_embeddings": False, "sliding_window": _WINDOW},
           TokenizerSpec((EOS_TOKEN, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", PAD_TOKEN),
                         PHI3_TEMPLATE, end_of_turn="<|end|>"),
           "untied, fused qkv_proj and gate_up_proj, sliding window"),
    Family("smollm", "LlamaConfig", "LlamaForCausalLM",
           {**_SIZES, "tie_word_embeddings": True},
           TokenizerSpec(_CHATML_TOKENS, CHATML), "Llama layout, tied embeddings, ChatML"),
    Family("mpt", "MptConfig", "MptForCausalLM",
           # expansion_ratio 4: transformers' MptMLP hard-codes 4 x d_model whatever the config says
           {"d_model": 128, "n_heads": 4, "n_layers": 4, "expansion_ratio": 4, "max_seq_len": 2048,
            "no_bias": True, "tie_word_embeddings": True, "attn_config": {"alibi": True}},
           TokenizerSpec((EOS_TOKEN, PAD_TOKEN), PHOGPT_TEMPLATE, end_of_turn=EOS_TOKEN),
           "ALiBi, fused Wqkv, no biases, tied, PhoGPT prompt"),
)}

# tiny-llama is tiny-vi itself: the golden-loss tests pin that model, and one Llama is enough.
LLAMA_ALIAS = "llama"
FAMILY_NAMES: tuple[str, ...] = (LLAMA_ALIAS, *FAMILIES)


def tiny_model_names() -> list[str]:
    """Every ``model_name`` that builds a tiny model: ``tiny-vi`` and ``tiny-<family>``."""
    return [TINY_MODEL_NAME, *(f"{FAMILY_PREFIX}{name}" for name in FAMILY_NAMES)]


def is_tiny_name(model_name: str) -> bool:
    """Whether ``model_name`` is ``tiny-vi`` or ``tiny-<family>``."""
    return model_name in tiny_model_names()


def tiny_family_dir(model_name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of ``tiny-<family>`` (or ``tiny-vi``), built first if missing and rebuilt once if damaged.

    Args:
        model_name: ``tiny-vi``, ``tiny-llama`` (the same model) or ``tiny-<family>``.
        cache_dir: where builds are cached; defaults to ``$VINAKIT_CACHE`` or ``~/.cache/vinakit``.

    Returns:
        The model folder (a normal Hugging Face model folder).

    Raises:
        ParamsError: an unknown ``tiny-`` name (the message lists the known ones).
        VinakitError: the build failed; the message names the folder.
    """
    name = model_name.removeprefix(FAMILY_PREFIX)
    if model_name == TINY_MODEL_NAME or name == LLAMA_ALIAS:
        return tiny_model_dir(cache_dir)
    if name not in FAMILIES:
        raise ParamsError(f"Unknown tiny model {model_name!r}. Known: {', '.join(tiny_model_names())}.")
    family = FAMILIES[name]
    texts = corpus_texts()
    real = _real_tokenizer_dir(family.tokenizer)
    return cached_build(family.model_name, _folder_name(family, texts, real),
                        lambda folder: build_family_model(family, folder, texts, real),
                        cache_dir=cache_dir, version=RECIPE_VERSION)


def _real_tokenizer_dir(spec: TokenizerSpec) -> Path | None:
    shared = os.environ.get("VINAKIT_SHARED_DIR")
    if not spec.real or not shared:
        return None
    folder = Path(shared) / "tokenizers" / spec.real
    return folder if (folder / "tokenizer.json").is_file() else None


def _folder_name(family: Family, texts: list[str], real: Path | None) -> str:
    """``tiny-<family>-r<recipe>-c<corpus or real tokenizer>``: any change gets a new folder."""
    recipe = {"version": RECIPE_VERSION, "family": family.name, "config_class": family.config_class,
              "config": family.config, "tokenizer": family.tokenizer.__dict__, "vocab_size": RECIPE["vocab_size"],
              "seed": RECIPE["seed"]}
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()[:8]
    source = hashlib.sha256()
    if real is None:
        source.update("\n".join(texts).encode("utf-8"))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = real / name
            source.update(path.read_bytes() if path.is_file() else b"")
    return f"{family.model_name}-r{recipe_hash}-{'t' if real else 'c'}{source.hexdigest()[:8]}"


def build_family_model(family: Family, folder: Path, texts: list[str], real: Path | None = None) -> None:
    """Write the tokenizer, the randomly initialised model (seed 0, float32) and its generation config.

    Args:
        family: the family recipe.
        folder: an existing, empty folder.
        texts: the fallback tokenizer's training corpus.
        real: a real tokenizer's folder to use instead of training one.
    """
    tokenizer = _family_tokenizer(family.tokenizer, texts, real)
    tokenizer.save_pretrained(folder)
    save_quietly(_random_model(family, tokenizer), folder)


def _family_tokenizer(spec: TokenizerSpec, texts: list[str], real: Path | None) -> Any:
    if real is None:
        return build_tiny_tokenizer(texts, special_tokens=spec.special_tokens, eos_token=spec.eos,
                                    pad_token=spec.pad, bos_token=spec.bos, chat_template=spec.chat_template)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real)
    if spec.real_chat_template:
        tokenizer.chat_template = spec.real_chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN  # Qwen's <|endoftext|>: never trained, so it pads safely
    tokenizer.model_max_length = RECIPE["max_position_embeddings"]
    return tokenizer


def _random_model(family: Family, tokenizer: Any) -> Any:
    import torch
    import transformers
    from transformers import GenerationConfig

    end_of_turn = tokenizer.convert_tokens_to_ids(_end_of_turn(family.tokenizer, tokenizer))
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    bos_id = tokenizer.bos_token_id if family.tokenizer.bos else None
    config = getattr(transformers, family.config_class)(
        vocab_size=len(tokenizer), bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        dtype="float32", **family.config)
    torch.manual_seed(RECIPE["seed"])
    model = getattr(transformers, family.model_class)(config).to(torch.float32)
    end_of_text = tokenizer.convert_tokens_to_ids(EOS_TOKEN) if EOS_TOKEN in tokenizer.get_vocab() else eos_id
    stops = list(dict.fromkeys([end_of_turn, eos_id, end_of_text]))  # the real Qwen3's eos is <|im_end|>
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad_id, bos_token_id=bos_id)
    return model


def _end_of_turn(spec: TokenizerSpec, tokenizer: Any) -> str:
    """The real tokenizer's end of turn is ChatML's <|im_end|>; the fallback's is the spec's."""
    return END_OF_TURN_TOKEN if END_OF_TURN_TOKEN in tokenizer.get_vocab() and spec.real else spec.end_of_turn


# --------------------------------------------------------------------------------------------------------------
# Which backend a model can use
# --------------------------------------------------------------------------------------------------------------

# Architectures the hf backend takes instead of Unsloth. Unsloth 2026.10.9 has its own kernels for llama, mistral,
# gemma, gemma2, qwen2 and qwen3 on a GPU and sends every other transformers architecture (Gemma 3, Phi-3,
# Qwen3-MoE, Granite ...) through its generic FastModel path (unsloth/models/loader.py), so those stay on Unsloth.
# MPT (PhoGPT) is not among the architectures Unsloth supports; a model with its own modeling code (auto_map) is
# code Unsloth has never seen: both go to the hf backend.
UNSLOTH_UNPATCHED_MODEL_TYPES = frozenset({"mpt"})
_FAMILY_MODEL_TYPES = {"vi": "llama", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text",
                       "mistral": "mistral", "phi3": "phi3", "smollm": "llama", "mpt": "mpt"}
# Hub ids whose architecture is known without their config (lower-cased prefixes).
_HUB_MODEL_TYPES = {"vinai/phogpt": "mpt", "mosaicml/mpt": "mpt"}


def model_config(model_name: str) -> dict[str, Any]:
    """The ``config.json`` of a model name without loading (or building) anything: a tiny name gives its family's
    model type, a folder (model, adapter or run folder) its config, a hub id the cached config; {} when unknown."""
    name = model_name.removeprefix(FAMILY_PREFIX)
    if is_tiny_name(model_name):
        return {"model_type": _FAMILY_MODEL_TYPES[name]}
    folder = Path(model_name).expanduser()
    if folder.is_dir():
        return _folder_config(folder)
    config = _cached_hub_config(model_name)
    if config:
        return config
    for prefix, model_type in _HUB_MODEL_TYPES.items():
        if model_name.lower().startswith(prefix):
            return {"model_type": model_type, "auto_map": {"AutoModelForCausalLM": "(custom code on the Hub)"}}
    return {}


def _folder_config(folder: Path, depth: int = 0) -> dict[str, Any]:
    for candidate in (folder, folder / "model", folder / "merged_16bit"):
        if (candidate / "config.json").is_file():
            return _read(candidate / "config.json")
    for candidate in (folder, folder / "adapter"):
        base = _read(candidate / "adapter_config.json").get("base_model_name_or_path")
        if base and depth < 2:
            return _folder_config(Path(base), depth + 1) if Path(base).is_dir() else model_config(str(base))
    return {}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached_hub_config(model_name: str) -> dict[str, Any]:
    if model_name.count("/") != 1:
        return {}
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model_name, "config.json")
    except (ImportError, ValueError):
        return {}
    return _read(Path(path)) if isinstance(path, str) else {}


def custom_code_files(model_name: str) -> list[str]:
    """The modeling code a model brings (``auto_map`` in its config): its module files, or [] for none."""
    auto_map = model_config(model_name).get("auto_map") or {}
    if not isinstance(auto_map, dict):
        return []
    modules = {str(value).split("--")[-1].split(".")[0] for value in auto_map.values() if isinstance(value, str)}
    return sorted(f"{module}.py" if not module.startswith("(") else module for module in modules)


def unsloth_refusal(model_name: str) -> str | None:
    """Why Unsloth does not take this model ("Unsloth does not patch the mpt architecture"), or None when it
    does or the architecture is unknown (then Unsloth decides)."""
    config = model_config(model_name)
    if custom_code_files(model_name):
        return "it brings its own modeling code (trust_remote_code), which Unsloth does not patch"
    model_type = config.get("model_type")
    if model_type in UNSLOTH_UNPATCHED_MODEL_TYPES:
        return f"Unsloth does not patch the {model_type} architecture"
    return None
