"""Command line: ``vinakit run NOTEBOOK [-f YAML]... [-p NAME VALUE]...``.

Parameters are validated before any kernel starts (a typo fails in well under a second); the notebook is
then executed headless with papermill into ``<output_dir>/<run_name>/``, which is never overwritten.
``vinakit plan`` resolves the same parameters and estimates the run's peak memory on a device profile
(exit 0: it fits, 3: it does not); ``vinakit params`` prints the resolved parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vinakit.errors import VinakitError
from vinakit.params import NOTEBOOK_PARAMS, params_class
from vinakit.record import default_run_name, reserve_run_dir

PLAN_DOES_NOT_FIT = 3  # exit status of `vinakit plan` when the estimate exceeds the device's memory


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
    """Validate parameters, reserve the run folder and execute the notebook into it. Returns the folder."""
    path = find_notebook(notebook)
    cls = params_class(path.stem)
    params = cls.from_sources(yaml_files, overrides)  # raises ParamsError before any kernel starts
    values = cls.yaml_values(yaml_files)
    values.update({name: getattr(params, name) for name, _ in overrides})
    run_name = params.run_name or default_run_name(cls.notebook)
    values["run_name"] = run_name
    output_dir = Path(params.output_dir).expanduser().resolve()
    values["output_dir"] = str(output_dir)
    run_dir = reserve_run_dir(output_dir, run_name)
    executed = run_dir / path.name
    print(f"vinakit: running {path} -> {executed}", flush=True)

    import papermill  # heavy: imported only once the parameters are known to be valid

    try:
        papermill.execute_notebook(str(path), str(executed), parameters=values, kernel_name=kernel_name,
                                   progress_bar=progress_bar, log_output=False, cwd=str(Path.cwd()))
    except papermill.PapermillExecutionError as exc:
        raise VinakitError(f"The {cls.notebook} notebook failed in cell {exc.exec_count}: {exc.ename}: "
                           f"{exc.evalue}\nThe executed notebook with the error is {executed}.") from None
    return run_dir


def _add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help=f"one of {', '.join(NOTEBOOK_PARAMS)} or a path to a .ipynb")
    parser.add_argument("-f", "--file", dest="yaml_files", action="append", default=[],
                        help="params YAML file (repeatable; later files win)")
    parser.add_argument("-p", "--param", dest="overrides", action="append", nargs=2, default=[],
                        metavar=("NAME", "VALUE"), help="set one parameter (repeatable; wins over -f)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vinakit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a notebook headless into a new run folder")
    _add_params_arguments(run)
    run.add_argument("-k", "--kernel", default="python3", help="Jupyter kernel name (default python3)")
    run.add_argument("--no-progress", action="store_true", help="hide papermill's cell progress bar")
    check = sub.add_parser("params", help="validate parameters and print the resolved values as YAML")
    _add_params_arguments(check)
    plan = sub.add_parser("plan", help="estimate precision, optimizer and peak memory on a device (exit 3: too big)")
    _add_params_arguments(plan)
    plan.add_argument("--device", default=None, metavar="PROFILE",
                      help="device profile to plan for (t4, l4, rtx4090, a100, a100-80, h100, cpu); default "
                           "$VINAKIT_DEVICE_PROFILE, else this machine")
    return parser


def _resolved_params(args: argparse.Namespace) -> Any:
    """The notebook's parameters from -f/-p, validated exactly as ``vinakit run`` does."""
    return params_class(args.notebook).from_sources(args.yaml_files, [tuple(o) for o in args.overrides])


def _print_params(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_resolved_params(args).to_dict(), allow_unicode=True, sort_keys=False), end="")
    return 0


def _print_plan(args: argparse.Namespace) -> int:
    from vinakit.plan import estimate, plan_profile

    params = _resolved_params(args)  # invalid parameters fail before any device or model is looked at
    plan = estimate(params, plan_profile(args.device))
    print(plan.to_table())
    return 0 if plan.fits else PLAN_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vinakit`` console script (exit 2: an error; 3: ``plan`` does not fit)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "params":
            return _print_params(args)
        if args.command == "plan":
            return _print_plan(args)
        run_dir = run_notebook(args.notebook, args.yaml_files, [tuple(o) for o in args.overrides],
                               kernel_name=args.kernel, progress_bar=not args.no_progress)
    except VinakitError as exc:
        print(f"vinakit: error: {exc}", file=sys.stderr)
        return 2
    print(f"vinakit: done. Results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
