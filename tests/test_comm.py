"""DDP communication: per-bucket timing, bytes per hook, stragglers found in any phase (delays injected by the
test-only tests/inject/sitecustomize.py), the diagnosis line, comm hooks and gradient accumulation that resume
exactly, and accumulation equal to one larger batch."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from conftest import REPO, SMOKE_FLAGS, FakeEvent, cpu_env, torchrun, train
from test_ddp import spawn_world
from test_fault_tolerance import assert_resumed_equals_straight
from test_profiling import GRADIENT_BYTES

from dist_mnist.comm import (
    BucketRecord,
    PowerSGDHookState,
    ddp_bucket_kwargs,
    note_ignored_comm_flags,
    refuse_powersgd_with_fp16,
    resolve_step,
)
from dist_mnist.config import TrainConfig, apply_recipe, parse_args
from dist_mnist.data import build_pipeline, load_splits
from dist_mnist.distributed import DistContext
from dist_mnist.errors import UserError
from dist_mnist.metrics import Marks, StepTimer
from dist_mnist.model import MnistCNN
from dist_mnist.profiling import diagnose, flag_stragglers
from dist_mnist.runtext import warmup_steps
from dist_mnist.train import accumulation_step, build_train_parts, resolve_speed_settings, run_training
from dist_mnist.train import main as train_main

RUN_FLAGS = [*SMOKE_FLAGS, "--epochs", "1", "--timeout-s", "60"]
# Far above the step-to-step noise of a loaded 2-core machine (a step here takes 20-100 ms).
DELAY_S = 0.15


# ---------------------------------------------------------------------------------------------------------------
# Unit: one step's figures from its bucket records, and the diagnosis wording


def test_comm_step_unions_bucket_intervals_and_exposes_what_follows_the_last_start() -> None:
    # Bucket 1 runs 0-4, bucket 0 is handed over at 3 (backward compute done) and completes at 7.
    step = resolve_step([BucketRecord(0.0, 100, 4.0), BucketRecord(3.0, 50, 7.0)])
    assert step.seconds == pytest.approx(7.0) and step.exposed_s == pytest.approx(4.0)
    assert step.overlapped_s == pytest.approx(3.0) and step.nbytes == 150 and step.buckets == 2
    # A gap between buckets is not communication time.
    gap = resolve_step([BucketRecord(0.0, 1, 1.0), BucketRecord(2.0, 1, 2.5)])
    assert gap.seconds == pytest.approx(1.5) and gap.exposed_s == pytest.approx(0.5)
    assert resolve_step([]).nbytes == 0


def _stats(rank: int, data: float = 0.01, to_device: float = 0.0, forward: float = 0.02, backward: float = 0.04,
           exposed: float = 0.0, optimizer: float = 0.005, steps: int = 20) -> dict[str, Any]:
    """Rank figures as rank_stats makes them, from seconds per step (`steps` timed)."""
    step = data + to_device + forward + backward + exposed + optimizer
    return {"rank": rank, "steps": steps, "step_time_p50_s": step, "own_time_p50_s": step - exposed,
            "data_share": data / step, "to_device_share": to_device / step, "forward_share": forward / step,
            "backward_compute_share": backward / step, "comm_exposed_share": exposed / step,
            "optimizer_share": optimizer / step, "allreduce_bytes_per_step": GRADIENT_BYTES,
            "phase_time_per_step_s": {"data": data, "to_device": to_device, "forward": forward,
                                      "backward_compute": backward, "optimizer": optimizer}}


@pytest.mark.parametrize(("ranks", "starts", "contains"), [
    ([_stats(0, data=0.06), _stats(1, data=0.06)], "input-bound:", "--num-workers"),
    ([_stats(0, to_device=0.05)], "host-to-device-bound:", "--data-on-device"),
    ([_stats(0, exposed=0.05), _stats(1, exposed=0.05)], "communication-bound: 40% of each step", "4.8 MB per step"),
    ([_stats(0), _stats(1)], "compute-bound:", "mixed precision"),
    # Rank 1 computes its backward 60 ms longer; rank 0 waits for it in the all-reduce.
    ([_stats(0, exposed=0.06), _stats(1, backward=0.1)], "straggler: rank 1 is slow in backward compute",
     "every other rank waits"),
    ([_stats(0, exposed=0.06), _stats(1, data=0.07)], "straggler: rank 1 is slow in data loading",
     "find out why rank 1 is slower there (its host"),
])
def test_diagnosis_names_what_bounds_the_run(ranks: list[dict[str, Any]], starts: str, contains: str) -> None:
    flag_stragglers(ranks)
    sentence = diagnose(ranks)
    assert sentence.startswith(starts) and contains in sentence
    assert "\n" not in sentence


def test_input_bound_advice_with_dataloader_workers_asks_for_more_of_them() -> None:
    ranks = [_stats(0, data=0.06), _stats(1, data=0.06)]
    flag_stragglers(ranks)
    assert "; load batches in parallel (--num-workers), or" in diagnose(ranks)
    assert "; more DataLoader workers (--num-workers; 2 per rank now), or" in diagnose(ranks, num_workers=2)


@pytest.mark.parametrize(("steps", "diagnosed"), [(1, False), (4, False), (5, True)])
def test_no_diagnosis_from_a_rank_that_timed_only_its_first_steps(steps: int, diagnosed: bool) -> None:
    """Under 5 timed steps rank_stats leaves none out as warm-up (runtext.warmup_steps): all there is are the
    steps that paid for start-up, which a 1-step run with a DataLoader worker read as 96% data wait."""
    ranks = [_stats(0, data=0.06), _stats(1, data=0.06, steps=steps)]
    flag_stragglers(ranks)
    sentence = diagnose(ranks, num_workers=1)
    if diagnosed:
        assert sentence.startswith("input-bound:")
    else:
        assert sentence == (f"no diagnosis: rank 1 timed only {steps} step{'s' if steps > 1 else ''}, too few to "
                            "tell from start-up (workers starting, the first use of each kernel); a run with at least "
                            "5 timed steps is diagnosed")
    assert warmup_steps(steps) == (1 if diagnosed else 0)


@pytest.mark.parametrize(("comm_hook", "advice"), [
    ("none", "send fewer bytes (--ddp-comm-hook bf16 or powersgd), all-reduce less often"),
    ("bf16", "send fewer bytes (--ddp-comm-hook powersgd; bf16 is in use), all-reduce less often"),
    ("powersgd", "step); all-reduce less often"),
])
def test_communication_bound_advice_names_only_hooks_that_send_fewer_bytes(comm_hook: str, advice: str) -> None:
    ranks = [_stats(0, exposed=0.05), _stats(1, exposed=0.05)]
    flag_stragglers(ranks)
    assert advice in diagnose(ranks, comm_hook)


@pytest.mark.parametrize(("amp", "device_type", "native_bf16", "advice"), [
    ("off", "cpu", True, "; mixed precision (--amp bf16), a larger batch per device"),
    ("off", "cuda", False, "; mixed precision (--amp fp16: this GPU has no native bf16), a larger batch"),
    # A CPU without AVX512-BF16 or AMX: bf16 is emulated, an 11x slower step, so it is not advised ...
    ("off", "cpu", False, "(this CPU has no native bf16, AVX512-BF16 or AMX, so mixed precision would be slower)"),
    # ... and a run that asked for it is told to turn it off.
    ("bfloat16", "cpu", False, "; --amp off (bf16 is emulated on this CPU, which has no AVX512-BF16 or AMX"),
    ("bfloat16", "cpu", True, "a larger batch per device or faster devices (bfloat16 mixed precision is in use) are"),
    ("float16", "cuda", False, "a larger batch per device or faster devices (float16 mixed precision is in use) are"),
])
def test_compute_bound_advice_names_mixed_precision_only_where_it_is_off_and_native(
        amp: str, device_type: str, native_bf16: bool, advice: str) -> None:
    ranks = [_stats(0), _stats(1)]
    flag_stragglers(ranks)
    sentence = diagnose(ranks, "bf16", amp, device_type, native_bf16)
    assert sentence.startswith("compute-bound") and advice in sentence
    assert "--amp bf16" not in sentence or (amp == "off" and native_bf16)


# ---------------------------------------------------------------------------------------------------------------
# Delays injected on one rank: the summary names the rank and the phase


def _inject_env(spec: str) -> dict[str, str]:
    return cpu_env(PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "inject"), str(REPO)]),
                   DIST_MNIST_TEST_DELAY=spec)


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("phase", "words"), [("data", "data loading"), ("backward", "backward compute")])
def test_a_rank_slow_in_one_phase_is_named_with_that_phase(phase: str, words: str, tmp_path: Path) -> None:
    result = torchrun(2, *RUN_FLAGS, "--output-dir", str(tmp_path), "--run-name", "slow",
                      env=_inject_env(f"1:{phase}:{DELAY_S}"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "slow" / "summary.json").read_text())
    fast, slow = summary["ranks"]
    expected_phase = "backward_compute" if phase == "backward" else phase
    assert (fast["straggler"], slow["straggler"]) == (False, True)
    assert slow["straggler_phase"] == expected_phase and fast["straggler_phase"] is None
    # The slow rank waits least in the all-reduce; the other waits about the delay.
    assert fast["allreduce_exposed_per_step_s"] > slow["allreduce_exposed_per_step_s"] + DELAY_S / 2
    assert summary["diagnosis"].startswith(f"straggler: rank 1 is slow in {words}")
    assert f"diagnosis: {summary['diagnosis']}" in result.stdout


@pytest.mark.cli
@pytest.mark.timeout(120)
def test_slow_data_on_every_rank_is_diagnosed_input_bound_and_a_world_of_one_reports_no_comm(tmp_path: Path) -> None:
    result = train(*RUN_FLAGS, "--max-steps", "8", "--ddp-comm-hook", "powersgd", "--output-dir", str(tmp_path),
                   "--run-name", "input", env=_inject_env(f"all:data:{DELAY_S}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --ddp-comm-hook has no effect in a world of one process" in result.stdout
    summary = json.loads((tmp_path / "input" / "summary.json").read_text())
    assert summary["diagnosis"].startswith("input-bound: the ranks wait for data")
    (rank,) = summary["ranks"]
    assert rank["allreduce_bytes_per_step"] is None and rank["allreduce_time_per_step_s"] is None
    assert rank["comm_exposed_share"] is None and rank["straggler"] is False


@pytest.mark.parametrize(("argv", "device_type", "noted"), [
    ([], "cuda", False),  # the cuda recipe's hook is none, not the flag's plain default: no choice of the user's
    ([], "cpu", False),
    (["--ddp-comm-hook", "bf16"], "cuda", True),  # the plain default, but given: the user asked for it
    (["--bucket-cap-mb", "4"], "cpu", True),
])
def test_a_world_of_one_notes_only_the_comm_flags_the_user_gave(argv: list[str], device_type: str,
                                                                 noted: bool) -> None:
    cfg = apply_recipe(parse_args(argv), device_type).config
    one, two = SimpleNamespace(world_size=1), SimpleNamespace(world_size=2)
    assert (note_ignored_comm_flags(cfg, cast(DistContext, one)) is not None) == noted
    assert note_ignored_comm_flags(cfg, cast(DistContext, two)) is None


@pytest.mark.parametrize(("argv", "named"), [
    (["--bucket-cap-mb", "5"], "--bucket-cap-mb has"), (["--ddp-comm-hook", "fp16"], "--ddp-comm-hook has"),
    (["--ddp-comm-hook", "fp16", "--bucket-cap-mb", "5"], "--ddp-comm-hook and --bucket-cap-mb have")])
def test_the_world_of_one_note_names_the_comm_flags_given_and_no_other(argv: list[str], named: str) -> None:
    """review_combos finding 9: --bucket-cap-mb alone drew a note naming --ddp-comm-hook too."""
    cfg = apply_recipe(parse_args(argv), "cpu").config
    assert note_ignored_comm_flags(cfg, cast(DistContext, SimpleNamespace(world_size=1))) == (
        f"note: {named} no effect in a world of one process (no DDP, nothing is all-reduced)")


# ---------------------------------------------------------------------------------------------------------------
# Comm hooks and gradient accumulation: resumed runs equal uninterrupted ones; accumulation equals a larger batch

EXACT: dict[str, Any] = dict(
    dataset="synthetic", synthetic_train_size=512, synthetic_test_size=203, batch_size=16, eval_batch_size=50,
    log_every=4, peak_tflops=1.0, tensorboard=False, amp="off", deterministic=True, checkpoint_every=0, timeout_s=60.0,
    ddp_comm_hook="none")
# (name, config, total optimizer steps, where the first part stops): each stop is mid-epoch, and PowerSGD's
# compression has started by then (after the cpu recipe's warm-up of 0.2 epochs, at least 2 steps). 256 samples on
# 2 ranks at batch 16: 8 steps per epoch; 512 with 4 micro-batches per step: 4 optimizer steps per epoch.
RESUME_CASES: list[tuple[str, dict[str, Any], int, int]] = [
    ("bf16", dict(ddp_comm_hook="bf16", epochs=1, synthetic_train_size=256), 8, 5),
    ("powersgd", dict(ddp_comm_hook="powersgd", epochs=1, synthetic_train_size=256), 8, 5),
    ("accum4", dict(grad_accum_steps=4, epochs=2), 8, 3),
]

SWITCHED: dict[str, Any] = dict(ddp_comm_hook="powersgd", epochs=1, synthetic_train_size=256)


def _accumulated_equals_large_batch(ctx: DistContext) -> float:
    """Largest parameter difference: one step on a batch of 64 vs the same samples as 4 accumulated micro-batches
    of 16 (under DDP, no_sync on the first three), without dropout. fp32 sums in another order differ by rounding
    (about 1e-6 after AdamW's step at lr 2e-3); a lost or doubled micro-batch moves parameters by about the lr."""
    cfg = TrainConfig(**{**EXACT, "batch_size": 64})
    data = build_pipeline(cfg, ctx, *load_splits(cfg, ctx), on_device=False)
    data.train_batches.set_epoch(0)
    images, labels = next(iter(data.train_loader))
    params = []
    for micro_batches in ([(images, labels)], list(zip(images.split(16), labels.split(16)))):
        parts = build_train_parts(cfg, ctx, resolve_speed_settings(cfg, ctx.device), total_steps=100)
        parts.module.eval()  # no dropout: the step is the same function of the samples however they are split
        accumulation_step(parts, micro_batches, StepTimer(ctx.device))
        params.append(torch.cat([p.detach().flatten() for p in parts.module.parameters()]))
    return float((params[0] - params[1]).abs().max())


def _resume_scenario(ctx: DistContext, _batch_size: int) -> dict[str, Any]:
    out = Path(os.environ["DIST_MNIST_TEST_OUT"])
    for name, overrides, _, stop in RESUME_CASES:
        cfg = TrainConfig(**{**EXACT, **overrides, "output_dir": str(out / name)})
        run_training(TrainConfig(**{**cfg.to_json(), "run_name": "straight"}), ctx)
        run_training(TrainConfig(**{**cfg.to_json(), "run_name": "resumed", "max_steps": stop}), ctx)
        run_training(TrainConfig(**{**cfg.to_json(), "run_name": "resumed"}), ctx)
    # bf16 to step 5, then on with PowerSGD, whose start (step 2) lies behind: it compresses from step 6 on.
    switched = TrainConfig(**{**EXACT, **SWITCHED, "output_dir": str(out / "switched"), "run_name": "switched"})
    run_training(TrainConfig(**{**switched.to_json(), "ddp_comm_hook": "bf16", "max_steps": 5}), ctx)
    run_training(switched, ctx)
    # The all-reduce marks' scenario too: one world of two spawned processes for both (each spawn imports torch).
    return {"accumulation_vs_large_batch": _accumulated_equals_large_batch(ctx), **_marks_per_step(ctx, _batch_size)}


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("resume")
    os.environ["DIST_MNIST_TEST_OUT"] = str(out)  # spawned ranks inherit it
    try:
        results = spawn_world(2, _resume_scenario, out / "world")
    finally:
        del os.environ["DIST_MNIST_TEST_OUT"]
    return out, results


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "total"), [(name, total) for name, _, total, _ in RESUME_CASES])
def test_comm_hooks_and_accumulation_resume_to_identical_parameters(
        name: str, total: int, resumed_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    out, _ = resumed_runs
    assert_resumed_equals_straight(out / name, total)
    summary = json.loads((out / name / "straight" / "summary.json").read_text())
    assert summary["ranks_in_sync"]
    # An epoch is its optimizer steps, each of the global batch: with 4 micro-batches a step, epoch_time_s counted
    # every micro-batch as a step and read 4x too long.
    resolved = json.loads((out / name / "straight" / "config.json").read_text())["resolved"]
    assert summary["epoch_time_s"] * summary["samples_per_sec"] == pytest.approx(
        resolved["steps_per_epoch"] * resolved["global_batch_size"])
    sent = {r["allreduce_bytes_per_step"] for r in summary["ranks"]}
    if name == "bf16":
        assert sent == {GRADIENT_BYTES // 2}
    elif name == "powersgd":
        (mean,) = sent  # the warm-up steps send everything, the compressed ones far less
        assert mean < GRADIENT_BYTES / 2
    else:
        assert sent == {GRADIENT_BYTES}  # once per optimizer step of 4 micro-batches


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_a_run_switched_to_powersgd_on_resume_compresses_from_where_its_start_lies(
        resumed_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """PowerSGD's step count was not in a bf16 checkpoint and began at 0 on the resume: a run resumed past the
    warm-up sent full gradients for a whole warm-up more (steps 6 and 7 here, at 4.8 MB instead of 0.08)."""
    out, _ = resumed_runs
    summary = json.loads((out / "switched" / "switched" / "summary.json").read_text())
    assert summary["first_step"] == 5
    for rank in summary["ranks"]:
        # Every step compressed: the rank-2 factors (19,750 elements) and the biases (234), in fp32, as
        # docs/benchmarks.md's table of bytes per hook says.
        assert rank["steps"] == 3 and rank["allreduce_bytes_per_step"] == 79_936


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_accumulation_over_micro_batches_equals_one_larger_batch(
        resumed_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    _, results = resumed_runs
    for rank in results:  # DDP, 2 ranks: no_sync on the first three micro-batches
        assert rank["accumulation_vs_large_batch"] < 1e-5


@pytest.mark.timeout(60)
def test_accumulation_in_a_world_of_one_equals_one_larger_batch() -> None:
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo",
                      control_group=None)
    assert _accumulated_equals_large_batch(ctx) < 1e-5


def test_powersgd_on_gloo_puts_all_gradients_in_one_bucket_or_refuses() -> None:
    ctx = DistContext(rank=0, world_size=2, device=torch.device("cpu"), backend="gloo",
                      control_group=None)
    module = MnistCNN()
    assert ddp_bucket_kwargs("powersgd", 0.0, ctx, module) == {"bucket_cap_mb": 25.0}  # 4.6 MiB of gradients
    assert ddp_bucket_kwargs("none", 0.0, ctx, module) == {}  # torch's default buckets
    assert ddp_bucket_kwargs("bf16", 8.0, ctx, module) == {"bucket_cap_mb": 8.0}
    with pytest.raises(UserError, match="powersgd on gloo needs all gradients in one bucket: --bucket-cap-mb 1 "):
        ddp_bucket_kwargs("powersgd", 1.0, ctx, module)
    nccl = dataclasses.replace(ctx, backend="nccl")
    assert ddp_bucket_kwargs("powersgd", 1.0, nccl, module) == {"bucket_cap_mb": 1.0}


@pytest.mark.parametrize(("flags", "message"), [
    (["--grad-accum-steps", "0"], "error: --grad-accum-steps must be positive, got 0"),
    (["--bucket-cap-mb", "-1"], "error: --bucket-cap-mb must not be negative, got -1.0"),
    (["--grad-accum-steps", "17", "--max-steps", "1"], "error: --grad-accum-steps 17 is more than the 16 batches"),
])
def test_bad_comm_flags_are_one_line_errors(flags: list[str], message: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main([*RUN_FLAGS, "--synthetic-train-size", "256", "--output-dir", str(tmp_path), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


def _marks_per_step(ctx: DistContext, _batch_size: int) -> dict[str, Any]:
    """Six DDP steps with phase timers on every 3rd, drained after the third: how many all-reduce marks each step
    made, and how many events they took (FakeEvent: a CUDA event's interface on the CPU)."""
    made_before = FakeEvent.made
    cfg = TrainConfig(**{**EXACT, "ddp_comm_hook": "none"})
    data = build_pipeline(cfg, ctx, *load_splits(cfg, ctx), on_device=False)
    data.train_batches.set_epoch(0)
    parts = build_train_parts(cfg, ctx, resolve_speed_settings(cfg, ctx.device), total_steps=100)
    assert parts.comm is not None
    marks: list[int] = []
    events = Marks(cuda=False, new_event=FakeEvent)
    record = events.mark

    def counting() -> Any:
        marks[-1] += 1
        return record()

    events.mark = counting  # type: ignore[method-assign]
    parts.comm.marks = events
    timer = StepTimer(ctx.device, "sample", 3)
    batches = iter(data.train_loader)
    comm = []
    for step in range(6):
        marks.append(0)
        timer.begin_step()
        accumulation_step(parts, [next(batches)], timer)
        timer.end_step()
        if step in (2, 5):
            comm += parts.comm.drain()
    return {"marks": torch.tensor(marks), "buckets": torch.tensor([s.buckets for s in comm]),
            "bytes": torch.tensor([s.nbytes for s in comm]), "timed": len(timer.drain()),
            "events_made": FakeEvent.made - made_before}


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_all_reduces_are_marked_on_the_timed_steps_only(resumed_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    """A mark is two CUDA events and a completion callback per bucket on a GPU: only the steps the phase timers
    time get them, each of those keeps its buckets and bytes, and events read by a drain are recorded again."""
    _, results = resumed_runs  # the ranks ran _marks_per_step after the resume cases
    for rank in results:
        assert rank["timed"] == 2  # steps 0 and 3
        buckets = rank["buckets"].tolist()
        assert len(buckets) == 2 and buckets[0] >= 1 and rank["bytes"].tolist() == [GRADIENT_BYTES] * 2
        assert rank["marks"].tolist() == [2 * buckets[0], 0, 0, 2 * buckets[1], 0, 0]
        # The second timed step records the events the drain after the first one read again, and makes new ones
        # only for the buckets it has beyond them (DDP rebuilds its buckets after the first step: 1, then 2).
        assert rank["events_made"] == 2 * max(buckets) < 2 * sum(buckets)


def _powersgd_state(device: str) -> PowerSGDHookState:
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo", control_group=None)
    return PowerSGDHookState(MnistCNN().to(device), ctx, start_iter=2)


def test_powersgd_state_resumes_onto_the_gradients_device() -> None:
    """A checkpoint is loaded onto the host (map_location="cpu"), and the hook adds the residual to the bucket and
    multiplies into the P and Q it holds: on a GPU, residuals left on the host failed the first compressed step
    after every resume with a device mismatch. Here the meta device stands in for the GPU."""
    saved = _powersgd_state("cpu")
    saved.state.error_dict[0], saved.state.p_memory_dict[0], saved.state.q_memory_dict[0] = (
        torch.ones(4), torch.ones(2), torch.ones(3))
    resumed = _powersgd_state("meta")
    resumed.load_state_dict(saved.state_dict())
    s = resumed.state
    assert {t.device.type for d in (s.error_dict, s.p_memory_dict, s.q_memory_dict) for t in d.values()} == {"meta"}


def test_powersgd_state_is_gathered_from_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank unpickles every other rank's part of the gather, and a CUDA tensor comes back on the GPU it left:
    rank 0 made a CUDA context on rank 1's GPU (or failed where each process sees its own GPU only). What the
    gather gets is on the host."""
    state = _powersgd_state("cpu")
    state.state.error_dict[0], state.state.p_memory_dict[0], state.state.q_memory_dict[0] = (
        torch.ones(4), torch.ones(2), torch.ones(3))
    to_host: list[torch.Tensor] = []
    real = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moved = real(self, *args, **kwargs)
        if moved.device.type == "cpu":  # on the CPU `to` returns the tensor itself: a copy stands for the move
            moved = moved.clone()
            to_host.append(moved)
        return moved

    monkeypatch.setattr(torch.Tensor, "to", to)
    (gathered,) = state.state_dict()["ranks"]
    for part in ("error", "p", "q"):
        assert any(gathered[part][0] is t for t in to_host), part


@pytest.mark.parametrize(("hook", "amp", "dtype", "world_size", "refused"), [
    ("powersgd", "fp16", torch.float16, 2, "(--amp fp16)"),
    ("powersgd", "auto", torch.float16, 8, "(--amp auto on this GPU without native bf16)"),
    ("powersgd", "auto", torch.bfloat16, 2, None),
    ("powersgd", "off", None, 2, None),
    ("powersgd", "fp16", torch.float16, 1, None),  # no DDP, no hook: the world-of-one note says so
    ("fp16", "fp16", torch.float16, 2, None),
    ("none", "fp16", torch.float16, 2, None),
])
def test_powersgd_under_fp16s_grad_scaler_is_refused_where_ddp_runs(
        hook: str, amp: str, dtype: torch.dtype | None, world_size: int, refused: str | None) -> None:
    """After one overflowed fp16 step PowerSGD's error feedback stays non-finite and the GradScaler skips every step
    from then on: the weights stop changing for good, with no word (review_combos finding 2)."""
    if refused is None:
        refuse_powersgd_with_fp16(hook, amp, dtype, world_size)
        return
    with pytest.raises(UserError) as caught:
        refuse_powersgd_with_fp16(hook, amp, dtype, world_size)
    assert str(caught.value) == (
        f"--ddp-comm-hook powersgd cannot train under fp16's GradScaler {refused}: one overflowed step leaves "
        "PowerSGD's error feedback non-finite and every later step is skipped; use --amp off (or bf16 on a GPU that "
        "has it), or --ddp-comm-hook fp16 or none")


def test_powersgd_under_fp16_is_refused_before_the_run_folder_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--amp auto resolving to fp16 (a GPU without native bf16, forced here) on two ranks: the refusal comes with the
    device's other ones, so the command leaves nothing behind."""
    import dist_mnist.train as train_module
    resolve = train_module.resolve_speed_settings
    monkeypatch.setattr(train_module, "resolve_speed_settings",
                        lambda cfg, device: dataclasses.replace(resolve(cfg, device), amp_dtype=torch.float16))
    monkeypatch.setattr(train_module, "agree_on_recipe", lambda config, ctx: None)  # no peers to compare with
    cfg = parse_args([*SMOKE_FLAGS, "--ddp-comm-hook", "powersgd", "--amp", "auto", "--output-dir", str(tmp_path)])
    ctx = cast(DistContext, SimpleNamespace(device=torch.device("cpu"), world_size=2))
    with pytest.raises(UserError, match="^--ddp-comm-hook powersgd cannot train under fp16's GradScaler"):
        run_training(cfg, ctx)
    assert list(tmp_path.iterdir()) == []
