"""Checkpoint files and resuming: atomic rotation, safe loading, fallback, compatibility, run folders, NaN stops."""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import SMOKE_FLAGS, Interrupted, InterruptedWait, train

from dist_mnist import checkpoint
from dist_mnist.comm import PowerSGDHookState
from dist_mnist.distributed import DistContext
from dist_mnist.errors import UserError
from dist_mnist.model import MnistCNN
from dist_mnist.recipes import RECIPES
from dist_mnist.rundir import LOCK_FILE
from dist_mnist.train import Trainer, TrainState, main

# A short single-process run with a checkpoint every 4 steps: most tests below resume from a copy of it.
BASE_STEPS, BASE_INTERVAL = 8, 4
BASE_FLAGS = [*SMOKE_FLAGS, "--checkpoint-every", str(BASE_INTERVAL), "--run-name", "run"]


class CodeRunner:
    """A pickle that runs a shell command when unpickled: what a malicious checkpoint file would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def write_crafted_checkpoint(path: Path, marker: Path) -> None:
    payload = CodeRunner(f"touch {shlex.quote(str(marker))}")
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": payload}, path)


def train_in_process(capsys: pytest.CaptureFixture[str], output_dir: Path, *flags: str) -> tuple[int, str, str]:
    """`main()` in this process (no interpreter start-up): returns exit code, stdout, stderr."""
    code = main([*BASE_FLAGS, "--output-dir", str(output_dir), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("base")
    assert main([*BASE_FLAGS, "--output-dir", str(output_dir), "--max-steps", str(BASE_STEPS)]) == 0
    return output_dir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    """A private copy of the base run's output folder; its checkpoints are in run/checkpoints."""
    return Path(shutil.copytree(base_run, tmp_path / "out"))


def checkpoints_of(output_dir: Path) -> Path:
    return output_dir / "run" / "checkpoints"


def single_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def refused(capsys: pytest.CaptureFixture[str], output_dir: Path, *flags: str) -> str:
    """`main()` in this process, refused: exit code 1 and one error line, which is returned."""
    code, _, err = train_in_process(capsys, output_dir, *flags)
    assert code == 1
    return single_error_line(err)


# ---------------------------------------------------------------------------------------------------------------
# The file layer


def save_checkpoint(state: dict[str, object], folder: Path, step: int, keep: int) -> tuple[Path, int]:
    """A checkpoint written in this thread, as the background writer's thread writes it; returns path, bytes."""
    data = checkpoint.serialize(state)
    return checkpoint.write_checkpoint(data, folder, step, keep), len(data)


def test_save_rotates_and_leaves_no_temp_files(tmp_path: Path) -> None:
    for step in (3, 10, 7):  # written out of order: rotation goes by step, not by write time
        path, size = save_checkpoint({"step": step, "w": torch.full((4,), float(step))}, tmp_path, step,
                                                keep=2)
        assert size == path.stat().st_size > 0
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step00000010.pt", "step00000007.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000007.pt", "step00000010.pt"]
    loaded = torch.load(tmp_path / "step00000010.pt", weights_only=True)
    assert torch.equal(loaded["w"], torch.full((4,), 10.0))
    # Resumed from an earlier step with keep=1: the file just written survives the higher-step leftovers.
    save_checkpoint({"step": 5}, tmp_path, 5, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step00000005.pt"]


def test_full_disk_during_write_is_one_error_and_keeps_previous_checkpoint(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    good, _ = save_checkpoint({"step": 1}, tmp_path, 1, keep=1)
    before = good.read_bytes()
    state = {"step": 2, "w": torch.zeros(1000)}
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # the data reached the page cache; the disk refused it
    with pytest.raises(UserError) as failure:
        save_checkpoint(state, tmp_path, 2, keep=1)
    assert str(failure.value).startswith(f"could not write step00000002.pt to {tmp_path}: No space left on device "
                                         f"(it needed {len(buffer.getvalue()):,} bytes there)")
    # No temp file left, the partial file never took a checkpoint's name, and keep=1 rotated nothing away.
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert good.read_bytes() == before


def test_background_writes_go_one_at_a_time_and_a_failure_surfaces_at_the_next_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = checkpoint.BackgroundWriter()
    threads: list[str] = []
    real = checkpoint.write_checkpoint
    release = threading.Event()

    def held_write(*args: object) -> Path:
        threads.append(threading.current_thread().name)
        assert release.wait(timeout=30)  # the training thread goes on meanwhile
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "write_checkpoint", held_write)
    started = time.perf_counter()
    pending = writer.submit(checkpoint.serialize({"step": 4}), tmp_path, 4, 2, started)
    # submit returned while the file is still being written
    assert pending == checkpoint.WrittenCheckpoint(tmp_path / "step00000004.pt", pending.size)
    assert not pending.path.exists()
    release.set()
    writer.submit(checkpoint.serialize({"step": 8}), tmp_path, 8, 2, started)  # waits for step 4's file first
    assert (tmp_path / "step00000004.pt").exists()
    done = writer.wait()
    assert done is not None and done.path == tmp_path / "step00000008.pt" and done.seconds is not None
    assert threads == ["checkpoint-step4", "checkpoint-step8"] and writer.wait() is None
    assert torch.load(done.path, weights_only=True) == {"step": 8}

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    writer.submit(checkpoint.serialize({"step": 12}), tmp_path, 12, 2, started)  # no error yet: it is in flight
    with pytest.raises(UserError, match="^could not write step00000012.pt"):
        writer.submit(checkpoint.serialize({"step": 16}), tmp_path, 16, 2, started)
    assert writer.wait() is None  # the failed write was reported once; step 16 was never started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004.pt", "step00000008.pt"]
    # The raised error and its traceback hold the checkpoint's bytes in a reference cycle. When those bytes were a
    # memoryview of a BytesIO, this collection crashed Python 3.12.1 (checkpoint.serialize says why).
    gc.collect()


def test_a_write_whose_wait_a_raising_signal_handler_interrupted_is_still_finished_and_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's SIGCHLD handler raising in the training thread while it waits for a write (a DataLoader worker the
    out-of-memory killer took): the next wait, the failure's, returned at once on Python 3.10-3.12, the write was
    abandoned half-done and the failure line named a checkpoint never on disk."""
    interrupt = InterruptedWait(checkpoint.BackgroundWriter.wait)
    real = checkpoint.write_checkpoint

    def held_write(*args: Any) -> Path:
        interrupt.hold()
        return real(*args)

    monkeypatch.setattr(checkpoint, "write_checkpoint", held_write)
    writer = checkpoint.BackgroundWriter()
    try:
        writer.submit(checkpoint.serialize({"step": 6}), tmp_path, 6, 2, time.perf_counter())
        with pytest.raises(Interrupted):
            writer.wait()
        interrupt.waiting_again()
        done = writer.wait()
    finally:
        interrupt.give_up()
    assert done is not None and done.path == tmp_path / "step00000006.pt" and done.seconds is not None
    assert torch.load(done.path, weights_only=True) == {"step": 6}


def test_a_failed_rotation_is_a_warning_and_the_run_goes_on_with_its_new_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An older checkpoint that cannot be removed (NFS's EBUSY, another user's file in a shared folder) after the new
    one is safely written: its OSError escaped the writer raw, a traceback that ended the run at the next save."""
    real_unlink = Path.unlink

    def busy(self: Path, missing_ok: bool = False) -> None:
        if self.name == "step00000004.pt":
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", busy)
    assert main([*BASE_FLAGS, "--max-steps", "12", "--keep-checkpoints", "1", "--output-dir", str(tmp_path)]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"warning: step{step:08d}.pt is written, but the rotation (--keep-checkpoints 1) could not "
                        f"remove {checkpoints / 'step00000004.pt'}: Device or resource busy; it stays until a later "
                        "checkpoint's rotation removes it" for step in (8, 12)]
    assert [p.name for p in checkpoint.list_checkpoints(checkpoints)] == ["step00000012.pt", "step00000004.pt"]


def test_any_other_error_of_the_checkpoint_writer_is_one_line_naming_the_thread_and_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> Path:
        raise ValueError("a bug")

    monkeypatch.setattr(checkpoint, "write_checkpoint", broken)
    writer = checkpoint.BackgroundWriter()
    writer.submit(b"x", tmp_path, 3, 1, time.perf_counter())
    with pytest.raises(UserError) as failure:
        writer.wait()
    assert str(failure.value) == (f"the checkpoint writer (thread checkpoint-step3) failed on "
                                  f"{tmp_path / 'step00000003.pt'}: ValueError: a bug")


def test_serialized_checkpoints_are_bytes_of_their_own() -> None:
    data = checkpoint.serialize({"step": 4, "w": torch.arange(3.0)})
    assert type(data) is bytes  # not a view: nothing a garbage collector can free under it
    assert torch.load(io.BytesIO(data), weights_only=True)["step"] == 4


def test_a_run_writes_its_checkpoints_from_a_thread_and_ends_with_them_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    writers: list[str] = []
    real = checkpoint.write_checkpoint

    def spy(*args: object) -> Path:
        writers.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "write_checkpoint", spy)
    assert main([*BASE_FLAGS, "--max-steps", "12", "--output-dir", str(tmp_path)]) == 0
    assert writers == ["checkpoint-step4", "checkpoint-step8", "checkpoint-step12"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")][0] == "step00000012.pt"
    assert re.search(r"last checkpoint: .*step00000012\.pt \(13\.\d MiB, written in \d+ ms\)", capsys.readouterr().out)


def test_a_run_that_fails_during_a_background_write_still_completes_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = checkpoint.write_checkpoint

    def slow_write(*args: object) -> Path:
        time.sleep(0.5)  # still writing when the run fails
        return real(*args)  # type: ignore[arg-type]

    def failing_evaluation(self: Trainer) -> None:
        raise UserError("the evaluation broke")

    monkeypatch.setattr(checkpoint, "write_checkpoint", slow_write)
    monkeypatch.setattr(Trainer, "evaluate_and_record", failing_evaluation)
    assert main([*BASE_FLAGS, "--eval-every", "5", "--output-dir", str(tmp_path)]) == 1
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name != LOCK_FILE) == ["step00000004.pt"]
    assert checkpoint.load_checkpoint(checkpoints / "step00000004.pt")["train_state"]["step"] == 4


def test_rng_state_survives_weights_only_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state, which must round-trip too
    torch.save({"rng": checkpoint.rng_state(torch.device("cpu"))}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], torch.device("cpu"))
    again = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_crafted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    evil, marker = tmp_path / "evil.pt", tmp_path / "payload-ran"
    write_crafted_checkpoint(evil, marker)
    with pytest.raises(UserError, match=r"refused: it references posix\.system.*arbitrary unpickling"):
        checkpoint.load_checkpoint(evil)
    assert not marker.exists()


NOT_A_CHECKPOINT = r"is not a checkpoint: neither a torch\.save archive nor a pickle \(the files are "


@pytest.mark.parametrize(("bad", "said"), [
    (b"", r"is unreadable \(truncated or corrupt: EOFError\)$"),  # a write a full disk cut at its start
    (b"PK\x03\x04 and then nothing of a zip",
     r"is unreadable \(truncated or corrupt: its zip directory does not read: File is not a zip file\)$"),
    (b"not a zip file at all", NOT_A_CHECKPOINT),
    # Text whose first bytes are pickle opcodes: torch's pickle machine failed on them with an IndexError ("r", ")")
    # or a KeyError ("h"), a traceback where this line belongs.
    (b"run crashed\n", NOT_A_CHECKPOINT), (b"hi\n", NOT_A_CHECKPOINT), (b")", NOT_A_CHECKPOINT),
    # A pickle another program wrote: protocol 4's FRAME is an opcode the safe loader does not read. Refused for
    # that, not as "needing arbitrary unpickling", and without torch's warning about the protocol on a line before.
    (pickle.dumps({"step": 1}, protocol=4),
     r"is not a checkpoint: a pickle the safe loader does not read \(Unsupported operand 149; torch\.save writes "
     r"protocol 2 in a zip archive\)$"),
])
def test_a_file_that_is_no_checkpoint_is_one_user_error(tmp_path: Path, bad: bytes, said: str,
                                                        recwarn: pytest.WarningsRecorder) -> None:
    (tmp_path / "bad.pt").write_bytes(bad)
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(tmp_path / 'bad.pt'))} {said}"):
        checkpoint.load_checkpoint(tmp_path / "bad.pt")
    assert not recwarn.list


# ---------------------------------------------------------------------------------------------------------------
# Resuming through the command line


@pytest.mark.timeout(120)
def test_a_resume_under_other_rounding_settings_says_so(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    """--amp, --channels-last and the like may change on a resume (a requeue onto another kind of node), but the
    resumed run then no longer equals an uninterrupted one: one note says which settings changed, from what."""
    saved = checkpoint.load_checkpoint(checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS))["numerics"]
    assert saved["device"] == "cpu" and saved["channels_last"] is True
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 1))
    assert code == 0, err
    assert f"resumed from step {BASE_STEPS} " in out and "note: this run continues" not in out
    # The hook is no such setting in a world of one (no DDP, README: ignored there): a note that named it said the
    # numbers would differ where they did not.
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 2), "--channels-last", "off",
                                      "--ddp-comm-hook", "fp16")
    assert code == 0, err
    assert ("note: this run continues with other settings than the checkpoint's (--channels-last on -> off): "
            "training goes on correctly, but its numbers will differ in the last bits and in dropout's random masks "
            "from a run that was never interrupted") in out.splitlines()
    # A run already complete continues nothing: no note.
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 2), "--channels-last", "on")
    assert code == 0, err
    assert "already complete" in out and "note: this run continues" not in out


def test_rounding_settings_of_checkpoints_before_they_were_saved_draw_no_note() -> None:
    assert checkpoint.numerics_changes(None, {"amp": "off"}) is None
    assert checkpoint.numerics_changes({"amp": "bfloat16"}, {"amp": "bfloat16", "compile": True}) is None


@pytest.mark.parametrize(("saved", "current", "changed", "masks"), [
    # Another thread count splits a CPU operator's sums otherwise (an fp32 --deterministic resume was 4e-8 off).
    ({"threads": 2}, {"threads": 1}, "--threads 2 -> 1", False),
    # Dropout draws its mask in the activation's memory order: fc1 one whole update off after one step.
    ({"channels_last": True}, {"channels_last": False}, "--channels-last on -> off", True),
    # inductor's compiled code draws its own masks; aot_eager's are eager's.
    ({"compile": True, "compile_backend": "inductor"}, {"compile": False}, "--compile on -> off", True),
    ({"compile": True}, {"compile": False}, "--compile on -> off", True),  # before the backend was saved: inductor
    ({"compile": True, "compile_backend": "aot_eager"}, {"compile": False}, "--compile on -> off", False),
    ({"compile": True, "compile_backend": "inductor"}, {"compile": True, "compile_backend": "eager"},
     "--compile-backend inductor -> eager", True),
    ({"compile": True, "compile_backend": "eager"}, {"compile": True, "compile_backend": "aot_eager"},
     "--compile-backend eager -> aot_eager", False),
])
def test_the_note_says_which_changes_draw_other_dropout_masks(saved: dict[str, object], current: dict[str, object],
                                                               changed: str, masks: bool) -> None:
    differ = "in the last bits and in dropout's random masks" if masks else "in the last bits"
    assert checkpoint.numerics_changes(saved, current) == (
        f"note: this run continues with other settings than the checkpoint's ({changed}): training goes on "
        f"correctly, but its numbers will differ {differ} from a run that was never interrupted")


POWERSGD_DIFFERS = "by more than rounding (PowerSGD all-reduces a low-rank approximation of the gradients)"


@pytest.mark.parametrize(("saved", "current", "changed", "differ"), [
    # Switching PowerSGD on or off changes what each step all-reduces: fc1 0.02 off (its largest weight 0.064)
    # after 20 steps, not "in the last bits".
    ({"ddp_comm_hook": "powersgd"}, {"ddp_comm_hook": "none"}, "--ddp-comm-hook powersgd -> none", POWERSGD_DIFFERS),
    ({"ddp_comm_hook": "bf16"}, {"ddp_comm_hook": "powersgd"}, "--ddp-comm-hook bf16 -> powersgd", POWERSGD_DIFFERS),
    ({"ddp_comm_hook": "powersgd", "channels_last": True}, {"channels_last": False, "ddp_comm_hook": "bf16"},
     "--channels-last on -> off, --ddp-comm-hook powersgd -> bf16",
     f"{POWERSGD_DIFFERS} and in dropout's random masks"),
    # bf16 and fp16 round the same gradients otherwise.
    ({"ddp_comm_hook": "bf16"}, {"ddp_comm_hook": "fp16"}, "--ddp-comm-hook bf16 -> fp16", "in the last bits"),
    ({"ddp_comm_hook": "powersgd", "amp": "off"}, {"ddp_comm_hook": "powersgd", "amp": "bfloat16"},
     "--amp off -> bfloat16", "in the last bits"),
])
def test_the_note_says_a_powersgd_change_differs_by_more_than_rounding(
        saved: dict[str, object], current: dict[str, object], changed: str, differ: str) -> None:
    assert checkpoint.numerics_changes(saved, current) == (
        f"note: this run continues with other settings than the checkpoint's ({changed}): training goes on "
        f"correctly, but its numbers will differ {differ} from a run that was never interrupted")


# -- files crafted to exhaust the loader (review_security F5-F7) ---------------------------------------------------


def rewritten_archive(data: bytes, change: Callable[[bytes], bytes] = lambda pickled: pickled,
                      compressed: Callable[[str], bool] = lambda name: False) -> bytes:
    """A torch.save archive written again by zipfile: its pickle changed by `change`, and the records `compressed`
    names DEFLATEd, which torch.save never does and torch.load still inflates."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            record = source.read(info)
            archive.writestr(info.filename, change(record) if info.filename.endswith("/data.pkl") else record,
                             zipfile.ZIP_DEFLATED if compressed(info.filename) else zipfile.ZIP_STORED)
    return out.getvalue()


NESTED_HERE = "a list nested 100000 deep goes here"


def nested_100000_deep(pickled: bytes) -> bytes:
    """The pickle with NESTED_HERE (a BINUNICODE string) replaced by a list nested 100,000 deep: 100,000 EMPTY_LISTs,
    each APPENDed to the one below. torch.save itself cannot write one: pickling recurses."""
    string = b"X" + struct.pack("<I", len(NESTED_HERE)) + NESTED_HERE.encode()
    assert pickled.count(string) == 1
    return pickled.replace(string, b"]" * 100_000 + b"a" * 99_999)


def laughs(depth: int) -> list[Any]:
    """A list holding one list twice, `depth` times over: a few bytes a level in the pickle (its memo), 2^depth places
    to a walk as a tree (a "billion laughs")."""
    shared: list[Any] = [0]
    for _ in range(depth):
        shared = [shared, shared]
    return shared


def with_junk(value: object, change: Callable[[bytes], bytes] = lambda pickled: pickled) -> Callable[[bytes], bytes]:
    """A damage for test_unreadable_newest_checkpoint_falls_back_to_previous: the checkpoint with `value` added, its
    pickle then changed by `change`."""
    def damage(data: bytes) -> bytes:
        state = torch.load(io.BytesIO(data), weights_only=True)
        state["junk"] = value
        return rewritten_archive(checkpoint.serialize(state), change)
    return damage


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("damage", "said"), [
    (lambda data: data[: len(data) // 2], "is unreadable (truncated or corrupt: "),
    # Bytes that are no checkpoint at all: this one made torch's pickle machine raise an IndexError, which ended
    # every rerun in a traceback with the file left in place.
    (lambda data: b"run crashed\n", "is not a checkpoint: "),
    # Each retried on every restart, never set aside: a resume that hung at 100% CPU for ever, a RecursionError
    # traceback, and a zip bomb inflated in full (review_security F5, F7, F6).
    (with_junk(laughs(60)), "is malformed: junk.1 is the same list as junk.0: "),
    (with_junk(NESTED_HERE, nested_100000_deep), "is malformed: junk nests containers more than 32 deep"),
    (lambda data: rewritten_archive(data, compressed=lambda name: name.endswith("/data.pkl")),
     "was refused: its record 'archive/data.pkl' is compressed (deflate), which torch.save never writes"),
], ids=["truncated", "text", "shared", "deep", "compressed"])
def test_unreadable_newest_checkpoint_falls_back_to_previous(capsys: pytest.CaptureFixture[str], run_copy: Path,
                                                            damage: Callable[[bytes], bytes], said: str) -> None:
    newest = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS)
    newest.write_bytes(damage(newest.read_bytes()))
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 2))
    assert code == 0, err
    assert f"warning: checkpoint {newest} {said}" in err
    assert "renamed it to step00000008.pt.unreadable, trying the previous checkpoint" in err
    assert f"resumed from step {BASE_STEPS - BASE_INTERVAL} " in out
    assert newest.with_name("step00000008.pt.unreadable").is_file()  # kept for inspection, out of the rotation


@pytest.mark.timeout(120)
def test_a_run_none_of_whose_checkpoints_loads_is_not_started_over(capsys: pytest.CaptureFixture[str],
                                                                   run_copy: Path) -> None:
    """Every checkpoint unreadable (a damaged disk, a format this version does not read): starting again from step 0
    would write over the run's records, so the run stops with one line and leaves them."""
    for path in checkpoint.list_checkpoints(checkpoints_of(run_copy)):
        path.write_bytes(path.read_bytes()[:1000])
    records = {name: (run_copy / "run" / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    code, _, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 2))
    assert code == 1
    assert err.count("warning: checkpoint ") == 2
    assert err.strip().splitlines()[-1] == (
        f"error: none of the 2 checkpoint(s) in {checkpoints_of(run_copy)} loads (each is set aside as *.unreadable, "
        "see the warnings above), and starting again from step 0 would write over this run's records; give --resume "
        "a checkpoint that loads, or start afresh under another --run-name")
    assert {name: (run_copy / "run" / name).read_bytes() for name in records} == records


def test_a_flipped_bit_in_a_checkpoints_tensors_is_found(tmp_path: Path) -> None:
    """torch.load does not check the zip's CRC-32s: a bit flipped in the tensor data loads as a wrong weight."""
    path = tmp_path / "step00000004.pt"
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": {"w": torch.ones(1000)}}, path)
    data = bytearray(path.read_bytes())
    data[data.index(torch.ones(1000).numpy().tobytes()) + 100] ^= 0x40  # torch.save stores tensors uncompressed
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["w"][25] != 1.0  # what torch.load alone would train on
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(path))} is damaged: its record \S+/data/0 "
                                        r"fails its CRC-32 check"):
        checkpoint.load_checkpoint(path)


@pytest.mark.timeout(120)
def test_crafted_checkpoint_given_as_path_is_refused(tmp_path: Path) -> None:
    """Through the real command line: a one-line error, no traceback, and the payload never runs."""
    evil, marker = tmp_path / "evil.pt", tmp_path / "payload-ran"
    write_crafted_checkpoint(evil, marker)
    result = train(*BASE_FLAGS, "--output-dir", str(tmp_path / "out"), "--resume", str(evil))
    assert result.returncode == 1
    line = single_error_line(result.stderr)
    assert str(evil) in line and "refused" in line and "arbitrary unpickling" in line
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_crafted_checkpoint_in_run_is_skipped(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    marker = run_copy / "payload-ran"
    evil = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS + 4)  # the newest by name
    write_crafted_checkpoint(evil, marker)
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 1))
    assert code == 0, err
    assert f"warning: checkpoint {evil} was refused" in err and "arbitrary unpickling" in err
    assert f"resumed from step {BASE_STEPS} " in out
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_checkpoint_of_another_model_is_refused(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    state = torch.load(checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS), weights_only=True)
    state["model"]["fc1.weight"] = torch.zeros(64, 9216)  # a narrower hidden layer
    other = run_copy / "other.pt"
    torch.save(state, other)
    line = refused(capsys, run_copy, "--resume", str(other))
    assert "does not fit the model" in line and "fc1.weight" in line


@pytest.mark.timeout(120)
def test_checkpoint_of_another_recipe_is_refused(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    before = sorted(p.name for p in checkpoints_of(run_copy).iterdir())
    line = refused(capsys, run_copy, "--batch-size", "32")
    assert "--batch-size 16 (recipe cpu), this run has 32 (recipe cpu)" in line
    assert sorted(p.name for p in checkpoints_of(run_copy).iterdir()) == before


def test_checkpoint_trained_without_grad_clip_is_refused_under_one(capsys: pytest.CaptureFixture[str],
                                                                   run_copy: Path) -> None:
    # Clipping rescales the gradients of every step whose norm exceeds it: resumed under another value the run
    # silently trained a model neither value would give.
    line = refused(capsys, run_copy, "--grad-clip", "0.5")
    assert "--grad-clip 0.0 (recipe cpu), this run has 0.5 (recipe cpu)" in line


def test_checkpoint_of_another_named_recipe_is_refused(capsys: pytest.CaptureFixture[str], run_copy: Path) -> None:
    # The smoke flags give --batch-size explicitly, so the cuda recipe changes --epochs first (and --lr).
    code, _, err = train_in_process(capsys, run_copy, "--recipe", "cuda")
    assert code == 1
    cpu, cuda = RECIPES["cpu"].epochs, RECIPES["cuda"].epochs
    assert cpu != cuda and f"--epochs {cpu} (recipe cpu), this run has {cuda} (recipe cuda)" in single_error_line(err)


def test_compatibility_check_names_the_mismatch() -> None:
    model = MnistCNN()
    state = {"model_class": "MnistCNN", "model": {**model.state_dict(), "extra.weight": torch.zeros(1)},
             "config": {"batch_size": 16}}
    with pytest.raises(UserError, match="extra.weight"):
        checkpoint.check_compatible(state, model, {"batch_size": 16}, "x.pt", "cpu")
    with pytest.raises(UserError, match="holds a ResNet, not a MnistCNN"):
        checkpoint.check_compatible({**state, "model_class": "ResNet"}, model, {}, "x.pt", "cpu")


@pytest.mark.parametrize(("checkpoint_dir", "advice"), [
    ("", "--resume never with a new --run-name"),
    # Found by --checkpoint-dir, not by the run's name: a new --run-name was refused there in turn.
    ("/shared/ck", "another --checkpoint-dir (this one holds a run with other settings)")])
def test_a_refused_checkpoint_names_a_way_out_that_works(checkpoint_dir: str, advice: str) -> None:
    model = MnistCNN()
    state = {"model_class": "MnistCNN", "model": model.state_dict(), "config": {"lr": 0.002}, "recipe": "cpu"}
    with pytest.raises(UserError) as refused:
        checkpoint.check_compatible(state, model, {"lr": 0.001, "checkpoint_dir": checkpoint_dir}, "x.pt", "cpu")
    assert str(refused.value) == ("checkpoint x.pt was trained with --lr 0.002 (recipe cpu), this run has 0.001 "
                                  f"(recipe cpu); use the same value or recipe, or {advice}")


@pytest.mark.timeout(120)
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(capsys: pytest.CaptureFixture[str],
                                                              run_copy: Path) -> None:
    # Make the newest checkpoint diverge when resumed: an absurd learning rate hidden in the optimizer state, so the
    # config still matches and no test-only flag is needed.
    newest = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS)
    state = torch.load(newest, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = 1e30
    state["scheduler"]["base_lrs"] = [1e30 for _ in state["scheduler"]["base_lrs"]]
    torch.save(state, newest)
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 3 * BASE_INTERVAL))
    assert code == 1
    line = single_error_line(err)
    assert f"the last good checkpoint is {newest}" in line
    bad_step = int(line.split("non-finite at step ")[1].split(";")[0])
    assert BASE_STEPS < bad_step <= BASE_STEPS + BASE_INTERVAL
    # Nothing was saved after the loss went bad: the checkpoint the message names is still the newest.
    assert checkpoint.list_checkpoints(checkpoints_of(run_copy))[0] == newest


@pytest.mark.timeout(120)
def test_weights_an_update_made_non_finite_are_never_checkpointed(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 4's loss is finite, its update leaves a NaN weight (an overflow): the checkpoint of step 4 is not
    written, the one of step 2 (the only one kept, --keep-checkpoints 1) stays, and the line says why. Before, that
    checkpoint was written, rotated step 2's away, and the next step's NaN loss named it "the last good
    checkpoint"."""
    import dist_mnist.train

    update = dist_mnist.train.accumulation_step

    def overflowing_update(parts: Any, micro_batches: Any, timer: Any) -> torch.Tensor:
        loss = update(parts, micro_batches, timer)
        if parts.scheduler.last_epoch == 4:  # the step just taken
            with torch.no_grad():
                parts.module.fc1.weight[0, 0] = float("nan")
        return loss

    monkeypatch.setattr(dist_mnist.train, "accumulation_step", overflowing_update)
    code, _, err = train_in_process(capsys, tmp_path, "--max-steps", "12", "--checkpoint-every", "2",
                                    "--keep-checkpoints", "1")
    assert code == 1
    folder = checkpoints_of(tmp_path)
    good = checkpoint.checkpoint_path(folder, 2)
    assert single_error_line(err) == (
        "error: the training state became non-finite by step 4 (model.fc1.weight holds NaN) while the training loss "
        f"stayed finite; stopped (the last good checkpoint is {good}). Lower --lr, or use --grad-clip")
    assert checkpoint.list_checkpoints(folder) == [good]
    checkpoint.load_checkpoint(good)


def _poison(state: dict[str, Any], where: str) -> None:
    with torch.no_grad():
        if where == "weight":
            state["model"]["fc1.weight"][0, 0] = float("nan")
        elif where == "moment":
            state["optimizer"]["state"][4]["exp_avg_sq"][0, 0] = float("inf")
        else:  # a PowerSGD residual, in the shape PowerSGDHookState.state_dict gives (this run has no hook)
            state["comm_hook"] = {"ranks": [{"error": {0: torch.tensor([0.0, float("nan")])}}]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "said"), [("weight", "model.fc1.weight holds NaN"),
                                             ("moment", "optimizer.state.4.exp_avg_sq holds an infinity"),
                                             ("residual", "comm_hook.ranks.0.error.0 holds NaN")])
def test_a_checkpoint_holding_non_finite_values_is_set_aside_or_refused(
        capsys: pytest.CaptureFixture[str], run_copy: Path, tmp_path: Path, where: str, said: str) -> None:
    """A checkpoint with a floating-point tensor that is not finite (written by an older version, or edited), saved
    whole with valid CRCs: --resume auto sets it aside and resumes from the previous one, --resume PATH refuses it.
    Before, both resumed it and stopped at the first step's NaN loss, naming it "the last good checkpoint". The line
    says what is checked and what follows; it said "would compute NaN from its first step", untrue of an infinite
    AdamW second moment, which leaves the weights finite and that weight's updates zero (review_session F4, F5)."""
    newest = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS)
    state = torch.load(newest, weights_only=True)
    _poison(state, where)
    torch.save(state, newest)
    kept = tmp_path / "kept.pt"
    shutil.copy(newest, kept)
    problem = (f"holds non-finite values ({said}), checked in every floating-point tensor of its training state (the "
               "weights, the optimizer's moments, PowerSGD's residuals): a run resumed from it would not train as it "
               "should (a NaN weight makes every loss NaN, an infinite AdamW second moment freezes that weight's "
               "updates)")
    code, out, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 2))
    assert code == 0, err
    assert f"warning: checkpoint {newest} {problem}; renamed it to step00000008.pt.unreadable, trying the previous " \
        "checkpoint" in err
    assert f"resumed from step {BASE_STEPS - BASE_INTERVAL} " in out
    assert newest.with_name("step00000008.pt.unreadable").is_file()
    line = refused(capsys, tmp_path / "branch", "--resume", str(kept))
    assert line == f"error: checkpoint {kept} {problem}"


def test_non_finite_tensors_are_found_under_dotted_names_another_tensor_also_has() -> None:
    """Tensors were kept in a dict by dotted name: of two with one name ({"a": {"b": ...}} and {"a.b": ...}, or the
    keys 0 and "0" that optimizer and PowerSGD state mix), only the last was checked (review_session F6)."""
    nan, inf, ok = torch.tensor([float("nan")]), torch.tensor([1.0, float("inf")]), torch.ones(2)
    assert checkpoint.non_finite_entry({"a": {"b": nan}, "a.b": ok}) == "a.b holds NaN"
    assert checkpoint.non_finite_entry({"state": {0: inf, "0": ok}}) == "state.0 holds an infinity"
    assert checkpoint.non_finite_entry({"a": {"b": ok}, "a.b": ok, "state": {0: ok, "0": ok}}) is None


# ---------------------------------------------------------------------------------------------------------------
# Run folders


def folder_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run_files(output_dir: Path) -> dict[str, tuple[int, int]]:
    """folder_snapshot of the files in the run folder "run" but its locks, whose holder line is signed by whoever
    holds the folder."""
    return {name: stat for name, stat in folder_snapshot(output_dir / "run").items()
            if (output_dir / "run" / name).is_file() and Path(name).name != LOCK_FILE}


@pytest.mark.timeout(120)
def test_resume_never_on_existing_run_fails_without_touching_it(capsys: pytest.CaptureFixture[str], run_copy: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    before = folder_snapshot(run_copy / "run")
    code, _, err = train_in_process(capsys, run_copy, "--resume", "never")
    assert code == 1
    assert "already exists" in single_error_line(err)
    assert folder_snapshot(run_copy / "run") == before
    # A SLURM requeue runs the job's command again: with `never` it would start over the first attempt's files.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    line = refused(capsys, run_copy, "--resume", "never")
    assert line == (
        f"error: run folder {run_copy / 'run'} already exists and --resume never would start again from step 0 over "
        "it (this is a restart of the job, which runs the same command again: --resume auto continues from the last "
        "checkpoint); pick another --run-name (nothing was overwritten)")
    assert folder_snapshot(run_copy / "run") == before


@pytest.mark.timeout(120)
def test_resume_path_behind_the_runs_own_checkpoints_is_refused_and_a_restart_takes_the_newest(
        capsys: pytest.CaptureFixture[str], run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--resume PATH` into a run whose checkpoints went further would train those steps again over their files; a
    torchrun restart runs the same command, PATH included, and must not go back to PATH every time."""
    older = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_INTERVAL)
    branch = Path(shutil.copy(older, run_copy / "branch.pt"))  # the rotation removes `older` once the run goes on
    before = run_files(run_copy)
    assert refused(capsys, run_copy, "--resume", str(older), "--max-steps", str(BASE_STEPS + 4)) == (
        f"error: this run's checkpoints go up to step {BASE_STEPS} "
        f"({checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS)}); --resume {older} (step "
        f"{BASE_INTERVAL}) would train the steps after it again and overwrite them. Use --resume auto to continue "
        "from the newest, or a new --run-name to branch from that file (nothing was changed)")
    assert run_files(run_copy) == before
    # The newest itself is what `auto` would take: accepted.
    newest = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS)
    code, out, err = train_in_process(capsys, run_copy, "--resume", str(newest), "--max-steps", str(BASE_STEPS + 2))
    assert code == 0, err
    assert f"resumed from step {BASE_STEPS} " in out
    # A restart of the job's command continues from the newest, with a note that says so, also where the file
    # --resume names is gone.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, out, err = train_in_process(capsys, run_copy, "--resume", str(branch), "--max-steps", str(BASE_STEPS + 4))
    assert code == 0, err
    assert (f"note: a restart continues from this run's newest checkpoint, step {BASE_STEPS + 2}, not from "
            f"--resume {branch} (step {BASE_INTERVAL})") in out.splitlines()
    assert f"resumed from step {BASE_STEPS + 2} " in out
    assert not older.exists()
    code, out, err = train_in_process(capsys, run_copy, "--resume", str(older), "--max-steps", str(BASE_STEPS + 6))
    assert code == 0, err
    assert (f"note: a restart continues from this run's newest checkpoint, step {BASE_STEPS + 4}, not from "
            f"--resume {older} (checkpoint {older} does not exist)") in out.splitlines()


@pytest.mark.timeout(120)
def test_resume_path_into_another_runs_folder_is_refused_and_one_of_the_same_run_is_not(
        capsys: pytest.CaptureFixture[str], run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--resume PATH` of another run, with --run-name of a run behind PATH's step, replaced that run's
    metrics.jsonl, config.json and summary.json with PATH's run's and put its checkpoints beside the folder's own,
    with no word (review_combos finding 1)."""
    code, _, err = train_in_process(capsys, run_copy, "--run-name", "other", "--max-steps", str(BASE_STEPS + 2))
    assert code == 0, err
    path = checkpoint.checkpoint_path(run_copy / "other" / "checkpoints", BASE_STEPS + 2)
    before = run_files(run_copy)
    for restarted in ("0", "1"):  # a torchrun restart runs the same command again
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restarted)
        assert refused(capsys, run_copy, "--resume", str(path), "--max-steps", str(BASE_STEPS + 4)) == (
            f"error: this run's checkpoints (up to {checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS)})"
            f" are not an earlier point of the run of --resume {path} (step {BASE_STEPS + 2}): the evaluation records "
            f"of the newest that loads, step{BASE_STEPS:08d}.pt, are not those of that run; resuming that file here "
            "would replace this run's records. Use --resume auto to continue this run, or a new --run-name to branch "
            "from that file (nothing was changed)")
        assert run_files(run_copy) == before
    # A later checkpoint of the run itself, kept elsewhere, continues it.
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    code, _, err = train_in_process(capsys, run_copy, "--max-steps", str(BASE_STEPS + 2))
    assert code == 0, err
    later = checkpoint.checkpoint_path(checkpoints_of(run_copy), BASE_STEPS + 2)
    kept = Path(shutil.move(later, run_copy / "kept.pt"))
    code, out, err = train_in_process(capsys, run_copy, "--resume", str(kept), "--max-steps", str(BASE_STEPS + 3))
    assert code == 0, err
    assert f"resumed from step {BASE_STEPS + 2} (epoch 1, batch {BASE_STEPS + 2}) of {kept}" in out


@pytest.mark.timeout(120)
def test_existing_folder_without_checkpoint_is_refused_unless_restarted(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty folder is what a run that failed during start-up leaves behind: it is reused.
    (tmp_path / "run").mkdir()
    elsewhere = str(tmp_path / "elsewhere")
    code, _, err = train_in_process(capsys, tmp_path, "--max-steps", "1", "--checkpoint-dir", elsewhere)
    assert code == 0, err
    # A folder holding a run's files but no checkpoint is somebody's results: refused, also with a file to resume
    # from (whose records would replace the folder's).
    for resume in ([], ["--resume", str(checkpoint.list_checkpoints(Path(elsewhere))[0])]):
        code, _, err = train_in_process(capsys, tmp_path, "--max-steps", "1", *resume)
        assert code == 1
        assert "already exists and holds no checkpoint" in single_error_line(err)
    # A worker that torchrun restarted before the first checkpoint reuses its own folder, and says why it starts at
    # step 0 (a restart that resumes says "resumed from step N").
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    code, out, err = train_in_process(capsys, tmp_path, "--max-steps", "1")
    assert code == 0, err
    assert ("torchrun restart 1 of 3: the run wrote no checkpoint before the failure, so it starts again from step 0"
            in out.splitlines())
    assert checkpoint.list_checkpoints(checkpoints_of(tmp_path))


def test_in_process_runs_leave_nothing_behind() -> None:
    """The runs above share this process with later tests: no process group or signal handler may outlive them."""
    assert not dist.is_initialized()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path: Path) -> None:
    """The process that died went past its last checkpoint, and the resumed one writes those steps again: TensorBoard
    must show the resumed process's records of them only, and a rerun of the complete run adds no event file."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer  # slow import

    flags = [*SMOKE_FLAGS, "--tensorboard", "--max-steps", "12", "--checkpoint-every", "4", "--log-every", "2",
             "--eval-every", "4", "--output-dir", str(tmp_path), "--run-name", "tb"]
    assert main(flags) == 0
    (tmp_path / "tb" / "checkpoints" / "step00000012.pt").unlink()  # died after step 12, before its checkpoint
    first = set((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert main(flags) == 0  # resumes from step 8
    assert main(flags) == 0  # complete: nothing to do
    events = set((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events - first) == 1
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    for tag, steps in (("train/loss", [2, 4, 6, 8, 10, 12]), ("eval/test_accuracy", [4, 8, 12])):
        shown = multiplexer.Tensors("tb", tag)
        assert [event.step for event in shown] == steps
        # The steps after the checkpoint are the resumed process's records, newer than any of the first process's.
        last_of_first = max(event.wall_time for event in shown if event.step <= 8)
        assert all(event.wall_time > last_of_first for event in shown if event.step > 8)


def test_a_resume_without_tensorboard_still_hides_what_a_dead_process_wrote_past_the_checkpoint(
        tmp_path: Path) -> None:
    """--tensorboard may change on a resume: a process resumed with --no-tensorboard wrote no purge marker, and the
    killed process's records past the checkpoint stayed in TensorBoard, unlike progress.jsonl and metrics.jsonl."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer  # slow import

    flags = [*SMOKE_FLAGS, "--max-steps", "12", "--checkpoint-every", "4", "--log-every", "2", "--eval-every", "4",
             "--output-dir", str(tmp_path), "--run-name", "tb"]
    assert main([*flags, "--tensorboard"]) == 0
    (tmp_path / "tb" / "checkpoints" / "step00000012.pt").unlink()  # died after step 12, before its checkpoint
    assert main([*flags, "--no-tensorboard"]) == 0  # resumes from step 8
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    for tag, steps in (("train/loss", [2, 4, 6, 8]), ("eval/test_accuracy", [4, 8])):
        assert [event.step for event in multiplexer.Tensors("tb", tag)] == steps


def test_a_folder_or_a_file_of_another_kind_given_to_resume_is_named_as_such(base_run: Path, tmp_path: Path) -> None:
    """--resume given the run or checkpoints folder, or the run's config.json: said as what it is, with the file to
    give (a folder read as 'truncated or corrupt', a JSON file as one 'needing arbitrary unpickling')."""
    run = base_run / "run"
    newest_name = f"step{BASE_STEPS:08d}.pt"
    for folder, newest in ((run, f"checkpoints/{newest_name}"), (run / "checkpoints", newest_name)):
        with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(folder))} is a folder; give a checkpoint "
                                            rf"file in it \(the newest is {newest}\), or --resume auto"):
            checkpoint.load_checkpoint(folder)
    with pytest.raises(UserError, match=r"is a folder; give a checkpoint file, or"):
        checkpoint.load_checkpoint(tmp_path)
    with pytest.raises(UserError, match=r"config\.json is not a checkpoint: neither a torch\.save archive nor a "
                                        r"pickle"):
        checkpoint.load_checkpoint(run / "config.json")


# -- crafted contents: values of the wrong type or range are one line naming the field -------------------------


def crafted_copy(base_run: Path, tmp_path: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    """The base run's newest checkpoint, changed by `change` and saved again as torch.save would."""
    state = torch.load(checkpoints_of(base_run) / f"step{BASE_STEPS:08d}.pt", weights_only=True)
    change(state)
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    return path


def _set(*keys: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value
    return change


@pytest.mark.parametrize(("change", "said"), [
    (_set("train_state", "step", value="abc"), "train_state.step is 'abc', not a whole number from 0 to 2\\*\\*63 - 1"),
    (_set("train_state", "step", value=-5), "train_state.step is -5, not a whole number from 0 to 2\\*\\*63 - 1"),
    (_set("train_state", "epoch", value=-10**9), "train_state.epoch is -1000000000, not a whole number from 0 to "
                                                 "2\\*\\*63 - 1"),
    (_set("train_state", "epoch", value=10**9), "train_state.epoch 1000000000 is past the [0-9]+ epochs of its config"),
    (_set("train_state", "batch_in_epoch", value=2.5), "train_state.batch_in_epoch is 2.5, not a whole number"),
    (lambda state: state.pop("train_state"), "train_state is None, not a dict"),
    (lambda state: state.pop("config"), "config is None, not a dict"),
    (_set("model", value=[1, 2]), r"model is \[1, 2\], not a dict"),
    (_set("model", "fc1.weight", value=[1.0]), r"model entry 'fc1.weight' is \[1.0\], not a tensor"),
    (_set("rng", value=[]), "rng holds 0 entries, not one per process of its world of 1"),
    (_set("rng", value=[{"torch": 1, "cuda": [], "numpy": [], "python": 3}]), r"rng\[0\].torch is 1, not a generator"),
    (lambda state: state["rng"][0].__setitem__("numpy", [[1, 2], 0, 0, 0.0]), r"rng\[0\].numpy is not numpy's"),
    (lambda state: state["rng"][0].__setitem__("python", (3, (1, 2), None)), r"rng\[0\].python is not Python's"),
    (_set("world_size", value="1"), "world_size is '1', not a whole number from 1 to 2\\*\\*63 - 1"),
    (_set("world_size", value=0), "world_size is 0, not a whole number from 1 to 2\\*\\*63 - 1"),
    # As large as the safe loader reads (its LONG1: 255 bytes): past any count, and shown by its size, not its 601
    # digits (it used to pass, for a line about an rng list of 10**600 entries).
    (_set("world_size", value=10**600), "world_size is a 1994-bit integer, not a whole number from 1 to "
                                         "2\\*\\*63 - 1"),
    (_set("train_state", "metrics", value=[1]), r"train_state.metrics\[0\] is 1, not a dict"),
    (_set("train_state", "metrics", value=[{"step": 10**6, "test_accuracy": 0.5}]),
     r"train_state.metrics\[0\].step 1000000 is past the checkpoint's step 8"),
    (_set("train_state", "metrics", value=[{"step": 4, "test_accuracy": torch.ones(1)}]),
     r"train_state.metrics\[0\].test_accuracy is tensor\(\[1.\]\), not a number or a word"),
    (_set("clock", "elapsed_s", value="x"), "clock.elapsed_s is 'x', not a finite number >= 0"),
    (_set("train_loss", value=[[1.0]]), r"train_loss\[0\] is \[1.0\], not a \[sum, count\] pair"),
    (_set("progress", "loss_count", value="x"), "progress.loss_count is 'x', not a whole number from 0 to "
                                                "2\\*\\*63 - 1"),
    # A list there made the resume note's set of hooks a TypeError traceback.
    (_set("numerics", "ddp_comm_hook", value=["bf16"]), r"numerics.ddp_comm_hook is \['bf16'\], not a setting"),
])
def test_a_checkpoint_with_crafted_values_is_one_error_naming_the_field(
        base_run: Path, tmp_path: Path, change: Callable[[dict[str, Any]], object], said: str) -> None:
    path = crafted_copy(base_run, tmp_path, change)
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(path))} is malformed: {said}") as excinfo:
        checkpoint.load_checkpoint(path)
    assert "\n" not in str(excinfo.value)


def test_the_checkpoints_this_program_writes_pass_the_checks(base_run: Path) -> None:
    for path in checkpoint.list_checkpoints(checkpoints_of(base_run)):
        checkpoint.load_checkpoint(path)


def in_itself() -> list[Any]:
    cycle: list[Any] = []
    cycle.append(cycle)
    return cycle


def tuple_laughs(depth: int) -> tuple[Any, ...]:
    shared: tuple[Any, ...] = (0,)
    for _ in range(depth):
        shared = (shared, shared)
    return shared


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("junk", "said"), [
    # 500 bytes: non_finite_entry went through its 2^60 places, and the resume hung at 100% CPU for ever.
    (laughs(60), r"junk\.1 is the same list as junk\.0: a container held in two places, or inside itself, which a "
                 r"walk over it as a tree would go through over and over, or for ever"),
    (in_itself(), r"junk\.0 is the same list as junk: "),
    (tuple_laughs(60), r"junk\.1 is the same tuple as junk\.0: "),
    # A tuple of plain values may recur (test_tuples_torch_save_shares_still_load), but not without end: each
    # reference is a few bytes of pickle and the whole tuple again to every walk.
    ([tuple(range(100))] * 200, r"it holds the same tuples in place after place \(more than 10000 items again, up "
                                r"to junk\.101\), which every walk over it would go through again each time"),
], ids=["laughs", "cycle", "tuples", "repeated"])
def test_a_checkpoint_a_walk_would_go_through_for_ever_is_one_line_at_once(base_run: Path, tmp_path: Path,
                                                                         junk: object, said: str) -> None:
    """A checkpoint of shared references: the weights-only loader builds what the pickle's memo says, and every walk
    over the state as a tree (non_finite_entry, _check_structure's repr of a bad value, the compatibility checks)
    went through each place of it again (review_security F5)."""
    path = crafted_copy(base_run, tmp_path, _set("junk", value=junk))
    assert path.stat().st_size < 15 * 2**20  # the base checkpoint's 13.8 MiB and a few bytes
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(path))} is malformed: {said}.*\(not as this "
                                        r"program writes it\)$"):
        checkpoint.load_checkpoint(path)


def test_tuples_torch_save_shares_still_load(base_run: Path, tmp_path: Path) -> None:
    """torch.save memoizes a tuple it meets twice, so the loaded state holds one tuple in both places: AdamW's param
    groups share the betas of its defaults, and every empty tuple is Python's one `()`. Tuples of plain values are
    no walk's trap: they load."""
    weights = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    two_groups = torch.optim.AdamW([{"params": [weights[0]]}, {"params": [weights[1]]}]).state_dict()
    path = crafted_copy(base_run, tmp_path, _set("junk", value={"optimizer": two_groups, "empty": [(), ()]}))
    junk = checkpoint.load_checkpoint(path)["junk"]
    groups = junk["optimizer"]["param_groups"]
    assert groups[0]["betas"] is groups[1]["betas"] and junk["empty"][0] is junk["empty"][1]


@pytest.mark.timeout(30)
def test_a_checkpoint_nested_100000_deep_is_one_line_not_a_recursion_error(base_run: Path, tmp_path: Path) -> None:
    """The weights-only loader builds a list nested 100,000 deep without recursing; non_finite_entry then ended the
    resume in a RecursionError traceback (review_security F7)."""
    path = crafted_copy(base_run, tmp_path, _set("junk", value=NESTED_HERE))
    path.write_bytes(rewritten_archive(path.read_bytes(), nested_100000_deep))
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(path))} is malformed: junk nests containers "
                                        r"more than 32 deep, where this program's checkpoints nest 5 \(not as this "
                                        r"program writes it\)$"):
        checkpoint.load_checkpoint(path)


def declaring(data: bytes, suffix: str, size: int) -> bytes:
    """The archive with the central directory entry of the record whose name ends with `suffix` declaring `size`
    bytes, compressed and not (its local header, and its bytes, as they were)."""
    patched = bytearray(data)
    at = patched.find(b"PK\x01\x02")
    while at >= 0:
        name_length = struct.unpack_from("<H", patched, at + 28)[0]
        if bytes(patched[at + 46:at + 46 + name_length]).endswith(suffix.encode()):
            struct.pack_into("<II", patched, at + 20, size, size)  # compressed size, uncompressed size
            return bytes(patched)
        at = patched.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"no record {suffix}")


def _with_junk_record_zipfile_rejects(data: bytes) -> bytes:
    """The archive, its records compressed, with a record more whose extra field claims more bytes than it has:
    zipfile gives up on the archive where torch's reader skips the field and inflates the rest."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info))
        junk = zipfile.ZipInfo("archive/junk")
        junk.extra = struct.pack("<HH", 0x9999, 16) + b"ab"
        archive.writestr(junk, b"x")
    return out.getvalue()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("craft", "said"), [
    # torch.load inflated it: 1 MB of DEFLATEd zeros took 1 GiB of memory before any check (here 4 kB of zeros).
    (lambda data: rewritten_archive(data, compressed=lambda name: True),
     r"was refused: its record 'archive/data\.pkl' is compressed \(deflate\), which torch\.save never writes; it is "
     r"not read, as a small file can inflate to gigabytes in memory \(a zip bomb\)$"),
    (lambda data: rewritten_archive(data, compressed=lambda name: name.endswith("/data/0")),
     r"was refused: its record 'archive/data/0' is compressed \(deflate\), which torch\.save never writes; "),
    (lambda data: declaring(data, "/data/0", 2**30),
     r"was refused: its records declare 107[0-9]{7} bytes, more than the [0-9]+ of the file, which torch\.save "
     r"never writes; it is not read$"),
    (_with_junk_record_zipfile_rejects,
     r"is unreadable \(truncated or corrupt: its zip directory does not read: Corrupt extra field 9999 "
     r"\(size=16\)\)$"),
], ids=["compressed", "compressed-tensor", "declared-size", "zipfile-rejects"])
def test_a_checkpoint_zip_bomb_is_refused_unread(tmp_path: Path, craft: Callable[[bytes], bytes], said: str) -> None:
    """torch.save stores every record as it is; a compressed record, or records declaring more bytes than the file
    holds, are refused before torch.load reads them (review_security F6). Small archives: what they would inflate to
    does not matter, only that nothing reads them."""
    buffer = io.BytesIO()
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": {"w": torch.zeros(1000)}}, buffer)
    path = tmp_path / "step00000004.pt"
    path.write_bytes(craft(buffer.getvalue()))
    with pytest.raises(UserError, match=rf"^checkpoint {re.escape(str(path))} {said}"):
        checkpoint.load_checkpoint(path)


def _params_of_group_0(value: object) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["optimizer"]["param_groups"][0].__setitem__("params", value)


@pytest.mark.parametrize(("change", "said"), [
    # A fused AdamW moment of another shape than its parameter: a segmentation fault at the first step.
    (lambda state: state["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)),
     r"does not load into this run: its optimizer state of parameter 0: exp_avg has the shape \(3,\), the "
     r"parameter \(32, 1, 3, 3\)"),
    (lambda state: state["optimizer"]["state"][0].pop("exp_avg_sq"),
     "its optimizer state of parameter 0 lacks exp_avg_sq"),
    (_params_of_group_0([0]), r"its optimizer state's param_groups\[0\] holds the parameters \[0\]"),
    # A tensor there made the comparison itself raise ("Boolean value of Tensor ... is ambiguous").
    (_params_of_group_0(torch.arange(8)), r"its optimizer state's param_groups\[0\] holds the parameters tensor"),
    (lambda state: state["optimizer"]["param_groups"][0].__setitem__("lr", "fast"),
     r"its optimizer state's param_groups\[0\].lr is 'fast', where this run has"),
    (lambda state: state["scheduler"].__setitem__("step", 1), "its scheduler state holds 'step', which"),
    (lambda state: state["scheduler"].__setitem__("last_epoch", -3), "its scheduler state's last_epoch is -3"),
    # A count past any run's: LambdaLR's float of it was an OverflowError traceback at the first step.
    (lambda state: state["scheduler"].__setitem__("last_epoch", 10**600),
     "its scheduler state's last_epoch is a 1994-bit integer, past any count a run keeps"),
    # Past the checks: the scheduler's own load_state_dict fails on it (KeyError), said as one line too.
    (lambda state: state.__setitem__("scheduler", {"x": 1}),
     r"does not load into this run: its scheduler state was refused \(KeyError: 'lr_lambdas'\)"),
    (_set("train_state", "batch_in_epoch", value=10**12),
     "is malformed: train_state.batch_in_epoch 1000000000000 is past the end of an epoch of this run"),
])
def test_a_checkpoint_whose_parts_do_not_fit_this_run_is_one_line_and_leaves_nothing(
        capsys: pytest.CaptureFixture[str], base_run: Path, tmp_path: Path,
        change: Callable[[dict[str, Any]], object], said: str) -> None:
    path = crafted_copy(base_run, tmp_path, change)
    output_dir = tmp_path / "out"
    line = refused(capsys, output_dir, "--run-name", "new", "--resume", str(path))
    assert re.match(rf"error: checkpoint {re.escape(str(path))} .*{said}", line), line
    assert not (output_dir / "new").exists()  # a failed start leaves nothing behind: the same command can run again


def test_a_private_scheduler_field_of_another_torch_version_is_let_through(
        capsys: pytest.CaptureFixture[str], base_run: Path, tmp_path: Path) -> None:
    """A checkpoint of the pinned torch resumed under the GPU machines' older one (or the other way) may hold a
    private field the other's LambdaLR lacks: a plain value there is no reason to refuse the resume."""
    path = crafted_copy(base_run, tmp_path, lambda state: state["scheduler"].__setitem__("_added_later", True))
    step = checkpoint.load_checkpoint(path)["train_state"]["step"]
    code, out, err = train_in_process(capsys, tmp_path / "out", "--run-name", "new", "--resume", str(path),
                                      "--max-steps", str(step + 1))
    assert code == 0, err
    assert f"resumed from step {step} " in out


def _in_thread(call: Callable[[], object], fifo: Path) -> object:
    """`call`'s result, or a test failure where it blocks on `fifo` (which is then opened to let it go)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except UserError as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader's open returns, and it reads EOF
        thread.join(timeout=20)
        pytest.fail(f"blocked opening the FIFO {fifo}")
    return result[0]


def test_a_fifo_named_like_a_checkpoint_is_refused_not_waited_on(run_copy: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "step00000001.pt"
    os.mkfifo(fifo)
    error = _in_thread(lambda: checkpoint.load_checkpoint(fifo), fifo)
    assert isinstance(error, UserError)
    assert str(error) == (f"checkpoint {fifo} is not a regular file (a FIFO); the files are <run "
                          "folder>/checkpoints/step*.pt")
    # In the run's own folder, --resume auto sets it aside with the usual warning and takes the previous one.
    folder = checkpoints_of(run_copy)
    fifo = folder / "step99999998.pt"
    os.mkfifo(fifo)
    found = _in_thread(lambda: checkpoint.find_resume_checkpoint(folder), fifo)
    assert isinstance(found, tuple) and found[0] == checkpoint.checkpoint_path(folder, BASE_STEPS)
    assert "is not a regular file (a FIFO)" in capsys.readouterr().err
    assert (folder / "step99999998.pt.unreadable").exists() and not fifo.exists()


def _powersgd_checkpoint(change: Callable[[dict[str, Any]], object]) -> tuple[PowerSGDHookState, dict[str, Any]]:
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo", control_group=None)
    saved = PowerSGDHookState(MnistCNN(), ctx, start_iter=2)
    # A bucket of fc1's weight (parameter 4: 128 x 9216), which compresses: the residual is whole, P and Q of its
    # approximation's rank (128 and 9216 elements per rank).
    saved.orders[0] = [4]
    saved.state.error_dict[0], saved.state.p_memory_dict[0], saved.state.q_memory_dict[0] = (
        torch.zeros(size) for size in saved._pieces([4])[0])
    state = saved.state_dict()
    change(state)
    return PowerSGDHookState(MnistCNN(), ctx, start_iter=2), state


@pytest.mark.parametrize(("change", "said"), [
    (lambda state: state.__setitem__("ranks", []), "its ranks are"),
    (lambda state: state["ranks"][0].__setitem__("iter", "x"), r"ranks\[0\].iter is x, not a whole number"),
    (lambda state: state["ranks"][0]["p"].__setitem__(0, torch.zeros(5)),
     r"ranks\[0\].p\[0\] holds 5 elements of torch.float32, not the [0-9]+ floats"),
    (lambda state: state["ranks"][0]["error"].__setitem__(0, torch.zeros(3)), r"ranks\[0\].error\[0\] holds 3"),
    (lambda state: state["ranks"][0]["orders"].__setitem__(0, [99]), r"ranks\[0\].orders is not a dict"),
    (lambda state: state["ranks"][0]["rng"].__setitem__("keys", 5), r"ranks\[0\].rng is not numpy's"),
])
def test_a_powersgd_state_that_does_not_fit_is_refused_on_load(change: Callable[[dict[str, Any]], object],
                                                               said: str) -> None:
    hook_state, state = _powersgd_checkpoint(lambda state: None)
    hook_state.load_state_dict(state)  # as saved, it loads
    hook_state, state = _powersgd_checkpoint(change)
    with pytest.raises(ValueError, match=said):
        hook_state.load_state_dict(state)


def test_an_evaluation_at_a_max_steps_limit_leaves_the_eval_every_cadence_where_it_was(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A run extended past a --max-steps limit evaluates at the steps the uninterrupted run does, the limit's record
    kept as that invocation's end (review_longrun finding 4: 4, 5, 9, 13, 16, ...)."""
    flags = ("--synthetic-train-size", "256", "--synthetic-test-size", "50", "--epochs", "1", "--eval-every", "4",
             "--checkpoint-every", "0")
    for max_steps in ("5", "0"):
        code, _, err = train_in_process(capsys, tmp_path, *flags, "--max-steps", max_steps)
        assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 5, 8, 12, 16]


def test_the_evaluation_anchor_is_saved_and_an_older_checkpoint_counts_from_its_last_record() -> None:
    state = TrainState(step=5)
    state.record_evaluation({"step": 4}, cadence=True)
    state.record_evaluation({"step": 5}, cadence=False)  # the --max-steps limit's
    assert state.steps_since_evaluation() == 0 and not state.evaluation_due(4)
    resumed = TrainState()
    resumed.load_state_dict(state.state_dict())
    resumed.step = 8
    assert resumed.eval_anchor_step == 4 and resumed.evaluation_due(4)
    older = {k: v for k, v in state.state_dict().items() if k != "eval_anchor_step"}
    resumed.load_state_dict(older)
    assert resumed.eval_anchor_step == 5

