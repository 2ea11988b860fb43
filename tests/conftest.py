"""Shared test setup.

Unsloth patches transformers and TRL globally when it is imported, so every test that uses the ``backend``
fixture runs the plain-transformers ("hf") case first and all Unsloth cases last, after every other test:
the hf backend is tested unpatched in the same process. ``VINAKIT_TEST_BACKENDS=hf`` (or ``unsloth``) limits
the backend cases.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BACKENDS = [b for b in os.environ.get("VINAKIT_TEST_BACKENDS", "hf,unsloth").split(",") if b]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


def _uses_unsloth(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return bool(callspec and callspec.params.get("backend") == "unsloth") or bool(item.get_closest_marker("unsloth"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable sort: everything else keeps its order, Unsloth cases move to the end.
    items.sort(key=_uses_unsloth)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unsloth: imports Unsloth (run after the tests that must not see it)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared folder (real tokenizers); skip when VINAKIT_SHARED_DIR is unset."""
    value = os.environ.get("VINAKIT_SHARED_DIR")
    if not value:
        pytest.skip("VINAKIT_SHARED_DIR is not set (CI sets it to ../shared)")
    return Path(value)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny model folder (built once per session, cached like a user's)."""
    from vinakit.model import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One headless SFT run of the notebook with params/cpu_tiny.yaml, shared by the tests that need a model."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("runs")
    result = subprocess.run(
        [sys.executable, "-m", "vinakit.cli", "run", "sft", "-f", str(REPO / "params" / "cpu_tiny.yaml"),
         "-p", "output_dir", str(out), "-p", "run_name", "sft-session", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out / "sft-session"
