"""Known-harmless library warnings, filtered in one place, and progress bars that fit where the notebook runs.

:func:`install` is called once per kernel by :func:`vinakit.record.start_run`, the first kit call of every
notebook, before any model library is imported (not from the package ``__init__``: importing vinakit as a library
must not change the process's warning filters). Each filter names one message and says why it is harmless;
anything else — a dtype, a truncation, dropped rows — still shows. The kernel's own start-up warning comes before
any cell runs, so the runner passes :data:`KERNEL_ARGUMENTS` to the kernel instead.

Progress bars: ``tqdm.auto`` (used by transformers, datasets and the Hub client) draws ipywidgets bars in Jupyter
and Colab. A headless kernel (``vinakit run`` or papermill) has no frontend to draw them: the executed notebook
would hold ``HBox(...)`` reprs and the report no bar at all, so there :func:`install` switches ``tqdm.auto`` to
text bars, which papermill stores as one line per update.

Nothing heavy is imported here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The runner sets this in the kernel's environment: no frontend will draw widgets.
HEADLESS_ENV = "VINAKIT_HEADLESS"

# Passed to the kernel by `vinakit run`. ipykernel warns "Kernel is running over TCP without encryption" at
# start-up: the runner's kernel listens on 127.0.0.1 only, for this one process, so nothing travels off the
# machine. Only the kernel application's own log is raised to ERROR; cell output is untouched.
KERNEL_ARGUMENTS = ("--IPKernelApp.log_level=ERROR",)

# PEFT notes that it saves the resized embedding layers too: CPT trains them on purpose (vocabulary extension).
PEFT_EMBEDDING_SAVE = r".*save_embedding_layers.*"

# (message regex, why it is harmless) for warnings.warn.
WARNING_FILTERS: tuple[tuple[str, str], ...] = (
    (PEFT_EMBEDDING_SAVE, "CPT saves the embeddings it trained, as intended"),
    (r".*Unsloth should be imported before.*",
     "vinakit.model imports Unsloth before it patches or loads any model; transformers imported earlier by the "
     "kit's data cells (a tokenizer) is not what Unsloth patches"),
    (r".*Merge lora module to 4-bit linear may get different generations.*",
     "the export's fidelity check merges into 4-bit only to measure that very error next to the 16-bit merge "
     "it exports (vinakit.fidelity NAIVE_4BIT); the kit never exports a 4-bit merge"),
    (r".*IProgress not found.*", "tqdm falls back to text bars, which a headless run uses anyway"),
    (r".*torch\.jit\.script_method. is deprecated.*",
     "raised by a library's import (torchao/unsloth_zoo), not by the kit's code; nothing to act on"),
    (r".*HF_HUB_ENABLE_HF_TRANSFER. environment variable is deprecated.*",
     "unsloth_zoo sets HF_HUB_ENABLE_HF_TRANSFER=1 when imported; the Hub client, imported after it (the preference "
     "notebook reads its pairs without the datasets library), only notes that the variable is obsolete"),
)

# (logger name, message fragment, why it is harmless) for messages sent through the logging module.
LOG_FILTERS: tuple[tuple[str, str, str], ...] = (
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile",
     "torchao registers its enums at import time; a deprecation for torchao, not for the kit"),
    ("torchao", "Failed to load",
     "torchao's optional C++ kernels for other torch builds; the kit uses none of them"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "an optional faster CPU 4-bit kernel (the `kernels` package); bitsandbytes falls back to its own"),
)

_installed = False


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message holds ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in str(record.msg) and self.fragment not in record.getMessage()


def install() -> None:
    """Filter the known-harmless warnings, and use text progress bars in a headless kernel. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    for pattern, _why in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, fragment, _why in LOG_FILTERS:
        logging.getLogger(name).addFilter(_DropMessage(fragment))
    if headless():
        text_progress_bars()


def headless() -> bool:
    """Whether this kernel runs without a frontend: under ``vinakit run`` (it sets ``VINAKIT_HEADLESS``) or
    plain papermill (the kernel's parent process)."""
    if os.environ.get(HEADLESS_ENV) == "1":
        return True
    if "ipykernel" not in sys.modules:
        return False
    try:
        import psutil

        parent = psutil.Process().parent()
        return parent is not None and any("papermill" in part for part in parent.cmdline())
    except Exception:  # noqa: BLE001 - psutil missing or the parent unreadable: assume a frontend
        return False


def text_progress_bars() -> None:
    """Make ``tqdm.auto`` (and ``tqdm.autonotebook``) hand out text bars, for the libraries that ask it later."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*IProgress not found.*")
        import tqdm.auto
        import tqdm.autonotebook
        import tqdm.std

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = tqdm.std.tqdm, tqdm.std.trange
