"""Command line: ``vinakit run NOTEBOOK [-f YAML]... [-p NAME VALUE]...``.

Parameters are validated before any kernel starts (a typo fails in well under a second); the notebook is
then executed headless with papermill into ``<output_dir>/<run_name>/``, which is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vinakit.errors import VinakitError
from vinakit.params import NOTEBOOK_PARAMS, params_class
from vinakit.record import default_run_name, reserve_run_dir


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vinakit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a notebook headless into a new run folder")
    run.add_argument("notebook", help=f"one of {', '.join(NOTEBOOK_PARAMS)} or a path to a .ipynb")
    run.add_argument("-f", "--file", dest="yaml_files", action="append", default=[],
                     help="params YAML file (repeatable; later files win)")
    run.add_argument("-p", "--param", dest="overrides", action="append", nargs=2, default=[],
                     metavar=("NAME", "VALUE"), help="set one parameter (repeatable; wins over -f)")
    run.add_argument("-k", "--kernel", default="python3", help="Jupyter kernel name (default python3)")
    run.add_argument("--no-progress", action="store_true", help="hide papermill's cell progress bar")
    check = sub.add_parser("params", help="validate parameters and print the resolved values as YAML")
    check.add_argument("notebook")
    check.add_argument("-f", "--file", dest="yaml_files", action="append", default=[])
    check.add_argument("-p", "--param", dest="overrides", action="append", nargs=2, default=[],
                       metavar=("NAME", "VALUE"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vinakit`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "params":
            import yaml

            params = params_class(args.notebook).from_sources(args.yaml_files, [tuple(o) for o in args.overrides])
            print(yaml.safe_dump(params.to_dict(), allow_unicode=True, sort_keys=False), end="")
            return 0
        run_dir = run_notebook(args.notebook, args.yaml_files, [tuple(o) for o in args.overrides],
                               kernel_name=args.kernel, progress_bar=not args.no_progress)
    except VinakitError as exc:
        print(f"vinakit: error: {exc}", file=sys.stderr)
        return 2
    print(f"vinakit: done. Results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
