"""Re-read finished runs: `python -m dist_mnist.report RUN_DIR` prints a run's summary table and writes a picture
of it into the run folder; `python -m dist_mnist.report RUN_A RUN_B` prints two runs side by side."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_mnist import runjson
from dist_mnist.compare import compare_summaries, config_changes, format_comparison, resumed_steps, run_label
from dist_mnist.console import kept_stdout, rank_line
from dist_mnist.errors import UserError
from dist_mnist.metrics import format_eval
from dist_mnist.plots import write_run_picture
from dist_mnist.profiling import format_summary
from dist_mnist.progress import PROGRESS_FILE
from dist_mnist.runfiles import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

PICTURE_FILE = "report.png"
# The fields the picture reads from each record.
METRICS_FIELDS = ("step", "train_loss", "test_loss", "test_accuracy")
PROGRESS_FIELDS = ("step", "train_loss", "step_time_ms")


def _read_json(path: Path, text: str) -> Any:
    try:
        return runjson.loads(text)
    except ValueError as exc:  # json's JSONDecodeError, or runjson.NestedTooDeep
        raise UserError(f"{path} is corrupt: {exc}") from None


def _format_or_fail(path: Path, formatter: Callable[[Any], str], record: Any) -> str:
    """`formatter(record)`, or a UserError naming the file when the record lacks the fields a run writes."""
    try:
        return formatter(record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a dist_mnist run file (missing or bad field {exc})") from None


def _read_text(path: Path) -> str | None:
    """The file's text; None when it does not exist."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


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


def read_records(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none when it does not exist), each checked to have `fields`.

    Errors name the file's line: json's own position is within the one line it was given, always "line 1"."""
    text = _read_text(path) or ""
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = runjson.loads(line)
        except runjson.NestedTooDeep as exc:
            raise UserError(f"{path} line {number} is corrupt: {exc}") from None
        except json.JSONDecodeError as exc:
            # A last line without its newline is what a process killed in mid-append leaves.
            cut = " (cut short: the run stopped while writing it)" if number == len(lines) and not text.endswith(
                "\n") else ""
            raise UserError(f"{path} line {number} is corrupt: {exc.msg}: column {exc.colno}{cut}") from None
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise UserError(f"{path} is not a dist_mnist run file (line {number} lacks {', '.join(missing)})")
        # What the picture draws: a step as a whole number, the rest numbers or null ("step": [1] was a traceback).
        wrong = [f for f in fields if not (isinstance(record[f], int) if f == "step" else
                                           record[f] is None or isinstance(record[f], (int, float)))
                 or isinstance(record[f], bool)]
        if wrong:
            raise UserError(f"{path} is not a dist_mnist run file (line {number}: {', '.join(wrong)} not a number)")
        records.append(record)
    return records


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


def stale_summary(run_dir: Path, summary: dict[str, Any]) -> StaleSummary | None:
    """Whether `summary` is an earlier process's; None when it is of the run's last step, or was written before
    summaries recorded their steps."""
    last_step = summary.get("last_step")
    if not isinstance(last_step, int):
        return None
    run_step = max([last_step, *_recorded_steps(run_dir / PROGRESS_FILE), *_recorded_steps(run_dir / METRICS_FILE)])
    return StaleSummary(summary.get("first_step") or 0, last_step, run_step) if run_step > last_step else None


def _recorded_steps(path: Path) -> list[int]:
    """The steps of a JSON-lines file's records; lines that do not parse (a killed process's cut last line) are
    skipped, not errors: the table is still worth showing, and the picture's reader names a damaged line."""
    steps = []
    for line in (_read_text(path) or "").splitlines():
        try:
            record = runjson.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            steps.append(record["step"])
    return steps


def report(run_dir: Path) -> str:
    """The last evaluation line (when metrics.jsonl has one) and the summary table, as the run printed them; a
    summary of an earlier process than the one that ran the last steps says so."""
    summary = read_summary(run_dir)
    metrics_path = run_dir / METRICS_FILE
    records = read_records(metrics_path, ())
    lines = [_format_or_fail(metrics_path, format_eval, records[-1])] if records else []
    lines.append(format_summary(summary))
    if stale := stale_summary(run_dir, summary):
        lines.append(f"{SUMMARY_FILE} is of {stale.steps}, an earlier process's: the run went on to step "
                     f"{stale.run_step}, and the process that ran those steps wrote none (it is still running, or was "
                     "stopped or crashed first)")
    return "\n".join(lines)


def _label(run_dir: Path, summary: dict[str, Any]) -> str:
    """A run's name in the comparison's header, with the steps its summary is of where that is not the whole run."""
    if stale := stale_summary(run_dir, summary):
        return f"{run_dir} (its summary is of {stale.steps} only: the run went on to step {stale.run_step})"
    return run_label(str(run_dir), summary)


def picture_title(run_dir: Path, summary: dict[str, Any]) -> str:
    """The picture's title: the run, its ranks and samples/s, and the steps the summary's figures (the bars and
    samples/s) are of where those are not the whole run's, as the curves (progress.jsonl, metrics.jsonl) are."""
    ranks = len(summary["ranks"])
    rate = "" if summary["samples_per_sec"] is None else f", {summary['samples_per_sec']:,.0f} samples/s"
    if stale := stale_summary(run_dir, summary):
        since = (f" (phases and samples/s: {stale.steps} only, an earlier process's; the run went on to step "
                 f"{stale.run_step})")
    else:
        since = f" (phases and samples/s: {steps}, after a resume)" if (steps := resumed_steps(summary)) else ""
    return f"{run_dir.name}: {ranks} rank{'s' if ranks != 1 else ''}{rate}{since}"


def picture(run_dir: Path, finished: bool = True) -> Path:
    """Write the run's picture (`report.png` in the run folder, replaced on every call); returns its path. Not
    `finished` (no summary.json): the curves of its records only."""
    summary = read_summary(run_dir) if finished else None
    progress = read_records(run_dir / PROGRESS_FILE, PROGRESS_FIELDS)
    metrics = read_records(run_dir / METRICS_FILE, METRICS_FIELDS)
    path = run_dir / PICTURE_FILE
    title = (picture_title(run_dir, summary) if summary is not None
             else f"{run_dir.name}: did not finish (no {SUMMARY_FILE}), its records up to the last")
    try:
        write_run_picture(path, title, summary, progress, metrics)
    except ImportError as exc:
        raise UserError(f"cannot draw the picture: {exc} (pip install -e . installs matplotlib); pass --no-picture "
                        "to skip it") from None
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; pass --no-picture to skip it") from None
    return path


def unfinished(run_dir: Path) -> bool:
    """Whether `run_dir` is a run that wrote records but no summary.json: it failed, was killed, or is still going."""
    return (run_dir.is_dir() and not (run_dir / SUMMARY_FILE).exists()
            and any(_recorded_steps(run_dir / name) for name in (PROGRESS_FILE, METRICS_FILE)))


def unfinished_report(run_dir: Path) -> str:
    """What an unfinished run's records hold: the last evaluation line and the last progress record."""
    metrics_path, progress_path = run_dir / METRICS_FILE, run_dir / PROGRESS_FILE
    metrics = read_records(metrics_path, METRICS_FIELDS)
    progress = read_records(progress_path, PROGRESS_FIELDS)
    lines = [_format_or_fail(metrics_path, format_eval, metrics[-1])] if metrics else []
    if progress:
        last = progress[-1]
        loss = "n/a" if last["train_loss"] is None else f"{last['train_loss']:.4f}"
        lines.append(f"{PROGRESS_FILE}: {len(progress)} records, the last of step {last['step']}, train loss {loss}")
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
    summary_a, summary_b = read_summary(run_a), read_summary(run_b)
    rows = compare_summaries(summary_a, summary_b)
    # The settings the summary's own process ran under; config.json where the summary predates that record.
    config_a, config_b = (summary["config"] if isinstance(summary.get("config"), dict) else _read_config(run)
                          for summary, run in ((summary_a, run_a), (summary_b, run_b)))
    changes = config_changes(config_a, config_b) if config_a is not None and config_b is not None else None
    return format_comparison(_label(run_a, summary_a), _label(run_b, summary_b), rows, changes)


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
            print(compare(args.run_dir, args.run_b))
            return 0
        if unfinished(args.run_dir):
            # A failed run's records are what there is to see, its loss curve above all; still exit 1 with the
            # line for a run without summary.json, as for one that wrote no records.
            print(unfinished_report(args.run_dir), flush=True)
            if not args.no_picture:
                print(f"picture: {picture(args.run_dir, finished=False)}")
            raise UserError(_not_a_run_folder(args.run_dir))
        print(report(args.run_dir), flush=True)
        if not args.no_picture:
            print(f"picture: {picture(args.run_dir)}")
    except UserError as exc:
        rank_line(0, "error", str(exc))
        return 1
    return 0


if __name__ == "__main__":
    with kept_stdout(note=None):  # `... | head` ends the output, not the tool's work
        code = main()
    sys.exit(code)
