"""Entry point: `torchrun --nproc_per_node=N launch/train.py [flags]`, or `python launch/train.py` for one process."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from dist_mnist.train import main

if __name__ == "__main__":
    # @record writes a crashing worker's traceback to torchrun's error file, so the agent can report it.
    sys.exit(record(main)())
