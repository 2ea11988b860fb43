"""Resuming a run: the earlier run's settings are the base, and what a resume cannot change is refused early.

``resume_from`` names an earlier SFT or CPT run folder (or a checkpoint inside it). ``vinakit run`` then takes
that run's ``params.yaml`` as the base and puts the ``-p`` overrides on top. ``-f`` files do not change the base:
repeating the first command's preset would otherwise undo the earlier run's own ``-p`` values (train the
preset's 300 steps instead of the 60 asked for); a value of a ``-f`` file that differs is shown as a note.

Parameters that fix the shape or the meaning of the saved weights (:data:`FIXED_ON_RESUME`) must stay as they
were: a change is refused before any kernel starts, naming each parameter with both values. The same check runs
in :func:`vinakit.record.start_run`, for notebooks run by hand or by plain papermill.

Nothing heavy is imported here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vinakit.errors import ParamsError, VinakitError
from vinakit.params import NotebookParams, read_yaml
from vinakit.record import read_json

PARAMS_FILE = "params.yaml"
_LORA = ("model_name", "full_finetuning", "rank", "lora_alpha", "target_modules", "use_rslora", "use_dora",
         "chat_template", "max_seq_length", "dataset")
# What a resume cannot change: the adapter's shape and scale, the base, the template and the data it was fitted
# to (CPT: the words it added; the stage order is checked by vinakit.stages.completed_stages).
FIXED_ON_RESUME: dict[str, tuple[str, ...]] = {
    "sft": _LORA,
    "cpt": (*_LORA, "text_field", "new_tokens", "num_new_tokens", "new_token_min_count"),
}
_NOT_INHERITED = ("run_name", "resume_from")  # a resume is a new run folder, resuming from the one it names


@dataclass
class Resolved:
    """The parameters of a ``vinakit run``.

    Attributes:
        params: the validated dataclass.
        values: what papermill injects (with resume_from: every parameter of the earlier run, then ``-p``).
        notes: one line per ``-f`` value a resume did not apply.
    """

    params: NotebookParams
    values: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def resolve(cls: type[NotebookParams], yaml_files: typing.Sequence[str | Path],
            overrides: typing.Sequence[tuple[str, str]]) -> Resolved:
    """Validate ``-f``/``-p`` like :meth:`NotebookParams.from_sources`; with ``resume_from``, on top of the
    earlier run's ``params.yaml`` (see the module docstring).

    Raises:
        ParamsError: invalid parameters, a resume_from that is not a run of this notebook, or a parameter a resume
            cannot change.
        VinakitError: nothing to resume from (no complete checkpoint or stage).
    """
    params = cls.from_sources(yaml_files, overrides)
    explicit = {name: getattr(params, name) for name, _ in overrides}
    if not getattr(params, "resume_from", ""):
        return Resolved(params, {**cls.yaml_values(yaml_files), **explicit})
    earlier = earlier_run_dir(params.resume_from)
    values = {**earlier_values(cls, earlier), **explicit, "resume_from": params.resume_from}
    resumed = cls.validate(values, source=f"{earlier / PARAMS_FILE} with the -p values")
    check_resume(resumed)
    notes = [f"resume: kept {name}={getattr(resumed, name)!r} from {earlier.name} (the -f files say "
             f"{getattr(params, name)!r}; set it with -p to change it)"
             for name in cls.yaml_values(yaml_files)
             if name not in explicit and name not in _NOT_INHERITED and getattr(params, name) != getattr(resumed, name)]
    return Resolved(resumed, values, notes)


def earlier_run_dir(resume_from: str) -> Path:
    """The run folder ``resume_from`` names (it may name a checkpoint inside the run).

    Raises:
        ParamsError: no ``params.yaml`` there or in the two folders above.
    """
    folder = Path(resume_from).expanduser()
    for candidate in (folder, *list(folder.parents)[:2]):
        if (candidate / PARAMS_FILE).is_file():
            return candidate
    raise ParamsError(f"resume_from={resume_from}: no {PARAMS_FILE} there: give the folder of an earlier sft or "
                      f"cpt run (outputs/<run>).")


def earlier_values(cls: type[NotebookParams], run_dir: Path) -> dict[str, Any]:
    """The earlier run's parameters, without the ones a resume never inherits (run_name, resume_from).

    Raises:
        ParamsError: the folder is a run of another notebook.
    """
    notebook = read_json(run_dir / "manifest.json").get("notebook")
    if notebook and notebook != cls.notebook:
        raise ParamsError(f"resume_from={run_dir} is a run of the {notebook} notebook; the {cls.notebook} notebook "
                          f"resumes only its own runs (vinakit run {notebook} -p resume_from {run_dir}).")
    values = read_yaml(run_dir / PARAMS_FILE)
    return {name: value for name, value in values.items() if name not in _NOT_INHERITED}


def check_resume(params: NotebookParams) -> None:
    """Refuse a resume that changes what the saved weights depend on, or that has nothing to resume from.

    Does nothing without ``resume_from``.

    Raises:
        ParamsError: a parameter of :data:`FIXED_ON_RESUME` (or CPT's stage order) differs from the earlier run.
        VinakitError: the earlier run has no complete checkpoint (SFT) or stage (CPT) yet.
    """
    if not getattr(params, "resume_from", ""):
        return
    earlier = earlier_run_dir(params.resume_from)
    before = type(params).validate(earlier_values(type(params), earlier), source=str(earlier / PARAMS_FILE))
    changed = [f"{name}: {getattr(before, name)!r} -> {getattr(params, name)!r}"
               for name in FIXED_ON_RESUME.get(params.notebook, ()) if getattr(before, name) != getattr(params, name)]
    if changed:
        raise ParamsError(f"resume_from={params.resume_from}: a resume cannot change {'; '.join(changed)} (the "
                          f"earlier run's value first). The checkpoint was trained with the earlier values: drop "
                          f"these -p values, or start a new run without resume_from.")
    if params.notebook == "cpt":
        from vinakit.stages import completed_stages

        completed_stages(params)  # the completed stages must start the planned ones
    if resume_point(earlier, params.notebook) is None:
        raise VinakitError(f"resume_from={params.resume_from}: no complete checkpoint to resume from (checkpoints "
                           f"are written every save_steps steps); start the run again without resume_from.")


def resume_point(run_dir: Path, notebook: str) -> Path | None:
    """What a resume of ``run_dir`` would continue from: the newest complete checkpoint (SFT), or the newest
    completed stage or stage checkpoint (CPT); None when there is none."""
    from vinakit.train import last_checkpoint

    if notebook != "cpt":
        try:
            return last_checkpoint(run_dir)
        except VinakitError:
            return None
    from vinakit.stages import STAGE_FILE, STAGES_DIR

    found = None
    for stage in sorted(Path(run_dir, STAGES_DIR).glob("*")):
        if (stage / STAGE_FILE).is_file():
            found = stage
            continue
        try:
            found = last_checkpoint(stage)
        except VinakitError:
            pass
    return found
