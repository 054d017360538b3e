"""The one exception type for mistakes a user can fix, reported as a single line, never a traceback; what a stop
signal raises where the run cannot stop at a step boundary; and a wait for a thread that such a raise cannot cut."""

import signal
import threading
from types import FrameType
from typing import NoReturn


class UserError(Exception):
    """Bad input (flags, data files, folders, checkpoints) with a message that says how to fix it; `exit_code` is
    the process's (1; 130 or 143 for a SIGINT or SIGTERM before the first step, the shell's codes for an end by
    those signals)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's go on with generic advice), or its type's name if empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# The stop signals besides SIGINT (which raises KeyboardInterrupt through Python's own handler): each ends a process
# by default, and torchrun forwards each to its workers (its --signals-to-handle default is SIGTERM, SIGINT, SIGHUP,
# SIGQUIT). SIGHUP is what a closed terminal or ssh session sends, SIGQUIT a Ctrl-\. Handled only as SIGTERM, the
# other two killed every worker where it stood: no checkpoint, no line, the last interval's steps lost.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
# Every signal that asks a run to stop: those and Ctrl-C's.
STOP_SIGNALS = (*TERMINATING_SIGNALS, signal.SIGINT)


class Terminated(BaseException):
    """A stop signal of TERMINATING_SIGNALS outside the training loop's stop handler (start-up, a finished run's
    summary), raised in the main thread as Python's own SIGINT handler raises KeyboardInterrupt: the run ends through
    the same cleanup and one line that says what is on disk, not silently by the signal's default action. A
    BaseException, as KeyboardInterrupt is, so no `except Exception` swallows it."""

    def __init__(self, sig: signal.Signals = signal.SIGTERM) -> None:
        super().__init__(sig.name)
        self.signal = sig


def raise_terminated(signum: int, frame: FrameType | None) -> NoReturn:
    """The handler of TERMINATING_SIGNALS from the entry point's first line (dist_mnist/__main__.py) until main()
    takes them over (its imports take seconds)."""
    raise Terminated(signal.Signals(signum))


def stop_signal(exc: KeyboardInterrupt | Terminated) -> signal.Signals:
    """The stop signal that raised `exc`: SIGINT raises KeyboardInterrupt, the others Terminated."""
    return exc.signal if isinstance(exc, Terminated) else signal.SIGINT


def signal_exit_code(sig: signal.Signals) -> int:
    """The shell's exit code for a process ended by `sig` (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + sig


def interrupted_early(exc: KeyboardInterrupt | Terminated) -> UserError:
    """The error for a stop signal before a run has written anything (dist_mnist/__main__.py's imports included): the
    run folder, if made, is empty, and the same command reuses it."""
    sig = stop_signal(exc)
    return UserError(f"interrupted ({sig.name}) during start-up, before the first step; this process wrote nothing "
                     "to resume from: rerun the same command to start again (a run with checkpoints resumes from "
                     "them)", exit_code=signal_exit_code(sig))


def join_thread(thread: threading.Thread, ended: threading.Event) -> None:
    """Wait for `thread`, which sets `ended` as its last act, however it ends. Not Thread.join alone: a signal handler
    that raises in it (torch's SIGCHLD one, for a dead DataLoader worker) marks the thread finished on CPython
    3.10-3.12 (cpython#90882), so the next join, and the interpreter's exit, no longer waited for it: a half-written
    checkpoint and a failure line naming it as on disk, or imports still running as the process ended. An Event's
    wait raises the same exception but leaves the thread to be waited for."""
    ended.wait()
    thread.join()  # the thread is past its last line: at once
