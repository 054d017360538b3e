"""The names of a run folder's files, in a module that imports only the standard library: the writers (training,
profiling) and the readers that must not pay for `import torch` (python -m dist_mnist.gpucheck, about 5 s on a GPU
machine) share them."""

import hashlib
import os

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
