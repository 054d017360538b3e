"""`python -m dist_mnist.report`: two runs side by side and the picture of one run, from run folders tests write."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SMOKE_FLAGS, run, train_in_process

from dist_mnist import report
from dist_mnist.compare import compare_summaries, format_ratio
from dist_mnist.plots import BACKWARD_COMPUTE, EXPOSED_ALLREDUCE, bar_segments
from dist_mnist.runtext import PHASES, format_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rank(rank: int, p50_s: float, samples_per_sec: float, shares: dict[str, float],
          **extra: Any) -> dict[str, Any]:
    """A per-rank summary entry with every field a run writes; the timed mean step is 0.9 × 20 ms = 18 ms."""
    return {"rank": rank, "steps": 100, "step_time_p50_s": p50_s, "step_time_p90_s": 2 * p50_s,
            "samples_per_sec": samples_per_sec, **{f"{p}_share": shares[p] for p in PHASES},
            "own_time_p50_s": p50_s / 4, "measured_step_time_s": 0.020, "explained_fraction": 0.9,
            "peak_rss_bytes": 1000 * 2**20, "cuda_peak_allocated_bytes": None, "params_digest": "abc",
            "straggler": False, **extra}


def _summary(ranks: list[dict[str, Any]], samples_per_sec: float, mfu: float) -> dict[str, Any]:
    return {"world_size": len(ranks), "ranks_in_sync": True, "samples_per_sec": samples_per_sec,
            "epoch_time_s": 60_000 / samples_per_sec, "flops_per_sample": 7.2e7, "achieved_tflops": 0.1,
            "peak_tflops_per_process": 1.0, "peak_source": "given", "mfu": mfu, "ranks": ranks, "startup_s": 4.0,
            "first_step_unix": 1.8e9}


SHARES_A = {"data": 0.1, "to_device": 0.0, "forward": 0.3, "backward": 0.5, "optimizer": 0.1}
SHARES_B = {"data": 0.05, "to_device": 0.05, "forward": 0.3, "backward": 0.4, "optimizer": 0.2}
# A: one rank; B: two ranks, with comm fields A's summary lacks and one both have with other values.
SUMMARY_A = _summary([_rank(0, 0.010, 1600.0, SHARES_A, comm_bytes_per_step=4_800_000)], 1600.0, 0.2)
SUMMARY_B = _summary([_rank(0, 0.015, 2400.0, SHARES_B, comm_bytes_per_step=2_400_000, comm_time_s=0.004,
                            exposed_comm_share=0.1),
                      _rank(1, 0.016, 2300.0, SHARES_B)], 4000.0, 0.1)
CONFIG_A = {"batch_size": 16, "amp": "auto", "resolved": {"world_size": 1, "backend": "gloo"}}
CONFIG_B = {"batch_size": 16, "amp": "auto", "ddp_comm_hook": "bf16", "resolved": {"world_size": 2,
                                                                                    "backend": "gloo"}}


def _write_run(run_dir: Path, summary: dict[str, Any], config: Any = None,
               metrics: list[dict[str, Any]] | None = None, progress: list[dict[str, Any]] | None = None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for name, content in (("config.json", config), ("metrics.jsonl", metrics), ("progress.jsonl", progress)):
        if content is not None:
            text = json.dumps(content) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in content)
            (run_dir / name).write_text(text)
    return run_dir


def _metrics(steps: list[int]) -> list[dict[str, Any]]:
    """metrics.jsonl records as a run writes them (one per evaluation)."""
    return [{"epoch": 1, "step": s, "train_loss": 1.0 / s, "test_loss": 0.5 / s, "test_accuracy": 1 - 0.1 / s,
             "test_samples": 10000, "samples_per_sec": 1500.0, "elapsed_s": s / 100} for s in steps]


def _progress(steps: list[int]) -> list[dict[str, Any]]:
    """progress.jsonl records as rank 0 writes them (one per --log-every progress line)."""
    return [{"epoch": 1, "step": s, "elapsed_s": s / 100, "train_loss": 2.0 / s, "lr": 1e-3,
             "samples_per_sec": 1500.0, "step_time_ms": 10.0 + s % 3, "data_wait_share": 0.01} for s in steps]


# ---------------------------------------------------------------------------------------------------------------
# RUN_A RUN_B


def test_comparison_shows_the_summarys_own_phase_times_and_its_blocks_numbers() -> None:
    """The phases' ms rows were share x explained x measured, the mean over the steps with an interval, not over
    every timed one (up to 4% off the summary's phase_time_per_step_s); and the numbers inside `startup` and
    `pauses_s` were left out of "every other number both summaries hold"."""
    # A mean timed step of 20 ms, 10% of it the all-reduce the step waited for: its phases are the other 18 ms.
    per_phase = {"data": 0.001, "to_device": 0.001, "forward": 0.006, "backward_compute": 0.006, "optimizer": 0.004}
    blocks = {"startup": {"imports": 2.0, "data": 0.5}, "pauses_s": {"evaluation": 1.0},
              "phase_timing": {"mode": "every", "every_n_steps": 20, "steps_timed": 99, "wall_per_step": True}}
    ranks = [_rank(0, 0.015, 2400.0, SHARES_B, phase_time_per_step_s=per_phase, comm_exposed_share=0.1,
                   traces={"written": 1, "write_failure": None})]
    a = {**_summary(ranks, 4000.0, 0.1), **blocks}
    b = {**a, "startup": {"imports": 3.0, "data": 0.5}, "pauses_s": {"evaluation": 0.5, "checkpoint": 0.25}}
    rows = {(r.section, r.label): r for r in compare_summaries(a, b)}
    for phase, ms in (("data", 1.0), ("forward", 6.0), ("optimizer", 4.0), ("backward", 0.4 * 20)):
        assert rows[("rank 0", f"{phase} ms")].a == pytest.approx(ms), phase
    assert rows[("global", "startup.imports")].ratio == pytest.approx(1.5)
    assert rows[("global", "pauses_s.evaluation")].ratio == pytest.approx(0.5)
    assert rows[("global", "pauses_s.checkpoint")].shown_a == "-"
    assert rows[("global", "startup.imports")].shown_a == "2 s"
    # Settings and counts, not measurements: no rows.
    assert not [label for _, label in rows if label.startswith(("phase_timing", "traces", "phase_time_per_step"))]


def test_comparison_ratios_are_b_over_a_for_every_figure() -> None:
    rows = {(r.section, r.label): r for r in compare_summaries(SUMMARY_A, SUMMARY_B)}
    expected = {
        ("global", "samples/s"): 2.5,
        ("global", "MFU"): 0.5,
        ("global", "epoch s"): 0.4,
        ("global", "startup s"): 1.0,
        ("rank 0", "step p50 ms"): 1.5,
        ("rank 0", "samples/s"): 1.5,
        ("rank 0", "data share"): 0.5,
        ("rank 0", "optimizer share"): 2.0,
        ("rank 0", "backward share"): 0.8,
        ("rank 0", "backward ms"): 0.8,  # both timed mean steps are 18 ms
        ("rank 0", "comm_bytes_per_step"): 0.5,  # a field both have, under its own name
    }
    for key, ratio in expected.items():
        assert rows[key].ratio == pytest.approx(ratio), key
    assert rows[("rank 0", "backward ms")].a == pytest.approx(0.5 * 0.9 * 20)
    assert rows[("rank 0", "to_device ms")].ratio is None  # A spent 0 ms there: no ratio
    # A count, not a measurement: shown, with no ratio (README: "not the numbers that count or name").
    ranks = rows[("global", "ranks")]
    assert (ranks.shown_a, ranks.shown_b, ranks.ratio) == ("1", "2", None)
    buckets = {(r.section, r.label): r for r in compare_summaries(
        {**SUMMARY_A, "ranks": [{**SUMMARY_A["ranks"][0], "allreduce_buckets": 2}]},
        {**SUMMARY_A, "ranks": [{**SUMMARY_A["ranks"][0], "allreduce_buckets": 5}]})}[("rank 0", "allreduce_buckets")]
    assert (buckets.shown_a, buckets.shown_b, buckets.ratio) == ("2", "5", None)
    # A world of one records null buckets: '-' as for a field it lacks, where the row read "None".
    alone = {(r.section, r.label): r for r in compare_summaries(
        {**SUMMARY_A, "ranks": [{**SUMMARY_A["ranks"][0], "allreduce_buckets": None}]},
        {**SUMMARY_A, "ranks": [{**SUMMARY_A["ranks"][0], "allreduce_buckets": 5}]})}[("rank 0", "allreduce_buckets")]
    assert (alone.shown_a, alone.shown_b) == ("-", "5")
    # A GPU run against a CPU run: ratios far below 1 keep two significant digits (they read "0.00x").
    assert [format_ratio(r) for r in (None, 0.0, 1.23e-5, 0.00123, 0.001, 0.05, 0.0951, 0.097, 0.1, 1.5, 1234.0)] == [
        "-", "0.00x", "0.000012x", "0.0012x", "0.0010x", "0.050x", "0.095x", "0.097x", "0.10x", "1.50x", "1234.00x"]
    # A field only B has, and a rank only B has: shown as '-' on the other side, no ratio.
    for key in [("rank 0", "comm_time_s"), ("rank 1", "samples/s")]:
        assert rows[key].ratio is None and rows[key].shown_a == "-" and rows[key].shown_b != "-"
    assert ("global", "first_step_unix") not in rows  # a timestamp, not a figure
    assert ("rank 0", "steps") not in rows  # how many steps the timers timed: no figure to take a ratio of
    # A share that is not a step phase (it may overlap one) is a plain number, not a phase with ms.
    assert rows[("rank 0", "exposed_comm_share")].shown_b == "10.0%"
    assert ("rank 0", "exposed_comm ms") not in rows


def test_report_prints_two_runs_side_by_side_with_the_config_diff(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run_a = _write_run(tmp_path / "a", SUMMARY_A, CONFIG_A)
    run_b = _write_run(tmp_path / "b", SUMMARY_B, CONFIG_B)
    assert report.main([str(run_a), str(run_b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == [f"A: {run_a}", f"B: {run_b}", "config (A -> B):", "  resolved.world_size: 1 -> 2",
                       "  ddp_comm_hook: (absent) -> 'bf16'"]

    def row(label: str) -> list[str]:
        """The A, B and B/A columns of the first row with this label."""
        return next(line for line in out if line.startswith(f"  {label}  ")).split()[-3:]

    assert row("samples/s") == ["1,600", "4,000", "2.50x"]  # the first samples/s row is the global one
    assert row("step p50 ms") == ["10.00", "15.00", "1.50x"]
    assert row("backward ms") == ["9.00", "7.20", "0.80x"]
    assert next(line for line in out if line.startswith("  comm_time_s  ")).split()[-4:] == ["-", "0.004", "s", "-"]
    assert not (tmp_path / "a" / report.PICTURE_FILE).exists()  # comparing draws nothing into the runs


def test_the_comparison_takes_each_summarys_own_settings_over_a_later_processs_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed process rewrites config.json and may stop before writing its summary: the diff described that
    later process (--amp off, --phase-timers off), and the B/A ratios were pinned on settings the summary's own
    steps never ran under."""
    run_a = _write_run(tmp_path / "a", {**SUMMARY_A, "config": CONFIG_A}, CONFIG_B)  # config.json: a later process's
    run_b = _write_run(tmp_path / "b", SUMMARY_B, CONFIG_A)  # a summary from before the record: config.json
    assert report.main([str(run_a), str(run_b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "config: identical"
    # The settings are the diff's, not figures with a ratio ("config.lr 0.001 -> 0.002 2.00x" in the table).
    assert not [line for line in out[3:] if "config" in line or "lr" in line.split()[:1]]
    # Each side's own record against config.json: the diff follows the summary's settings.
    run_c = _write_run(tmp_path / "c", {**SUMMARY_B, "config": CONFIG_B}, CONFIG_A)
    assert report.compare(run_a, run_c).splitlines()[2:5] == [
        "config (A -> B):", "  resolved.world_size: 1 -> 2", "  ddp_comm_hook: (absent) -> 'bf16'"]


def test_comparison_without_config_still_compares_the_summaries(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_a = _write_run(tmp_path / "a", SUMMARY_A)
    run_b = _write_run(tmp_path / "b", SUMMARY_A, CONFIG_A)
    assert report.main([str(run_a), str(run_b)]) == 0
    out = capsys.readouterr().out
    assert "config: not compared (a run has no config.json)" in out and "1.00x" in out


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "no run folder"),
    (lambda d: d.mkdir(), "has no summary.json"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text("{")), "summary.json is corrupt"),
    (lambda d: _write_run(d, {"ranks": [{"rank": 0}]}), "not a dist_mnist run file"),
    (lambda d: _write_run(d, SUMMARY_B, config=[1]), "config.json is not a dist_mnist run file"),
])
def test_comparison_with_a_missing_or_corrupt_run_is_one_line_error(setup: Any, message: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_a = _write_run(tmp_path / "a", SUMMARY_A, CONFIG_A)
    setup(tmp_path / "b")
    assert report.main([str(run_a), str(tmp_path / "b")]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


# ---------------------------------------------------------------------------------------------------------------
# The picture of one run


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


@pytest.mark.parametrize("with_progress", [True, False], ids=["progress", "older-run-without-progress"])
def test_report_writes_a_png_picture_into_the_run_folder(with_progress: bool, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _write_run(tmp_path / "run", SUMMARY_B, CONFIG_B, _metrics([50, 100, 150, 150]),
                         _progress(list(range(10, 160, 10))) if with_progress else None)
    assert report.main([str(run_dir)]) == 0
    picture = run_dir / "report.png"
    assert capsys.readouterr().out.splitlines()[-1] == f"picture: {picture}"
    _assert_png(picture)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_pictures_backward_bar_splits_off_the_all_reduce_it_waited_for() -> None:
    """With DDP's buckets timed (2+ ranks) the stacked bar shows backward compute and the exposed all-reduce apart,
    as the table does; the segments still add up to the mean timed step (18 ms here)."""
    shares = {"data": 0.1, "to_device": 0.0, "forward": 0.2, "backward": 0.5, "optimizer": 0.2}
    ddp = [_rank(0, 0.015, 2400.0, shares, comm_exposed_share=0.125), _rank(1, 0.016, 2300.0, shares,
                                                                             comm_exposed_share=None)]
    first, second = bar_segments(ddp)
    assert list(first) == ["data", "to_device", "forward", BACKWARD_COMPUTE, EXPOSED_ALLREDUCE, "optimizer"]
    assert first[EXPOSED_ALLREDUCE] == pytest.approx(2.25) and first[BACKWARD_COMPUTE] == pytest.approx(6.75)
    assert second[EXPOSED_ALLREDUCE] == 0.0 and second[BACKWARD_COMPUTE] == pytest.approx(9.0)
    assert sum(first.values()) == pytest.approx(18.0) and sum(second.values()) == pytest.approx(18.0)
    (alone,) = bar_segments([_rank(0, 0.015, 2400.0, shares)])  # one process: nothing to split
    assert list(alone) == list(shares) and alone["backward"] == pytest.approx(9.0)


def test_no_picture_prints_the_report_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _write_run(tmp_path / "run", SUMMARY_B, CONFIG_B, _metrics([50]))
    assert report.main([str(run_dir), "--no-picture"]) == 0
    assert capsys.readouterr().out == report.report(report.Run(run_dir)) + "\n"
    assert report.report(report.Run(run_dir)).endswith(format_summary(SUMMARY_B))
    assert not (run_dir / "report.png").exists()


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: (d / "progress.jsonl").write_text('{"step": 1,\n'), "progress.jsonl line 1 is corrupt"),
    (lambda d: (d / "progress.jsonl").write_text('{"step": 1}\n'), "line 1 lacks train_loss, step_time_ms"),
    # Fields of the wrong type reached the picture's drawing: a traceback.
    (lambda d: (d / "progress.jsonl").write_text('{"step": [1], "train_loss": 1.0, "step_time_ms": "x"}\n'),
     "progress.jsonl is not a dist_mnist run file (line 1: step, step_time_ms not a number)"),
    (lambda d: (d / "report.png").mkdir(), "cannot write"),
])
def test_picture_of_a_bad_run_is_one_line_error(setup: Any, message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _write_run(tmp_path / "run", SUMMARY_B, CONFIG_B, _metrics([50]))
    setup(run_dir)
    assert_report_fails_in_one_line(run_dir, message, capsys)


def test_a_damaged_line_is_named_by_its_line_in_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """json's position is within the one line it parsed ("line 1"); the error names the file's line, and says when
    the last line was cut short, as a process killed in mid-append leaves it."""
    lines = [json.dumps(r) for r in _metrics([50, 100, 150])]
    run_dir = _write_run(tmp_path / "run", SUMMARY_B, CONFIG_B)
    metrics = run_dir / "metrics.jsonl"

    def error(text: str) -> str:
        metrics.write_text(text)
        assert report.main([str(run_dir), "--no-picture"]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        return err.strip()

    cut_short = error(lines[0] + "\n\n" + lines[1] + "\n" + lines[2][:40])  # a blank line 2, line 4 cut short
    assert cut_short.startswith(f"error: {metrics} line 4 is corrupt: ") and "line 1" not in cut_short
    assert cut_short.endswith("(cut short: the run stopped while writing it)")
    inside = error(lines[0] + "\n" + lines[1][:40] + "\n" + lines[2] + "\n")  # damaged, then a good line
    assert inside.startswith(f"error: {metrics} line 2 is corrupt: ") and "cut short" not in inside


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "no run folder"),
    (lambda d: d.mkdir(), "has no summary.json"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text('{"ranks": [')), "summary.json is corrupt"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text('{"ranks": []}')), "not a dist_mnist run file"),
])
def test_report_rejects_missing_or_corrupt_runs(setup: Any, message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    setup(run_dir)
    assert_report_fails_in_one_line(run_dir, message, capsys)


def test_report_on_the_output_dir_or_a_file_of_a_run_names_the_folder_to_pass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The usual slips: --output-dir itself (its missing summary.json is no sign of a crashed run) and a run's file."""
    output_dir = tmp_path / "profiles"
    for name in ("20261128-010000", "20261128-020000"):
        _write_run(output_dir / name, SUMMARY_A, CONFIG_A)
    (output_dir / ".torchelastic").mkdir()  # what torchrun runs leave there too
    assert_report_fails_in_one_line(
        output_dir, f"{output_dir} is not a run folder but holds run folders (20261128-010000, 20261128-020000), "
                    f"as --output-dir does; pass one of them, e.g. {output_dir / '20261128-020000'}", capsys)
    summary = output_dir / "20261128-020000" / "summary.json"
    assert_report_fails_in_one_line(
        summary, f"{summary} is a file, not a run folder; pass the run folder that holds it, {summary.parent}", capsys)
    traces = output_dir / "20261128-020000" / "traces"
    traces.mkdir()
    assert_report_fails_in_one_line(
        traces, f"{traces} is a folder inside the run folder {traces.parent}; pass that", capsys)
    # Three folders down, in a window's folder: the nearest folder holding a run's file is named, not the window's.
    window = traces / "step00000003"
    window.mkdir()
    assert_report_fails_in_one_line(
        window, f"{window} is a folder inside the run folder {traces.parent}; pass that", capsys)
    trace = window / "rank0.pt.trace.json.gz"
    trace.write_bytes(b"")
    assert_report_fails_in_one_line(
        trace, f"{trace} is a file, not a run folder; pass the run folder that holds it, {traces.parent}", capsys)
    # Compared with another run, the same words.
    assert report.main([str(output_dir / "20261128-010000"), str(output_dir)]) == 1
    assert "holds run folders" in capsys.readouterr().err
    # An --output-dir whose only run has not finished (killed: config.json and metrics.jsonl, no summary.json) is
    # still --output-dir, not a crashed run.
    unfinished = tmp_path / "unfinished"
    (unfinished / "killed").mkdir(parents=True)
    (unfinished / "killed" / "config.json").write_text(json.dumps(CONFIG_A))
    assert_report_fails_in_one_line(
        unfinished, f"{unfinished} is not a run folder but holds run folders (killed), as --output-dir does; pass one "
                    f"of them, e.g. {unfinished / 'killed'}", capsys)


def assert_report_fails_in_one_line(run_dir: Path, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_training_does_not_import_matplotlib() -> None:
    code = "import sys, dist_mnist.train, dist_mnist.report; print('matplotlib' in sys.modules)"
    result = run([sys.executable, "-c", code], timeout=100)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.cli
@pytest.mark.timeout(120)
def test_the_report_and_the_comparison_import_no_torch(tmp_path: Path) -> None:
    """Run folders are read where torch may be missing or slow to import (a laptop, a login node): the report and the
    comparison read JSON files only, and torch was 1.6 s of the 1.7 s `import dist_mnist.report` took on the 2-core
    CPU (the summary table and PHASES came from the torch modules profiling and metrics)."""
    one = _write_run(tmp_path / "a", SUMMARY_A, CONFIG_A, _metrics([20]), _progress([10, 20]))
    two = _write_run(tmp_path / "b", SUMMARY_B, CONFIG_B)
    code = ("import sys; from dist_mnist import report; "
            f"codes = [report.main([{str(one)!r}]), report.main([{str(one)!r}, {str(two)!r}])]; "
            "print(codes, sorted({'torch', 'torchvision', 'tensorboard'} & set(sys.modules)))")
    result = run([sys.executable, "-c", code], timeout=100)
    assert result.stdout.splitlines()[-1] == "[0, 0] []", result.stderr
    assert (one / "report.png").is_file()


def test_a_run_shorter_than_log_every_is_not_said_to_lack_progress_jsonl(tmp_path: Path) -> None:
    """--max-steps below --log-every leaves an empty progress.jsonl: the step-time panel must not say the file is
    missing, and says what its emptiness means."""
    from matplotlib.figure import Figure

    from dist_mnist.plots import NO_PROGRESS, _step_times

    ax = Figure().subplots()
    _step_times(ax, [])
    [text] = ax.texts
    assert text.get_text() == f"no data\n({NO_PROGRESS})"
    assert "no progress.jsonl" not in text.get_text() and "--log-every" in text.get_text()


def test_json_nested_past_the_recursion_limit_is_a_corrupt_file_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "a", SUMMARY_A, CONFIG_A)
    (run / "summary.json").write_text("[" * 200_000 + "]" * 200_000)
    assert report.main([str(run), "--no-picture"]) == 1
    assert capsys.readouterr().err == f"error: {run / 'summary.json'} is corrupt: nested too deep to read\n"


@pytest.mark.skipif(getattr(sys, "get_int_max_str_digits", lambda: 0)() == 0,
                    reason="Python reads integers of any length (before 3.11, or the limit turned off)")
def test_an_integer_past_pythons_digit_limit_is_a_corrupt_line_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """json.loads raises a plain ValueError (not JSONDecodeError) for an integer past sys.get_int_max_str_digits():
    it escaped as a traceback, from a finished run's metrics.jsonl and an unfinished run's progress.jsonl."""
    huge = "1" * (sys.get_int_max_str_digits() + 1)
    finished = _write_run(tmp_path / "finished", SUMMARY_A, CONFIG_A)
    (finished / "metrics.jsonl").write_text(json.dumps(_metrics([20])[0]) + '\n{"step": ' + huge + "}\n")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "progress.jsonl").write_text(json.dumps(_progress([10])[0]) + '\n{"step": ' + huge + "}\n")
    for run_dir, name in ((finished, "metrics.jsonl"), (unfinished, "progress.jsonl")):
        assert report.main([str(run_dir), "--no-picture"]) == 1
        assert capsys.readouterr().err == (f"error: {run_dir / name} line 2 is corrupt: an integer longer than the "
                                           f"{sys.get_int_max_str_digits()} digits Python reads\n")


def test_the_picture_is_not_written_through_a_symlink_at_its_temp_name(tmp_path: Path) -> None:
    """`.report.png.tmp -> ~/victim` in a run folder: the picture replaced the victim's content."""
    run = _write_run(tmp_path / "a", SUMMARY_A, CONFIG_A)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own")
    (run / ".report.png.tmp").symlink_to(victim)
    assert report.picture(report.Run(run)).read_bytes().startswith(b"\x89PNG")
    assert victim.read_text() == "the user's own" and not (run / ".report.png.tmp").exists()


def test_the_step_time_panel_leaves_untimed_intervals_as_gaps() -> None:
    """--phase-timers off over steps 31-55 of a resumed run: the line ran straight from step 30's 37 ms to step 60's
    508 ms, a ramp nothing measured."""
    from matplotlib.figure import Figure

    from dist_mnist.plots import _step_times

    ax = Figure().subplots()
    times = {10: 37.0, 20: None, 30: None, 40: 508.0}
    _step_times(ax, [{"step": step, "step_time_ms": ms} for step, ms in times.items()])
    [line] = ax.get_lines()
    xs, ys = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
    assert xs.tolist() == [10, 20, 30, 40]
    assert [None if math.isnan(y) else y for y in ys.tolist()] == list(times.values())


def test_the_accuracy_panel_names_the_last_accuracy_in_its_title_not_over_the_curve() -> None:
    from matplotlib.figure import Figure

    from dist_mnist.plots import _accuracy

    ax = Figure().subplots()
    _accuracy(ax, _metrics([20, 40]))
    assert ax.get_title() == "test accuracy (last 99.75% at step 40)" and not ax.texts


def test_a_run_with_phase_timers_off_has_no_phase_bars_or_phase_rows() -> None:
    """--phase-timers off writes every share as None: the picture says it has none (not bars of 0 ms each) and a
    comparison of two such runs has no phase rows."""
    from matplotlib.figure import Figure

    from dist_mnist.plots import _phase_bars

    untimed = _rank(0, 0.015, 2400.0, SHARES_A, explained_fraction=None, own_time_p50_s=None, straggler=None,
                    **{f"{p}_share": None for p in PHASES})
    summary = _summary([untimed], 2400.0, 0.1)
    ax = Figure().subplots()
    _phase_bars(ax, summary)
    assert not ax.patches and [t.get_text() for t in ax.texts] == [
        "no data\n(summary.json has no per-rank phase shares\n(--phase-timers off times no phase))"]
    labels = {r.label for r in compare_summaries(summary, summary)}
    assert not {label for label in labels if label.endswith((" share", " ms")) and label.split()[0] in PHASES}
    assert "step p50 ms" in labels


@pytest.mark.timeout(200)
def test_the_report_of_a_resumed_run_says_its_figures_are_of_the_last_process_only(tmp_path: Path) -> None:
    """summary.json is written by the process that ends the run: after a resume its figures are of the steps since
    the checkpoint, while metrics.jsonl and progress.jsonl hold the whole run. The report must not pass them off
    as the whole run's."""
    flags = [*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--run-name", "resumed", "--checkpoint-every", "4"]
    first = train_in_process(*flags, "--max-steps", "8")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert (summary["first_step"], summary["last_step"]) == (0, 8)
    assert "resumed at step" not in first.stdout
    again = train_in_process(*flags, "--max-steps", "12")
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert (summary["first_step"], summary["last_step"]) == (8, 12)
    line = ("resumed at step 8: these figures are of steps 9-12, run by the process that resumed the run, not of its "
            "earlier steps")
    assert line in again.stdout.splitlines()
    assert report.report(report.Run(tmp_path / "resumed")).splitlines()[-1] == line
    assert report.picture_title(report.Run(tmp_path / "resumed")).endswith(
        " samples/s (phases and samples/s: steps 9-12, after a resume)")
    # Compared with another run: named in the header, not a row of step numbers with a ratio.
    compared = report.compare(tmp_path / "resumed", tmp_path / "resumed").splitlines()
    assert compared[0] == f"A: {tmp_path / 'resumed'} (figures of steps 9-12 only: resumed there)"
    assert not [row for row in compared if row.split()[:1] in (["first_step"], ["last_step"])]


def test_a_run_without_summary_json_still_shows_and_draws_its_records(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failed run (a non-finite loss, rc 1) has progress.jsonl and metrics.jsonl but no summary.json: the report
    gave only its one line, and no picture of the loss curve a user wants most then (review_outputs F8). It prints
    what the records hold and draws the curves, then ends as before: exit 1 with the one line."""
    run_dir = tmp_path / "failed"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(CONFIG_A))
    (run_dir / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _progress([10, 20, 30])))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics([20])))
    assert report.main([str(run_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "eval  epoch 1 step 20: test loss 0.0250, accuracy 99.50% of 10000 images, 0.2 s since the first step",
        "progress.jsonl: 3 records, the last of step 30, train loss 0.0667",
        f"picture: {run_dir / 'report.png'}"]
    assert captured.err.startswith(f"error: {run_dir} has no summary.json: ") and len(captured.err.splitlines()) == 1
    _assert_png(run_dir / "report.png")
    assert report.main([str(run_dir), "--no-picture"]) == 1
    assert "picture:" not in capsys.readouterr().out
    # One progress line (a run killed before its second --log-every step) is "1 record", not "1 records".
    (run_dir / "progress.jsonl").write_text(json.dumps(_progress([10])[0]) + "\n")
    assert report.unfinished_report(report.Run(run_dir)).splitlines()[-1] == (
        "progress.jsonl: 1 record, the last of step 10, train loss 0.2000")


def test_the_comparison_shows_shares_bytes_and_seconds_in_their_units_and_keeps_a_blocks_rows_together() -> None:
    """Fields without a figure of their own were raw: comm_exposed_share 0.09116 among % rows, 2.4e+06 bytes per
    step, startup seconds without "s", and a startup part only B had after the pauses (review_outputs F7)."""
    ranks = [_rank(0, 0.015, 2400.0, SHARES_B, comm_exposed_share=0.09116, allreduce_bytes_per_step=2_400_000,
                   allreduce_bandwidth_bytes_per_s=6.235e7)]
    a = {**_summary(ranks, 4000.0, 0.1), "startup": {"imports": 2.0}, "pauses_s": {"evaluation": 1.0}}
    b = {**a, "startup": {"imports": 3.0, "rendezvous": 0.5}}
    rows = compare_summaries(a, b)
    shown = {(r.section, r.label): (r.shown_a, r.shown_b) for r in rows}
    assert shown[("rank 0", "comm_exposed_share")] == ("9.1%", "9.1%")
    assert shown[("rank 0", "allreduce_bytes_per_step")] == ("2.40 MB", "2.40 MB")
    assert shown[("rank 0", "allreduce_bandwidth_bytes_per_s")] == ("62.35 MB/s", "62.35 MB/s")
    assert shown[("global", "startup.rendezvous")] == ("-", "0.5 s")
    labels = [r.label for r in rows if r.section == "global"]
    assert labels.index("startup.rendezvous") < labels.index("pauses_s.evaluation")
    assert not [r for r in rows if r.label.endswith("_share") and not r.shown_a.endswith("%")]


# ---------------------------------------------------------------------------------------------------------------
# Run files an attacker planted (security review finding 13)


@pytest.mark.timeout(20)
def test_a_fifo_summary_is_one_line_not_a_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Opened without O_NONBLOCK, a FIFO waits for a writer for ever; it is refused as no regular file."""
    run = _write_run(tmp_path / "run", SUMMARY_A, CONFIG_A)
    (run / "summary.json").unlink()
    os.mkfifo(run / "summary.json")
    assert_report_fails_in_one_line(run, "summary.json is a FIFO, not a regular file", capsys)


def test_a_metrics_file_linked_to_dev_zero_is_one_line_not_a_memory_blow_up(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run", SUMMARY_A, CONFIG_A)
    (run / "metrics.jsonl").symlink_to("/dev/zero")
    assert_report_fails_in_one_line(run, "metrics.jsonl is a character device, not a regular file", capsys)


def test_a_run_file_past_the_size_cap_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap (far above a real file, so lowered here) is checked on the bytes read, not on a size stat reports."""
    run = _write_run(tmp_path / "run", SUMMARY_A, CONFIG_A, _metrics([50, 100]))
    monkeypatch.setattr("dist_mnist.runfiles.MAX_RUN_FILE_BYTES", 100)
    assert_report_fails_in_one_line(run, "summary.json holds more than 100 bytes, more than any run writes", capsys)


def test_a_run_file_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run", SUMMARY_A, CONFIG_A)
    (run / "summary.json").write_bytes(b'{"a": "\xff"}')
    assert_report_fails_in_one_line(run, "summary.json is not UTF-8 text", capsys)


def test_a_dollar_in_the_run_folders_name_is_drawn_not_parsed_as_mathtext(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "r$\\bad{$", SUMMARY_B, CONFIG_B, _metrics([50, 100]), _progress([10, 20]))
    assert report.main([str(run)]) == 0, capsys.readouterr().err
    _assert_png(run / "report.png")


def test_terminal_escapes_from_run_files_are_shown_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A diagnosis or a rank field with ESC, CR or BEL cleared the screen or set the title (security review
    finding 8); the table shows them as `\\x1b`, and the comparison too."""
    esc = "\x1b"
    forged = _summary([_rank(0, 0.010, 1600.0, SHARES_A)], 1600.0, 0.2)
    forged["diagnosis"] = f"fine\r{esc}[2K{esc}]0;owned\x07{esc}[31mFORGED\x9b"
    run = _write_run(tmp_path / "forged", forged, CONFIG_A)
    assert report.main([str(run), "--no-picture"]) == 0
    out = capsys.readouterr().out
    assert "diagnosis: fine\\r\\x1b[2K\\x1b]0;owned\\x07\\x1b[31mFORGED\\x9b" in out
    assert not any(c in out for c in (esc, "\r", "\x07", "\x9b"))
    other = _write_run(tmp_path / "a", SUMMARY_A, {**CONFIG_A, f"lr{esc}[31m": 1})
    assert report.main([str(other), str(run)]) == 0
    assert esc not in capsys.readouterr().out
