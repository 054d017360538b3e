"""Preemption: SIGTERM, SIGINT, SIGHUP and SIGQUIT ask every rank to stop at a step boundary; a second signal later
exits at once."""

from __future__ import annotations

import enum
import multiprocessing.context
import multiprocessing.resource_tracker
import os
import signal
import threading
import time
from functools import partial
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from dist_mnist.distributed import DistContext
from dist_mnist.errors import STOP_SIGNALS
from dist_mnist.shutdown import REPEAT_GRACE_S, SignalHandler


class StopRequest:
    """Signal handlers that record a stop request; used as a context manager that restores the old handlers."""

    def __init__(self, agent_pid: int | None = None) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, SignalHandler] = {}
        # Under torchrun, the agent that started this worker (distributed.torchrun_agent_pid); None in a process of
        # its own, which a shell's exit (`nohup python launch/train.py &`) must leave training.
        self._agent_pid = agent_pid

    def check_agent(self) -> None:
        """A worker whose torchrun agent is gone (a SIGKILL, an OOM kill) stops as on a stop signal: it starts its
        workers in sessions of their own, so they trained on unsupervised, holding the run folder a requeue needs
        (review_longrun finding 2). Looked at by the loop at each step's stop vote, one getppid call: not
        prctl(PR_SET_PDEATHSIG), whose signal comes from the kernel when the parent thread ends (torchrun's may be
        any of its threads) and whose SIGKILL would leave no checkpoint; a SIGTERM from it would be a stop request
        like this one, a step later at most, at the cost of a ctypes call and its race with the parent's death."""
        if self.signal_name is None and self._agent_pid is not None and os.getppid() != self._agent_pid:
            self.signal_name = f"the end of its torchrun agent (process {self._agent_pid})"
            self._first_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            self._first_at = time.monotonic()
        elif time.monotonic() - self._first_at >= REPEAT_GRACE_S:
            # Second signal: the user means it. Die the way the signal says, without saving.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            # An ignored SIGHUP stays ignored: `nohup` ignores it so that a closed terminal leaves the run be. The
            # others are a stop request even where ignored: a shell ignores SIGINT and SIGQUIT in the jobs it runs in
            # the background, and a `kill -INT` sent to one is still meant.
            if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            # After a stop request the loop ends within a step, often before a double Ctrl-C's second press or the
            # copy a scheduler sends: that copy is still the same request, not a signal that ends the run while it
            # writes its summary (exit 130, no summary.json). After the grace, the signal does what it did before.
            signal.signal(sig, partial(self._after_the_loop, handler) if self.requested else handler)

    def _after_the_loop(self, previous: SignalHandler, signum: int, frame: FrameType | None) -> None:
        if time.monotonic() - self._first_at < REPEAT_GRACE_S:
            return
        restored = signal.SIG_DFL if previous is None else previous  # None: set outside Python, most likely SIG_DFL
        signal.signal(signum, restored)
        if callable(restored):
            restored(signum, frame)
        elif restored != signal.SIG_IGN:
            os.kill(os.getpid(), signum)


class _DataWorkerProcess(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        # Fork and exec keep the signal mask, so the child has the stop signals blocked from its first instruction
        # until leave_stop_signals_to_the_rank takes them over: otherwise a job-wide signal in the seconds a
        # spawned worker spends importing torch would kill it. The rank gets any signal it held back right after.
        # The resource tracker first: starting it unblocks these signals in the caller.
        multiprocessing.resource_tracker.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class DataWorkerContext(multiprocessing.context.SpawnContext):
    """multiprocessing's spawn, for DataLoader workers that must not die of their job's stop signals."""

    Process = _DataWorkerProcess


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """DataLoader worker_init_fn: a stop signal (STOP_SIGNALS) is the rank's to act on, unless the rank sent it.

    torchrun (killpg), Slurm and a terminal's Ctrl-C signal every process of the job, DataLoader workers included.
    A worker that died of it would turn the rank's stop at a step boundary, with a checkpoint, into "DataLoader
    worker exited unexpectedly"; the rank shuts its workers down itself once it has stopped. A worker the rank
    terminates (one that is stuck) must still die, and a Python signal handler cannot tell who sent a signal, so
    the signals are blocked and a thread takes them with sigwaitinfo, which says. A worker whose rank is gone exits
    by itself: the DataLoader's watchdog in the worker notices.
    """
    rank_pid = os.getppid()
    # Blocked (already, when started through DataWorkerContext) before the worker starts any other thread, so every
    # later thread inherits the mask and the signals wait for sigwaitinfo instead of killing the process.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_when_signalled_by, args=(rank_pid,), name="stop-signals", daemon=True).start()


def _exit_when_signalled_by(rank_pid: int) -> None:
    while (received := signal.sigwaitinfo(STOP_SIGNALS)).si_pid != rank_pid:
        pass
    os._exit(128 + received.si_signo)  # the shell's convention for "ended by this signal"


class Vote(enum.IntEnum):
    """What a rank brings to the stop vote. The vote keeps the highest, so the most pressing one is every rank's."""

    GO_ON = 0
    STOP = 1  # a stop signal: stop at a step boundary, with a checkpoint
    # Rank 0's background checkpoint write failed (a full disk): every rank ends with its error at the same step,
    # not one or more epochs later at the next checkpoint, trained on top of a checkpoint that does not exist.
    WRITE_FAILED = 2


class StopVote:
    """Agree across ranks whether any rank was asked to stop, or rank 0's checkpoint write failed (Vote), without a
    blocking collective per step.

    Each poll waits for the vote started at the previous poll and starts the next one, so the all-reduce
    overlaps a whole training step; every rank sees the same answer at the same step. The vote runs on the
    CPU-side gloo control group, so on CUDA it never synchronises the GPU.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self._buffer = torch.zeros(1, dtype=torch.int32)
        self._work: dist.Work | None = None

    def poll(self, local: Vote) -> Vote:
        if self.ctx.world_size == 1:
            return local
        decided = Vote.GO_ON
        if self._work is not None:
            self._work.wait()
            decided = Vote(int(self._buffer.item()))
        self._buffer = torch.tensor([int(local)], dtype=torch.int32)
        self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self.ctx.control_group,
                                     async_op=True)
        return decided

    def finish(self) -> None:
        """Wait for the vote in flight, so later collectives on the control group line up on every rank."""
        if self._work is not None:
            self._work.wait()
            self._work = None
