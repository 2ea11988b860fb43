"""report.html and what an executed notebook shows: no traceback, no raw object repr, no stray warnings.

:func:`report_problems` is run on every executed notebook of the notebook tests (tests/test_notebooks.py's
``check_run_folder`` calls it on the runs those tests make); the tests here check the checker, the report
writer and the warning filters on small inputs, and the shared SFT run's report.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import pytest

from vinakit import quiet
from vinakit.hub import HubError
from vinakit.report import REPORT_FILE, notebook_html, write_report

# What a cell may still print to stderr: progress bars (tqdm, one line per update) and blank lines. Everything
# else is a warning the reader would have to judge: filter it in vinakit/quiet.py with the reason, or fix it.
ALLOWED_STDERR = (
    re.compile(r"^.*\d+%\|.*\| *[\d.]+[kMG]?/[\d.?]+[kMG]? \[.*\]\s*$"),  # a tqdm bar
    re.compile(r"^\s*$"),
)
# A raw repr such as ``DataReport(source=..., ...)`` or ``PosixPath('...')`` where the reader sees text/plain.
RAW_REPR = re.compile(r"^[A-Z][A-Za-z0-9_]*\(")
RICH_MIME = ("text/html", "text/markdown", "image/png", "image/svg+xml", "image/jpeg", "application/json")


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def stray_stderr(text: str) -> list[str]:
    """The lines of a stderr output that are neither progress bars nor blank."""
    lines = re.split(r"[\r\n]", text)
    return [line for line in lines if not any(pattern.match(line) for pattern in ALLOWED_STDERR)]


def output_problems(output: dict) -> list[str]:
    """What is wrong with one cell output, as the report would show it."""
    kind = output["output_type"]
    if kind == "error":
        return [f"traceback: {output.get('ename')}: {output.get('evalue')}"]
    if kind == "stream":
        text = _text(output.get("text", ""))
        if "Traceback (most recent call last)" in text:
            return [f"traceback in {output.get('name')}: {text[:300]!r}"]
        if output.get("name") == "stderr":
            return [f"stderr: {line[:300]!r}" for line in stray_stderr(text)]
        return []
    data = output.get("data", {})
    plain = _text(data.get("text/plain", ""))
    if not any(mime in data for mime in RICH_MIME) and RAW_REPR.match(plain):
        return [f"raw repr: {plain[:200]!r}"]
    return []


def notebook_problems(executed: Path) -> list[str]:
    """Every problem of every output of the executed notebook ``executed``, prefixed by its cell number."""
    notebook = json.loads(executed.read_text(encoding="utf-8"))
    problems = []
    for index, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            problems += [f"{executed.name} cell {index}: {problem}" for problem in output_problems(output)]
    return problems


def report_problems(run: Path, name: str) -> list[str]:
    """Check a run folder's report.html against its executed notebook; returns what the notebook shows wrongly.

    The report must exist, be a standalone HTML page (every image inlined) and render again from the notebook.
    """
    executed, report = run / f"{name}.ipynb", run / REPORT_FILE
    assert report.is_file(), f"{REPORT_FILE} missing from the run folder {run}"
    html = report.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    images = sum("image/png" in output.get("data", {}) for cell in json.loads(executed.read_text("utf-8"))["cells"]
                 for output in cell.get("outputs", []))
    assert html.count("data:image/png;base64,") >= images, "an image of the notebook is not inlined in the report"
    assert 'src="outputs/' not in html and "src='outputs/" not in html
    assert notebook_html(executed)  # renders again: the report is not a stale copy of something else
    return notebook_problems(executed)


def _notebook(outputs: list[dict]) -> dict:
    cell = {"cell_type": "code", "execution_count": 1, "id": "c1", "metadata": {}, "source": "x", "outputs": outputs}
    return {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _write(tmp_path: Path, outputs: list[dict]) -> Path:
    path = tmp_path / "sft.ipynb"
    path.write_text(json.dumps(_notebook(outputs)), encoding="utf-8")
    return path


def _stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def _result(data: dict) -> dict:
    return {"output_type": "execute_result", "execution_count": 1, "data": data, "metadata": {}}


def test_the_checker_finds_tracebacks_raw_reprs_and_stray_stderr(tmp_path: Path):
    executed = _write(tmp_path, [
        _stream("stderr", "\rLoading weights:   0%|          | 0/39 [00:00<?, ?it/s]"
                          "\rLoading weights: 100%|██████████| 39/39 [00:00<00:00, 29054.68it/s]\n"),
        _stream("stderr", "UserWarning: something the reader should see\n"),
        _result({"text/plain": "DataReport(source='x', rows_read=3)"}),
        _result({"text/plain": "DataReport(source='x')", "text/html": "<table></table>"}),  # shown as HTML
        _result({"text/plain": "{'train_loss': 8.1}"}),
        {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["..."]},
    ])
    problems = notebook_problems(executed)
    assert len(problems) == 3, problems
    assert "stderr" in problems[0] and "raw repr" in problems[1] and "traceback: ValueError" in problems[2]


def test_report_is_one_standalone_page_and_refuses_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    executed = _write(tmp_path, [_result({"image/png": png, "text/plain": "<Figure>"}),
                                 _stream("stdout", "hf_secretvalue123456\n")])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    path = write_report(executed)
    assert path == tmp_path / REPORT_FILE and f"data:image/png;base64,{png}" in path.read_text(encoding="utf-8")
    assert report_problems(tmp_path, "sft") == []
    path.unlink()
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123456")
    with pytest.raises(HubError, match="Hugging Face token"):
        write_report(executed)
    assert not path.exists()
    assert write_report(tmp_path / "missing.ipynb") is None  # the kernel never wrote a notebook


def test_harmless_warnings_are_filtered_and_real_ones_still_show(caplog: pytest.LogCaptureFixture):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet._installed = False
        quiet.install()
        warnings.warn("WARNING: Unsloth should be imported before [transformers] to ensure all optimizations")
        warnings.warn("`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.", FutureWarning)
        warnings.warn("peft: setting save_embedding_layers to True", UserWarning)
        warnings.warn("torch_dtype is deprecated! Use dtype instead!", UserWarning)
        warnings.warn("Truncation was not explicitly activated", UserWarning)
    quiet._installed = False  # pytest restored the warning filters: the next start_run installs them again
    assert [str(w.message) for w in caught] == ["torch_dtype is deprecated! Use dtype instead!",
                                               "Truncation was not explicitly activated"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.", "E")
        logging.getLogger("torchao").warning("Failed to load /x/_C.so: undefined symbol")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logging.getLogger("torchao").warning("Skipping import of cpp extensions due to incompatible torch version")
    assert [record.getMessage() for record in caplog.records] == [
        "Skipping import of cpp extensions due to incompatible torch version"]


def test_every_filter_says_why():
    assert all(why.strip() for _pattern, why in quiet.WARNING_FILTERS)
    assert all(why.strip() for _name, _fragment, why in quiet.LOG_FILTERS)


def test_headless_kernels_get_text_progress_bars(monkeypatch: pytest.MonkeyPatch):
    import tqdm.auto
    import tqdm.std

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)  # restored after the test
    monkeypatch.setattr(tqdm.auto, "trange", tqdm.auto.trange)
    monkeypatch.setenv(quiet.HEADLESS_ENV, "1")
    assert quiet.headless()
    quiet.text_progress_bars()
    assert tqdm.auto.tqdm is tqdm.std.tqdm


@pytest.mark.slow
def test_the_sft_run_has_a_clean_report(sft_run: Path):
    problems = report_problems(sft_run, "sft")
    assert not problems, "\n".join(problems)
