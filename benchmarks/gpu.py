"""GPU benchmark of Spatial-Mamba: ``python benchmarks/gpu.py --help`` lists the options, ``benchmarks/README.md``
explains every figure. The code is the package ``benchmarks/gpubench``."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # `python benchmarks/gpu.py` puts benchmarks/ on the path, not the repository, and a machine that only has the
    # working tree does not need the package installed.
    sys.path.insert(0, str(ROOT))

from benchmarks.gpubench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
