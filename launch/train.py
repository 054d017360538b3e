"""Entry point: `torchrun --nproc_per_node=N launch/train.py [flags]`, or `python launch/train.py` for one process.
An installed package runs the same as `python -m dist_mnist` (dist_mnist/__main__.py, which this runs)."""

import sys
from pathlib import Path

# The checkout's own dist_mnist, installed or not: GPU nodes often come with torch in the image and no package index
# to `pip install -e .` from, and Python puts only this script's folder (launch/) on the path. Only a folder that
# holds the package: a copy of this script elsewhere would put whatever its grandparent holds first.
_checkout = Path(__file__).resolve().parents[1]
if (_checkout / "dist_mnist" / "__init__.py").is_file():
    sys.path.insert(0, str(_checkout))

from dist_mnist.__main__ import run  # noqa: E402

if __name__ == "__main__":
    run()
