"""Where the committed R reference data live (``tests/reference/``).

The data sets and R results are committed with the tests (see ``tests/reference/README.md``), so the
reference tests always run: a missing file is a failure, never a skip.
"""

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
