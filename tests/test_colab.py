"""The hosted-notebook install: one cell text, one repository URL, pins equal to the tested stack, torch untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vinakit import colab
from vinakit.errors import VinakitError

REPO = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_notebook_starts_with_the_generated_install_cell(path: Path) -> None:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert "".join(first_code["source"]) == colab.install_cell(), "run `python -m vinakit.colab` to regenerate"


def test_the_repository_url_is_one_constant() -> None:
    hits = [p for p in (REPO / "vinakit").rglob("*.py") if "github.com/vinakit/vinakit" in p.read_text("utf-8")]
    assert hits == [REPO / "vinakit" / "colab.py"]
    assert "REPOSITORY_URL" in (REPO / "README.md").read_text(encoding="utf-8")


def test_hosted_pins_are_the_tested_stack_and_never_touch_torch() -> None:
    tested = {**_pins(REPO / "requirements.txt"), **_pins(REPO / "requirements-unsloth.txt")}
    commands = colab.pip_commands()
    for command in commands:
        assert not any(arg.startswith(("torch==", "torch>", "torchvision", "xformers")) or arg == "torch"
                       for arg in command)
        for arg in command:
            if "==" in arg:
                name, version = arg.split("==")
                assert tested[re.sub(r"[-_.]+", "-", name).lower()] == version, arg
    dependent = commands[-1]
    assert "--no-deps" in dependent and all(arg in dependent for arg in colab.TORCH_DEPENDENT)


def test_install_is_a_no_op_off_colab_and_says_how_to_get_a_gpu_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in colab.HOSTED_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    exec(colab.install_cell(), {})  # the cell itself does nothing here
    assert "nothing installed" in colab.install_hosted_stack(run=False)
    if colab.gpu_count():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    with pytest.raises(VinakitError, match="Change runtime type -> T4 GPU"):
        colab.install_hosted_stack(run=False)
