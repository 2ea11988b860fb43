"""Command line: ``vinakit run NOTEBOOK [-f YAML]... [-p NAME VALUE]...``.

Parameters are validated before any kernel starts (a typo fails in well under a second); the notebook is
then executed headless with papermill into ``<output_dir>/<run_name>/``, which is never overwritten. With
``resume_from`` the earlier run's params.yaml is the base (:mod:`vinakit.resume`). How the run ends goes into
its manifest.json (:mod:`vinakit.status`): a failed cell (exit 2), or Ctrl-C/SIGTERM (exit 130), after which one
line names the last checkpoint and the command that resumes from it. ``vinakit runs`` lists the run folders with
their status. ``vinakit plan`` resolves the same parameters and estimates the run's peak memory on a device
profile (exit 0: it fits, 3: it does not); ``vinakit params`` prints the resolved parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from vinakit.errors import VinakitError
from vinakit.params import NOTEBOOK_PARAMS, params_class
from vinakit.quiet import HEADLESS_ENV, KERNEL_ARGUMENTS
from vinakit.record import error_entry, reserve_run_dir
from vinakit.report import REPORT_FILE, write_report
from vinakit.resume import Resolved, resolve
from vinakit.status import list_runs, next_step, record_end, rerun_command, runs_table

EXIT_ERROR = 2
PLAN_DOES_NOT_FIT = 3  # exit status of `vinakit plan` when the estimate exceeds the device's memory
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports after Ctrl-C
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NOTEBOOK_WRITE_WAIT_S = 10  # after the kernel is stopped, papermill writes what ran into the executed notebook


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during ``vinakit run``.

    A KeyboardInterrupt, so that no ``except Exception`` between the signal handler and the runner swallows it.

    Args:
        signal_name: "SIGINT" or "SIGTERM".
        message: the one line the runner prints (default: the signal's name).
    """

    def __init__(self, signal_name: str, message: str = "") -> None:
        super().__init__(message or signal_name)
        self.signal_name = signal_name


def find_notebook(name: str) -> Path:
    """Resolve ``sft`` or ``notebooks/sft.ipynb`` to the notebook file."""
    candidate = Path(name)
    if candidate.suffix == ".ipynb" and candidate.is_file():
        return candidate
    stem = candidate.stem
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        path = root / "notebooks" / f"{stem}.ipynb"
        if path.is_file():
            return path
    raise VinakitError(f"Notebook '{name}' not found: looked for notebooks/{stem}.ipynb in the current folder "
                       f"and in the vinakit checkout. Known notebooks: {', '.join(NOTEBOOK_PARAMS)}.")


def run_notebook(notebook: str, yaml_files: list[str], overrides: list[tuple[str, str]],
                 kernel_name: str = "python3", progress_bar: bool = True) -> Path:
    """Validate parameters, reserve the run folder and execute the notebook into it. Returns the folder.

    Raises:
        VinakitError: invalid parameters (before any folder is made), or the notebook failed: the run is marked
            failed (cell, exception type, first line) and the message says what to do next.
        RunInterrupted: SIGINT or SIGTERM: the kernel was stopped and the run marked interrupted.
    """
    path = find_notebook(notebook)
    cls = params_class(path.stem)
    resolved = _resolve(cls, yaml_files, overrides)  # raises ParamsError before any kernel starts
    output_dir = Path(resolved.params.output_dir).expanduser().resolve()
    run_dir = reserve_run_dir(output_dir, resolved.params.run_name, notebook=cls.notebook)
    values = {**resolved.values, "run_name": run_dir.name, "output_dir": str(output_dir)}
    executed = run_dir / path.name
    print(f"vinakit: running {path} -> {executed}", flush=True)
    rerun = rerun_command(notebook, yaml_files, overrides)
    try:
        _execute(path, executed, values, kernel_name, progress_bar)
    except KeyboardInterrupt as stop:
        name = getattr(stop, "signal_name", "SIGINT")
        status = record_end(run_dir, cls.notebook, "interrupted", interrupted_by=name)["status"]
        raise RunInterrupted(name, f"interrupted ({name}): {run_dir} is marked {status}. "
                                   f"{next_step(run_dir, cls.notebook, rerun)}{_report(executed)}") from None
    except Exception as error:  # noqa: BLE001 - whatever stopped papermill, the run folder must say so
        raise _failed(error, run_dir, executed, cls.notebook, rerun) from None
    note = _report(executed)
    if not (run_dir / REPORT_FILE).is_file():
        print(note.strip(), file=sys.stderr, flush=True)
    return run_dir


def _report(executed: Path) -> str:
    """Write the run's report.html (also after a failure: whatever ran) and return the line naming it.

    A report that cannot be written never hides how the run ended: the reason is returned in its place.
    """
    try:
        path = write_report(executed)
    except Exception as error:  # noqa: BLE001 - the run's own outcome is what the runner must report
        first = (str(error).splitlines() or [""])[0]
        return f"\nvinakit: no {REPORT_FILE}: {type(error).__name__}: {first}"
    return f"\nvinakit: report (opens in any browser): {path}" if path else ""


def _resolve(cls: Any, yaml_files: list[str], overrides: list[tuple[str, str]]) -> Resolved:
    resolved = resolve(cls, yaml_files, overrides)
    for note in resolved.notes:
        print(f"vinakit: {note}", file=sys.stderr, flush=True)
    return resolved


def _execute(path: Path, executed: Path, values: dict[str, Any], kernel_name: str, progress_bar: bool) -> None:
    """Run papermill in a worker thread while this (main) thread owns SIGINT and SIGTERM.

    nbclient's own signal handling asks a busy kernel to shut down and then waits for it, so a Ctrl-C did not
    stop a training run. Here a signal raises :class:`RunInterrupted` in the main thread, which kills the kernel
    this call started and lets papermill write what ran into the executed notebook.
    """
    outcome: dict[str, BaseException] = {}
    with _signals_interrupt(), _headless_env():
        import papermill  # heavy: imported only once the parameters are known to be valid

        def work() -> None:
            try:
                papermill.execute_notebook(str(path), str(executed), parameters=values, kernel_name=kernel_name,
                                           progress_bar=progress_bar, log_output=False, cwd=str(Path.cwd()),
                                           extra_arguments=list(KERNEL_ARGUMENTS))
            except BaseException as error:  # noqa: BLE001 - handed to the main thread below
                outcome["error"] = error

        earlier = _child_pids()
        worker = threading.Thread(target=work, name="vinakit-papermill", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt:
            for number in _STOP_SIGNALS:
                signal.signal(number, signal.SIG_IGN)  # the cleanup is not cut short by a second Ctrl-C
            _kill_new_children(earlier)
            worker.join(_NOTEBOOK_WRITE_WAIT_S)
            raise
    if "error" in outcome:
        raise outcome["error"]


@contextlib.contextmanager
def _headless_env() -> Iterator[None]:
    """``VINAKIT_HEADLESS=1`` during the run: the kernel inherits it and draws text progress bars (vinakit.quiet)."""
    previous = os.environ.get(HEADLESS_ENV)
    os.environ[HEADLESS_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(HEADLESS_ENV, None)
        else:
            os.environ[HEADLESS_ENV] = previous


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`RunInterrupted` (signal handlers exist only in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(number: int, frame: Any) -> None:
        raise RunInterrupted(signal.Signals(number).name)

    previous = {number: signal.signal(number, handler) for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _child_pids() -> set[int]:
    try:
        import psutil
    except ImportError:
        return set()
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _kill_new_children(earlier: set[int]) -> None:
    """Kill the processes started since ``earlier`` was taken: the kernel (and whatever it started).

    Without psutil (pinned in requirements.txt) nothing is killed here; the kernel then exits on its own once
    this process is gone (ipykernel watches its parent).
    """
    try:
        import psutil
    except ImportError:
        return
    new = [child for child in psutil.Process().children(recursive=True) if child.pid not in earlier]
    for child in new:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(new, timeout=5)


def _failed(error: Exception, run_dir: Path, executed: Path, notebook: str, rerun: str) -> VinakitError:
    """Mark the run failed (the cell, the exception type and its first line) and say what to do next."""
    if hasattr(error, "ename"):  # papermill's PapermillExecutionError: the cell's own exception
        entry = error_entry(error.ename, str(error.evalue), error.exec_count)
    else:  # the kernel died, a timeout, a write that failed ...
        entry = error_entry(type(error).__name__, str(error), None)
    cell, ename, first = entry["error"]["cell"], entry["error"]["type"], entry["error"]["message"]
    status = record_end(run_dir, notebook, "failed", **entry)["status"]
    where = f"in cell {cell}" if cell is not None else "outside any cell"
    after = f"Every file is kept in {run_dir}." if status == "upload_failed" else next_step(run_dir, notebook, rerun)
    return VinakitError(f"the {notebook} run failed {where}: {ename}: {first}\n"
                        f"vinakit: status {status} in {run_dir / 'manifest.json'}; the full error is in {executed}."
                        f"{_disk_hint(first, run_dir)} {after}{_report(executed)}")


def _disk_hint(message: str, run_dir: Path) -> str:
    if any(sign in message for sign in ("No space left", "File too large", "Errno 28", "Errno 27")):
        return f" The disk is full or a file hit a size limit: free space for {run_dir.parent}."
    return ""


def _add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help=f"one of {', '.join(NOTEBOOK_PARAMS)} or a path to a .ipynb")
    parser.add_argument("-f", "--file", dest="yaml_files", action="append", default=[],
                        help="params YAML file (repeatable; later files win)")
    parser.add_argument("-p", "--param", dest="overrides", action="append", nargs=2, default=[],
                        metavar=("NAME", "VALUE"), help="set one parameter (repeatable; wins over -f)")


def _add_distributed_arguments(run: argparse.ArgumentParser) -> None:
    """Several GPUs or machines (vinakit.launch): one rank per GPU, through torchrun or accelerate."""
    group = run.add_argument_group("several GPUs and machines (see README: Several GPUs and machines)")
    group.add_argument("--nproc", type=int, default=0, metavar="N", help="ranks (GPUs) on this node")
    group.add_argument("--nnodes", type=int, default=1, metavar="M", help="machines (default 1)")
    group.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's index, 0 .. M-1")
    group.add_argument("--master-addr", default="127.0.0.1", metavar="HOST", help="node 0's address")
    group.add_argument("--master-port", type=int, default=0, metavar="P", help="a free port on node 0")
    group.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp", "deepspeed2", "deepspeed3"),
                       help="ddp (default): the model fits on one GPU; fsdp/deepspeed3: it does not")


def _run(args: argparse.Namespace) -> Path:
    overrides = [tuple(o) for o in args.overrides]
    if not args.nproc:
        return run_notebook(args.notebook, args.yaml_files, overrides, kernel_name=args.kernel,
                            progress_bar=not args.no_progress)
    from vinakit.launch import Topology, run_distributed

    topology = Topology(nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                        master_addr=args.master_addr, master_port=args.master_port, mode=args.distributed)
    return run_distributed(args.notebook, args.yaml_files, overrides, topology, kernel_name=args.kernel)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vinakit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a notebook headless into a new run folder")
    _add_params_arguments(run)
    run.add_argument("-k", "--kernel", default="python3", help="Jupyter kernel name (default python3)")
    run.add_argument("--no-progress", action="store_true", help="hide papermill's cell progress bar")
    _add_distributed_arguments(run)
    check = sub.add_parser("params", help="validate parameters and print the resolved values as YAML")
    _add_params_arguments(check)
    plan = sub.add_parser("plan", help="estimate precision, optimizer and peak memory on a device (exit 3: too big)")
    _add_params_arguments(plan)
    runs = sub.add_parser("runs", help="list the run folders with status, notebook, start, duration, key metric")
    runs.add_argument("--output-dir", default="outputs", help="where the run folders are (default outputs)")
    plan.add_argument("--device", default=None, metavar="PROFILE",
                      help="device profile to plan for (t4, l4, rtx4090, a100, a100-80, h100, cpu); default "
                           "$VINAKIT_DEVICE_PROFILE, else this machine")
    plan.add_argument("--nproc", type=int, default=1, metavar="N", help="memory of one of N ranks (per GPU)")
    plan.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp", "deepspeed2", "deepspeed3"),
                      help="how the N ranks share the model (default ddp: a whole copy per GPU)")
    return parser


def _resolved_params(args: argparse.Namespace) -> Any:
    """The notebook's parameters from -f/-p, validated exactly as ``vinakit run`` does."""
    return _resolve(params_class(args.notebook), args.yaml_files, [tuple(o) for o in args.overrides]).params


def _print_params(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_resolved_params(args).to_dict(), allow_unicode=True, sort_keys=False), end="")
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    from vinakit.plan import estimate, plan_profile

    params = _resolved_params(args)  # invalid parameters fail before any device or model is looked at
    plan = estimate(params, plan_profile(args.device))
    if args.nproc > 1:
        from vinakit.plan import per_rank

        plan = per_rank(plan, args.nproc, args.distributed)
    print(plan.to_table())
    return 0 if plan.fits else PLAN_DOES_NOT_FIT


def _print_runs(args: argparse.Namespace) -> int:
    rows = list_runs(args.output_dir)
    print(runs_table(rows) if rows else f"No run folders in {args.output_dir}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vinakit`` console script (exit 2: an error; 3: ``plan`` does not fit; 130: ``run`` was
    interrupted)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "params":
            return _print_params(args)
        if args.command == "plan":
            return _print_plan(args)
        if args.command == "runs":
            return _print_runs(args)
        run_dir = _run(args)
    except VinakitError as exc:
        print(f"vinakit: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as stop:  # one line, never a traceback
        # by attribute: under `python -m vinakit.cli` the launcher's RunInterrupted is vinakit.cli's, not __main__'s
        message = str(stop) if hasattr(stop, "signal_name") else "interrupted before the run started"
        print(f"vinakit: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"vinakit: done. Results: {run_dir}")
    report = run_dir / REPORT_FILE
    if report.is_file():
        print(f"vinakit: report (opens in any browser): {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
