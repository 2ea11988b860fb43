"""The run folder: a complete, never-overwritten record of one notebook run.

``outputs/<run_name>/`` holds the executed notebook (written by the runner), ``params.yaml`` (resolved
parameters), ``manifest.json`` (library versions, git SHA, device, data file hashes, rows used and skipped
with reasons), ``metrics.json``, plots (PNG) and the artefacts (adapter, predictions...).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vinakit.errors import RunFolderExistsError, VinakitError

# Written by `vinakit run` into a folder it reserves for the notebook it is about to execute.
RESERVED_MARKER = ".reserved-by-vinakit-run"

TRACKED_PACKAGES = ("vinakit", "torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "bitsandbytes",
                    "accelerate", "datasets", "tokenizers", "huggingface_hub", "papermill", "pandas")



def default_run_name(notebook: str, now: _dt.datetime | None = None) -> str:
    """``<notebook>-YYYYmmdd-HHMMSS``: sortable, unique enough for one user."""
    now = now or _dt.datetime.now()
    return f"{notebook}-{now:%Y%m%d-%H%M%S}"


def reserve_run_dir(output_dir: str | Path, run_name: str) -> Path:
    """Create an empty run folder and mark it as reserved for a runner; fail if it exists."""
    path = Path(output_dir) / run_name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise RunFolderExistsError(
            f"Run folder {path} already exists and runs are never overwritten: choose another run_name "
            f"(or leave run_name empty for a timestamped one).") from None
    (path / RESERVED_MARKER).write_text("reserved\n", encoding="utf-8")
    return path


def _claim_run_dir(path: Path) -> None:
    """Take a folder reserved by the runner, or create a fresh one; an existing run is never reused."""
    if path.exists():
        leftovers = {p.name for p in path.iterdir()} - {RESERVED_MARKER}
        reserved = (path / RESERVED_MARKER).exists()
        if not reserved or any(not name.endswith(".ipynb") for name in leftovers):
            raise RunFolderExistsError(
                f"Run folder {path} already exists and runs are never overwritten: choose another run_name "
                f"(or leave run_name empty for a timestamped one).")
        (path / RESERVED_MARKER).unlink()
        return
    path.mkdir(parents=True)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the libraries a run depends on (None when not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if "vinakit" in versions:
        from vinakit import __version__

        versions["vinakit"] = versions["vinakit"] or __version__  # a checkout used without installing
    return versions


def git_commit(start: Path | None = None) -> str | None:
    """The SHA of the checkout vinakit runs from (with ``+dirty`` if it has changes), or None."""
    here = start or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (UTF-8, Vietnamese kept readable); refuses a token's value (see :func:`write_text`)."""
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON file the kit wrote ({} when it does not exist).

    Raises:
        VinakitError: the file is not valid JSON (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise VinakitError(f"Cannot read {path}: {error}") from error


def write_text(path: Path, text: str) -> None:
    """Write a file the kit produces (run records, cards, previews) atomically, after refusing any token value.

    Every file the kit writes into a run folder or a folder that may be published goes through here.

    Raises:
        HubError: ``text`` contains the value of ``HF_TOKEN`` (or another token variable); nothing is written.
    """
    from vinakit.hub import assert_no_secret

    path = Path(path)
    assert_no_secret(text, path.name)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class Metrics(dict):
    """The content of metrics.json. A dict of its own type, so a notebook re-validating its parameters
    (which are plain literals) never mistakes a metrics variable for a parameter."""


@dataclass
class Run:
    """A run folder and the files that describe it."""

    path: Path
    notebook: str

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def read_json(self, name: str) -> dict[str, Any]:
        return read_json(self.path / name)

    def update_manifest(self, **entries: Any) -> None:
        """Merge entries into manifest.json."""
        manifest = self.read_json("manifest.json")
        manifest.update(entries)
        write_json(self.manifest_path, manifest)

    def add_data_report(self, name: str, report: Any) -> None:
        """Record a data source: file hash, rows read/used/skipped with reasons."""
        manifest = self.read_json("manifest.json")
        manifest.setdefault("data", {})[name] = report.to_dict() if hasattr(report, "to_dict") else report
        write_json(self.manifest_path, manifest)

    def log_metrics(self, **metrics: Any) -> Metrics:
        """Merge metrics into metrics.json and return the whole file's content."""
        current = self.read_json("metrics.json")
        current.update(metrics)
        write_json(self.metrics_path, current)
        return Metrics(current)

    def log_headline_metrics(self, **metrics: Any) -> Metrics:
        """Like :meth:`log_metrics`, with these metrics first in the file (a model card lists the first few)."""
        earlier = self.read_json("metrics.json")
        current = {**metrics, **{name: value for name, value in earlier.items() if name not in metrics}}
        write_json(self.metrics_path, current)
        return Metrics(current)

    def save_figure(self, figure: Any, name: str) -> Path:
        """Save a matplotlib figure as PNG in the run folder."""
        path = self.path / (name if name.endswith(".png") else f"{name}.png")
        figure.savefig(path, dpi=120, bbox_inches="tight")
        return path

    def finish(self, status: str = "completed") -> None:
        """Mark the run finished; on a GPU also record its peak memory next to the plan's estimate."""
        from vinakit.device import peak_memory_gib

        peak = peak_memory_gib()  # None on a CPU
        if peak is not None:
            self.log_metrics(peak_memory_gib=max(peak, self.read_json("metrics.json").get("peak_memory_gib") or 0))
        self.update_manifest(status=status, finished_at=_now())


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def start_run(params: Any) -> Run:
    """Create the run folder for validated notebook params and write params.yaml and the first manifest.

    The folder is ``<output_dir>/<run_name>`` (``run_name`` empty: ``<notebook>-<timestamp>``). An existing
    folder is never overwritten, except one that ``vinakit run`` reserved for this very execution.
    """
    run_name = params.run_name or default_run_name(params.notebook)
    path = Path(params.output_dir).expanduser() / run_name
    _claim_run_dir(path)
    values = params.to_dict()
    values["run_name"] = run_name
    write_text(path / "params.yaml", yaml.safe_dump(values, allow_unicode=True, sort_keys=False))
    run = Run(path=path.resolve(), notebook=params.notebook)
    run.update_manifest(
        notebook=params.notebook,
        run_name=run_name,
        started_at=_now(),
        status="running",
        versions=package_versions(),
        git_commit=git_commit(),
        python=sys.version.split()[0],
        platform=platform.platform(),
    )
    return run
