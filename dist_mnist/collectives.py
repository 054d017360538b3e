"""Collective failures: a shorter timeout once training runs, phase-named one-line errors, NCCL's flight recorder;
and the one-line error for a lost DataLoader worker, which shares their advice on what to resume.

A peer that hangs (a stuck NFS read, a frozen GPU) or vanishes leaves the others blocked in whatever collective
comes next. Start-up legitimately takes long (rendezvous, the MNIST download, torch.compile on the first step), a
training collective does not, so the two get separate timeouts, as in torchtitan (300 s / 100 s).
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from dist_mnist.config import TrainConfig
from dist_mnist.errors import UserError, first_line
from dist_mnist.restarts import env_whole_number, next_restart, restart_advice, torchrun_restarts
from dist_mnist.runfiles import run_id_file_name
from dist_mnist.shutdown import failure_path

if TYPE_CHECKING:  # distributed.py imports this module to set up the flight recorder
    from dist_mnist.distributed import DistContext

# Entries per process group the NCCL flight recorder keeps (torch's docs suggest 2000); each is a few hundred bytes.
FLIGHT_RECORDER_ENTRIES = "2000"
FLIGHT_RECORDER_FOLDER = "flight_recorder"
# gloo prefixes most messages with the C++ source location, "[/path/to/pair.cc:534] Connection closed by peer".
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]\s*")
# DDP's comm hook futures wrap the all-reduce's error once per `.then()`, and gloo appends advice (and an emoji) to a
# lost connection's message: the reason in the error line is gloo's own words without either.
_CALLBACK_WRAPPERS = re.compile(r"^(?:Got the following error when running the callback: \w+: )+")
_GLOO_ADVICE = re.compile(r"\s*This is typically caused by a remote worker.*$")
# gloo raises plain RuntimeErrors: its source path, or, for a pair an earlier timeout closed, only the message.
_GLOO_FAILURE = re.compile(r"gloo|pair closure|closed by peer|Timed out waiting|Connection reset|Broken pipe")
# torch's words for a DataLoader worker process that died: its SIGCHLD handler's "DataLoader worker (pid 7) is killed
# by signal: Killed." or "... exited unexpectedly with exit code 1", or "DataLoader worker (pid(s) 7) exited
# unexpectedly" from a wait for a batch. An exception in the worker's own code comes back as "Caught ValueError in
# DataLoader worker process 0" instead: no pid, a bug, not a lost process.
_LOST_DATA_WORKER = re.compile(r"DataLoader worker \(pid[^)]*\) [^.]*")


@dataclass
class CollectiveTimeout:
    """The timeout every process group currently applies: --timeout-s until the first step, then --train-timeout-s."""
    seconds: float
    training_seconds: float

    def switch_to_training(self, ctx: DistContext) -> str | None:
        """Call once every rank is past its first step (its backward all-reduce has met all the others). Returns a
        `note:` line, once, where a group's backend cannot change its timeout; None otherwise."""
        if self.seconds == self.training_seconds:
            return None
        if ctx.world_size == 1:
            self.seconds = self.training_seconds
            return None
        # The default group (nccl on GPUs, else the control group itself) and the gloo control group. The method of
        # the group, not dist.set_timeout: torch 2.11 (what our GPU machines run) does not have that yet.
        groups = [dist.group.WORLD, *([ctx.control_group] if ctx.control_group is not dist.group.WORLD else [])]
        switched: list[Any] = []
        for group in groups:
            try:
                group.set_timeout(datetime.timedelta(seconds=self.training_seconds))
            except RuntimeError as exc:
                # Some torch versions' backends raise "does not support setting timeout" (torch 2.14's base class
                # only warns; 2.11's NCCL backend is unverified). A timeout that stays long is no reason to end a
                # run: every group keeps the start-up one, so the timeout an error line names is the one each
                # collective applied, and the switch is not tried again.
                for done in switched:
                    done.set_timeout(datetime.timedelta(seconds=self.seconds))
                kept, self.training_seconds = self.training_seconds, self.seconds
                reason = " ".join(str(exc).split())[:200]
                return (f"note: this torch cannot change a process group's timeout ({reason}): collectives keep "
                        f"--timeout-s {self.seconds:g} after the first step, not --train-timeout-s {kept:g}, so a "
                        f"hung or lost peer ends the run after {self.seconds:g} s")
            switched.append(group)
        self.seconds = self.training_seconds
        return None


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's own errors (nccl raises DistBackendError) and gloo's, which are plain RuntimeErrors."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(_GLOO_FAILURE.search(str(exc))))


@dataclass(frozen=True)
class Rerun:
    """What the command that launched a run must change to go on with it.

    `run_name`: the name to add where the launch gave none; a default name is made afresh by every --standalone
    launch (a fixed --rdzv-id keeps it), so such a run is found again only by its name. `resume_path`: the --resume
    PATH the launch gave, where the run has written checkpoints past it since: the same command is then refused
    (checkpoint.resume_from_path: it would train those steps again), and a stop line that advised it sent the user
    into that refusal. --resume auto continues from the run's newest.
    """

    run_name: str | None = None
    resume_path: str | None = None

    def command(self, change: str | None = None) -> str:
        """"the same command" with what it must change; with a `change` of the caller's own ("a lower
        --num-workers"), "the command with" that first."""
        changes = [change] if change else []
        if self.run_name:
            changes.append(f"--run-name {self.run_name}")
        if self.resume_path:
            changes.append(f"--resume auto in place of --resume {self.resume_path}")
        return ("the command" if change else "the same command") + (f" with {' and '.join(changes)}" if changes
                                                                     else "")


def resume_advice(last_checkpoint: Path | None, command: str = "the same command",
                  known: bool = True) -> tuple[str, str]:
    """What a failed process kept and how to go on: ("the last checkpoint is X", "rerun COMMAND to resume").

    `last_checkpoint` is the run's newest (Trainer.newest_checkpoint: written by this process or resumed from);
    None means the run has none, and the same command is then refused (a run folder with files but no checkpoint
    is never reused): it starts again under another name. `known=False` where the caller cannot know (main's
    start-up, before the Trainer holds the run): the advice then covers both cases."""
    if last_checkpoint:
        return f"the last checkpoint is {last_checkpoint}", f"rerun {command} to resume"
    if not known:
        return ("the run's checkpoints, if it has any, are in its checkpoints folder",
                f"rerun {command} to resume from the newest if there is one; a run without any starts again under "
                "a new --run-name (a run folder without a checkpoint is not reused)")
    return ("the run has no checkpoint yet",
            "start it again under a new --run-name (a run folder without a checkpoint is not reused)")


def lost_data_worker(exc: BaseException) -> str | None:
    """torch's account of a DataLoader worker process that died ("DataLoader worker (pid 7) is killed by signal:
    Killed"), or None where `exc` is anything else.

    A worker killed while it hands over a batch can also break the connection the batch's shared memory comes
    through (multiprocessing's resource_sharer) before the loader has seen the worker die: a ConnectionError or
    EOFError out of the DataLoader's own code (under a busy CPU, half of the kills in a test)."""
    if isinstance(exc, RuntimeError):
        match = _LOST_DATA_WORKER.search(str(exc))
        return match.group(0) if match else None
    if isinstance(exc, (ConnectionError, EOFError)) and any(
            frame.f_globals.get("__name__") == "torch.utils.data.dataloader"
            for frame, _ in traceback.walk_tb(exc.__traceback__)):
        return f"its connection broke while it handed over a batch: {type(exc).__name__}: {exc}".rstrip(": ")
    return None


def lost_data_worker_error(reason: str, step: int | None, last_checkpoint: Path | None,
                           rerun_as: Rerun) -> UserError:
    """One line for a dead DataLoader worker (`reason`, from lost_data_worker): the step (None: before the first),
    the likely cause, the remedy and what to resume; `rerun_as` what the command must change besides the workers."""
    when = "before the first step" if step is None else f"after step {step}"
    kept, rerun = resume_advice(last_checkpoint, rerun_as.command("a lower --num-workers"))
    restart = restart_advice(last_checkpoint)
    then = f"{restart} (with the same --num-workers)" if restart else f"Then {rerun}"
    return UserError(f"a DataLoader worker of this process died {when} ({reason}), {LOST_WORKER_REMEDY}; {kept}. "
                     f"{then}")


LOST_WORKER_REMEDY = ("most often the out-of-memory killer's doing (dmesg says so): use fewer --num-workers (each is "
                      "a process of its own; 0 loads the data in the training process) or give the job more memory")


def stop_raising_for_lost_data_workers() -> None:
    """Take back torch's SIGCHLD handler, which raises a dead DataLoader worker's error wherever the main thread is.

    Once a run is failing it would interrupt the cleanup (the join of a checkpoint write in flight: a second
    traceback, a file left unfinished) and the interpreter's exit (one more traceback). A worker's death is still
    found where it matters, by the loader's own check when a batch does not come."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@contextmanager
def phase(name: str, step: int | None, timeout_s: float, last_checkpoint: Path | None | Callable[[], Path | None],
          rerun_as: Rerun | Callable[[], Rerun] = Rerun(), checkpoint_known: bool = True,
          done: str | None = None) -> Iterator[None]:
    """Turn a failed collective inside this block into one line naming the phase, the step (None: before the
    first) and what to resume; `rerun_as` what the command must change to go on with the run (Rerun).
    `last_checkpoint` and `rerun_as` may be functions, asked only on failure: a checkpoint whose write began inside
    the block is the run's newest once that write is done. `done`: where the block comes after the training
    completed and wrote its last checkpoint, what the run has ("the training is complete (...)"): nothing is left
    to resume."""
    try:
        yield
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        failure_path.begin()  # a lost peer: torchrun's SIGTERM may land any moment now, and must not end us unheard
        if callable(last_checkpoint):
            last_checkpoint = last_checkpoint()
        command = (rerun_as() if callable(rerun_as) else rerun_as).command()
        reason = _GLOO_ADVICE.sub("", _SOURCE_LOCATION.sub("", _CALLBACK_WRAPPERS.sub("", first_line(exc))))
        look = "look for the stuck or lost rank in the other nodes' output"
        if done and last_checkpoint:
            # A rerun (or torchrun's restart) finds the run complete and trains no more: "rerun to resume" was wrong.
            restart = next_restart()
            kept = f"{done}; its last checkpoint is {last_checkpoint}"
            then = (f"{restart} and they find the run complete; if this repeats, {look}" if restart
                    else f"{look.capitalize()}; {command} finds the run complete and trains no more")
        else:
            kept, rerun = resume_advice(last_checkpoint, command, checkpoint_known)
            restart = restart_advice(last_checkpoint, checkpoint_known)
            then = f"{restart}; if this repeats, {look}" if restart else f"{look.capitalize()}, then {rerun}"
        when = "before the first step" if step is None else f"after step {step}"
        raise UserError(f"a collective in {name} failed {when}: a peer did not answer within the "
                        f"{timeout_s:g} s timeout or left the job ({reason}); {kept}. {then}") from None


def flight_recorder_dir(cfg: TrainConfig, environ: Mapping[str, str]) -> Path:
    """Where NCCL dumps its flight recorder, known before the process group opens (the run folder is not, unless
    --run-name names it): in the run folder, or under --output-dir keyed by torchrun's run id; then a folder per
    launch attempt (`attempt_<torchrun's restart count>`, as torchrun names its own log folders; a Slurm requeue,
    which starts the count again under the same job id, `requeue_<SLURM_RESTART_COUNT>_attempt_<N>`). A timeout
    in a restarted attempt overwrote the dumps of the one before, and fr_trace reads a folder and every folder below
    it as one set of ranks, so each attempt's dumps stand apart."""
    if cfg.run_name:
        base = Path(cfg.output_dir) / cfg.run_name / FLIGHT_RECORDER_FOLDER
    else:
        run_id = environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"
        base = Path(cfg.output_dir) / FLIGHT_RECORDER_FOLDER / run_id_file_name(run_id)
    restart, _ = torchrun_restarts(environ)
    requeue = env_whole_number("SLURM_RESTART_COUNT", 0, environ=environ)
    return base / f"{f'requeue_{requeue}_' if requeue else ''}attempt_{restart}"


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
