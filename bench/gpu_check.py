"""The GPU check: the kit's notebooks, headless, on a machine with an NVIDIA GPU and no network.

One prepared command (``make gpu-check``) that proves the GPU path end to end and prints one table:

* SFT at sequence length 2048 on a random-weight Llama-3.2-1B (real config, real Llama-3.1 tokenizer from
  ``$VINAKIT_SHARED_DIR/tokenizers``): both backends x 16-bit LoRA and QLoRA, a fixed number of steps;
  plus Unsloth QLoRA on a random-weight Qwen2.5-1.5B (Qwen tokenizer);
* CPT with an embedding learning rate and a vocabulary extension;
* eval_mcq, batched vs one prompt at a time;
* export with the fidelity check;
* the SFT notebook with ``VINAKIT_DEVICE_PROFILE=t4`` (float16, memory capped at 15 GiB);
* SFT through the distributed launcher on one GPU with DeepSpeed ZeRO-2 (``--nproc 1 --distributed deepspeed2``,
  backend hf, the generated accelerate/DeepSpeed configs); skipped where DeepSpeed is not installed.

Each row is a real ``vinakit run`` (papermill) into its own run folder; the figures come from the run folders'
``metrics.json``: tokens/s, peak GPU memory next to the plan's estimate, MFU (6 x parameters x tokens/s over the
device's dense 16-bit peak; LoRA does less work than that, so read it as an upper bound on the share used).
Random weights train, evaluate and merge exactly like real ones; only the answers are nonsense.

``--dry-run`` runs the same steps on the embedded ``tiny-vi`` on a CPU with a few steps each, so CI proves the
script itself; rows that need a GPU (the T4 profile) say so instead of running.

    make gpu-check                 # on the GPU machine (after make gpu-wheels here)
    make gpu-check DRY_RUN=1       # on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# Dense 16-bit tensor-core peaks (FLOP/s) by device name fragment, for MFU. Sparse figures are twice these.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "T4": 65e12}
# Public configs (config.json of the hub repos) of the two bases the check builds with random weights.
REAL_CONFIGS = {
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
                     "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tokenizer": "llama3_1"},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28,
                     "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0,
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tokenizer": "qwen3"},
}


@dataclass
class Row:
    """One line of the result table."""

    step: str
    status: str = "ok"
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""


# ----------------------------------------------------------------------------------------------------- inputs


def build_random_model(name: str, folder: Path, shared: Path) -> Path:
    """A random-weight model from a real config with the family's real tokenizer, saved as a model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    spec = dict(REAL_CONFIGS[name])
    tokenizer = AutoTokenizer.from_pretrained(shared / "tokenizers" / spec.pop("tokenizer"))
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def long_chat_file(path: Path, target_tokens: int, tokenizer_dir: str) -> Path:
    """Multi-turn Vietnamese chats of about ``target_tokens`` tokens, stitched from the embedded chat set, so that
    SFT really runs at the sequence length it is measured at."""
    from transformers import AutoTokenizer

    from vinakit.sources import sample_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    turns = [json.loads(line)["messages"] for line in sample_path("vinakit:chat").read_text("utf-8").splitlines()]
    turns = [[m for m in chat if m["role"] != "system"] for chat in turns]
    rows, current, length = [], [], 0
    for chat in turns * 4:
        current.extend(chat)
        length += sum(len(tokenizer(m["content"])["input_ids"]) + 6 for m in chat)
        if length >= target_tokens * 0.9:
            rows.append({"messages": current})
            current, length = [], 0
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------- running


def run(notebook: str, out: Path, name: str, yaml_file: Path, overrides: dict[str, Any],
        env: dict[str, str] | None = None, launch: list[str] | None = None) -> tuple[Path, float]:
    """``vinakit run`` into ``out/name`` (in a child process, so each run starts with a clean GPU)."""
    import subprocess

    args = [sys.executable, "-m", "vinakit.cli", "run", notebook, "-f", str(yaml_file), "--no-progress",
            "-p", "output_dir", str(out), "-p", "run_name", name]
    for key, value in overrides.items():
        args += ["-p", key, json.dumps(value) if not isinstance(value, str) else value]
    args += launch or []  # e.g. --nproc 1 --distributed deepspeed2 (vinakit.launch)
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("vinakit: error:")]
        raise RuntimeError(" | ".join(errors or result.stderr.strip().splitlines()[-3:]))
    return out / name, seconds


def metrics_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def mfu(tokens_per_second: float | None, parameters: int | None) -> float | None:
    """Model FLOPs utilisation against the device's dense 16-bit peak (None on CPU or unknown devices)."""
    import torch

    if not tokens_per_second or not parameters or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    return round(6 * parameters * tokens_per_second / peak, 4) if peak else None


def training_figures(run_dir: Path) -> dict[str, Any]:
    metrics = metrics_of(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    total = (manifest.get("trainable_parameters") or {}).get("total")
    return {
        "tokens/s": metrics.get("tokens_per_second"),
        "peak GiB": metrics.get("peak_memory_gib"),
        "plan GiB": metrics.get("estimated_peak_memory_gib"),
        "MFU": mfu(metrics.get("tokens_per_second"), total),
        "precision": "bf16" if manifest.get("precision", {}).get("bf16") else (
            "fp16" if manifest.get("precision", {}).get("fp16") else "fp32"),
        "loss": metrics.get("train_loss"),
    }


def step(rows: list[Row], label: str, action: Any) -> Any:
    """Run one step; a failure becomes a row with its reason and the check goes on."""
    start = time.perf_counter()
    try:
        figures, result = action()
        rows.append(Row(label, figures=figures, seconds=round(time.perf_counter() - start, 1)))
        return result
    except Exception as error:  # noqa: BLE001 - every step reports, none stops the others
        rows.append(Row(label, status="FAILED", seconds=round(time.perf_counter() - start, 1),
                        note=f"{type(error).__name__}: {error}"[:400]))
        return None


# ----------------------------------------------------------------------------------------------------- the plan


@dataclass
class Setup:
    """What the steps run on: models, data, the base YAML and the step counts."""

    out: Path
    base_yaml: Path
    sft_models: dict[str, str]
    chat_file: str
    steps: int
    seq: int
    dry_run: bool


def prepare(args: argparse.Namespace) -> Setup:
    out = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    if args.dry_run:
        return Setup(out, REPO / "params" / "cpu_tiny.yaml", {"tiny-vi": "tiny-vi"}, "vinakit:chat", 3, 512, True)
    shared = Path(os.environ.get("VINAKIT_SHARED_DIR") or REPO.parent / "shared")
    models = {name: str(build_random_model(name, out.parent / "models" / name, shared)) for name in REAL_CONFIGS}
    chat = long_chat_file(out / "long_chats.jsonl", 2048, models["llama-3.2-1b"])
    return Setup(out, REPO / "params" / "colab_t4.yaml", models, str(chat), args.steps, 2048, False)


def sft_overrides(setup: Setup, model: str, backend: str, qlora: bool) -> dict[str, Any]:
    # all-linear: the usual recipe (the CPU preset's LoRA on lm_head does not run 4-bit on a CPU).
    return {"model_name": model, "backend": backend, "load_in_4bit": qlora, "max_seq_length": setup.seq,
            "target_modules": "all-linear", "learning_rate": 2e-4,
            "dataset": setup.chat_file, "max_steps": setup.steps, "logging_steps": 1, "save_steps": 10_000,
            "eval_steps": 10_000, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "sample_prompts": ["Hà Nội là thủ đô của nước nào?"], "max_new_tokens": 16, "val_size": 2}


def run_all(setup: Setup) -> list[Row]:
    rows: list[Row] = []
    first_model = next(iter(setup.sft_models.values()))
    sft_runs: dict[str, Path] = {}
    for backend in ("hf", "unsloth"):
        for qlora in (False, True):
            label = f"sft {backend} {'qlora' if qlora else 'lora16'}"
            overrides = sft_overrides(setup, first_model, backend, qlora)

            def action(label=label, overrides=overrides):
                folder, _ = run("sft", setup.out, label.replace(" ", "-"), setup.base_yaml, overrides)
                return training_figures(folder), folder

            sft_runs[label] = step(rows, label, action)
    if not setup.dry_run:
        qwen = sft_overrides(setup, setup.sft_models["qwen2.5-1.5b"], "unsloth", True)
        step(rows, "sft unsloth qlora qwen2.5-1.5b",
             lambda: (training_figures(run("sft", setup.out, "sft-qwen", setup.base_yaml, qwen)[0]), None))
    step(rows, "cpt unsloth +vocab", lambda: cpt_step(setup, first_model))
    trained = next((folder for folder in sft_runs.values() if folder), None)
    step(rows, "eval_mcq batched vs one", lambda: eval_step(setup, first_model, trained))
    step(rows, "export + fidelity", lambda: export_step(setup, trained))
    t4 = {**sft_overrides(setup, first_model, "unsloth", True), "max_steps": max(2, setup.steps // 2)}
    if setup.dry_run:
        rows.append(Row("sft on VINAKIT_DEVICE_PROFILE=t4", status="skipped", note="needs a GPU"))
    else:
        step(rows, "sft on VINAKIT_DEVICE_PROFILE=t4", lambda: (training_figures(
            run("sft", setup.out, "sft-t4", setup.base_yaml, t4, env={"VINAKIT_DEVICE_PROFILE": "t4"})[0]), None))
    zero2_step(rows, setup, first_model)
    return rows


def zero2_step(rows: list[Row], setup: Setup, model: str) -> None:
    """SFT through ``vinakit run --nproc 1 --distributed deepspeed2``: the launcher, accelerate and ZeRO-2."""
    import importlib.util

    label = "ZeRO-2 sft, hf (1 GPU)"
    if setup.dry_run or importlib.util.find_spec("deepspeed") is None:
        why = "needs a GPU" if setup.dry_run else "deepspeed is not installed (pip install deepspeed)"
        rows.append(Row(label, status="skipped", note=why))
        return
    overrides = {**sft_overrides(setup, model, "hf", False), "max_steps": max(2, setup.steps // 2)}

    def action():
        folder, _ = run("sft", setup.out, "sft-zero2", setup.base_yaml, overrides,
                        launch=["--nproc", "1", "--distributed", "deepspeed2"])
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        return {**training_figures(folder), "mode": manifest.get("distributed", {}).get("mode")}, None

    step(rows, label, action)


def cpt_step(setup: Setup, model: str) -> tuple[dict[str, Any], None]:
    overrides = {"model_name": model, "backend": "unsloth", "load_in_4bit": False, "num_new_tokens": 50,
                 "new_token_min_count": 1, "stages": [f"new_embeddings:{setup.steps}", f"full:{setup.steps}"],
                 "embedding_learning_rate": 1e-4, "logging_steps": 1, "save_steps": 10_000, "eval_steps": 10_000,
                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_new_tokens": 8}
    if not setup.dry_run:
        overrides["max_seq_length"] = setup.seq
    folder, _ = run("cpt", setup.out, "cpt", setup.base_yaml, overrides)
    metrics = metrics_of(folder)
    return {"fertility": f"{metrics.get('fertility_before')} -> {metrics.get('fertility_after')}",
            "embedding update": metrics.get("embedding_update_norm"),
            "merge max diff": metrics.get("merge_max_logit_diff"), **training_figures(folder)}, None


def eval_step(setup: Setup, model: str, trained: Path | None) -> tuple[dict[str, Any], None]:
    if trained is None:
        raise RuntimeError("no SFT run succeeded, nothing to evaluate")
    base = {"model_name": model, "adapter": str(trained), "backend": "unsloth", "load_in_4bit": False,
            "compare_base": False, "holdout": False, "max_items": 32, "max_new_tokens": 64,
            "key_agreement": False, "vmlu_max_items": 8}
    times = {}
    for batch in (16, 1):
        folder, _ = run("eval_mcq", setup.out, f"eval-batch{batch}", setup.base_yaml, {**base, "batch_size": batch})
        times[batch] = metrics_of(folder)["seconds"]  # generation + scoring of the fine-tuned model
    return {"batched s": times[16], "one-by-one s": times[1],
            "speedup": round(times[1] / times[16], 2) if times[16] else None}, None


def export_step(setup: Setup, trained: Path | None) -> tuple[dict[str, Any], None]:
    if trained is None:
        raise RuntimeError("no SFT run succeeded, nothing to export")
    folder, _ = run("export", setup.out, "export", setup.base_yaml,
                    {"adapter": str(trained), "save_methods": ["merged_16bit"], "fidelity_rows": 4})
    metrics = metrics_of(folder)
    return {"merge max diff": metrics.get("merge_max_abs_logit_diff"), "merge KL": metrics.get("merge_mean_kl"),
            "naive 4-bit max diff": metrics.get("naive_4bit_max_abs_logit_diff"),
            "passed": metrics.get("fidelity_passed")}, None


# ----------------------------------------------------------------------------------------------------- report


def report(rows: list[Row], setup: Setup) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    lines = [f"vinakit GPU check — {time.strftime('%Y-%m-%d')} — {device} — torch {torch.__version__}",
             f"run folders: {setup.out}", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for row in rows:
        figures = ", ".join(f"{k} {_short(v)}" for k, v in row.figures.items() if v is not None) or row.note
        lines.append(f"| {row.step} | {row.status} | {row.seconds} | {figures} |")
    ratio = _backend_ratio(rows)
    if ratio:
        lines += ["", f"Unsloth / hf tokens/s: {ratio}"]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _backend_ratio(rows: list[Row]) -> str:
    speed = {row.step: row.figures.get("tokens/s") for row in rows}
    parts = []
    for kind in ("lora16", "qlora"):
        fast, plain = speed.get(f"sft unsloth {kind}"), speed.get(f"sft hf {kind}")
        if fast and plain:
            parts.append(f"{kind} {fast / plain:.2f}x")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny-vi on a CPU, a few steps each")
    parser.add_argument("--steps", type=int, default=30, help="training steps per SFT run on the GPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "outputs" / "gpu-check"))
    args = parser.parse_args(argv)
    setup = prepare(args)
    rows = run_all(setup)
    text = report(rows, setup)
    print(text)
    (setup.out / "gpu_check.md").write_text(text + "\n", encoding="utf-8")
    (setup.out / "gpu_check.json").write_text(json.dumps([vars(r) for r in rows], ensure_ascii=False, indent=2,
                                                         default=str), encoding="utf-8")
    failed = [row.step for row in rows if row.status == "FAILED"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
