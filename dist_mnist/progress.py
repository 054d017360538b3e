"""Progress: rank 0's periodic training line (position, time left, throughput) and its progress.jsonl record."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dist_mnist.console import OPEN_LINE
from dist_mnist.durable import append_whole, keep_records, read_own_records
from dist_mnist.runjson import json_text, loads

PROGRESS_FILE = "progress.jsonl"


@dataclass(frozen=True)
class ProgressRecord:
    """One progress line; its fields, in this order, are one line of progress.jsonl (a documented schema)."""
    epoch: int  # 1-based: the epoch of the last step done
    step: int
    elapsed_s: float  # since the run's first training step, evaluation and earlier attempts included
    train_loss: float  # mean over the steps since the previous line, this rank's
    lr: float
    samples_per_sec: float  # global, over the training time since the previous line
    # Mean of the timed phases over the interval and the share of it spent waiting for data; None when no step of
    # the interval was timed (--phase-timers sample with a long period, or off).
    step_time_ms: float | None
    data_wait_share: float | None


def format_duration(seconds: float) -> str:
    """H:MM:SS, as people read a clock."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Progress:
    """Log-interval bookkeeping: the training loss and throughput since the last line, percent done and time left.

    Off a terminal (CI, files, SLURM logs) each report is its own line; on a terminal the line is rewritten in place
    and `end_line` closes it before anything else is printed. Only the enabled instance (global rank 0) prints and
    writes progress.jsonl.
    """

    def __init__(self, run_dir: Path, enabled: bool, step_limit: int, global_batch: int,
                 stream: TextIO | None = None) -> None:
        self.path = run_dir / PROGRESS_FILE
        self.enabled = enabled
        self.step_limit = step_limit
        self.global_batch = global_batch
        self._stream = stream  # None: whatever sys.stdout is when printing
        self._loss_sum, self._loss_count = 0.0, 0
        self._last_step, self._last_training_s = 0, 0.0  # at the previous line
        self._start_step, self._start_elapsed_s = 0, 0.0  # where this process took over the run

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def start(self, step: int, elapsed_s: float) -> None:
        """Training (re)starts at `step`: keep the records up to it, so a resumed run never repeats a line."""
        self._last_step, self._last_training_s = step, 0.0
        self._start_step, self._start_elapsed_s = step, elapsed_s
        if not self.enabled:
            return
        kept = []
        # read_own_records: a symlink or hard link at progress.jsonl is refused before its lines are read (and
        # printed below as damaged), not only when the file is cut.
        current = read_own_records(self.path)
        if current is not None:
            for number, line in enumerate(current.decode(errors="replace").splitlines(), start=1):
                try:
                    record = loads(line) if line.strip() else None
                    if record is not None and int(record["step"]) <= step:
                        kept.append(line)
                except (ValueError, TypeError, KeyError):
                    # A line cut short (a crash or a full disk in mid-append) or edited by hand: a record of the past
                    # that no longer reads, not a reason to stop every later resume.
                    print(f"warning: {self.path} line {number} is damaged and was dropped: {line[:80]!r}",
                          file=sys.stderr, flush=True)
        keep_records(self.path, "".join(line + "\n" for line in kept).encode(), current)

    def state_dict(self) -> dict[str, float]:
        """The loss since the previous line (rank 0's, as checkpoints hold it): a resumed run's next line still
        averages over the whole interval, steps before the checkpoint included."""
        return {"loss_sum": self._loss_sum, "loss_count": self._loss_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._loss_sum, self._loss_count = state["loss_sum"], int(state["loss_count"])

    def add_losses(self, total: float, count: int) -> None:
        self._loss_sum += total
        self._loss_count += count

    def report(self, epoch: int, step: int, elapsed_s: float, training_s: float, lr: float,
               steps: list[dict[str, float]]) -> ProgressRecord:
        """The record for the interval since the previous report (`steps`: its timed phases, in seconds)."""
        step_s = sum(sum(s.values()) for s in steps) / len(steps) if steps else None
        record = ProgressRecord(
            epoch=epoch, step=step, elapsed_s=elapsed_s,
            train_loss=self._loss_sum / max(self._loss_count, 1), lr=lr,
            samples_per_sec=(step - self._last_step) * self.global_batch / max(training_s - self._last_training_s,
                                                                                1e-9),
            step_time_ms=None if step_s is None else step_s * 1e3,
            data_wait_share=None if step_s is None else sum(s["data"] for s in steps) / max(step_s * len(steps), 1e-12))
        self._loss_sum, self._loss_count = 0.0, 0
        self._last_step, self._last_training_s = step, training_s
        if self.enabled:
            self._print(self.format(record))
            append_whole(self.path, json_text(dataclasses.asdict(record)).encode())
        return record

    def eta_s(self, step: int, elapsed_s: float) -> float:
        """Time left at the rate this process has kept so far, evaluation and checkpoints included."""
        done = step - self._start_step
        return (self.step_limit - step) * (elapsed_s - self._start_elapsed_s) / done if done > 0 else 0.0

    def format(self, record: ProgressRecord) -> str:
        return (f"epoch {record.epoch} step {record.step}/{self.step_limit} ({record.step / self.step_limit:.1%}) "
                f"loss {record.train_loss:.4f} lr {record.lr:.2e} {record.samples_per_sec:,.0f} samples/s, "
                f"elapsed {format_duration(record.elapsed_s)}, "
                f"ETA {format_duration(self.eta_s(record.step, record.elapsed_s))}")

    def _print(self, line: str) -> None:
        stream = self.stream
        if stream.isatty():
            stream.write(f"\r{line}\x1b[K")  # back to the line start, rewrite, clear what a longer line left
            OPEN_LINE.open(stream)
        else:
            stream.write(line + "\n")
        stream.flush()

    def end_line(self) -> None:
        """Finish a line rewritten in place, so the next message starts on its own line."""
        OPEN_LINE.end()
