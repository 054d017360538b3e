"""Re-read finished runs: `python -m dist_mnist.report RUN_DIR` prints a run's summary table and writes a picture
of it into the run folder; `python -m dist_mnist.report RUN_A RUN_B` prints two runs side by side."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from dist_mnist import runjson
from dist_mnist.compare import compare_summaries, config_changes, format_comparison, run_label
from dist_mnist.console import kept_stdout, rank_line, shown
from dist_mnist.errors import UserError
from dist_mnist.plots import write_run_picture
from dist_mnist.progress import PROGRESS_FILE
from dist_mnist.runfiles import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RefusedRunFile, read_run_text
from dist_mnist.runtext import format_eval, format_summary, resumed_steps

PICTURE_FILE = "report.png"
# The fields the picture reads from each record.
METRICS_FIELDS = ("step", "train_loss", "test_loss", "test_accuracy")
PROGRESS_FIELDS = ("step", "train_loss", "step_time_ms")


def _read_json(path: Path, text: str) -> Any:
    try:
        return runjson.loads(text)
    except ValueError as exc:  # json's JSONDecodeError, runjson.NestedTooDeep or runjson.NumberTooLong
        raise UserError(f"{path} is corrupt: {exc}") from None


def _format_or_fail(path: Path, formatter: Callable[[Any], str], record: Any) -> str:
    """`formatter(record)`, or a UserError naming the file when the record lacks the fields a run writes."""
    try:
        return formatter(record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a dist_mnist run file (missing or bad field {exc})") from None


def _read_text(path: Path) -> str | None:
    """The file's text; None when it does not exist. Through read_run_text: a FIFO, a device or a file past any
    run's size is one line (a FIFO summary.json hung the report, a metrics.jsonl linked to /dev/zero ran it out of
    memory)."""
    try:
        return read_run_text(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except RefusedRunFile as exc:
        raise UserError(str(exc)) from None


def _not_a_run_folder(path: Path) -> str:
    """Why `path` is no run folder, and which folder to pass instead: the usual slips are a file of the run and
    --output-dir, the folder that holds the runs (whose missing summary.json would otherwise read as a crashed run)."""
    run = next((folder for folder in path.parents if (folder / SUMMARY_FILE).is_file()
                or (folder / CONFIG_FILE).is_file()), None)
    if path.is_file():  # summary.json, or a trace three folders down: traces/step<N>/rank0.pt.trace.json.gz
        return f"{path} is a file, not a run folder; pass the run folder that holds it, {run or path.parent}"
    if run is not None:  # traces/, a window's traces/step<N>/, checkpoints/
        return f"{path} is a folder inside the run folder {run}; pass that"
    try:
        # Finished runs or not: a folder of runs that are all still going or crashed is still --output-dir.
        runs = sorted(child.name for child in path.iterdir()
                      if any((child / name).is_file() for name in (SUMMARY_FILE, CONFIG_FILE, METRICS_FILE)))
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if runs and not (path / CONFIG_FILE).is_file():
        shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        return (f"{path} is not a run folder but holds run folders ({shown}), as --output-dir does; pass one of "
                f"them, e.g. {path / runs[-1]}")
    return (f"{path} has no summary.json: rank 0 writes it when a run ends, so this run is still going, crashed, "
            "stopped before its first step, or was stopped while it finished (its error line said so)")


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of a finished run, checked to be one (the terminal table can be made from it)."""
    if not run_dir.exists():
        raise UserError(f"no run folder {run_dir}; pass a folder inside --output-dir, e.g. profiles/<run-name>")
    if not run_dir.is_dir():
        raise UserError(_not_a_run_folder(run_dir))
    path = run_dir / SUMMARY_FILE
    text = _read_text(path)
    if text is None:
        raise UserError(_not_a_run_folder(run_dir))
    summary = _read_json(path, text)
    _format_or_fail(path, format_summary, summary)
    return summary


@dataclass(frozen=True)
class Records:
    """A JSON-lines run file, parsed once for both kinds of reader: the stale-summary check takes the steps of the
    lines that parse, the report and the picture take every record and stop at the first damaged line."""
    path: Path
    # Each non-blank line's number and record; a line that does not parse holds the UserError that names it.
    lines: list[tuple[int, Any]]

    @property
    def steps(self) -> list[int]:
        """The records' steps; a damaged line (a killed process's cut last line) is skipped, not an error: the
        table is still worth showing, and checked() names the line for the picture."""
        return [record["step"] for _, record in self.lines
                if isinstance(record, dict) and isinstance(record.get("step"), int)]

    def checked(self, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Every record, each checked to have `fields`; the first damaged line or record raises a UserError."""
        records = []
        for number, record in self.lines:
            if isinstance(record, UserError):
                raise record
            missing = [f for f in fields if not isinstance(record, dict) or f not in record]
            if missing:
                raise UserError(f"{self.path} is not a dist_mnist run file (line {number} lacks {', '.join(missing)})")
            # What the picture draws: a step as a whole number, the rest numbers or null ("step": [1] was a traceback).
            wrong = [f for f in fields if not (isinstance(record[f], int) if f == "step" else
                                               record[f] is None or isinstance(record[f], (int, float)))
                     or isinstance(record[f], bool)]
            if wrong:
                raise UserError(f"{self.path} is not a dist_mnist run file (line {number}: {', '.join(wrong)} not a "
                                "number)")
            records.append(record)
        return records


def read_records(path: Path) -> Records:
    """The records of a JSON-lines file (none when it does not exist).

    Errors name the file's line: json's own position is within the one line it was given, always "line 1"."""
    text = _read_text(path) or ""
    lines = text.splitlines()
    parsed = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = runjson.loads(line)
        except json.JSONDecodeError as exc:
            # A last line without its newline is what a process killed in mid-append leaves.
            cut = " (cut short: the run stopped while writing it)" if number == len(lines) and not text.endswith(
                "\n") else ""
            record = UserError(f"{path} line {number} is corrupt: {exc.msg}: column {exc.colno}{cut}")
        except ValueError as exc:  # every other damage runjson.loads raises (NestedTooDeep, NumberTooLong)
            record = UserError(f"{path} line {number} is corrupt: {exc}")
        parsed.append((number, record))
    return Records(path, parsed)


@dataclass(frozen=True)
class StaleSummary:
    """A summary.json of an earlier process: the run went on past its steps (a resumed process recorded them in
    progress.jsonl and metrics.jsonl) and the process that ran them ended without writing its own."""
    first_step: int  # the summary's steps are first_step+1 .. last_step
    last_step: int
    run_step: int  # the last step the run's records hold

    @property
    def steps(self) -> str:
        return f"steps {self.first_step + 1}-{self.last_step}"


@dataclass(frozen=True)
class Run:
    """A run folder whose files are each read and parsed once, when first needed (so in the order the checks ask
    for them: of several damaged files, the first the checks meet is the one named)."""
    path: Path

    @cached_property
    def summary(self) -> dict[str, Any]:
        return read_summary(self.path)

    @cached_property
    def metrics(self) -> Records:
        return read_records(self.path / METRICS_FILE)

    @cached_property
    def progress(self) -> Records:
        return read_records(self.path / PROGRESS_FILE)

    @cached_property
    def stale(self) -> StaleSummary | None:
        """Whether the summary is an earlier process's; None when it is of the run's last step, or was written
        before summaries recorded their steps."""
        last_step = self.summary.get("last_step")
        if not isinstance(last_step, int):
            return None
        run_step = max([last_step, *self.progress.steps, *self.metrics.steps])
        return StaleSummary(self.summary.get("first_step") or 0, last_step, run_step) if run_step > last_step else None


def report(run: Run) -> str:
    """The last evaluation line (when metrics.jsonl has one) and the summary table, as the run printed them; a
    summary of an earlier process than the one that ran the last steps says so."""
    summary = run.summary
    records = run.metrics.checked()
    lines = [_format_or_fail(run.metrics.path, format_eval, records[-1])] if records else []
    lines.append(format_summary(summary))
    if stale := run.stale:
        lines.append(f"{SUMMARY_FILE} is of {stale.steps}, an earlier process's: the run went on to step "
                     f"{stale.run_step}, and the process that ran those steps wrote none (it is still running, or was "
                     "stopped or crashed first)")
    return "\n".join(lines)


def _label(run: Run) -> str:
    """A run's name in the comparison's header, with the steps its summary is of where that is not the whole run."""
    if stale := run.stale:
        return f"{run.path} (its summary is of {stale.steps} only: the run went on to step {stale.run_step})"
    return run_label(str(run.path), run.summary)


def picture_title(run: Run) -> str:
    """The picture's title: the run, its ranks and samples/s, and the steps the summary's figures (the bars and
    samples/s) are of where those are not the whole run's, as the curves (progress.jsonl, metrics.jsonl) are."""
    summary = run.summary
    ranks = len(summary["ranks"])
    rate = "" if summary["samples_per_sec"] is None else f", {summary['samples_per_sec']:,.0f} samples/s"
    if stale := run.stale:
        since = (f" (phases and samples/s: {stale.steps} only, an earlier process's; the run went on to step "
                 f"{stale.run_step})")
    else:
        since = f" (phases and samples/s: {steps}, after a resume)" if (steps := resumed_steps(summary)) else ""
    return f"{run.path.name}: {ranks} rank{'s' if ranks != 1 else ''}{rate}{since}"


def picture(run: Run, finished: bool = True) -> Path:
    """Write the run's picture (`report.png` in the run folder, replaced on every call); returns its path. Not
    `finished` (no summary.json): the curves of its records only."""
    summary = run.summary if finished else None
    progress = run.progress.checked(PROGRESS_FIELDS)
    metrics = run.metrics.checked(METRICS_FIELDS)
    path = run.path / PICTURE_FILE
    title = (picture_title(run) if summary is not None
             else f"{run.path.name}: did not finish (no {SUMMARY_FILE}), its records up to the last")
    try:
        write_run_picture(path, title, summary, progress, metrics)
    except ImportError as exc:
        raise UserError(f"cannot draw the picture: {exc} (pip install -e . installs matplotlib); pass --no-picture "
                        "to skip it") from None
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; pass --no-picture to skip it") from None
    return path


def unfinished(run: Run) -> bool:
    """Whether `run` is a run that wrote records but no summary.json: it failed, was killed, or is still going."""
    return (run.path.is_dir() and not (run.path / SUMMARY_FILE).exists()
            and bool(run.progress.steps or run.metrics.steps))


def unfinished_report(run: Run) -> str:
    """What an unfinished run's records hold: the last evaluation line and the last progress record."""
    metrics = run.metrics.checked(METRICS_FIELDS)
    progress = run.progress.checked(PROGRESS_FIELDS)
    lines = [_format_or_fail(run.metrics.path, format_eval, metrics[-1])] if metrics else []
    if progress:
        last = progress[-1]
        loss = "n/a" if last["train_loss"] is None else f"{last['train_loss']:.4f}"
        count = f"{len(progress)} record{'' if len(progress) == 1 else 's'}"
        lines.append(f"{PROGRESS_FILE}: {count}, the last of step {last['step']}, train loss {loss}")
    return "\n".join(lines)


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CONFIG_FILE
    text = _read_text(path)
    if text is None:
        return None
    config = _read_json(path, text)
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a dist_mnist run file (not a JSON object)")
    return config


def compare(run_a: Path, run_b: Path) -> str:
    """Two runs side by side: which settings differ, and every figure of their summaries with its B/A ratio."""
    a, b = Run(run_a), Run(run_b)
    rows = compare_summaries(a.summary, b.summary)
    # The settings the summary's own process ran under; config.json where the summary predates that record.
    config_a, config_b = (run.summary["config"] if isinstance(run.summary.get("config"), dict)
                          else _read_config(run.path) for run in (a, b))
    changes = config_changes(config_a, config_b) if config_a is not None and config_b is not None else None
    return format_comparison(_label(a), _label(b), rows, changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dist_mnist.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. profiles/<run-name>")
    parser.add_argument("run_b", type=Path, nargs="?",
                        help="a second run folder: print the two side by side, with B/A ratios")
    parser.add_argument("--no-picture", action="store_true",
                        help=f"one run: do not write the picture RUN_DIR/{PICTURE_FILE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.run_b is not None:
            print(shown(compare(args.run_dir, args.run_b)))
            return 0
        run = Run(args.run_dir)
        if unfinished(run):
            # A failed run's records are what there is to see, its loss curve above all; still exit 1 with the
            # line for a run without summary.json, as for one that wrote no records.
            print(shown(unfinished_report(run)), flush=True)
            if not args.no_picture:
                print(shown(f"picture: {picture(run, finished=False)}"))
            raise UserError(_not_a_run_folder(args.run_dir))
        print(shown(report(run)), flush=True)
        if not args.no_picture:
            print(shown(f"picture: {picture(run)}"))
    except UserError as exc:
        rank_line(0, "error", str(exc))
        return 1
    return 0


if __name__ == "__main__":
    with kept_stdout(note=None):  # `... | head` ends the output, not the tool's work
        code = main()
    sys.exit(code)
