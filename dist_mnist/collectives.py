"""Collective failures: a shorter timeout once training runs, phase-named one-line errors, NCCL's flight recorder.

A peer that hangs (a stuck NFS read, a frozen GPU) or vanishes leaves the others blocked in whatever collective
comes next. Start-up legitimately takes long (rendezvous, the MNIST download, torch.compile on the first step), a
training collective does not, so the two get separate timeouts, as in torchtitan (300 s / 100 s).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from dist_mnist.config import TrainConfig
from dist_mnist.errors import UserError

if TYPE_CHECKING:  # distributed.py imports this module to set up the flight recorder
    from dist_mnist.distributed import DistContext

# Entries per process group the NCCL flight recorder keeps (torch's docs suggest 2000); each is a few hundred bytes.
FLIGHT_RECORDER_ENTRIES = "2000"
FLIGHT_RECORDER_FOLDER = "flight_recorder"
# gloo prefixes most messages with the C++ source location, "[/path/to/pair.cc:534] Connection closed by peer".
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]\s*")
# gloo raises plain RuntimeErrors: its source path, or, for a pair an earlier timeout closed, only the message.
_GLOO_FAILURE = re.compile(r"gloo|pair closure|closed by peer|Timed out waiting|Connection reset|Broken pipe")


@dataclass
class CollectiveTimeout:
    """The timeout every process group currently applies: --timeout-s until the first step, then --train-timeout-s."""
    seconds: float
    training_seconds: float

    def switch_to_training(self, ctx: DistContext) -> None:
        """Call once every rank is past its first step (its backward all-reduce has met all the others)."""
        if self.seconds == self.training_seconds:
            return
        self.seconds = self.training_seconds
        if ctx.world_size == 1:
            return
        timeout = datetime.timedelta(seconds=self.training_seconds)
        # The default group (nccl on GPUs, else the control group itself) and the gloo control group. The method of
        # the group, not dist.set_timeout: torch 2.11 (what our GPU machines run) does not have that yet.
        for group in {dist.group.WORLD, ctx.control_group}:
            group.set_timeout(timeout)


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's own errors (nccl raises DistBackendError) and gloo's, which are plain RuntimeErrors."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(_GLOO_FAILURE.search(str(exc))))


@contextmanager
def phase(name: str, step: int | None, timeout_s: float, last_checkpoint: Path | None) -> Iterator[None]:
    """Turn a failed collective inside this block into one line naming the phase, the step (None: before the
    first) and what to resume."""
    try:
        yield
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        reason = _SOURCE_LOCATION.sub("", lines[0])
        if last_checkpoint:
            kept = f"the last checkpoint is {last_checkpoint}"
            rerun = "rerun the same command to resume"
        else:
            # No checkpoint of this process's: the run may still have one from the process it resumed from, or it
            # has none, and then the same command is refused (a run folder with files but no checkpoint is never
            # reused). Which one this process cannot tell, so the advice covers both.
            kept = "this process wrote no checkpoint yet"
            rerun = ("rerun the same command to resume from the run's last checkpoint if an earlier process wrote "
                     "one; a run without any starts again under a new --run-name (its folder is not reused)")
        when = "before the first step" if step is None else f"after step {step}"
        raise UserError(f"a collective in {name} failed {when}: a peer did not answer within the "
                        f"{timeout_s:g} s timeout or left the job ({reason}); {kept}. Look for the stuck or lost "
                        f"rank in the other nodes' output, then {rerun}") from None


def flight_recorder_dir(cfg: TrainConfig, environ: Mapping[str, str]) -> Path:
    """Where NCCL dumps its flight recorder, known before the process group opens (the run folder is not, unless
    --run-name names it): in the run folder, or under --output-dir keyed by torchrun's run id."""
    if cfg.run_name:
        return Path(cfg.output_dir) / cfg.run_name / FLIGHT_RECORDER_FOLDER
    run_id = environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"
    return Path(cfg.output_dir) / FLIGHT_RECORDER_FOLDER / run_id


def flight_recorder_env(dump_dir: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set before an nccl process group opens so a timeout leaves each rank's last collectives in
    `dump_dir`. torch 2.14 reads the TORCH_FR_ names first and the older TORCH_NCCL_ ones after; a value the user
    set under either name is kept."""
    settings = [(("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), FLIGHT_RECORDER_ENTRIES),
                (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
                # The rank is appended: nccl_trace_rank_0, nccl_trace_rank_1, ...
                (("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"), f"{dump_dir}/nccl_trace_rank_")]
    return {names[0]: value for names, value in settings if not any(name in environ for name in names)}


def enable_flight_recorder(cfg: TrainConfig) -> None:
    """Before init_process_group with nccl."""
    dump_dir = flight_recorder_dir(cfg, os.environ)
    env = flight_recorder_env(dump_dir, os.environ)
    if "TORCH_FR_DUMP_TEMP_FILE" in env:
        try:
            dump_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the flight recorder folder {dump_dir}: {exc.strerror or exc}") from None
    os.environ.update(env)
