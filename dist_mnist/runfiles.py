"""The names of a run folder's files, in a module that imports only the standard library: the writers (training,
profiling) and the readers that must not pay for `import torch` (python -m dist_mnist.gpucheck, about 5 s on a GPU
machine) share them."""

import contextlib
import gzip
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CONFIG_FILE = "config.json"  # the resolved config and what the run resolved (world size, device, versions)
SUMMARY_FILE = "summary.json"  # rank 0's end-of-run figures
METRICS_FILE = "metrics.jsonl"  # one record per evaluation (also read by `python -m dist_mnist.report` and the bench)
TRACES_DIR = "traces"  # the profiler's traces: a folder per window (trace_window_dir), in it a file per rank
TRACE_SUFFIX = ".pt.trace.json.gz"  # what TensorBoard's profiler plugin and HTA look for
# Every trace of a run, relative to TRACES_DIR.
TRACE_FILES = f"step*/rank*{TRACE_SUFFIX}"


def trace_window_dir(step: int) -> str:
    """The folder, inside TRACES_DIR, of the profiler window whose first recorded step is `step` (as progress.jsonl
    and the checkpoints count steps; its ProfilerStep# is `step` - 1). Every rank records the job's same steps, so a
    window's folder holds one trace per rank: what HTA reads as one set of ranks, and TensorBoard's profiler plugin
    lists as a run."""
    return f"step{step:08d}"


def trace_window_step(name: str) -> int | None:
    """The first recorded step of the window whose folder is named `name` (trace_window_dir); None for any other
    name."""
    number = name.removeprefix("step")
    return int(number) if name.startswith("step") and len(number) == 8 and _ascii_digits(number) else None


def trace_file_name(rank: int) -> str:
    """Global rank `rank`'s trace in its window's folder; the profiler plugin names the worker `rank<N>`."""
    return f"rank{rank}{TRACE_SUFFIX}"


def trace_file_rank(name: str) -> int | None:
    """The global rank whose trace a file named `name` is (trace_file_name); None for any other name."""
    number = name.removeprefix("rank").removesuffix(TRACE_SUFFIX)
    return int(number) if name.startswith("rank") and name.endswith(TRACE_SUFFIX) and _ascii_digits(number) else None


def _ascii_digits(text: str) -> bool:
    """Whether `text` is 0-9 only, as the names above write numbers. str.isdigit() is also true of '²', which int()
    refuses (a stray folder `step0000001²` made the trace-failure note a traceback), and of other scripts' digits,
    which int() reads as a number no name above is written with."""
    return text.isascii() and text.isdigit()
CHECKPOINTS_DIR = "checkpoints"  # without --checkpoint-dir; a --resume given a run folder looks in it


def is_plain_name(name: str) -> bool:
    """Whether `name` names a folder or file right inside another: no separator, not `.` or `..`, no NUL, not empty,
    and short enough for a file name (255 bytes on Linux's file systems)."""
    return (bool(name) and os.sep not in name and "\0" not in name and name not in {".", ".."}
            and len(os.fsencode(name)) <= 255)


def run_id_file_name(run_id: str) -> str:
    """A file or folder name for torchrun run id `run_id` (its marker under --output-dir/.torchelastic, its NCCL
    flight recorder folder): the id itself, or its SHA-256 where the id is no plain name. torchrun's --rdzv-id takes
    any string: `..`, `../../x` or an absolute path put the flight recorder's dumps outside --output-dir."""
    if not is_plain_name(run_id) or len(os.fsencode(run_id)) > 200:
        return "sha256-" + hashlib.sha256(os.fsencode(run_id)).hexdigest()
    return run_id


# The most bytes a reader takes from one run file, and from a gz trace once decompressed. Far above any real one: a
# progress.jsonl record is about 250 bytes, so a run of a million log lines writes 250 MB; a profiler window's trace
# is a few MB (tens decompressed). A file past it is no run's: /dev/zero behind a link, a gz bomb in a bundle, which
# were read until memory ran out (security review findings 12, 13).
MAX_RUN_FILE_BYTES = 512 * 2**20
MAX_TRACE_BYTES = 512 * 2**20


class RefusedRunFile(Exception):
    """A run file that is not read: not a regular file (a FIFO would block the reader for ever, a device never ends)
    or larger than any run writes. Not an OSError: the readers that take a missing or unreadable file as a run that
    failed must not take a planted FIFO for one. Its message is the whole line to show."""


def file_kind(mode: int) -> str:
    """What a file of `mode` that is no regular file is, in words ("a FIFO")."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "a special file")


@contextlib.contextmanager
def open_run_file(path: Path) -> Iterator[BinaryIO]:
    """`path` opened for reading once it is known to be a regular file (RefusedRunFile otherwise). O_NONBLOCK: the
    open of a FIFO returns at once instead of waiting for a writer, and fstat then refuses it; a symlink is followed
    (a run folder copied with links in it is still read), but what it leads to is checked."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefusedRunFile(f"{path} is {file_kind(mode)}, not a regular file: no run writes one; not read")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def _too_large(path: Path, limit: int, what: str = "") -> RefusedRunFile:
    return RefusedRunFile(f"{path} holds more than {limit:,} bytes{what}, more than any run writes; not read")


def read_run_bytes(path: Path, limit: int | None = None) -> bytes:
    """A run file's bytes: a regular file of at most `limit` bytes (MAX_RUN_FILE_BYTES), else RefusedRunFile.
    OSError (FileNotFoundError among them) as open() raises it. The read stops one byte past the limit, so a file
    that grows while it is read costs no more."""
    limit = MAX_RUN_FILE_BYTES if limit is None else limit
    with open_run_file(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_large(path, limit)
    return data


def _utf8(path: Path, data: bytes) -> str:
    """`data`, read from `path`, as UTF-8 text (every run file is); other bytes are RefusedRunFile."""
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise RefusedRunFile(f"{path} is not UTF-8 text (byte {exc.start}): no run writes it; not read") from None


def read_run_text(path: Path, limit: int | None = None) -> str:
    """read_run_bytes as UTF-8 text (every run file is); other bytes are RefusedRunFile, one line, not a
    UnicodeDecodeError traceback."""
    data = read_run_bytes(path, limit)
    return _utf8(path, data)


def read_gz_text(path: Path, limit: int | None = None) -> str:
    """A gzip file's decompressed UTF-8 text (a profiler trace), of at most `limit` bytes (MAX_TRACE_BYTES) either
    way: a megabyte of gzip can hold a gigabyte of spaces. OSError, EOFError and zlib.error as gzip raises them for a
    damaged file."""
    limit = MAX_TRACE_BYTES if limit is None else limit
    with open_run_file(path) as raw:
        # Decompressed in bounded pieces: GzipFile.read(n) inflates no more than n bytes, whatever the ratio.
        with gzip.GzipFile(fileobj=raw) as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_large(path, limit, " decompressed")
    return _utf8(path, data)
