"""vinakit: a notebook-first kit for fine-tuning small open LLMs on Vietnamese.

The package holds all logic; the notebooks in ``notebooks/`` only call it. Importing
``vinakit`` is cheap on purpose (no torch, no transformers): the runner validates
parameters before a kernel starts, and Unsloth must be imported before transformers.
"""

__version__ = "0.1.0"
