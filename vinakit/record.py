"""The run folder: a complete, never-overwritten record of one notebook run.

``outputs/<run_name>/`` holds the executed notebook (written by the runner), ``params.yaml`` (resolved
parameters), ``manifest.json`` (library versions, git SHA, device, data file hashes, rows used and skipped
with reasons), ``metrics.json``, plots (PNG) and the artefacts (adapter, predictions...).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vinakit.errors import RunFolderExistsError, VinakitError

# Written by `vinakit run` into a folder it reserves for the notebook it is about to execute.
RESERVED_MARKER = ".reserved-by-vinakit-run"
# A distributed run (vinakit.launch): the other ranks' executed notebooks and records, inside the run folder.
RANKS_DIR = "ranks"
# Set by vinakit.launch for a rank other than 0: the folder that rank writes its own records into, and the run
# folder the ranks share (the trainer's checkpoints, which every rank must find at the same path).
RANK_DIR_ENV = "VINAKIT_RANK_DIR"
SHARED_RUN_DIR_ENV = "VINAKIT_SHARED_RUN_DIR"

TRACKED_PACKAGES = ("vinakit", "torch", "transformers", "trl", "peft", "unsloth", "unsloth_zoo", "bitsandbytes",
                    "accelerate", "datasets", "tokenizers", "huggingface_hub", "papermill", "pandas")

# How a run ended (manifest.json "status"); "running" until then.
ENDED = ("completed", "failed", "interrupted", "upload_failed")
_NAME_TRIES = 1000  # default names tried, one millisecond apart, before giving up


def default_run_name(notebook: str, now: _dt.datetime | None = None) -> str:
    """``<notebook>-YYYYmmdd-HHMMSS-mmm``: sortable, to the millisecond (see :func:`reserve_run_dir`)."""
    now = now or _dt.datetime.now()
    return f"{notebook}-{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"


def reserve_run_dir(output_dir: str | Path, run_name: str = "", *, notebook: str = "") -> Path:
    """Create an empty run folder and mark it as reserved for the runner (its pid and host in the marker).

    Args:
        output_dir: where run folders go (created when missing).
        run_name: the folder's name; empty: the first free default name of ``notebook``.
        notebook: the notebook's name, for a default name.

    Raises:
        RunFolderExistsError: ``run_name`` exists (runs are never overwritten).
        VinakitError: the folder cannot be created (a path under a file, no permission, a full disk).
    """
    path = _new_run_dir(Path(output_dir), run_name, notebook)
    write_json(path / RESERVED_MARKER, _process())
    return path


def _new_run_dir(output_dir: Path, run_name: str, notebook: str) -> Path:
    """Create the folder atomically (mkdir without exist_ok); a taken default name moves on by a millisecond."""
    now = _dt.datetime.now()
    tries = 1 if run_name else _NAME_TRIES
    for attempt in range(tries):
        path = output_dir / (run_name or default_run_name(notebook, now + _dt.timedelta(milliseconds=attempt)))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            return path
        except FileExistsError:
            if not path.parent.is_dir():
                raise _cannot_create(path, "a file is in the way") from None
            if run_name:
                raise RunFolderExistsError(_exists_message(path)) from None
        except OSError as error:
            raise _cannot_create(path, error.strerror or str(error)) from None
    raise VinakitError(f"No free run folder name in {output_dir} after {tries} tries: set run_name.")


def _exists_message(path: Path) -> str:
    return (f"Run folder {path} already exists and runs are never overwritten: choose another run_name "
            f"(or leave run_name empty for a timestamped one).")


def _cannot_create(path: Path, reason: str) -> VinakitError:
    return VinakitError(f"Cannot create the run folder {path}: {reason}. Set output_dir to a folder you can write "
                        f"to, on a disk with free space.")


def _claim_run_dir(path: Path) -> None:
    """Take a folder reserved by the runner; an existing run is never reused."""
    leftovers = {p.name for p in path.iterdir()} - {RESERVED_MARKER, RANKS_DIR}
    reserved = (path / RESERVED_MARKER).exists()
    if not reserved or any(not name.endswith(".ipynb") for name in leftovers):
        raise RunFolderExistsError(_exists_message(path))
    (path / RESERVED_MARKER).unlink()


def _process() -> dict[str, Any]:
    """This process, as a run records it: a run whose process is gone is not running any more."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


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


def shared_path(path: str | os.PathLike[str]) -> Path:
    """The path the ranks of a distributed run share for ``path`` (the same path outside one).

    A rank other than 0 writes its records into its own folder under ``ranks/`` (see :func:`start_run`), but the
    trainer's checkpoints must be one folder for every rank: each rank saves its RNG state (and, under
    DeepSpeed/FSDP, its shard) there, and a resume reads them from the run folder.
    """
    path = Path(path)
    rank_dir, shared = os.environ.get(RANK_DIR_ENV), os.environ.get(SHARED_RUN_DIR_ENV)
    if not rank_dir or not shared:
        return path
    try:
        return Path(shared) / path.resolve().relative_to(Path(rank_dir).resolve())
    except ValueError:  # not inside this rank's folder
        return path


class Metrics(dict):
    """The content of metrics.json. A dict of its own type, so a notebook re-validating its parameters
    (which are plain literals) never mistakes a metrics variable for a parameter."""


class SavedPath(type(Path())):  # type: ignore[misc]  # the concrete class: Path itself cannot be subclassed on 3.11
    """A path that a notebook cell ending with it shows as ``saved <path>``, not as ``PosixPath('...')``."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(f"saved {self}")


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
        """Save a matplotlib figure as PNG in the run folder; returns its path."""
        path = SavedPath(self.path / (name if name.endswith(".png") else f"{name}.png"))
        figure.savefig(path, dpi=120, bbox_inches="tight")
        return path

    def finish(self, status: str = "completed") -> None:
        """Mark the run finished; on a GPU also record its peak memory next to the plan's estimate."""
        from vinakit.device import peak_memory_gib

        peak = peak_memory_gib()  # None on a CPU
        if peak is not None:
            self.log_metrics(peak_memory_gib=max(peak, self.read_json("metrics.json").get("peak_memory_gib") or 0))
        mark_run(self.path, status)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def mark_run(path: str | os.PathLike[str], status: str, **details: Any) -> dict[str, Any]:
    """Record how a run ended in its manifest.json: ``status``, ``finished_at`` and ``details``.

    A completed run stays completed (nothing is recorded after it), and an upload that failed stays
    ``upload_failed`` when the exception it raised is recorded after it (the details are added). Completing a run
    drops the error an earlier attempt recorded (an interactive session that fixed a cell and ran on).

    Args:
        path: the run folder (a missing manifest.json is created).
        status: one of :data:`ENDED`.
        details: e.g. ``error={"type": ..., "message": ..., "cell": ...}``, ``failed_step``, ``interrupted_by``.

    Returns:
        The manifest as written.
    """
    if status not in ENDED:
        raise ValueError(f"status must be one of {ENDED}, got {status!r}")
    manifest_path = Path(path) / "manifest.json"
    manifest = read_json(manifest_path)
    current = manifest.get("status")
    if current == "completed" and status != "completed":  # what happens after the end does not undo it
        return manifest
    keep = current == "upload_failed" and status == "failed"
    if status == "completed":
        for name in ("error", "failed_step", "interrupted_by"):
            manifest.pop(name, None)
    manifest.update(details)
    manifest.update(status=current if keep else status, finished_at=manifest.get("finished_at") if keep else _now())
    write_json(manifest_path, manifest)
    return manifest


def error_details(error: BaseException, cell: int | None = None) -> dict[str, Any]:
    """``error`` as a manifest records it: the exception type, its first line, the cell, the step (if known)."""
    details = error_entry(type(error).__name__, str(error), cell)
    if getattr(error, "step", None) is not None:
        details["failed_step"] = error.step
    return details


def error_entry(kind: str, message: str, cell: int | None) -> dict[str, Any]:
    """The manifest's ``error``: the exception type, the first line of its message, the cell (None: no cell)."""
    first_line = next((line for line in message.splitlines() if line.strip()), "")
    return {"error": {"type": kind, "message": first_line, "cell": cell}}


_cell_watcher: Any = None  # the IPython hook of the latest run started in this kernel


def _watch_cells(run: Run) -> None:
    """In an IPython kernel (Jupyter, Colab, papermill), mark the run failed, or interrupted, when a cell raises.

    ``vinakit run`` records the same from outside, also when the kernel dies; this hook covers notebooks run
    by hand. Only the latest run of a kernel is watched.
    """
    global _cell_watcher
    ipython = sys.modules.get("IPython")  # never imported here: outside IPython there is nothing to watch
    shell = ipython.get_ipython() if ipython else None
    if shell is None:
        return
    if _cell_watcher is not None:
        with contextlib.suppress(ValueError):
            shell.events.unregister("post_run_cell", _cell_watcher)

    def after_cell(result: Any) -> None:
        error = getattr(result, "error_in_exec", None)
        if error is None:
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        with contextlib.suppress(OSError, VinakitError):  # a full disk must not hide the cell's own error
            mark_run(run.path, status, **error_details(error, getattr(result, "execution_count", None)))

    shell.events.register("post_run_cell", after_cell)
    _cell_watcher = after_cell


def start_run(params: Any) -> Run:
    """Create the run folder for validated notebook params and write params.yaml and the first manifest.

    The folder is ``<output_dir>/<run_name>`` (``run_name`` empty: ``<notebook>-<timestamp>``). An existing
    folder is never overwritten, except one that ``vinakit run`` reserved for this very execution. The manifest
    records this process (``pid``, ``host``), so ``vinakit runs`` can tell a run that died from a running one.

    Raises:
        ParamsError: ``resume_from`` is set and a parameter a resume cannot change differs from the earlier run.
    """
    from vinakit import quiet
    from vinakit.resume import check_resume

    quiet.install()  # the first kit call of every notebook: before any model library is imported
    check_resume(params)  # before any folder is made: also for notebooks run by hand or by plain papermill
    output_dir = Path(params.output_dir).expanduser()
    reserved = output_dir / params.run_name if params.run_name else None
    rank_dir = os.environ.get(RANK_DIR_ENV)
    if rank_dir:  # one gate for every record a rank other than 0 writes: its own folder under ranks/
        path = Path(rank_dir)
        path.mkdir(parents=True, exist_ok=True)
    elif reserved is not None and reserved.is_dir():
        _claim_run_dir(reserved)
        path = reserved
    else:
        path = _new_run_dir(output_dir, params.run_name, params.notebook)
    run_name = path.name
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
        **_process(),
    )
    _watch_cells(run)
    return run
