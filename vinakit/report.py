"""``report.html``: the executed notebook of a run as one HTML file that opens in any browser and can be mailed.

The runner writes it after papermill finishes, for a failed or interrupted run too (whatever was executed: that
is when people share it). Plots are already base64 PNGs in the outputs, so the file stands alone. It is written
through :func:`vinakit.record.write_text`, which refuses the Hugging Face token's value like every file the kit
writes. nbconvert is imported only here, after the run.
"""

from __future__ import annotations

from pathlib import Path

from vinakit.record import write_text

REPORT_FILE = "report.html"


def notebook_html(executed: Path) -> str:
    """The executed notebook ``executed`` rendered by nbconvert's HTML exporter (images inlined)."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(str(executed), as_version=4)
    exporter = HTMLExporter(embed_images=True)  # markdown images too; output images are base64 already
    body, _resources = exporter.from_notebook_node(notebook, resources={"metadata": {"name": executed.stem}})
    return body


def write_report(executed: Path) -> Path | None:
    """Write ``report.html`` next to the executed notebook. Returns its path, or None when there is nothing to
    render (the kernel never wrote the notebook).

    Raises:
        HubError: the page would hold the Hugging Face token (from :func:`vinakit.record.write_text`).
    """
    if not executed.is_file():
        return None
    path = executed.parent / REPORT_FILE
    write_text(path, notebook_html(executed))
    return path
