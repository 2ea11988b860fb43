"""Fault injection through ``vinakit run``: what the user reads, the exit code and the manifest's status.

Inputs that must be refused before a kernel starts (non-finite numbers, a resume that changes the model, a run
folder that cannot be made) are checked without training. The slow cases share one output folder and a few
short runs of params/cpu_tiny.yaml: a diverging run, a run stopped by Ctrl-C and resumed without repeating its
settings, a run killed while saving its adapter and resumed from its last complete checkpoint, SIGTERM before
the first checkpoint, a write that fails mid-run (a file size limit: writes fail as on a full disk, also for
root), two runs started at once, and a Hub upload that drops halfway. The last test reads them all back through
``vinakit runs``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from vinakit.status import list_runs, process_alive

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "params" / "cpu_tiny.yaml"
BACKEND = [b for b in os.environ.get("VINAKIT_TEST_BACKENDS", "hf,unsloth").split(",") if b][0]
REPO_ID = "nguoi-dung/mo-hinh-vi"
WAIT_S = 600  # a safety stop for polling loops only: no outcome depends on it


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vinakit.cli", *args]


def sft_args(out: Path, name: str, *extra: str) -> list[str]:
    return cli("run", "sft", "-f", str(CPU_TINY), "--no-progress", "-p", "output_dir", str(out), "-p", "backend",
               BACKEND, *(("-p", "run_name", name) if name else ()), *extra)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line vinakit writes about the outcome (kernel warnings aside)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("vinakit: ")]
    assert lines, result.stderr[-3000:]
    return lines[0]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))


def _manifest_or_empty(run_dir: Path) -> dict:
    try:
        return manifest(run_dir)
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return {}


def wait_for(condition, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition() and (process is None or process.poll() is None) and time.monotonic() < deadline:
        time.sleep(0.05)


def complete(checkpoint: Path) -> bool:
    try:
        return bool(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# Refused before any kernel starts
# --------------------------------------------------------------------------------------------------------------


def refused_in_process(tmp_path: Path, cases: list[list[str]]) -> list[dict]:
    """Run ``vinakit`` on each argument list in one fresh process; rc, stderr, and whether torch was imported."""
    code = ("import contextlib, io, json, sys\nfrom vinakit.cli import main\nresults = []\n"
            f"for argv in {cases!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main(argv)\n"
            "    results.append({'rc': rc, 'stderr': err.getvalue()})\n"
            "print(json.dumps({'results': results, 'heavy': sorted(m for m in ('torch', 'papermill', "
            "'transformers') if m in sys.modules)}))")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], "refusing must not import torch or papermill"
    return report["results"]


def test_non_finite_numbers_are_refused_before_any_kernel(tmp_path: Path):
    preset = tmp_path / "inf.yaml"
    preset.write_text("sft:\n  learning_rate: .inf\n", encoding="utf-8")
    base = ["run", "sft", "-f", str(CPU_TINY), "-p", "output_dir", str(tmp_path / "runs")]
    cases = {"learning_rate inf": [*base, "-p", "learning_rate", "inf"],
             "learning_rate nan": [*base, "-p", "learning_rate", "nan"],
             "num_train_epochs nan": [*base, "-p", "num_train_epochs", "nan", "-p", "max_steps", "-1"],
             "yaml .inf": [*base, "-f", str(preset)]}
    for (case, _), got in zip(cases.items(), refused_in_process(tmp_path, list(cases.values()))):
        assert got["rc"] == 2, case
        name = case.split()[0] if "yaml" not in case else "learning_rate"
        assert re.fullmatch(rf"vinakit: error: Parameter '{name}' \(from .+\) must be a finite number, got "
                            rf"(inf|nan): inf and nan are not allowed; give a plain number such as 2e-4\.\n",
                            got["stderr"]), (case, got["stderr"])
    assert not (tmp_path / "runs").exists(), "no run folder for refused parameters"


def fake_run(root: Path, notebook: str, **params) -> Path:
    """A finished-looking run folder: params.yaml, manifest and a complete checkpoint (SFT) or stage (CPT)."""
    from vinakit.params import params_class

    folder = root / f"earlier-{notebook}"
    folder.mkdir(parents=True)
    values = {**params_class(notebook).from_sources([CPU_TINY]).to_dict(), **params, "run_name": folder.name}
    (folder / "params.yaml").write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"notebook": notebook, "status": "interrupted"}), "utf-8")
    done = folder / ("checkpoints/checkpoint-4" if notebook == "sft" else "stages/01-new_embeddings")
    done.mkdir(parents=True)
    (done / ("trainer_state.json" if notebook == "sft" else "stage.json")).write_text(
        json.dumps({"global_step": 4, "name": "new_embeddings"}), encoding="utf-8")
    return folder


def test_a_resume_that_changes_the_model_is_refused_before_any_kernel(tmp_path: Path):
    sft = fake_run(tmp_path, "sft", max_steps=12)
    cpt = fake_run(tmp_path, "cpt")
    out = ["-p", "output_dir", str(tmp_path / "runs")]
    results = refused_in_process(tmp_path, [
        ["run", "sft", "-f", str(CPU_TINY), "-p", "resume_from", str(sft), "-p", "rank", "16", *out],
        ["run", "sft", "-p", "resume_from", str(sft), "-p", "model_name", "other-model", "-p", "lora_alpha", "8",
         *out],
        ["run", "cpt", "-p", "resume_from", str(cpt), "-p", "stages", "[all_embeddings:10, full:50]", *out],
        ["run", "cpt", "-p", "resume_from", str(sft), *out],
        ["params", "sft", "-f", str(CPU_TINY), "-p", "resume_from", str(sft)],
    ])
    assert [got["rc"] for got in results] == [2, 2, 2, 2, 0]
    assert results[0]["stderr"] == (
        f"vinakit: error: resume_from={sft}: a resume cannot change rank: 64 -> 16 (the earlier run's value first). "
        f"The checkpoint was trained with the earlier values: drop these -p values, or start a new run without "
        f"resume_from.\n")
    assert "model_name: 'tiny-vi' -> 'other-model'; lora_alpha: 32 -> 8" in results[1]["stderr"]
    assert "completed the stages ['new_embeddings'], which do not start stages ['all_embeddings', 'full']" in \
        results[2]["stderr"]
    assert "is a run of the sft notebook; the cpt notebook resumes only its own runs" in results[3]["stderr"]
    # the earlier run's settings are the base: its 12 steps, not the preset's 300 (which -f would give)
    assert "kept max_steps=12 from earlier-sft (the -f files say 300" in results[4]["stderr"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", ["a path under a file", "a read-only folder"])
def test_a_run_folder_that_cannot_be_written_fails_before_any_kernel(tmp_path: Path, how: str):
    if how == "a read-only folder":
        if os.geteuid() == 0:
            pytest.skip("running as root, where chmod does not stop writes; the path under a file, and the size "
                        "limit in test_a_write_that_fails_mid_run_marks_the_run_failed, cover it")
        output_dir = tmp_path / "read-only"
        output_dir.mkdir()
        output_dir.chmod(0o555)
    else:
        (tmp_path / "a-file").write_text("", encoding="utf-8")
        output_dir = tmp_path / "a-file" / "runs"
    (got,) = refused_in_process(tmp_path, [["run", "sft", "-f", str(CPU_TINY), "-p", "output_dir", str(output_dir)]])
    assert got["rc"] == 2
    assert re.fullmatch(rf"vinakit: error: Cannot create the run folder {re.escape(str(output_dir))}/sft-\S+: .+\. "
                        rf"Set output_dir to a folder you can write to, on a disk with free space\.\n", got["stderr"])


def test_a_running_run_whose_process_is_gone_is_shown_stale():
    import socket

    from vinakit.status import shown_status

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = {"status": "running", "host": socket.gethostname()}
    assert shown_status({**here, "pid": os.getpid()}) == "running"
    assert shown_status({**here, "pid": int(gone.stdout)}) == "stale"
    assert shown_status({**here, "pid": os.getpid(), "host": "another-machine"}) == "running?"
    assert shown_status({}, {"pid": os.getpid(), "host": socket.gethostname()}) == "starting"  # reserved only
    assert shown_status({"status": "failed", "pid": int(gone.stdout), "host": here["host"]}) == "failed"


# --------------------------------------------------------------------------------------------------------------
# Runs that fail, stop or die (slow: each trains the tiny model for a few steps)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """The output folder every slow case writes into (``vinakit runs`` reads it back at the end)."""
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def diverged(out: Path) -> SimpleNamespace:
    """Learning rate 1e30 with warm-up: step 1 trains at rate 0, step 2 blows the weights up, step 3's loss is
    NaN. A checkpoint is written every step."""
    result = run(sft_args(out, "diverged", "-p", "learning_rate", "1e30", "-p", "warmup_ratio", "0.5", "-p",
                          "max_steps", "6", "-p", "save_steps", "1", "-p", "logging_steps", "1"))
    return SimpleNamespace(result=result, dir=out / "diverged")


@pytest.mark.slow
def test_training_stops_at_the_first_non_finite_loss(diverged: SimpleNamespace):
    assert diverged.result.returncode == 2, diverged.result.stderr[-3000:]
    line = error_line(diverged.result)
    assert re.match(r"vinakit: error: the sft run failed in cell \d+: TrainingDivergedError: Training stopped at "
                    r"step 3: the (loss|gradient norm) is (nan|inf) \(not a finite number\)\. Nothing was saved as "
                    r"the run's result; the last good checkpoint is kept: .*checkpoint-2\.", line), line
    record = manifest(diverged.dir)
    assert record["status"] == "failed" and record["failed_step"] == 3 and record["finished_at"]
    assert record["error"]["type"] == "TrainingDivergedError" and isinstance(record["error"]["cell"], int)
    assert not (diverged.dir / "adapter").exists(), "NaN weights are never saved as the run's result"
    checkpoints = sorted(p.name for p in (diverged.dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"] and complete(diverged.dir / "checkpoints/checkpoint-2")


@pytest.fixture(scope="module")
def interrupted(out: Path) -> SimpleNamespace:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once checkpoint-3 is complete."""
    process = subprocess.Popen(sft_args(out, "interrupted", "-p", "max_steps", "40", "-p", "save_steps", "3"),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    folder = out / "interrupted"
    wait_for(lambda: complete(folder / "checkpoints" / "checkpoint-3"), process)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return SimpleNamespace(result=SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr),
                           dir=folder)


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted_and_names_the_resume_command(interrupted: SimpleNamespace):
    result = interrupted.result
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = error_line(result)
    assert re.fullmatch(rf"vinakit: interrupted \(SIGINT\): {interrupted.dir} is marked interrupted\. Last "
                        rf"checkpoint: {interrupted.dir}/checkpoints/checkpoint-\d+\. Resume with: vinakit run sft "
                        rf"-p resume_from {interrupted.dir}", line), line
    record = manifest(interrupted.dir)
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGINT" and record["finished_at"]
    assert process_alive(record) is False, "the kernel is stopped with the runner"


@pytest.fixture(scope="module")
def killed_while_saving(out: Path, interrupted: SimpleNamespace) -> SimpleNamespace:
    """Resume the interrupted run with the printed command (no -p max_steps), and SIGKILL the kernel and the
    runner as soon as the adapter folder appears. Then a half-written newer checkpoint is planted."""
    command = error_line(interrupted.result).split("Resume with: ")[1]
    args = [*cli(*shlex.split(command)[1:]), "-p", "run_name", "killed", "--no-progress"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    folder = out / "killed"
    wait_for(lambda: (folder / "adapter").exists(), process)
    kernel = manifest(folder).get("pid")
    for kill in (lambda: os.kill(kernel, signal.SIGKILL), lambda: os.killpg(process.pid, signal.SIGKILL)):
        try:
            kill()
        except ProcessLookupError:
            pass
    process.wait()
    last = max(folder.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    half = folder / "checkpoints" / f"checkpoint-{int(last.name.split('-')[1]) + 1}"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    (half / "trainer_state.json").write_text('{"global_step": ', encoding="utf-8")  # cut off mid-write
    return SimpleNamespace(dir=folder, last=last)


@pytest.mark.slow
def test_a_resume_keeps_the_earlier_settings(killed_while_saving: SimpleNamespace):
    saved = yaml.safe_load((killed_while_saving.dir / "params.yaml").read_text(encoding="utf-8"))
    assert saved["max_steps"] == 40 and saved["save_steps"] == 3, "the earlier run's values, not the preset's"
    assert saved["resume_from"].endswith("interrupted") and saved["run_name"] == "killed"


@pytest.fixture(scope="module")
def resumed_after_kill(out: Path, killed_while_saving: SimpleNamespace) -> SimpleNamespace:
    result = run(cli("run", "sft", "-p", "resume_from", str(killed_while_saving.dir), "-p", "run_name", "resumed",
                     "--no-progress"))
    return SimpleNamespace(result=result, dir=out / "resumed", last=killed_while_saving.last)


@pytest.mark.slow
def test_a_kill_during_the_adapter_save_resumes_from_the_last_complete_checkpoint(resumed_after_kill):
    assert resumed_after_kill.result.returncode == 0, resumed_after_kill.result.stderr[-3000:]
    record = manifest(resumed_after_kill.dir)
    assert record["status"] == "completed" and record["resumed_from"] == str(resumed_after_kill.last)
    assert (resumed_after_kill.dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def terminated(out: Path) -> SimpleNamespace:
    """SIGTERM to the runner alone (as `kill` sends it) once the kernel started the run, before any checkpoint."""
    args = sft_args(out, "terminated", "-p", "max_steps", "40", "-p", "save_steps", "1000")
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = out / "terminated"
    # started = the kernel's start_run wrote its pid into the manifest (params.yaml comes a moment before it)
    wait_for(lambda: "pid" in _manifest_or_empty(folder), process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    return SimpleNamespace(result=SimpleNamespace(returncode=process.returncode, stderr=stderr), dir=folder, args=args)


@pytest.mark.slow
def test_sigterm_before_any_checkpoint_says_how_to_run_again(terminated: SimpleNamespace):
    assert terminated.result.returncode == 130 and "Traceback" not in terminated.result.stderr
    rerun = shlex.join(["vinakit", "run", "sft", "-f", str(CPU_TINY), "-p", "output_dir", str(terminated.dir.parent),
                        "-p", "backend", BACKEND, "-p", "max_steps", "40", "-p", "save_steps", "1000"])
    assert error_line(terminated.result) == (f"vinakit: interrupted (SIGTERM): {terminated.dir} is marked "
                                             f"interrupted. No checkpoint was written yet. Run it again with: {rerun}")
    record = manifest(terminated.dir)
    assert record["status"] == "interrupted" and record["interrupted_by"] == "SIGTERM"
    assert process_alive(record) is False


@pytest.fixture(scope="module")
def disk_full(out: Path) -> SimpleNamespace:
    """Every file the run writes is limited to 1 MiB (RLIMIT_FSIZE): the checkpoint's weights (5.7 MB) fail
    mid-write with EFBIG, as on a full disk; root is bound by it too, unlike by chmod."""
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = run(sft_args(out, "disk-full", "-p", "max_steps", "4", "-p", "save_steps", "2"),
                 preexec_fn=limit_file_size)
    return SimpleNamespace(result=result, dir=out / "disk-full")


@pytest.mark.slow
def test_a_write_that_fails_mid_run_marks_the_run_failed(disk_full: SimpleNamespace, out: Path):
    assert disk_full.result.returncode == 2, disk_full.result.stderr[-3000:]
    assert re.match(r"vinakit: error: the sft run failed in cell \d+: \w+: .*(File too large|Errno 27)",
                    error_line(disk_full.result)), disk_full.result.stderr[-2000:]
    assert "The disk is full or a file hit a size limit" in disk_full.result.stderr
    record = manifest(disk_full.dir)
    assert record["status"] == "failed" and record["error"]["cell"] and "File too large" in record["error"]["message"]
    assert not complete(disk_full.dir / "checkpoints" / "checkpoint-2")
    # the half-written checkpoint is never resumed from: refused before any kernel starts
    again = run(cli("run", "sft", "-p", "resume_from", str(disk_full.dir), "-p", "output_dir", str(out / "none")))
    assert again.returncode == 2 and "no complete checkpoint to resume from" in error_line(again)


@pytest.fixture(scope="module")
def twins(out: Path) -> list[SimpleNamespace]:
    """Two runs started at once with run_name empty; each fails in its data cell (a row without messages)."""
    data = out / "bad.jsonl"
    data.write_text('{"messages": "không phải danh sách"}\n', encoding="utf-8")
    args = sft_args(out, "", "-p", "dataset", str(data))
    processes = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    return [SimpleNamespace(returncode=p.returncode, stdout=stdout, stderr=stderr)
            for p in processes for stdout, stderr in [p.communicate(timeout=300)]]


@pytest.mark.slow
def test_runs_started_at_once_get_their_own_folders(twins: list[SimpleNamespace], out: Path):
    folders = []
    for result in twins:
        assert result.returncode == 2 and "already exists" not in result.stderr
        folders.append(Path(re.search(r"-> (\S+)/sft\.ipynb", result.stdout).group(1)))
        assert re.match(r"vinakit: error: the sft run failed in cell \d+: DataError: ", error_line(result))
    assert folders[0] != folders[1] and all(re.fullmatch(r"sft-\d{8}-\d{6}-\d{3}", f.name) for f in folders)
    assert [manifest(f)["status"] for f in folders] == ["failed", "failed"]


@pytest.fixture(scope="module")
def upload(out: Path, resumed_after_kill: SimpleNamespace) -> SimpleNamespace:
    """The export of the resumed run, pushed to the local Hub stand-in that drops every upload halfway."""
    hub = out.parent / f"{out.name}-hub"
    env = {**os.environ, "HF_TOKEN": "hf_" + "FAULTS" * 5, "VINAKIT_HUB": f"local:{hub}",
           "VINAKIT_HUB_FAIL": "halfway", "UNSLOTH_LLAMA_CPP_PATH": str(out / "no-llama-cpp")}
    result = run(cli("run", "export", "-f", str(CPU_TINY), "-p", "adapter", str(resumed_after_kill.dir / "adapter"),
                     "-p", "output_dir", str(out), "-p", "run_name", "upload", "-p", "push_to_hub", "true", "-p",
                     "repo_id", REPO_ID, "-p", "backend", BACKEND, "--no-progress"), env=env)
    return SimpleNamespace(result=result, dir=out / "upload", hub=hub, env=env)


@pytest.mark.slow
def test_an_upload_that_drops_halfway_keeps_the_files_and_prints_the_retry(upload: SimpleNamespace):
    from vinakit.hub import LocalHub

    assert upload.result.returncode == 2, upload.result.stderr[-3000:]
    line = error_line(upload.result)
    assert re.match(r"vinakit: error: the export run failed in cell \d+: HubNetworkError: Upload of merged_16bit/ "
                    r"to .* failed: the connection dropped after \d+ of \d+ files \(simulated\)\.", line), line
    assert "No local file was changed" in line and upload.env["HF_TOKEN"] not in upload.result.stderr
    assert manifest(upload.dir)["status"] == "upload_failed"
    hub = LocalHub(upload.hub)
    local = sorted(p.name for p in (upload.dir / "merged_16bit").iterdir())
    assert 0 < len(list(hub.repo_path(REPO_ID).iterdir())) < len(local), "half of the files went up"
    assert (upload.dir / "adapter" / "adapter_config.json").is_file() and (upload.dir / "fidelity.json").is_file()

    retry = line.split("Retry the upload alone with: ")[1]
    assert retry.startswith("python -c ")
    env = {name: value for name, value in upload.env.items() if name != "VINAKIT_HUB_FAIL"}
    again = run(["bash", "-c", f"{shlex.quote(sys.executable)} {retry[len('python '):]}"], env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in hub.repo_path(REPO_ID).iterdir()) == local
    assert manifest(upload.dir)["status"] == "completed", "a retry that worked completes the run"


@pytest.mark.slow
def test_vinakit_runs_shows_how_every_run_ended(out: Path, diverged, interrupted, killed_while_saving,
                                               resumed_after_kill, terminated, disk_full, twins, upload):
    result = run(cli("runs", "--output-dir", str(out)))
    assert result.returncode == 0, result.stderr
    shown = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    twin_names = sorted(name for name in shown if name.startswith("sft-"))
    uploaded = manifest(upload.dir)["status"]  # completed once the retry test ran, else upload_failed
    assert {name: status for name, status in shown.items() if name not in twin_names} == {
        "diverged": "failed", "interrupted": "interrupted", "killed": "stale", "resumed": "completed",
        "terminated": "interrupted", "disk-full": "failed", "upload": uploaded}
    assert uploaded in ("upload_failed", "completed")
    assert [shown[name] for name in twin_names] == ["failed", "failed"]
    assert result.stdout.splitlines()[0].split() == ["run", "status", "notebook", "started", "duration", "metric",
                                                     "report"]
    rows = {row.name: row for row in list_runs(out)}
    # the runner writes report.html for failed and interrupted runs too: whatever ran, ready to be shared
    assert all(rows[name].report == "report.html" for name in ("diverged", "interrupted", "terminated", "disk-full"))
    assert rows["resumed"].metric.startswith("eval_loss=") and rows["upload"].notebook == "export"
