"""Speed modes are correct, not just fast: bf16 learns like fp32, `--amp auto` resolves per CPU and is recorded,
the GradScaler is on only for fp16 and its state survives checkpoints, gradients are unscaled before clipping,
compiled and uncompiled runs share checkpoints, and channels_last computes what the contiguous layout does.

Covered elsewhere: fp16 refused on CPU (`tests/test_e2e.py::test_bad_input_is_one_error_line[fp16-on-cpu]`); the
fast input pipeline gives the torchvision pipeline's batches (`tests/test_data.py::test_fast_*_pipeline_matches_
torchvision`)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE_FLAGS, gradient, one_intra_op_thread

import dist_mnist.train as train_module
from dist_mnist import caches
from dist_mnist.caches import (
    COMPILE_CACHE_VARIABLES,
    check_compile_caches,
    inductor_cache_dir,
    torch_default_inductor_cache_dir,
)
from dist_mnist.config import TrainConfig
from dist_mnist.data import normalize, synthetic_splits
from dist_mnist.distributed import DistContext, distributed_session
from dist_mnist.errors import UserError
from dist_mnist.metrics import StepTimer
from dist_mnist.model import MnistCNN
from dist_mnist.train import (
    SpeedSettings,
    TrainParts,
    build_train_parts,
    emulated_bf16_note,
    main,
    resolve_speed_settings,
    train_step,
)

CPU = torch.device("cpu")
INITIAL_LOSS = math.log(10)  # cross-entropy of a uniform guess over 10 classes


def train_here(output_dir: Path, run_name: str, *flags: str) -> Path:
    """`main()` in this process on the smoke data (no interpreter start-up); returns the run folder. On one
    intra-op thread, as a launched rank."""
    with one_intra_op_thread():
        code = main([*SMOKE_FLAGS, "--output-dir", str(output_dir), "--run-name", run_name, "--timeout-s", "60",
                     *flags])
    assert code == 0, f"run {run_name} exited with {code}"
    return output_dir / run_name


def read_json(run_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((run_dir / name).read_text())


def final_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def load_checkpoint(run_dir: Path, step: int) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / f"step{step:08d}.pt", map_location="cpu", weights_only=True)


# fp16 autocast on a CPU has no fast kernels: a training step of 16 images took 2.3 s, of 4 images 0.6 s (one
# thread, 2-core Intel CPU, torch 2.14.1). What the fp16 tests check (the scaler's state and its unscaling) does not
# depend on the batch's size.
FP16_BATCH = ("--batch-size", "4")


def force_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 autocast with an enabled GradScaler on CPU: the CUDA-only mode's scaler logic, testable here."""
    resolve = train_module.resolve_speed_settings
    monkeypatch.setattr(train_module, "resolve_speed_settings",
                        lambda cfg, device: dataclasses.replace(resolve(cfg, device), amp_dtype=torch.float16))


@pytest.fixture
def world_of_one() -> Iterator[DistContext]:
    """A real process group of one (in-process store, no port), as DDP in build_train_parts needs."""
    with distributed_session(TrainConfig(device="cpu")) as ctx:
        yield ctx


def build_parts(ctx: DistContext, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                grad_clip: float = 0.0) -> TrainParts:
    cfg = TrainConfig(grad_clip=grad_clip, seed=0)
    return build_train_parts(cfg, ctx, SpeedSettings(amp_dtype, channels_last, data_on_device=False), total_steps=10)


def smoke_batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = synthetic_splits(size, 1)
    return train.images, train.labels


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision: bf16 learns like fp32; auto resolves per CPU and is recorded


@pytest.fixture(scope="module")
def fp32_and_default_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Same seed and steps (1.5 epochs, evaluated at 32 and 48): plain fp32 versus the defaults on a CPU with
    native bf16 (auto -> bf16 autocast + channels_last)."""
    output_dir = tmp_path_factory.mktemp("amp")
    steps = ["--max-steps", "48"]
    fp32 = train_here(output_dir, "fp32", "--amp", "off", "--channels-last", "off", *steps)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: True)
        default = train_here(output_dir, "default", *steps)
    return {"fp32": fp32, "default": default}


@pytest.mark.timeout(120)
def test_bf16_reaches_the_loss_of_fp32(fp32_and_default_runs: dict[str, Path]) -> None:
    fp32, bf16 = (final_record(fp32_and_default_runs[name]) for name in ("fp32", "default"))
    assert fp32["step"] == bf16["step"] == 48
    # Tolerances in units of the initial loss, so a change of recipe (label smoothing, learning rate) keeps them
    # meaningful: bf16 rounding moves the trajectory a little (observed gaps 0.01-0.04 ln 10), a broken autocast
    # (wrong dtype, lost gradients) leaves the loss near ln 10.
    # The training loss carries dropout and label smoothing, so only the plain test loss must fall far.
    for record in (fp32, bf16):
        assert record["test_loss"] < 0.25 * INITIAL_LOSS, record
    assert bf16["test_loss"] == pytest.approx(fp32["test_loss"], abs=0.1 * INITIAL_LOSS)
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], abs=0.1 * INITIAL_LOSS)


@pytest.mark.timeout(120)
def test_config_json_records_the_resolved_amp_and_channels_last(fp32_and_default_runs: dict[str, Path]) -> None:
    fp32, default = (read_json(fp32_and_default_runs[name], "config.json") for name in ("fp32", "default"))
    assert (fp32["amp"], fp32["channels_last"]) == ("off", "off")
    assert (fp32["resolved"]["amp"], fp32["resolved"]["channels_last"]) == ("off", False)
    assert (default["amp"], default["channels_last"]) == ("auto", "auto")
    assert (default["resolved"]["amp"], default["resolved"]["channels_last"]) == ("bfloat16", True)


@pytest.mark.parametrize(("amp", "native_bf16", "expected"), [
    ("auto", True, torch.bfloat16),
    ("auto", False, None),
    ("bf16", False, torch.bfloat16),  # asked for explicitly: emulated, slower, still correct
    ("off", True, None),
])
def test_amp_on_cpu_resolves_by_native_bf16(monkeypatch: pytest.MonkeyPatch, amp: str, native_bf16: bool,
                                            expected: torch.dtype | None) -> None:
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: native_bf16)
    settings = resolve_speed_settings(TrainConfig(amp=amp), CPU)
    assert settings.amp_dtype == expected
    assert not settings.data_on_device  # a CPU has no device memory to keep the dataset in


@pytest.mark.timeout(120)
def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_said_once_and_not_taken_as_the_yardstick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An emulated bf16 step was 11x slower than fp32 on a 2-core AMD EPYC, and an emulated 1024^3 bf16 matmul 6-7 s:
    the run says so at its start, and its MFU is measured against float32, which emulated bf16 computes in."""
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    measured: list[torch.dtype] = []

    def peak(device: torch.device, dtype: torch.dtype) -> float:
        measured.append(dtype)
        return 1e12

    monkeypatch.setattr(train_module, "measure_matmul_peak", peak)
    run_dir = train_here(tmp_path, "emulated", "--amp", "bf16", "--max-steps", "2", "--peak-tflops", "0")
    assert capsys.readouterr().out.count("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so --amp bf16 "
                                         "runs emulated") == 1
    assert measured == [torch.float32]
    assert read_json(run_dir, "summary.json")["peak_source"] == "measured float32 matmul, bf16 being emulated"
    assert read_json(run_dir, "config.json")["resolved"]["amp"] == "bfloat16"  # asked for: still obeyed


@pytest.mark.parametrize(("amp", "native_bf16"), [("auto", False), ("off", False), ("bf16", True), ("auto", True)])
def test_no_emulation_note_where_bf16_is_native_or_not_used(monkeypatch: pytest.MonkeyPatch, amp: str,
                                                            native_bf16: bool) -> None:
    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: native_bf16)
    assert emulated_bf16_note(resolve_speed_settings(TrainConfig(amp=amp), CPU)) is None


@pytest.mark.parametrize("flag", ["auto", "off"])
def test_data_on_device_is_off_on_cpu(flag: str) -> None:
    assert not resolve_speed_settings(TrainConfig(data_on_device=flag), CPU).data_on_device


def test_data_on_device_on_is_refused_on_cpu() -> None:
    """Asked for explicitly, it used to become off without a word."""
    with pytest.raises(UserError, match=r"^--data-on-device on needs CUDA"):
        resolve_speed_settings(TrainConfig(data_on_device="on"), CPU)


@pytest.mark.parametrize(("flag", "expected"), [("auto", True), ("on", True), ("off", False)])
def test_channels_last_flag_resolves(flag: str, expected: bool) -> None:
    assert resolve_speed_settings(TrainConfig(channels_last=flag), CPU).channels_last is expected


# ---------------------------------------------------------------------------------------------------------------
# GradScaler: fp16 only, unscaled before clipping, kept in checkpoints


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_grad_scaler_is_enabled_only_for_fp16(world_of_one: DistContext, amp_dtype: torch.dtype | None) -> None:
    assert build_parts(world_of_one, amp_dtype).scaler.is_enabled() == (amp_dtype == torch.float16)


def test_grad_clip_sees_unscaled_gradients_and_bounds_their_norm(world_of_one: DistContext,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    max_norm = 0.05
    clip = torch.nn.utils.clip_grad_norm_
    norms: list[tuple[float, float]] = []  # (norm the clip saw, norm it left)

    def recording_clip(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = list(parameters)
        seen = clip(parameters, *args, **kwargs)
        norms.append((seen.item(), torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()))
        return seen

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    images, labels = smoke_batch(4)  # few images: fp16 is slow on a CPU (FP16_BATCH)
    for amp_dtype in (None, torch.float16):  # fp16: the scaler multiplies the loss by 65536 before backward
        parts = build_parts(world_of_one, amp_dtype, grad_clip=max_norm)
        parts.module.eval()  # no dropout: both steps see the same function of the same weights
        before = [p.detach().clone() for p in parts.module.parameters()]
        timer = StepTimer(CPU)
        timer.begin_step()
        train_step(parts, images, labels, timer)
        assert any(not torch.equal(a, b) for a, b in zip(before, parts.module.parameters())), "the step was skipped"
    (fp32_seen, fp32_left), (fp16_seen, fp16_left) = norms
    assert fp32_seen > max_norm  # the clip had something to do
    assert fp32_left <= max_norm * (1 + 1e-4) and fp16_left <= max_norm * (1 + 1e-4)
    # Clipping the still-scaled fp16 gradients would have seen a norm 65536 times larger.
    assert fp16_seen == pytest.approx(fp32_seen, rel=0.05)


@pytest.mark.timeout(120)
def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    force_fp16(monkeypatch)
    # The scaler counts steps whatever their size (FP16_BATCH); these first four have no overflow, which would
    # reset the count (from step 5 on, one does).
    run_dir = train_here(tmp_path, "fp16", "--max-steps", "3", *FP16_BATCH)
    first = load_checkpoint(run_dir, 3)["scaler"]
    assert first["scale"] > 1 and first["_growth_tracker"] == 3  # three steps without overflow
    train_here(tmp_path, "fp16", "--max-steps", "4", *FP16_BATCH)
    assert "resumed from step 3" in capsys.readouterr().out
    # A scaler started afresh on resume would have counted only the 1 new step.
    assert load_checkpoint(run_dir, 4)["scaler"] == {**first, "_growth_tracker": 4}


@pytest.mark.timeout(120)
def test_amp_can_change_between_fp16_and_bf16_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bf16 checkpoint holds an empty scaler state; an fp16 run resuming it starts its scaler fresh (loading the
    empty state raised a RuntimeError), and a bf16 run ignores an fp16 checkpoint's scaler state."""
    run_dir = train_here(tmp_path, "switch", "--amp", "bf16", "--max-steps", "2", *FP16_BATCH)
    assert load_checkpoint(run_dir, 2)["scaler"] == {}
    with monkeypatch.context() as fp16:
        force_fp16(fp16)
        train_here(tmp_path, "switch", "--max-steps", "4", *FP16_BATCH)
    assert load_checkpoint(run_dir, 4)["scaler"]["_growth_tracker"] == 2
    train_here(tmp_path, "switch", "--amp", "bf16", "--max-steps", "6", *FP16_BATCH)
    assert load_checkpoint(run_dir, 6)["scaler"] == {}
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "resumed from step 4" in out


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: compiled and uncompiled runs share checkpoints


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()  # compiled frames of this test's models must not linger into later tests


@pytest.fixture(scope="module")
def uncompiled_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = train_here(tmp_path_factory.mktemp("eager"), "eager", "--max-steps", "8")
    return run_dir / "checkpoints" / "step00000008.pt"


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # wiring only: inductor compiles for tens of seconds
def test_compiled_and_uncompiled_runs_resume_each_other(tmp_path: Path, uncompiled_checkpoint: Path, backend: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    compiled = train_here(tmp_path, "compiled", "--compile", "--compile-backend", backend,
                          "--resume", str(uncompiled_checkpoint), "--max-steps", "16")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the training forward really was compiled
    state = load_checkpoint(compiled, 16)
    assert state["config"]["compile"] and state["config"]["compile_backend"] == backend
    # No `_orig_mod.` (torch.compile) or `module.` (DDP) prefix: the plain network loads it strictly.
    assert list(state["model"]) == list(MnistCNN().state_dict())
    MnistCNN().load_state_dict(state["model"], strict=True)
    train_here(tmp_path, "uncompiled", "--resume", str(compiled / "checkpoints" / "step00000016.pt"),
               "--max-steps", "24")
    out = capsys.readouterr().out
    assert "resumed from step 8" in out and "resumed from step 16" in out
    assert final_record(tmp_path / "uncompiled")["step"] == 24


@pytest.fixture
def compile_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The compile caches' variables unset and the user's cache folder in `tmp_path/cache` (check_compile_caches
    sets the variables, and this test process's torch._dynamo import had set TORCHINDUCTOR_CACHE_DIR)."""
    for variable in COMPILE_CACHE_VARIABLES:
        monkeypatch.setenv(variable, "")  # recorded, so that teardown takes away what the test sets too
        monkeypatch.delenv(variable)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_refuses_an_inherited_cache_folder_others_can_write_to(
        tmp_path: Path, compile_cache_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """review_security F2: another local user made the victim's inductor cache folder (mode 0777) and replaced its
    entries with pickles, which the victim's compile loaded. A cache folder others can write to is refused, in one
    line that names it and the fix, before any compile; the run leaves nothing behind."""
    planted = tmp_path / "torchinductor_victim"
    planted.mkdir()
    planted.chmod(0o777)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(planted))
    code = main([*SMOKE_FLAGS, "--output-dir", str(tmp_path / "out"), "--run-name", "compiled", "--compile",
                 "--compile-backend", "eager", "--max-steps", "1"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == (f"error: --compile's cache folder {planted} (TORCHINDUCTOR_CACHE_DIR) is writable by its group and "
                   "others (mode 777), who could put code there that the compile would load and run as you; remove "
                   f"it (or `chmod go-w {planted}` where nobody else can have written to it), or set "
                   "TORCHINDUCTOR_CACHE_DIR to a folder of your own that only you can write to (or unset it)\n")
    assert not (tmp_path / "out").exists()


def test_compile_caches_default_to_private_folders_in_the_users_cache(compile_cache_env: Path) -> None:
    """Unset, the caches go to $XDG_CACHE_HOME/dist_mnist/{inductor,triton} (~/.cache/...), made with mode 0700:
    a folder in the user's home nobody else can make first, where torch's default is the guessable
    /tmp/torchinductor_<user>."""
    check_compile_caches()
    for variable, name in zip(COMPILE_CACHE_VARIABLES, ("inductor", "triton")):
        folder = compile_cache_env / "dist_mnist" / name
        assert os.environ[variable] == str(folder)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # A run without --compile leaves the variable as it finds it, or gives torch the same private default.
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    assert inductor_cache_dir() == str(compile_cache_env / "dist_mnist" / "inductor")


def test_a_user_cache_that_cannot_hold_the_inductor_folder_leaves_both_caches_to_torch(
        tmp_path: Path, compile_cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only home whose ~/.cache/dist_mnist exists: the inductor cache fell back to torch's folder, but
    TRITON_CACHE_DIR went to the home's `triton`, which could not be made, and the run stopped blaming the unset
    variable (review_late 1). Triton's cache follows inductor's out of the home."""
    make_private = caches._private_folder
    monkeypatch.setattr(caches, "_private_folder", lambda path: not path.startswith(str(compile_cache_env))
                        and make_private(path))
    monkeypatch.setattr(caches, "torch_default_inductor_cache_dir", lambda: str(tmp_path / "torchinductor_me"))
    check_compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor_me")
    assert "TRITON_CACHE_DIR" not in os.environ


def test_compile_refuses_a_cache_folder_in_a_folder_another_user_owns(
        tmp_path: Path, compile_cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a parent folder others could write to was refused; one another user owns (a shared HOME, a group's
    project folder) lets its owner rename our folder away and put theirs in its place (review_late 2)."""
    theirs = tmp_path / "theirs"
    (theirs / "cache").mkdir(parents=True, mode=0o700)
    real_stat = os.stat

    def owned_by_another(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == str(theirs):
            return os.stat_result((result.st_mode, result.st_ino, result.st_dev, result.st_nlink, 4242,
                                   result.st_gid, result.st_size, result.st_atime, result.st_mtime, result.st_ctime))
        return result

    monkeypatch.setattr(caches.os, "stat", owned_by_another)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(theirs / "cache"))
    with pytest.raises(UserError, match=re.escape(f"lies in {theirs}, owned by uid 4242, who could put a folder of "
                                                  "their own in its place")):
        check_compile_caches()


def test_compile_refuses_a_cache_folder_of_another_user_or_reached_through_a_shared_folder(
        tmp_path: Path, compile_cache_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cache folder of the user's own (no home), the default is torch's /tmp/torchinductor_<user>: one
    another user made first is refused, as is a folder they could swap (in a folder anyone can write to, without
    the sticky bit /tmp has), and an inherited link is checked where it leads and used by that path."""
    compile_cache_env.write_text("a file: no cache folder can be made under it")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.setenv("LOGNAME", "victim")  # getpass.getuser's first source, whatever getuid says
    taken = Path(torch_default_inductor_cache_dir())
    assert taken == shared / "torchinductor_victim"
    taken.mkdir(mode=0o700)
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # as if the folder's owner, this uid, were someone else
    with pytest.raises(UserError) as refused:
        check_compile_caches()
    assert str(refused.value) == (
        f"--compile's cache folder {taken} (the default, TORCHINDUCTOR_CACHE_DIR being unset) is owned by uid {uid}, "
        f"not by this user (uid {uid + 1}): its owner could put code there that the compile would load and run as "
        "you; remove it, or set TORCHINDUCTOR_CACHE_DIR to a folder of your own that only you can write to")
    monkeypatch.setattr(os, "getuid", lambda: uid)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")  # set to the refused default
    check_compile_caches()  # the same folder, this user's own
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(taken) and "TRITON_CACHE_DIR" not in os.environ

    shared.chmod(0o777)  # no sticky bit: anyone can rename the folder away and put theirs in its place
    link = tmp_path / "link"
    link.symlink_to(taken)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(link))
    with pytest.raises(UserError, match=re.escape(
            f"--compile's cache folder {taken} (TORCHINDUCTOR_CACHE_DIR={link}) lies in {shared}, which "
            "its group and others can write to (mode 777, no sticky bit) and so put a folder of their own in its "
            f"place; `chmod go-w {shared}` where nobody else can have written to it, or set TORCHINDUCTOR_CACHE_DIR "
            "to a folder of your own that only you can write to (or unset it)")):
        check_compile_caches()
    shared.chmod(0o755)
    check_compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(taken)  # the checked folder, not the link


# ---------------------------------------------------------------------------------------------------------------
# channels_last


def test_channels_last_step_matches_contiguous(world_of_one: DistContext) -> None:
    """The same weights and batch in both memory formats give the same logits, loss and gradients."""
    images, labels = smoke_batch()
    results = {}
    for channels_last in (False, True):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        parts = build_parts(world_of_one, channels_last=channels_last)
        conv2 = parts.module.conv2.weight  # conv1's single input channel makes both formats the same strides
        assert conv2.is_contiguous(memory_format=memory_format) and conv2.is_contiguous() is not channels_last
        x = normalize(images, CPU, channels_last)
        assert x.is_contiguous(memory_format=memory_format)
        parts.module.eval()  # no dropout: the two runs must compute the same function
        logits = parts.module(x)
        F.cross_entropy(logits, labels).backward()
        grads = [gradient(p).clone() for p in parts.module.parameters()]
        parts.optimizer.zero_grad(set_to_none=True)
        timer = StepTimer(CPU)
        timer.begin_step()
        loss = train_step(parts, images, labels, timer)
        results[channels_last] = (logits.detach(), loss, grads)
    (logits, loss, grads), (cl_logits, cl_loss, cl_grads) = results[False], results[True]
    torch.testing.assert_close(cl_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl_loss, loss, rtol=1e-5, atol=1e-6)
    for cl_grad, grad in zip(cl_grads, grads):
        torch.testing.assert_close(cl_grad, grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("saved_channels_last", [False, True], ids=["nchw-to-nhwc", "nhwc-to-nchw"])
def test_a_resume_across_a_channels_last_change_trains_as_the_uninterrupted_run(world_of_one: DistContext,
                                                                                saved_channels_last: bool) -> None:
    """A resume under another --channels-last is allowed (noted only): the optimizer's moments come into the new
    parameters' layout, where fused AdamW pairs them element by element in memory order."""
    images, labels = smoke_batch()

    def step(parts: TrainParts) -> None:
        timer = StepTimer(CPU)
        timer.begin_step()
        train_step(parts, images, labels, timer)

    saved = build_parts(world_of_one, channels_last=saved_channels_last)
    saved.module.eval()  # no dropout: the two runs compute the same function
    step(saved)
    buffer = io.BytesIO()
    torch.save({"model": saved.module.state_dict(), "optimizer": saved.optimizer.state_dict(),
                "scheduler": saved.scheduler.state_dict()}, buffer)
    step(saved)  # the uninterrupted run's second step
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = build_parts(world_of_one, channels_last=not saved_channels_last)
    resumed.module.eval()
    resumed.module.load_state_dict(state["model"])
    resumed.optimizer.load_state_dict(state["optimizer"])
    resumed.scheduler.load_state_dict(state["scheduler"])
    conv2 = resumed.module.conv2.weight
    assert resumed.optimizer.state[conv2]["exp_avg"].stride() == conv2.stride()
    step(resumed)
    for a, b in zip(resumed.module.parameters(), saved.module.parameters()):
        # Without the relayout conv2's weight was 1.7e-3 off; the layouts' own rounding differs by ~1e-7.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cpu_runs_flush_denormals_to_zero(world_of_one: DistContext) -> None:
    """AdamW's second moments fall into float32's denormal range late in a CPU run, where x86 arithmetic slows down
    many times over (the optimizer step tripled over 2 epochs): CPU settings flush them, CUDA ones leave them."""
    settings = resolve_speed_settings(TrainConfig(), torch.device("cpu"))
    assert settings.flush_denormal and settings.describe()["flush_denormal"] is True
    try:
        build_train_parts(TrainConfig(), world_of_one, settings, total_steps=8)
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0  # 1e-39 is a denormal float32
        build_train_parts(TrainConfig(), world_of_one, dataclasses.replace(settings, flush_denormal=False), 8)
        assert torch.tensor([1e-39]).mul(1.0).item() != 0.0
    finally:
        torch.set_flush_denormal(False)  # the process default, for the tests that follow
