"""Profiling: torch.profiler traces per rank, FLOP counting, matmul peak, and the end-of-run performance summary."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import os
import pickle
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerAction, ProfilerActivity, profile, schedule

from dist_mnist.comm import CommStep
from dist_mnist.config import TrainConfig
from dist_mnist.console import rank_line
from dist_mnist.distributed import DistContext
from dist_mnist.durable import open_new, temp_path
from dist_mnist.runfiles import TRACES_DIR, trace_file_name, trace_file_rank, trace_window_dir, trace_window_step
from dist_mnist.runtext import PHASES, warmup_steps

# A rank is a straggler when its own work per step (the step less the time it waited for the gradient
# all-reduce after its backward compute: a slow rank waits least, the others wait for it) is this much above the
# median rank's, and the excess, which every other rank spends waiting, is a noticeable share of a step (so
# sub-millisecond jitter on fast steps is no straggler).
STRAGGLER_RATIO = 1.25
STRAGGLER_MIN_STEP_SHARE = 0.05
# The phases a rank's own work splits into: backward compute is the backward phase less the exposed all-reduce.
OWN_PHASES = ("data", "to_device", "forward", "backward_compute", "optimizer")
# The diagnosis calls a run bound by waiting for data, host-to-device copies or communication when that share of
# a step (averaged over ranks) is at least this; otherwise it is compute-bound.
BOUND_SHARE = 0.25

# Traces go into a folder per window inside the run folder (TRACES_DIR/trace_window_dir): HTA's
# TraceAnalysis(trace_dir=...) takes every JSON file it finds there for a trace (summary.json included) and keeps an
# arbitrary one per rank, so one folder for all windows mixed windows of different steps, and of different processes
# of a resumed run, across ranks; TensorBoard's profiler plugin lists each window's folder as a run.


def configure_kineto(device: torch.device) -> None:
    """Environment settings kineto reads when the profiler starts and stops; call before the first window.

    Set with setdefault, so a user's own value wins.
    - TEARDOWN_CUPTI=1 on CUDA: without it kineto never calls cuptiFinalize, so CUPTI stays subscribed to every
      CUDA API call after the profiler has stopped and training stays 10-20% slower for the rest of the process
      (pytorch/pytorch#144455, fixed by opting in: pytorch/pytorch#146604; kineto reads the variable at every
      stop, and makes teardown its default only from pytorch/kineto#1264 on). Only from CUDA 12.6: on older
      CUDA, re-initialising CUPTI after a teardown crashes once CUDA graphs were captured (torch's own profiler
      sets TEARDOWN_CUPTI=0 there for inductor's CUDA graphs, see torch/profiler/profiler.py).
    - KINETO_LOG_LEVEL=6 where torch is built with CUDA but no driver answers (a CPU-only machine): kineto asks
      for the GPUs' properties while writing every trace, CPU-only or not, and logs the expected failure as
      `ERROR: ... gpuGetDeviceCount failed with code 35` (kineto's DeviceProperties.cpp); torch 2.14's kineto also
      prints `USDT: ... profiler_start` and `profiler_stop` at every window. Kineto logs at levels 0-5 (VERBOSE to
      USDT) and prints those at or above the variable, so 6 prints none of them; a trace that could not be written
      is still reported, by our own note line (the run checks its file). With a working driver nothing changes.
    """
    if device.type == "cuda":
        if _cuda_version() >= (12, 6):
            os.environ.setdefault("TEARDOWN_CUPTI", "1")
    elif torch.version.cuda and not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _cuda_version() -> tuple[int, ...]:
    return tuple(int(part) for part in (torch.version.cuda or "0.0").split(".")[:2])


# torch.profiler.schedule's warning for warmup=0 (the start of its message, as warnings filters match it).
WARMUP_ZERO_WARNING = "Profiler won't be using warmup"


class WindowedProfiler:
    """--profile: a fresh torch.profiler.profile for each window, open only while its window runs.

    Each window is --profile-warmup steps recorded and discarded, then --profile-active steps recorded, and its
    trace is written when its last active step ends (or training does): exactly torch.profiler's
    schedule(wait, warmup, active, repeat), counted from this process's first step, whose non-NONE stretches
    decide when a window opens. Between windows and after the last one no profiler object exists: no
    ProfilerStep# range, no kineto session, and with TEARDOWN_CUPTI (configure_kineto) no CUPTI subscription,
    so those steps run as without --profile. The traces' ProfilerStep#N are the job's global step numbers, so a
    resumed run continues them. A step's ProfilerStep# range begins when the step does (`begin_step()`), and a
    window still open at the run's last step closes after it (`step()` at `step_limit`, or `end()`), before the
    final evaluation and checkpoint: no trace holds a step the run did not take. Call `begin_step()` before and
    `step()` after every training step, and `end()` after the one training ends at.

    A trace that cannot be written (a full disk, a quota, a read-only folder) is a lost diagnostic, not lost work:
    one `note:` line, and this process opens no further window (each would fail the same way, and costs time
    while it records) but trains on. `outcome()` is what summary.json says of the traces.
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext, trace_dir: Path, first_step: int, step_limit: int) -> None:
        self.cfg = cfg
        configure_kineto(ctx.device)
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
        self.trace_dir = trace_dir
        self.rank, self.world_size = ctx.rank, ctx.world_size
        # None writes no trace (dist_mnist.profiler_bench times the windows without it).
        self.trace_handler: Callable[[profile], None] | None = self._write_trace
        with warnings.catch_warnings():
            # torch warns of warmup=0 at each schedule, as a UserWarning with its source line; make_profiler says it
            # once, as a note.
            warnings.filterwarnings("ignore", WARMUP_ZERO_WARNING, UserWarning)
            self.cycle = schedule(wait=cfg.profile_wait, warmup=cfg.profile_warmup, active=cfg.profile_active,
                                  repeat=cfg.profile_repeat)
            self.window_schedule = schedule(wait=0, warmup=cfg.profile_warmup, active=cfg.profile_active, repeat=1)
        self.first_step = first_step  # the job's step number of this process's first step
        self.step_limit = step_limit  # the job's step count when training ends (no step of that number runs)
        self.steps_done = 0  # by this process
        self.window: profile | None = None
        self.window_steps = 0
        self.window_first_step = 0  # the open (or last) window's first recorded step, as progress.jsonl counts
        self.step_owed = False  # window.step() for the next step, which begin_step() makes once that step begins
        self.traces_written = 0
        self.write_failure: str | None = None  # why a trace could not be written; no window opens after it

    def __enter__(self) -> WindowedProfiler:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._close(*exc_info)  # an exception ended training inside a window: its trace is written now

    def outcome(self) -> dict[str, Any]:
        """This process's traces for summary.json: how many were written, and why profiling stopped (None: it did
        not)."""
        return {"written": self.traces_written, "write_failure": self.write_failure}

    @property
    def window_opens_next(self) -> bool:
        """Whether the next `begin_step()` opens a window (starts kineto). Opening and closing are pauses the caller
        books (RunClock), and on CUDA it waits for the queued steps first, so their GPU time counts as theirs."""
        return self.window is None and self._due()

    @property
    def window_closes_next(self) -> bool:
        """Whether the next `step()` closes a window: waits for the GPU (the profiler's exit synchronizes) and
        writes the trace."""
        return self.window is not None and (
            self.window_steps + 1 == self.cfg.profile_warmup + self.cfg.profile_active
            or self.first_step + self.steps_done + 1 >= self.step_limit)

    @property
    def window_open(self) -> bool:
        """Whether `end()` closes a window."""
        return self.window is not None

    def begin_step(self) -> None:
        """Before every training step: begins its ProfilerStep# range, opening a window where one is due.

        Not at the end of the previous step, as torch's profile.step() does: a step that training ends after
        (a stop signal, --stop-at-accuracy) would leave its trace a range, or a whole window, of a step that never
        ran, holding the stop vote, the final evaluation and checkpoint."""
        if self.window is None:
            self._open_if_due()
        elif self.step_owed:
            self.window.step()
            self.window_steps += 1
            self.step_owed = False

    def step(self) -> None:
        """After every training step: closes the window at its last step, or at the run's last (`step_limit`)."""
        if self.window_closes_next:
            self._close(None, None, None)
        elif self.window is not None:
            self.step_owed = True  # the next step's range begins with that step (begin_step)
        self.steps_done += 1

    def end(self) -> None:
        """After `step()` of the step training ends at: closes an open window, before the final evaluation and
        checkpoint."""
        self._close(None, None, None)

    def _write_trace(self, window: profile) -> None:
        """on_trace_ready: the window's trace under tensorboard_trace_handler's name, whole or not at all.

        torch's handler gzips straight into the final name, so a full disk left a truncated
        rank<N>.<ns>.pt.trace.json.gz, which TensorBoard and HTA then fail to read (they take every file so named).
        Here the trace is written under a hidden name that ends in .gz but not in .json.gz, which readers skip
        (export_trace: a new file of this process's, never a link planted there), and renamed when complete; a
        failed write removes it, says so in one line and ends profiling for the rest of this process
        (`write_failure`). It goes into its window's
        folder (trace_window_dir), named by its global rank; a resumed process that records a window's steps again
        replaces the earlier process's trace of them (and where it cannot, sets that one aside:
        _set_aside_earlier_traces), and rank 0 removes the traces of ranks this world lacks (an earlier, larger
        world's), which HTA would read as ranks of this window (_remove_traces_of_absent_ranks).

        The trace's `traceName` is the temporary file export_trace has torch write and then deletes: torch takes no
        name for it (kineto writes the path it exports to), and setting it would mean parsing and writing the trace
        again.
        """
        folder = self.trace_dir / trace_window_dir(self.window_first_step)
        final = folder / trace_file_name(self.rank)
        partial = final.with_name(f".{final.name.removesuffix('.json.gz')}.partial.gz")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            export_trace(window, partial)
            os.replace(partial, final)  # a link planted at the final name is replaced, not written through
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            self.write_failure = f"could not write {final.name} to {final.parent}: {exc.strerror or exc}"
            rank_line(self.rank, "note", f"{self.write_failure}; no more traces are recorded in this run, training "
                      f"goes on{self._set_aside_earlier_traces()}")
            return
        # Written from here on: a failed cleanup below is no failed write, and must not have the failure path take
        # this process's new trace for an earlier process's and set it aside.
        self.traces_written += 1
        if self.rank == 0:
            self._remove_traces_of_absent_ranks(folder)

    def _absent_ranks_traces(self, folder: Path) -> list[Path]:
        """The traces in the window folder `folder` of ranks this world lacks (an earlier, larger world's), sorted;
        OSError where the folder cannot be listed."""
        return sorted(other for other in folder.iterdir()
                      if (rank := trace_file_rank(other.name)) is not None and rank >= self.world_size)

    def _remove_traces_of_absent_ranks(self, folder: Path) -> None:
        """Rank 0, after writing its trace of the window in `folder`: removes the traces there of ranks this world
        lacks (an earlier, larger world's, of the same steps), which HTA would read as ranks of this window. What
        cannot be removed is left as it is and named in a note; this rank's trace is written, and profiling goes
        on."""
        stuck = []
        try:
            absent = self._absent_ranks_traces(folder)
        except OSError as exc:
            absent, stuck = [], [f"the folder's list ({exc.strerror or exc})"]
        for other in absent:
            try:
                other.unlink(missing_ok=True)
            except OSError as exc:
                stuck.append(f"{other.name} ({exc.strerror or exc})")
        if stuck:
            one = len(stuck) == 1
            rank_line(self.rank, "note", f"could not remove from {folder} the {'trace' if one else 'traces'} of "
                      f"{'a rank' if one else 'ranks'} this world of {self.world_size} lacks, an earlier, larger "
                      f"world's, which HTA would read as {'a rank' if one else 'ranks'} of this window: "
                      f"{', '.join(stuck)}; remove {'it' if one else 'them'} before reading the window; training goes "
                      "on")

    def _set_aside_earlier_traces(self) -> str:
        """After a failed write: the traces an earlier process of the run (a crashed attempt, the process a resume
        went back behind) left in this window's folder and in the later ones this process's schedule has, each
        renamed to `<name>.earlier` (a name no viewer reads: HTA takes *.json and *.gz, the profiler plugin and
        gpucheck *.pt.trace.json.gz): this rank's, and on rank 0 those of ranks this world lacks (an earlier, larger
        world's), which rank 0 removes only after a write of its own. This process writes none of them now, while
        the other ranks write theirs: left in place, each was taken for this process's trace of that window, or for
        a rank of it, beside the other ranks' of another process (HTA merges the ranks of a folder). Returns what
        the note adds."""
        name = trace_file_name(self.rank)
        try:
            folders = sorted(self.trace_dir.iterdir())
        except OSError:  # the traces folder itself could not be made
            folders = []
        own: list[Path] = []
        absent: list[Path] = []
        for folder in folders:
            step = trace_window_step(folder.name)
            if step is None or step < self.window_first_step or not self._schedule_has(step):
                continue
            if (folder / name).exists():
                own.append(folder / name)
            if self.rank == 0:
                with contextlib.suppress(OSError):  # a folder that cannot be listed: its traces cannot be renamed
                    absent += self._absent_ranks_traces(folder)
        said = ""
        stuck: list[str] = []
        for traces in (own, absent):
            moved: list[Path] = []
            for earlier in traces:
                aside = earlier.with_name(f"{earlier.name}.earlier")
                for number in itertools.count(2):  # an older one set aside before stays too
                    if not aside.exists():
                        break
                    aside = earlier.with_name(f"{earlier.name}.earlier{number}")
                try:
                    os.replace(earlier, aside)
                    moved.append(aside)
                except OSError as exc:
                    stuck.append(f"{earlier.parent.name}/{earlier.name} ({exc.strerror or exc})")
            if moved:
                one = len(moved) == 1
                whose, taken_for = (("this rank", "viewers would take for this process's") if traces is own else
                                    (f"{'a rank' if one else 'ranks'} this world of {self.world_size} lacks",
                                     f"HTA would read as {'a rank of its' if one else 'ranks of their'} window"))
                said += (f"; {'the trace' if one else 'the traces'} an earlier process left for {whose} "
                         f"{self._windows_of(moved)}, which {taken_for}, {'is' if one else 'are'} renamed to "
                         f"{', '.join(f'{path.parent.name}/{path.name}' for path in moved)}")
        if stuck:
            one = len(stuck) == 1
            said += (f"; {'the trace' if one else 'the traces'} an earlier process left could not be renamed and "
                     f"{'is' if one else 'are'} not this process's: {', '.join(stuck)}")
        return said

    def _windows_of(self, traces: list[Path]) -> str:
        """Which windows `traces` lie in, as the note says it: the window whose write failed, later ones, or both."""
        here = self.trace_dir / trace_window_dir(self.window_first_step)
        if all(trace.parent == here for trace in traces):
            return "in this window"
        return "in this window and later ones" if any(trace.parent == here for trace in traces) else "in later windows"

    def _schedule_has(self, window_step: int) -> bool:
        """Whether this process's schedule opens a window whose first recorded step is `window_step` (see
        _open_if_due): the k-th opens after --profile-wait more steps of each cycle, counted from its first step."""
        cfg = self.cfg
        period = cfg.profile_wait + cfg.profile_warmup + cfg.profile_active
        k, off = divmod(window_step - (self.first_step + cfg.profile_wait + cfg.profile_warmup + 1), period)
        return (off == 0 and k >= 0 and (cfg.profile_repeat == 0 or k < cfg.profile_repeat)
                and self.first_step + k * period + cfg.profile_wait < self.step_limit)

    def _close(self, *exc_info: Any) -> None:
        self.step_owed = False
        if self.window is not None:
            window, self.window = self.window, None
            window.__exit__(*exc_info)

    def _due(self) -> bool:
        """Whether the schedule records this process's next step, and that step runs."""
        return (self.write_failure is None and self.cycle(self.steps_done) != ProfilerAction.NONE
                and self.first_step + self.steps_done < self.step_limit)

    def _open_if_due(self) -> None:
        if self.window is not None or not self._due():
            return
        start = self.first_step + self.steps_done
        # profile evaluates its schedule at step 0 when built, before step_num moves to the window's first
        # step: steps before the window count as its first.
        window = profile(
            activities=self.activities,
            schedule=lambda step: self.window_schedule(max(step - start, 0)),
            on_trace_ready=self.trace_handler,
            record_shapes=self.cfg.profile_shapes,
            profile_memory=self.cfg.profile_memory,
            with_stack=self.cfg.profile_stack,
        )
        window.step_num = start  # ProfilerStep#<the job's step>, as torchtitan does
        window.__enter__()
        self.window, self.window_steps = window, 0
        # ProfilerStep#start + warmup is the first recorded step, which progress.jsonl calls one more.
        self.window_first_step = start + self.cfg.profile_warmup + 1


def export_trace(window: profile, path: Path) -> None:
    """`window`'s trace, gzipped, as `path`, a new file of this process's (durable.open_new: whatever was at the name
    goes first, and a symbolic link planted there in between is refused, not written through).

    torch's export_chrome_trace opens the path it is given with gzip.open(path, "wb"), which follows a symbolic
    link: one planted at the temporary name in a run folder another user can write to (a group-shared output
    folder, a copied run folder that is resumed) had the trace written over the file it named (review_security F4).
    So torch writes the plain JSON into a folder of this process's own (mkdtemp, mode 0700, in the temporary folder,
    where torch's own .gz export puts the same JSON), and it is gzipped from there into `path` here, as torch would.
    """
    with tempfile.TemporaryDirectory(prefix="dist_mnist_trace_") as private:
        exported = os.path.join(private, path.name.removeprefix(".").removesuffix(".partial.gz") + ".json")
        window.export_chrome_trace(exported)
        with open(exported, "rb") as source, open_new(path) as target, \
                gzip.GzipFile(filename="", mode="wb", fileobj=target) as compressed:
            shutil.copyfileobj(source, compressed, 1 << 20)


class _NoProfiler(nullcontext):
    window_opens_next = window_closes_next = window_open = False

    def __enter__(self) -> _NoProfiler:
        return self

    def begin_step(self) -> None:
        pass

    def step(self) -> None:
        pass

    def end(self) -> None:
        pass

    def outcome(self) -> None:
        """No --profile: no traces to speak of (summary.json's `traces` is null)."""


def profile_records_nothing(cfg: TrainConfig, steps: int) -> bool:
    """Whether --profile's first window never records in `steps` steps: it records after --profile-wait and
    --profile-warmup."""
    return cfg.profile and steps <= cfg.profile_wait + cfg.profile_warmup


def make_profiler(cfg: TrainConfig, ctx: DistContext, run_dir: Path, first_step: int,
                  step_limit: int) -> WindowedProfiler | _NoProfiler:
    """The --profile windows (traces in <run folder>/traces/), or a no-op: see WindowedProfiler for its calls."""
    if not cfg.profile:
        return _NoProfiler()
    steps_left = step_limit - first_step
    if ctx.is_main and profile_records_nothing(cfg, steps_left):
        # A warning, not an error: a resumed run may legitimately have only a few steps left (a run from step 0 is
        # refused before it starts, Trainer.resume_and_train).
        rank_line(ctx.rank, "warning", f"--profile records nothing: {steps_left} "
                  f"{'step is' if steps_left == 1 else 'steps are'} left, and the first "
                  f"window only starts recording after --profile-wait {cfg.profile_wait} + --profile-warmup "
                  f"{cfg.profile_warmup} steps")
    if ctx.is_main and cfg.profile_warmup == 0:
        rank_line(ctx.rank, "note", "--profile-warmup 0: the first recorded step of each window also holds the "
                  "profiler's own start, so its times are high (torch.profiler warns that this can skew results)")
    return WindowedProfiler(cfg, ctx, run_dir / TRACES_DIR, first_step, step_limit)


@contextmanager
def cuda_memory_snapshot(enabled: bool, path: Path) -> Iterator[None]:
    """--cuda-memory-snapshot: record the CUDA caching allocator's history and dump it on any exit, an exception or
    torch.cuda.OutOfMemoryError included (where it matters most), as torchtitan's profiler does."""
    if not enabled:
        yield
        return
    # Python frames only: torch's default stacks="all" adds C++ frames, which are symbolized when the snapshot is
    # dumped, 461 s a dump against 4 s in torchtitan's runs (pytorch/torchtitan#3628); our allocation sites are
    # Python, and the dump after an out-of-memory error must end within a launcher's grace period.
    torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    try:
        yield
    finally:
        try:
            dump_memory_snapshot(path)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)


def dump_memory_snapshot(path: Path) -> None:
    """torch.cuda.memory._dump_snapshot's file (the pickled _snapshot()), written as durable.write_durably writes:
    a new temporary file of this process's (open_new), renamed over `path`. torch's own opens `path` with
    open(path, "wb"), which follows a symbolic link: one planted in the run folder had the snapshot written over the
    file it named (review_security F4). Streamed into the file, not pickled into memory first: a snapshot of
    100,000 events with their stacks can take hundreds of MB."""
    snapshot = torch.cuda.memory._snapshot()
    tmp = temp_path(path)
    try:
        with open_new(tmp) as f:
            pickle.dump(snapshot, f)
        os.replace(tmp, path)  # a link at `path` is replaced, not written through
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def flops_per_sample(model: nn.Module) -> float:
    """Forward + backward FLOPs of one training sample, counted by torch.utils.flop_counter.

    Counted on the meta device, where an operator only works out its output's shape: on a GPU a real pass of a
    batch of 4 made cuDNN plans for shapes nothing else uses, at the end of a run and inside its wall time."""
    # Imported here, at the end of a run: it imports triton, 80 ms of start-up on our CPU machines for nothing.
    from torch.utils.flop_counter import FlopCounterMode

    batch = 4
    meta = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
            for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.zeros(batch, 1, 28, 28, device="meta")
    with FlopCounterMode(display=False) as counter:
        logits = torch.func.functional_call(model, meta, (x,))
        F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device="meta")).backward()
    return counter.get_total_flops() / batch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of large square matmuls in `dtype` on this process's threads: the yardstick for MFU.

    It runs at the end of every run, inside its whole-process wall time: 0.05 s hold thousands of 2048^3 products
    on a GPU (about 25 us each on an H100), where a CPU needs 0.3 s for a few dozen of 1024^3."""
    cuda = device.type == "cuda"
    n, seconds = (2048, 0.05) if cuda else (1024, 0.3)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if cuda else 1):
            a @ b
            iters += 1
        sync()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def parameter_digest(model: nn.Module) -> str:
    """A hash of all parameter bytes: equal on every rank exactly when DDP kept the replicas in sync."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def comm_stats(timed: list[dict[str, float]], comm: list[CommStep] | None) -> dict[str, Any]:
    """Per-rank all-reduce figures (None in a world of one) and the exposed comm per step, capped by backward."""
    if not comm:
        return {"comm_exposed_share": None, "allreduce_time_per_step_s": None,
                "allreduce_exposed_per_step_s": None, "allreduce_overlapped_per_step_s": None,
                "allreduce_bytes_per_step": None, "allreduce_buckets": None, "allreduce_bandwidth_bytes_per_s": None}
    exposed = [min(c.exposed_s, s["backward"]) for c, s in zip(comm, timed)]
    busy = sum(c.seconds for c in comm)
    nbytes = sum(c.nbytes for c in comm)
    n = len(comm)
    return {
        "comm_exposed_share": sum(exposed) / (sum(sum(s.values()) for s in timed) or 1e-12),
        "allreduce_time_per_step_s": busy / n,
        "allreduce_exposed_per_step_s": sum(exposed) / n,
        "allreduce_overlapped_per_step_s": (busy - sum(exposed)) / n,
        "allreduce_bytes_per_step": round(nbytes / n),
        "allreduce_buckets": max(c.buckets for c in comm),
        "allreduce_bandwidth_bytes_per_s": nbytes / busy if busy else None,
    }


def rank_stats(rank: int, steps: list[dict[str, float]], samples_per_step: int, measured_step_s: list[float],
               peak_rss_bytes: int, cuda_peak_bytes: int | None, params_digest: str,
               comm: list[CommStep] | None = None, wall_per_step: bool = True,
               steps_timed: int | None = None) -> dict[str, Any]:
    """This rank's figures for summary.json from its timed steps (`steps`: all, a sample, or none with
    --phase-timers off, where the step times come from the wall clock and the phase and comm figures are None).
    `comm` holds the gradient all-reduce of each step of `steps`, or None. The first steps (warm-up, lazy init) are
    left out. `wall_per_step=False` (CUDA): a wall interval between step starts is not that step's time, since the
    host runs ahead of the GPU and the steps it queued are waited for by whichever step or pause reads a result
    first; only their mean is a step time, so with the timers off the percentiles are that mean.

    Past metrics.STEP_SAMPLE_CAP entries the lists are a sample of every 2^k-th step (metrics.StepSample), and every
    figure is of that sample; `steps_timed` is then the count of all the timed steps (default: `len(steps)`)."""
    skip = warmup_steps(len(steps))
    timed = steps[skip:] or steps
    timed_comm = (comm[skip:] or comm) if comm else None
    wall_skip = warmup_steps(len(measured_step_s))
    wall = measured_step_s[wall_skip:]
    measured = statistics.fmean(wall) if wall else None  # one step: no interval between two step starts
    step_times = [sum(s.values()) for s in timed] or (wall if wall_per_step or measured is None
                                                      else [measured] * len(wall))
    # What explained_fraction compares with the mean interval. Where every step was timed, interval k's own step k
    # over the same steps: the run's last step has no interval, and N steps and N-1 intervals lose different warm-up
    # steps, so the two means were of different steps (97.7% for steps that each measured 99.6%, over 100% after a
    # resume). A sample (--phase-timers sample, or on CUDA) against the mean of all intervals.
    # A sample too short to leave its warm-up out (fewer than 5 timed steps) is mostly its cold first step, against
    # the mean of every interval: "explained 137.9%" for a 5-step run sampled once. No figure there (the table's
    # sampling line says why) rather than that one.
    explained = ([sum(s.values()) for s in steps[:len(measured_step_s)]][wall_skip:]
                 if len(steps) == len(measured_step_s) + 1 else step_times if skip else [])
    total = sum(step_times) or 1e-12
    figures: dict[str, Any] = {**{f"{phase}_share": None for phase in PHASES}, "backward_compute_share": None,
                               **comm_stats(timed, None), "phase_time_per_step_s": None, "own_time_p50_s": None,
                               "explained_fraction": None}
    if timed:
        shares = {f"{phase}_share": sum(s[phase] for s in timed) / total for phase in PHASES}
        comm_figures = comm_stats(timed, timed_comm)
        exposed = ([min(c.exposed_s, s["backward"]) for c, s in zip(timed_comm, timed)] if timed_comm
                   else [0.0] * len(timed))
        backward_compute_share = shares["backward_share"] - (comm_figures["comm_exposed_share"] or 0.0)
        mean_step = total / len(timed)
        phase_time = {phase: shares[f"{phase}_share"] * mean_step for phase in OWN_PHASES
                      if phase != "backward_compute"}
        phase_time["backward_compute"] = backward_compute_share * mean_step
        figures = {
            **shares,
            # backward_share split in two: backward compute, and the all-reduce the step waited for after it.
            "backward_compute_share": backward_compute_share,
            **comm_figures,
            # Mean seconds per step of each part of the rank's own work; where a straggler's excess lies.
            "phase_time_per_step_s": {phase: phase_time[phase] for phase in OWN_PHASES},
            # Own work per step: what a slow rank makes the others wait for in the all-reduce.
            "own_time_p50_s": percentile([t - e for t, e in zip(step_times, exposed)], 0.5),
            # The share of the wall time between step starts (eval and checkpoints left out) the phases explain.
            "explained_fraction": statistics.fmean(explained) / measured if measured and explained else None,
        }
    return {
        "rank": rank,
        "steps": len(steps) if steps_timed is None else steps_timed,
        "step_time_p50_s": percentile(step_times, 0.5) if step_times else 0.0,
        "step_time_p90_s": percentile(step_times, 0.9) if step_times else 0.0,
        "samples_per_sec": samples_per_step * len(step_times) / total,
        **figures,
        "measured_step_time_s": measured,
        "peak_rss_bytes": peak_rss_bytes,
        "cuda_peak_allocated_bytes": cuda_peak_bytes,
        "params_digest": params_digest,
    }


def flag_stragglers(ranks: list[dict[str, Any]]) -> None:
    """Set `straggler`, `straggler_phase` (the part of its own work where its excess lies) and
    `straggler_cost_share` (the share of the median step every other rank spends waiting for it) on each rank;
    None everywhere with --phase-timers off, which leaves no own time to compare.

    Each rank is measured against the median of the *other* ranks: a median over all of them counts the slow rank
    in its own baseline, which on 2 ranks is the mean of both, so a rank 1.65x slower than its peer went unflagged
    and a flagged one was said to cost the other rank half of what it waited."""
    if any(r["own_time_p50_s"] is None for r in ranks):
        for r in ranks:
            r["straggler"] = r["straggler_phase"] = r["straggler_cost_share"] = None
        return
    median_step = statistics.median(r["step_time_p50_s"] for r in ranks)
    for r in ranks:
        others = [other for other in ranks if other is not r]
        r["straggler"], r["straggler_phase"], r["straggler_cost_share"] = False, None, None
        if not others:  # a world of one waits for nobody
            continue
        others_own = statistics.median(other["own_time_p50_s"] for other in others)
        excess = r["own_time_p50_s"] - others_own
        r["straggler"] = (r["own_time_p50_s"] > STRAGGLER_RATIO * others_own
                          and excess > STRAGGLER_MIN_STEP_SHARE * median_step)
        if r["straggler"]:
            r["straggler_cost_share"] = excess / median_step if median_step else None

            def phase_excess(phase: str, rank: dict[str, Any] = r, peers: list[dict[str, Any]] = others) -> float:
                return rank["phase_time_per_step_s"][phase] - statistics.median(
                    peer["phase_time_per_step_s"][phase] for peer in peers)
            r["straggler_phase"] = max(OWN_PHASES, key=phase_excess)


PHASE_WORDS = {"data": "data loading", "to_device": "host-to-device copies", "forward": "forward compute",
               "backward_compute": "backward compute", "optimizer": "the optimizer step"}


def _fewer_bytes(comm_hook: str) -> str:
    """The communication-bound advice on sending fewer bytes: only hooks that send fewer than `comm_hook` does (the
    CPU recipe already runs bf16, where naming bf16 again sent the reader to the setting they had)."""
    if comm_hook == "none":
        return "send fewer bytes (--ddp-comm-hook bf16 or powersgd), "
    if comm_hook in ("bf16", "fp16"):
        return f"send fewer bytes (--ddp-comm-hook powersgd; {comm_hook} is in use), "
    return ""  # powersgd: the strongest compression offered is in use


def _compute_levers(amp: str, device_type: str, native_bf16: bool) -> str:
    """The compute-bound advice: mixed precision only where the run does not use it yet (`amp` as resolved:
    'off', 'bfloat16', 'float16'; the CPU recipe's bf16 runs were told to turn on what they had), and only where the
    device runs it in hardware: a CPU without AVX512-BF16 or AMX emulates bf16, an 11x slower step
    (docs/benchmarks.md)."""
    if amp == "bfloat16" and not native_bf16:
        return ("--amp off (bf16 is emulated on this CPU, which has no AVX512-BF16 or AMX: many times slower than "
                "float32), a larger batch per device or faster devices")
    if amp != "off":
        return f"a larger batch per device or faster devices ({amp} mixed precision is in use)"
    if native_bf16:
        return "mixed precision (--amp bf16), a larger batch per device or faster devices"
    if device_type == "cuda":
        return "mixed precision (--amp fp16: this GPU has no native bf16), a larger batch per device or faster devices"
    return ("a larger batch per device or faster devices (this CPU has no native bf16, AVX512-BF16 or AMX, so mixed "
            "precision would be slower)")


def diagnose(ranks: list[dict[str, Any]], comm_hook: str = "none", amp: str = "off", device_type: str = "cpu",
             native_bf16: bool = True, num_workers: int = 0) -> str:
    """One sentence a person can act on, from the summary's figures; `comm_hook` is the run's --ddp-comm-hook,
    `amp` its autocast dtype as resolved ('off' for none), `native_bf16` whether the device runs bf16 in hardware,
    `num_workers` the DataLoader workers per rank."""
    if any(r["data_share"] is None for r in ranks):
        return "no diagnosis: the phase timers were off (--phase-timers off), so nothing says where a step's time went"
    fewest = min(ranks, key=lambda rank: rank["steps"])
    if not warmup_steps(fewest["steps"]):
        # A 1-step run with a DataLoader worker was "input-bound: the ranks wait for data 96% of each step": the
        # worker's start, in a run that had nothing but its first step.
        return (f"no diagnosis: rank {fewest['rank']} timed only {fewest['steps']} step"
                f"{'' if fewest['steps'] == 1 else 's'}, too few to tell from start-up (workers starting, the first "
                "use of each kernel); a run with at least 5 timed steps is diagnosed")
    stragglers = [r for r in ranks if r["straggler"]]
    if stragglers:
        r = max(stragglers, key=lambda rank: rank["straggler_cost_share"])
        return (f"straggler: rank {r['rank']} is slow in {PHASE_WORDS[r['straggler_phase']]}, and every other rank "
                f"waits for it in the gradient all-reduce, {r['straggler_cost_share']:.0%} of its step; find out "
                f"why rank {r['rank']} is slower there (its host, its data, its device)")

    def mean(key: str) -> float:
        return statistics.fmean(r[key] or 0.0 for r in ranks)

    bounds = {"input": mean("data_share"), "host-to-device": mean("to_device_share"),
              "communication": mean("comm_exposed_share")}
    kind, share = max(bounds.items(), key=lambda item: item[1])
    if share < BOUND_SHARE:
        compute = mean("forward_share") + mean("backward_compute_share") + mean("optimizer_share")
        return (f"compute-bound: forward, backward and optimizer compute take {compute:.0%} of a step; "
                f"{_compute_levers(amp, device_type, native_bf16)} are what make it faster")
    if kind == "input":
        workers = (f"more DataLoader workers (--num-workers; {num_workers} per rank now)" if num_workers
                   else "load batches in parallel (--num-workers)")
        return (f"input-bound: the ranks wait for data {share:.0%} of each step; {workers}, or make the data "
                "source faster")
    if kind == "host-to-device":
        return (f"host-to-device-bound: copying batches to the device takes {share:.0%} of each step; keep the "
                "dataset on the device (--data-on-device on)")
    mb = statistics.fmean(r["allreduce_bytes_per_step"] for r in ranks) / 1e6
    return (f"communication-bound: {share:.0%} of each step waits for the gradient all-reduce ({mb:.1f} MB per "
            f"step); {_fewer_bytes(comm_hook)}all-reduce less often (--grad-accum-steps) or raise --batch-size")


def build_summary(ranks: list[dict[str, Any]], global_samples_per_sec: float | None, epoch_time_s: float | None,
                  flops: float, peak_flops_per_process: float, peak_source: str,
                  comm_hook: str = "none", amp: str = "off", device_type: str = "cpu",
                  native_bf16: bool = True, num_workers: int = 0) -> dict[str, Any]:
    """`global_samples_per_sec` None: no wall interval between two steps was measured (a 1-step run), and every
    figure made from it is None too, not a rate of 0."""
    flag_stragglers(ranks)
    achieved = None if global_samples_per_sec is None else global_samples_per_sec * flops
    mfu = achieved / (peak_flops_per_process * len(ranks)) if achieved is not None and peak_flops_per_process else None
    return {
        "world_size": len(ranks),
        "ranks_in_sync": len({r["params_digest"] for r in ranks}) == 1,
        "samples_per_sec": global_samples_per_sec,
        "epoch_time_s": epoch_time_s,
        "flops_per_sample": flops,
        "achieved_tflops": None if achieved is None else achieved / 1e12,
        "peak_tflops_per_process": peak_flops_per_process / 1e12,
        "peak_source": peak_source,
        # Above 1 the yardstick is wrong, not the run (a --peak-tflops too low, a matmul measured while the cores
        # were busy): no figure rather than an impossible one, and the table says why.
        "mfu": mfu if mfu is None or mfu <= 1 else None,
        "ranks": ranks,
        "diagnosis": diagnose(ranks, comm_hook, amp, device_type, native_bf16, num_workers),
    }
