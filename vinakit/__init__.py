"""vinakit: a notebook-first kit for fine-tuning small open LLMs on Vietnamese.

The package holds all logic; the notebooks in ``notebooks/`` only call it. Importing
``vinakit`` is cheap on purpose (no torch, no transformers): the runner validates
parameters before a kernel starts, and Unsloth must be imported before transformers.
"""

__version__ = "0.1.0"

# The layers: one step module per notebook (its cells call only that module and building blocks), the entry
# points that run notebooks, and below them the building blocks, which never import a step module.
STEP_MODULES = ("sft", "cpt", "evaluate", "export", "preference")
ENTRY_POINTS = ("cli", "demo")
