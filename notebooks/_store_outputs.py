"""Execute each notebook in place and store its outputs (what a reader on GitHub sees): ``make notebooks``.

The test run executes the notebooks too (nbmake) but never writes them; rerun this after changing a notebook or
what it calls, and commit the result. What goes to stderr (progress bars, library warnings naming this machine's
paths) is not stored: it says nothing about the results and differs on every machine."""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def without_stderr(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    return nb


if __name__ == "__main__":
    for p in sys.argv[1:]:
        nb = nbformat.read(p, as_version=4)
        NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(Path(p).parent)}}).execute()
        nbformat.write(without_stderr(nb), p)
        print("executed", p, flush=True)
