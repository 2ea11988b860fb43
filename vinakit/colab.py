"""Installing the kit on a hosted GPU notebook (Colab, Kaggle), the way Unsloth's own Colab notebooks do.

Every notebook's first cell installs vinakit itself (pure Python, ``--no-deps``) from :data:`REPOSITORY_URL` and
calls :func:`install_hosted_stack`, which adds the tested GPU stack **around the runtime's own CUDA torch**: the
packages that depend on torch are installed with ``--no-deps`` so pip never replaces it (a second torch, and an
xformers pinned to it, may not match the driver). Elsewhere the cell does nothing.

The cell's text is generated here (:func:`install_cell`), so the repository URL is one constant: change
:data:`REPOSITORY_URL` and run ``python -m vinakit.colab`` to rewrite the cell in every notebook.

Nothing heavy is imported here: torch must not be imported before the install (and, on Kaggle's 2 x T4, before
one GPU is pinned).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vinakit.device import pin_single_gpu
from vinakit.errors import VinakitError

REPOSITORY_URL = "https://github.com/vinakit/vinakit"
HOSTED_ENV_VARS = ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE")
NO_GPU_MESSAGE = ("This notebook needs a GPU, and the runtime has none. In Colab: Runtime -> Change runtime type -> "
                  "T4 GPU, then Run all again. In Kaggle: Settings -> Accelerator -> GPU T4 x2 (the kit uses one).")

# Depend on torch: installed without dependencies, so the runtime's CUDA torch stays as it is.
TORCH_DEPENDENT = ("unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "peft==0.21.2", "accelerate==1.15.0",
                   "trl==1.14.2", "bitsandbytes==0.50.2", "cut_cross_entropy==25.1.1", "torchao==0.18.0")
# Do not depend on torch: installed normally (their own small dependencies come along).
TORCH_FREE = ("transformers==5.17.0", "tokenizers==0.23.3", "safetensors==0.8.0", "huggingface_hub==1.33.0",
              "datasets==4.8.5", "papermill==2.7.0", "nbformat==5.11.1", "sacrebleu==2.6.0", "sentencepiece",
              "protobuf", "hf_transfer", "tyro", "msgspec", "pyyaml", "tqdm")
# Whose change means an already running kernel must restart to see it.
_RESTART_IF_CHANGED = ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers")


def on_hosted_notebook() -> bool:
    """Whether this kernel runs on Colab or Kaggle."""
    return any(name in os.environ for name in HOSTED_ENV_VARS)


def install_cell() -> str:
    """The source of every notebook's first code cell."""
    return (
        "# Colab / Kaggle only: install vinakit and its GPU stack (about 2 minutes). Does nothing anywhere else.\n"
        "import os, subprocess, sys\n"
        f"if any(name in os.environ for name in {HOSTED_ENV_VARS!r}):\n"
        f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"--no-deps\", "
        f"\"git+{REPOSITORY_URL}\"], check=True)\n"
        "    from vinakit.colab import install_hosted_stack\n"
        "    install_hosted_stack()"
    )


def gpu_count() -> int:
    """GPUs the driver lists (``nvidia-smi -L``), without importing torch."""
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in result.stdout.splitlines()) if result.returncode == 0 else 0


def pip_commands() -> list[list[str]]:
    """The pip commands :func:`install_hosted_stack` runs, in order."""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    return [[*pip, *TORCH_FREE], [*pip, "--no-deps", *TORCH_DEPENDENT]]


def install_hosted_stack(run: bool = True) -> str:
    """Install the tested GPU stack on Colab/Kaggle around the runtime's torch; a no-op elsewhere.

    Args:
        run: False to check the runtime and return what would be done without installing.

    Returns:
        What was done, in one line (also printed).

    Raises:
        VinakitError: the hosted runtime has no GPU (the message says how to switch to a T4).
    """
    if not on_hosted_notebook():
        return _say("vinakit: not on Colab or Kaggle, nothing installed (use `make setup` on your own machine).")
    gpus = gpu_count()
    if gpus == 0:
        raise VinakitError(NO_GPU_MESSAGE)
    torch_was_loaded = "torch" in sys.modules
    if gpus > 1 and not torch_was_loaded:
        pin_single_gpu()  # Kaggle's 2 x T4: the HF Trainer would wrap 4-bit models in DataParallel, which fails
    before = _versions()
    if run:
        for command in pip_commands():
            subprocess.run(command, check=True)
    changed = [name for name in _RESTART_IF_CHANGED if _versions().get(name) != before.get(name)]
    if torch_was_loaded and changed:
        return _say(f"vinakit: installed; {', '.join(changed)} changed after torch was already imported, so "
                    f"restart the session (Runtime -> Restart session) and Run all again.")
    return _say(f"vinakit: GPU stack ready on {gpus} GPU(s){' (using GPU 0)' if gpus > 1 else ''}.")


def _versions() -> dict[str, str | None]:
    from vinakit.record import package_versions

    return package_versions(_RESTART_IF_CHANGED)


def _say(message: str) -> str:
    print(message)
    return message


def write_install_cells(notebooks: Path = Path(__file__).resolve().parent.parent / "notebooks") -> list[Path]:
    """Rewrite the first code cell of every notebook with :func:`install_cell` (after changing the URL)."""
    written = []
    for path in sorted(notebooks.glob("*.ipynb")):
        notebook = json.loads(path.read_text(encoding="utf-8"))
        cell = next(c for c in notebook["cells"] if c["cell_type"] == "code")
        cell["source"] = install_cell().splitlines(keepends=True)
        path.write_text(json.dumps(notebook, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for notebook in write_install_cells():
        print(f"rewrote the install cell of {notebook}")
