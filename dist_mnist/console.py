"""The process's standard output, kept writable: a reader that goes away does not end the run.

`python launch/train.py ... | head`, a `tee` that was killed, a log collector that restarted: the next print of a
progress line raised BrokenPipeError inside the training loop, and the run ended with a traceback, losing the
steps since its last checkpoint. A C program would die of SIGPIPE at that write; Python ignores the signal and raises
instead. Here the run goes on without its standard output (everything it prints is also in its run folder's files)
and says so once on standard error.
"""

from __future__ import annotations

import errno
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

READER_GONE = ("note: standard output was closed (its reader exited); the run goes on without printing, and writes "
               "its records to its run folder as always (metrics.jsonl, progress.jsonl, summary.json); Ctrl-C stops "
               "it at a step with a checkpoint")


class KeptStdout:
    """Wraps a text stream: writes and flushes that meet a closed reader are dropped from then on, with one note
    (`note`, None for none) on standard error."""

    def __init__(self, stream: TextIO, note: str | None = READER_GONE) -> None:
        self._stream = stream
        self._note = note
        self.reader_gone = False

    # A reader that went away: a closed pipe (EPIPE), or a terminal or ssh session that hung up, whose tty then
    # fails every write with EIO. The hang-up's SIGHUP stops the run at a step boundary, and an evaluation or progress
    # line printed on the way there raised EIO before the stop's checkpoint was written.
    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._lose_reader_or_raise(exc)
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._lose_reader_or_raise(exc)

    def _lose_reader_or_raise(self, exc: OSError) -> None:
        if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EIO:
            raise exc
        self._lose_reader()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno, ...: the wrapped stream's
        return getattr(self._stream, name)

    def _lose_reader(self) -> None:
        self.reader_gone = True
        # The wrapped stream still holds what it could not send, and the interpreter flushes it at exit (an
        # "Exception ignored ... BrokenPipeError" there): its file descriptor now leads to /dev/null instead.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # not a file (a test's stream): nothing flushes it at exit
        if self._note is None:
            return
        try:
            sys.stderr.write(self._note + "\n")
            sys.stderr.flush()
        except OSError:
            pass  # standard error closed too: nobody is left to tell


@contextmanager
def kept_stdout(note: str | None = READER_GONE) -> Iterator[KeptStdout]:
    """sys.stdout as a KeptStdout for the block; the stream it wrapped is put back after it. The analysis tools
    (`report ... | head`) pass no note: what they print is all they do besides the files they write."""
    original = sys.stdout
    kept = KeptStdout(original, note)
    sys.stdout = kept  # a TextIO in all that this process uses of it (typeshed's sys.stdout takes any object)
    try:
        yield kept
    finally:
        sys.stdout = original


class OpenLine:
    """The line on standard output being rewritten in place (rank 0's progress on a terminal), if one is open. A
    line on standard error must end it first: on a terminal both streams write to one screen, and a note written
    mid-training (a trace that could not be written) ran on after the progress line's last character."""

    def __init__(self) -> None:
        self._stream: TextIO | None = None

    def open(self, stream: TextIO) -> None:
        self._stream = stream

    def end(self) -> None:
        """Finish the open line, if any, so the next message starts on a line of its own."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.write("\n")
            stream.flush()


OPEN_LINE = OpenLine()  # one per process, as the terminal is


@contextmanager
def warnings_end_open_line() -> Iterator[None]:
    """Python warnings shown in the block (torch's C++ warnings raised in a Python call among them) end the open
    progress line first, as the launcher's own lines do; the previous `warnings.showwarning` is put back after it."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:
        OPEN_LINE.end()
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


# Control characters (C0, DEL, C1): a message quotes text read from files (a lock's holder line, a checkpoint's
# recipe name), and a newline or an escape sequence planted there printed a forged second `error:` line, or recoloured
# the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x1b`): one line, nothing a terminal
    acts on."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def shown(text: str) -> str:
    """Text for the terminal whose lines quote run files (report's and compare's tables, gpucheck's, the resume's
    `warning:`): each line one_line'd, the line breaks kept. A summary's diagnosis, a rank field, a config key, a
    trace's kernel name or a pickle's GLOBAL name with ESC, CR, BEL or a C1 byte in it cleared the screen, set the
    window's title or forged a line; escaped, it is shown as text."""
    return "\n".join(one_line(line) for line in text.split("\n"))


def rank_line(rank: int | str, kind: str, message: str) -> None:
    """One `error:` or `note:` line on stderr, `[rank N] `-prefixed off rank 0. One write, newline included: print()
    writes the text and the newline apart, and the lines of ranks that fail at the same moment would run together."""
    OPEN_LINE.end()
    prefix = kind if str(rank) == "0" else f"[rank {one_line(str(rank))}] {kind}"
    try:
        sys.stderr.write(f"{prefix}: {one_line(message)}\n")
        sys.stderr.flush()
    except OSError:  # standard error gone too (a hung-up terminal: EIO): nobody is left to tell, and the run goes on
        pass
