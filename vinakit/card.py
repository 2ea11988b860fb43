"""Model cards (README.md) for exported models, in Vietnamese and English.

A card says what a user of the published model needs: the base model, the data (with row counts and file hashes),
how it was trained (the resolved parameters of the training and export runs), how faithful the merge is, the
evaluation results of an eval run when one is given, and how to load it (transformers, Unsloth, PEFT, llama.cpp,
Ollama). The front matter uses the Hub's metadata keys (``base_model``, ``language``, ``license`` ...).

A card never holds a token: :func:`write_model_card` refuses to write text that contains one.
Importing this module is cheap (yaml only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from vinakit.colab import REPOSITORY_URL
from vinakit.record import write_text

CardKind = Literal["merged_16bit", "lora", "gguf"]
CARD_FILE = "README.md"
SAMPLE_PROMPT = "Giới thiệu ngắn gọn về Hà Nội."
MAX_EVAL_ROWS = 30

# A Hub id is "name" or "owner/name" with the Hub's allowed characters; anything else is a local path or alias.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# metric name -> (Vietnamese label, English label)
FIDELITY_LABELS: dict[str, tuple[str, str]] = {
    "merge_max_abs_logit_diff": ("Chênh lệch logit lớn nhất (mô hình gộp so với adapter)",
                                 "Max abs. logit difference (merged vs adapter)"),
    "merge_mean_kl": ("KL trung bình mỗi token (mô hình gộp so với adapter)", "Mean KL per token (merged vs adapter)"),
    "adapter_perplexity": ("Perplexity của adapter trên tập kiểm định", "Adapter perplexity on held-out data"),
    "merge_perplexity": ("Perplexity của mô hình gộp trên tập kiểm định", "Merged perplexity on held-out data"),
    "naive_4bit_max_abs_logit_diff": ("Chênh lệch logit lớn nhất nếu gộp thẳng vào 4-bit (để so sánh)",
                                      "Max abs. logit difference of a naive merge into 4-bit (for comparison)"),
    "naive_4bit_perplexity": ("Perplexity nếu gộp thẳng vào 4-bit (để so sánh)",
                              "Perplexity of a naive merge into 4-bit (for comparison)"),
}

_KIND_TEXT: dict[str, tuple[str, str]] = {
    "merged_16bit": ("mô hình đầy đủ: adapter LoRA đã được gộp vào trọng số gốc 16/32-bit (không gộp vào 4-bit)",
                     "a full model: the LoRA adapter merged into the original 16/32-bit weights (never into 4-bit)"),
    "lora": ("adapter LoRA (cần tải thêm mô hình gốc)", "a LoRA adapter (loads on top of the base model)"),
    "gguf": ("các tệp GGUF cho llama.cpp và Ollama, lượng tử hoá từ mô hình gộp 16-bit",
             "GGUF files for llama.cpp and Ollama, quantised from the merged 16-bit model"),
}

_SIBLING_LABELS: dict[str, tuple[str, str]] = {
    "merged_16bit": ("Mô hình gộp 16-bit", "Merged 16-bit model"),
    "lora": ("Adapter LoRA", "LoRA adapter"),
    "gguf": ("Tệp GGUF", "GGUF files"),
}


@dataclass
class CardFacts:
    """Everything a card shows. Mappings are plain JSON-like data read from the run folders.

    Attributes:
        kind: what the folder holds: "merged_16bit", "lora" or "gguf".
        location: the repo id it is published to, or the local folder.
        base_model: the base model's Hub id or local name.
        training: ``vinakit_training.json`` of the adapter (backend, 4-bit, chat template ...).
        training_params: the training run's resolved ``params.yaml``.
        training_data: the ``data`` section of the training run's manifest.
        export_params: the export run's resolved parameters.
        fidelity: the fidelity metrics of the export (``merge_max_abs_logit_diff`` ...).
        evaluation: numeric results of an eval run, flattened to ``name -> value``.
        evaluation_source: the eval run it came from.
        siblings: the other published forms, ``kind -> repo id``.
        gguf_files: GGUF file names (for the gguf kind).
        license: the licence id for the front matter; empty: "other" (the base model's licence applies).
    """

    kind: CardKind
    location: str
    base_model: str
    training: Mapping[str, Any] = field(default_factory=dict)
    training_params: Mapping[str, Any] = field(default_factory=dict)
    training_data: Mapping[str, Any] = field(default_factory=dict)
    export_params: Mapping[str, Any] = field(default_factory=dict)
    fidelity: Mapping[str, Any] = field(default_factory=dict)
    evaluation: Mapping[str, float] = field(default_factory=dict)
    evaluation_source: str = ""
    siblings: Mapping[str, str] = field(default_factory=dict)
    gguf_files: Sequence[str] = ()
    license: str = ""


def is_hub_id(name: str) -> bool:
    """True for ``owner/name`` Hub ids, False for local folders and aliases such as ``tiny-vi``."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def flatten_numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric values of a metrics mapping, nested mappings joined with dots (``base.format_valid_rate``)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[name] = value
        elif isinstance(value, Mapping):
            flat.update(flatten_numbers(value, prefix=f"{name}."))
    return flat


def render_model_card(facts: CardFacts) -> str:
    """The card's Markdown: front matter, a Vietnamese part, an English part and the resolved parameters."""
    parts = [
        _front_matter(facts),
        f"# {_title(facts)}\n",
        _vietnamese(facts),
        _english(facts),
        _parameters(facts),
    ]
    return "\n".join(part for part in parts if part)


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write ``README.md`` into ``folder`` (replacing PEFT's placeholder card) and return its path.

    Raises:
        HubError: the card would contain a token from the environment.
    """
    path = Path(folder) / CARD_FILE
    write_text(path, render_model_card(facts))  # refuses a token's value
    return path


# --------------------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------------------


def _front_matter(facts: CardFacts) -> str:
    meta: dict[str, Any] = {}
    if is_hub_id(facts.base_model):
        meta["base_model"] = facts.base_model
    meta["library_name"] = "peft" if facts.kind == "lora" else "transformers"
    meta["license"] = facts.license or "other"
    meta["language"] = ["vi"]
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["vinakit", "vietnamese", "lora" if facts.kind == "lora" else "merged",
                    *(["gguf", "llama.cpp"] if facts.kind == "gguf" else []),
                    *(["unsloth"] if facts.training.get("backend") == "unsloth" else [])]
    datasets = [name for name in _dataset_names(facts) if is_hub_id(name)]
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) + "---\n"


def _title(facts: CardFacts) -> str:
    if is_hub_id(facts.location):
        return facts.location.split("/")[-1]
    folder = Path(facts.location)
    return f"{folder.parent.name}/{folder.name}"  # a local export: run name and form


def _dataset_names(facts: CardFacts) -> list[str]:
    names = []
    for report in facts.training_data.values():
        if isinstance(report, Mapping) and report.get("source"):
            names.append(str(report["source"]).split(" (")[0])
    if not names and facts.training_params.get("dataset"):
        names.append(str(facts.training_params["dataset"]))
    return names


def _method_line(facts: CardFacts, vietnamese: bool) -> str:
    params = facts.training_params
    if params.get("full_finetuning") or facts.training.get("full_finetuning"):
        return "tinh chỉnh toàn bộ trọng số" if vietnamese else "full fine-tuning"
    quantised = params.get("load_in_4bit", facts.training.get("load_in_4bit"))
    rank = params.get("rank", "?")
    alpha = params.get("lora_alpha", "?")
    name = "QLoRA (mô hình gốc 4-bit khi huấn luyện)" if vietnamese and quantised else \
        "QLoRA (4-bit base during training)" if quantised else "LoRA"
    return f"{name}, r={rank}, alpha={alpha}" + (", rsLoRA" if params.get("use_rslora") else "")


def _data_lines(facts: CardFacts, vietnamese: bool) -> list[str]:
    lines = []
    for split, report in facts.training_data.items():
        if not isinstance(report, Mapping):
            continue
        source = str(report.get("source", "?")).split(" (")[0]
        rows = report.get("rows_used", "?")
        skipped = report.get("rows_skipped", 0)
        sha = (report.get("sha256") or "")[:12]
        if vietnamese:
            text = f"`{source}` ({split}): dùng {rows} dòng, bỏ qua {skipped}"
        else:
            text = f"`{source}` ({split}): {rows} rows used, {skipped} skipped"
        lines.append(f"- {text}" + (f", sha256 {sha}…" if sha else ""))
    if not lines:
        lines.append("- " + ", ".join(f"`{name}`" for name in _dataset_names(facts)) if _dataset_names(facts)
                     else "- (không rõ / unknown)")
    return lines


def _summary_lines(facts: CardFacts, vietnamese: bool) -> list[str]:
    template = facts.training.get("chat_template_name") or "tokenizer's own"
    if vietnamese and template == "tokenizer's own":
        template = "mẫu sẵn có của tokenizer"
    labels = ("Mô hình gốc", "Phương pháp", "Mẫu hội thoại (chat template)", "Độ dài chuỗi tối đa", "Dữ liệu") \
        if vietnamese else ("Base model", "Method", "Chat template", "Max sequence length", "Data")
    lines = [
        f"- **{labels[0]}:** `{facts.base_model}`",
        f"- **{labels[1]}:** {_method_line(facts, vietnamese)}",
        f"- **{labels[2]}:** {template} "
        + ("(được lưu kèm mô hình, dùng đúng như khi huấn luyện)" if vietnamese
           else "(saved with the model, exactly as used in training)"),
        f"- **{labels[3]}:** {facts.training.get('max_seq_length', facts.training_params.get('max_seq_length', '?'))}",
        f"- **{labels[4]}:**",
        *(f"  {line}" for line in _data_lines(facts, vietnamese)),
    ]
    for kind, repo in facts.siblings.items():
        if kind != facts.kind:
            label = _SIBLING_LABELS[kind][0 if vietnamese else 1]
            lines.append(f"- **{label}:** [{repo}](https://huggingface.co/{repo})")
    return lines


def _fidelity_table(facts: CardFacts, vietnamese: bool) -> str:
    rows = [(labels[0 if vietnamese else 1], facts.fidelity[name]) for name, labels in FIDELITY_LABELS.items()
            if isinstance(facts.fidelity.get(name), (int, float))]
    if not rows:
        return "Không có số liệu." if vietnamese else "No figures."
    header = "| Chỉ số | Giá trị |\n|---|---|" if vietnamese else "| Metric | Value |\n|---|---|"
    return header + "\n" + "\n".join(f"| {label} | {_number(value)} |" for label, value in rows)


def _evaluation_table(facts: CardFacts, vietnamese: bool) -> str:
    if not facts.evaluation:
        return ("Chưa có kết quả đánh giá (chạy notebook eval_mcq rồi xuất lại với `eval_run`)." if vietnamese
                else "No evaluation results yet (run the eval_mcq notebook, then export with `eval_run`).")
    rows = list(facts.evaluation.items())[:MAX_EVAL_ROWS]
    header = "| Chỉ số | Giá trị |\n|---|---|" if vietnamese else "| Metric | Value |\n|---|---|"
    source = (f"Nguồn: lần chạy đánh giá `{facts.evaluation_source}`." if vietnamese
              else f"Source: eval run `{facts.evaluation_source}`.")
    return header + "\n" + "\n".join(f"| {name} | {_number(value)} |" for name, value in rows) + "\n\n" + source


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _usage(facts: CardFacts) -> str:
    model_id = facts.location
    if facts.kind == "gguf":
        return _gguf_usage(facts)
    if facts.kind == "lora":
        return f'''```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

adapter_id = "{model_id}"
model = AutoPeftModelForCausalLM.from_pretrained(adapter_id, dtype="auto", device_map="auto")  # loads the base too
tokenizer = AutoTokenizer.from_pretrained(adapter_id)  # carries the training chat template
messages = [{{"role": "user", "content": "{SAMPLE_PROMPT}"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
output = model.generate(**inputs, max_new_tokens=256)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''
    return f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id)  # carries the training chat template
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")
messages = [{{"role": "user", "content": "{SAMPLE_PROMPT}"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
output = model.generate(**inputs, max_new_tokens=256)  # stops at the end-of-turn token (generation_config.json)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Unsloth (GPU, 4-bit for inference):

```python
from unsloth import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained("{model_id}", max_seq_length=2048, load_in_4bit=True)
FastLanguageModel.for_inference(model)
```'''


def _gguf_usage(facts: CardFacts) -> str:
    quant = _quant_tag(facts.gguf_files[0]) if facts.gguf_files else "Q8_0"
    files = "\n".join(f"- `{name}`" for name in facts.gguf_files) or "- (none)"
    return f"""Files / Tệp:

{files}

```bash
llama-cli -hf {facts.location}:{quant} -cnv        # llama.cpp
ollama run hf.co/{facts.location}:{quant}          # Ollama
```"""


def _quant_tag(file_name: str) -> str:
    parts = file_name.rsplit(".", 2)
    return parts[-2].upper() if len(parts) == 3 else "Q8_0"


def _vietnamese(facts: CardFacts) -> str:
    return "\n".join([
        "## Tiếng Việt\n",
        f"Đây là {_KIND_TEXT[facts.kind][0]}, được tinh chỉnh cho tiếng Việt bằng "
        f"[vinakit]({REPOSITORY_URL}).\n",
        *_summary_lines(facts, vietnamese=True),
        "\n### Cách dùng\n",
        _usage(facts),
        "\n### Độ trung thực khi gộp adapter\n",
        "Trước khi xuất bản, mô hình gộp được so sánh với adapter trên dữ liệu kiểm định (logit, KL, perplexity). "
        "Gộp thẳng vào trọng số 4-bit làm giảm chất lượng, nên vinakit luôn gộp vào trọng số gốc 16/32-bit.\n",
        _fidelity_table(facts, vietnamese=True),
        "\n### Kết quả đánh giá\n",
        _evaluation_table(facts, vietnamese=True),
        "",
    ])


def _english(facts: CardFacts) -> str:
    return "\n".join([
        "## English\n",
        f"This is {_KIND_TEXT[facts.kind][1]}, fine-tuned for Vietnamese with "
        f"[vinakit]({REPOSITORY_URL}).\n",
        *_summary_lines(facts, vietnamese=False),
        "\n### How to use\n",
        _usage(facts),
        "\n### Merge fidelity\n",
        "Before publishing, the merged model was compared with the adapter model on held-out data (logits, KL, "
        "perplexity). Merging into 4-bit weights loses quality, so vinakit always merges into the original "
        "16/32-bit weights.\n",
        _fidelity_table(facts, vietnamese=False),
        "\n### Evaluation\n",
        _evaluation_table(facts, vietnamese=False),
        "",
    ])


def _parameters(facts: CardFacts) -> str:
    blocks = ["## Parameters / Tham số\n"]
    for title, values in (("Training run / Lần huấn luyện", facts.training_params),
                          ("Export run / Lần xuất", facts.export_params)):
        if values:
            dumped = yaml.safe_dump(dict(values), allow_unicode=True, sort_keys=False).rstrip()
            blocks.append(f"<details><summary>{title}</summary>\n\n```yaml\n{dumped}\n```\n\n</details>\n")
    return "\n".join(blocks) if len(blocks) > 1 else ""
