"""The end of a finished run's process: at once, without the interpreter's teardown.

Once `main` has returned, CPython clears every module and the C++ libraries run their static destructors. With
torch and torch._dynamo (which the first optimizer imports) loaded that took 0.7-0.8 s after every run on the 2-core
CPU (0.4 s with `import torch` alone; docs/benchmarks.md), inside the whole-process wall time a user waits for:
a tenth of what `python launch/train.py --epochs 1` takes on a GPU. A run that ended well has closed, flushed and
fsynced everything it wrote, joined its threads and destroyed its process group, so the teardown has nothing left
to do for it. The exceptions end the usual way: a failed run (its error path may still hold open files), child
processes (DataLoader workers, which the teardown stops), and tools that report when the interpreter exits
(cProfile, profile, coverage, a debugger).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable


def watched() -> bool:
    """Whether a profiler, tracer, coverage tool or debugger watches this process: such tools write what they found
    when the interpreter exits."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: coverage's sys.monitoring core, debuggers
    return monitoring is not None and any(
        monitoring.get_tool(tool) is not None
        for tool in (monitoring.DEBUGGER_ID, monitoring.COVERAGE_ID, monitoring.PROFILER_ID))


def end_process(code: int | None, exit_now: Callable[[int], object] = os._exit) -> None:
    """End the process with exit status `code`: at once after a successful run with no child processes left and
    nothing watching it, else through the interpreter's usual exit (`sys.exit`). None is torchrun's `record` saying
    the run ended in a SystemExit(0) (`--help`): status 0, the usual way."""
    if code != 0 or multiprocessing.active_children() or watched():
        sys.exit(code)
    logging.shutdown()  # what the teardown would have flushed and closed
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(0)
