"""End to end through launch/train.py: torchrun and single-process runs write their run files, only rank 0
talks, runs are reproducible, every bad input is one error line, and (with real MNIST) the recipe learns."""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import multiprocessing
import os
import platform
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import (
    REPO,
    SMOKE_FLAGS,
    TRAIN_SCRIPT,
    Result,
    cpu_env,
    make_mnist_dir,
    readme_table_row,
    real_mnist_dir,
    run,
    torchrun,
    train,
    train_in_process,
    write_idx,
)

import dist_mnist.train as train_module
from dist_mnist import console, shutdown
from dist_mnist.agreement import code_version
from dist_mnist.checkpoint import checkpoint_path
from dist_mnist.collectives import FLIGHT_RECORDER_FOLDER
from dist_mnist.data import MNIST_FILES, mnist_raw_dir
from dist_mnist.errors import TERMINATING_SIGNALS, raise_terminated
from dist_mnist.progress import PROGRESS_FILE
from dist_mnist.report import PICTURE_FILE
from dist_mnist.rundir import LOCK_FILE
from dist_mnist.runfiles import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, TRACES_DIR

SMOKE_TEST_SIZE = 203  # what SMOKE_FLAGS make: odd, so neither 2 nor 3 ranks divide it
MAX_STEPS = 12
LOG_EVERY = 4  # SMOKE_FLAGS' --log-every
RECORD_KEYS = {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "test_samples", "samples_per_sec",
               "elapsed_s", "eval_s", "paused_s"}


def test_the_readme_names_exactly_the_keys_of_a_metrics_record() -> None:
    assert set(re.findall(r"`(\w+)`", readme_table_row(METRICS_FILE))) == RECORD_KEYS


def readme_run_files() -> dict[str, re.Pattern[str]]:
    """The README's "Run output" table: each row's file (a path inside the run folder) and a pattern of the names
    it stands for (`<N>` a rank, `<ns>` a time, `NNNNNNNN` a step, `*` anything)."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("\n| file | what |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    names = [re.match(r"^\| `([^`]+)` \|", line) for line in table.splitlines()]
    assert all(names), table
    wildcards = {re.escape("<N>"): r"\d+", re.escape("<ns>"): r"\d+", "NNNNNNNN": r"\d{8}", re.escape("*"): ".+"}
    patterns = {}
    for name in (match.group(1) for match in names if match):
        pattern = re.escape(name)
        for wildcard, regex in wildcards.items():
            pattern = pattern.replace(wildcard, regex)
        patterns[name] = re.compile(pattern)
    return patterns


def test_the_readme_run_files_table_names_the_files_the_code_writes() -> None:
    rows = readme_run_files()
    for name in (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE, PROGRESS_FILE, PICTURE_FILE, LOCK_FILE):
        assert name in rows, name
    assert {row.split("/", 1)[0] for row in rows if "/" in row} == {TRACES_DIR, CHECKPOINTS_DIR, FLIGHT_RECORDER_FOLDER}
    checkpoint = checkpoint_path(Path(CHECKPOINTS_DIR), 12).as_posix()
    assert any(pattern.fullmatch(checkpoint) for pattern in rows.values()), checkpoint


@dataclass
class Run:
    result: Result
    run_dir: Path

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def json(self, name: str) -> dict[str, Any]:
        return json.loads((self.run_dir / name).read_text())


def smoke_flags(output_dir: Path, run_name: str, *extra: str) -> list[str]:
    return [*SMOKE_FLAGS, "--max-steps", str(MAX_STEPS), "--output-dir", str(output_dir), "--run-name", run_name,
            "--timeout-s", "60", *extra]


def torchrun_smoke(nproc: int, output_dir: Path, run_name: str, *extra: str,
                   env: dict[str, str] | None = None) -> Run:
    return Run(torchrun(nproc, *smoke_flags(output_dir, run_name, *extra), timeout=150, env=env),
               output_dir / run_name)


def assert_ok(run: Run) -> None:
    assert run.result.returncode == 0, f"stdout:\n{run.result.stdout[-3000:]}\nstderr:\n{run.result.stderr[-3000:]}"
    assert "Traceback" not in run.result.stderr
    # DDP warns once per rank when a gradient's strides differ from its parameter's (and copies it every step):
    # conv1's weight, whose one input channel makes NCHW and NHWC strides both valid, must take its gradient's.
    assert "Grad strides do not match bucket view strides" not in run.result.stderr


def assert_run_files(run: Run, world_size: int) -> None:
    assert_ok(run)
    config = run.json("config.json")
    assert config["resolved"]["world_size"] == world_size and config["max_steps"] == MAX_STEPS
    last = run.metrics()[-1]
    assert last.keys() == RECORD_KEYS
    assert 0 < last["eval_s"] <= last["paused_s"] < last["elapsed_s"]
    # Epochs count from 1: the epoch of the last step done.
    assert last["step"] == MAX_STEPS and last["epoch"] == (MAX_STEPS - 1) // config["resolved"]["steps_per_epoch"] + 1
    assert last["test_samples"] == SMOKE_TEST_SIZE
    assert 0 <= last["test_accuracy"] <= 1 and last["samples_per_sec"] > 0 and last["elapsed_s"] > 0
    summary = run.json("summary.json")
    assert summary["world_size"] == world_size and summary["ranks_in_sync"]


def final_model(run: Run) -> dict[str, torch.Tensor]:
    state = torch.load(run.run_dir / "checkpoints" / f"step{MAX_STEPS:08d}.pt", map_location="cpu", weights_only=True)
    return state["model"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def torchrun_two(out_dir: Path) -> Run:
    # OMP_NUM_THREADS left unset, so the run shows that torchrun gives each of its processes one thread.
    env = {k: v for k, v in cpu_env().items() if k != "OMP_NUM_THREADS"}
    return torchrun_smoke(2, out_dir, "two", "--deterministic", env=env)


@pytest.fixture(scope="module")
def single_process(out_dir: Path) -> Run:
    # A world of one in this process: launch/train.py itself is run by the launched cases below.
    return Run(train_in_process(*smoke_flags(out_dir, "single")), out_dir / "single")


@pytest.mark.timeout(200)
def test_torchrun_two_processes_write_the_run_files(torchrun_two: Run) -> None:
    assert_run_files(torchrun_two, world_size=2)
    resolved = torchrun_two.json("config.json")["resolved"]
    assert resolved["backend"] == "gloo" and resolved["device"] == "cpu"
    assert resolved["threads_per_process"] == 1
    # The ranks run this interpreter (conftest's torchrun is sys.executable's): what a comparison of runs needs.
    assert (resolved["python"], resolved["torch"]) == (platform.python_version(), torch.__version__)
    assert resolved["cuda"] is None and resolved["gpu"] is None  # a CPU run names no CUDA or GPU


@pytest.mark.timeout(200)
def test_every_file_a_run_writes_is_a_row_of_the_readme_table(torchrun_two: Run, two_epochs: Run) -> None:
    """A file the code starts writing into the run folder without a word in the README fails here: two ranks with
    checkpoints, and a run with TensorBoard's event file."""
    patterns = readme_run_files().values()
    for each in (torchrun_two, two_epochs):
        written = [path.relative_to(each.run_dir).as_posix() for path in each.run_dir.rglob("*") if path.is_file()]
        assert len(written) >= 5
        assert [name for name in written if not any(p.fullmatch(name) for p in patterns)] == []


@pytest.mark.timeout(200)
def test_every_summary_field_a_run_writes_is_in_the_readme(torchrun_two: Run) -> None:
    """README, "summary.json": each field of a 2-rank run's summary (global, per rank, start-up, phase timing and
    pauses) is named there, so a field added to the code without a word in the README fails here."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**summary.json.**"):readme.index("A sample (2 CPU ranks")]
    named = set(re.findall(r"`([a-z][a-z0-9_]*)`", section))
    summary = torchrun_two.json("summary.json")
    written = {"global": set(summary) - {"ranks"}, "per rank": set(summary["ranks"][0]),
               "startup": set(summary["startup"]), "phase_timing": set(summary["phase_timing"])}
    assert len(written["per rank"]) >= 20 and len(written["global"]) >= 12
    assert {part: sorted(fields - named) for part, fields in written.items()} == {part: [] for part in written}


@pytest.mark.timeout(150)
def test_every_resolved_key_a_run_writes_is_in_the_readme(single_process: Run) -> None:
    """README, "Run output": config.json's row names each key of the `resolved` block a run writes, in backticks (so
    `jq .resolved.KEY` works as read), and no key the block lacks."""
    written = set(single_process.json(CONFIG_FILE)["resolved"])
    row = readme_table_row(CONFIG_FILE)
    named = set(re.findall(r"`([a-z][a-z0-9_]*)`", row.split("`resolved` block:", 1)[1]))
    assert len(written) >= 15
    assert (sorted(written - named), sorted(named - written)) == ([], [])


@pytest.mark.timeout(200)
def test_only_rank_0_prints_progress(torchrun_two: Run) -> None:
    lines = torchrun_two.result.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == MAX_STEPS // LOG_EVERY
    assert sum(line.startswith("eval ") for line in lines) == 1
    assert sum(line.startswith("run ") for line in lines) == 1


@pytest.mark.timeout(150)
def test_single_process_mode_writes_the_run_files(single_process: Run) -> None:
    assert_run_files(single_process, world_size=1)
    assert single_process.json("config.json")["resolved"]["backend"] == "gloo"


@pytest.mark.timeout(150)
def test_config_json_names_the_code_that_ran(single_process: Run) -> None:
    """A checkout and an installed copy both report version 0.1.0: the digest of the source traces a run to its code,
    the one the ranks compare before training."""
    assert single_process.json("config.json")["resolved"]["dist_mnist_code"] == code_version()


@pytest.mark.timeout(60)
def test_the_launcher_imports_the_checkout_it_sits_in(tmp_path: Path) -> None:
    """GPU images bring torch but often no package index to install us from: launch/train.py must run the
    dist_mnist beside it, installed or not (here the test environment's editable install points elsewhere)."""
    tree = tmp_path / "checkout"
    for folder in ("dist_mnist", "launch"):
        shutil.copytree(REPO / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); import dist_mnist; "
             "print(dist_mnist.__file__)")
    result = subprocess.run([sys.executable, "-c", probe, str(tree / "launch" / "train.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=50, env=cpu_env())
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tree / "dist_mnist" / "__init__.py"


# 128 samples at batch 16: 8 steps per epoch, 16 in all; progress every 4 steps, evaluations at steps 5
# (--eval-every), 8 (end of epoch 1), 13 (--eval-every counts from the last evaluation: not 10 and 15) and 16.
@pytest.fixture(scope="module")
def two_epochs(out_dir: Path) -> Run:
    flags = [*SMOKE_FLAGS, "--synthetic-train-size", "128", "--epochs", "2", "--eval-every", "5", "--tensorboard",
             "--output-dir", str(out_dir), "--run-name", "two-epochs", "--timeout-s", "60"]
    return Run(train_in_process(*flags), out_dir / "two-epochs")


@pytest.mark.timeout(150)
def test_a_step_is_evaluated_once_when_max_steps_falls_on_eval_every(tmp_path: Path) -> None:
    """--max-steps 8 --eval-every 4: evaluations at steps 4 and 8, each once (the run's final evaluation is the one
    --eval-every just made)."""
    # The later --max-steps overrides smoke_flags' own.
    run = Run(train_in_process(*smoke_flags(tmp_path, "at-limit", "--eval-every", "4", "--max-steps", "8")),
              tmp_path / "at-limit")
    assert_ok(run)
    assert [r["step"] for r in run.metrics()] == [4, 8]


PROGRESS_LINE = re.compile(r"^epoch (\d+) step (\d+)/16 \((\d+\.\d)%\) loss \S+ lr \S+ [\d,]+ samples/s, "
                           r"elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d)$", re.MULTILINE)
EVAL_LINE = re.compile(r"^eval  epoch (\d+) step (\d+): ", re.MULTILINE)


@pytest.mark.timeout(150)
def test_epochs_count_from_1_in_every_output(two_epochs: Run) -> None:
    assert_ok(two_epochs)
    progress = [(int(e), int(s)) for e, s, _, _ in PROGRESS_LINE.findall(two_epochs.result.stdout)]
    evals = [(int(e), int(s)) for e, s in EVAL_LINE.findall(two_epochs.result.stdout)]
    records = [(r["epoch"], r["step"]) for r in two_epochs.metrics()]
    progress_records = [(r["epoch"], r["step"]) for r in read_jsonl(two_epochs.run_dir / "progress.jsonl")]
    assert progress == progress_records == [(1, 4), (1, 8), (2, 12), (2, 16)]
    assert evals == records == [(1, 5), (1, 8), (2, 13), (2, 16)]


@pytest.mark.timeout(150)
def test_progress_line_has_percent_and_eta(two_epochs: Run) -> None:
    assert_ok(two_epochs)
    lines = PROGRESS_LINE.findall(two_epochs.result.stdout)
    assert [percent for _, _, percent, _ in lines] == ["25.0", "50.0", "75.0", "100.0"]
    assert lines[-1][3] == "0:00:00"  # nothing left at the last step


@pytest.mark.timeout(150)
def test_progress_jsonl_has_the_documented_keys(two_epochs: Run) -> None:
    assert_ok(two_epochs)
    for record in read_jsonl(two_epochs.run_dir / "progress.jsonl"):
        assert list(record) == ["epoch", "step", "elapsed_s", "train_loss", "lr", "samples_per_sec", "step_time_ms",
                                "data_wait_share"]
        assert record["samples_per_sec"] > 0 and record["step_time_ms"] > 0 and 0 <= record["data_wait_share"] < 1


@pytest.mark.timeout(150)
def test_readme_lists_the_tensorboard_scalars_written(two_epochs: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: here only

    assert_ok(two_epochs)
    (events,) = two_epochs.run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    written = set(accumulator.Tags()["scalars"])
    documented = readme_tensorboard_scalars()
    cuda_only = {"train/cuda_max_allocated_mb"}
    assert cuda_only <= documented
    assert written == documented - cuda_only


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def readme_tensorboard_scalars() -> set[str]:
    """The scalar names in the README's **TensorBoard.** paragraph."""
    text = (REPO / "README.md").read_text()
    paragraph = text.split("**TensorBoard.**", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`((?:train|eval)/\w+)`", paragraph))


@pytest.mark.multirank
@pytest.mark.timeout(200)
def test_three_processes_count_the_odd_test_set_once(tmp_path: Path) -> None:
    assert_run_files(torchrun_smoke(3, tmp_path, "three"), world_size=3)


@pytest.mark.multirank
@pytest.mark.timeout(200)
def test_same_seed_and_world_size_give_the_same_parameters(torchrun_two: Run, out_dir: Path) -> None:
    again = torchrun_smoke(2, out_dir, "two-again", "--deterministic")
    assert_ok(again)
    first, second = final_model(torchrun_two), final_model(again)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def file_snapshot(folder: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(150)
def test_existing_run_folder_is_never_overwritten(single_process: Run) -> None:
    assert_ok(single_process)
    before = file_snapshot(single_process.run_dir)
    again = train_in_process(*smoke_flags(single_process.run_dir.parent, single_process.run_dir.name, "--resume",
                                          "never"))
    assert_one_line_error(again, "already exists")
    assert file_snapshot(single_process.run_dir) == before


@pytest.mark.timeout(150)
def test_resume_never_is_refused_under_torchrun_restarts(single_process: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a worker restarted by `torchrun --max-restarts=1` sees: it used to accept the folder, start again at
    # step 0 and rewrite metrics.jsonl.
    assert_ok(single_process)
    before = file_snapshot(single_process.run_dir)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = train_in_process(*smoke_flags(single_process.run_dir.parent, single_process.run_dir.name, "--resume",
                                          "never"))
    assert_one_line_error(again, "--resume never cannot be combined with torchrun --max-restarts")
    assert file_snapshot(single_process.run_dir) == before


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 1, no traceback


def assert_one_line_error(result: Result, *expected: str) -> None:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0]


def _data_dir(tmp_path: Path, corrupt: Callable[[Path], None]) -> str:
    data_dir = make_mnist_dir(tmp_path / "data")
    corrupt(mnist_raw_dir(str(data_dir)))
    return str(data_dir)


def _wrong_magic(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])


def _truncated(raw: Path) -> None:
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])


def _unreadable(raw: Path) -> None:
    # Root reads any file whatever its mode: a read that fails with EIO stands in for a lost permission.
    path = raw / "t10k-labels-idx1-ubyte"
    path.unlink()
    path.symlink_to("/proc/self/mem")


def _empty_test_set(raw: Path) -> None:
    write_idx(raw / "t10k-images-idx3-ubyte", torch.zeros(0, 28, 28, dtype=torch.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.zeros(0, dtype=torch.uint8))


def _unwritable_output(tmp_path: Path) -> str:
    # Root may write anywhere, but nobody can make a folder below a regular file.
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "runs")


NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}

# id -> (flags for tmp_path, extra environment, texts the error line must hold)
BAD_INPUTS: dict[str, tuple[Callable[[Path], list[str]], dict[str, str], tuple[str, ...]]] = {
    "missing-files-no-download": (lambda p: ["--data-dir", str(p / "empty"), "--no-download"], {},
                                  (*MNIST_FILES, "--data-dir", "--no-download")),
    "missing-files-download-impossible": (lambda p: ["--data-dir", str(p / "empty")], NO_NETWORK,
                                          ("could not download MNIST", *MNIST_FILES, "--data-dir")),
    "wrong-magic": (lambda p: ["--data-dir", _data_dir(p, _wrong_magic), "--no-download"], {},
                    ("train-images-idx3-ubyte is not a valid MNIST IDX file",)),
    "truncated": (lambda p: ["--data-dir", _data_dir(p, _truncated), "--no-download"], {},
                  ("t10k-images-idx3-ubyte is not a valid MNIST IDX file",)),
    "unreadable-file": (lambda p: ["--data-dir", _data_dir(p, _unreadable), "--no-download"], {},
                        ("cannot read", "t10k-labels-idx1-ubyte: Input/output error", "--data-dir")),
    "empty-test-set": (lambda p: ["--data-dir", _data_dir(p, _empty_test_set), "--no-download"], {},
                       ("t10k-labels-idx1-ubyte hold no images",)),
    "num-workers-far-past-the-cpus": (lambda p: [*SMOKE_FLAGS, "--num-workers", str(10**20)], {},
                                      ("--num-workers must be at most",)),
    "zero-batch-size": (lambda p: [*SMOKE_FLAGS, "--batch-size", "0"], {}, ("--batch-size must be positive",)),
    "negative-epochs": (lambda p: [*SMOKE_FLAGS, "--epochs=-1"], {}, ("--epochs must be positive",)),
    "infinite-timeout": (lambda p: [*SMOKE_FLAGS, "--timeout-s", "inf"], {}, ("--timeout-s must be a finite number",)),
    "nccl-without-cuda": (lambda p: [*SMOKE_FLAGS, "--backend", "nccl"], {}, ("--backend nccl", "CUDA")),
    "fp16-on-cpu": (lambda p: [*SMOKE_FLAGS, "--amp", "fp16"], {}, ("--amp fp16 runs on CUDA only",)),
    "unwritable-output-dir": (lambda p: [*SMOKE_FLAGS, "--output-dir", _unwritable_output(p)], {},
                              ("cannot write to --output-dir",)),
    # Each of these was a traceback, argparse's usage with exit code 2, or a silent change before it was refused.
    "unreadable-value": (lambda p: [*SMOKE_FLAGS, "--batch-size", "abc"], {},
                         ("argument --batch-size: invalid int value: 'abc'",)),
    "seed-beyond-numpy": (lambda p: [*SMOKE_FLAGS, "--seed=-1"], {}, ("--seed must be in [0, 4294967295]",)),
    "data-on-device-on-cpu": (lambda p: [*SMOKE_FLAGS, "--data-on-device", "on"], {},
                              ("--data-on-device on needs CUDA",)),
    "schedule-without-profile": (lambda p: [*SMOKE_FLAGS, "--profile-wait", "1"], {},
                                 ("--profile-wait has no effect without --profile",)),
}


# Run through launch/train.py in a process of their own; the others call main() in the test's process (a process
# start is about 2.5 s of CI's 2 cores, twice per case: both CI passes run the suite), with stderr captured at the
# file descriptor, where anything torch's C++ side printed would land too. The download case sets proxies, which
# urllib's global opener would keep for every later request of the test process.
LAUNCHED_BAD_INPUTS = {"unreadable-value", "wrong-magic", "fp16-on-cpu", "missing-files-download-impossible"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    make_flags, extra_env, expected = BAD_INPUTS[case]
    # --output-dir first, so a case's own --output-dir (given later) wins.
    flags = ["--output-dir", str(tmp_path / "runs" / "nested"), *make_flags(tmp_path), "--max-steps", "2"]
    if case in LAUNCHED_BAD_INPUTS:
        result = train(*flags, timeout=90, env=cpu_env(**extra_env))
    else:
        for name, value in extra_env.items():
            monkeypatch.setenv(name, value)
        code = train_module.main(flags)
        out, err = capfd.readouterr()
        result = Result(code, out, err)
    assert_one_line_error(result, *expected)
    # Refused, it leaves nothing behind: no run folder to find later and wonder about, nor the --output-dir
    # folders it made for it, nor the MNIST/raw/ a failed download made under --data-dir.
    runs = tmp_path / "runs"
    assert not runs.exists(), sorted(p.relative_to(runs) for p in runs.rglob("*"))
    assert not (tmp_path / "empty").exists()


# ---------------------------------------------------------------------------------------------------------------
# Real MNIST


@pytest.mark.slow
# 143 s alone on the 2-core AMD machine (float32) for the whole epoch; CI runs it beside another pytest worker,
# which can double that.
@pytest.mark.timeout(660)
def test_one_epoch_on_real_mnist_reaches_98_5_percent(tmp_path: Path) -> None:
    # The default command for one epoch, stopped at the first evaluation that reaches 98.5%: the claim is "within
    # one epoch", and the steps after that evaluation were about a fifth of CI's longest test. Evaluated every 250 of
    # the 1875 steps, not the recipe's 750 (an evaluation changes nothing in training: no random number, the same
    # batches), so it stops at the first of them over the line: 98.47% at step 1000, 98.61% at 1250 on the Intel CPU
    # (2026-11-30; the recipe's evaluations read 98.30% at 750 and 98.89% at 1500, where it stopped before).
    data_dir = real_mnist_dir()
    if data_dir is None:
        pytest.skip("real MNIST not found: set DIST_MNIST_DATA to a folder holding MNIST/raw/<the four IDX files>")
    run = Run(torchrun(2, "--data-dir", data_dir, "--no-download", "--epochs", "1", "--stop-at-accuracy", "0.985",
                       "--eval-every", "250", "--output-dir", str(tmp_path), "--run-name", "real", "--timeout-s",
                       "120", timeout=600), tmp_path / "real")
    assert_ok(run)
    last = run.metrics()[-1]
    assert last["test_samples"] == 10_000
    assert last["test_accuracy"] >= 0.985, last
    print(f"real MNIST, 1 epoch, 2 processes: {last}")


# --- The process's end (dist_mnist/shutdown.py): at once after a run that ended well, the usual way otherwise ---

def test_a_finished_run_ends_at_once_with_its_output_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutdown, "watched", lambda: False)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # this process keeps its handlers
    flushed: list[str] = []
    monkeypatch.setattr(sys.stdout, "flush", lambda: flushed.append("stdout"))
    monkeypatch.setattr(sys.stderr, "flush", lambda: flushed.append("stderr"))
    exits: list[int] = []
    shutdown.end_process(0, exit_now=exits.append, run_exit_functions=lambda: flushed.append("atexit"))
    assert exits == [0] and flushed == ["atexit", "stdout", "stderr"]  # last, after logging's handlers


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_in_a_finished_runs_exit_functions_is_ignored(monkeypatch: pytest.MonkeyPatch,
                                                                    name: str) -> None:
    """A scheduler's time-limit SIGTERM or a Ctrl-C as a run ends, in its exit functions: launch/train.py's handler
    (or Python's) raised there, a traceback after a successful run, the exit function cut short."""
    monkeypatch.setattr(shutdown, "watched", lambda: False)
    sig = signal.Signals[name]
    previous = {s: signal.signal(s, raise_terminated) for s in TERMINATING_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    ran: list[str] = []
    exits: list[int] = []

    def exit_functions() -> None:
        signal.raise_signal(sig)  # its Python handler runs before raise_signal returns
        ran.append("the rest")

    try:
        shutdown.end_process(0, exit_now=exits.append, run_exit_functions=exit_functions)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert ran == ["the rest"] and exits == [0]


# A process that holds a multiprocessing lock, as a DataLoader's worker queues do until the garbage collector frees
# them, and ends as a finished run does.
HELD_SEMAPHORE = """
import multiprocessing, sys
sys.path.insert(0, {repo!r})
from dist_mnist import shutdown
lock = multiprocessing.get_context("forkserver").Lock()
shutdown.end_process(0)
"""


@pytest.mark.timeout(60)
def test_a_finished_runs_fast_end_leaves_no_semaphore_to_the_resource_tracker() -> None:
    """os._exit skips the exit functions that unlink multiprocessing's semaphores; the end runs them first, so the
    resource tracker has none to warn about ("There appear to be 1 leaked semaphore objects")."""
    result = run([sys.executable, "-c", HELD_SEMAPHORE.format(repo=str(REPO))], timeout=45)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr[-3000:]


def test_a_failed_run_or_one_with_child_processes_ends_the_usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure's error path may hold open files, and DataLoader workers are stopped by the interpreter's exit.
    Either way the exit status is decided: a stop signal in the teardown is ignored, and after a run that ended
    well a Ctrl-C too (a KeyboardInterrupt traceback there, as on the fast end)."""
    monkeypatch.setattr(shutdown, "watched", lambda: False)
    ignored: list[int] = []
    # This process keeps its handlers; which ones the end ignores is recorded.
    monkeypatch.setattr(signal, "signal", lambda signum, handler: ignored.append(signum))
    exits: list[int] = []
    with pytest.raises(SystemExit) as failed:
        shutdown.end_process(1, exit_now=exits.append)
    assert failed.value.code == 1
    assert set(ignored) == set(TERMINATING_SIGNALS)
    ignored.clear()
    # forkserver, not fork: pytest's process runs threads, whose held locks a forked child would inherit (3.12 warns).
    child = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        with pytest.raises(SystemExit) as with_child:
            shutdown.end_process(0, exit_now=exits.append)
        assert with_child.value.code == 0
        assert set(ignored) == {*TERMINATING_SIGNALS, signal.SIGINT}
    finally:
        child.kill()
        child.join()
    assert exits == []


# A failed run's end: its error line written, then the interpreter's teardown, in which torchrun's SIGTERM (sent to
# every worker once one fails) lands. The atexit function stands in for the teardown's time.
SIGTERM_IN_THE_TEARDOWN = """
import atexit, os, signal, sys, time
sys.path.insert(0, {repo!r})
from dist_mnist import shutdown
from dist_mnist.errors import raise_terminated
signal.signal(signal.SIGTERM, raise_terminated)  # as launch/train.py sets it
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.3)))
print("error: the run failed", file=sys.stderr)
shutdown.end_process(1)
"""


@pytest.mark.timeout(60)
def test_a_failed_run_ends_with_its_own_exit_code_though_sigterm_comes_in_the_teardown() -> None:
    """It ended by the signal's default action (-15 in torchrun's failure summary), not with its exit code 1."""
    result = run([sys.executable, "-c", SIGTERM_IN_THE_TEARDOWN.format(repo=str(REPO))], timeout=45)
    assert (result.returncode, result.stderr) == (1, "error: the run failed\n"), result.stderr[-3000:]


def test_a_profiler_watching_the_process_is_seen() -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        assert shutdown.watched()
    finally:
        profiler.disable()


@pytest.mark.timeout(150)
def test_cprofile_around_the_launcher_still_writes_its_profile(tmp_path: Path) -> None:
    """Tools that report when the interpreter exits keep working: the launcher ends the usual way under them."""
    stats = tmp_path / "train.prof"
    result = run([sys.executable, "-m", "cProfile", "-o", str(stats), TRAIN_SCRIPT,
                  *smoke_flags(tmp_path, "profiled", "--max-steps", "2")], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pstats.Stats(str(stats)).total_calls > 0  # type: ignore[attr-defined]


def _marked(mark: str) -> list[int]:
    """The processes whose environment holds DIST_MNIST_TEST_MARK=`mark`: a spawned DataLoader worker inherits the
    environment, while its command line (multiprocessing's spawn_main) names nothing of the run."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("DIST_MNIST_TEST_MARK") == mark:
                found.append(proc.pid)
    return found


@pytest.mark.timeout(150)
def test_a_run_with_dataloader_workers_leaves_none_behind(tmp_path: Path) -> None:
    name = f"workers-{os.getpid()}-{time.monotonic_ns()}"
    env = cpu_env(DIST_MNIST_TEST_MARK=name)
    # The search finds a process so marked (it looked in command lines, where a spawned worker's holds no name).
    probe = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        assert _marked(name) == [probe.pid]
    finally:
        probe.kill()
        probe.wait()
    # One worker: what is checked is that the process leaves none, not how many it had.
    assert_ok(Run(train(*smoke_flags(tmp_path, name, "--num-workers", "1"), timeout=120, env=env), tmp_path / name))
    assert _marked(name) == []


# A fresh interpreter (the test process has long imported both): modules of torch's compiler stack the main thread
# loads while the start-up import thread still runs.
COMPILER_STACK_SPY = """
import sys, threading
sys.path.insert(0, {repo!r})
loaded = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        importing = any(thread.name == "imports" for thread in threading.enumerate())
        if importing and threading.current_thread() is threading.main_thread() and name.startswith(
                ("torch._dynamo", "torch._inductor")):
            loaded.append(name)
        return None

sys.meta_path.insert(0, Spy())
import dist_mnist.train
if {warm_up!r}:  # the CUDA start-up's kernel warm-up, which runs beside the import thread, here on the CPU
    dist_mnist.train.kernel_warmup_pays = lambda device: True
code = dist_mnist.train.main({flags!r})
print("LOADED", loaded)
sys.exit(code)
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("extra", "warm_up"), [([], False), (["--deterministic"], False), ([], True)])
def test_the_main_thread_leaves_torchs_compiler_stack_to_the_import_thread(extra: list[str], warm_up: bool,
                                                                          tmp_path: Path) -> None:
    """torch._inductor and torch._dynamo import each other: entered from both ends at once by two threads, one of
    the imports fails (under torch 2.11 --deterministic did: torch.use_deterministic_algorithms imports
    torch._inductor). While the import thread imports torch._dynamo, the main thread loads none of either."""
    flags = smoke_flags(tmp_path, "spy", "--max-steps", "2", *extra)
    script = COMPILER_STACK_SPY.format(repo=str(REPO), flags=flags, warm_up=warm_up)
    result = run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout.splitlines()


class _ReaderThatLeaves(io.StringIO):
    """Standard output piped into `head -1`: the first line gets through, then every write meets a closed pipe."""

    def write(self, text: str) -> int:
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


@pytest.mark.timeout(120)
def test_a_reader_of_stdout_that_goes_away_does_not_end_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`python launch/train.py ... | head -1` ended the run with a BrokenPipeError traceback at its next print,
    losing the steps since its last checkpoint: it now trains on, says so once on stderr and ends well."""
    stdout = _ReaderThatLeaves()
    monkeypatch.setattr(sys, "stdout", stdout)
    code = train_module.main([*SMOKE_FLAGS, "--max-steps", "12", "--log-every", "1", "--eval-every", "4",
                              "--output-dir", str(tmp_path), "--run-name", "piped"])
    assert code == 0
    assert sys.stdout is stdout  # put back
    assert stdout.getvalue().startswith("run ") and stdout.getvalue().count("\n") == 1
    assert capsys.readouterr().err.count(console.READER_GONE) == 1
    summary = json.loads((tmp_path / "piped" / "summary.json").read_text())
    assert summary["last_step"] == 12
    assert [json.loads(line)["step"] for line in (tmp_path / "piped" / "progress.jsonl").open()] == list(range(1, 13))


def test_the_analysis_tools_keep_working_silently_when_their_reader_leaves(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m dist_mnist.report RUN | head -1`: the tools wrap stdout with no note; the rest is dropped quietly."""
    kept = console.KeptStdout(_ReaderThatLeaves(), note=None)
    print("first line", file=kept)
    print("second line", file=kept, flush=True)
    assert kept.reader_gone and kept.getvalue() == "first line\n" and capsys.readouterr().err == ""
