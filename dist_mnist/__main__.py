"""The training entry point: `python -m dist_mnist [flags]`, `torchrun --nproc_per_node=N -m dist_mnist [flags]`, and
what launch/train.py runs from a checkout.

Only the standard library's small modules and dist_mnist's console, errors and caches load before run() has set the
stop signals' handlers: `import torch` (seconds) comes after, so a stop signal there is one line too.
"""

import os
import signal
import sys

from dist_mnist.caches import use_bytecode_cache
from dist_mnist.console import rank_line
from dist_mnist.errors import TERMINATING_SIGNALS, Terminated, UserError, interrupted_early, raise_terminated


def run() -> None:
    """Train with the command line's flags, then end the process with the run's exit code."""
    # A SIGTERM (torchrun's, a scheduler's), SIGHUP or SIGQUIT raises Terminated from here on, as a Ctrl-C raises
    # KeyboardInterrupt, so it too ends in one line; main() takes them over. An inherited SIG_IGN (nohup ignores
    # SIGHUP) is left alone.
    for stop in TERMINATING_SIGNALS:
        if signal.getsignal(stop) == signal.SIG_DFL:
            signal.signal(stop, raise_terminated)
    try:
        # Before the first import of torch, which compiles every module from source where Python has no bytecode
        # cache for it (seconds; dist_mnist/caches.py).
        use_bytecode_cache()
    except UserError as exc:
        rank_line(os.environ.get("RANK", "0"), "error", str(exc))
        sys.exit(exc.exit_code)
    try:  # `import torch` takes seconds: a stop signal there is one line too, not the import machinery's traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        from dist_mnist.shutdown import end_process
        from dist_mnist.train import main
    except (KeyboardInterrupt, Terminated) as exc:
        error = interrupted_early(exc)
        rank_line(os.environ.get("RANK", "0"), "error", str(error))  # as main() words it later
        sys.exit(error.exit_code)
    # @record writes a crashing worker's traceback to torchrun's error file, so the agent can report it. A run that
    # ended well skips the interpreter's teardown (0.7 s with torch loaded: dist_mnist/shutdown.py).
    end_process(record(main)())


if __name__ == "__main__":
    run()
