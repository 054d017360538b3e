"""GPU-only decisions through their CPU seams: the amp choice with the CUDA queries faked, CUDA-graph eligibility,
the graphed step (replayed eagerly on CPU) against the eager one, the tensor learning rate against warmup_cosine,
and the device-side batch order against the DataLoader's, and a whole graphed run through a checkpoint and resume."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist
from conftest import REPO, SMOKE_FLAGS, cpu_env, make_mnist_dir

import dist_mnist.train as train_module
from dist_mnist import checkpoint
from dist_mnist.collectives import CollectiveTimeout
from dist_mnist.config import TrainConfig
from dist_mnist.data import build_pipeline, synthetic_splits
from dist_mnist.distributed import DistContext, distributed_session, loopback_only, resolve_backend
from dist_mnist.errors import UserError
from dist_mnist.graphs import (
    GraphDecision,
    GraphedStep,
    capture_eagerly,
    capture_failure_note,
    graph_decision,
    reduce_overhead_note,
    use_tensor_learning_rates,
)
from dist_mnist.metrics import StepTimer
from dist_mnist.train import (
    SpeedSettings,
    build_train_parts,
    main,
    resolve_speed_settings,
    short_schedule_note,
    software_and_device,
    train_step,
    warmup_cosine,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only ever passed to pure functions here


# ---------------------------------------------------------------------------------------------------------------
# --amp on GPUs with and without native bf16


def fake_gpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """torch.cuda.is_bf16_supported as on a real GPU: emulated bf16 counts unless including_emulation=False."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


@pytest.mark.parametrize(("native_bf16", "expected"), [(False, torch.float16), (True, torch.bfloat16)],
                         ids=["pre-ampere", "ampere"])
def test_amp_auto_on_cuda_uses_native_bf16_only(monkeypatch: pytest.MonkeyPatch, native_bf16: bool,
                                                expected: torch.dtype) -> None:
    fake_gpu(monkeypatch, native_bf16)
    assert resolve_speed_settings(TrainConfig(amp="auto"), CUDA).amp_dtype == expected


@pytest.mark.parametrize(("flag", "workers", "on_device"), [
    ("auto", 0, True), ("auto", 2, False), ("off", 0, False), ("on", 0, True)])
def test_data_on_device_auto_leaves_the_data_to_workers_asked_for(flag: str, workers: int, on_device: bool) -> None:
    """auto kept the data on the GPU whatever --num-workers said, and the workers were never started."""
    cfg = TrainConfig(amp="off", data_on_device=flag, num_workers=workers)
    assert resolve_speed_settings(cfg, CUDA).data_on_device is on_device


def test_amp_bf16_is_refused_on_a_gpu_that_only_emulates_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, native_bf16=False)
    with pytest.raises(UserError, match="--amp bf16 needs a GPU with bf16 support"):
        resolve_speed_settings(TrainConfig(amp="bf16"), CUDA)
    fake_gpu(monkeypatch, native_bf16=True)
    assert resolve_speed_settings(TrainConfig(amp="bf16"), CUDA).amp_dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# CUDA graph eligibility


@pytest.mark.parametrize(("kwargs", "enabled", "note"), [
    ({}, True, ""),
    ({"device_type": "cpu"}, False, ""),
    ({"mode": "off"}, False, ""),
    ({"world_size": 2}, False, "DDP across 2 processes"),
    ({"amp_dtype": torch.float16}, False, "fp16's GradScaler"),
    ({"compile": True}, False, "--compile"),
    ({"accumulation_steps": 4}, False, "gradient accumulation"),
])
def test_graph_decision_auto(kwargs: dict, enabled: bool, note: str) -> None:
    args = {"mode": "auto", "device_type": "cuda", "world_size": 1, "amp_dtype": torch.bfloat16, "compile": False,
            **kwargs}
    decision = graph_decision(**args)
    assert decision.enabled is enabled
    assert note in decision.note and (decision.note.startswith("note: CUDA graphs off") or not note)


@pytest.mark.parametrize(("compile", "steps"), [(False, "eager"), (True, "compiled")])
def test_the_graphs_note_names_the_steps_that_run_instead(compile: bool, steps: str) -> None:
    """review_combos finding 9: under --compile the note said "eager steps"."""
    note = graph_decision("auto", "cuda", 2, torch.bfloat16, compile).note
    assert note.startswith(f"note: CUDA graphs off, {steps} steps (DDP across 2 processes")


@pytest.mark.parametrize(("mode", "device_type", "noted"), [
    ("reduce-overhead", "cpu", True), ("reduce-overhead", "cuda", False), ("default", "cpu", False),
    ("max-autotune", "cpu", False)])  # max-autotune also tunes kernels on CPU: not the same as default there
def test_reduce_overhead_off_cuda_draws_a_note(mode: str, device_type: str, noted: bool) -> None:
    """review_combos finding 7: the mode's CUDA graphs silently did not exist on CPU."""
    note = reduce_overhead_note(mode, device_type)
    assert (note is not None) == noted
    assert note is None or note.startswith("note: --compile-mode reduce-overhead adds CUDA graphs to inductor's "
                                           "default mode, and a run on cpu has none")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device_type": "cpu"}, "--cuda-graphs on needs CUDA"),
    ({"world_size": 2}, "--cuda-graphs on cannot capture this run's step \\(DDP across 2 processes\\)"),
])
def test_graph_decision_on_refuses_what_it_cannot_capture(kwargs: dict, message: str) -> None:
    args = {"mode": "on", "device_type": "cuda", "world_size": 1, "amp_dtype": None, "compile": False, **kwargs}
    with pytest.raises(UserError, match=message):
        graph_decision(**args)


# ---------------------------------------------------------------------------------------------------------------
# The graphed step, replayed eagerly on CPU


@pytest.fixture
def world_of_one() -> Iterator[DistContext]:
    """Function-scoped: the whole-run test below opens its own default process group."""
    with distributed_session(TrainConfig(device="cpu")) as ctx:
        yield ctx


def test_a_world_of_one_listens_on_the_loopback_interface_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo's device listens for peers on the address the host name resolves to: a single-process run listened on
    the machine's public address where the host name resolves to one. It has no peer, so its sockets are put on
    `lo` while the group opens; the user's own choice and the environment after it are left as they were."""
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    seen: list[tuple[str | None, str | None]] = []
    real_init = dist.init_process_group

    def init(*args: Any, **kwargs: Any) -> None:
        seen.append((os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("NCCL_SOCKET_IFNAME")))
        real_init(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init)
    with distributed_session(TrainConfig(device="cpu")):
        process = psutil.Process()
        # net_connections from psutil 6 on; pyproject allows 5.9, whose name for it is connections.
        connections = getattr(process, "net_connections", None) or process.connections
        listening = [c.laddr.ip for c in connections(kind="tcp") if c.status == "LISTEN"]
        assert all(ip in ("127.0.0.1", "::1") for ip in listening), listening
    assert seen == [("lo", "lo")] and "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # the user's
    with distributed_session(TrainConfig(device="cpu")):
        pass
    assert seen[-1] == ("lo", "lo") and os.environ["GLOO_SOCKET_IFNAME"] == "lo"



@pytest.mark.parametrize(("world_size", "local_world_size", "expected"), [
    (1, None, ("lo", "lo")),  # no peer at all
    (2, "2", ("lo", None)),  # every rank on this host (torchrun --standalone): gloo, which carries pickles
    (2, "1", (None, None)),  # a peer on another host must reach this one's address
    (2, None, (None, None)),  # launched without torchrun's LOCAL_WORLD_SIZE: where the peers are is not known
])
def test_ranks_all_on_this_host_open_gloo_on_the_loopback_interface(
        monkeypatch: pytest.MonkeyPatch, world_size: int, local_world_size: str | None,
        expected: tuple[str | None, str | None]) -> None:
    """review_security 14: a 2-rank --standalone run left each rank's gloo listener on the host name's address, and
    the ranks' object collectives unpickle what arrives there. The user's own interface stays either way."""
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if local_world_size is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    with loopback_only(world_size):
        assert (os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("NCCL_SOCKET_IFNAME")) == expected
    assert "GLOO_SOCKET_IFNAME" not in os.environ and "NCCL_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    with loopback_only(world_size):
        assert os.environ["GLOO_SOCKET_IFNAME"] == "eth1"

def batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train, _ = synthetic_splits(n * size, 1)
    return [(train.images[i * size:(i + 1) * size], train.labels[i * size:(i + 1) * size]) for i in range(n)]


@pytest.mark.parametrize("grad_clip", [0.0, 0.05], ids=["no-clip", "clip"])
def test_graphed_step_trains_like_the_eager_step(world_of_one: DistContext, grad_clip: float) -> None:
    """Same weights, optimizer state and learning rate after 4 steps; the warm-up before capture left no trace."""
    cfg = TrainConfig(grad_clip=grad_clip, warmup_frac=0.3)
    settings = SpeedSettings(amp_dtype=None, channels_last=False, data_on_device=False)
    eager = build_train_parts(cfg, world_of_one, settings, total_steps=8)
    eager_losses = [train_step(eager, x, y, StepTimer(CPU)) for x, y in batches(4)]
    graphed = build_train_parts(cfg, world_of_one, settings, total_steps=8)
    step = GraphedStep(graphed, batch_size=16, capture=capture_eagerly)
    graphed_losses = [step(x, y, StepTimer(CPU)) for x, y in batches(4)]
    torch.testing.assert_close(torch.stack(graphed_losses), torch.stack(eager_losses), rtol=1e-4, atol=1e-5)
    for a, b in zip(graphed.module.parameters(), eager.module.parameters()):
        # The lr is a float32 tensor here, a double in the eager step: a few parameters differ by ~1e-6; a warm-up
        # left un-undone would move them by ~lr (1e-4 and more).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(graphed.optimizer.state[graphed.module.fc2.bias]["step"]) == 4
    assert float(graphed.optimizer.param_groups[0]["lr"]) == pytest.approx(eager.optimizer.param_groups[0]["lr"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no training here
@pytest.mark.parametrize(("max_steps", "powersgd_start", "expected"), [
    # The review's run: 64 steps over --epochs 2, a 32-step warm-up; step 5 trains at 5/32 of --lr.
    (5, None, "note: --max-steps 5 ends within the learning-rate warm-up (32 of the schedule's 64 steps, which span "
              "--epochs 2): its learning rate reaches 0.000313 of --lr 0.002"),
    (5, 32, "...: its learning rate reaches 0.000313 of --lr 0.002, and --ddp-comm-hook powersgd never compresses "
            "(it starts after step 32)"),
    # Past the warm-up (its last step trains at --lr), not past PowerSGD's start: the note says which it ends by.
    (32, 32, "note: --max-steps 32 ends by step 32: --ddp-comm-hook powersgd never compresses (it starts after step "
             "32)"),
    (32, None, None),  # its last step trains at --lr
    (0, 32, None), (100, 32, None),  # no limit, or one past the schedule's end
])
def test_max_steps_within_the_warmup_draws_a_note(max_steps: int, powersgd_start: int | None,
                                                  expected: str | None) -> None:
    """review_combos finding 4: a --max-steps run inside the warm-up never trained at --lr without a word."""
    cfg = TrainConfig(max_steps=max_steps, epochs=2, lr=0.002, warmup_frac=0.5)
    note = short_schedule_note(cfg, 64, powersgd_start)
    if expected is None or not expected.startswith("..."):
        assert note == expected
    else:
        assert note is not None and note.endswith(expected.removeprefix("..."))
    if note and "reaches" in note:
        assert f"{0.002 * warmup_cosine(64, 0.5)(max_steps - 1):.3g}" in note


def test_a_run_ended_within_the_warmup_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMOKE_FLAGS, "--max-steps", "3", "--warmup-frac", "0.5", "--output-dir", str(tmp_path),
                 "--run-name", "wu"]) == 0
    assert "note: --max-steps 3 ends within the learning-rate warm-up (32 of the schedule's 64 steps, which span " \
           "--epochs 2): its learning rate reaches 0.000188 of --lr 0.002" in capsys.readouterr().out


def test_tensor_learning_rate_follows_warmup_cosine_and_checkpoints_as_a_float() -> None:
    total, peak = 50, 4e-3
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 0.1))
    use_tensor_learning_rates(optimizer)
    lr = optimizer.param_groups[0]["lr"]
    factor = warmup_cosine(total, 0.1)
    for step in range(total):
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) and optimizer.param_groups[0]["lr"] is lr
        assert float(lr) == pytest.approx(peak * factor(step), rel=1e-6, abs=1e-12)
        scheduler.step()
    saved = optimizer.state_dict()["param_groups"][0]
    assert isinstance(saved["lr"], float) and saved["capturable"] is False
    assert optimizer.param_groups[0]["lr"] is lr  # saving did not replace the tensor the graph reads
    eager = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=peak, fused=True)
    eager.load_state_dict(optimizer.state_dict())
    assert eager.param_groups[0]["lr"] == pytest.approx(peak * factor(total))


# ---------------------------------------------------------------------------------------------------------------
# Batches sliced on the device: the DataLoader's order exactly


def ctx_of(rank: int, world_size: int) -> DistContext:
    return DistContext(rank=rank, world_size=world_size, device=CPU, backend="gloo",
                       control_group=None)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_device_batches_are_the_dataloader_batches(world_size: int) -> None:
    train, test = synthetic_splits(203, 37)
    cfg = TrainConfig(batch_size=8, eval_batch_size=10, seed=3)
    for rank in range(world_size):
        host = build_pipeline(cfg, ctx_of(rank, world_size), train, test, on_device=False)
        device = build_pipeline(cfg, ctx_of(rank, world_size), train, test, on_device=True)
        assert type(device.train_loader).__name__ == "DeviceBatchLoader"
        for epoch, skip in itertools.product(range(3), (0, 2, host.steps_per_epoch)):
            for pipeline in (host, device):
                pipeline.train_batches.set_epoch(epoch, skip_batches=skip)
            expected, got = list(host.train_loader), list(device.train_loader)
            assert len(got) == len(expected) == host.steps_per_epoch - skip == len(device.train_loader)
            for (xe, ye), (xg, yg) in zip(expected, got):
                assert torch.equal(xe, xg) and torch.equal(ye, yg)
        for (xe, ye), (xg, yg) in itertools.zip_longest(host.test_loader, device.test_loader):
            assert torch.equal(xe, xg) and torch.equal(ye, yg)


# ---------------------------------------------------------------------------------------------------------------
# A whole run with the graphed step (replayed eagerly): checkpoints and resume


@pytest.mark.timeout(180)
def test_graphed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Capture happens after the resume, from the restored weights, optimizer state and schedule; checkpoints hold
    plain float learning rates; 4 + 4 steps end where 8 uninterrupted steps do."""
    monkeypatch.setattr(train_module, "graph_decision", lambda *args, **kwargs: GraphDecision(True, ""))
    monkeypatch.setattr(train_module, "GraphedStep", partial(GraphedStep, capture=capture_eagerly))
    flags = [*SMOKE_FLAGS, "--amp", "off", "--channels-last", "off", "--deterministic", "--checkpoint-every", "4",
             "--output-dir", str(tmp_path), "--timeout-s", "60"]
    assert main([*flags, "--run-name", "whole", "--max-steps", "8"]) == 0
    assert "cuda_graphs on" in capsys.readouterr().out
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["cuda_graphs"] is True
    assert main([*flags, "--run-name", "split", "--max-steps", "4"]) == 0
    assert main([*flags, "--run-name", "split", "--max-steps", "8"]) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    whole, split = (torch.load(tmp_path / name / "checkpoints" / "step00000008.pt", weights_only=True)
                    for name in ("whole", "split"))
    assert all(torch.equal(whole["model"][k], split["model"][k]) for k in whole["model"])
    group = split["optimizer"]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    assert group["lr"] == whole["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.timeout(180)
def test_a_resume_that_switches_cuda_graphs_says_its_numbers_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """review_gpu F2: a replayed step reads its learning rate from a float32 tensor, an eager step gets a Python
    float, so the two round differently; a resume that switched graphs on or off said nothing of it."""
    def graphed(patch: pytest.MonkeyPatch) -> None:
        patch.setattr(train_module, "graph_decision", lambda *args, **kwargs: GraphDecision(True, ""))
        patch.setattr(train_module, "GraphedStep", partial(GraphedStep, capture=capture_eagerly))

    flags = [*SMOKE_FLAGS, "--checkpoint-every", "2", "--output-dir", str(tmp_path), "--run-name", "toggled"]
    with monkeypatch.context() as patch:
        graphed(patch)
        assert main([*flags, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main([*flags, "--max-steps", "4"]) == 0
    note = "note: this run continues with other settings than the checkpoint's ({}): training goes on correctly, " \
           "but its numbers will differ in the last bits from a run that was never interrupted"
    assert note.format("--cuda-graphs on -> off") in capsys.readouterr().out.splitlines()
    with monkeypatch.context() as patch:
        graphed(patch)
        assert main([*flags, "--max-steps", "6"]) == 0
    assert note.format("--cuda-graphs off -> on") in capsys.readouterr().out.splitlines()


@pytest.mark.timeout(120)
def test_a_run_whose_capture_failed_says_so_and_its_summary_says_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Under `auto` a failed capture leaves eager steps: config.json records the decision (taken before capture),
    summary.json what ran, so a GPU figure is never read as graphed when it was not."""
    def refuse(body: Callable[[], None]) -> Callable[[], None]:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train_module, "graph_decision", lambda *args, **kwargs: GraphDecision(True, ""))
    monkeypatch.setattr(train_module, "GraphedStep", partial(GraphedStep, capture=refuse))
    assert main([*SMOKE_FLAGS, "--max-steps", "4", "--output-dir", str(tmp_path), "--run-name", "failed"]) == 0
    assert "note: CUDA graph capture failed (operation not permitted" in capsys.readouterr().out
    run_dir = tmp_path / "failed"
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["cuda_graphs"] is True
    assert json.loads((run_dir / "summary.json").read_text())["cuda_graphs"] is False


CAPTURE_FAILED = ("note: CUDA graph capture failed (operation not permitted when stream is capturing); eager steps, "
                  "and the GPU memory the failed capture took stays reserved in this process (torch 2.11 keeps a "
                  "failed capture's memory pool until the process ends: pytorch/pytorch#190348)")


@pytest.mark.timeout(120)
def test_after_a_failed_capture_the_cache_is_never_emptied_and_the_note_says_the_memory_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """review_gpu F1: on torch 2.11 a failed capture leaves the caching allocator believing a capture is underway
    and never gives its memory pool back (pytorch/pytorch#180395, #190348), so a later torch.cuda.empty_cache() or
    torch.cuda.graph() in that process fails an internal assert. Nothing after the failure calls either, the kernel
    warm-up's evaluation pass included; and the note says where the memory went."""
    def refuse(body: Callable[[], None]) -> Callable[[], None]:
        raise RuntimeError("operation not permitted when stream is capturing")

    def stuck_allocator(*args: object, **kwargs: object) -> None:  # as torch 2.11's after a failed capture
        raise RuntimeError("captures_underway.empty() INTERNAL ASSERT FAILED")

    for name in ("empty_cache", "graph", "CUDAGraph"):
        monkeypatch.setattr(torch.cuda, name, stuck_allocator)
    monkeypatch.setattr(train_module, "kernel_warmup_pays", lambda device: True)
    monkeypatch.setattr(train_module, "graph_decision", lambda *args, **kwargs: GraphDecision(True, ""))
    monkeypatch.setattr(train_module, "GraphedStep", partial(GraphedStep, capture=refuse))
    flags = [*SMOKE_FLAGS, "--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "2"]
    assert main([*flags, "--output-dir", str(tmp_path), "--run-name", "failed"]) == 0
    assert CAPTURE_FAILED in capsys.readouterr().out.splitlines()
    assert capture_failure_note(RuntimeError("operation not permitted when stream is capturing"), "auto") == \
        CAPTURE_FAILED


@pytest.mark.timeout(120)
def test_a_world_of_one_runs_no_collective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A world of one adds nothing up and exchanges no control messages (DistContext returns at once): each was a
    pickle and a gloo round trip at every evaluation, progress report and checkpoint, and on CUDA with `--backend
    nccl` an all-reduce would set NCCL up for nothing, inside the time to accuracy (issue 9)."""
    calls: list[str] = []
    def spy(name: str) -> Callable[..., object]:
        real = getattr(torch.distributed, name)

        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather_object", "barrier", "new_group"):
        monkeypatch.setattr(torch.distributed, name, spy(name))
    flags = [*SMOKE_FLAGS, "--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--output-dir",
             str(tmp_path), "--run-name", "one"]
    assert main(flags) == 0
    assert calls == []


class TimeoutGroup:
    """A process group's set_timeout, as a backend that takes it or one that refuses it."""

    def __init__(self, refuses: bool) -> None:
        self.refuses = refuses
        self.timeouts: list[float] = []

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        if self.refuses:
            raise RuntimeError("Backend nccl does not support setting timeout")
        self.timeouts.append(timeout.total_seconds())


@contextlib.contextmanager
def default_group(group: object) -> Iterator[None]:
    """dist.group.WORLD as `group` (monkeypatch cannot: the attribute is a property of its metaclass)."""
    before = dist.group.WORLD
    dist.group.WORLD = group  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.group.WORLD = before


@pytest.mark.parametrize(("world_refuses", "control_refuses"), [(True, False), (False, True)])
def test_a_backend_that_cannot_change_its_timeout_keeps_the_start_up_one(world_refuses: bool,
                                                                         control_refuses: bool) -> None:
    """review_gpu F5: after the first step every group gets --train-timeout-s, and where a torch's backend raises
    instead (2.11's NCCL backend is unverified) every multi-GPU run would have ended there. A timeout that stays
    long is no reason to end a run: every group keeps --timeout-s, and one note says so, once."""
    world, control = TimeoutGroup(world_refuses), TimeoutGroup(control_refuses)
    ctx = DistContext(rank=0, world_size=2, device=CUDA, backend="nccl", control_group=control)
    timeout = CollectiveTimeout(300, 100)
    with default_group(world):
        assert timeout.switch_to_training(ctx) == (
            "note: this torch cannot change a process group's timeout (Backend nccl does not support setting "
            "timeout): collectives keep --timeout-s 300 after the first step, not --train-timeout-s 100, so a hung "
            "or lost peer ends the run after 300 s")
        assert timeout.seconds == 300  # the timeout a collective's error line names
        assert world.timeouts + control.timeouts in ([], [100, 300])  # a group switched already is put back
        assert timeout.switch_to_training(ctx) is None and world.timeouts + control.timeouts in ([], [100, 300])
    taking = TimeoutGroup(refuses=False)
    timeout = CollectiveTimeout(300, 100)
    with default_group(taking):
        assert timeout.switch_to_training(DistContext(0, 2, CPU, "gloo", control_group=taking)) is None
    assert timeout.seconds == 100 and taking.timeouts == [100]  # the gloo world is its own control group: once


@pytest.mark.timeout(120)
def test_the_run_prints_the_kept_timeout_note_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The note reaches the run's output (rank 0, stdout: what the run falls back to) once, and the run trains on."""
    notes = iter(["note: this torch cannot change a process group's timeout (...)"])
    monkeypatch.setattr(CollectiveTimeout, "switch_to_training", lambda self, ctx: next(notes, None))
    assert main([*SMOKE_FLAGS, "--max-steps", "4", "--output-dir", str(tmp_path), "--run-name", "kept"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out.count("note: this torch cannot change a process group's timeout (...)") == 1
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["last_step"] == 4


def test_backend_auto_is_nccl_only_where_cuda_processes_exchange_gradients() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [resolve_backend(cuda, 1), resolve_backend(cuda, 2), resolve_backend(cpu, 1), resolve_backend(cpu, 2)] == [
        "gloo", "nccl", "gloo", "gloo"]


def test_a_failed_capture_leaves_the_weights_as_they_were(world_of_one: DistContext) -> None:
    """Eager steps take over under `auto` after a failed capture, from the state before the warm-up: the first
    one trains exactly like that of a run that never tried (no warm-up gradients left in .grad)."""
    settings = SpeedSettings(None, False, False)
    clean = build_train_parts(TrainConfig(), world_of_one, settings, total_steps=8)
    parts = build_train_parts(TrainConfig(), world_of_one, settings, total_steps=8)
    before = {k: v.clone() for k, v in parts.module.state_dict().items()}

    def failing_capture(body: Callable[[], None]) -> Callable[[], None]:
        body()  # a warm-up step changed the weights, then capture failed
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError) as excinfo:
        GraphedStep(parts, batch_size=16, capture=failing_capture)
    assert all(torch.equal(before[k], v) for k, v in parts.module.state_dict().items())
    assert capture_failure_note(excinfo.value, "auto").startswith("note: CUDA graph capture failed (operation not")
    ((images, labels),) = batches(1)
    rng = torch.get_rng_state()  # the same dropout masks for both first steps
    train_step(parts, images, labels, StepTimer(CPU))
    torch.set_rng_state(rng)
    train_step(clean, images, labels, StepTimer(CPU))
    for after_failure, never_tried in zip(parts.module.parameters(), clean.module.parameters()):
        torch.testing.assert_close(after_failure, never_tried, rtol=0, atol=1e-7)
    with pytest.raises(UserError, match="^--cuda-graphs on: capturing the training step failed"):
        capture_failure_note(excinfo.value, "on")


def test_checkpoints_keep_the_generator_of_this_process_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank on GPU 3 saves GPU 3's generator, and a resume where the process sees one GPU restores it there."""
    restored: dict[str, Any] = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": torch.tensor([torch.device(device).index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": restored.update(state=state, device=device))
    state = checkpoint.rng_state(torch.device("cuda", 3))
    assert len(state["cuda"]) == 1
    checkpoint.set_rng_state(state, torch.device("cuda", 0))
    assert restored["device"] == torch.device("cuda", 0) and restored["state"].tolist() == [3]


def test_a_cuda_run_records_its_gpu_and_cuda_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json's `resolved` block names the GPU of the rank's own device and the CUDA torch was built with."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {torch.device(device).index}")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    recorded = software_and_device(torch.device("cuda", 2))
    assert (recorded["gpu"], recorded["cuda"]) == ("GPU 2", "13.0")
    assert software_and_device(CPU)["gpu"] is None and software_and_device(CPU)["cuda"] is None


# ---------------------------------------------------------------------------------------------------------------
# launch/gpu_check.sh: its plumbing on CPU (the runs themselves need a GPU)


@pytest.mark.timeout(120)
def test_gpu_check_skips_what_its_budget_cannot_fit_and_still_prints_the_table_and_bundle(tmp_path: Path) -> None:
    """A device call has a hard limit: with too little budget left the script starts no run, says SKIP for each,
    and still prints the table and writes the one-file bundle the device machine can send back."""
    out, bundle = tmp_path / "out", tmp_path / "result.tar.gz"
    env = {**cpu_env(), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "20", "GPU_CHECK_BUNDLE": str(bundle),
           "GPU_CHECK_ALLOW_CPU": "1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(make_mnist_dir(tmp_path / "data")),
                             str(out)], env=env, capture_output=True, text=True, timeout=100)
    skipped = set(re.findall(r"^SKIP (\w+): \d+ s of the GPU_CHECK_BUDGET_S budget left", result.stdout, re.M))
    script = (REPO / "launch" / "gpu_check.sh").read_text()
    launched = set(re.findall(r"^\s*(?:\[ .* \] \|\| )?(?:\S+=\S+ )?(?:smoke|timed) (\w+) \d+\b", script, re.M))
    assert {"default", "ours_1epoch", "bench", "capture_fails", "compile", "profile", "profiler_bench"} <= launched
    sweep = {name for name in skipped if name.startswith("sweep_")}
    # No main.py given: the classic runs are skipped for that reason.
    assert sweep and skipped - sweep == launched - {"classic_1epoch", "classic_cache_fill", "classic_1epoch_cached"}
    assert not (out / "runs").exists()
    # Without a GPU no nccl to time: no process started for it (two torch imports for a traceback each).
    assert "SKIP init_process_group(nccl) probes: no CUDA GPU" in result.stdout
    assert "| done-when figure | target | measured | met |" in result.stdout
    assert result.returncode == 1  # nothing was measured: not a pass
    with tarfile.open(bundle) as tar:
        assert {"./import_torch_1.s", "./import_torch_2.s"} <= set(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    # The table made again from the unpacked bundle, off the GPU machine, is the one the script printed.
    again = subprocess.run([sys.executable, "-m", "dist_mnist.gpucheck", "table", str(tmp_path / "unpacked")],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert again.stdout.strip() and again.stdout.strip() in result.stdout


def test_gpu_check_runs_its_checkouts_package_whatever_the_path(tmp_path: Path) -> None:
    """Its `python -m dist_mnist.*` calls relied on the current directory being on sys.path; under PYTHONSAFEPATH=1
    they imported an installed copy, or none. The checkout now leads PYTHONPATH for every Python it starts."""
    log = tmp_path / "pythonpath.log"
    python = tmp_path / "python"  # answers the script's first check as a Python without a GPU would
    python.write_text(f'#!/bin/bash\nprintf "%s\\n" "${{PYTHONPATH:-}}" >> {log}\nexit 3\n')
    python.chmod(0o755)
    make_mnist_dir(tmp_path / "data")
    result = gpu_check("data", "out", cwd=tmp_path, PYTHON=str(python), PYTHONSAFEPATH="1", PYTHONPATH="/elsewhere")
    assert result.returncode == 2 and "no CUDA GPU here" in result.stderr, result.stderr
    assert log.read_text().splitlines() == [f"{REPO}:/elsewhere"]


def gpu_check(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**cpu_env(), "PYTHON": sys.executable, **env})


@pytest.mark.parametrize(("args", "env", "error"), [
    ([], {}, "usage: gpu_check.sh DATA_DIR OUT_DIR [CLASSIC_MAIN_PY]"),
    (["nowhere", "out"], {}, "DATA_DIR nowhere holds no MNIST/raw/"),
    (["data", "out"], {"GPU_CHECK_BUDGET_S": "10s"}, "GPU_CHECK_BUDGET_S must be a whole number of seconds above 0, "
                                                     "got '10s'"),
    (["data", "out"], {"GPU_CHECK_BUDGET_S": "0"}, "GPU_CHECK_BUDGET_S must be a whole number"),
    (["data", "out"], {"GPU_CHECK_PARTS": "issue9,smoke"}, "GPU_CHECK_PARTS: no part 'issue9,smoke'"),
    (["data", "out"], {"GPU_CHECK_PARTS": " "}, "GPU_CHECK_PARTS names no part"),
    (["data", "out"], {"GPU_CHECK_BUNDLE": "nodir/b.tar.gz"}, "GPU_CHECK_BUNDLE {cwd}/nodir/b.tar.gz: no folder"),
    (["data", "out"], {}, "no CUDA GPU here (torch.cuda.is_available() is False)"),
    (["data", "out"], {"PYTHON": "/bin/false", "GPU_CHECK_ALLOW_CPU": "1"}, "/bin/false cannot import torch"),
], ids=["no-arguments", "no-data", "budget-10s", "budget-0", "parts-comma", "parts-none", "bundle-folder", "no-gpu",
        "python-without-torch"])
def test_gpu_check_refuses_what_would_waste_a_device_call_in_one_line(
        tmp_path: Path, args: list[str], env: dict[str, str], error: str) -> None:
    """Each ran on before: a missing DATA_DIR gave every run `--data-dir ''`, a budget of "10s" ended the script
    without its table or bundle, a comma-separated GPU_CHECK_PARTS ran nothing and passed, a bundle into a missing
    folder was lost with exit 0, and a machine without a GPU trained every run on its CPU after two tracebacks."""
    make_mnist_dir(tmp_path / "data")
    result = gpu_check(*args, cwd=tmp_path, **env)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.splitlines()[-1].startswith(f"error: {error.format(cwd=tmp_path)}"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_gpu_check_moves_an_earlier_check_aside_and_resolves_paths_where_it_was_called(tmp_path: Path) -> None:
    """A rerun into the same OUT_DIR found its runs "already complete" in seconds and read those as its figures;
    GPU_CHECK_BUNDLE=rel.tar.gz landed inside the checkout, not where the caller stood."""
    make_mnist_dir(tmp_path / "data")
    (tmp_path / "out" / "runs" / "default").mkdir(parents=True)
    (tmp_path / "out" / "default.wall").write_text("3.0\n")
    result = gpu_check("data", "out", cwd=tmp_path, GPU_CHECK_BUDGET_S="1", GPU_CHECK_BUNDLE="rel.tar.gz",
                       GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_PARTS="smoke")
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("out.")]
    assert f"OUT_DIR out held an earlier check: moved to out.{aside.name.removeprefix('out.')}" in result.stdout
    assert (aside / "default.wall").is_file() and not (tmp_path / "out" / "default.wall").exists()
    assert f"bundle: {tmp_path / 'rel.tar.gz'}" in result.stdout and (tmp_path / "rel.tar.gz").is_file()
    assert not (REPO / "rel.tar.gz").exists()


@pytest.mark.timeout(120)
def test_the_kernel_warmup_leaves_the_run_as_it_would_have_been(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA start-up runs the model's kernels once at the run's shapes while torch._dynamo is imported; the
    throwaway model draws from the generators, which are seeded again after it: the same run with it as without."""
    shapes: list[tuple[int, int, bool]] = []
    real = train_module.warm_up_kernels

    def spy(cfg: TrainConfig, settings: SpeedSettings, device: torch.device, eval_batch: int,
            evaluation: bool = True) -> None:
        shapes.append((cfg.batch_size, eval_batch, evaluation))
        real(cfg, settings, device, eval_batch, evaluation)

    monkeypatch.setattr(train_module, "warm_up_kernels", spy)
    flags = [*SMOKE_FLAGS, "--amp", "off", "--deterministic", "--max-steps", "6", "--output-dir", str(tmp_path)]
    assert main([*flags, "--run-name", "cold"]) == 0
    monkeypatch.setattr(train_module, "kernel_warmup_pays", lambda device: True)
    assert main([*flags, "--run-name", "warm"]) == 0
    # SMOKE_FLAGS: batch 16; the synthetic test set (203 images) cut at --eval-batch-size 50. No graph capture
    # follows on the CPU, so the evaluation pass runs here too.
    assert shapes == [(16, 50, True)]
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("cold", "warm")}
    assert "kernel_warmup" in summaries["warm"]["startup"] and "kernel_warmup" not in summaries["cold"]["startup"]
    assert summaries["warm"]["ranks"][0]["params_digest"] == summaries["cold"]["ranks"][0]["params_digest"]
    assert [json.loads(line)["test_loss"] for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()] \
        == [json.loads(line)["test_loss"] for line in (tmp_path / "cold" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(180)
def test_a_graphed_run_warms_the_evaluation_up_after_the_capture(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """review_gpu F4: torch.cuda.graph empties the caching allocator's cache as a capture begins (its __enter__
    calls torch.cuda.empty_cache()), so the kernel warm-up's evaluation pass, run before the capture, left the first
    real evaluation to allocate the test batch's memory again, inside the time to 99%. With graphs its evaluation pass
    runs after the capture, on the run's own model, which it leaves as it was: the same run with it as without."""
    events: list[str] = []
    real_normalize, real_evaluate = train_module.normalize, train_module.evaluate

    def normalize(images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        events.append(f"forward {len(images)}")  # SMOKE_FLAGS: training batches of 16, evaluation batches of 50
        return real_normalize(images, *args, **kwargs)

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        events.append("evaluate")
        return real_evaluate(*args, **kwargs)

    def capture(body: Callable[[], None]) -> Callable[[], None]:
        torch.cuda.empty_cache()  # as torch.cuda.graph.__enter__ does
        return capture_eagerly(body)

    monkeypatch.setattr(train_module, "normalize", normalize)
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(train_module, "graph_decision", lambda *args, **kwargs: GraphDecision(True, ""))
    monkeypatch.setattr(train_module, "GraphedStep", partial(GraphedStep, capture=capture))
    flags = [*SMOKE_FLAGS, "--amp", "off", "--deterministic", "--max-steps", "4", "--eval-every", "2",
             "--output-dir", str(tmp_path)]
    assert main([*flags, "--run-name", "cold"]) == 0
    monkeypatch.setattr(train_module, "kernel_warmup_pays", lambda device: True)
    events.clear()
    assert main([*flags, "--run-name", "warm"]) == 0
    # The warm-up's training pass before the capture; its evaluation pass between the capture and the first
    # evaluation, with nothing emptying the cache in between.
    capture_at, first_evaluation = events.index("empty_cache"), events.index("evaluate")
    assert events[:capture_at] == ["forward 16"], events
    assert "forward 50" in events[capture_at:first_evaluation], events
    assert "empty_cache" not in events[capture_at + 1:], events
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("cold", "warm")}
    assert summaries["warm"]["ranks"][0]["params_digest"] == summaries["cold"]["ranks"][0]["params_digest"]
    assert [json.loads(line)["test_loss"] for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()] \
        == [json.loads(line)["test_loss"] for line in (tmp_path / "cold" / "metrics.jsonl").read_text().splitlines()]


def test_the_kernel_warmup_runs_on_cuda_only() -> None:
    assert train_module.kernel_warmup_pays(CUDA) and not train_module.kernel_warmup_pays(CPU)
