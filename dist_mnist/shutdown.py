"""The end of a run's process: a finished run's at once, without the interpreter's teardown; a failing run's in
order, with its error line, whatever torchrun's SIGTERM interrupts; a stop signal outside the training loop's, with
one line as well (FailurePath).

Once `main` has returned, CPython clears every module and the C++ libraries run their static destructors. With
torch and torch._dynamo (which the first optimizer imports) loaded that took 0.7-0.8 s after every run on the 2-core
CPU (0.4 s with `import torch` alone; docs/benchmarks.md), inside the whole-process wall time a user waits for:
a tenth of what `python launch/train.py --epochs 1` takes on a GPU. A run that ended well has closed, flushed and
fsynced everything it wrote, joined its threads and destroyed its process group, so the teardown has nothing left
to do for it. The exceptions end the usual way: a failed run (its error path may still hold open files), child
processes (DataLoader workers, which the teardown stops), and tools that report when the interpreter exits
(cProfile, profile, coverage, a debugger).

The fast end still runs the `atexit` functions (13-16 ms after a 2-core CPU run): they are Python's contract with a
program that exits, and skipping them lost work of the standard library's. The semaphores of a DataLoader's worker
queues are one: multiprocessing registers each with its resource tracker and unlinks it in an exit function, so a
run with `--num-workers` whose iterator the garbage collector had not yet freed ended with the tracker's "There
appear to be 2 leaked semaphore objects to clean up at shutdown" warning (1 run in 3 here).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from dist_mnist.errors import STOP_SIGNALS, TERMINATING_SIGNALS, Terminated, raise_terminated

# A repeat of a stop signal this soon after the first is the same request delivered twice, not a user insisting: Slurm
# signals every process of a job step and torchrun forwards its own copy to the workers a moment later.
REPEAT_GRACE_S = 1.0
# What signal.signal takes and returns: a function, SIG_DFL or SIG_IGN, or None for a handler not set from Python.
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def watched() -> bool:
    """Whether a profiler, tracer, coverage tool or debugger watches this process: such tools write what they found
    when the interpreter exits."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: coverage's sys.monitoring core, debuggers
    return monitoring is not None and any(
        monitoring.get_tool(tool) is not None
        for tool in (monitoring.DEBUGGER_ID, monitoring.COVERAGE_ID, monitoring.PROFILER_ID))


def end_process(code: int | None, exit_now: Callable[[int], object] = os._exit,
                run_exit_functions: Callable[[], None] = atexit._run_exitfuncs) -> None:
    """End the process with exit status `code`: at once after a successful run with no child processes left and
    nothing watching it, else through the interpreter's usual exit (`sys.exit`). None is torchrun's `record` saying
    the run ended in a SystemExit(0) (`--help`): status 0, the usual way."""
    # The exit status is decided. The interpreter's teardown (0.7 s) puts SIGTERM's default action back in place of
    # any Python handler, so torchrun's SIGTERM, which it sends every worker the moment one fails, landed there and
    # the job's log read -15 (SIGTERM) for a rank that had written its error line and was exiting 1. Ignored, the
    # teardown ends with `code`; torchrun's SIGKILL after its --shutdown-timeout still ends one that hangs. After a
    # run that ended well a Ctrl-C is no request either: a scheduler's SIGTERM or a Ctrl-C in the exit functions
    # raised there (dist_mnist/__main__.py's handler, KeyboardInterrupt), a traceback after a run that ended well,
    # the function cut short (a semaphore left, logging not shut down).
    ignore(TERMINATING_SIGNALS if code else STOP_SIGNALS)
    if code != 0 or multiprocessing.active_children() or watched():
        sys.exit(code)
    # What the interpreter's exit runs before its teardown: logging's shutdown (flushes and closes its handlers),
    # multiprocessing's finalizers (the semaphores above). atexit has no public way to run them; this one is what
    # CPython's own exit calls, in the module since Python 2.
    run_exit_functions()
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(0)


def ignore(signals: tuple[int, ...]) -> None:
    """Ignore `signals` from here on; only the main thread may set handlers (elsewhere the process keeps them)."""
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)


class FailurePath:
    """The handler of the stop signals that end a process (errors.TERMINATING_SIGNALS: SIGTERM, SIGHUP, SIGQUIT) in
    main(), outside the training loop's stop handler (preemption.StopRequest, which stops at a step boundary). Such a
    signal there fails the run like a Ctrl-C: it raises Terminated, so the run ends through its cleanup and one line
    that says what is on disk (exit code 128 + the signal: 143 for SIGTERM) instead of dying silently by the
    signal's default action. One that lands while the run is failing already is noted, not fatal: the process still
    writes its one error line and ends in order, with its exit code.

    torchrun SIGTERMs the other workers the moment one of them dies. A survivor whose collective failed at that moment
    died of it wherever it was: before its error line (in the checkpoint write a failure lets finish, the process
    group's teardown), the kill in the job's log its only trace, or after it, while joining its DataLoader workers,
    whose queues' semaphores its resource tracker then reported as leaked. torchrun's SIGKILL after its
    --shutdown-timeout still ends a failure path that hangs.
    """

    def __init__(self) -> None:
        self.failing = False
        self._noted_at: float | None = None  # when the first signal of the failure came
        # Each signal's handler before this one; None for a handler set outside Python.
        self._previous: dict[int, SignalHandler] = {}

    def begin(self) -> None:
        """The run is failing from here on: called where a failure is first seen, before its line is written."""
        self.failing = True

    def _ends_process(self, signum: int) -> bool:
        """Whether the signal would have ended the process before this handler: its default, or the one
        dist_mnist/__main__.py sets."""
        return self._previous.get(signum, signal.SIG_DFL) in (signal.SIG_DFL, raise_terminated)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.failing:
            if self._noted_at is None:
                self._noted_at = now
            # As for preemption.StopRequest, a copy of the same request (torchrun's and the scheduler's) is noted; one
            # that comes later is someone insisting, on a failure path that hangs: it ends the process at once.
            if now - self._noted_at < REPEAT_GRACE_S:
                return
        elif self._ends_process(signum):
            # The failure starts here, so the copy Slurm's or torchrun's signal is followed by is noted, not a
            # second Terminated in the middle of the first one's cleanup.
            self.failing, self._noted_at = True, now
            raise Terminated(signal.Signals(signum))
        # What the signal did before this handler was installed; for one that ended the process, at once.
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous) and not self._ends_process(signum):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> FailurePath:
        self.failing, self._noted_at = False, None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in TERMINATING_SIGNALS:
                previous = signal.getsignal(sig)
                if previous != signal.SIG_IGN:  # an inherited SIG_IGN (nohup's SIGHUP) stays as the user set it
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default is what it most likely was.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


# The process's one: main() holds it, and the places that first see a failure begin it.
failure_path = FailurePath()
