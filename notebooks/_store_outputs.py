"""Execute each notebook in place and store its outputs (what a reader on GitHub sees): ``make notebooks``.

The test run executes the notebooks too (nbmake) but never writes them; rerun this after changing a notebook or
what it calls, and commit the result."""
import sys
from pathlib import Path
import nbformat
from nbclient import NotebookClient
for p in sys.argv[1:]:
    nb = nbformat.read(p, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(Path(p).parent)}}).execute()
    nbformat.write(nb, p)
    print("executed", p, flush=True)
