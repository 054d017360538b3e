"""Entry point: `torchrun --nproc_per_node=N launch/train.py [flags]`, or `python launch/train.py` for one process."""

import sys
from pathlib import Path

# The checkout's own dist_mnist, installed or not: GPU nodes often come with torch in the image and no package index
# to `pip install -e .` from, and Python puts only this script's folder (launch/) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_mnist.errors import INTERRUPTED_EARLY  # noqa: E402  (imports nothing)

try:  # `import torch` takes seconds: a Ctrl-C there is one line too, not the import machinery's traceback
    from torch.distributed.elastic.multiprocessing.errors import record

    from dist_mnist.shutdown import end_process
    from dist_mnist.train import main
except KeyboardInterrupt:
    sys.stderr.write(f"error: {INTERRUPTED_EARLY}\n")
    sys.exit(130)

if __name__ == "__main__":
    # @record writes a crashing worker's traceback to torchrun's error file, so the agent can report it. A run that
    # ended well skips the interpreter's teardown (0.7 s with torch loaded: dist_mnist/shutdown.py).
    end_process(record(main)())
