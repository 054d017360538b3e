"""Shared test helpers: tiny MNIST-format IDX files, subprocess runs that cannot hang, a CPU-only environment."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = str(REPO / "launch" / "train.py")
# Small but learnable: the synthetic dataset at these sizes keeps a 2-rank run to a few seconds.
SMOKE_FLAGS = ["--dataset", "synthetic", "--synthetic-train-size", "512", "--synthetic-test-size", "203",
               "--batch-size", "16", "--eval-batch-size", "50", "--log-every", "4", "--peak-tflops", "1",
               "--no-tensorboard"]


def readme_table_row(first_cell: str) -> str:
    """The README line of a table whose row starts with the code-formatted `first_cell` (a run file's name)."""
    return next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith(f"| `{first_cell}` |"))


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: CPU only, one thread per rank, loopback networking, no downloads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK", "LOCAL_RANK",
                                                                       "WORLD_SIZE", "MASTER_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="session", autouse=True)
def torchrun_log_dir() -> Iterator[None]:
    """torchrun's --log-dir defaults to a new `torchelastic_*` folder in /tmp per launch, which it never removes (about
    200 piled up on a dev machine): a session's launches share one folder instead, removed at the session's end.
    PET_LOG_DIR is torchrun's variable for the flag, and cpu_env passes it on."""
    with tempfile.TemporaryDirectory(prefix="dist_mnist_torchrun_logs_", ignore_cleanup_errors=True) as folder, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("PET_LOG_DIR", folder)
        yield


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def kill_tree(pid: int) -> None:
    """Kill a command started in its own session and everything below it. A killpg of its group is not enough:
    torchrun starts each worker in a session of its own, and the workers (and their DataLoader workers) survived
    their agent, holding the test's pipes open."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


# The commands the running test started (run, LiveRun), killed with everything below them when it ends: a test ended
# by pytest-timeout (an exception inside its wait) or by a failed assertion leaves none of them training on.
STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def no_command_outlives_its_test() -> Iterator[None]:
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def start(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    """A command in its own session, its output piped, killed with its whole tree when the test ends."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cpu_env(),
                            cwd=cwd, start_new_session=True)
    STARTED.append(proc)
    return proc


def run(args: list[str], timeout: float = 180, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """Run a command in its own session; on timeout kill it with everything below it and fail the test."""
    proc = start(args, env, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return Result(proc.returncode, out, err)


def train(*flags: str, timeout: float = 180, env: dict[str, str] | None = None) -> Result:
    """`python launch/train.py FLAGS` (a world of one)."""
    return run([sys.executable, TRAIN_SCRIPT, *flags], timeout=timeout, env=env)


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """One intra-op thread, as cpu_env gives a launched rank (a second one only spins on CI's 2 cores); the test
    process's own count comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_in_process(*flags: str) -> Result:
    """`dist_mnist.train.main(FLAGS)` in the test's process: a world of one as `train` runs it, without the ~5 CPU-s
    of a process start (import torch, torch._dynamo). Output is captured at the file descriptors, where torch's C++
    side writes too, so `stdout` and `stderr` hold what a launched run would have printed; usable in fixtures of
    any scope, unlike capfd."""
    from dist_mnist.train import main

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, one_intra_op_thread():
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            # Python's writes go through the same descriptors, line by line, so both sides' lines keep their order.
            with open(1, "w", buffering=1, closefd=False) as to_out, \
                    open(2, "w", buffering=1, closefd=False) as to_err, \
                    redirect_stdout(to_out), redirect_stderr(to_err), warnings.catch_warnings(record=True) as caught:
                # The warnings a fresh interpreter prints, each once, on stderr (pytest would only list them).
                warnings.resetwarnings()
                for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", category)
                code = main(list(flags))
                for warning in caught:
                    to_err.write(warnings.formatwarning(warning.message, warning.category, warning.filename,
                                                        warning.lineno, warning.line))
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return Result(code, out.read(), err.read())


def torchrun(nproc: int, *flags: str, timeout: float = 240, torchrun_flags: tuple[str, ...] = (),
             env: dict[str, str] | None = None) -> Result:
    """`torchrun --standalone --nproc-per-node=N launch/train.py FLAGS` (picks a free port itself)."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                *torchrun_flags, TRAIN_SCRIPT, *flags], timeout=timeout, env=env)


def gradient(parameter: torch.Tensor) -> torch.Tensor:
    """`parameter`'s gradient, which a backward pass must have made (torch types it as optional)."""
    assert parameter.grad is not None
    return parameter.grad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (the MNIST format: magic 0x0000080N, big-endian dims, raw bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + tensor.dim()) + b"".join(struct.pack(">I", d) for d in tensor.shape)
    path.write_bytes(header + tensor.to(torch.uint8).contiguous().numpy().tobytes())


def make_mnist_dir(root: Path, train_size: int = 300, test_size: int = 101) -> Path:
    """A data dir holding MNIST/raw/ with four small, valid IDX files; returns `root`."""
    from dist_mnist.data import synthetic_splits

    train, test = synthetic_splits(train_size, test_size)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", train.images)
    write_idx(raw / "train-labels-idx1-ubyte", train.labels)
    write_idx(raw / "t10k-images-idx3-ubyte", test.images)
    write_idx(raw / "t10k-labels-idx1-ubyte", test.labels)
    return root


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    return make_mnist_dir(tmp_path / "data")


def real_mnist_dir() -> str | None:
    """The real MNIST root from DIST_MNIST_DATA, when it holds the four files."""
    root = os.environ.get("DIST_MNIST_DATA")
    if root and all((Path(root) / "MNIST" / "raw" / n).is_file() for n in (
            "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte")):
        return root
    return None


class FakeEvent:
    """A CUDA event's interface on the CPU: record() reads a clock; made and recorded events are counted."""
    made = 0

    def __init__(self) -> None:
        FakeEvent.made += 1
        self.at: float | None = None
        self.records = 0

    def record(self) -> None:
        self.at = time.perf_counter()
        self.records += 1

    def synchronize(self) -> None:
        assert self.at is not None, "synchronize on an event never recorded"

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return (end.at - self.at) * 1e3  # ms, as CUDA's


def main_thread_blocked_in(code: CodeType) -> bool:
    """Whether the main thread is blocked in threading's waits (a join, an Event) called from the function whose
    code is `code`: a state another thread can wait for instead of a timing."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None or not frame.f_code.co_filename.endswith("threading.py"):
        return False
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


class Interrupted(Exception):
    """What InterruptedWait's signal handler raises in the main thread, as torch's SIGCHLD handler raises a dead
    DataLoader worker's error wherever the main thread is."""


class InterruptedWait:
    """A thread's work that the main thread waits for, with a signal handler that raises interrupting that wait
    once: `hold()`, called in the thread, signals the main thread once it is blocked in `function` (a state read
    from its frames, not a timing), then returns only once the main thread waits in `function` again after
    `waiting_again()`, or has given up (`give_up()`). Python 3.10-3.12 marked a thread whose join such a handler
    interrupted as finished (cpython#90882): the second wait returned at once and the work was abandoned."""

    def __init__(self, function: Callable[..., object]) -> None:
        self.code = function.__code__
        self.again, self.given_up = threading.Event(), threading.Event()
        self.previous = signal.signal(signal.SIGUSR1, self._raise)

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise Interrupted()

    def hold(self) -> None:
        while not main_thread_blocked_in(self.code):
            self.given_up.wait(0.001)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
        while not (self.again.is_set() and main_thread_blocked_in(self.code)) and not self.given_up.is_set():
            self.given_up.wait(0.001)

    def waiting_again(self) -> None:
        self.again.set()

    def give_up(self) -> None:
        self.given_up.set()
        signal.signal(signal.SIGUSR1, self.previous)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-MNIST runs (`slow`, minutes each) first: under .ci/run's workers (`--dist loadfile
    --no-loadscope-reorder`), files go out in this order, so the file holding them starts at once instead of
    ending the run alone while the other worker idles. A stable sort: the rest keep their order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
