"""Faults a cluster produces: ranks that disagree, a full disk, two jobs in one folder, a hung peer.

Each ends in one `error: ...` line on every surviving rank, exit 1, no traceback from our code, nothing lost.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch
from conftest import (
    REPO,
    SMOKE_FLAGS,
    TRAIN_SCRIPT,
    Interrupted,
    InterruptedWait,
    cpu_env,
    free_port,
    main_thread_blocked_in,
    make_mnist_dir,
    run,
    train,
)
from test_cluster import Agents, agent_command
from test_fault_tolerance import TORCHRUN, LiveRun, metrics_steps, worker_pid

import dist_mnist.checkpoint as checkpoint_module
import dist_mnist.train as train_module
from dist_mnist import agreement, collectives, report
from dist_mnist.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from dist_mnist.collectives import Rerun
from dist_mnist.config import TrainConfig
from dist_mnist.console import OPEN_LINE
from dist_mnist.data import MNIST_FILES
from dist_mnist.durable import append_whole, write_durably, write_failed
from dist_mnist.errors import Terminated, UserError
from dist_mnist.metrics import RunWriter
from dist_mnist.progress import PROGRESS_FILE, Progress
from dist_mnist.rundir import LOCK_FILE, _choose_run_dir

# Our code's frames in a traceback; torchrun's own failure report (frames in torch/distributed) is allowed.
OUR_FRAME = re.compile(r'File "[^"]*(dist_mnist/|launch/train\.py)')


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines our ranks printed (rank 0's unprefixed, the others' as `[rank N] error: ...`), as
    their messages."""
    return [m.group(1) for m in re.finditer(r"^(?:\[rank \d+\] )?error: (.*)$", stderr, re.MULTILINE)]


def seconds_until_errors(logs: Path, agents: int, started: float, limit: float) -> float:
    """Seconds from `started` until each agent's stderr file holds an error line (at most `limit`)."""
    while time.monotonic() - started < limit and not all(
            error_lines((logs / f"{index}.err").read_text()) for index in range(agents)):
        time.sleep(0.1)
    return time.monotonic() - started


def assert_no_traceback_from_us(*outputs: str) -> None:
    for output in outputs:
        assert not OUR_FRAME.search(output), output[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Ranks that disagree


def test_disagreement_names_every_differing_item_its_values_and_ranks() -> None:
    views = [{"--lr": 0.002, "--seed": 0, "--amp": "off"}, {"--lr": 0.004, "--seed": 0, "--amp": "off"},
             {"--lr": 0.002, "--seed": 1, "--amp": "off"}]
    assert agreement.disagreement(views, "fix it") == (
        "ranks disagree on --lr (0.002 on ranks 0, 2, 0.004 on rank 1) and --seed (0 on ranks 0, 1, 1 on rank 2); "
        "fix it")
    assert agreement.disagreement([views[0], views[0]], "fix it") is None


def test_recipe_view_leaves_out_per_node_settings_and_holds_the_versions() -> None:
    here, there = TrainConfig(data_dir="/node-a/data", num_workers=0), TrainConfig(data_dir="/b", num_workers=4)
    assert agreement.recipe_view(here) == agreement.recipe_view(there)
    view = agreement.recipe_view(here)
    assert view["--lr"] == 2e-3 and view["--batch-size"] == 16 and view["--train-timeout-s"] == 100.0
    assert view["the torch version"] == torch.__version__
    per_node = {f"--{name.replace('_', '-')}" for name in agreement.PER_NODE_FIELDS}
    assert not per_node & view.keys()
    # The README lists exactly these as the flags nodes may differ in.
    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("**Ranks that disagree.**"):readme.index("**A full disk.**")]
    listed = paragraph[:paragraph.index("a digest of the dist_mnist source")]
    assert set(re.findall(r"`(--[a-z-]+)`", listed)) == per_node


def test_replicas_that_diverged_are_an_error() -> None:
    agreement.check_replicas_in_sync(["ab12", "ab12"])
    with pytest.raises(UserError, match=r"^ranks disagree on the final parameters \(digest\) \('ab12' on rank 0, "
                                        r"'cd34' on rank 1\); the replicas diverged"):
        agreement.check_replicas_in_sync(["ab12", "cd34"])


@pytest.mark.scenario
@pytest.mark.timeout(120)
def test_ranks_started_with_different_flags_stop_at_once_with_one_line(tmp_path: Path) -> None:
    # Without the check, another --batch-size means a wrong global batch and a hang in the first collective that
    # no longer matches; another --lr means two different models and exit 0.
    differing = {"--batch-size": ("16", "32"), "--lr": ("0.002", "0.004")}
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv_id = f"disagree-{uuid.uuid4().hex[:8]}"
    # --timeout-s 60: an error from a hang would come only after a minute; the check answers in seconds.
    flags = [*SMOKE_FLAGS, "--epochs", "1", "--timeout-s", "60", "--output-dir", str(tmp_path / "out"),
             "--run-name", "disagree"]
    started = time.monotonic()
    with Agents(tmp_path / "logs", timeout=100) as agents:
        for node in (0, 1):
            own = [arg for flag, values in differing.items() for arg in (flag, values[node])]
            agents.start(agent_command(endpoint, *flags, *own, rdzv_id=rdzv_id), cpu_env())
        elapsed = seconds_until_errors(tmp_path / "logs", 2, started, limit=90)
        results = agents.results()
    print(f"\ndisagreement: both error lines {elapsed:.1f} s after the agents started, the agents ended "
          f"{time.monotonic() - started:.1f} s after it")
    messages = [error_lines(r.stderr) for r in results]
    assert all(len(m) == 1 for m in messages), agents.tails()
    assert messages[0] == messages[1], "the ranks reported different errors"
    # Which agent's worker became rank 0 is the rendezvous's choice.
    expected = [" and ".join(f"{flag} ({values[first]} on rank 0, {values[1 - first]} on rank 1)"
                             for flag, values in differing.items()) for first in (0, 1)]
    assert messages[0][0] in [f"ranks disagree on {e}; start every node with the same flags and the same "
                              "dist_mnist and torch" for e in expected], messages[0][0]
    assert all(r.returncode != 0 for r in results)
    assert_no_traceback_from_us(*(r.stderr for r in results))
    assert not list((tmp_path / "out").glob("*/metrics.jsonl")), "a rank trained"


@pytest.mark.scenario
def test_a_node_without_the_mnist_files_stops_every_rank_at_once_with_one_line(tmp_path: Path) -> None:
    """Node-local --data-dir folders, the files on rank 0's node only, downloads allowed: rank 1 waited in the
    download's broadcast, rank 0 in its next collective, and both ended after --timeout-s naming a timed-out
    collective. The ranks are started by hand (as torchrun would, RANK and the address set) so which node holds rank
    0 is fixed: with a download allowed on a rank 0 without files, the test would reach for the internet."""
    node_data = {0: make_mnist_dir(tmp_path / "node0"), 1: tmp_path / "node1"}
    port = str(free_port())
    flags = ["--batch-size", "16", "--eval-batch-size", "50", "--no-tensorboard", "--epochs", "1",
             "--timeout-s", "60", "--output-dir", str(tmp_path / "out"), "--run-name", "one-node-lacks-data"]
    started = time.monotonic()
    with Agents(tmp_path / "logs", timeout=100) as ranks:
        for rank, data_dir in node_data.items():
            ranks.start([sys.executable, TRAIN_SCRIPT, *flags, "--data-dir", str(data_dir)],
                        cpu_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_PORT=port))
        elapsed = seconds_until_errors(tmp_path / "logs", 2, started, limit=90)
        results = ranks.results()
    print(f"\nmissing files: both error lines {elapsed:.1f} s after the ranks started (--timeout-s 60)")
    assert [r.returncode for r in results] == [1, 1], ranks.tails()
    raw = node_data[1] / "MNIST" / "raw"
    assert results[0].stderr.splitlines() == [
        f"error: MNIST files missing in {raw} on rank 1 (the error line of each rank named lists the files); point "
        "--data-dir at a folder every node sees, or copy MNIST/raw/ to every node"]
    assert results[1].stderr.splitlines() == [
        f"[rank 1] error: MNIST files missing in {raw}: {', '.join(MNIST_FILES)}; point --data-dir or "
        f"DIST_MNIST_DATA at the folder holding MNIST/raw/, or copy them there: only global rank 0 downloads, into "
        f"its own --data-dir ({node_data[0] / 'MNIST' / 'raw'})"]
    assert not raw.exists() and not list((tmp_path / "out").glob("*/metrics.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# A full disk

def hook_folder(tmp_path: Path, code: str) -> Path:
    """A folder holding `code` as sitecustomize.py, which Python runs at start-up when the folder is on PYTHONPATH:
    a test-only hook into the processes a test starts (the package carries nothing)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(code)
    return hook


# Makes this process's fsync of a file whose name holds $DIST_MNIST_TEST_ENOSPC fail as a full disk does (on NFS
# and with delayed allocation, fsync is where ENOSPC shows up). A test-only hook: the package carries nothing.
ENOSPC_HOOK = """
import errno, os
_target, _fsync = os.environ.get("DIST_MNIST_TEST_ENOSPC"), os.fsync
def _fsync_or_full(fd):
    if _target and _target in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)
os.fsync = _fsync_or_full
"""


@pytest.mark.scenario
@pytest.mark.timeout(180)
def test_full_disk_at_a_checkpoint_ends_every_rank_with_one_line(tmp_path: Path) -> None:
    hook = hook_folder(tmp_path, ENOSPC_HOOK)
    env = cpu_env(PYTHONPATH=f"{hook}{os.pathsep}{REPO}", DIST_MNIST_TEST_ENOSPC="step00000008.pt")
    out = tmp_path / "out"
    started = time.monotonic()
    result = run([*TORCHRUN, TRAIN_SCRIPT, *SMOKE_FLAGS, "--epochs", "1", "--checkpoint-every", "4",
                  "--timeout-s", "60", "--output-dir", str(out), "--run-name", "full"], env=env, timeout=150)
    print(f"\nfull disk: the job ended {time.monotonic() - started:.1f} s after start")
    checkpoints = out / "full" / "checkpoints"
    first = checkpoint_path(checkpoints, 4)
    messages = error_lines(result.stderr)
    assert len(messages) == 2 and messages[0] == messages[1], result.stderr[-3000:]  # rank 0 and rank 1
    size = re.fullmatch(rf"could not write step00000008\.pt to {re.escape(str(checkpoints))}: No space left on "
                        r"device \(it needed ([\d,]+) bytes there\); the files written before are intact\. Free "
                        "space there, then rerun the same command to resume from the last checkpoint; a run that "
                        "wrote none yet starts again under a new --run-name", messages[0])
    assert size, messages[0]
    assert int(size.group(1).replace(",", "")) > first.stat().st_size // 2  # the checkpoint's size, not a guess
    assert result.returncode != 0
    assert_no_traceback_from_us(result.stderr, result.stdout)
    # The temp file is gone, the earlier checkpoint is intact and loads.
    assert sorted(p.name for p in checkpoints.iterdir() if p.name != LOCK_FILE) == [first.name]
    assert load_checkpoint(first)["train_state"]["step"] == 4


def test_a_checkpoint_write_that_fails_while_the_run_fails_is_a_warning_on_a_line_of_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run failing while rank 0 writes a checkpoint lets the write finish; a write that failed too is a warning
    before the run's error line. Both go to the screen rank 0's progress line is open on, so the warning ends that
    line first, as the error line does, whoever calls it."""
    full = write_failed(tmp_path / "step00000008.pt", 1024, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def wait() -> None:
        raise full

    trainer = train_module.Trainer.__new__(train_module.Trainer)  # only what the settling reads
    step_4 = checkpoint_module.WrittenCheckpoint(tmp_path / "step00000004.pt", 10, 0.1)
    vars(trainer).update(ctx=SimpleNamespace(rank=0), confirmed_checkpoint=step_4,
                         last_checkpoint=checkpoint_module.WrittenCheckpoint(tmp_path / "step00000008.pt", 1024),
                         checkpoints=SimpleNamespace(wait=wait))
    progress = io.StringIO()
    progress.write("\repoch 1  45%")
    OPEN_LINE.open(progress)
    trainer.settle_checkpoint_after_failure()
    assert progress.getvalue() == "\repoch 1  45%\n"
    assert capsys.readouterr().err == f"warning: {full}\n"
    assert trainer.last_checkpoint == step_4  # the one before, which is whole


def test_a_peer_lost_while_rank_0_writes_a_checkpoint_is_answered_naming_that_checkpoint(tmp_path: Path) -> None:
    """Rank 0 submits step 40's write, then the save's broadcast fails (a peer was killed): the line names step 40,
    whose write it lets finish, as the other ranks' lines do, not step 30 from before the save."""
    trainer = train_module.Trainer.__new__(train_module.Trainer)  # only what the failure line reads
    step_30, step_40 = tmp_path / "step00000030.pt", tmp_path / "step00000040.pt"
    in_flight = [checkpoint_module.WrittenCheckpoint(step_40, 10, 0.1)]
    vars(trainer).update(ctx=SimpleNamespace(rank=0), state=SimpleNamespace(step=40), name_to_add=None,
                         cfg=SimpleNamespace(resume="auto"),
                         timeout=collectives.CollectiveTimeout(100, 100), resumed_from=None,
                         last_checkpoint=checkpoint_module.WrittenCheckpoint(step_30, 10, 0.1),
                         checkpoints=SimpleNamespace(wait=lambda: in_flight.pop() if in_flight else None))
    with pytest.raises(UserError) as failure, trainer.phase("the checkpoint"):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:5")
    assert f"; the last checkpoint is {step_40}. " in str(failure.value)
    assert trainer.newest_checkpoint() == step_40


# ---------------------------------------------------------------------------------------------------------------
# Two jobs in one run folder


def test_second_job_in_a_held_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    cfg = TrainConfig(output_dir=str(tmp_path), run_name="run")
    held = _choose_run_dir(cfg)
    assert (held.path / LOCK_FILE).read_text().startswith(f"PID {os.getpid()} on host {socket.gethostname()} ")
    # flock locks belong to an open file, so a second open in this process is refused as another job's would be.
    time.sleep(0.01)  # past the filesystem's timestamp granularity: a file made and removed would show
    before = held.path.stat().st_mtime_ns, sorted(p.name for p in held.path.iterdir())
    with pytest.raises(UserError, match=rf"^run folder {re.escape(str(held.path))} is in use by PID {os.getpid()} "
                                        rf"on host {re.escape(socket.gethostname())}"):
        _choose_run_dir(cfg)
    # The refused job touched nothing in the folder, not even a write probe made and removed again.
    assert (held.path.stat().st_mtime_ns, sorted(p.name for p in held.path.iterdir())) == before
    assert list(held.locks) == [held.path, held.path / "checkpoints"]
    held.release()  # closes the descriptor: what the kernel does when the holder dies, however it dies
    again = _choose_run_dir(cfg)
    assert list(again.locks) == [again.path, again.path / "checkpoints"]
    again.release()


def test_run_files_nested_past_the_recursion_limit_are_damaged_records_not_tracebacks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """progress.jsonl read on a resume, summary.json read by the rerun of a complete run: a RecursionError was
    uncaught in both."""
    flags = [*SMOKE_FLAGS, "--log-every", "2", "--output-dir", str(tmp_path), "--run-name", "deep"]
    assert train_module.main([*flags, "--max-steps", "4"]) == 0
    deep = "[" * 200_000 + "]" * 200_000
    with open(tmp_path / "deep" / "progress.jsonl", "a") as f:
        f.write(deep + "\n")
    capsys.readouterr()
    assert train_module.main([*flags, "--max-steps", "6"]) == 0
    assert "progress.jsonl line 3 is damaged and was dropped" in capsys.readouterr().err
    (tmp_path / "deep" / "summary.json").write_text(deep)
    assert train_module.main([*flags, "--max-steps", "6"]) == 0
    assert "is already complete at step 6" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_a_complete_runs_summary_does_not_block_its_rerun(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rerun of a complete run reads its summary.json for the "already complete" line: a FIFO there (planted, or
    left by a tool) blocked the launch for ever, as it did `python -m dist_mnist.report` before runfiles refused it."""
    flags = [*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--run-name", "done", "--max-steps", "4"]
    assert train_module.main(flags) == 0
    (tmp_path / "done" / "summary.json").unlink()
    os.mkfifo(tmp_path / "done" / "summary.json")
    capsys.readouterr()
    assert train_module.main(flags) == 0
    assert "is already complete at step 4" in capsys.readouterr().out


def test_a_lock_holder_line_with_control_characters_stays_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The refusal quotes the lock file's holder line, which anyone who can write the folder can craft: a newline and
    an escape sequence there printed a forged second `error:` line and recoloured the terminal."""
    run = tmp_path / "held"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"PID 1\nerror: FAKE all is well\x1b[31m")
        assert train_module.main([*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--run-name", "held"]) == 1
    finally:
        os.close(fd)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: run folder {run} is in use by PID 1\\nerror: FAKE all is well\\x1b[31m: ")


def test_a_checkpoint_dir_naming_a_running_jobs_own_checkpoints_is_refused(tmp_path: Path) -> None:
    """Only the run folder was held: a second job given `--checkpoint-dir RUN/checkpoints` of a running job
    resumed from its checkpoints, and both trained on, writing and rotating away each other's files there."""
    held = _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="run1"))
    own = held.path / "checkpoints"
    second = TrainConfig(output_dir=str(tmp_path), run_name="run2", checkpoint_dir=str(own))
    with pytest.raises(UserError, match=rf"^checkpoint folder {re.escape(str(own))} is in use by PID {os.getpid()} "
                                        r"on host .*pick another --checkpoint-dir \(nothing was changed\)$"):
        _choose_run_dir(second)
    assert not (tmp_path / "run2").exists()  # the refused job left no folder of its own behind
    held.release(remove_unused=True)
    assert not held.path.exists()  # a run folder holding only its locks is taken away, its checkpoints/ with it


def test_a_full_disk_at_the_run_folders_start_is_one_line_and_leaves_no_marker_that_breaks_the_next_launch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock's holder line and torchrun's run-id marker are the first bytes a run writes: a full disk there is
    the usual one-line error, and the marker is whole or absent (an empty one named --output-dir as the run folder,
    so every later launch was refused)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    real_replace = os.replace

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    cfg = TrainConfig(output_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"^could not write job-7 to .*\.torchelastic: No space left on device"):
        _choose_run_dir(cfg)
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []  # no marker, not an empty one, nor the .torchelastic/ made for it
    (tmp_path / ".torchelastic").mkdir()
    (tmp_path / ".torchelastic" / "job-7").write_text("")  # what the old code left behind
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(UserError, match=r"^could not write \.lock to .*: No space left on device"):
        _choose_run_dir(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    held = _choose_run_dir(cfg)  # an empty marker counts as none: a run folder of its own, not --output-dir
    assert held.path.parent == tmp_path and (tmp_path / ".torchelastic" / "job-7").read_text() == held.path.name
    held.release()


def test_runs_started_in_the_same_second_without_a_run_name_get_a_folder_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep launching runs side by side: the default name is the second the run started, and the second run of
    a second was refused as "in use". Each now claims a folder of its own; a torchrun restart still finds its
    first attempt's folder through the marker, and a failed start takes its claimed folder away again."""
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-120000")
    cfg = TrainConfig(output_dir=str(tmp_path))
    first, second = _choose_run_dir(cfg), _choose_run_dir(cfg)
    assert (first.path.name, second.path.name) == ("20260101-120000", "20260101-120000-2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    third = _choose_run_dir(cfg)
    assert third.path.name == "20260101-120000-3"
    third.release()
    restarted = _choose_run_dir(cfg)
    assert restarted.path == third.path
    for held in (first, second, restarted):
        held.release()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    failed = _choose_run_dir(cfg)
    assert failed.path.name == "20260101-120000-4"
    failed.release(remove_unused=True)
    assert not failed.path.exists()


def test_a_checkpoint_dir_outside_the_run_folder_is_held_and_never_written_over(tmp_path: Path) -> None:
    """Two runs given one --checkpoint-dir would overwrite and rotate away each other's checkpoints: while one
    runs the other is refused, and a fresh start (--resume never) is refused where checkpoints are already."""
    shared = tmp_path / "shared_checkpoints"
    first = TrainConfig(output_dir=str(tmp_path), run_name="a", checkpoint_dir=str(shared))
    held = _choose_run_dir(first)
    assert set(held.locks) == {held.path, shared}
    second = TrainConfig(output_dir=str(tmp_path), run_name="b", checkpoint_dir=str(shared))
    with pytest.raises(UserError, match=rf"^checkpoint folder {re.escape(str(shared))} is in use by PID "
                                        rf"{os.getpid()} on host .*pick another --checkpoint-dir \(nothing was "
                                        r"changed\)$"):
        _choose_run_dir(second)
    held.release()
    (shared / "step00000010.pt").write_bytes(b"a's checkpoint")
    with pytest.raises(UserError, match=rf"^--checkpoint-dir {re.escape(str(shared))} already holds checkpoints "
                                        r"\(the newest step00000010.pt\) and --resume never would write over them"):
        _choose_run_dir(dataclasses.replace(second, resume="never", run_name="c"))
    again = _choose_run_dir(second)  # auto: continues from them (checkpoint.check_compatible judges the file)
    again.release()
    assert (shared / "step00000010.pt").read_bytes() == b"a's checkpoint"


def test_a_checkpoint_write_cut_short_by_a_dead_process_is_removed_by_the_next_holder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGKILL mid-write left .step00000020.pt.tmp (2 MiB of 14) for good: never renamed, read or rotated."""
    flags = [*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--run-name", "killed"]
    assert train_module.main([*flags, "--max-steps", "4"]) == 0
    checkpoints = tmp_path / "killed" / "checkpoints"
    (checkpoints / ".step00000006.pt.tmp").write_bytes(b"\0" * 2**20)
    (checkpoints / ".notes.tmp").write_text("not ours")
    capsys.readouterr()
    assert train_module.main([*flags, "--max-steps", "6"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"note: removed .step00000006.pt.tmp (1.0 MiB) from {checkpoints}: a partial write of step00000006.pt left "
        "by a process that died while writing it"]
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", ".notes.tmp", "step00000004.pt",
                                                            "step00000006.pt"]


def test_a_run_killed_during_its_first_write_is_refused_naming_the_partial_write_it_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second SIGTERM during the first checkpoint's write kills the process as designed, leaving only the temp
    file; the rerun's refusal ("holds no checkpoint to resume") came before the cleanup of such files and said
    nothing of it, so it stayed for good."""
    checkpoints = tmp_path / "killed" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "killed" / "config.json").write_text("{}")
    (checkpoints / ".step00000003.pt.tmp").write_bytes(b"\0" * 2**20)
    assert train_module.main([*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--run-name", "killed"]) == 1
    assert capsys.readouterr().err == (
        f"error: run folder {tmp_path / 'killed'} already exists and holds no checkpoint to resume; pick another "
        f"--run-name (nothing was overwritten); its checkpoints folder {checkpoints} holds only .step00000003.pt.tmp "
        "(1.0 MiB), a partial write of step00000003.pt left by a process that died while writing it, which nothing "
        "resumes from: remove the run folder to use this name again\n")
    assert (checkpoints / ".step00000003.pt.tmp").stat().st_size == 2**20


def test_a_complete_runs_checkpoint_resumed_into_a_new_folder_says_whose_it_is_and_leaves_no_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "run NEW is already complete ...; nothing to do (it has no summary.json: the process that finished
    it ...)": NEW was taken away at once, and the run that wrote the checkpoint had its summary."""
    flags = [*SMOKE_FLAGS, "--max-steps", "4", "--output-dir", str(tmp_path)]
    assert train_module.main([*flags, "--run-name", "a"]) == 0
    last = tmp_path / "a" / "checkpoints" / "step00000004.pt"
    capsys.readouterr()
    assert train_module.main([*flags, "--run-name", "b", "--resume", str(last)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"checkpoint {last} is of a run already complete at step 4 (--max-steps 4 reached), whose own run folder "
        "holds its files; nothing to do; a higher --max-steps trains on from it")
    assert not (tmp_path / "b").exists()


def test_a_run_found_complete_in_another_runs_checkpoint_dir_says_whose_and_leaves_no_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "run .../b is already complete ...; nothing to do (it has no summary.json: the process that finished
    it was stopped before writing one ...)", none of it true of run a, which had finished and written its summary,
    and left b's folder holding only its lock file."""
    flags = [*SMOKE_FLAGS, "--max-steps", "4", "--output-dir", str(tmp_path), "--checkpoint-dir",
             str(tmp_path / "shared")]
    assert train_module.main([*flags, "--run-name", "a"]) == 0
    capsys.readouterr()
    assert train_module.main([*flags, "--run-name", "b"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"the checkpoints in --checkpoint-dir {tmp_path / 'shared'} are of a run already complete at step 4 "
        "(--max-steps 4 reached), whose own run folder holds its files; nothing to do (a new run needs another "
        "--checkpoint-dir)")
    assert not (tmp_path / "b").exists() and (tmp_path / "a" / "summary.json").is_file()


def test_a_name_too_long_is_one_line_naming_the_flag_and_leaves_nothing(tmp_path: Path) -> None:
    """A name over the filesystem's limit was a traceback (Path.exists, Path.resolve and the clean-up's rglob raise
    ENAMETOOLONG) that left the run folder with its lock, the --output-dir and the checkpoint folder's parent."""
    long = "y" * 300
    cases = [(TrainConfig(output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ck" / long)),
              rf"^cannot write to the checkpoint folder {re.escape(str(tmp_path / 'ck' / long))}: File name too "
              r"long; pick a shorter --checkpoint-dir$"),
             (TrainConfig(output_dir=str(tmp_path / "out"), run_name=long),
              rf"^cannot write to the run folder {re.escape(str(tmp_path / 'out' / long))}: File name too long; "
              r"pick a shorter --run-name$"),
             (TrainConfig(output_dir=str(tmp_path / long)),
              rf"^cannot write to --output-dir {re.escape(str(tmp_path / long))}: File name too long$")]
    for cfg, message in cases:
        with pytest.raises(UserError, match=message):
            _choose_run_dir(cfg)
        assert list(tmp_path.iterdir()) == []


def test_a_failed_start_under_torchrun_takes_away_the_run_id_marker_it_wrote_and_a_restart_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run folder of a failed start went, but the marker naming it stayed, with the .torchelastic/ and the
    --output-dir made for it. A restart of a job whose first attempt made the folder still finds it by the marker,
    whatever that restart does."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-9")
    cfg = TrainConfig(output_dir=str(tmp_path / "out"))
    failed = _choose_run_dir(cfg)
    assert (tmp_path / "out" / ".torchelastic" / "job-9").read_text() == failed.path.name
    failed.release(remove_unused=True)  # what open_run_dir does after a start that failed before its first file
    assert list(tmp_path.iterdir()) == []
    first = _choose_run_dir(cfg)
    first.release()  # its process killed: no clean-up
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = _choose_run_dir(cfg)
    assert restarted.path == first.path
    restarted.release(remove_unused=True)  # the restart failed before its first file too
    assert (tmp_path / "out" / ".torchelastic" / "job-9").read_text() == first.path.name
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    again = _choose_run_dir(cfg)
    assert again.path == first.path
    again.release()


@pytest.mark.parametrize("run_id", [".", "..", "job/7", "r" * 300])
def test_a_torchrun_run_id_that_is_no_file_name_gets_a_marker_all_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_id: str) -> None:
    """torchrun's --rdzv-id takes any string: `..` or `.` was `could not write .. to .../.torchelastic: Device or
    resource busy` (a marker over the folder itself), one holding `/` or too long another such line, each leaving
    .torchelastic/ behind."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    cfg = TrainConfig(output_dir=str(tmp_path / "out"))
    held = _choose_run_dir(cfg)
    [marker] = (tmp_path / "out" / ".torchelastic").iterdir()
    assert marker.read_text() == held.path.name
    held.release()
    restarted = _choose_run_dir(cfg)  # a torchrun restart finds the same folder
    assert restarted.path == held.path
    restarted.release()
    failed = _choose_run_dir(dataclasses.replace(cfg, output_dir=str(tmp_path / "failed")))
    failed.release(remove_unused=True)  # a start that failed before its first file leaves nothing
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]


@pytest.mark.parametrize(("content", "why"), [
    ("/elsewhere/run", "names '/elsewhere/run', which is no folder name inside --output-dir"),
    ("../../escaped", "names '../../escaped', which is no folder name inside --output-dir"),
    ("..", "names '..', which is no folder name inside --output-dir"),
    (b"\xff\xfe", "cannot read torchrun's run id marker"),
])
def test_a_run_id_marker_naming_anything_but_a_folder_inside_output_dir_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | bytes, why: str) -> None:
    """The marker's content became the run folder as it was: an absolute path or `../..` put the run, its
    checkpoint rotation and its overwrites (a user's config.json, on a restart) outside --output-dir."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job6")
    marker = tmp_path / "out" / ".torchelastic" / "job6"
    marker.parent.mkdir(parents=True)
    marker.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=re.escape(why) + r".*; remove it to start the run afresh$"):
        _choose_run_dir(TrainConfig(output_dir=str(tmp_path / "out")))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/.torchelastic", "out/.torchelastic/job6"]


def test_symlinks_planted_in_a_run_folder_are_never_written_through(tmp_path: Path) -> None:
    """Anyone who can write to a shared --output-dir could plant `.lock`, a temp name (`.summary.json.tmp`) or the
    write probe's `.write-probe-<pid>` as a symlink to a file of the user's: each write went into that file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own")
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / ".summary.json.tmp").symlink_to(victim)
    write_durably(run / "summary.json", b"{}")
    assert (run / "summary.json").read_bytes() == b"{}" and not (run / ".summary.json.tmp").exists()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match=r"^could not write metrics\.jsonl to .*: Too many levels of symbolic links"):
        append_whole(run / "metrics.jsonl", b"{}\n")
    (run / "metrics.jsonl").unlink()
    (run / ".lock").symlink_to(victim)
    (tmp_path / "out" / f".write-probe-{os.getpid()}").symlink_to(victim)  # in --output-dir, which is probed
    with pytest.raises(UserError, match=r"^cannot write to the run folder .*: Too many levels of symbolic links"):
        _choose_run_dir(TrainConfig(output_dir=str(tmp_path / "out"), run_name="run"))
    _choose_run_dir(TrainConfig(output_dir=str(tmp_path / "out"), run_name="other")).release()
    assert victim.read_text() == "the user's own"


def test_a_refused_start_leaves_an_existing_folder_as_it_found_it(tmp_path: Path) -> None:
    """It left a `.lock` of its own in a user's folder it refused to use; a start that failed in an existing empty
    folder leaves it empty too. Another job's lock file stays where it is."""
    user_dir = tmp_path / "userdir"
    user_dir.mkdir()
    (user_dir / "data.csv").write_text("x")
    with pytest.raises(UserError, match=r"already exists and holds no checkpoint to resume"):
        _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="userdir"))
    assert list(user_dir.rglob("*")) == [user_dir / "data.csv"]
    (tmp_path / "empty").mkdir()
    held = _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="empty"))
    held.release(remove_unused=True)  # failed before its first file
    assert list((tmp_path / "empty").iterdir()) == []
    running = _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="running"))
    with pytest.raises(UserError, match=r"is in use by"):
        _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="other", checkpoint_dir=str(running.path)))
    assert (running.path / LOCK_FILE).is_file() and not (tmp_path / "other").exists()
    running.release()


@pytest.mark.scenario
@pytest.mark.timeout(240)
def test_second_launch_into_a_running_jobs_folder_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    flags = [*SMOKE_FLAGS, "--epochs", "1000", "--checkpoint-every", "4", "--eval-every", "4", "--log-every", "1",
             "--output-dir", str(tmp_path), "--run-name", "shared"]
    run_dir = tmp_path / "shared"
    first = LiveRun([sys.executable, TRAIN_SCRIPT, *flags])
    try:
        first.wait_until(lambda: bool(list_checkpoints(run_dir / "checkpoints")), "the first checkpoint")
        metrics_before = (run_dir / "metrics.jsonl").read_text()
        started = time.monotonic()
        second = train(*flags, timeout=120)
        print(f"\nrun lock: the second launch was refused {time.monotonic() - started:.1f} s after start")
        assert second.returncode == 1
        assert second.stderr.strip() == (
            f"error: run folder {run_dir} is in use by PID {first.proc.pid} on host {socket.gethostname()} since "
            f"{(run_dir / LOCK_FILE).read_text().split(' since ')[1]}: another job is training there. Wait for it "
            "to end or stop it, or pick another --run-name (nothing was changed)")
        assert second.stdout == ""
    finally:
        if first.proc.poll() is None:
            first.proc.send_signal(signal.SIGTERM)  # stops at a step boundary with a checkpoint
    done = first.result(timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # The first job's records only: what it had written, then its own later evaluations, each step once.
    assert (run_dir / "metrics.jsonl").read_text().startswith(metrics_before)
    steps = metrics_steps(run_dir)
    assert steps == list(range(4, steps[-1] + 1, 4))


# ---------------------------------------------------------------------------------------------------------------
# A hung peer


def test_collective_failure_inside_a_phase_becomes_one_line(tmp_path: Path) -> None:
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                        "5000ms for recv operation to complete")
    with pytest.raises(UserError) as failure, collectives.phase("evaluation", 12, 5, tmp_path / "step00000008.pt"):
        raise gloo
    assert str(failure.value) == (
        "a collective in evaluation failed after step 12: a peer did not answer within the 5 s timeout or left the "
        "job (Timed out waiting 5000ms for recv operation to complete); the last checkpoint is "
        f"{tmp_path / 'step00000008.pt'}. Look for the stuck or lost rank in the other nodes' output, then rerun "
        "the same command to resume")
    # What gloo raises in the collectives after the one that timed out closed the connection: no source path.
    with pytest.raises(UserError, match=r"^a collective in the stop vote failed after step 3: .*\(Application timeout "
                                        r"caused pair closure\); the run has no checkpoint yet\."):
        with collectives.phase("the stop vote", 3, 100, None):
            raise RuntimeError("Application timeout caused pair closure")
    # main's start-up phase cannot know whether the run has a checkpoint (a restart or a resume may): both ways.
    with pytest.raises(UserError, match=r"^a collective in start-up failed before the first step: a peer did not "
                                        r"answer within the 300 s timeout or left the job \(Connection closed by "
                                        r"peer \[127.0.0.1\]:5\); the run's checkpoints, if it has any, are in its "
                                        r"checkpoints folder\. .* then rerun the same command to resume from the "
                                        r"newest if there is one; a run without any starts again under a new "
                                        r"--run-name \(a run folder without a checkpoint is not reused\)$"):
        with collectives.phase("start-up", None, 300, None, checkpoint_known=False):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                               "[127.0.0.1]:5")
    with pytest.raises(RuntimeError, match="shape mismatch"), collectives.phase("evaluation", 1, 5, None):
        raise RuntimeError("shape mismatch")  # a bug is not a lost peer: it keeps its traceback


def test_the_advice_under_torchrun_with_restarts_left_is_the_restart(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun restarts the workers by itself while --max-restarts allows: "rerun the same command" was wrong there
    (the restarted workers were already resuming). Only the last attempt's failure leaves the rerun to the user."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the job's second attempt: restart 2 of 3 comes next
    last = tmp_path / "step00000008.pt"
    look = "; if this repeats, look for the stuck or lost rank in the other nodes' output"
    for checkpoint, known, kept, then in [
            (last, True, f"the last checkpoint is {last}", "resume from it"),
            (None, True, "the run has no checkpoint yet", "start again from step 0"),
            (None, False, "the run's checkpoints, if it has any, are in its checkpoints folder",
             "resume from the newest if there is one, else start again from step 0")]:
        with pytest.raises(UserError) as failure, collectives.phase("the stop vote", 9, 100, checkpoint,
                                                                     Rerun("20261128-010203"), checkpoint_known=known):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:5")
        assert str(failure.value).endswith(
            f"(Connection closed by peer [127.0.0.1]:5); {kept}. torchrun restarts the workers (restart 2 of 3) and "
            f"they {then}{look}")
    lost_worker = collectives.lost_data_worker_error("DataLoader worker (pid 7) is killed by signal: Killed", 9, last,
                                                     Rerun())
    assert str(lost_worker).endswith(f"the last checkpoint is {last}. torchrun restarts the workers (restart 2 of 3) "
                                     "and they resume from it (with the same --num-workers)")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")  # the last attempt: nothing restarts it
    with pytest.raises(UserError) as failure, collectives.phase("the stop vote", 9, 100, last,
                                                                 Rerun("20261128-010203")):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:5")
    assert str(failure.value).endswith(f"the last checkpoint is {last}. Look for the stuck or lost rank in the other "
                                       "nodes' output, then rerun the same command with --run-name 20261128-010203 "
                                       "to resume")


def test_a_full_disk_while_the_job_stops_on_a_signal_is_advised_a_rerun_not_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun, signalled with its workers, shuts them down rather than restart them: a stop checkpoint that found
    the disk full said "torchrun restarts the workers (restart 1 of 3) ...", and torchrun exited."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(train_module.Trainer, "log_progress", lambda self: os.kill(os.getpid(), signal.SIGTERM))

    def full(data: bytes, folder: Path, step: int, keep: int) -> Path:
        raise write_failed(checkpoint_path(folder, step), len(data), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", full)
    flags = [*SMOKE_FLAGS, "--max-steps", "20", "--log-every", "3", "--checkpoint-every", "0", "--output-dir",
             str(tmp_path), "--run-name", "full"]
    assert train_module.main(flags) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: could not write step00000003.pt to {tmp_path / 'full' / 'checkpoints'}: ")
    assert line.endswith("Free space there, then rerun the same command to resume from the last checkpoint; a run "
                         "that wrote none yet starts again under a new --run-name")
    # A failure while no stop was agreed: torchrun's restart is what follows.
    monkeypatch.setattr(train_module.Trainer, "log_progress", lambda self: None)
    assert train_module.main([*flags[:-1], "unstopped", "--checkpoint-every", "3"]) == 1
    assert "; torchrun restarts the workers (restart 1 of 3) from the last checkpoint" in capsys.readouterr().err


def test_a_failed_background_write_stops_the_run_within_a_step_not_at_the_next_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With --checkpoint-every 0 (the cuda recipe's) the error of epoch 1's failed write came at epoch 2's end: a
    whole epoch trained and evaluated on top of a checkpoint that did not exist, and epoch 2's save not tried."""
    submit = checkpoint_module.BackgroundWriter.submit

    def submit_and_let_it_end(self: Any, *args: Any) -> Any:
        submitted = submit(self, *args)
        self._finished.wait()  # the failure is there to see from the next step on, whatever the threads' timing
        return submitted

    def full(data: bytes, folder: Path, step: int, keep: int) -> Path:
        raise write_failed(checkpoint_path(folder, step), len(data), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(checkpoint_module.BackgroundWriter, "submit", submit_and_let_it_end)
    monkeypatch.setattr(checkpoint_module, "write_checkpoint", full)
    assert train_module.main([*SMOKE_FLAGS, "--epochs", "3", "--checkpoint-every", "0", "--output-dir", str(tmp_path),
                              "--run-name", "full"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: could not write step00000032.pt to {tmp_path / 'full' / 'checkpoints'}: No space "
                           "left on device")
    assert metrics_steps(tmp_path / "full") == [32]  # epoch 1's evaluation; none of epoch 2
    assert max(json.loads(r)["step"] for r in (tmp_path / "full" / "progress.jsonl").read_text().splitlines()) <= 33


def test_a_full_disk_at_the_summary_of_a_complete_run_says_the_training_is_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The last checkpoint written, summary.json found the disk full: the line said "Free space there, then rerun
    the same command to resume from the last checkpoint", and there was nothing to resume."""
    real = RunWriter.write_json

    def full(self: RunWriter, name: str, obj: object) -> None:
        if name == "summary.json":
            raise write_failed(self.run_dir / name, 2000, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real(self, name, obj)

    monkeypatch.setattr(RunWriter, "write_json", full)
    flags = [*SMOKE_FLAGS, "--max-steps", "4", "--output-dir", str(tmp_path), "--run-name", "done"]
    assert train_module.main(flags) == 1
    last = tmp_path / "done" / "checkpoints" / "step00000004.pt"
    assert capsys.readouterr().err == (
        f"error: could not write summary.json to {tmp_path / 'done'}: No space left on device (it needed 2,000 bytes "
        f"there); the training is complete (--max-steps 4 reached) and its last checkpoint is {last}: only "
        "summary.json is missing, whose step times ended with this process (metrics.jsonl holds the run's "
        "evaluations); nothing is left to resume\n")
    monkeypatch.undo()
    assert train_module.main(flags) == 0
    assert "(it was stopped, or could not write it)" in capsys.readouterr().out.splitlines()[-1]


def test_a_peer_lost_after_a_complete_run_is_not_advised_a_resume(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last step and its checkpoint there is nothing to resume: the line says what the run has and that a
    rerun (or torchrun's restart) finds it complete, not "rerun the same command to resume"."""
    last = tmp_path / "step00000032.pt"
    done = "the training is complete (its 2 epochs done) and its summary done"
    with pytest.raises(UserError) as failure, collectives.phase("the final summary", 32, 100, last, done=done):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:5")
    assert str(failure.value) == (
        "a collective in the final summary failed after step 32: a peer did not answer within the 100 s timeout or "
        f"left the job (Connection closed by peer [127.0.0.1]:5); {done}; its last checkpoint is {last}. Look for "
        "the stuck or lost rank in the other nodes' output; the same command finds the run complete and trains no "
        "more")
    # A run named by its launch (--standalone): the same command alone would start a new run under a new name.
    with pytest.raises(UserError) as failure, collectives.phase("the final summary", 32, 100, last,
                                                                 Rerun("20261129-101010"),
                                                                 done=done):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:5")
    assert str(failure.value).endswith("the same command with --run-name 20261129-101010 finds the run complete and "
                                       "trains no more")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(UserError) as failure, collectives.phase("the final summary", 32, 100, last, done=done):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:5")
    assert str(failure.value).endswith(
        f"its last checkpoint is {last}. torchrun restarts the workers (restart 2 of 3) and they find the run "
        "complete; if this repeats, look for the stuck or lost rank in the other nodes' output")


# Ends rank 1's training process where its run has trained to the end and begins its final summary, as a node lost
# then would. A test-only hook: the package carries nothing.
LOST_AT_THE_END_HOOK = """
import os, sys
if any(arg.endswith("train.py") for arg in sys.argv) and os.environ.get("RANK") == "1":
    import dist_mnist.train
    def _gone(self, *args, **kwargs):
        os._exit(9)
    dist_mnist.train.Trainer.finish = _gone
"""


@pytest.mark.scenario
@pytest.mark.timeout(180)
def test_a_peer_lost_in_the_final_summary_of_a_complete_run_says_so_and_the_rerun_finds_it_complete(
        tmp_path: Path) -> None:
    hook = hook_folder(tmp_path, LOST_AT_THE_END_HOOK)
    out = tmp_path / "out"
    command = [*TORCHRUN, TRAIN_SCRIPT, *SMOKE_FLAGS, "--epochs", "1", "--timeout-s", "60", "--output-dir", str(out),
               "--run-name", "end"]
    result = run(command, env=cpu_env(PYTHONPATH=f"{hook}{os.pathsep}{REPO}"), timeout=150)
    assert result.returncode != 0
    last = checkpoint_path(out / "end" / "checkpoints", 16)  # 512 images, 2 ranks of 16: 16 steps
    (message,) = error_lines(result.stderr)  # rank 0's; rank 1 left without a word
    assert re.fullmatch(
        r"a collective in the final summary failed after step 16: a peer did not answer within the \d+ s timeout or "
        r"left the job \(.+\); the training is complete \(its 1 epoch done\) but its summary\.json may not be written "
        r"\(metrics\.jsonl holds the run's evaluations\); its last checkpoint is " + re.escape(str(last)) +
        r"\. Look for the stuck or lost rank in the other nodes' output; the same command finds the run complete "
        r"and trains no more", message), message
    assert_no_traceback_from_us(result.stderr, result.stdout)
    assert not (out / "end" / "summary.json").exists()
    rerun = run(command, env=cpu_env(), timeout=150)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"run {out / 'end'} is already complete at step 16 (its 1 epoch done); nothing to do" in rerun.stdout


def test_a_killed_peers_collective_failure_reads_as_gloos_own_words() -> None:
    # What a rank's gradient all-reduce raised when its peer was killed (kill -9, the out-of-memory killer): DDP's
    # comm hook futures wrap it twice, and gloo adds its advice and an emoji, 380 characters inside the one line.
    killed = RuntimeError(
        "Got the following error when running the callback: RuntimeError: Got the following error when running the "
        "callback: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
        "[127.0.0.1]:48000: Connection reset by peer. This is typically caused by a remote worker hanging or bugs "
        "in the application. Check the logs of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f")
    with pytest.raises(UserError) as failure, collectives.phase("the training step", 12, 100, None):
        raise killed
    assert "left the job (Read error [127.0.0.1]:48000: Connection reset by peer.); the run has" in str(failure.value)


def test_flight_recorder_dumps_into_the_run_folder_and_respects_the_users_settings(tmp_path: Path) -> None:
    named = TrainConfig(output_dir=str(tmp_path), run_name="run")
    dump_dir = collectives.flight_recorder_dir(named, {})
    assert dump_dir == tmp_path / "run" / "flight_recorder" / "attempt_0"
    # Each launch attempt dumps apart: a timeout after torchrun's restart overwrote the first attempt's dumps, and
    # fr_trace reads a folder with every folder below it as one set of ranks. A Slurm requeue counts again from 0.
    assert collectives.flight_recorder_dir(named, {"TORCHELASTIC_RESTART_COUNT": "2"}).name == "attempt_2"
    assert collectives.flight_recorder_dir(named, {"TORCHELASTIC_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": "1"}
                                           ).name == "requeue_1_attempt_0"
    assert collectives.flight_recorder_env(dump_dir, {}) == {
        "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": f"{dump_dir}/nccl_trace_rank_"}
    # The user's values, under the current or the older names, stay.
    assert collectives.flight_recorder_env(dump_dir, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "50",
                                                      "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
                                           ) == {"TORCH_FR_DUMP_TEMP_FILE": f"{dump_dir}/nccl_trace_rank_"}
    assert "TORCH_FR_DUMP_TEMP_FILE" not in collectives.flight_recorder_env(
        dump_dir, {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"})
    # Without --run-name the folder is named only after the process group opens: a folder per torchrun job.
    unnamed = TrainConfig(output_dir=str(tmp_path))
    assert collectives.flight_recorder_dir(unnamed, {"TORCHELASTIC_RUN_ID": "job7"}) == (
        tmp_path / "flight_recorder" / "job7" / "attempt_0")
    # A run id that is no plain name (torchrun's --rdzv-id takes any string) put the dumps outside --output-dir.
    for run_id in ("../../escaped", "/tmp/abs", ".."):
        dump = collectives.flight_recorder_dir(unnamed, {"TORCHELASTIC_RUN_ID": run_id}).parent
        assert dump.parent == tmp_path / "flight_recorder" and dump.name.startswith("sha256-")


def test_the_error_line_is_out_before_the_failed_runs_frames_are_let_go(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """Letting go of the exception frees the loop's frames, and with them the DataLoader's iterator, whose __del__
    joins the worker processes (a second or so). torchrun SIGTERMs every rank the moment one dies, so a surviving
    rank with --num-workers died in those joins without its line; the line is written first now."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    written_when_freed: list[str] = []

    class Iterator:  # stands for the DataLoader iterator a failed loop's frame holds
        def __del__(self) -> None:
            written_when_freed.append(stderr.getvalue())

    def fail(*args: object) -> None:
        iterator = Iterator()  # noqa: F841 (held by this frame, so by the exception's traceback)
        raise UserError("a collective in the training step failed after step 12: ...")

    monkeypatch.setattr(train_module, "run_training", fail)
    assert train_module.main([*SMOKE_FLAGS, "--output-dir", str(tmp_path)]) == 1
    assert written_when_freed == ["error: a collective in the training step failed after step 12: ...\n"]


@pytest.mark.scenario
@pytest.mark.timeout(180)
def test_hung_peer_ends_the_other_rank_with_one_line_within_the_training_timeout(tmp_path: Path) -> None:
    train_timeout = 5
    flags = [*SMOKE_FLAGS, "--epochs", "1000", "--checkpoint-every", "4", "--log-every", "1", "--timeout-s", "60",
             "--train-timeout-s", str(train_timeout), "--output-dir", str(tmp_path), "--run-name", "hung"]
    with Agents(tmp_path / "logs", timeout=150) as agents:  # kills the job, the stopped rank too, at the end
        agents.start([*TORCHRUN, TRAIN_SCRIPT, *flags], cpu_env())
        agents.wait_for_any_output(r"^epoch \d+ step ([6-9]|\d\d+)/")  # past the first checkpoint
        victim = worker_pid(agents.procs[0].pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGSTOP)  # a stuck NFS read or a frozen GPU: alive, holding its sockets, silent
        stopped = time.monotonic()
        seconds = seconds_until_errors(tmp_path / "logs", 1, stopped, limit=60)
        print(f"\nhung peer: rank 0's error line {seconds:.1f} s after SIGSTOP (--train-timeout-s {train_timeout})")
        agents.kill(0)
        result = agents.results()[0]
    messages = error_lines(result.stderr)
    assert len(messages) == 1, result.stderr[-3000:]
    assert re.fullmatch(rf"a collective in .+ failed after step \d+: a peer did not answer within the "
                        rf"{train_timeout} s timeout or left the job \(.+\); the last checkpoint is "
                        rf"{re.escape(str(tmp_path / 'hung' / 'checkpoints'))}/step\d{{8}}\.pt\. Look for the stuck "
                        "or lost rank in the other nodes' output, then rerun the same command to resume",
                        messages[0]), messages[0]
    assert_no_traceback_from_us(result.stderr, result.stdout)
    assert json.loads((tmp_path / "hung" / "config.json").read_text())["train_timeout_s"] == train_timeout


def test_failed_metrics_append_leaves_whole_records_only(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, enabled=True, tensorboard=False)
    writer.reset_metrics([{"step": 4}])
    record = {"step": 8, "note": "x" * 100}
    # A file-size limit makes the kernel take part of the line and refuse the rest, as a disk filling mid-write does.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    on_excess = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of dying of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, ((tmp_path / "metrics.jsonl").stat().st_size + 10, limits[1]))
    try:
        with pytest.raises(UserError) as failure:
            writer.append_metrics(record)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, on_excess)
    assert str(failure.value).startswith(f"could not write metrics.jsonl to {tmp_path}: File too large (it needed "
                                         f"{len(json.dumps(record)) + 1} bytes there)")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 4}\n'


# ---------------------------------------------------------------------------------------------------------------
# Advice that holds with or without a checkpoint, Ctrl-C outside the loop, a lost DataLoader worker, a rendezvous
# that cannot complete, a full disk under TensorBoard and under the profiler


def test_the_advice_without_a_checkpoint_starts_the_run_again_under_a_new_name(tmp_path: Path) -> None:
    """A process that neither resumed nor wrote a checkpoint belongs to a run that has none (Trainer.
    newest_checkpoint): the same command is refused for its folder, so the advice is a new --run-name."""
    with pytest.raises(UserError) as failure, collectives.phase("the stop vote", 68, 100, None):
        raise RuntimeError("Application timeout caused pair closure")
    assert str(failure.value).endswith(
        "; the run has no checkpoint yet. Look for the stuck or lost rank in the other nodes' output, then start it "
        "again under a new --run-name (a run folder without a checkpoint is not reused)")
    # A run with a default name is found again only with --run-name (a --standalone launch makes a new name).
    with pytest.raises(UserError) as failure, collectives.phase("the stop vote", 68, 100, tmp_path / "step8.pt",
                                                                 Rerun("20261128-010203")):
        raise RuntimeError("Application timeout caused pair closure")
    assert str(failure.value).endswith(f"the last checkpoint is {tmp_path / 'step8.pt'}. Look for the stuck or lost "
                                       "rank in the other nodes' output, then rerun the same command with --run-name "
                                       "20261128-010203 to resume")
    full = write_failed(tmp_path / "metrics.jsonl", 120, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert str(full).endswith("Free space there, then rerun the same command to resume from the last checkpoint; a "
                              "run that wrote none yet starts again under a new --run-name")
    # What the advice relies on: a run folder with files but no checkpoint is refused; a new name starts again,
    # and a folder with a checkpoint is continued.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds no checkpoint to resume; pick another --run-name"):
        _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="run"))
    _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="run-2")).release()
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "step00000004.pt").write_bytes(b"a checkpoint")
    _choose_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="run")).release()


def test_a_folder_removed_or_renamed_mid_run_is_not_called_a_full_disk(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """rm -rf of the checkpoints folder (or a rename of the run folder) mid-run said "No such file or directory
    ...; the files written before are intact. Free space there, then rerun the same command": the files were gone,
    space was not the cause, and the same command was refused ("holds no checkpoint to resume")."""
    gone = OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    assert str(write_failed(tmp_path / "step00000200.pt", 1024, gone)) == (
        f"could not write step00000200.pt to {tmp_path}: No such file or directory (it needed 1,024 bytes there): the "
        "folder was removed or renamed while the run wrote to it, and what it held went with it. To resume, point "
        "--output-dir and --run-name (or --checkpoint-dir) at where its checkpoints are now; a run whose checkpoints "
        "were removed starts again under a new --run-name")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert str(write_failed(tmp_path / "progress.jsonl", None, gone)).endswith(
        "what it held went with it; torchrun restarts the workers (restart 2 of 3), from a checkpoint still where the "
        "run looks (from step 0 where none is)")
    # Neither space nor a vanished folder: the error's own words, and no advice to free space.
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert str(write_failed(tmp_path / "metrics.jsonl", None, read_only)).endswith(
        "Read-only file system; the files written before are intact. Once that is fixed, rerun the same "
        "command to resume from the last checkpoint; a run that wrote none yet starts again under a new --run-name")


def test_a_full_disk_under_torchrun_restarts_says_the_restart_fails_the_same_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With restarts left torchrun brings the workers back by itself, so "rerun the same command" would be wrong
    advice, and every restart meets the same full disk; with none left, the rerun advice stands."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the second attempt: restart 2 of 3 comes next
    assert str(write_failed(tmp_path / "metrics.jsonl", None, full)) == (
        f"could not write metrics.jsonl to {tmp_path}: No space left on device; the files written before are intact; "
        "torchrun restarts the workers (restart 2 of 3) from the last checkpoint (from step 0 where the run wrote "
        "none), and they fail the same way unless space is freed there first")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")  # the last attempt: nothing restarts it
    assert "Free space there, then rerun the same command" in str(write_failed(tmp_path / "metrics.jsonl", None, full))


# Sends this process the signal named by $DIST_MNIST_TEST_SIGNAL (SIGINT, as a Ctrl-C does, or SIGTERM, as torchrun,
# Slurm or Kubernetes do) while it reads a data file whose name holds $DIST_MNIST_TEST_SIGNAL_AT: a point of start-up
# reached every time, with no sleep to guess.
SIGNAL_HOOK = """
import os, signal
# A test run may inherit SIGINT ignored (a background job of a non-interactive shell, as `bash .ci/run &` is), and
# Python then leaves it ignored: give the process the handler it has on a terminal, where a user presses Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)
_signal = getattr(signal, os.environ.get("DIST_MNIST_TEST_SIGNAL", "SIGINT"))
if _signal != signal.SIGINT:  # likewise SIGHUP under nohup, SIGQUIT in a background job: the default, as there
    signal.signal(_signal, signal.SIG_DFL)
import builtins
_target, _open = os.environ.get("DIST_MNIST_TEST_SIGNAL_AT"), builtins.open
def _open_interrupted(file, *args, **kwargs):  # the data files are opened with open() (data._read_idx_pair)
    if _target and _target in os.path.basename(str(file)):
        os.kill(os.getpid(), _signal)
    return _open(file, *args, **kwargs)
builtins.open = _open_interrupted
import sys
class _InterruptImport:  # the signal as the module named by DIST_MNIST_TEST_SIGNAL_IMPORT begins to import
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("DIST_MNIST_TEST_SIGNAL_IMPORT"):
            os.kill(os.getpid(), _signal)
        return None
sys.meta_path.insert(0, _InterruptImport())
"""
# The stop signals, with the shell's exit code for each.
STOP_SIGNALS = {"SIGINT": 130, "SIGTERM": 143}
EXIT_CODES = {**STOP_SIGNALS, "SIGHUP": 129, "SIGQUIT": 131}


class HeldImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `name` as an empty module whose import first runs `body` (in the importing thread)."""

    def __init__(self, name: str, body: Callable[[], None]) -> None:
        self.name, self.body = name, body

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name == self.name else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        self.body()


def test_an_import_whose_join_a_raising_signal_handler_interrupted_is_still_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM in Trainer's join of the import thread (the failure path raises Terminated there) marked the thread
    finished on Python 3.10-3.12 (cpython#90882): _main's last join returned at once and the process went down with
    torch._dynamo still importing in a daemon thread, the crash that join is there to prevent."""
    from dist_mnist.startup import StartupTimer

    interrupt = InterruptedWait(StartupTimer.join_background_imports)
    imported: list[str] = []
    name = f"held_import_{uuid.uuid4().hex}"

    def held() -> None:
        interrupt.hold()
        imported.append(name)

    monkeypatch.setattr(sys, "meta_path", [HeldImport(name, held), *sys.meta_path])
    monkeypatch.delitem(sys.modules, name, raising=False)
    startup = StartupTimer()
    try:
        startup.import_in_background(name)
        with pytest.raises(Interrupted):
            startup.join_background_imports()
        interrupt.waiting_again()
        startup.join_background_imports()
    finally:
        interrupt.give_up()
    assert imported == [name]


def test_a_sigterm_while_a_failed_start_joins_the_import_thread_leaves_the_failures_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun SIGTERMs every rank the moment one fails; the others, failing the same way (missing data), got it
    while their failure joined the import thread: "interrupted (SIGTERM) during start-up" and exit 143 replaced the
    missing-data line and its exit 1."""
    from dist_mnist.startup import StartupTimer

    join = StartupTimer.join_background_imports

    def signalled_join(self: StartupTimer) -> None:
        signal.raise_signal(signal.SIGTERM)  # its Python handler runs before raise_signal returns
        join(self)

    monkeypatch.setattr(StartupTimer, "join_background_imports", signalled_join)
    data = tmp_path / "none"
    assert train_module.main(["--data-dir", str(data), "--no-download", "--no-tensorboard", "--output-dir",
                              str(tmp_path), "--run-name", "nodata"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: MNIST files missing in "), line


class NoTensorBoard(importlib.abc.MetaPathFinder):
    """TensorBoard not installed, as on a GPU image with torch and nothing else."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] == "tensorboard":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_tensorboard_missing_is_one_line_not_the_import_threads_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NoTensorBoard(), *sys.meta_path])
    assert train_module.main([*SMOKE_FLAGS, "--tensorboard", "--max-steps", "2", "--output-dir", str(tmp_path),
                              "--run-name", "tb"]) == 1
    assert capsys.readouterr().err == ("error: --tensorboard needs the tensorboard package (pip install tensorboard), "
                                       "or run with --no-tensorboard\n")


ENV_WATCH = """
import os, threading
import dist_mnist.train  # what main() has imported when it starts the thread (torch, numpy)
from dist_mnist.startup import StartupTimer
_putenv, _unsetenv, grown = os.putenv, os.unsetenv, []
def putenv(key, value):  # os.environ calls it before it records the key: `key in os.environ` is "not new"
    if threading.current_thread() is not threading.main_thread() and os.fsdecode(key) not in os.environ:
        grown.append(("set", os.fsdecode(key), threading.current_thread().name))
    _putenv(key, value)
def unsetenv(key):
    if threading.current_thread() is not threading.main_thread():
        grown.append(("unset", os.fsdecode(key), threading.current_thread().name))
    _unsetenv(key)
os.putenv, os.unsetenv = putenv, unsetenv
startup = StartupTimer()
startup.import_in_background("torch._dynamo")
startup.join_background_imports()
print(grown, os.environ["TORCHINDUCTOR_CACHE_DIR"])
"""


def test_the_import_thread_adds_no_variable_to_the_environment(tmp_path: Path) -> None:
    """glibc's setenv of a new name reallocates the environment array while the main thread's C code may read it
    (getenv takes no lock): torch._dynamo's import added TORCHINDUCTOR_CACHE_DIR from the import thread."""
    env = cpu_env(PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    result = run([sys.executable, "-c", ENV_WATCH], env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    grown, cache_dir = result.stdout.split(" ", 1)[0], result.stdout.split("] ", 1)[1].strip()
    assert grown == "[]", result.stdout
    assert cache_dir == str(tmp_path / "dist_mnist" / "inductor")  # our default (review_security F2), not torch's


def interrupted_early_line(name: str) -> str:
    return (f"error: interrupted ({name}) during start-up, before the first step; this process wrote nothing to "
            "resume from: rerun the same command to start again (a run with checkpoints resumes from them)\n")


@pytest.mark.scenario
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", STOP_SIGNALS)
def test_a_stop_signal_during_start_up_is_one_line_and_the_same_command_starts_again(
        tmp_path: Path, mnist_dir: Path, name: str) -> None:
    hook = hook_folder(tmp_path, SIGNAL_HOOK)
    flags = ["--data-dir", str(mnist_dir), "--no-download", "--no-tensorboard", "--batch-size", "16",
             "--max-steps", "2", "--peak-tflops", "1", "--output-dir", str(tmp_path / "out"), "--run-name", "early"]
    interrupted = run([sys.executable, TRAIN_SCRIPT, *flags],
                      env=cpu_env(PYTHONPATH=f"{hook}{os.pathsep}{REPO}", DIST_MNIST_TEST_SIGNAL=name,
                                  DIST_MNIST_TEST_SIGNAL_AT="train-images-idx3-ubyte"))
    # The shell's code for an end by that signal, as the signal's default action gives, and one line instead of none
    # (SIGTERM's default action) or a traceback.
    assert interrupted.returncode == STOP_SIGNALS[name]
    assert interrupted.stderr == interrupted_early_line(name)
    assert interrupted.stdout == ""
    # As the line says; in this process: the exit status that matters is the interrupted one's, and a leftover that
    # blocks a new start (a held run folder) blocks main() here alike.
    assert train_module.main(flags) == 0


@pytest.mark.scenario
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "rank"), [("SIGINT", "0"), ("SIGTERM", "1"), ("SIGHUP", "1")])
def test_a_stop_signal_while_launch_train_imports_torch_is_the_same_one_line(tmp_path: Path, name: str,
                                                                             rank: str) -> None:
    """The first seconds of every launch are launch/train.py's imports (torch's most of all), before main() runs.
    torchrun's SIGTERM reaches every worker there, and each says which rank it is, as main() would."""
    hook = hook_folder(tmp_path, SIGNAL_HOOK)
    interrupted = run([sys.executable, TRAIN_SCRIPT, *SMOKE_FLAGS, "--output-dir", str(tmp_path / "out")],
                      env=cpu_env(PYTHONPATH=str(hook), DIST_MNIST_TEST_SIGNAL=name, RANK=rank,
                                  DIST_MNIST_TEST_SIGNAL_IMPORT="dist_mnist.train"))
    assert interrupted.returncode == EXIT_CODES[name]
    assert interrupted.stderr == ("" if rank == "0" else f"[rank {rank}] ") + interrupted_early_line(name)
    assert not (tmp_path / "out").exists()


# SIGHUP and SIGQUIT raise the same Terminated as SIGTERM, with their own name and code: CI's first pass, under the
# GPU machines' torch, leaves them to the second (pyproject.toml's `scenario`).
@pytest.mark.parametrize("name", [name if name in STOP_SIGNALS else pytest.param(name, marks=pytest.mark.scenario)
                                  for name in EXIT_CODES])
def test_a_stop_signal_after_the_run_files_or_while_finishing_says_what_is_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        # What Python's SIGINT handler, and main()'s handler of the others (shutdown.FailurePath), raise wherever the
        # main thread is.
        raise KeyboardInterrupt if name == "SIGINT" else Terminated(signal.Signals[name])

    flags = [*SMOKE_FLAGS, "--max-steps", "6", "--output-dir", str(tmp_path)]
    code = EXIT_CODES[name]
    # Past config.json, before the loop's stop handler is in place (make_profiler is the loop's last set-up).
    monkeypatch.setattr(train_module, "make_profiler", interrupt)
    assert train_module.main([*flags, "--run-name", "started"]) == code
    assert capsys.readouterr().err == (
        f"error: interrupted ({name}) during start-up, before the first step but after writing the run's "
        "config.json; the run has no checkpoint yet: start it again under a new --run-name (a run folder without a "
        "checkpoint is not reused)\n")
    monkeypatch.undo()
    # A resumed process names the checkpoint it continued from before it writes one of its own.
    assert train_module.main([*flags, "--run-name", "resumed"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(train_module, "make_profiler", interrupt)
    assert train_module.main([*SMOKE_FLAGS, "--max-steps", "12", "--output-dir", str(tmp_path), "--run-name",
                              "resumed"]) == code
    resumed_from = tmp_path / "resumed" / "checkpoints" / "step00000006.pt"
    assert capsys.readouterr().err == (
        f"error: interrupted ({name}) during start-up, before the first step but after writing the run's "
        f"config.json; the last checkpoint is {resumed_from}: rerun the same command to resume\n")
    monkeypatch.undo()
    # After the loop, its last checkpoint written: finish() calls rank_stats early on.
    monkeypatch.setattr(train_module, "rank_stats", interrupt)
    assert train_module.main([*flags, "--run-name", "finishing"]) == code
    last = tmp_path / "finishing" / "checkpoints" / "step00000006.pt"
    assert capsys.readouterr().err == (
        f"error: interrupted ({name}) after step 6, while the run was finishing (its summary may be missing); the "
        f"last checkpoint is {last}\n")
    assert load_checkpoint(last)["train_state"]["step"] == 6
    monkeypatch.undo()
    # The same command again: complete, and it says why there is no summary (it said "nothing to do" and no more,
    # and report blamed a crash or a run still going).
    assert train_module.main([*flags, "--run-name", "finishing"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] + "\n" == (
        f"run {tmp_path / 'finishing'} is already complete at step 6 (--max-steps 6 reached); nothing to do (it has "
        "no summary.json: the process that finished it ended before writing one (it was stopped, or could not write "
        "it), and the step times it is made of ended with that process; metrics.jsonl holds the run's evaluations)\n")
    with pytest.raises(UserError, match="or was stopped while it finished"):
        report.read_summary(tmp_path / "finishing")


def test_a_resumed_process_stopped_while_finishing_leaves_a_summary_both_rerun_and_report_call_an_earlier_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The first process's summary.json (steps 1-6) stayed when a resumed process finished the run at step 10 but
    was stopped before writing its own: the rerun said only "nothing to do", and report showed the steps 1-6 table
    under the step-10 evaluation as the run's."""
    flags = [*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--run-name", "stale"]
    assert train_module.main([*flags, "--max-steps", "6"]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "rank_stats", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
        assert train_module.main([*flags, "--max-steps", "10"]) == STOP_SIGNALS["SIGINT"]
    capsys.readouterr()
    assert train_module.main([*flags, "--max-steps", "10"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"run {tmp_path / 'stale'} is already complete at step 10 (--max-steps 10 reached); nothing to do (its "
        "summary.json is an earlier process's, of the steps up to 6: the process that finished it ended before "
        "writing one (it was stopped, or could not write it), and the step times it is made of ended with that "
        "process; metrics.jsonl holds the run's evaluations)")
    assert report.report(report.Run(tmp_path / "stale")).splitlines()[-1] == (
        "summary.json is of steps 1-6, an earlier process's: the run went on to step 10, and the process that ran "
        "those steps wrote none (it is still running, or was stopped or crashed first)")
    assert report.compare(tmp_path / "stale", tmp_path / "stale").splitlines()[0] == (
        f"A: {tmp_path / 'stale'} (its summary is of steps 1-6 only: the run went on to step 10)")
    # The picture's curves run to step 10; its title says the bars and samples/s do not.
    assert re.fullmatch(r"stale: 1 rank, [\d,]+ samples/s \(phases and samples/s: steps 1-6 only, an earlier "
                        r"process's; the run went on to step 10\)",
                        report.picture_title(report.Run(tmp_path / "stale")))


def test_only_a_dead_dataloader_worker_counts_as_one() -> None:
    assert collectives.lost_data_worker(RuntimeError(
        "DataLoader worker (pid 4242) is killed by signal: Killed. ")) == (
        "DataLoader worker (pid 4242) is killed by signal: Killed")
    assert collectives.lost_data_worker(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly")) == (
        "DataLoader worker (pid(s) 7, 8) exited unexpectedly")
    # An exception in the dataset code, re-raised by the loader: a bug, which keeps its traceback.
    assert collectives.lost_data_worker(RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):")) is None
    assert collectives.lost_data_worker(ValueError("DataLoader worker (pid 1) is killed by signal: Killed.")) is None
    # A worker killed while it hands over a batch: the connection breaks inside the loader before it sees the death.
    reset = "raise ConnectionResetError(104, 'Connection reset by peer')"
    for module, raised, expected in (
            ("torch.utils.data.dataloader", reset, "its connection broke while it handed over a batch: "
                                                   "ConnectionResetError: [Errno 104] Connection reset by peer"),
            # multiprocessing's reader at the end of the stream: an EOFError with no message of its own
            ("torch.utils.data.dataloader", "raise EOFError", "its connection broke while it handed over a batch: "
                                                              "EOFError"),
            ("dist_mnist.somewhere", reset, None)):  # the same error elsewhere is not the loader's
        namespace: dict[str, Any] = {"__name__": module}
        exec(compile(f"def next_batch():\n    {raised}\n", "dataloader.py", "exec"), namespace)
        with pytest.raises((ConnectionResetError, EOFError)) as caught:
            namespace["next_batch"]()
        assert collectives.lost_data_worker(caught.value) == expected


@pytest.mark.scenario
@pytest.mark.timeout(240)
def test_a_killed_dataloader_worker_is_one_line_naming_the_checkpoint_to_resume_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    flags = [*SMOKE_FLAGS, "--epochs", "1000", "--checkpoint-every", "4", "--log-every", "1",
             "--output-dir", str(tmp_path), "--run-name", "lost"]
    checkpoints = tmp_path / "lost" / "checkpoints"
    # The worker's multiprocessing temp folder (pymp-*) outlives a SIGKILL: in a folder of the test's own, removed
    # after it. A short one: the worker's socket for handing a batch's shared memory over is made in it, and a path
    # in pytest's tmp_path (under xdist, once pytest numbers its folders past 99) passed AF_UNIX's 107 characters.
    temp = Path(tempfile.mkdtemp(prefix="dm-"))
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    live = LiveRun([sys.executable, TRAIN_SCRIPT, *flags, "--num-workers", "1"], env=cpu_env(TMPDIR=str(temp)))
    live.wait_until(lambda: bool(list_checkpoints(checkpoints)), "the first checkpoint")
    workers = [child for child in psutil.Process(live.proc.pid).children()
               if "spawn_main" in " ".join(child.cmdline())]
    assert workers
    for worker in workers:
        worker.kill()  # SIGKILL, what the out-of-memory killer sends
    result = live.result(timeout=120)
    assert result.returncode == 1
    messages = error_lines(result.stderr)
    assert len(messages) == 1, result.stderr[-3000:]
    pids = "|".join(str(worker.pid) for worker in workers)
    found = re.fullmatch(
        rf"a DataLoader worker of this process died after step \d+ \((?:DataLoader worker \(pid(?:\(s\))? "
        rf"(?:{pids})\) "
        r"(?:is killed by signal: Killed|exited unexpectedly)|its connection broke while it handed over a batch: "
        r"\w+(?:: [^)]*)?)\), most often the out-of-memory killer's doing \(dmesg "
        r"says so\): use fewer --num-workers \(each is a process of its own; 0 loads the data in the training "
        rf"process\) or give the job more memory; the last checkpoint is ({re.escape(str(checkpoints))}/step\d{{8}}"
        r"\.pt)\. Then rerun the command with a lower --num-workers to resume", messages[0])
    assert found, messages[0]
    assert_no_traceback_from_us(result.stderr, result.stdout)
    step = load_checkpoint(Path(found.group(1)))["train_state"]["step"]
    # The rerun the line asks for, in this process (no interpreter start): what it checks is where it resumes.
    capsys.readouterr()
    assert train_module.main([*flags, "--num-workers", "0", "--max-steps", str(step + 8)]) == 0
    again = capsys.readouterr()
    # From that checkpoint or a newer one: a write in flight when the worker died is completed (Trainer.fit).
    resumed = re.search(r"^resumed from step (\d+) ", again.out, re.MULTILINE)
    assert resumed and int(resumed.group(1)) >= step, again.out + again.err[-3000:]


WORKER_DEATH = "DataLoader worker (pid 4242) is killed by signal: Killed. "  # torch's SIGCHLD handler's words


def lose_the_worker_after_writing_step_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's SIGCHLD handler raising a dead worker's error right after step 4's checkpoint write was submitted."""
    submit = checkpoint_module.BackgroundWriter.submit

    def submit_then_lose_the_worker(self: Any, data: bytes, folder: Path, step: int, *args: Any) -> Any:
        written = submit(self, data, folder, step, *args)
        if step == 4:
            raise RuntimeError(WORKER_DEATH)
        return written

    monkeypatch.setattr(checkpoint_module.BackgroundWriter, "submit", submit_then_lose_the_worker)


def test_a_worker_lost_while_a_checkpoint_is_submitted_names_that_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torch's SIGCHLD handler raises a dead worker's error wherever the main thread is, also between the start of a
    checkpoint's write and the save's return: the write completes (Trainer.fit), and the line names that file."""
    lose_the_worker_after_writing_step_4(monkeypatch)
    assert train_module.main([*SMOKE_FLAGS, "--max-steps", "8", "--checkpoint-every", "2", "--output-dir",
                              str(tmp_path), "--run-name", "lost"]) == 1
    written = tmp_path / "lost" / "checkpoints" / "step00000004.pt"
    assert load_checkpoint(written)["train_state"]["step"] == 4
    assert capsys.readouterr().err.endswith(f"; the last checkpoint is {written}. Then rerun the command with a lower "
                                            "--num-workers to resume\n")


def test_a_worker_lost_while_a_checkpoint_write_fails_names_the_checkpoint_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Step 4's write, in flight when the worker died at step 5, found the disk full: its warning was followed by an
    error line naming step00000004.pt as the last checkpoint, a file that never reached the disk."""
    real = checkpoint_module.write_checkpoint

    def lose_the_worker_at_step_5(self: train_module.Trainer) -> None:
        if self.state.step == 5:
            raise RuntimeError(WORKER_DEATH)

    def full_at_step_4(data: bytes, folder: Path, step: int, keep: int) -> Path:
        if step == 4:
            raise write_failed(checkpoint_path(folder, step), len(data),
                               OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(data, folder, step, keep)

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", full_at_step_4)
    monkeypatch.setattr(train_module.Trainer, "log_progress", lose_the_worker_at_step_5)
    assert train_module.main([*SMOKE_FLAGS, "--max-steps", "8", "--checkpoint-every", "2", "--log-every", "1",
                              "--output-dir", str(tmp_path), "--run-name", "lost"]) == 1
    warning, error = capsys.readouterr().err.splitlines()
    checkpoints = tmp_path / "lost" / "checkpoints"
    assert warning.startswith(f"warning: could not write step00000004.pt to {checkpoints}: No space left on device")
    assert error.startswith("error: a DataLoader worker of this process died after step 5 ")
    assert error.endswith(f"; the last checkpoint is {checkpoints / 'step00000002.pt'}. Then rerun the command with "
                          "a lower --num-workers to resume")
    assert load_checkpoint(checkpoints / "step00000002.pt")["train_state"]["step"] == 2


def test_a_non_finite_loss_while_the_last_good_checkpoint_is_written_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Step 1's checkpoint was still being written when step 2's loss turned out infinite: the line said "no
    checkpoint was written" (a listing of the folder), and the file was on disk a moment later."""
    real_write, real_step = checkpoint_module.write_checkpoint, train_module.accumulation_step

    def write_once_the_run_waits(data: bytes, folder: Path, step: int, keep: int) -> Path:
        while not main_thread_blocked_in(checkpoint_module.BackgroundWriter.wait.__code__):
            time.sleep(0.001)  # until the training thread waits for this write (a state, not a timing)
        return real_write(data, folder, step, keep)

    def infinite_at_step_2(parts: Any, *args: Any) -> torch.Tensor:
        loss = real_step(parts, *args)
        return torch.full_like(loss, math.inf) if parts.scheduler.last_epoch == 2 else loss

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", write_once_the_run_waits)
    monkeypatch.setattr(train_module, "accumulation_step", infinite_at_step_2)
    assert train_module.main([*SMOKE_FLAGS, "--max-steps", "4", "--checkpoint-every", "1", "--keep-checkpoints", "1",
                              "--log-every", "1", "--output-dir", str(tmp_path), "--run-name", "nan"]) == 1
    written = tmp_path / "nan" / "checkpoints" / "step00000001.pt"
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: training loss became non-finite at step 2; stopped (the last good checkpoint is "
                           f"{written}).")
    assert load_checkpoint(written)["train_state"]["step"] == 1


def test_a_non_finite_test_loss_stops_the_run_before_its_record_and_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The last update can break the model while every training loss was finite (--lr 1e30: parameters that
    overflow in the test forward): the run wrote "test_loss": NaN to metrics.jsonl and a checkpoint of the broken
    model, and ended complete with rc 0 (review_outputs F1). It stops as a non-finite training loss does."""
    real_evaluate = train_module.evaluate

    def nan_after_step_2(parts: Any, loader: Any) -> dict[str, Any]:
        result = real_evaluate(parts, loader)
        return {**result, "test_loss": math.nan} if parts.scheduler.last_epoch == 2 else result

    monkeypatch.setattr(train_module, "evaluate", nan_after_step_2)
    assert train_module.main([*SMOKE_FLAGS, "--max-steps", "2", "--eval-every", "1", "--checkpoint-every", "1",
                              "--log-every", "1", "--output-dir", str(tmp_path), "--run-name", "nan"]) == 1
    checkpoints = tmp_path / "nan" / "checkpoints"
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"error: test loss became non-finite after step 2; stopped (the last good checkpoint is "
                    f"{checkpoints / 'step00000001.pt'}). Lower --lr, or use --grad-clip")
    assert [json.loads(r)["step"] for r in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in checkpoints.glob("*.pt")] == ["step00000001.pt"]


def test_a_dead_workers_signal_that_comes_as_the_failure_is_handled_still_gets_the_trainers_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A killed worker first breaks its batch's connection (the loop fails with that), and torch's SIGCHLD handler
    raises its error a moment later, as Trainer.fit begins to take the handler back. That second error used to leave
    fit unworded and main's line lacked the step and the checkpoint (CI, 2026-11-29): the line is fit's."""
    take_back = collectives.stop_raising_for_lost_data_workers
    calls: list[int] = []

    def signal_at_the_first_call() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(WORKER_DEATH)
        take_back()

    lose_the_worker_after_writing_step_4(monkeypatch)
    monkeypatch.setattr(collectives, "stop_raising_for_lost_data_workers", signal_at_the_first_call)
    assert train_module.main([*SMOKE_FLAGS, "--max-steps", "8", "--checkpoint-every", "2", "--output-dir",
                              str(tmp_path), "--run-name", "lost"]) == 1
    written = tmp_path / "lost" / "checkpoints" / "step00000004.pt"
    err = capsys.readouterr().err
    assert "a DataLoader worker of this process died after step 4 (" in err and len(calls) == 2
    assert err.endswith(f"; the last checkpoint is {written}. Then rerun the command with a lower --num-workers to "
                        "resume\n")


def test_a_worker_lost_outside_the_trainer_under_torchrun_restarts_is_left_to_the_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """main's own line for a dead worker whose error torch's SIGCHLD handler raised before Trainer.fit took the
    handler back: with torchrun restarts left it told the user to rerun what torchrun was already restarting."""
    def lose_the_worker(*args: Any) -> None:
        raise RuntimeError(WORKER_DEATH)

    monkeypatch.setattr(train_module, "run_training", lose_the_worker)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert train_module.main([*SMOKE_FLAGS, "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.endswith(
        "give the job more memory; torchrun restarts the workers (restart 1 of 2) and they resume from the newest if "
        "there is one, else start again from step 0 (with the same --num-workers)\n")


def test_rank_and_world_size_without_the_rendezvous_address_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    flags = [*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--timeout-s", "1"]
    assert train_module.main(flags) == 1
    assert capsys.readouterr().err == (
        "error: RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT are not: start with torchrun, which sets "
        "all of them, or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port on it, or unset RANK for "
        "one process\n")
    # Rank 0 waits for the other process, which never comes.
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert train_module.main(flags) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: the rendezvous at 127\.0\.0\.1:{port} timed out after \d+ s with 1 of 2 processes "
                        r"joined \(Timed out after \d+ seconds waiting for clients\. 1/2 clients joined\.\); start all "
                        "2 processes within --timeout-s 1, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE\n",
                        err), err
    assert not list(tmp_path.iterdir())  # no run folder: nothing started


def torchruns_rendezvous_done(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    """A worker as torchrun starts it: RANK, WORLD_SIZE and the address set, and a rendezvous that returns at once
    (the workers meet in the agent's store, already there), so the process group is the first to wait for peers."""
    for name, value in (("RANK", str(rank)), ("LOCAL_RANK", str(rank)), ("WORLD_SIZE", str(world_size)),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda *args, **kwargs: iter([(
        torch.distributed.HashStore(), rank, world_size)]))


@pytest.mark.timeout(60)
def test_a_peer_that_never_connects_to_the_process_group_is_one_line_within_the_timeout(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A worker frozen (SIGSTOP) or dead after torchrun started it: the other waited in init_process_group for its
    address and ended in torch's DistStoreError traceback after --timeout-s."""
    torchruns_rendezvous_done(monkeypatch, rank=0, world_size=2)
    assert train_module.main([*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--timeout-s", "2"]) == 1
    assert capsys.readouterr().err == (
        "error: the process group did not open for rank 0 of 2: not every process connected within --timeout-s 2 "
        "(Wait timeout); a process that froze, crashed or is still starting holds up the others: check every "
        "process's own output, then start them all again\n")
    assert not torch.distributed.is_initialized() and not list(tmp_path.iterdir())


def _enospc_after(writes: int, name_part: str, real: Callable[[int, bytes], int]) -> Callable[[int, bytes], int]:
    """os.write that fails as a full disk does for a file whose name holds `name_part`, after `writes` writes."""
    done = 0

    def write(fd: int, data: bytes) -> int:
        nonlocal done
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            done += 1
            if done > writes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    return write


def test_full_disk_under_tensorboard_is_one_line_and_keeps_whole_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import: here only

    # The file's version record and the first progress report get written, the second report finds the disk full.
    monkeypatch.setattr(os, "write", _enospc_after(2, "tfevents", os.write))
    flags = [*SMOKE_FLAGS, "--tensorboard", "--max-steps", "12", "--log-every", "4", "--output-dir", str(tmp_path),
             "--run-name", "tb"]
    assert train_module.main(flags) == 1
    monkeypatch.undo()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: could not write {re.escape(events.name)} to {re.escape(str(tmp_path / 'tb'))}: No "
                        r"space left on device \(it needed [\d,]+ bytes there\); the files written before are "
                        r"intact\. Free space there, then rerun the same command to resume from the last checkpoint; "
                        "a run that wrote none yet starts again under a new --run-name\n", err), err
    # Written in the training thread: TensorBoard's own writer thread would have printed its traceback too.
    assert "Exception in thread" not in err
    loss = EventAccumulator(str(events)).Reload().Scalars("train/loss")
    assert [event.step for event in loss] == [4]


# ---------------------------------------------------------------------------------------------------------------
# Record files that are not the run's own (security review findings 9 and 10)


SECRET = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"


def test_a_resume_refuses_a_symlinked_progress_file_before_printing_a_line_of_its_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each line of the link's target read as a damaged record and went to stderr (a shared job log)."""
    secret = tmp_path / "id_rsa"
    secret.write_text(SECRET)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PROGRESS_FILE).symlink_to(secret)
    progress = Progress(run_dir, enabled=True, step_limit=12, global_batch=16, stream=io.StringIO())
    with pytest.raises(UserError, match=rf"^{re.escape(str(run_dir / PROGRESS_FILE))} is a symbolic link: .*"
                                        "replace the link by a copy"):
        progress.start(8, 1.0)
    assert "PRIVATE" not in capsys.readouterr().err and secret.read_text() == SECRET


@pytest.mark.parametrize("name", [PROGRESS_FILE, "metrics.jsonl"])
def test_a_resume_refuses_a_hard_linked_record_file_and_leaves_the_linked_file_whole(name: str,
                                                                                     tmp_path: Path) -> None:
    """keep_records cut the file in place and the run appended to it: the other name's content was lost."""
    notes = tmp_path / "notes.txt"
    notes.write_text("line one of victim notes\nline two\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(notes, run_dir / name)
    with pytest.raises(UserError, match=r"has 1 other hard link\(s\) .*give it a copy of its own"):
        if name == PROGRESS_FILE:
            Progress(run_dir, enabled=True, step_limit=12, global_batch=16, stream=io.StringIO()).start(8, 1.0)
        else:
            RunWriter(run_dir, enabled=True, tensorboard=False).reset_metrics([])
    assert notes.read_text() == "line one of victim notes\nline two\n"
