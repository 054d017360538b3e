"""End to end: resumed runs equal uninterrupted ones, killed workers restart under torchrun, SIGTERM stops cleanly."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, SMOKE_FLAGS, TRAIN_SCRIPT, Result, cpu_env, kill_tree, start, torchrun

import dist_mnist.train as train_module
from dist_mnist.checkpoint import checkpoint_path, list_checkpoints
from dist_mnist.distributed import torchrun_agent_pid
from dist_mnist.errors import Terminated, signal_exit_code, stop_signal
from dist_mnist.preemption import STOP_SIGNALS, StopRequest
from dist_mnist.shutdown import FailurePath
from dist_mnist.train import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
SINGLE = [sys.executable, TRAIN_SCRIPT]
PROGRESS = re.compile(r"^epoch \d+ step (\d+)/\d+ ", re.MULTILINE)
RESUMED = re.compile(r"^resumed from step (\d+) ", re.MULTILINE)
STOPPED = r"^stopped by {signal} at step (\d+); checkpoint saved"
# Runs the command that follows with SIGHUP and SIGQUIT's default action, as a terminal's job has them: a suite run
# under nohup hands its commands SIGHUP ignored, and one run in the background of a non-interactive shell (`bash
# .ci/run &`) SIGQUIT, and an ignored signal stays ignored through exec and in the run (README).
AS_ON_A_TERMINAL = [sys.executable, "-c", "import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in "
                    "(signal.SIGHUP, signal.SIGQUIT)]; os.execv(sys.argv[1], sys.argv[1:])"]
# Fails a lost peer's collective long before the subprocess and pytest timeouts.
PG_TIMEOUT = ["--timeout-s", "60"]


class LiveRun:
    """A command in its own session whose output the test watches while it runs; killed as a group on timeout."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = start(args, env)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _drain(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    def _fail(self, why: str) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc.wait()
        for reader in self.readers:
            reader.join()
        stderr = "".join(self.err)[-3000:]
        pytest.fail(f"{why}: {' '.join(self.args)}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{stderr}")

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll `condition` (not a blind sleep: the machine may be slow) until it holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self._fail(f"ended before {what}")
            if time.monotonic() > deadline:
                self._fail(f"timed out waiting for {what}")
            time.sleep(0.05)

    def progress_step(self) -> int:
        """The last step rank 0 reported."""
        steps = PROGRESS.findall(self.stdout)
        return int(steps[-1]) if steps else 0

    def result(self, timeout: float = 180) -> Result:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"timed out after {timeout}s")
        for reader in self.readers:
            reader.join()
        return Result(self.proc.returncode, self.stdout, "".join(self.err))


def final_tensors(checkpoint_file: Path) -> dict[str, torch.Tensor]:
    """The model's tensors and the optimizer's moments: everything that must match after a resume."""
    state = torch.load(checkpoint_file, weights_only=True)
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for index, moments in state["optimizer"]["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in moments.items()})
    return tensors


def assert_resumed_equals_straight(output_dir: Path, total_steps: int) -> None:
    expected = final_tensors(checkpoint_path(output_dir / "straight" / "checkpoints", total_steps))
    got = final_tensors(checkpoint_path(output_dir / "resumed" / "checkpoints", total_steps))
    assert expected.keys() == got.keys()
    differing = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not differing, f"tensors differ after resuming: {differing}"


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sigterm_then_rerun(command: list[str], checkpoints: Path, everyone: bool = False) -> tuple[Result, int]:
    """Start a run, SIGTERM it once it trains, check it stopped with a checkpoint, rerun the same command to the end.

    Returns the stopped run and the step it stopped at. For torchrun the signal goes to the agent, which forwards it;
    with `everyone`, every process of the job gets its own copy at once, DataLoader workers included, as from Slurm.
    """
    job = LiveRun(command)
    job.wait_until(lambda: job.progress_step() > 0, "the first progress line")
    targets = [job.proc.pid]
    if everyone:
        targets += [p.pid for p in psutil.Process(job.proc.pid).children(recursive=True)]
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    stopped = job.result()
    match = re.search(STOPPED.format(signal="SIGTERM"), stopped.stdout, re.MULTILINE)
    assert match, f"no stop message\nstdout:\n{stopped.stdout}\nstderr:\n{stopped.stderr[-3000:]}"
    stop_step = int(match.group(1))
    assert list_checkpoints(checkpoints)[0] == checkpoint_path(checkpoints, stop_step)

    rerun = LiveRun(command).result()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {stop_step} " in rerun.stdout
    final_step = int(PROGRESS.findall(rerun.stdout)[-1])
    assert final_step > stop_step
    assert list_checkpoints(checkpoints)[0] == checkpoint_path(checkpoints, final_step)
    return stopped, stop_step


# ---------------------------------------------------------------------------------------------------------------
# Resume equals uninterrupted. fp32 and deterministic kernels, so equality can be exact; dropout is on, so the RNG
# state must be restored too.

EXACT_FLAGS = [*SMOKE_FLAGS, "--epochs", "2", "--amp", "off", "--deterministic", "--checkpoint-every", "0",
               *PG_TIMEOUT]


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """--deterministic run in this process flips process-wide switches: put them back for later tests."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0])
    cudnn.deterministic, cudnn.benchmark = saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("restore_determinism")
def test_run_stopped_by_max_steps_resumes_to_identical_parameters(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # In this process (no interpreter start-up). 256 samples at batch 16: 16 steps per epoch, 32 in all. Step 11 is
    # mid-epoch, so the resumed run must skip the batches already done; it then crosses into the second epoch. The
    # first part stops through --max-steps, so the LR schedule must not depend on it for the parameters to match.
    flags = [*EXACT_FLAGS, "--synthetic-train-size", "256", "--output-dir", str(tmp_path)]
    assert main([*flags, "--run-name", "straight"]) == 0
    assert main([*flags, "--run-name", "resumed", "--max-steps", "11"]) == 0
    capsys.readouterr()
    assert main([*flags, "--run-name", "resumed"]) == 0
    assert "resumed from step 11 (epoch 1, batch 11)" in capsys.readouterr().out
    assert_resumed_equals_straight(tmp_path, 32)
    # progress.jsonl keeps the first part's records up to the resumed step and repeats none.
    progress_steps = {name: [json.loads(line)["step"] for line in (tmp_path / name / "progress.jsonl").open()]
                      for name in ("straight", "resumed")}
    assert progress_steps["resumed"] == progress_steps["straight"] == list(range(4, 33, 4))


RESULT_KEYS = ("epoch", "step", "train_loss", "test_loss", "test_accuracy", "test_samples")


def metrics_results(run_dir: Path) -> list[dict[str, object]]:
    """metrics.jsonl without its timing figures, which no two runs share."""
    return [{k: json.loads(line)[k] for k in RESULT_KEYS} for line in (run_dir / "metrics.jsonl").open()]


def stop_at_the_first_report(flags: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `flags` as the `resumed` run, with a SIGTERM sent during its first progress report (the step that report
    ends is the last the run takes), and the straight run beside it."""
    assert main([*flags, "--run-name", "straight"]) == 0
    report = train_module.Trainer.log_progress
    signalled: list[int] = []

    def stop_once(self: train_module.Trainer) -> None:
        if not signalled:
            signalled.append(self.state.step)
            os.kill(os.getpid(), signal.SIGTERM)
        report(self)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "log_progress", stop_once)
        assert main([*flags, "--run-name", "resumed"]) == 0


# 16 steps per epoch. A stop signal skipped the evaluation after the step it stopped at, where a resume does not
# come back to it: on an epoch's last step (the resume starts the next epoch without that epoch's record, and every
# later --eval-every step moved), and on the --max-steps step (the rerun finds the run complete, so its final record
# was missing for good, and --stop-at-accuracy never checked it).
STOPS_AFTER_WHICH_NO_RESUME_EVALUATES = {
    # case: (flags, the stop line's end, what the rerun says, the steps run, the uninterrupted run's evaluations)
    "epoch-end": (["--eval-every", "5", "--log-every", "16"], "Run the same command to resume.",
                  "resumed from step 16 (end of epoch 1)", 32, [5, 10, 15, 16, 21, 26, 31, 32]),
    "max-steps": (["--max-steps", "10", "--log-every", "10"], "The run is complete.",
                  "already complete at step 10", 10, [10]),
}


@pytest.mark.scenario
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("restore_determinism")
@pytest.mark.parametrize("case", STOPS_AFTER_WHICH_NO_RESUME_EVALUATES)
def test_a_stop_that_no_resume_comes_back_to_still_evaluates_its_step(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    extra, then, rerun, steps, evaluated = STOPS_AFTER_WHICH_NO_RESUME_EVALUATES[case]
    flags = [*EXACT_FLAGS, "--synthetic-train-size", "256", *extra, "--output-dir", str(tmp_path)]
    stop_at_the_first_report(flags, monkeypatch)  # the first report comes at the step in question
    stop_step = int(extra[extra.index("--log-every") + 1])
    assert (f"stopped by SIGTERM at step {stop_step}; checkpoint saved in {tmp_path / 'resumed' / 'checkpoints'}. "
            f"{then}") in capsys.readouterr().out
    assert main([*flags, "--run-name", "resumed"]) == 0
    assert rerun in capsys.readouterr().out
    assert_resumed_equals_straight(tmp_path, steps)
    assert metrics_steps(tmp_path / "straight") == evaluated
    assert metrics_results(tmp_path / "resumed") == metrics_results(tmp_path / "straight")


@pytest.mark.scenario
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("restore_determinism")
def test_a_resume_between_records_keeps_their_training_loss_and_throughput(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Evaluations every 5 steps, progress lines every 4; the run stops at step 7, inside both intervals. The losses
    # of steps 5-7 were not in the checkpoint, so the records at steps 8 and 10 averaged the resumed steps only, and
    # the record at 10 divided all 10 steps' samples by the resumed process's training time.
    flags = [*EXACT_FLAGS, "--synthetic-train-size", "256", "--eval-every", "5", "--output-dir", str(tmp_path)]
    assert main([*flags, "--run-name", "straight"]) == 0
    begin_step = train_module.Trainer.begin_step

    def stop_after_step_6(self: train_module.Trainer) -> None:
        if self.state.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # step 7 runs, then the stop
        begin_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "begin_step", stop_after_step_6)
        assert main([*flags, "--run-name", "resumed"]) == 0
    assert "stopped by SIGTERM at step 7;" in capsys.readouterr().out
    clock = torch.load(checkpoint_path(tmp_path / "resumed" / "checkpoints", 7), weights_only=True)["clock"]
    assert main([*flags, "--run-name", "resumed"]) == 0
    assert_resumed_equals_straight(tmp_path, 32)
    assert metrics_results(tmp_path / "resumed") == metrics_results(tmp_path / "straight")
    progress = {name: [(r["step"], r["train_loss"], r["lr"]) for r in map(json.loads, (tmp_path / name /
                                                                                        "progress.jsonl").open())]
                for name in ("straight", "resumed")}
    assert progress["resumed"] == progress["straight"]
    # The record at step 10: the resumed process's 3 steps over its own training time (elapsed less pauses, less
    # what the checkpoint's clock had).
    record = json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[1])
    assert record["step"] == 10
    seconds = record["elapsed_s"] - record["paused_s"] - (clock["elapsed_s"] - clock["paused_s"])
    assert record["samples_per_sec"] * seconds == pytest.approx(3 * 16, rel=0.2)


@pytest.mark.scenario
@pytest.mark.timeout(300)
def test_three_ranks_resume_to_identical_parameters(tmp_path: Path) -> None:
    # 500 samples over 3 ranks (167 each, padded) at batch 16: 10 steps in the epoch. With three ranks gloo's sums
    # depend on the gradient bucket layout, which DDP changes after a process's first step: the resumed process's
    # step 5 all-reduced in the first-step layout where the uninterrupted run used the rebuilt one. The resumed
    # process branches from the straight run's step-4 checkpoint (--keep-checkpoints 3 keeps it beside 8 and 10): a
    # launch that stopped at step 4 would only have saved the same state, at the cost of one more 3-rank launch.
    flags = [*EXACT_FLAGS, "--synthetic-train-size", "500", "--epochs", "1", "--checkpoint-every", "4",
             "--keep-checkpoints", "3", "--output-dir", str(tmp_path)]
    step_4 = checkpoint_path(tmp_path / "straight" / "checkpoints", 4)
    for extra in (["--run-name", "straight"], ["--run-name", "resumed", "--resume", str(step_4)]):
        result = torchrun(3, *flags, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 4 (epoch 1, batch 4)" in result.stdout
    assert_resumed_equals_straight(tmp_path, 10)


@pytest.mark.scenario
@pytest.mark.timeout(400)
def test_sigterm_to_every_process_stops_at_one_step_and_resumes_to_identical_parameters(tmp_path: Path) -> None:
    # Slurm's scancel and preemption signal every process of the step: torchrun's agent, which forwards the signal
    # to its workers too, the ranks, and their DataLoader workers. Workers that died of it would make the ranks fail
    # with "DataLoader worker exited unexpectedly" instead of saving a checkpoint. The ranks stop at the same step
    # and exit 0; the agent then re-raises the signal as an exception (exit code 1): torchrun's behaviour, not the
    # workers'. 512 samples, 2 ranks at batch 16: 16 steps per epoch, 32 in all; the signal comes at the first
    # progress line (step 4). One loader worker each is enough to be signalled (each costs an interpreter start),
    # and the straight run needs none: workers hand over the same batches.
    flags = [*EXACT_FLAGS, "--output-dir", str(tmp_path)]
    straight = torchrun(2, *flags, "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped, stop_step = sigterm_then_rerun([*TORCHRUN, TRAIN_SCRIPT, *flags, "--num-workers", "1", "--run-name",
                                             "resumed"], tmp_path / "resumed" / "checkpoints", everyone=True)
    assert "Root Cause" not in stopped.stderr and "exited unexpectedly" not in stopped.stderr, stopped.stderr[-3000:]
    assert stop_step < 32
    assert_resumed_equals_straight(tmp_path, 32)


@pytest.mark.scenario
@pytest.mark.timeout(300)
def test_sighup_to_torchrun_stops_every_worker_with_a_checkpoint(tmp_path: Path) -> None:
    """A terminal or ssh session that closes sends torchrun SIGHUP, which it forwards to its workers (its
    --signals-to-handle default): they died of it where they stood, with no checkpoint and no line. Now they stop as
    on SIGTERM, whose resume to identical parameters the test above shows."""
    checkpoints = tmp_path / "hung" / "checkpoints"
    job = LiveRun([*AS_ON_A_TERMINAL, *TORCHRUN, TRAIN_SCRIPT, *SMOKE_FLAGS, "--epochs", "2", "--checkpoint-every", "0",
                   *PG_TIMEOUT, "--output-dir", str(tmp_path), "--run-name", "hung"])
    job.wait_until(lambda: job.progress_step() > 0, "the first progress line")
    os.kill(job.proc.pid, signal.SIGHUP)
    stopped = job.result()
    match = re.search(STOPPED.format(signal="SIGHUP"), stopped.stdout, re.MULTILINE)
    assert match, f"no stop line\nstdout:\n{stopped.stdout}\nstderr:\n{stopped.stderr[-3000:]}"
    assert list_checkpoints(checkpoints)[0] == checkpoint_path(checkpoints, int(match.group(1)))


@pytest.mark.scenario
@pytest.mark.timeout(300)
def test_sigterm_single_process_saves_exits_zero_and_resumes(tmp_path: Path) -> None:
    flags = [*SMOKE_FLAGS, "--epochs", "1", "--checkpoint-every", "0", "--output-dir", str(tmp_path),
             "--run-name", "preempted"]
    stopped, _ = sigterm_then_rerun([*SINGLE, *flags], tmp_path / "preempted" / "checkpoints")
    assert stopped.returncode == 0, stopped.stderr
    assert "Run the same command to resume." in stopped.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("named", [True, False], ids=["run-name", "default-name"])
def test_the_stop_line_says_how_to_resume_this_very_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str], named: bool) -> None:
    """The same command finds a run again only by its name; a default name is made afresh on every --standalone
    launch, so the line names the --run-name to add (README, "SIGTERM and SIGINT")."""
    monkeypatch.setattr(train_module.Trainer, "log_progress", lambda self: os.kill(os.getpid(), signal.SIGTERM))
    flags = [*SMOKE_FLAGS, "--max-steps", "20", "--log-every", "3", "--output-dir", str(tmp_path)]
    assert main([*flags, *(["--run-name", "preempted"] if named else [])]) == 0
    (run_dir,) = tmp_path.iterdir()
    again = "the same command" if named else f"the same command with --run-name {run_dir.name}"
    assert (f"stopped by SIGTERM at step 3; checkpoint saved in {run_dir / 'checkpoints'}. Run {again} to resume."
            in capsys.readouterr().out.splitlines())


@pytest.mark.timeout(120)
def test_the_stop_line_after_a_resume_from_a_path_says_to_resume_with_auto(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run started with --resume PATH and stopped said "Run the same command to resume.", and the same command
    was refused: the run's own checkpoints had gone past PATH (README, `--resume PATH`)."""
    flags = [*SMOKE_FLAGS, "--max-steps", "20", "--log-every", "3", "--output-dir", str(tmp_path)]
    assert main([*flags, "--max-steps", "3", "--run-name", "base"]) == 0
    start = tmp_path / "base" / "checkpoints" / "step00000003.pt"
    branch = [*flags, "--run-name", "branch", "--resume", str(start)]
    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "log_progress", lambda self: os.kill(os.getpid(), signal.SIGTERM))
        capsys.readouterr()
        assert main(branch) == 0
    stopped = capsys.readouterr().out.splitlines()
    assert (f"stopped by SIGTERM at step 6; checkpoint saved in {tmp_path / 'branch' / 'checkpoints'}. Run the same "
            f"command with --resume auto in place of --resume {start} to resume.") in stopped
    assert main(branch) == 1  # as the line said: the same command would train steps 4-6 again
    assert main([*flags, "--run-name", "branch", "--resume", "auto"]) == 0
    assert "resumed from step 6 " in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_a_rerun_whose_lowered_max_steps_ends_at_or_before_the_stop_says_what_the_run_lacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped mid-epoch at step 3 (no evaluation there: the resumed run evaluates on schedule), then rerun with
    --max-steps 3 or 2: the run is complete, and the line said so as if step 3 were evaluated and as if 2 were the
    run's last step."""
    flags = [*SMOKE_FLAGS, "--log-every", "3", "--eval-every", "2", "--output-dir", str(tmp_path), "--run-name", "low"]
    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "log_progress", lambda self: os.kill(os.getpid(), signal.SIGTERM))
        assert main(flags) == 0
    assert "stopped by SIGTERM at step 3;" in capsys.readouterr().out
    for limit, past in (("3", ""), ("2", ", the run at step 3 already")):
        assert main([*flags, "--max-steps", limit]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            f"run {tmp_path / 'low'} is already complete at step 3 (--max-steps {limit} reached{past}); nothing to do "
            "(its last evaluation is of step 2: the process that reached step 3 was stopped before evaluating it; a "
            "higher --max-steps goes on)")


# ---------------------------------------------------------------------------------------------------------------
# A killed worker under torchrun --max-restarts


def worker_pid(agent_pid: int, rank: int) -> int | None:
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.scenario
@pytest.mark.timeout(400)
def test_killed_worker_is_restarted_and_repeats_at_most_one_interval(tmp_path: Path) -> None:
    # 512 samples, 2 ranks, batch 16: 16 steps per epoch, 32 in all; a checkpoint every 8 steps (and at epoch ends),
    # an evaluation every 4. Progress every step, so the log shows how far the job got before the kill.
    interval, eval_every, total = 8, 4, 32
    flags = [*SMOKE_FLAGS, "--epochs", "2", "--checkpoint-every", str(interval), "--eval-every", str(eval_every),
             "--log-every", "1", "--output-dir", str(tmp_path), *PG_TIMEOUT]
    # No --run-name: the default name must lead the restarted workers back to the first attempt's folder.
    job = LiveRun([*TORCHRUN, "--max-restarts=1", TRAIN_SCRIPT, *flags])
    job.wait_until(lambda: any(list_checkpoints(p) for p in tmp_path.glob("*/checkpoints")), "the first checkpoint")
    # Kill the worker that writes checkpoints, halfway into the next interval.
    job.wait_until(lambda: job.progress_step() >= interval + interval // 2, "progress past the first checkpoint")
    victim = worker_pid(job.proc.pid, rank=0)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    result = job.result(timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    # The survivor's line says what torchrun does next, whenever its SIGTERM came (not "rerun the same command").
    survivor = re.findall(r"^\[rank 1\] error: a collective in .+", result.stderr, re.MULTILINE)
    assert len(survivor) == 1, result.stderr[-3000:]
    assert re.search(r"; the last checkpoint is \S+/step\d{8}\.pt\. torchrun restarts the workers \(restart 1 of 1\) "
                     "and they resume from it; if this repeats, look for", survivor[0]), survivor[0]
    resumed = RESUMED.search(result.stdout)
    assert resumed, "the restarted workers did not resume"
    # Rank 0 prints a step once every rank has finished it (the progress line gathers losses from all ranks).
    last_done = max(int(s) for s in PROGRESS.findall(result.stdout[:resumed.start()]))
    resumed_at = int(resumed.group(1))
    lost = last_done - resumed_at
    print(f"\nkill test: killed after step {last_done}, resumed from {resumed_at}: {lost} steps repeated")
    assert 0 <= lost <= interval

    run_dirs = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(run_dirs) == 1, f"a restart started a new run folder: {run_dirs}"
    assert metrics_steps(run_dirs[0]) == list(range(eval_every, total + 1, eval_every))
    assert list_checkpoints(run_dirs[0] / "checkpoints")[0] == checkpoint_path(run_dirs[0] / "checkpoints", total)


# ---------------------------------------------------------------------------------------------------------------
# Signals

SIGNAL_SCRIPT = """
import os, signal, time
from dist_mnist.preemption import REPEAT_GRACE_S, StopRequest
from dist_mnist.shutdown import failure_path
with {handler} as handler:
    {setup}
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a duplicate (torchrun forwarding a copy): the same request
    time.sleep(0.1)
    print({report}, flush=True)
    time.sleep(REPEAT_GRACE_S + 0.1)
    os.kill(os.getpid(), signal.{insist})  # the user insists: exit at once (no checkpoint)
    time.sleep(30)
print("survived", flush=True)
"""
# A stop request in the training loop, and a run failing when torchrun's SIGTERM comes (it still writes its line
# and ends in order): (handler, what the script does in it first, what it prints, the signal that insists).
SIGNAL_CASES = {
    "stop-request": ("StopRequest()", "pass", '"requested", handler.requested, handler.signal_name', "SIGINT",
                     "requested True SIGTERM"),
    "failure-path": ("failure_path", "handler.begin()", '"still failing in order"', "SIGTERM",
                     "still failing in order"),
}


@pytest.mark.scenario
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", SIGNAL_CASES)
def test_second_signal_exits_at_once(case: str) -> None:
    handler, setup, report, insist, printed = SIGNAL_CASES[case]
    script = SIGNAL_SCRIPT.format(handler=handler, setup=setup, report=report, insist=insist)
    result = LiveRun([sys.executable, "-c", script]).result(timeout=60)
    assert result.stdout.splitlines() == [printed]
    assert result.returncode == -getattr(signal, insist)


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    """The stop signals' handlers of this (pytest's) process, put back after the test."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_sighup_and_sigquit_stop_like_sigterm_unless_the_process_started_with_them_ignored(
        sig: signal.Signals, own_signal_handlers: None) -> None:
    """torchrun forwards SIGHUP and SIGQUIT to its workers as it does SIGTERM and SIGINT (its --signals-to-handle
    default); a closed terminal sends SIGHUP, a Ctrl-\\ SIGQUIT. The workers died of them where they stood."""
    signal.signal(sig, signal.SIG_DFL)
    with StopRequest() as stop:  # the training loop: a stop at the next step boundary
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
    assert stop.signal_name == sig.name
    # Outside the loop (start-up, a finished run's summary): one line and the shell's exit code for the signal.
    signal.signal(sig, signal.SIG_DFL)
    with pytest.raises(Terminated) as raised, FailurePath():
        os.kill(os.getpid(), sig)
        time.sleep(1)
    assert stop_signal(raised.value) == sig and signal_exit_code(sig) == 128 + sig
    # nohup ignores SIGHUP so that a closed terminal leaves the run be: it stays ignored. A shell ignores SIGQUIT
    # (and SIGINT) in its background jobs, where a `kill -QUIT` is still a stop request.
    signal.signal(sig, signal.SIG_IGN)
    with StopRequest() as ignored, FailurePath():
        os.kill(os.getpid(), sig)
        time.sleep(0.01)
    assert ignored.requested is (sig == signal.SIGQUIT)
    if sig == signal.SIGHUP:
        assert signal.getsignal(sig) == signal.SIG_IGN


class _TerminalThatHangsUp(io.StringIO):
    """A terminal or ssh session that closed: after its first line every write to the tty fails with EIO."""

    def write(self, text: str) -> int:
        if "\n" in self.getvalue():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().write(text)


@pytest.mark.timeout(120)
def test_a_hang_up_stops_the_run_with_its_checkpoint_though_the_terminal_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_signal_handlers: None) -> None:
    """A closed terminal sends SIGHUP and fails every later write to it with EIO: the evaluation and progress lines
    printed on the way to the stop raised it, before the stop's checkpoint was written."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as on a terminal (a suite under nohup has it ignored)
    terminal = _TerminalThatHangsUp()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", _TerminalThatHangsUp())
    real = train_module.Trainer.log_progress

    def hang_up(self: train_module.Trainer) -> None:
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGHUP)
        real(self)

    monkeypatch.setattr(train_module.Trainer, "log_progress", hang_up)
    flags = [*SMOKE_FLAGS, "--max-steps", "12", "--log-every", "1", "--eval-every", "2", "--output-dir", str(tmp_path),
             "--run-name", "hung"]
    assert main(flags) == 0
    assert terminal.getvalue().startswith("run ") and terminal.getvalue().count("\n") == 1
    checkpoints = tmp_path / "hung" / "checkpoints"
    assert list_checkpoints(checkpoints)[0] == checkpoint_path(checkpoints, 3)  # a world of one stops at once


AFTER_THE_LOOP_SCRIPT = """
import os, signal, time
from dist_mnist.preemption import REPEAT_GRACE_S, StopRequest
# Python's own handler, as on a terminal: a suite run in the background of a non-interactive shell hands its commands
# SIGINT ignored, and that is what the loop's handler gives back after the grace.
signal.signal(signal.SIGINT, signal.default_int_handler)
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C: the loop stops at the next step and leaves the handler
print("stopping", stop.signal_name, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # the second press of a double Ctrl-C, while the run writes its summary
time.sleep(0.1)
print("summary written", flush=True)
time.sleep(REPEAT_GRACE_S + 0.1)
try:
    os.kill(os.getpid(), signal.SIGINT)  # later: what it did before the loop (Python's KeyboardInterrupt)
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.scenario
@pytest.mark.timeout(60)
def test_a_copy_of_the_stop_signal_after_the_loop_ended_is_the_same_request() -> None:
    """A single process stops within a step: a double Ctrl-C's second press (0.1-0.3 s later) came after the loop
    had put Python's handler back, ended the run while it wrote its summary (exit 130, no summary.json) and made
    the README's "a repeat within 1 s counts as the same request" untrue."""
    result = LiveRun([sys.executable, "-c", AFTER_THE_LOOP_SCRIPT]).result(timeout=45)
    assert result.stdout.splitlines() == ["stopping SIGINT", "summary written", "interrupted"], result.stderr
    assert result.returncode == 0


OUTSIDE_THE_LOOP_SCRIPT = """
import os, signal, time
from dist_mnist.errors import Terminated
from dist_mnist.shutdown import REPEAT_GRACE_S, failure_path
with failure_path:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not raised", flush=True)
    except Terminated:
        print("raised", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the copy torchrun forwards a moment later: not a second Terminated
    time.sleep(0.1)
    print("noted", flush=True)
    time.sleep(REPEAT_GRACE_S + 0.1)
    os.kill(os.getpid(), signal.SIGTERM)  # someone insisting while the first one's cleanup hangs: ended at once
    time.sleep(30)
print("survived", flush=True)
"""


@pytest.mark.scenario
@pytest.mark.timeout(120)
def test_sigterm_outside_the_loop_raises_terminated_once_then_a_later_one_exits_at_once() -> None:
    # Outside the training loop's stop handler (start-up, the summary) a SIGTERM ended the process silently by its
    # default action; it now raises Terminated, which main() turns into one line (tests/test_faults.py).
    result = LiveRun([sys.executable, "-c", OUTSIDE_THE_LOOP_SCRIPT]).result(timeout=60)
    assert result.stdout.splitlines() == ["raised", "noted"]
    assert result.returncode == -signal.SIGTERM


FAILING_RANK_SCRIPT = """
import os, signal, sys
import dist_mnist.train as train

steps = 0
step = train.accumulation_step

def step_then_lose_the_peer(*args):
    global steps
    steps += 1
    if steps == 3:  # what gloo raises in a rank whose peer was killed
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5")
    return step(*args)

settle = train.Trainer.settle_checkpoint_after_failure

def settle_under_sigterm(self):  # torchrun's SIGTERM: the loop's stop handler is gone, the error line not yet written
    os.kill(os.getpid(), signal.SIGTERM)
    settle(self)

train.accumulation_step = step_then_lose_the_peer
train.Trainer.settle_checkpoint_after_failure = settle_under_sigterm
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.scenario
@pytest.mark.timeout(120)
def test_sigterm_while_a_rank_fails_still_lets_it_say_why_and_end_in_order(tmp_path: Path) -> None:
    # torchrun SIGTERMs the other workers the moment one dies. A survivor it reached between its collective's failure
    # and its error line died without a word; one it reached later, in the join of its DataLoader workers, left their
    # queues' semaphores to its resource tracker, which called them leaked.
    flags = [*SMOKE_FLAGS, "--num-workers", "1", "--output-dir", str(tmp_path), "--run-name", "lost-peer"]
    result = LiveRun([sys.executable, "-c", FAILING_RANK_SCRIPT, *flags]).result(timeout=100)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: a collective in the training step (the gradient all-reduce in backward) "
                                    "failed after step 2: "), result.stderr[-3000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]


WORKER_SIGNAL_SCRIPT = """
import os, sys, time
from dist_mnist.preemption import DataWorkerContext, leave_stop_signals_to_the_rank

def worker() -> None:
    leave_stop_signals_to_the_rank(0)
    print("ready", flush=True)
    time.sleep(60)

if __name__ == "__main__":
    process = DataWorkerContext().Process(target=worker, daemon=True)
    process.start()
    print(process.pid, flush=True)
    while not os.path.exists(sys.argv[1]):  # the test signals the worker from outside, then creates the file
        time.sleep(0.05)
    print("alive", process.is_alive(), flush=True)
    process.terminate()  # its own rank: the DataLoader ending a stuck worker
    process.join(10)
    print("exit code", process.exitcode, flush=True)
"""


@pytest.mark.scenario
@pytest.mark.timeout(120)
def test_dataloader_worker_ignores_stop_signals_unless_its_rank_sends_them(tmp_path: Path) -> None:
    script, go_on = tmp_path / "worker_signals.py", tmp_path / "go_on"
    script.write_text(WORKER_SIGNAL_SCRIPT)
    rank = LiveRun([sys.executable, str(script), str(go_on)])
    rank.wait_until(lambda: len(rank.out) > 0, "the worker's pid")
    worker_pid = int(rank.out[0])
    # As torchrun's killpg, Slurm or Ctrl-C would: once while the worker is still starting (importing), once after.
    os.kill(worker_pid, signal.SIGTERM)
    rank.wait_until(lambda: "ready\n" in rank.out, "the worker to get past its start-up", timeout=60)
    os.kill(worker_pid, signal.SIGTERM)
    os.kill(worker_pid, signal.SIGINT)
    time.sleep(0.5)
    go_on.touch()
    result = rank.result(timeout=60)
    assert result.stdout.splitlines()[1:] == ["ready", "alive True", f"exit code {128 + signal.SIGTERM}"]


# ---------------------------------------------------------------------------------------------------------------
# A torchrun agent that is gone


@pytest.mark.parametrize("environ", [{"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_USE_AGENT_STORE": "False"}, {},
                                     {"TORCHELASTIC_RUN_ID": "job"}], ids=["torchrun-worker", "own", "run-id-exported"])
def test_a_worker_whose_agent_is_gone_stops_and_a_process_of_its_own_trains_on(
        environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun a new parent (the agent SIGKILLed, the worker handed to init) is a stop request; a plain
    `nohup python launch/train.py &` whose shell exits is reparented too, and trains on, as does one whose user
    exported TORCHELASTIC_RUN_ID to name the run (only the agent sets TORCHELASTIC_USE_AGENT_STORE)."""
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    stop = StopRequest(torchrun_agent_pid(environ))  # as the session begins, before the rendezvous
    stop.check_agent()
    assert not stop.requested  # the agent (or shell) is still there
    monkeypatch.setattr(os, "getppid", lambda: 1)
    stop.check_agent()
    torchrun_worker = "TORCHELASTIC_USE_AGENT_STORE" in environ
    assert stop.requested is torchrun_worker
    assert stop.signal_name == ("the end of its torchrun agent (process 4242)" if torchrun_worker else None)


@pytest.mark.scenario
@pytest.mark.timeout(300)
def test_workers_of_a_killed_torchrun_agent_stop_with_a_checkpoint_and_the_rerun_resumes(tmp_path: Path) -> None:
    """SIGKILL to the agent alone: its workers (in sessions of their own) trained on and held the run folder, and
    the requeued job was refused as "in use" (review_longrun finding 2)."""
    checkpoints = tmp_path / "orphan" / "checkpoints"
    command = [*TORCHRUN, TRAIN_SCRIPT, *SMOKE_FLAGS, "--epochs", "2", "--checkpoint-every", "0", "--log-every", "1",
               *PG_TIMEOUT, "--output-dir", str(tmp_path), "--run-name", "orphan"]
    job = LiveRun(command, env=cpu_env(PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "inject"), str(REPO)]),
                                       DIST_MNIST_TEST_DELAY="all:data:0.3"))
    job.wait_until(lambda: job.progress_step() > 0, "the first progress line")
    workers = [pid for pid in (worker_pid(job.proc.pid, rank) for rank in (0, 1)) if pid is not None]
    assert len(workers) == 2
    try:
        os.kill(job.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
            assert time.monotonic() < deadline, "the workers trained on without their agent"
            time.sleep(0.1)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    killed = job.result()
    match = re.search(STOPPED.format(signal=r"the end of its torchrun agent \(process \d+\)"), killed.stdout,
                      re.MULTILINE)
    assert match, f"no stop line\nstdout:\n{killed.stdout}\nstderr:\n{killed.stderr[-3000:]}"
    assert list_checkpoints(checkpoints)[0] == checkpoint_path(checkpoints, int(match.group(1)))
    rerun = torchrun(2, *command[len(TORCHRUN) + 1:], timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {match.group(1)} " in rerun.stdout
