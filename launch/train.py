"""Entry point: `torchrun --nproc_per_node=N launch/train.py [flags]`, or `python launch/train.py` for one process."""

import sys
from pathlib import Path

# The checkout's own dist_mnist, installed or not: GPU nodes often come with torch in the image and no package index
# to `pip install -e .` from, and Python puts only this script's folder (launch/) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os  # noqa: E402
import signal  # noqa: E402

# Both import only the standard library's small modules: nothing that takes time.
from dist_mnist.console import rank_line  # noqa: E402
from dist_mnist.errors import (  # noqa: E402
    TERMINATING_SIGNALS,
    Terminated,
    interrupted_early,
    raise_terminated,
)

# A SIGTERM (torchrun's, a scheduler's), SIGHUP or SIGQUIT raises Terminated from here on, as a Ctrl-C raises
# KeyboardInterrupt, so it too ends in one line; main() takes them over. An inherited SIG_IGN (nohup ignores SIGHUP)
# is left alone.
for _stop in TERMINATING_SIGNALS:
    if signal.getsignal(_stop) == signal.SIG_DFL:
        signal.signal(_stop, raise_terminated)

try:  # `import torch` takes seconds: a stop signal there is one line too, not the import machinery's traceback
    from torch.distributed.elastic.multiprocessing.errors import record

    from dist_mnist.shutdown import end_process
    from dist_mnist.train import main
except (KeyboardInterrupt, Terminated) as exc:
    error = interrupted_early(exc)
    rank_line(os.environ.get("RANK", "0"), "error", str(error))  # as main() words it later
    sys.exit(error.exit_code)

if __name__ == "__main__":
    # @record writes a crashing worker's traceback to torchrun's error file, so the agent can report it. A run that
    # ended well skips the interpreter's teardown (0.7 s with torch loaded: dist_mnist/shutdown.py).
    end_process(record(main)())
