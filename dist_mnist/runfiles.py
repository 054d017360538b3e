"""The names of a run folder's files, in a module that imports only the standard library: the writers (training,
profiling) and the readers that must not pay for `import torch` (python -m dist_mnist.gpucheck, about 5 s on a GPU
machine) share them."""

import hashlib
import os

CONFIG_FILE = "config.json"  # the resolved config and what the run resolved (world size, device, versions)
SUMMARY_FILE = "summary.json"  # rank 0's end-of-run figures
METRICS_FILE = "metrics.jsonl"  # one record per evaluation (also read by `python -m dist_mnist.report` and the bench)
TRACES_DIR = "traces"  # the profiler's traces, one per rank and window
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
