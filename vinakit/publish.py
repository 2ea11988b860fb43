"""Publishing an export: GGUF files through llama.cpp, model cards, and the Hub upload behind the on-disk gate.

The gate is re-checked on disk by :func:`publish_run`, which is also the way to retry a failed upload alone: the
adapter must be kept in the run folder, ``fidelity.json`` must say the check passed, and the merged weights must
be exactly the ones that were checked (same fingerprint).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from vinakit.errors import VinakitError
from vinakit.fidelity import FIDELITY_FILE
from vinakit.hub import Hub, HubAuthError, HubError, PushedRepo, default_hub, find_token, push_folder, what_to_do
from vinakit.merge import MERGED_DIR
from vinakit.record import mark_run, read_json
from vinakit.runs import ADAPTER_DIR, folder_fingerprint

GGUF_DIR = "gguf"
LLAMA_CPP_ENV_VAR = "UNSLOTH_LLAMA_CPP_PATH"  # Unsloth's own variable, so both look in the same place
# One Colab/Kaggle cell that builds what the export needs (the quantizer; the converter is a script).
LLAMA_CPP_BUILD = ("git clone --depth 1 https://github.com/ggml-org/llama.cpp && cmake -B llama.cpp/build "
                   "llama.cpp && cmake --build llama.cpp/build --target llama-quantize -j")
_QUANTIZER_PLACES = ("llama-quantize", "quantize", "build/bin/llama-quantize", "build/bin/quantize")
_CONVERTERS = ("convert_hf_to_gguf.py", "convert-hf-to-gguf.py")


class PublishBlockedError(VinakitError):
    """Publishing was refused: the adapter is not saved or the fidelity check did not pass on these files."""


# --------------------------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GGUFResult:
    """What the GGUF step did.

    Attributes:
        status: "skipped" (not asked for), "unavailable" (no llama.cpp), "failed" or "written".
        message: what happened and, unless written, what to use instead.
        folder: ``<run>/gguf`` when written.
        files: the GGUF file names.
    """

    status: Literal["skipped", "unavailable", "failed", "written"]
    message: str
    folder: Path | None = None
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        from vinakit.display import one_line

        return one_line("GGUFResult", status=self.status, files=self.files)

    def _repr_html_(self) -> str:
        from vinakit.display import html_table

        return html_table({"status": self.status, "message": self.message, "folder": self.folder,
                           "files": self.files}, "GGUF")


def llama_cpp_folder() -> Path:
    """Where Unsloth looks for llama.cpp: ``$UNSLOTH_LLAMA_CPP_PATH`` or ``~/.unsloth/llama.cpp``."""
    return Path(os.environ.get(LLAMA_CPP_ENV_VAR) or Path.home() / ".unsloth" / "llama.cpp").expanduser()


def find_llama_cpp(folder: Path | None = None) -> tuple[Path, Path] | None:
    """(quantizer, converter script) of a llama.cpp checkout, or None.

    The quantizer is looked for at the top (make builds, Unsloth's installs) and in ``build/bin/`` (CMake
    builds); the converter is the checkout's ``convert_hf_to_gguf.py``.
    """
    folder = folder or llama_cpp_folder()
    quantizer = next((folder / name for name in _QUANTIZER_PLACES
                      if (folder / name).is_file() and os.access(folder / name, os.X_OK)), None)
    converter = next((folder / name for name in _CONVERTERS if (folder / name).is_file()), None)
    return (quantizer, converter) if quantizer and converter else None


def llama_cpp_missing(merged_dir: Path) -> GGUFResult:
    """The "no llama.cpp" result: how to build it in one cell, and that the merged folder is the export."""
    return GGUFResult("unavailable", (
        f"No GGUF files: llama.cpp was not found in {llama_cpp_folder()} (it needs llama-quantize, at the top or in "
        f"build/bin/, and convert_hf_to_gguf.py). Build it in one Colab/Kaggle cell:\n  !{LLAMA_CPP_BUILD}\nthen "
        f"set {LLAMA_CPP_ENV_VAR} to the llama.cpp folder and run this step again. Until then the merged model in "
        f"{merged_dir} is your export."))


def write_gguf(merged_dir: Path, output: Path, quantizations: Sequence[str], *, name: str, dtype: str) -> GGUFResult:
    """Convert the merged folder to GGUF with llama.cpp: one 16-bit file from the converter, then one file per
    quantisation type from ``llama-quantize`` (``<name>.<TYPE>.gguf``).

    Args:
        merged_dir: the merged model folder.
        output: the GGUF folder (created).
        quantizations: llama.cpp types (``q4_k_m``, ``q8_0`` ...).
        name: the file name stem.
        dtype: the merged weights' dtype: the 16-bit file is bf16 for bfloat16, else f16.
    """
    tools = find_llama_cpp()
    if tools is None:
        return llama_cpp_missing(merged_dir)
    quantizer, converter = tools
    output.mkdir(parents=True, exist_ok=True)
    base_type = "BF16" if dtype == "bfloat16" else "F16"
    base_file = output / f"{name}.{base_type}.gguf"
    commands = [[sys.executable, str(converter), str(merged_dir), "--outtype", base_type.lower(),
                 "--outfile", str(base_file)]]
    wanted = [kind.upper() for kind in quantizations]
    commands += [[str(quantizer), str(base_file), str(output / f"{name}.{kind}.gguf"), kind]
                 for kind in wanted if kind != base_type]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout)[-1500:]
            return GGUFResult("failed", f"GGUF conversion failed ({Path(command[0]).name} ... exited with "
                                        f"{result.returncode}): {tail}\nThe merged model in {merged_dir} is your "
                                        f"export.")
    if base_type not in wanted:
        base_file.unlink()  # only the source of the quantised files
    files = sorted(p.name for p in output.glob("*.gguf"))
    return GGUFResult("written", f"GGUF files in {output}: {', '.join(files)}", output, files)


# --------------------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelCards:
    """The README.md cards written into the exported folders (kind -> path)."""

    paths: dict[str, Path]

    def text(self, kind: str = "merged_16bit") -> str:
        """The Markdown of one card (the merged model's by default)."""
        path = self.paths.get(kind) or next(iter(self.paths.values()))
        return path.read_text(encoding="utf-8")


def repo_names(repo_id: str, methods: Sequence[str]) -> dict[str, str]:
    """Where each exported form goes: the first of merged_16bit, lora, gguf gets ``repo_id``; the others get
    ``<repo_id>-lora`` and ``<repo_id>-GGUF`` (the Hub's usual names)."""
    ordered = [kind for kind in ("merged_16bit", "lora", "gguf") if kind in methods]
    suffix = {"merged_16bit": "", "lora": "-lora", "gguf": "-GGUF"}
    return {kind: repo_id if i == 0 else f"{repo_id}{suffix[kind]}" for i, kind in enumerate(ordered)}


def write_model_cards(folders: Mapping[str, Path], facts: Mapping[str, Any], params: Any,
                      gguf_files: Sequence[str] = ()) -> ModelCards:
    """Write a Vietnamese + English card into each folder (kind -> folder).

    Args:
        folders: the exported folders by kind ("lora", "merged_16bit", "gguf").
        facts: the :class:`vinakit.card.CardFacts` fields shared by every card (base model, training, fidelity).
        params: ``ExportParams`` (repo names, eval run, licence).
        gguf_files: the GGUF file names, for the gguf card.
    """
    from vinakit.card import CardFacts, flatten_numbers, write_model_card

    repos = repo_names(params.repo_id, params.save_methods) if params.push_to_hub else {}
    evaluation = read_json(Path(params.eval_run).expanduser() / "metrics.json") if params.eval_run else {}
    paths = {}
    for kind, folder in folders.items():
        card = CardFacts(kind=kind, location=repos.get(kind) or str(folder), export_params=params.to_dict(),
                         evaluation=flatten_numbers(evaluation), siblings=repos, license=params.license,
                         evaluation_source=Path(params.eval_run).name if params.eval_run else "",
                         gguf_files=gguf_files if kind == "gguf" else (), **facts)
        paths[kind] = write_model_card(folder, card)
    return ModelCards(paths)


# --------------------------------------------------------------------------------------------------------------
# Uploading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PublishReport:
    """What was uploaded: status "skipped" or "uploaded", and one entry per repo."""

    status: Literal["skipped", "uploaded"]
    message: str
    repos: list[PushedRepo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "repos": [r.to_dict() for r in self.repos]}

    def table(self) -> Any:
        import pandas as pd

        if not self.repos:
            return pd.DataFrame({"status": [self.status], "message": [self.message]})
        return pd.DataFrame([r.to_dict() for r in self.repos]).set_index("repo_id")

    def _repr_html_(self) -> str:
        from vinakit.display import frame_html

        return frame_html(self.table(), f"Publish: {self.status}")

    def __repr__(self) -> str:
        from vinakit.display import one_line

        return one_line("PublishReport", status=self.status, repos=[r.repo_id for r in self.repos])


def publish_run(run_dir: str | os.PathLike[str], repo_id: str, *, methods: Sequence[str] = ("merged_16bit",),
                private: bool = True, hub: Hub | None = None) -> PublishReport:
    """Upload an export run folder; usable on its own to retry a failed upload (the run is then marked completed).

    Args:
        run_dir: an export run folder (``outputs/export-...``).
        repo_id: ``owner/name`` for the first form; see :func:`repo_names` for the others.
        methods: what to upload: merged_16bit, lora, gguf.
        private: create new repos private.
        hub: the Hub (default: :func:`vinakit.hub.default_hub`).

    Raises:
        PublishBlockedError: the gate failed (adapter not saved, fidelity not passed, files changed since).
        HubError: the upload failed; nothing local was changed.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    folders = _publishable_folders(run_dir, methods)
    token = find_token()
    retry = (f"Retry the upload alone with: python -c \"from vinakit.publish import publish_run; "
             f"publish_run('{run_dir}', '{repo_id}', methods={list(methods)})\"")
    if token is None:
        raise HubAuthError(f"push_to_hub is true but no Hugging Face token was found. "
                           f"{what_to_do(HubAuthError(''))} Nothing was uploaded; every local file is intact in "
                           f"{run_dir}. {retry}")
    hub = hub or default_hub()
    repos = repo_names(repo_id, list(folders))
    pushed: list[PushedRepo] = []
    for kind, folder in folders.items():
        try:
            pushed.append(push_folder(hub, repos[kind], folder, token=token, private=private,
                                      commit_message=f"Upload {kind} exported with vinakit"))
        except HubError as error:
            done = ", ".join(p.repo_id for p in pushed) or "nothing"
            raise type(error)(f"Upload of {folder.name}/ to {repos[kind]} on the {hub.name} failed: {error}. "
                              f"{what_to_do(error)} Uploaded before the failure: {done}. No local file was "
                              f"changed; the export is in {run_dir}. {retry}") from None
    listing = ", ".join(f"{p.repo_id} ({'private' if p.private else 'public'})" for p in pushed)
    report = PublishReport("uploaded", f"Uploaded to the {hub.name}: {listing}.", pushed)
    if read_json(run_dir / "manifest.json").get("status") == "upload_failed":  # a retry that worked
        mark_run(run_dir, "completed", hub=report.to_dict())
    return report


def _publishable_folders(run_dir: Path, methods: Sequence[str]) -> dict[str, Path]:
    """The folders to upload, after checking the gate on disk."""
    fidelity = read_json(run_dir / FIDELITY_FILE)
    if not fidelity:
        raise PublishBlockedError(f"{run_dir} has no {FIDELITY_FILE}: the fidelity check has not run, so nothing "
                                  f"may be published. Run the export notebook to the end.")
    if fidelity.get("source_kind") != "full" and not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise PublishBlockedError(f"The adapter is not saved in {run_dir / ADAPTER_DIR}; it must be kept before "
                                  f"anything is published.")
    if not fidelity.get("passed"):
        raise PublishBlockedError(f"The fidelity check failed ({'; '.join(fidelity.get('problems', []))}); nothing "
                                  f"may be published.")
    merged_dir = run_dir / MERGED_DIR
    if folder_fingerprint(merged_dir) != fidelity.get("merged_fingerprint"):
        raise PublishBlockedError(f"The weights in {merged_dir} changed after the fidelity check; run the export "
                                  f"again.")
    folders = {"merged_16bit": merged_dir, "lora": run_dir / ADAPTER_DIR, "gguf": run_dir / GGUF_DIR}
    chosen = {kind: folders[kind] for kind in ("merged_16bit", "lora", "gguf") if kind in methods}
    if fidelity.get("source_kind") == "full":
        chosen.pop("lora", None)
    if "gguf" in chosen and not any(chosen["gguf"].glob("*.gguf")):
        chosen.pop("gguf")  # no llama.cpp: the merged folder is the export (save_gguf said so)
    if not chosen:
        raise PublishBlockedError(f"Nothing to upload for save_methods {list(methods)} in {run_dir}.")
    return chosen
