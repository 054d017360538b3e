"""Metrics: per-phase step timers, process memory, and the run's metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil
import torch
from torch.profiler import record_function

from dist_mnist.durable import append_whole, append_whole_to, keep_records, open_for_appending, write_durably
from dist_mnist.runfiles import METRICS_FILE
from dist_mnist.runjson import json_text
from dist_mnist.runtext import PHASES

# --phase-timers after "auto" is resolved: time every step, every Nth step, or no step.
PHASE_TIMER_MODES = ("every", "sample", "off")
# The most per-step entries a series keeps (StepSample): 2^17, above the 100,000 timed steps of a long run, which
# keeps them all; about 40 MB for the step timer's dicts at that count, whatever the run's length.
STEP_SAMPLE_CAP = 1 << 17

T = TypeVar("T")


class StepSample(Generic[T]):
    """A per-step series (summary.json's step figures are made of it) in bounded memory: every entry up to `cap`,
    then every 2^k-th. When full, every other entry kept is dropped and the stride doubles.

    A sample of every k-th step, not a random reservoir: deterministic, and two series of the same steps keep the
    same ones (the step timer's and the comm recorder's, which the summary pairs step by step; the wall intervals
    between step starts are sampled alike, the interval after each kept step). Kept whole, one dict per step, the
    series grew by 0.35-0.6 MB per 1000 steps per rank for the whole run (review_longrun finding 3). `count` is
    exact.
    """

    def __init__(self, cap: int = STEP_SAMPLE_CAP) -> None:
        self.cap = cap
        self.count = 0  # entries appended, kept or not
        self.stride = 1  # entries kept: those whose index is a multiple of this
        self.items: list[T] = []

    def append(self, entry: T) -> None:
        if self.count % self.stride == 0:
            self.items.append(entry)
            if len(self.items) > self.cap:
                del self.items[1::2]
                self.stride *= 2
        self.count += 1

    def extend(self, entries: Iterable[T]) -> None:
        for entry in entries:
            self.append(entry)


class Marks:
    """Points in time to measure between: perf_counter readings on CPU; on CUDA, timing events recorded on the
    current stream (no sync), read later by their owner.

    Events are made once and recorded again after their readings are done with (`recycle`): a timed step then costs
    its records, not also the making of a Python event and a CUDA one per mark and their destruction (on the H200 a
    timed step's marks cost 75 µs of a 0.39 ms step at batch 16, docs/benchmarks.md). `new_event` stands in for
    CUDA's event on CPU in tests.
    """

    def __init__(self, cuda: bool, new_event: Callable[[], Any] | None = None) -> None:
        self._new_event = new_event or (partial(torch.cuda.Event, enable_timing=True) if cuda else None)
        self._spare: list[Any] = []  # events whose readings are done, free to record again

    @property
    def events(self) -> bool:
        """Whether marks are events, which must be waited for before they are read."""
        return self._new_event is not None

    def mark(self) -> Any:
        if self._new_event is None:
            return time.perf_counter()
        event = self._spare.pop() if self._spare else self._new_event()
        event.record()
        return event

    def recycle(self, marks: Iterable[Any]) -> None:
        """Marks no longer needed: a record of an event not yet reached on the GPU just moves it."""
        if self._new_event is not None:
            self._spare.extend(marks)


def seconds_between(start: Any, end: Any) -> float:
    """Seconds from one mark to another (`Marks`); for CUDA events the end event must have completed."""
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1e3


class StepTimer:
    """Timing of each step's phases (all steps, every Nth step, or none), labelled for the profiler while it records.

    On CPU the marks are perf_counter readings. On CUDA they are events on the compute stream, read only when
    `drain` is called: no synchronize per step, and the durations are those of the GPU timeline, so a phase the
    GPU overlapped with other work costs nothing and a starved GPU shows up as data wait. A phase may run several
    times in one step (forward and backward once per micro-batch with gradient accumulation): its times add up.

    The `train/<phase>` labels (record_function) are opened only while `label()` says a profiler records: a
    record_function costs an operator call even when nobody listens, and outside a window nobody does.

    The marks' CUDA events are recorded again once a `drain` has read them (`Marks`).
    """

    def __init__(self, device: torch.device, mode: str = "every", every_n: int = 1,
                 label: Callable[[], bool] = torch.autograd._profiler_enabled,
                 new_event: Callable[[], Any] | None = None) -> None:
        if mode not in PHASE_TIMER_MODES:
            raise ValueError(f"unknown phase timer mode {mode!r}")
        self.mode = mode
        self.every_n = every_n if mode == "sample" else 1
        self._label = label
        self._clock = Marks(device.type == "cuda", new_event)
        self._finished = 0  # steps ended, timed or not
        self._next_sample = 0  # with `sample`: the first step (by `_finished`) that may be timed next
        self._marks: list[tuple[str, Any]] = []
        self._pending: list[list[tuple[str, Any]]] = []
        self.steps: StepSample[dict[str, float]] = StepSample()  # seconds per phase, per timed step

    def begin_step(self, after_sync: bool = False) -> None:
        """`after_sync`: a pause waited for the device just before this step (an evaluation, a progress report, a
        checkpoint). The device then idles until the host has fetched and queued the batch, which its timeline
        shows as data wait; in steady state the host is steps ahead and none of that shows. A sample must be of
        the steady state, so a due sample moves on to the next step, once: on the H200 the steps after evaluations
        were half of the sampled ones, with 19% data wait, and the phases explained 129% of the measured step. Once
        only, because where every step follows a sync (--log-every 1) there is no other kind of step to sample."""
        if self.mode == "every":
            timed = True
        else:
            due = self.mode == "sample" and self._finished >= self._next_sample
            timed = due and (not after_sync or self._finished > self._next_sample)
        self._marks = [("", self._clock.mark())] if timed else []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._label():
            with record_function(f"train/{name}"):
                yield
        else:
            yield
        if self._marks:
            self._marks.append((name, self._clock.mark()))

    @property
    def timing(self) -> bool:
        """Whether the step in progress is timed (the comm recorder keeps only those steps' all-reduces)."""
        return bool(self._marks)

    def cancel_step(self) -> None:
        self._clock.recycle(mark for _, mark in self._marks)
        self._marks = []

    def end_step(self) -> None:
        if self._marks:
            self._pending.append(self._marks)
            self._next_sample = self._finished + self.every_n
        self._marks = []
        self._finished += 1

    def drain(self) -> list[dict[str, float]]:
        """Resolve the timed steps finished since the last call; returns them (also kept in `steps`, a sample
        past its cap)."""
        if not self._pending:
            return []
        if self._clock.events:
            self._pending[-1][-1][1].synchronize()
        new = []
        for marks in self._pending:
            step = dict.fromkeys(PHASES, 0.0)
            for (_, start), (name, end) in zip(marks, marks[1:]):
                step[name] += seconds_between(start, end)
            new.append(step)
            self._clock.recycle(mark for _, mark in marks)
        self._pending = []
        self.steps.extend(new)
        return new

    def describe(self) -> dict[str, Any]:
        """summary.json's `phase_timing`: how the phase figures were obtained."""
        return {"mode": self.mode, "every_n_steps": self.every_n if self.mode != "off" else None,
                "steps_timed": self.steps.count}


def resolve_phase_timers(setting: str, device: torch.device) -> str:
    """--phase-timers auto: every step on CPU, where a mark is a clock reading; every Nth step on CUDA, where a
    timed step records six CUDA events from Python (tens of microseconds of host work on a step of a few ms)."""
    if setting != "auto":
        return setting
    return "sample" if device.type == "cuda" else "every"


def phase_timer_every_note(explicit: frozenset[str], setting: str, mode: str) -> str | None:
    """The run's note when a --phase-timer-every given on the command line meets --phase-timers auto resolved to
    every step (on CPU): the same command samples on CUDA, so it is no error (every and off are refused when
    parsed), but the value does nothing here and the run says so."""
    if "phase_timer_every" in explicit and setting == "auto" and mode != "sample":
        return f"note: --phase-timer-every has no effect here: --phase-timers auto times {mode} step on this device"
    return None


def process_rss_bytes(children: bool = True) -> int:
    """Resident memory of this process and, with `children`, of its child processes (the DataLoader workers)."""
    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True) if children else ():
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def own_peak_rss_bytes() -> int:
    """The kernel's record of this process's peak resident memory (Linux VmHWM; 0 where there is no /proc).

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a torchrun worker would start with its
    launcher's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryTracker:
    """Peak resident memory: sampled with psutil (DataLoader workers included) and the kernel's own peak for this
    process.

    Each worker's RSS includes the shared libraries it maps (torch's alone are hundreds of MB), counted again per
    process: an upper bound. Without workers (`workers=False`, `--num-workers 0`, the default) the children are not
    looked for: psutil finds them by reading every process's /proc entry, which took 1.5 ms of each progress report
    on our quiet CPU machine (69 processes) and grows with the processes a node runs; and the only children then
    would be others' (torch.compile's compile workers).
    """

    def __init__(self, workers: bool = True) -> None:
        self.workers = workers
        self.peak_rss_bytes = 0

    def sample(self) -> int:
        rss = process_rss_bytes(children=self.workers)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss, own_peak_rss_bytes())
        return rss


_EVENT_FILES = itertools.count()


class TensorBoardEvents:
    """A TensorBoard event file written in the calling thread, each call's records whole or not at all.

    Not torch's SummaryWriter: it hands every record to a thread of its own (tensorboard's _AsyncWriterThread),
    so a full disk printed that thread's traceback, reached the training loop only at a later add_scalar, as a
    second traceback, and could leave half a record. Here a failed write is an OSError in the caller's thread at
    the call that made it, which append_whole_to turns into one line. The calls come at progress reports and
    evaluations, pauses already; the records are what SummaryWriter writes (its file name, version event and
    scalar summaries), so TensorBoard reads them as before.
    """

    def __init__(self, run_dir: Path) -> None:
        # Imported lazily: they pull in TensorBoard (main imports it in the background during start-up).
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import scalar

        self._event, self._session_log, self._record_writer, self._scalar = Event, SessionLog, RecordWriter, scalar
        # SummaryWriter's name; the count keeps apart two writers of one process in one second (a resumed run).
        self.path = run_dir / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                               f"{next(_EVENT_FILES)}")
        # Opened at the first record: a process that writes none (a rerun of a complete run) leaves no file.
        self._fd: int | None = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = time.time()
        self._append([self._event(wall_time=now, step=step, summary=self._scalar(tag, value))
                      for tag, value in values.items()])

    def purge_from(self, step: int) -> None:
        """Hide what an earlier process of the run wrote from `step` on: it went past the checkpoint this process
        resumed from, and this one writes those steps again. TensorBoard drops every earlier record at or after
        the step of a SessionLog START (what SummaryWriter's purge_step writes); without it each such step showed
        twice, the old curve doubling back under the new one. Every process writes one, a run's first too: the
        Python loader (`--load_fast=false`) takes a run's first START as its session's start and purges only at
        later ones, so a run begun before this change shows its resumed steps twice there (the default loader
        shows each step once either way)."""
        self._append([self._event(wall_time=time.time(), step=step,
                                  session_log=self._session_log(status=self._session_log.START))])

    def _append(self, events: list[Any]) -> None:
        if self._fd is None:
            self._fd = open_for_appending(self.path)
            events = [self._event(wall_time=time.time(), file_version="brain.Event:2"), *events]
        records = io.BytesIO()
        writer = self._record_writer(records)  # TensorBoard's framing: length, its CRC, the event, its CRC
        for event in events:
            writer.write(event.SerializeToString())
        append_whole_to(self._fd, self.path, records.getvalue())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class RunWriter:
    """metrics.jsonl, config.json and TensorBoard scalars of a run; only global rank 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = TensorBoardEvents(run_dir) if enabled and tensorboard else None

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            write_durably(self.run_dir / name, json_text(obj, indent=2).encode())

    def reset_metrics(self, records: list[dict[str, Any]]) -> None:
        """Start metrics.jsonl over with `records` (those of the checkpoint a run resumes from): cut in place where
        the file begins with them (keep_records)."""
        if self.enabled:
            keep_records(self.run_dir / METRICS_FILE, "".join(json_text(r) for r in records).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_whole(self.run_dir / METRICS_FILE, json_text(record).encode())
            self.scalars("eval", record, record["step"])

    def resume_at(self, step: int) -> None:
        """A resumed run writes steps after `step` again: TensorBoard hides an earlier process's records of them.
        Under --no-tensorboard too, where an earlier process wrote event files (a flag a resume may change): its
        records past `step` stayed, and contradicted progress.jsonl and metrics.jsonl."""
        if self._tb is not None:
            self._tb.purge_from(step + 1)
        elif self.enabled and any(self.run_dir.glob("events.out.tfevents.*")):
            events = TensorBoardEvents(self.run_dir)  # the marker its one record
            try:
                events.purge_from(step + 1)
            finally:
                events.close()

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self._tb is not None:
            self._tb.scalars({f"{prefix}/{key}": value for key, value in values.items()
                              if isinstance(value, (int, float)) and key not in ("step", "epoch")}, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
