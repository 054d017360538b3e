"""Progress bookkeeping: percent, elapsed and ETA in the line, in-place updates on a terminal only, and the
progress.jsonl schema another tool reads."""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import SMOKE_FLAGS, readme_table_row

import dist_mnist.train as train_module
from dist_mnist.console import rank_line, warnings_end_open_line
from dist_mnist.errors import UserError
from dist_mnist.metrics import RunWriter
from dist_mnist.progress import PROGRESS_FILE, Progress, format_duration
from dist_mnist.runfiles import METRICS_FILE

# The documented schema of a progress.jsonl line, in order (README, "Run output").
SCHEMA = {"epoch": int, "step": int, "elapsed_s": float, "train_loss": float, "lr": float, "samples_per_sec": float,
          "step_time_ms": float, "data_wait_share": float}
PHASES = {"data": 0.01, "to_device": 0.0, "forward": 0.02, "backward": 0.06, "optimizer": 0.01}  # 0.1 s a step


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(tmp_path: Path, stream: io.StringIO, step_limit: int = 100) -> Progress:
    p = Progress(tmp_path, enabled=True, step_limit=step_limit, global_batch=32, stream=stream)
    p.start(0, 0.0)
    return p


def report(p: Progress, step: int, elapsed_s: float, training_s: float) -> None:
    p.add_losses(2.0 * 4, 4)
    p.report(epoch=1, step=step, elapsed_s=elapsed_s, training_s=training_s, lr=1e-3, steps=[PHASES] * 4)


def test_line_shows_percent_elapsed_eta_and_throughput(tmp_path: Path) -> None:
    out = io.StringIO()
    p = progress(tmp_path, out)
    report(p, 25, elapsed_s=10.0, training_s=8.0)
    report(p, 50, elapsed_s=24.0, training_s=16.0)
    # 25 steps of 32 samples in 8 s of training; 50 steps in 24 s leave 50 steps: 24 s more.
    assert out.getvalue().splitlines() == [
        "epoch 1 step 25/100 (25.0%) loss 2.0000 lr 1.00e-03 100 samples/s, elapsed 0:00:10, ETA 0:00:30",
        "epoch 1 step 50/100 (50.0%) loss 2.0000 lr 1.00e-03 100 samples/s, elapsed 0:00:24, ETA 0:00:24",
    ]


def test_eta_uses_the_rate_since_this_process_resumed(tmp_path: Path) -> None:
    p = progress(tmp_path, io.StringIO())
    p.start(40, 1000.0)  # 1000 s spent by earlier attempts on 40 steps
    assert p.eta_s(50, 1010.0) == pytest.approx(50.0)  # 10 steps in 10 s, 50 to go


def test_terminal_line_is_rewritten_in_place_and_closed_before_other_output(tmp_path: Path) -> None:
    out = Terminal()
    p = progress(tmp_path, out)
    report(p, 10, 1.0, 1.0)
    report(p, 20, 2.0, 2.0)
    assert "\n" not in out.getvalue() and out.getvalue().count("\r") == 2
    p.end_line()
    p.end_line()  # a second call adds nothing
    assert out.getvalue().endswith("ETA 0:00:08\x1b[K\n") and out.getvalue().count("\n") == 1


def test_a_note_on_standard_error_ends_the_open_terminal_line_first(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A trace that cannot be written mid-training says so on stderr (rank_line); on a terminal it ran on after the
    progress line's last character."""
    out = Terminal()
    p = progress(tmp_path, out)
    report(p, 10, 1.0, 1.0)
    rank_line(0, "note", "could not write the trace")
    assert out.getvalue().endswith("\x1b[K\n") and capsys.readouterr().err == "note: could not write the trace\n"
    p.end_line()  # already ended: nothing more
    report(p, 20, 2.0, 2.0)
    rank_line(1, "note", "a line under another prefix")  # any line this process writes on stderr ends it
    assert out.getvalue().count("\n") == 2
    rank_line(0, "error", "nothing open now")
    assert out.getvalue().count("\n") == 2


def test_a_warning_in_training_ends_the_open_terminal_line_first(tmp_path: Path) -> None:
    """train.main shows Python warnings (torch's C++ warnings raised in a Python call among them) through
    warnings_end_open_line."""
    out = Terminal()
    p = progress(tmp_path, out)
    before = warnings.showwarning
    # catch_warnings(record=True) puts the default showwarning back on entry: it goes outside, as pytest's does.
    with warnings.catch_warnings(record=True) as caught, warnings_end_open_line():
        warnings.simplefilter("always")
        report(p, 10, 1.0, 1.0)
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a library's warning"]
    assert out.getvalue().endswith("\x1b[K\n")
    assert warnings.showwarning is before
    # Outside the block a warning leaves the line as it is (the launcher installs it around a whole run only).
    report(p, 20, 2.0, 2.0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        warnings.warn("after the block", UserWarning, stacklevel=1)
    assert not out.getvalue().endswith("\n")
    p.end_line()


def test_progress_jsonl_has_the_documented_schema(tmp_path: Path) -> None:
    p = progress(tmp_path, io.StringIO())
    report(p, 25, 10.0, 8.0)
    (line,) = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    record = json.loads(line)
    assert list(record) == list(SCHEMA)
    assert all(type(record[key]) is kind for key, kind in SCHEMA.items()), record
    assert (record["step_time_ms"], record["data_wait_share"]) == (pytest.approx(100.0), pytest.approx(0.1))


def test_the_readme_names_exactly_the_keys_of_a_progress_record_in_order() -> None:
    """README, "Run output": the progress.jsonl row lists "exactly these keys", in the order a record has them."""
    row = readme_table_row(PROGRESS_FILE)
    named = [word for word in re.findall(r"`(\w+)`", row) if word != "null"]  # null: a value, not a key
    assert named == list(SCHEMA)


def test_restart_keeps_records_up_to_the_resumed_step(tmp_path: Path) -> None:
    p = progress(tmp_path, io.StringIO())
    for step in (10, 20, 30):
        report(p, step, step, step)
    p.start(20, 20.0)  # resumed from a checkpoint at step 20: the line for 30 is gone, the next one follows
    report(p, 30, 31.0, 11.0)
    assert [json.loads(line)["step"] for line in (tmp_path / PROGRESS_FILE).open()] == [10, 20, 30]


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    p = Progress(tmp_path, enabled=False, step_limit=10, global_batch=32, stream=out)
    p.start(0, 0.0)
    report(p, 5, 1.0, 1.0)
    assert out.getvalue() == "" and not (tmp_path / PROGRESS_FILE).exists()


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
                                               (-3, "0:00:00")])
def test_durations_read_like_a_clock(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.timeout(120)
def test_an_error_during_training_starts_on_a_line_of_its_own_on_a_terminal(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails while its progress line is open on a terminal (stdout and stderr on the same one) closes
    that line first: the error is one line of its own, not the tail of the progress line."""
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    monkeypatch.setattr("sys.stderr", terminal)

    def full_disk(self: train_module.Trainer) -> None:
        raise UserError("could not write metrics.jsonl: [Errno 28] No space left on device")

    monkeypatch.setattr(train_module.Trainer, "evaluate_and_record", full_disk)
    flags = [*SMOKE_FLAGS, "--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--output-dir", str(tmp_path)]
    assert train_module.main(flags) == 1
    lines = terminal.getvalue().split("\n")
    assert lines[-2:] == ["error: could not write metrics.jsonl: [Errno 28] No space left on device", ""]
    assert "\r" in lines[-3] and "step 2/6" in lines[-3]  # the progress line, rewritten in place, then closed


def test_a_damaged_line_is_dropped_with_a_warning_not_a_traceback_at_every_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crash or a full disk in mid-append leaves a line cut short; the resume keeps every record that reads."""
    p = progress(tmp_path, io.StringIO())
    report(p, 10, 1.0, 1.0)
    report(p, 20, 2.0, 2.0)
    path = tmp_path / PROGRESS_FILE
    with path.open("a") as f:
        f.write('{"epoch": 1, "step": 3')  # cut short
    resumed = Progress(tmp_path, enabled=True, step_limit=100, global_batch=32, stream=io.StringIO())
    resumed.start(20, 2.0)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert capsys.readouterr().err == (f"warning: {path} line 3 is damaged and was dropped: "
                                       "'{\"epoch\": 1, \"step\": 3'\n")


def test_a_progress_record_shows_the_learning_rate_its_step_trained_at(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Step S's line, record and TensorBoard scalar (one value) carry step S's rate, not step S+1's: the first
    step trains at half the peak under a 2-step warm-up, and the last one above 0 (review_longrun finding 6)."""
    flags = [*SMOKE_FLAGS, "--synthetic-train-size", "64", "--epochs", "1", "--warmup-frac", "0.5", "--log-every",
             "1", "--eval-every", "0", "--lr", "2e-3", "--output-dir", str(tmp_path), "--run-name", "lr"]
    assert train_module.main(flags) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "lr" / PROGRESS_FILE).read_text().splitlines()]
    factor = train_module.warmup_cosine(4, 0.5)
    assert [r["lr"] for r in records] == pytest.approx([2e-3 * factor(step) for step in range(4)])
    assert records[0]["lr"] == pytest.approx(1e-3) and records[-1]["lr"] > 0
    assert f"lr {records[-1]['lr']:.2e} " in capsys.readouterr().out


def _strict_json(text: str) -> Any:
    """`text` read as strict JSON: the bare NaN and Infinity tokens Python writes by default are refused."""
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is no JSON")
    return json.loads(text, parse_constant=refuse)


def test_every_json_file_a_run_writes_is_strict_json_with_null_for_a_non_finite_figure(tmp_path: Path) -> None:
    """A NaN test loss reached metrics.jsonl as the bare token NaN, which JSON.parse, Go, serde_json and DuckDB
    refuse (review_outputs F1). The run stops at a non-finite loss first (test_faults); this is the backstop."""
    writer = RunWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write_json("summary.json", {"mfu": math.inf, "ranks": [{"share": math.nan, "p50": (0.5, -math.inf)}]})
    writer.reset_metrics([{"step": 1, "test_loss": math.nan}])
    writer.append_metrics({"step": 2, "test_loss": -math.inf})
    p = progress(tmp_path, io.StringIO())
    p.add_losses(math.nan, 1)
    p.report(epoch=1, step=3, elapsed_s=1.0, training_s=1.0, lr=1e-3, steps=[])
    assert _strict_json((tmp_path / "summary.json").read_text()) == {"mfu": None,
                                                                     "ranks": [{"share": None, "p50": [0.5, None]}]}
    assert [_strict_json(line)["test_loss"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [
        None, None]
    [record] = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert _strict_json(record)["train_loss"] is None


def test_a_restart_cuts_the_record_files_in_place_so_a_follower_reads_on(tmp_path: Path) -> None:
    """progress.jsonl and metrics.jsonl were replaced by a rename at every process start: `tail -f` (a held
    descriptor) went silent on the old, unlinked file, and `tail -F` replayed every kept record (review_outputs
    F3). Now the file keeps its inode, cut where records must go and untouched where none must."""
    p = progress(tmp_path, io.StringIO())
    for step in (5, 10, 15):
        report(p, step, elapsed_s=step / 10, training_s=step / 10)
    path = tmp_path / PROGRESS_FILE
    before = path.stat()
    with path.open("rb") as follower:
        Progress(tmp_path, enabled=True, step_limit=100, global_batch=32, stream=io.StringIO()).start(15, 1.5)
        assert path.stat().st_mtime_ns == before.st_mtime_ns  # every record kept: the file is left alone
        resumed = Progress(tmp_path, enabled=True, step_limit=100, global_batch=32, stream=io.StringIO())
        resumed.start(10, 1.0)
        report(resumed, 15, elapsed_s=9.0, training_s=9.0)  # step 15 again, as the resumed process trained it
        assert path.stat().st_ino == before.st_ino
        assert follower.read() == path.read_bytes()  # the follower's descriptor reads the live file
    assert [(r["step"], r["elapsed_s"]) for r in map(json.loads, path.read_text().splitlines())] == [
        (5, 0.5), (10, 1.0), (15, 9.0)]

    writer = RunWriter(tmp_path, enabled=True, tensorboard=False)
    records = [{"step": step, "test_loss": 1.0 / step} for step in (5, 10, 15)]
    for record in records:
        writer.append_metrics(record)
    metrics = tmp_path / METRICS_FILE
    before = metrics.stat()
    with metrics.open("rb") as follower:
        writer.reset_metrics(records)
        assert metrics.stat().st_mtime_ns == before.st_mtime_ns
        writer.reset_metrics(records[:2])
        writer.append_metrics({"step": 15, "test_loss": 0.5})
        assert metrics.stat().st_ino == before.st_ino and follower.read() == metrics.read_bytes()
    assert [json.loads(line)["test_loss"] for line in metrics.read_text().splitlines()] == [0.2, 0.1, 0.5]
