"""How runs ended, seen from outside the kernel: what ``vinakit run`` records when a notebook fails or is stopped,
and ``vinakit runs``, the list of run folders.

``manifest.json`` says ``status: running`` until the run ends, then ``completed``, ``failed`` (with ``error``: the
cell, the exception type and its first line, and ``failed_step`` when training diverged), ``interrupted``
(Ctrl-C or SIGTERM during ``vinakit run``) or ``upload_failed`` (the export's Hub upload failed; every file is
kept). A run records its process (``pid`` and ``host``); ``vinakit runs`` shows a run still marked running whose
process is gone as ``stale``, and one started on another host, which it cannot check, as ``running?``. A folder
``vinakit run`` reserved whose kernel never started shows ``starting`` while the runner lives, else ``stale``.
A pid the system has since given to another process would show as running: rare, and no harm is done.

Nothing heavy is imported here.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vinakit.errors import VinakitError
from vinakit.params import params_class
from vinakit.record import RESERVED_MARKER, mark_run, read_json
from vinakit.report import REPORT_FILE

# The figure `vinakit runs` shows per run: the first of these its metrics.json has.
KEY_METRICS = ("perplexity_after", "format_valid_rate", "merge_max_abs_logit_diff", "eval_loss", "train_loss")


# --------------------------------------------------------------------------------------------------------------
# Recording how a run ended (the runner's side; the kernel records the same through vinakit.record)
# --------------------------------------------------------------------------------------------------------------


def record_end(run_dir: Path, notebook: str, status: str, **details: Any) -> dict[str, Any]:
    """Mark a run folder ``status`` in its manifest (created when the kernel never wrote one) and free the
    runner's reservation: the folder is a finished run now, never to be claimed again."""
    (run_dir / RESERVED_MARKER).unlink(missing_ok=True)
    return mark_run(run_dir, status, notebook=notebook, run_name=run_dir.name, **details)


def rerun_command(notebook: str, yaml_files: Sequence[str], overrides: Sequence[tuple[str, str]]) -> str:
    """The ``vinakit run`` command that starts the run again (without its run_name, which is taken now)."""
    args = ["vinakit", "run", notebook]
    for path in yaml_files:
        args += ["-f", path]
    for name, value in overrides:
        if name != "run_name":
            args += ["-p", name, value]
    return shlex.join(args)


def next_step(run_dir: Path, notebook: str, rerun: str, launch: Sequence[str] = ()) -> str:
    """What to do after a failed or interrupted run: resume from its last checkpoint, or run it again.

    ``launch``: the distributed launcher's options (``--nproc 2 ...``), repeated in the resume command.
    """
    from vinakit.resume import resume_point

    resumable = "resume_from" in params_class(notebook).field_types()
    point = resume_point(run_dir, notebook) if resumable and (run_dir / "params.yaml").is_file() else None
    if point is None:
        before = "No checkpoint was written yet. " if resumable else ""
        return f"{before}Run it again with: {rerun}"
    resume = shlex.join(["vinakit", "run", notebook, "-p", "resume_from", str(run_dir), *launch])
    return f"Last checkpoint: {point}. Resume with: {resume}"


# --------------------------------------------------------------------------------------------------------------
# vinakit runs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRow:
    """One line of ``vinakit runs``."""

    name: str
    status: str
    notebook: str
    started: str
    duration: str
    metric: str
    report: str = ""  # "report.html" when the run folder has one: the executed notebook, for any browser


def list_runs(output_dir: str | os.PathLike[str] = "outputs") -> list[RunRow]:
    """The run folders of ``output_dir``, oldest first (folders without a manifest or a reservation are skipped)."""
    root = Path(output_dir).expanduser()
    if not root.is_dir():
        raise VinakitError(f"{root} is not a folder: give the output_dir your runs went to (--output-dir).")
    rows = [_row(folder) for folder in sorted(root.iterdir()) if _is_run(folder)]
    return sorted(rows, key=lambda row: (row.started or "~", row.name))


def runs_table(rows: Sequence[RunRow]) -> str:
    """``rows`` as an aligned text table."""
    header = RunRow("run", "status", "notebook", "started", "duration", "metric", "report")
    lines = [header, *rows]
    widths = [max(len(getattr(line, name)) for line in lines) for name in RunRow.__dataclass_fields__]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(vars(line).values(), widths)).rstrip()
                     for line in lines)


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "manifest.json").is_file() or (folder / RESERVED_MARKER).is_file())


def _row(folder: Path) -> RunRow:
    manifest = _read_or_empty(folder / "manifest.json")
    metrics = _read_or_empty(folder / "metrics.json")
    notebook = str(manifest.get("notebook") or next((p.stem for p in folder.glob("*.ipynb")), "?"))
    started, finished = _time(manifest.get("started_at")), _time(manifest.get("finished_at"))
    status = shown_status(manifest, _read_or_empty(folder / RESERVED_MARKER) if not manifest else None)
    end = finished or (_dt.datetime.now().astimezone() if status == "running" else None)
    return RunRow(folder.name, status, notebook, started.strftime("%Y-%m-%d %H:%M:%S") if started else "",
                  _duration(end - started) if started and end else "", _key_metric(metrics),
                  REPORT_FILE if (folder / REPORT_FILE).is_file() else "")


def shown_status(manifest: dict[str, Any], marker: dict[str, Any] | None = None) -> str:
    """The status ``vinakit runs`` shows: the manifest's, with ``stale`` for a run whose process is gone.

    Args:
        manifest: the run's manifest ({} when the kernel never wrote one).
        marker: the runner's reservation (its pid and host), for a folder without a manifest.
    """
    if not manifest:
        return "starting" if process_alive(marker or {}) else "stale"
    status = str(manifest.get("status") or "unknown")
    if status != "running":
        return status
    alive = process_alive(manifest)
    return "running?" if alive is None else "running" if alive else "stale"


def process_alive(record: dict[str, Any]) -> bool | None:
    """Whether the process ``record`` names (``pid``, ``host``) still runs; None when it cannot be checked."""
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None if record else False
    try:
        import psutil
    except ImportError:  # pinned in requirements.txt; without it a zombie process would count as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _read_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except VinakitError:  # half-written by a killed process, or an old plain-text marker
        return {}
    return data if isinstance(data, dict) else {}


def _time(text: Any) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


def _duration(delta: _dt.timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _key_metric(metrics: dict[str, Any]) -> str:
    for name in KEY_METRICS:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{name}={value:.4g}"
    return ""
