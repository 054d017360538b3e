"""Training: the explicit loop that calls data, step, evaluation, checkpoints, profiler and metrics by name."""

from __future__ import annotations

import gc
import itertools
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from shutil import which
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from dist_mnist import checkpoint, collectives, runjson
from dist_mnist.agreement import agree_on_data, agree_on_recipe, check_replicas_in_sync, code_version
from dist_mnist.argtypes import on_off
from dist_mnist.caches import check_compile_caches
from dist_mnist.comm import (
    CommRecorder,
    PowerSGDHookState,
    ddp_bucket_kwargs,
    note_ignored_comm_flags,
    refuse_powersgd_with_fp16,
)
from dist_mnist.config import RecipeResolution, TrainConfig, apply_recipe, parse_args, usable_cpus
from dist_mnist.console import kept_stdout, one_line, rank_line, warnings_end_open_line
from dist_mnist.data import (
    DataPipeline,
    accumulation_note,
    build_pipeline,
    load_splits,
    normalize,
    synthetic_data_note,
    to_device,
    worker_count_note,
)
from dist_mnist.distributed import DistContext, distributed_session, thread_count_note
from dist_mnist.durable import WriteFailed
from dist_mnist.errors import (
    Terminated,
    UserError,
    interrupted_early,
    signal_exit_code,
    stop_signal,
)
from dist_mnist.graphs import GraphDecision, GraphedStep, capture_failure_note, graph_decision, reduce_overhead_note
from dist_mnist.metrics import (
    MemoryTracker,
    RunWriter,
    StepSample,
    StepTimer,
    phase_timer_every_note,
    resolve_phase_timers,
)
from dist_mnist.model import MnistCNN
from dist_mnist.preemption import StopRequest, StopVote, Vote
from dist_mnist.profiling import (
    build_summary,
    cuda_memory_snapshot,
    flops_per_sample,
    make_profiler,
    measure_matmul_peak,
    parameter_digest,
    profile_records_nothing,
    rank_stats,
)
from dist_mnist.progress import Progress
from dist_mnist.restarts import env_whole_number, restart_advice, stop_agreed, torchrun_restarts
from dist_mnist.rundir import checkpoint_dir, is_restart, open_run_dir
from dist_mnist.runfiles import CONFIG_FILE, SUMMARY_FILE, RefusedRunFile, read_run_text
from dist_mnist.runtext import format_eval, format_summary
from dist_mnist.shutdown import failure_path
from dist_mnist.startup import StartupTimer

T = TypeVar("T")
# ---------------------------------------------------------------------------------------------------------------
# Settings that depend on the device


@dataclass(frozen=True)
class SpeedSettings:
    amp_dtype: torch.dtype | None
    channels_last: bool
    data_on_device: bool
    # CPU: denormal floats flushed to zero. Late in training AdamW's second moments (squares of small gradients)
    # fall below float32's normal range, where x86 arithmetic is many times slower: without it the optimizer step
    # of a 2-epoch CPU run grew from 9% to 26% of a step (docs/benchmarks.md). No float32 result this model can
    # tell apart changes.
    flush_denormal: bool = False
    # Whether the device runs bf16 in hardware. A CPU without AVX512-BF16 or AMX emulates it: there `--amp bf16` made
    # a step 11x slower than fp32 (docs/benchmarks.md), so the run says so and the diagnosis does not advise it.
    native_bf16: bool = True

    def describe(self) -> dict[str, Any]:
        return {"amp": dtype_name(self.amp_dtype), "channels_last": self.channels_last,
                "data_on_device": self.data_on_device, "flush_denormal": self.flush_denormal}


def dtype_name(dtype: torch.dtype | None) -> str:
    """'bfloat16', 'float16', 'float32'; 'off' for no autocast."""
    return str(dtype).removeprefix("torch.") if dtype else "off"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU instructions that make bf16 matmuls and convolutions faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cuda_has_native_bf16() -> bool:
    """Ampere or newer. torch.cuda.is_bf16_supported() alone also counts bf16 emulated in fp32 on older GPUs, which
    runs slower than fp16 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_speed_settings(cfg: TrainConfig, device: torch.device) -> SpeedSettings:
    cuda = device.type == "cuda"
    if cfg.amp == "fp16" and not cuda:
        raise UserError("--amp fp16 runs on CUDA only (it needs a GradScaler and fp16 kernels); "
                        "use --amp bf16 or --amp off on CPU")
    native_bf16 = cuda_has_native_bf16() if cuda else cpu_has_native_bf16()
    if cfg.amp == "bf16" and cuda and not native_bf16:
        raise UserError("--amp bf16 needs a GPU with bf16 support (Ampere or newer); use --amp fp16")
    if cfg.compile and not cuda and cfg.compile_backend == "inductor" and not _has_cxx_compiler():
        raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++) for inductor; install one, "
                        "or run without --compile")
    if cfg.data_on_device == "on" and not cuda:
        # Asked for explicitly, it must not quietly become off: a CPU has no device memory to keep the data in.
        raise UserError("--data-on-device on needs CUDA (it keeps the dataset in GPU memory); use --data-on-device "
                        "auto or off on CPU")
    if cfg.cuda_memory_snapshot and not cuda:
        raise UserError("--cuda-memory-snapshot needs CUDA; it records the CUDA caching allocator")
    if cfg.amp == "auto":
        amp_dtype: torch.dtype | None = (torch.bfloat16 if native_bf16 else torch.float16 if cuda else None)
    else:
        amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    return SpeedSettings(
        amp_dtype=amp_dtype,
        channels_last=cfg.channels_last != "off",
        # auto keeps the data on the GPU unless --num-workers asks for loader processes, which load on the host:
        # auto used to win there and the workers asked for were silently never started.
        data_on_device=cuda and (cfg.data_on_device == "on" or (cfg.data_on_device == "auto" and not cfg.num_workers)),
        flush_denormal=not cuda,
        native_bf16=native_bf16,
    )


def emulated_bf16_note(settings: SpeedSettings) -> str | None:
    """The run's note where bf16 autocast was asked for on a CPU that emulates bf16 (a GPU without it is refused)."""
    if settings.amp_dtype != torch.bfloat16 or settings.native_bf16:
        return None
    return ("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so --amp bf16 runs emulated: an 11x slower step "
            "than --amp off on a 2-core AMD EPYC (docs/benchmarks.md); --amp auto chooses off here")


def _has_cxx_compiler() -> bool:
    return any(which(cxx) for cxx in ("g++", "c++", "clang++"))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic results; set before the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# ---------------------------------------------------------------------------------------------------------------
# Model, optimizer and one training step


def lr_warmup_steps(total_steps: int, warmup_frac: float) -> int:
    """The learning-rate warm-up's length in optimizer steps: `warmup_frac` of the schedule's, at least 1."""
    return max(1, int(total_steps * warmup_frac))


def warmup_cosine(total_steps: int, warmup_frac: float) -> Any:
    """LR multiplier: linear warm-up to 1 over `warmup_frac` of the steps, then cosine down to 0."""
    warmup = lr_warmup_steps(total_steps, warmup_frac)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def short_schedule_note(cfg: TrainConfig, total_steps: int, powersgd_start: int | None) -> str | None:
    """A `note:` when --max-steps ends the run within the learning-rate warm-up: the schedule spans --epochs (so a
    run stopped by --max-steps resumes to the parameters of an uninterrupted one, docs/pitfalls.md), so such a run
    never trains at --lr, and PowerSGD (`powersgd_start`: the step count it compresses from; None without it) may
    never compress. None otherwise."""
    warmup = lr_warmup_steps(total_steps, cfg.warmup_frac)
    if not 0 < cfg.max_steps < total_steps:
        return None
    missed = []
    if cfg.max_steps < warmup:
        # Step S trains at the multiplier of the scheduler's count S - 1.
        peak = cfg.lr * warmup_cosine(total_steps, cfg.warmup_frac)(cfg.max_steps - 1)
        missed.append(f"its learning rate reaches {peak:.3g} of --lr {cfg.lr:g}")
    if powersgd_start is not None and cfg.max_steps <= powersgd_start:
        missed.append(f"--ddp-comm-hook powersgd never compresses (it starts after step {powersgd_start})")
    if not missed:
        return None
    # PowerSGD's start may come after the warm-up's end: a run ending between the two is past the warm-up.
    where = (f"ends within the learning-rate warm-up ({warmup} of the schedule's {total_steps} steps, which span "
             f"--epochs {cfg.epochs})" if cfg.max_steps < warmup else f"ends by step {powersgd_start}")
    return f"note: --max-steps {cfg.max_steps} {where}: {', and '.join(missed)}"


def lr_of_last_step(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the step just done trained at (of the first parameter group): the scheduler has already
    stepped to the next one, whose rate get_last_lr() gives (the line of the run's last step said 0). From the
    schedule on the host, not the group's lr, a device tensor under CUDA graphs."""
    return float(scheduler.base_lrs[0]) * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)


@dataclass
class TrainParts:
    module: MnistCNN  # the plain model: what checkpoints hold and evaluation runs
    # What the training step calls: DDP around `module` (world > 1), compiled when asked. Typed by its use, a call:
    # torch.compile's annotations say it returns a plain callable, though for a module it is a module too.
    train_model: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    settings: SpeedSettings
    device: torch.device
    grad_clip: float
    label_smoothing: float
    ddp: DDP | None = None  # the DDP wrapper (world > 1): its no_sync() skips the all-reduce of a micro-batch
    comm: CommRecorder | None = None  # times and counts DDP's gradient all-reduce (world > 1)

    @property
    def powersgd(self) -> PowerSGDHookState | None:
        """PowerSGD's state, where --ddp-comm-hook powersgd compresses DDP's gradients; None otherwise."""
        return self.comm.powersgd if self.comm else None


def make_model(settings: SpeedSettings, device: torch.device) -> MnistCNN:
    """The model on `device`, in the memory format the run computes in."""
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    # torch's stubs allow memory_format only alone; Module.to takes it with a device as well, as Tensor.to does.
    module = MnistCNN().to(device, memory_format=memory_format)  # type: ignore[call-overload]
    if settings.channels_last:
        # conv1's weight has one input channel, so `to(memory_format=...)` leaves its NCHW strides (9, 9, 3, 1)
        # (they count as channels-last too). Its NHWC convolution (normalize gives it an NHWC input) returns the
        # gradient as (9, 1, 3, 1), and DDP's gradient bucket views must match a parameter's strides exactly, or it
        # warns and copies the gradient at every step: so the weight gets those strides.
        weight = module.conv1.weight.data
        module.conv1.weight.data = weight.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return module


def warm_up_kernels(cfg: TrainConfig, settings: SpeedSettings, device: torch.device, eval_batch: int,
                    evaluation: bool = True) -> None:
    """A training forward and backward and an evaluation forward of a throwaway model at the run's shapes, while the
    import thread still imports torch._dynamo (which the optimizer needs before its first step).

    On CUDA the first use of each kernel, cuDNN's and cuBLAS's loading and set-up and the convolution plans of each
    shape cost the first steps of the graph capture and the first evaluation most of their time (graph_capture
    0.7-1.2 s on the H200, the first evaluation 41 ms against 8.5 ms for the others). Done here, they overlap the
    import: PyTorch lets go of the GIL inside an operator, and the import thread is Python. The caches they fill
    (loaded kernels, cuDNN's plans, the handles a finished thread hands back) are the process's, so the real model
    finds them warm. Its weights are thrown away, and build_train_parts seeds the generators it drew from again, so
    the run is the same with or without it (tests/test_gpu_paths.py).

    `evaluation` False leaves the evaluation pass out, for a run that captures a CUDA graph next: torch.cuda.graph
    empties the caching allocator's cache as the capture begins (torch.cuda.empty_cache() in its __enter__), which
    gave the pass's memory back to the driver, so the first real evaluation allocated it again. Such a run calls
    warm_up_evaluation after the capture instead.
    """
    model = make_model(settings, device)
    amp = partial(torch.autocast, device.type, dtype=settings.amp_dtype, enabled=settings.amp_dtype is not None)
    images = torch.zeros(cfg.batch_size, 28, 28, dtype=torch.uint8, device=device)
    with amp():
        logits = model(normalize(images, device, settings.channels_last))
        loss = F.cross_entropy(logits, torch.zeros(cfg.batch_size, dtype=torch.long, device=device),
                               label_smoothing=cfg.label_smoothing)
    loss.backward()
    if evaluation:
        warm_up_evaluation(model, settings, device, eval_batch)  # which ends with the synchronize below
    elif device.type == "cuda":
        torch.cuda.synchronize(device)  # its GPU time is the phase's, not the next one's


def warm_up_evaluation(model: nn.Module, settings: SpeedSettings, device: torch.device, eval_batch: int) -> None:
    """An evaluation forward at the run's evaluation batch, as `evaluate` runs it: its kernels and convolution plans,
    and the caching allocator left holding the batch's memory for the first real evaluation. In eval mode and
    inference mode it changes nothing in `model` and draws no random number (dropout is off), so a graphed run
    runs it on its own model after the capture (Trainer.resume_and_train)."""
    model.eval()
    images = torch.zeros(eval_batch, 28, 28, dtype=torch.uint8, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=settings.amp_dtype,
                                                enabled=settings.amp_dtype is not None):
        model(normalize(images, device, settings.channels_last)).float().argmax(dim=1)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # its GPU time is the phase's, not the next one's


def kernel_warmup_pays(device: torch.device) -> bool:
    """Whether start-up runs warm_up_kernels: on CUDA; on CPU a first step costs little more than any other."""
    return device.type == "cuda"


def settle_ddp_buckets(ddp: DDP, settings: SpeedSettings, device: torch.device, batch_size: int) -> None:
    """One throwaway forward and backward, so DDP's first real step already all-reduces in its final bucket layout.

    DDP all-reduces the first backward's gradients in one bucket and rebuilds its buckets, in gradient-ready order,
    at the next forward. With three or more ranks a sum's order depends on where an element falls in its bucket
    (gloo's ring), so a resumed process, whose first step used the first-step layout where the uninterrupted run
    used the rebuilt one, ended a 3-rank run with other parameters in the last bits. Done here in every run, the
    layout is the rebuilt one from step 1 on, resumed or not. Before the comm hook is registered (PowerSGD's state
    would count this step) and before the dropout generator is seeded (build_train_parts); the gradients go.
    """
    images = torch.zeros(batch_size, 28, 28, dtype=torch.uint8, device=device)
    with torch.autocast(device.type, dtype=settings.amp_dtype, enabled=settings.amp_dtype is not None):
        loss = ddp(normalize(images, device, settings.channels_last)).float().sum()
    loss.backward()
    ddp.module.zero_grad(set_to_none=True)


def state_in_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """After a resume: each optimizer state tensor laid out in memory as its parameter is. load_state_dict keeps
    the checkpoint's strides, and a checkpoint of a run with another --channels-last (a resume that is allowed, and
    noted) holds NCHW moments for NHWC weights or the other way round: the fused AdamW step then pairs them element
    by element in memory order, silently on CPU (conv2's weight 1.7e-3 off an uninterrupted run after one step)."""
    for parameter, state in optimizer.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == parameter.shape
                    and value.stride() != parameter.stride()):
                state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def build_train_parts(cfg: TrainConfig, ctx: DistContext, settings: SpeedSettings, total_steps: int) -> TrainParts:
    torch.set_flush_denormal(settings.flush_denormal)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    # On the device before the optimizer is built, so the optimizer holds the device's parameters.
    module = make_model(settings, ctx.device)
    # A world of one has nothing to all-reduce: DDP there would only copy every gradient into its buckets and
    # back (without it the one-process run was 5-15% faster on the 2-core CPU: docs/benchmarks.md).
    ddp = None if ctx.world_size == 1 else DDP(
        module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, gradient_as_bucket_view=True,
        **ddp_bucket_kwargs(cfg.ddp_comm_hook, cfg.bucket_cap_mb, ctx, module))
    if ddp:
        settle_ddp_buckets(ddp, settings, ctx.device, cfg.batch_size)
    comm = (CommRecorder(ddp, cfg.ddp_comm_hook, ctx, powersgd_start=int(total_steps * cfg.warmup_frac)) if ddp
            else None)
    wrapped: nn.Module = ddp if ddp else module
    # Compile the DDP wrapper (DDPOptimizer splits graphs at bucket boundaries so all-reduce still overlaps);
    # checkpoints come from `module`, so no `_orig_mod.`/`module.` prefixes ever reach them.
    train_model: Callable[[torch.Tensor], torch.Tensor] = wrapped
    if cfg.compile:
        train_model = torch.compile(wrapped, mode=cfg.compile_mode, backend=cfg.compile_backend)
    # fused=True: one kernel for all parameters; on CPU the unfused step cost as much as a small batch's backward.
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    optimizer.register_load_state_dict_post_hook(state_in_parameter_layout)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_frac))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=settings.amp_dtype == torch.float16)
    # Dropout masks differ per rank (as they would across one big batch) but are reproducible.
    torch.manual_seed(cfg.seed + 1 + ctx.rank)
    return TrainParts(module, train_model, optimizer, scheduler, scaler, settings, ctx.device, cfg.grad_clip,
                      cfg.label_smoothing, ddp, comm)


Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images, labels


def train_step(parts: TrainParts, images: torch.Tensor, labels: torch.Tensor, timer: StepTimer) -> torch.Tensor:
    """One optimizer step on one batch; returns the detached loss (no host sync)."""
    return accumulation_step(parts, [(images, labels)], timer)


def accumulation_step(parts: TrainParts, micro_batches: Sequence[Batch], timer: StepTimer) -> torch.Tensor:
    """One optimizer step on the mean gradient of `micro_batches`; returns their mean loss, detached.

    DDP all-reduces only in the last micro-batch's backward (no_sync before it, as nanoGPT does), so gradients
    cross the network once per optimizer step.
    """
    total: torch.Tensor | None = None
    if parts.comm:
        parts.comm.timing = timer.timing  # all-reduces are marked on the steps the phase timers time
    for i, (images, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync: AbstractContextManager[Any] = nullcontext() if last or parts.ddp is None else parts.ddp.no_sync()
        with timer.phase("to_device"):
            x = normalize(images, parts.device, parts.settings.channels_last)
            y = to_device(labels, parts.device)
        with sync:  # the forward pass decides whether this backward all-reduces
            with timer.phase("forward"):
                with torch.autocast(parts.device.type, dtype=parts.settings.amp_dtype,
                                    enabled=parts.settings.amp_dtype is not None):
                    loss = F.cross_entropy(parts.train_model(x), y, label_smoothing=parts.label_smoothing)
                if len(micro_batches) > 1:
                    loss = loss / len(micro_batches)  # gradients add up to those of the mean over all micro-batches
            with timer.phase("backward"):  # includes DDP's gradient all-reduce on the last micro-batch
                parts.scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    assert total is not None
    with timer.phase("optimizer"):
        if parts.grad_clip:
            parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(parts.module.parameters(), parts.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scheduler.step()
    if parts.comm:
        parts.comm.end_step()  # only the timed steps' all-reduces: they pair up with the phases
    return total


def evaluate(parts: TrainParts, loader: Any) -> dict[str, float]:
    """Loss and accuracy over the whole test set: each image counted once across ranks, identical on all ranks."""
    module = parts.module  # not DDP: ranks hold different numbers of test batches, so no collective per forward
    module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=parts.device)  # loss sum, correct, samples
    with torch.inference_mode(), record_function("eval"), torch.autocast(
            parts.device.type, dtype=parts.settings.amp_dtype, enabled=parts.settings.amp_dtype is not None):
        for images, labels in loader:
            x = normalize(images, parts.device, parts.settings.channels_last)
            y = to_device(labels, parts.device)
            logits = module(x).float()
            # Each image's float32 loss added in float64, not a float32 sum per batch: that rounding depended on
            # how the shard was cut into batches, so test_loss changed in its last bits with --eval-batch-size
            # and the world size. Added this way the sum is exact (so independent of the cut) while the spread of
            # the losses' magnitudes in bits plus log2 of their count stays under 29, as in flush_losses; past
            # that (a model sure of most images: losses near 0) it can differ only in float64's last bits.
            totals[0] += F.cross_entropy(logits, y, reduction="none").double().sum()
            totals[1] += (logits.argmax(dim=1) == y).sum()
            totals[2] += y.numel()
    module.train()
    if dist.get_world_size() > 1:  # a world of one has nothing to add up (and on CUDA no NCCL communicator to make)
        dist.all_reduce(totals)
    loss_sum, correct, samples = totals.tolist()
    return {"test_loss": loss_sum / samples, "test_accuracy": correct / samples, "test_samples": int(samples)}


def software_and_device(device: torch.device) -> dict[str, str | None]:
    """What two runs' speeds and numerics depend on beyond their flags, for config.json's `resolved` block (and so
    for `python -m dist_mnist.report A B`, which lists what differs): the versions, the dist_mnist code's digest
    (a checkout and an installed copy both say version 0.1.0) and, on CUDA, the GPU."""
    on_cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "dist_mnist_code": code_version(),
            "cuda": torch.version.cuda if on_cuda else None,
            "gpu": torch.cuda.get_device_name(device) if on_cuda else None}


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainState:
    """Where training stands in the data and the schedule, and the evaluations so far."""
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of `epoch` already done on each rank
    # Whole, not a sample like the step figures (metrics.StepSample): a resume writes metrics.jsonl again from it
    # and `complete` looks in it for a met --stop-at-accuracy; one record per evaluation, a few hundred bytes each.
    metrics: list[dict[str, Any]] = field(default_factory=list)
    # The step --eval-every counts from: the last evaluation of the cadence (an --eval-every step, an epoch's end).
    # Not the last record: the evaluation at a --max-steps limit (or a met target) ends an invocation, and counting
    # from it moved every later evaluation of a run extended past it (review_longrun finding 4).
    eval_anchor_step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "metrics": list(self.metrics), "eval_anchor_step": self.eval_anchor_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.metrics = list(state["metrics"])
        # Checkpoints before the anchor was saved counted from their last record, as they did then.
        self.eval_anchor_step = state.get("eval_anchor_step", self.metrics[-1]["step"] if self.metrics else 0)

    def record_evaluation(self, record: dict[str, Any], cadence: bool) -> None:
        """Keep an evaluation's record; `cadence`: one of --eval-every's or an epoch's end, which --eval-every
        counts from."""
        self.metrics.append(record)
        if cadence:
            self.eval_anchor_step = record["step"]

    def steps_since_evaluation(self) -> int:
        """Optimizer steps done since the last evaluation record (since step 0 before the first): 0 where this step
        was evaluated. The --eval-every cadence counts from its own anchor instead (`evaluation_due`)."""
        return self.step - (self.metrics[-1]["step"] if self.metrics else 0)

    def evaluation_due(self, eval_every: int) -> bool:
        """Whether --eval-every asks for an evaluation after this step (an epoch's end evaluates in any case).

        Counted from the last evaluation of the cadence (`eval_anchor_step`: an --eval-every step or an epoch's
        end), not from step 0: a count from step 0 put a second evaluation a few steps after an epoch's end (steps
        117 and 120 of the cuda recipe's 117-step epochs), one more pause before 99.0% for an accuracy the run had
        just read (8.5 ms on the H200, six steps' worth); nor from the evaluation at a --max-steps limit, which an
        uninterrupted run does not make.
        """
        return bool(eval_every) and self.step - self.eval_anchor_step >= eval_every

    def epoch_number(self) -> int:
        """The epoch of the last step done, counted from 1 as people do: what every message and file shows.

        Right after an epoch's last step `epoch` has already moved on, so that step's epoch is `epoch` itself.
        """
        return self.epoch if self.batch_in_epoch == 0 and self.epoch > 0 else self.epoch + 1


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The training loop's garbage collection: only what the loop itself makes.

    Everything start-up made (torch's modules, the model, the data: about 270,000 objects) lives through the loop;
    frozen, the garbage collector no longer walks it. Unfrozen, each full collection walks it all (94 ms on our
    2-core CPU, 0.01 ms frozen), whenever the loop's own allocations happen to trigger one: on a GPU, host time
    that the GPU waits out once a pause has drained its queue. torchtitan controls collections for the same reason
    (its gc_freq). Unfrozen again afterwards, so a process that trains more than once (the tests) frees it all.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class RunClock:
    """Training wall time: evaluation, checkpoint and reporting pauses are measured apart, and the time of the
    processes a run was resumed from carries over through checkpoints.

    On CUDA the host runs ahead of the GPU (a replayed graph returns at once: dozens of steps can be queued when a
    pause begins), and a pause's first read of a result waits for all of them. `sync` (the device's synchronize)
    runs before a pause's clock starts, so the queued steps count as training time, not as evaluation or logging.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.start: float | None = None  # perf_counter at the first training step of this process
        self.first_step_unix = 0.0
        self.pauses_s: dict[str, float] = {}  # this process's seconds in pauses, by what paused
        self.resumed_s = 0.0  # seconds since the first step, as of the checkpoint this process resumed from
        self.resumed_paused_s = 0.0  # of those, the seconds spent in pauses
        # Whether a pause waited for the device before the step that began last: the device then idled until the
        # host queued work again, so that step is not the steady state (StepTimer.begin_step).
        self.step_follows_sync = False
        self._synced = False  # since the last step began
        self._sync = sync
        # The pauses in progress, outermost first: [perf_counter at its start, seconds of the pauses that ended
        # inside it]. A clock read inside one (the progress report's, after its loss gather) leaves its time so far
        # out too (paused_s).
        self._open: list[list[float]] = []

    def begin(self) -> float:
        """Called at every step start; starts the clock at the first one. Returns the perf_counter reading."""
        now = time.perf_counter()
        if self.start is None:
            self.start, self.first_step_unix = now, time.time()
        self.step_follows_sync, self._synced = self._synced, False
        return now

    def training_seconds(self) -> float:
        """This process's training time so far, pauses left out."""
        return 0.0 if self.start is None else time.perf_counter() - self.start - self.paused_s

    def elapsed_s(self) -> float:
        """Seconds since the run's first training step, evaluation and checkpoints included."""
        return self.resumed_s + (0.0 if self.start is None else time.perf_counter() - self.start)

    @contextmanager
    def paused(self, kind: str, sync: bool = True) -> Iterator[None]:
        """Time in here is left out of training time, and added to `pauses_s[kind]`. `sync=False` for a pause that
        waits for no GPU result (the profiler's step between windows): synchronizing there would stall every
        step's queue."""
        if sync and self._sync is not None:
            self._sync()
            self._synced = True
        frame = [time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            took = time.perf_counter() - frame[0]
            # A pause inside another counts under its own kind only, so the kinds add up to the time paused.
            self.pauses_s[kind] = self.pauses_s.get(kind, 0.0) + took - frame[1]
            if self._open:
                self._open[-1][1] += took

    @property
    def paused_s(self) -> float:
        """This process's seconds in pauses, of every kind, the one in progress so far included: a progress report
        reads training time inside its pause, which counted as training in its interval and came off the next one
        (review_longrun finding 1); a checkpoint's clock is taken inside its pause."""
        # Of the pauses in progress, the time not yet in pauses_s: the pauses that ended inside them are.
        open_s = time.perf_counter() - self._open[0][0] - sum(inner for _, inner in self._open) if self._open else 0.0
        return sum(self.pauses_s.values()) + open_s

    @property
    def wall_per_step(self) -> bool:
        """Whether the wall time between two step starts is that step's time: not where the host runs ahead of the
        device (CUDA), where a step's time lands in whichever later step or pause waits for it."""
        return self._sync is None

    def paused_total_s(self) -> float:
        """Seconds since the run's first step spent in pauses, those of the processes it was resumed from included:
        `elapsed_s() - paused_total_s()` is the run's training time."""
        return self.resumed_paused_s + self.paused_s

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s(), "paused_s": self.paused_total_s()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed_s = state["elapsed_s"]
        self.resumed_paused_s = state.get("paused_s", 0.0)  # checkpoints before 2026-11-27 kept elapsed time only


# A run whose last process was stopped while it finished (a Ctrl-C after the loop), or could not write the summary (a
# full disk): the summary is made of that process's step times, which ended with it, so no rerun can write it; a
# rerun must not read as if all were there. Where an earlier process (before a resume) wrote one, that summary is of
# its own steps only.
NO_SUMMARY_WHY = ("the process that finished it ended before writing one (it was stopped, or could not write it), "
                  "and the step times it is made of ended with that process; metrics.jsonl holds the run's "
                  "evaluations")


def missing_summary_note(run_dir: Path, step: int) -> str:
    """What the "already complete" line adds when summary.json is not of the run's end at `step`: absent, or of an
    earlier process's steps (a resumed process ended the run without writing its own)."""
    try:
        # read_run_text: a FIFO in its place blocked the launch's "already complete" line for ever.
        last_step = runjson.loads(read_run_text(run_dir / SUMMARY_FILE)).get("last_step")
    except FileNotFoundError:
        return f" (it has no {SUMMARY_FILE}: {NO_SUMMARY_WHY})"
    except (OSError, ValueError, AttributeError, RefusedRunFile):
        return ""  # damaged or no file a run writes: `python -m dist_mnist.report` says so
    if isinstance(last_step, int) and last_step < step:
        return f" (its {SUMMARY_FILE} is an earlier process's, of the steps up to {last_step}: {NO_SUMMARY_WHY})"
    return ""


def world_size_warning(old_world_size: int, world_size: int, epoch: int, continue_at: int, samples_done: int,
                       progress: float, at_end: bool = False) -> str:
    """The `warning:` a resume under another number of processes prints (Trainer.adapt_to_world_size): where in the
    epoch (`epoch` counted from 0) and the schedule it goes on, against how far the checkpoint's processes got;
    `at_end`: at the epoch's end, which in this world comes at or before where they got."""
    return (f"the checkpoint was written by {old_world_size} process{'' if old_world_size == 1 else 'es'}, this run "
            f"has {world_size}: continuing epoch {epoch + 1} at {'its end, ' if at_end else ''}sample {continue_at} "
            f"of its order (it had reached {samples_done}), "
            f"learning-rate schedule at {progress:.1%}")


class Trainer:
    """Holds a run's parts; `fit` is the loop."""

    def __init__(self, resolution: RecipeResolution, ctx: DistContext, run_dir: Path, settings: SpeedSettings,
                 graphs: GraphDecision, startup: StartupTimer | None = None) -> None:
        self.startup = startup or StartupTimer()
        self.cfg, self.recipe, self.ctx = resolution.config, resolution.recipe, ctx
        cfg = self.cfg
        self.run_dir = run_dir
        # The name a rerun must add to find this run (collectives.Rerun); None where --run-name gave it.
        self.name_to_add = None if cfg.run_name else run_dir.name
        self.checkpoint_dir = checkpoint_dir(cfg, self.run_dir)
        self.settings = settings
        if cfg.deterministic:
            # torch.use_deterministic_algorithms imports torch._inductor, which imports torch._dynamo: beside the
            # import thread, the two imports enter torch's circular ones from opposite ends and one of them fails
            # (torch 2.11: "cannot import name 'IndentedBuffer' from partially initialized module
            # 'torch._inductor.utils'"). A deterministic run waits for the thread here instead.
            self.startup.join_background_imports()
        seed_everything(cfg.seed, cfg.deterministic)
        with self.startup.phase("data"):
            train_split, test_split = load_splits(cfg, ctx)
            self.data: DataPipeline = build_pipeline(cfg, ctx, train_split, test_split, self.settings.data_on_device)
        agree_on_data(ctx, len(train_split), len(test_split))
        # The CPUs DataLoader's own check counts (those this process may run on); torchrun names the host's ranks.
        ranks_on_host, cpus = env_whole_number("LOCAL_WORLD_SIZE", 1, least=1), usable_cpus()
        self.workers_note = worker_count_note(self.data.num_workers, cpus, ranks_on_host)
        self.threads_note = thread_count_note(cfg.threads, ranks_on_host, cpus)
        # Optimizer steps; an epoch's batches beyond a whole number of accumulation rounds are left out.
        self.steps_per_epoch = self.data.steps_per_epoch // cfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"--grad-accum-steps {cfg.grad_accum_steps} is more than the {self.data.steps_per_epoch} "
                            "batches of an epoch on each rank; lower it or --batch-size")
        self.batches_per_epoch = self.steps_per_epoch * cfg.grad_accum_steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.global_batch = cfg.batch_size * ctx.world_size * cfg.grad_accum_steps
        if kernel_warmup_pays(ctx.device):
            with self.startup.phase("kernel_warmup"):
                warm_up_kernels(cfg, self.settings, ctx.device, max(1, self.data.first_test_batch),
                                evaluation=not graphs.enabled)
        self.startup.join_background_imports()
        with self.startup.phase("model"):
            self.parts = build_train_parts(cfg, ctx, self.settings, self.total_steps)
        with self.startup.phase("tensorboard"):
            self.writer = RunWriter(self.run_dir, ctx.is_main, cfg.tensorboard)
        self.comm_note = note_ignored_comm_flags(cfg, ctx)
        self.graphs = graphs
        self.step_fn: Callable[[Sequence[Batch], StepTimer], torch.Tensor] = partial(accumulation_step, self.parts)
        self.graphed = False  # whether the steps replay a captured CUDA graph (a failed capture leaves it False)
        self.target_reached: dict[str, Any] | None = None  # the evaluation that met --stop-at-accuracy
        self.state = TrainState()
        timer_mode = resolve_phase_timers(cfg.phase_timers, ctx.device)
        self.timer = StepTimer(ctx.device, timer_mode, cfg.phase_timer_every)
        self.timer_note = phase_timer_every_note(cfg.explicit(), cfg.phase_timers, timer_mode)
        self.memory = MemoryTracker(workers=self.data.workers)
        self.stop = StopRequest(ctx.agent_pid)
        stop_agreed(False)  # an earlier run's stop in this process (main() called again) is not this one's
        self.vote = StopVote(ctx)
        self.clock = RunClock(partial(torch.cuda.synchronize, ctx.device) if ctx.device.type == "cuda" else None)
        self.timeout = collectives.CollectiveTimeout(cfg.timeout_s, cfg.train_timeout_s)
        self.prev_step_start: tuple[float, float] | None = None  # (wall clock, paused_s) when it began
        self.measured_step_s: StepSample[float] = StepSample()  # wall seconds between step starts, pauses left out
        self.checkpoints = checkpoint.BackgroundWriter()  # rank 0 writes the files in a thread
        # The newest checkpoint, on disk or being written (a failure lets that write finish): every rank knows it.
        self.last_checkpoint: checkpoint.WrittenCheckpoint | None = None
        # The newest one known to be on disk: what last_checkpoint falls back to when the write in flight fails.
        self.confirmed_checkpoint: checkpoint.WrittenCheckpoint | None = None
        self.resumed_from: Path | None = None  # the checkpoint this process continued from, if any
        self.numerics_note: str | None = None  # the rounding settings the resume changed (numerics_changes)
        self.loss_window: list[tuple[int, torch.Tensor]] = []
        self.train_loss_sum, self.train_loss_count = 0.0, 0
        self.progress = Progress(self.run_dir, ctx.is_main, self.step_limit(), self.global_batch)
        self.last_record = (0, 0.0)  # (step, training seconds) at the last metrics record
        self.first_step = 0  # the step this process took the run over at: a resumed run's checkpoint step
        self.run_config: dict[str, Any] = {}  # config.json's content, made as the run files are written

    # -- output --------------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.ctx.is_main:
            self.progress.end_line()
            # One line, nothing a terminal acts on: messages quote what files held (a checkpoint's settings).
            print(one_line(message), flush=True)

    def training_seconds(self) -> float:
        return self.clock.training_seconds()

    def paused(self, kind: str, sync: bool = True) -> Any:
        """Time spent in here (evaluation, checkpoints, progress reports, trace writing) is not training time.

        Leaving it out keeps samples/s and the measured step time honest, and the latter is what the phase
        timers must explain. On CUDA the steps still queued when it begins are waited for first (RunClock).
        """
        return self.clock.paused(kind, sync)

    def elapsed_s(self) -> float:
        return self.clock.elapsed_s()

    def phase(self, name: str, done: str | None = None) -> AbstractContextManager[None]:
        """A failed collective in here ends this rank with one line naming `name`, the step and the last checkpoint
        (`done`: what a complete run has, as collectives.phase takes it)."""
        return collectives.phase(name, self.state.step, self.timeout.seconds, self.settled_checkpoint, self.rerun,
                                 done=done)

    def rerun(self) -> collectives.Rerun:
        """What the launch command must change to go on with this run: the --run-name a default name needs, and
        --resume auto in place of a --resume PATH once this process has written a checkpoint (past PATH: the same
        command is then refused, checkpoint.resume_from_path)."""
        past_path = self.cfg.resume not in ("auto", "never") and self.last_checkpoint is not None
        return collectives.Rerun(self.name_to_add, self.cfg.resume if past_path else None)

    def settled_checkpoint(self) -> Path | None:
        """The run's newest checkpoint for a failure line: a write in flight (rank 0's, begun by a save whose
        broadcast then failed) is let finish first, and is then the one to name."""
        self.settle_checkpoint_after_failure()
        return self.newest_checkpoint()

    def newest_checkpoint(self) -> Path | None:
        """The run's newest checkpoint as every rank knows it: the last one this process wrote (or is writing: a
        failure lets that write finish), else the one it resumed from. None means the run has none: a process
        that neither resumed nor wrote one started at step 0, which `--resume auto` does only where none exists."""
        return self.last_checkpoint.path if self.last_checkpoint else self.resumed_from

    def stateful(self) -> dict[str, checkpoint.Stateful]:
        """Everything a checkpoint holds and a resume restores, by name: one list, so the two cannot drift."""
        comm_state = self.parts.powersgd
        return {"model": self.parts.module, "optimizer": self.parts.optimizer, "scheduler": self.parts.scheduler,
                "scaler": self.parts.scaler, "train_state": self.state, "clock": self.clock, "progress": self.progress,
                **({"comm_hook": comm_state} if comm_state else {})}

    # -- checkpoints --------------------------------------------------------------------------------------

    def resume(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.resume == "never":
            return
        # Rank 0 reads and checks the file and sends it to the others: one decision, no shared disk needed.
        state, error, source = None, "", ""
        if ctx.is_main:
            try:
                if cfg.resume == "auto":
                    had = len(checkpoint.list_checkpoints(self.checkpoint_dir))
                    found = checkpoint.find_resume_checkpoint(self.checkpoint_dir)
                    if found is None and had:
                        # Starting again from step 0 would replace the records of the steps those files held.
                        raise UserError(f"none of the {had} checkpoint(s) in {self.checkpoint_dir} loads (each is "
                                        "set aside as *.unreadable, see the warnings above), and starting again from "
                                        "step 0 would write over this run's records; give --resume a checkpoint "
                                        "that loads, or start afresh under another --run-name")
                else:
                    chosen = checkpoint.resume_from_path(Path(cfg.resume), self.checkpoint_dir, is_restart())
                    found = chosen.path, chosen.state
                    if chosen.note:
                        self.log(chosen.note)
                if found is not None:
                    source, state = str(found[0]), found[1]
                    checkpoint.check_compatible(state, self.parts.module, cfg.to_json(), source, self.recipe.name)
                    checkpoint.check_training_parts(state, self.parts.optimizer, self.parts.scheduler,
                                                    self.parts.scaler, source)
                    checkpoint.check_position(state, source, self.batches_per_epoch, ctx.world_size, cfg.batch_size,
                                              self.data.train_size)
            except UserError as exc:
                state, error = None, str(exc)  # every rank fails: no need to send them the refused state
        state, source, error = ctx.broadcast_object((state, source, error))
        if error:
            raise UserError(error)
        if state is None:
            restarts_done, allowed = torchrun_restarts()
            if restarts_done:  # a restart that resumes says so in its "resumed from" line; this one would be silent
                self.log(f"torchrun restart {restarts_done} of {allowed}: the run wrote no checkpoint before the "
                         "failure, so it starts again from step 0")
            return
        # load_checkpoint and the checks above refuse what they can name; whatever a part's own load_state_dict still
        # raises on the state (a tensor that does not fit, a key it lacks) is one line naming the part, not a
        # traceback. Nothing of the run folder is written yet, so the refused start leaves nothing behind.
        applying = "model"
        try:
            for name, part in self.stateful().items():
                # An empty state is what a disabled GradScaler (no fp16) saves, and a checkpoint of a run without
                # PowerSGD has no comm_hook part: the part stays as built.
                if state.get(name):
                    applying = name
                    part.load_state_dict(state[name])
            if state["world_size"] == ctx.world_size:
                applying = "rng"
                checkpoint.set_rng_state(state["rng"][ctx.rank], ctx.device)
            else:
                applying = "train_state"
                self.adapt_to_world_size(state["world_size"])
            powersgd = self.parts.powersgd
            if powersgd and (not state.get("comm_hook") or state["world_size"] != ctx.world_size):
                # PowerSGD starts compressing once its count of steps reaches the LR warm-up's end. A run switched to
                # it on this resume has no count saved, and one resumed at another world size is at another step of
                # this world's schedule: counting from 0, or from the old world's steps, started it a whole warm-up
                # late (or early).
                powersgd.state.iter = self.parts.scheduler.last_epoch
            applying = "train_loss"
            self.restore_train_loss(state.get("train_loss", []), state["world_size"] == ctx.world_size)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
            raise checkpoint.part_refused(source, applying, exc) from None
        # samples_per_sec of the next record counts this process's steps over this process's training time.
        self.last_record = (self.state.step, 0.0)
        where = (f"epoch {self.state.epoch_number()}, batch {self.state.batch_in_epoch}" if self.state.batch_in_epoch
                 else f"end of epoch {self.state.epoch_number()}")
        self.resumed_from = Path(source)
        self.log(f"resumed from step {self.state.step} ({where}) of {source}")
        current = self.numerics()
        if state["world_size"] == ctx.world_size == 1:
            del current["ddp_comm_hook"]  # no DDP in either: no hook ran, and none runs now
        # Said once the run is known to train on: a run already complete continues nothing.
        self.numerics_note = checkpoint.numerics_changes(state.get("numerics"), current)

    def numerics(self) -> dict[str, Any]:
        """The settings that change how a step rounds, or draws dropout's masks, but may change on a resume
        (checkpoint.numerics_changes)."""
        numerics = {"device": self.ctx.device.type, "amp": dtype_name(self.settings.amp_dtype),
                    "channels_last": self.settings.channels_last, "ddp_comm_hook": self.cfg.ddp_comm_hook,
                    "compile": self.cfg.compile, "deterministic": self.cfg.deterministic,
                    # A replayed step reads its learning rate from a float32 tensor, an eager one gets the scheduler's
                    # Python float. The decision, not whether capture worked: a failed capture keeps the tensor.
                    "cuda_graphs": self.graphs.enabled}
        if self.cfg.compile:  # compared only where both runs compiled: on -> off says it already
            numerics["compile_backend"] = self.cfg.compile_backend
        if self.ctx.device.type == "cpu":
            # How a CPU operator splits its work, and so how its sums round (a requeue onto a node with other CPUs
            # under --threads 0 too); a GPU's kernels do not depend on it.
            numerics["threads"] = torch.get_num_threads()
        return numerics

    def restore_train_loss(self, per_rank: list[list[float]], same_world: bool) -> None:
        """The training-loss sums since the last evaluation, as the checkpoint's ranks held them; evaluation adds
        them up over the ranks, so with another world size rank 0 takes them all. Checkpoints written before they
        were saved hold none: the next record then averages the steps since the resume only."""
        if same_world and per_rank:
            self.train_loss_sum, count = per_rank[self.ctx.rank]
        elif self.ctx.is_main and per_rank:
            self.train_loss_sum, count = sum(s for s, _ in per_rank), sum(c for _, c in per_rank)
        else:
            return
        self.train_loss_count = int(count)

    def adapt_to_world_size(self, old_world_size: int) -> None:
        """Continue a checkpoint written by another number of processes (an elastic restart with new membership).

        Every epoch is one global permutation, and rank r takes every W-th index of it, so the first k batches
        of all ranks together are exactly its first k*B*W samples, whatever W is. The new ranks skip as many of
        their own batches as fit into what was done, repeating fewer than one global batch. The learning-rate
        schedule moves to the step of this world's schedule at that position. Dropout streams restart from the
        seed: the run stays correct but is no longer bit-identical to an uninterrupted one.
        """
        state, accum = self.state, self.cfg.grad_accum_steps
        samples_done = state.batch_in_epoch * self.cfg.batch_size * old_world_size
        state.batch_in_epoch = samples_done // self.global_batch * accum  # whole optimizer steps only
        at_end = state.batch_in_epoch >= self.batches_per_epoch
        if at_end:
            # Past this world's epoch (it leaves out more leftover images, or pads differently): stay at its end, so
            # the loop ends the epoch as after its last step, evaluating it (and checkpointing it, with
            # --epoch-checkpoints on). Moved on to the next
            # epoch, the run had no record of this one's end, and one in its last epoch was "already complete" with
            # no evaluation at all (review_repro finding 1). That checkpoint has this step's number: in this run's
            # folder it replaces the one resumed from, as it should, since a resume rewrites metrics.jsonl from the
            # newest checkpoint and `complete` reads its position (the step's record and the epoch's end are kept).
            state.batch_in_epoch = self.batches_per_epoch
            if state.metrics and state.steps_since_evaluation() == 0:
                # This step was evaluated (the old run's --max-steps limit), so the loop does not evaluate it again;
                # that record now ends an epoch, and --eval-every counts from an epoch's end.
                state.eval_anchor_step = state.step
        scheduler = self.parts.scheduler
        # The step of this world's schedule that the data position is at, so the schedule ends on the run's last
        # step. The old position's fraction of training, rounded apart from the data's, was up to 5 steps off: the
        # last steps trained at lr 0, or the run ended before the decay did.
        scheduler.last_epoch = state.epoch * self.steps_per_epoch + state.batch_in_epoch // accum
        progress = scheduler.last_epoch / self.total_steps
        for group, base_lr, factor in zip(self.parts.optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        torch.manual_seed(self.cfg.seed + 1 + self.ctx.rank + 1000 * (state.step + 1))
        # batch_in_epoch counts micro-batches: per batch, batch size x world size samples (not the global batch,
        # which holds --grad-accum-steps once more).
        continue_at = state.batch_in_epoch * self.cfg.batch_size * self.ctx.world_size
        if self.ctx.is_main:  # on stderr with the other warnings; rank_line ends the open progress line
            rank_line(0, "warning", world_size_warning(old_world_size, self.ctx.world_size, state.epoch, continue_at,
                                                       samples_done, progress, at_end=at_end))

    def save_checkpoint(self) -> None:
        with self.paused("checkpoint"), self.phase("the checkpoint"):
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        started = time.perf_counter()
        self.flush_losses()  # a non-finite loss stops us before it can reach a checkpoint
        # On every rank: a part may gather per-rank state (PowerSGD's residuals).
        parts = {name: part.state_dict() for name, part in self.stateful().items()}
        # Each rank's random generators and its training-loss sum since the last evaluation: the next evaluation's
        # train_loss is the mean over that whole interval, steps before the checkpoint included. And where its state
        # is not finite: the losses were, yet the update after the last of them can overflow the weights or the
        # optimizer's moments. Such a checkpoint was written, rotated a good one away, and was named "the last good
        # checkpoint" when the next step's loss stopped the run.
        per_rank = self.ctx.gather_objects((checkpoint.rng_state(self.ctx.device),
                                            [self.train_loss_sum, self.train_loss_count],
                                            checkpoint.non_finite_entry(parts)))
        if bad := next((entry for _, _, entry in per_rank if entry), None):
            # "The training state", not the model's: the find may be an optimizer moment or a PowerSGD residual.
            raise self.non_finite(f"the training state became non-finite by step {self.state.step} ({bad}) while the "
                                  "training loss stayed finite")

        def write() -> checkpoint.WrittenCheckpoint:
            # The write before this one first (submit would wait for it too): known on disk from here, even where
            # this save is cut short before it returns (a signal handler's error raised mid-save).
            self.confirm_checkpoint()
            state = {
                "format_version": checkpoint.FORMAT_VERSION,
                "model_class": type(self.parts.module).__name__,
                "world_size": self.ctx.world_size,
                "rng": [rng for rng, _, _ in per_rank],
                "train_loss": [loss for _, loss, _ in per_rank],  # [sum, count] per rank
                "config": self.cfg.to_json(),
                "recipe": self.recipe.name,
                "numerics": self.numerics(),
                **parts,
            }
            return self.checkpoints.submit(checkpoint.serialize(state), self.checkpoint_dir, self.state.step,
                                           self.cfg.keep_checkpoints, started)

        # Nobody moves on before rank 0 holds the snapshot; its file is written while training goes on, and a failed
        # write (a full disk) ends every rank within a step (the stop vote's Vote.WRITE_FAILED). The write before it
        # is on disk now.
        submitted = self.checkpoint_outcome(lambda: self.ctx.on_main(write))
        self.confirmed_checkpoint, self.last_checkpoint = self.last_checkpoint, submitted

    def wait_for_checkpoint(self) -> None:
        """The last checkpoint on disk before the run reports and exits; a failed write ends every rank here."""
        with self.paused("checkpoint", sync=False), self.phase("the checkpoint"):
            self.checkpoint_outcome(lambda: self.ctx.on_main(self.confirm_checkpoint))
        self.confirmed_checkpoint = self.last_checkpoint

    def checkpoint_outcome(self, wait: Callable[[], T]) -> T:
        """`wait`'s result, where `wait` waits for rank 0's write in flight. A write that failed is no checkpoint:
        the run's newest is the last one confirmed on disk again (else the one it resumed from), so no failure line
        names a file that is not there."""
        try:
            return wait()
        except UserError:
            self.last_checkpoint = self.confirmed_checkpoint
            raise

    def confirm_checkpoint(self) -> None:
        """This rank's write in flight (rank 0's; none elsewhere) waited for: on disk, the run's newest checkpoint,
        or its error raised (each caller takes it through checkpoint_outcome, on every rank)."""
        if done := self.checkpoints.wait():
            self.last_checkpoint = self.confirmed_checkpoint = done
            if done.note:
                rank_line(self.ctx.rank, "warning", done.note)

    def settle_checkpoint_after_failure(self) -> None:
        """A run failing while rank 0 writes a checkpoint lets the write finish (no collective: the other ranks may
        be gone); a write that failed as well is said in one line. The finished write is the run's newest
        checkpoint even where the failure came before the save returned it (a signal handler's error raised mid-save),
        so the failure line names that file, not the one before."""
        try:
            self.checkpoint_outcome(self.confirm_checkpoint)
        except UserError as exc:
            rank_line(self.ctx.rank, "warning", str(exc))  # ends rank 0's open progress line first, as errors do

    # -- losses and progress --------------------------------------------------------------------------------

    def flush_losses(self) -> None:
        """Move the window of per-step losses to the host; stop on every rank if any of them is not finite."""
        if not self.loss_window:
            return
        steps = [s for s, _ in self.loss_window]
        # float64: float32 losses add up without rounding while the spread of their magnitudes (in bits) plus log2
        # of their count stays under 29 (with the recipes' label smoothing 0.1 no loss falls below about 0.5), so
        # the sums do not depend on where the flushes fell (a resumed run flushed at its checkpoint, the
        # uninterrupted one did not). Past that they still differ in the last bits only.
        values = torch.stack([loss for _, loss in self.loss_window]).double().cpu()
        self.loss_window = []
        bad = [s for s, v in zip(steps, values.tolist()) if not math.isfinite(v)]
        first_bad = min((b for b in self.ctx.gather_objects(bad[0] if bad else None) if b is not None), default=None)
        if first_bad is not None:
            raise self.non_finite(f"training loss became non-finite at step {first_bad}")
        total = float(values.sum())
        self.train_loss_sum += total
        self.train_loss_count += len(values)
        self.progress.add_losses(total, len(values))

    def non_finite(self, what: str) -> UserError:
        """The line that stops every rank at a non-finite loss or training state (`what` says which, where), before
        it reaches a record or a checkpoint."""
        # Not a listing of the folder: a write in flight (of a step before this one, so good) is the newest once
        # it is done, and the rotation after it removes the file listed now.
        newest = self.settled_checkpoint()
        kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written"
        return UserError(f"{what}; stopped ({kept}). Lower --lr, or use --grad-clip")

    def log_progress(self) -> None:
        with self.paused("progress report"), self.phase("the loss flush of the progress report"):
            self._log_progress()

    def _log_progress(self) -> None:
        self.flush_losses()
        record = self.progress.report(self.state.epoch_number(), self.state.step, self.elapsed_s(),
                                      self.training_seconds(), lr_of_last_step(self.parts.scheduler),
                                      self.timer.drain())
        if self.parts.comm:
            self.parts.comm.drain()  # resolves its marks while they are few (CUDA events)
        rss = self.memory.sample()
        if self.ctx.is_main:
            memory = {"rss_mb": rss / 2**20}
            if self.ctx.device.type == "cuda":
                memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**20
            # Phase figures are None for an interval in which no step was timed (--phase-timers sample/off):
            # scalars() writes numbers only.
            self.writer.scalars("train", {"loss": record.train_loss, "lr": record.lr,
                                          "samples_per_sec": record.samples_per_sec,
                                          "step_time_ms": record.step_time_ms,
                                          "data_wait_share": record.data_wait_share, **memory}, self.state.step)

    def step_limit(self) -> int:
        """The step number training ends at: the steps done plus this world's steps left.

        Not simply the run's steps at this world size: a checkpoint written by another number of processes counted
        its steps in that world's global batches (adapt_to_world_size keeps the count, so checkpoint names keep
        growing), and the progress line read "step 20/16 (125.0%)".
        """
        steps_left = ((self.cfg.epochs - self.state.epoch) * self.steps_per_epoch
                      - self.state.batch_in_epoch // self.cfg.grad_accum_steps)
        end = self.state.step + steps_left
        return min(self.cfg.max_steps, end) if self.cfg.max_steps else end

    def evaluate_and_record(self, cadence: bool = True) -> dict[str, Any]:
        """`cadence`: an --eval-every step or an epoch's end, which later --eval-every steps count from
        (TrainState.record_evaluation)."""
        # The loss gather in flush_losses waits for the slowest rank: not a step's time.
        with self.paused("evaluation"), self.phase("evaluation"):
            self.flush_losses()
            start = time.perf_counter()
            result = evaluate(self.parts, self.data.test_loader)  # ends reading its totals: the GPU is done
            eval_s = time.perf_counter() - start
            # The training losses were finite, yet the last update can break the model (parameters that overflow
            # in the test forward): stop as flush_losses does. The loss is all-reduced, so every rank stops here.
            if not math.isfinite(result["test_loss"]):
                raise self.non_finite(f"test loss became non-finite after step {self.state.step}")
            # The mean training loss since the last record, over all ranks.
            loss = torch.tensor([self.train_loss_sum, float(self.train_loss_count)], dtype=torch.float64)
            self.ctx.all_reduce(loss)
            self.train_loss_sum, self.train_loss_count = 0.0, 0
        seconds = self.training_seconds()
        prev_step, prev_seconds = self.last_record
        self.last_record = (self.state.step, seconds)
        record = {
            "epoch": self.state.epoch_number(), "step": self.state.step,
            "train_loss": loss[0].item() / max(loss[1].item(), 1),
            **result,
            "samples_per_sec": (self.state.step - prev_step) * self.global_batch / max(seconds - prev_seconds, 1e-9),
            "elapsed_s": self.elapsed_s(),
            # Where elapsed_s went: this evaluation's own seconds, and all pauses so far (evaluations, checkpoints,
            # progress reports, trace writing); the rest is training.
            "eval_s": eval_s, "paused_s": self.clock.paused_total_s(),
        }
        self.state.record_evaluation(record, cadence)
        # Its own writing is a pause too (the GPU is idle since the evaluation), after the figures it records.
        with self.paused("evaluation", sync=False), self.phase("evaluation"):
            self.ctx.on_main(lambda: self.writer.append_metrics(record))
            self.log(format_eval(record))
        if self.target_reached is None and self.meets_target(record):
            self.target_reached = record
        return record

    def meets_target(self, record: dict[str, Any]) -> bool:
        return bool(self.cfg.stop_at_accuracy) and record["test_accuracy"] >= self.cfg.stop_at_accuracy

    # -- the loop -------------------------------------------------------------------------------------------

    def fit(self) -> None:
        # The allocator's history from before the resume and the graph capture on, so an out-of-memory error in
        # either is in the snapshot too.
        snapshot = self.run_dir / f"rank{self.ctx.rank}.memory_snapshot.pickle"
        with cuda_memory_snapshot(self.cfg.cuda_memory_snapshot, snapshot):
            try:
                self.resume_and_train()
            except BaseException as exc:
                try:  # the run is ending: no second error mid-cleanup
                    collectives.stop_raising_for_lost_data_workers()
                except RuntimeError as late:
                    # torch's SIGCHLD handler raised as the call began (a Python handler runs at a function's
                    # entry): a killed worker broke its batch's connection, the loop failed with that, and its
                    # SIGCHLD came a moment later. `exc` already says so; raised on, this error lost the step and
                    # the checkpoint from the line (main's wording). The handler is still in place: again.
                    if collectives.lost_data_worker(late) is None:
                        raise
                    collectives.stop_raising_for_lost_data_workers()
                failure_path.begin()
                # rank_line's lines (the error, the write's warning below) end an open progress line themselves; a
                # traceback (an error not ours to word) does not.
                self.progress.end_line()
                self.settle_checkpoint_after_failure()
                error = self.failure_line(exc)
                if error is None:
                    raise
                raise error from None

    def failure_line(self, exc: BaseException) -> UserError | None:
        """A stop signal outside the loop's own stop handler (a Ctrl-C, a SIGTERM), or a dead DataLoader worker, as
        one line that says what is on disk; None for anything else. Both can arrive anywhere in the run: a Python
        signal handler runs wherever the main thread is, and torch's SIGCHLD handler raises a dead worker's error
        that way."""
        step = self.state.step if self.clock.start is not None else None  # None: before the first step
        last = self.newest_checkpoint()
        if reason := collectives.lost_data_worker(exc):
            return collectives.lost_data_worker_error(reason, step, last, self.rerun())
        if not isinstance(exc, (KeyboardInterrupt, Terminated)):
            return None
        if step is None and "run_files" not in self.startup.phases:
            return interrupted_early(exc)
        sig = stop_signal(exc)
        if step is not None:
            # The loop turns the stop signals into a stop with a checkpoint (preemption.StopRequest): a run that has
            # stepped and still gets one is past its loop, its last checkpoint written.
            message = (f"interrupted ({sig.name}) after step {step}, while the run was finishing (its summary may be "
                       f"missing); {collectives.resume_advice(last)[0]}")
        else:  # config.json and metrics.jsonl are in the run folder
            kept, rerun = collectives.resume_advice(last, self.rerun().command())
            message = (f"interrupted ({sig.name}) during start-up, before the first step but after writing the run's "
                       f"config.json; {kept}: {rerun}")
        return UserError(message, exit_code=signal_exit_code(sig))

    def checkpoint_due(self) -> bool:
        """This step is one of --checkpoint-every's."""
        return bool(self.cfg.checkpoint_every) and self.state.step % self.cfg.checkpoint_every == 0

    def at_max_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.state.step >= self.cfg.max_steps

    def complete(self) -> str | None:
        """Why the run has nothing left to do (its epochs, its --max-steps or its --stop-at-accuracy reached), or
        None. A rerun that does nothing says which: a new --stop-at-accuracy met by an evaluation before it was
        given ends a run as surely as the old limits."""
        cfg = self.cfg
        if self.state.epoch >= cfg.epochs:
            return f"its {cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'} done"
        if self.at_max_steps():
            # A checkpoint at or past a --max-steps lowered on the rerun: the run cannot go back to the limit.
            past = f", the run at step {self.state.step} already" if self.state.step > cfg.max_steps else ""
            return f"--max-steps {cfg.max_steps} reached{past}"
        if met := next((m for m in self.state.metrics if self.meets_target(m)), None):
            # The flag as it is given (a fraction): 1e-9 read "0.00%".
            return (f"--stop-at-accuracy {cfg.stop_at_accuracy:g} met by the evaluation at step {met['step']}, "
                    f"{met['test_accuracy']:.2%}")
        return None

    def unevaluated_end_note(self) -> str:
        """What the "already complete" line adds where the run's last step has no evaluation: a process stopped
        mid-epoch (which skips the evaluation, the resume continuing the interval) and a rerun whose lowered
        --max-steps ends the run at that step. Its epochs' ends, its --max-steps step and a met target evaluate."""
        last = self.state.metrics[-1]["step"] if self.state.metrics else None
        if last == self.state.step:
            return ""
        evaluated = f"its last evaluation is of step {last}" if last is not None else "it has no evaluation"
        go_on = "; a higher --max-steps goes on" if self.at_max_steps() else ""
        return (f" ({evaluated}: the process that reached step {self.state.step} was stopped before evaluating "
                f"it{go_on})")

    def resume_and_train(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        with self.startup.phase("resume"):
            self.resume()
        state = self.state
        if done := self.complete():
            # Before the run's files: config.json keeps describing the run that made them, whatever flags this had.
            fresh = not (self.run_dir / CONFIG_FILE).exists()  # this folder never held the run: taken away again
            if fresh and cfg.checkpoint_dir:  # another run's --checkpoint-dir
                self.log(f"the checkpoints in --checkpoint-dir {self.checkpoint_dir} are of a run already complete "
                         f"at step {state.step} ({done}), whose own run folder holds its files; nothing to do (a new "
                         "run needs another --checkpoint-dir)")
            elif fresh and cfg.resume not in ("auto", "never"):
                # --resume PATH into a new folder: "run NEW is already complete ... (it has no summary.json: the
                # process that finished it ended before writing one ...)" was true of neither folder.
                go_on = "; a higher --max-steps trains on from it" if self.at_max_steps() else ""
                self.log(f"checkpoint {self.resumed_from} is of a run already complete at step {state.step} ({done}), "
                         f"whose own run folder holds its files; nothing to do{go_on}")
            else:
                self.log(f"run {self.run_dir} is already complete at step {state.step} ({done}); nothing to do"
                         + self.unevaluated_end_note() + missing_summary_note(self.run_dir, state.step))
            return
        steps = self.step_limit()
        if self.resumed_from is None and profile_records_nothing(cfg, steps):
            # Before the run's files: a run from step 0 can never record, while a resumed one's few steps left are
            # only warned about (make_profiler).
            wait = cfg.profile_wait + cfg.profile_warmup
            longer = f"raise --max-steps above {wait}" if cfg.max_steps else "train more --epochs"
            raise UserError(f"--profile records nothing in this run: it has {steps} step{'' if steps == 1 else 's'}, "
                            f"and the first window records only after --profile-wait {cfg.profile_wait} + "
                            f"--profile-warmup {cfg.profile_warmup} steps; {longer}, or lower --profile-wait or "
                            "--profile-warmup")
        if self.numerics_note:
            self.log(self.numerics_note)
        resolved = {
            "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
            "global_batch_size": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
            "threads_per_process": torch.get_num_threads(), **software_and_device(ctx.device),
            **self.settings.describe(), "cuda_graphs": self.graphs.enabled, **self.recipe.describe()}

        # Kept for summary.json as well: config.json is the latest process's, and a summary an earlier process wrote
        # (a resumed one was stopped before writing its own) was compared under the later process's settings.
        self.run_config = {**cfg.to_json(), "resolved": resolved}

        def write_run_files() -> None:
            self.writer.write_json(CONFIG_FILE, self.run_config)
            self.writer.reset_metrics(state.metrics)
            # An earlier process of the run (one that restarted from step 0 too) may have written TensorBoard records
            # past this step.
            self.writer.resume_at(state.step)

        with self.startup.phase("run_files"):  # written durably (fsync), whose cost depends on the disk
            ctx.on_main(write_run_files)
        self.progress.step_limit = steps  # made before the resume, which can move the end
        self.progress.start(state.step, self.elapsed_s())
        self.first_step = state.step
        self.log(f"run {self.run_dir}: {self.recipe.summary_line()}; {ctx.world_size} x {ctx.device.type} "
                 f"({ctx.backend}), {self.data.train_size} training images, global batch {self.global_batch}, "
                 f"{self.steps_per_epoch} step{'' if self.steps_per_epoch == 1 else 's'}/epoch, "
                 + ", ".join(f"{name} {on_off(value)}" for name, value in
                             {**self.settings.describe(), "cuda_graphs": self.graphs.enabled}.items()))
        powersgd = self.parts.powersgd
        for note in (self.comm_note, self.timer_note, self.workers_note, self.threads_note,
                     emulated_bf16_note(self.settings), synthetic_data_note(cfg),
                     accumulation_note(self.data.train_size, ctx.world_size, cfg.batch_size,
                                       self.data.steps_per_epoch, cfg.grad_accum_steps),
                     short_schedule_note(cfg, self.total_steps,
                                         powersgd.state.start_powerSGD_iter if powersgd else None),
                     reduce_overhead_note(cfg.compile_mode, ctx.device.type) if cfg.compile else None):
            if note:
                self.log(note)
        if self.graphs.note:
            self.log(self.graphs.note)
        if self.graphs.enabled:
            with self.startup.phase("graph_capture"):  # after resume: the graph replays from the restored state
                try:
                    self.step_fn = GraphedStep(self.parts, cfg.batch_size).step
                    self.graphed = True
                except RuntimeError as exc:  # weights and optimizer state are back as they were
                    self.log(capture_failure_note(exc, cfg.cuda_graphs))
            if kernel_warmup_pays(ctx.device):
                # The kernel warm-up's evaluation pass, left until now: the capture (a failed one too) emptied the
                # allocator's cache as it began, and the pass leaves the test batch's memory cached for the first
                # evaluation, which comes before 99%.
                with self.startup.phase("kernel_warmup"):
                    warm_up_evaluation(self.parts.module, self.settings, ctx.device,
                                       max(1, self.data.first_test_batch))

        stopped_by: str | None = None
        with self.stop, frozen_heap(), make_profiler(cfg, ctx, self.run_dir, state.step, steps) as profiler:
            while state.epoch < cfg.epochs and stopped_by is None:
                self.data.train_batches.set_epoch(state.epoch, skip_batches=state.batch_in_epoch)
                batches = iter(self.data.train_loader)
                while True:
                    # The epoch's last step is done: nothing to fetch (an accumulation round's leftover batches are
                    # left out). Before the profiler's next range begins, so the epoch-end evaluation lies in its last
                    # step's ProfilerStep#, as a mid-epoch one does, not in the next epoch's first.
                    if state.batch_in_epoch >= self.batches_per_epoch:
                        self.prev_step_start = None  # the interval across the new epoch's start is not a step's
                        break
                    # Profiling windows open and close at their edges only (opening starts kineto; closing waits for
                    # the GPU and writes the trace): there the queued steps are waited for first; at every other
                    # step the host must not wait here. Without --profile not even the pause is entered: two context
                    # managers a step are host time a graph replay of 0.3-0.4 ms notices.
                    if cfg.profile:
                        with self.paused("profiler", sync=profiler.window_opens_next):
                            profiler.begin_step()
                    self.begin_step()
                    with self.timer.phase("data"):
                        micro_batches = list(itertools.islice(batches, cfg.grad_accum_steps))
                    if len(micro_batches) < cfg.grad_accum_steps:  # the fetch that ended the epoch is not a step
                        self.timer.cancel_step()
                        self.prev_step_start = None
                        break
                    with self.phase("the training step (the gradient all-reduce in backward)"):
                        loss = self.step_fn(micro_batches, self.timer)
                    if timeout_note := self.timeout.switch_to_training(ctx):
                        self.log(timeout_note)
                    self.timer.end_step()
                    if cfg.profile:
                        with self.paused("profiler", sync=profiler.window_closes_next):
                            profiler.step()
                    state.step += 1
                    state.batch_in_epoch += cfg.grad_accum_steps
                    self.loss_window.append((state.step, loss))

                    if state.step % cfg.log_every == 0:
                        self.log_progress()
                    with self.phase("the stop vote"):
                        vote = self.vote.poll(self.local_vote())
                    if vote is Vote.WRITE_FAILED:
                        self.end_vote_and_wait()  # raises rank 0's write error on every rank
                    stop_now = vote is Vote.STOP
                    at_limit = self.at_max_steps()
                    end_of_epoch = state.batch_in_epoch == self.batches_per_epoch
                    if state.evaluation_due(cfg.eval_every) and not end_of_epoch:
                        self.evaluate_and_record()
                    if stop_now:
                        stopped_by = self.stop.signal_name or "a stop request on another rank"
                        stop_agreed()  # a failure from here on is followed by no torchrun restart
                    if stop_now or at_limit or self.target_reached:
                        if profiler.window_open:  # stopped inside a window: its trace ends with this step
                            with self.paused("profiler"):
                                profiler.end()
                        break
                    if self.checkpoint_due() and not end_of_epoch:
                        self.save_checkpoint()
                epoch_done = state.batch_in_epoch >= self.batches_per_epoch
                if epoch_done:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                # Not twice for one step: a run whose --max-steps falls on an --eval-every step has just evaluated.
                evaluated = bool(state.metrics) and state.steps_since_evaluation() == 0
                # A stop signal skips the evaluation only mid-epoch, where the resumed run continues the interval. A
                # stop on an epoch's last step or on the --max-steps step still evaluates it: the resume starts the
                # next epoch or finds the run complete, so that record would be missing for good (and in the first
                # case every later --eval-every step shifted).
                run_done = self.at_max_steps()
                if (stopped_by is None or epoch_done or run_done) and self.target_reached is None and not evaluated:
                    self.evaluate_and_record(cadence=epoch_done)
                # An epoch's end checkpoints with --epoch-checkpoints on, or on a --checkpoint-every step (the loop
                # above leaves that one to here); a stop, a limit and the run's last epoch always do.
                if (cfg.epoch_checkpoints == "on" or self.checkpoint_due() or stopped_by is not None or run_done
                        or self.target_reached or state.epoch >= cfg.epochs):
                    self.save_checkpoint()
                if run_done or self.target_reached:
                    break
            self.end_vote_and_wait()  # in here, where a stop signal during the wait is noted, not fatal
        self.finish(stopped_by, profiler.outcome())

    def local_vote(self) -> Vote:
        """This rank's part in the stop vote: rank 0's failed checkpoint write (looked at without waiting) first, a
        stop signal next."""
        if self.checkpoints.failed:
            return Vote.WRITE_FAILED
        self.stop.check_agent()
        return Vote.STOP if self.stop.requested else Vote.GO_ON

    def end_vote_and_wait(self) -> None:
        """Wait for the stop vote in flight, then for the checkpoint write in flight (its error raised on every
        rank)."""
        with self.phase("the stop vote"):
            self.vote.finish()
        self.wait_for_checkpoint()

    def begin_step(self) -> None:
        now, paused_now = self.clock.begin(), self.clock.paused_s
        if self.prev_step_start is not None:
            start, paused = self.prev_step_start
            self.measured_step_s.append(now - start - (paused_now - paused))
        self.prev_step_start = (now, paused_now)
        self.timer.begin_step(after_sync=self.clock.step_follows_sync)

    def finish(self, stopped_by: str | None, traces: dict[str, Any] | None) -> None:
        """Report: progress tail, where the time went (summary.json), and why we stopped. `traces`: this process's
        profiler traces (WindowedProfiler.outcome), None without --profile."""
        ctx = self.ctx
        self.progress.end_line()
        self.timer.drain()
        if self.parts.comm:
            self.parts.comm.drain()
        self.memory.sample()
        cuda_peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None
        stats = rank_stats(ctx.rank, self.timer.steps.items, self.cfg.batch_size * self.cfg.grad_accum_steps,
                           self.measured_step_s.items, self.memory.peak_rss_bytes, cuda_peak,
                           parameter_digest(self.parts.module),
                           self.parts.comm.steps.items if self.parts.comm else None,
                           wall_per_step=self.clock.wall_per_step, steps_timed=self.timer.steps.count)
        stats["traces"] = traces
        # A peer lost after the last step of a complete run costs only what was not yet written: rank 0 may have
        # written summary.json before the broadcast that failed, the others cannot know.
        complete = self.complete()
        with self.phase("the final summary", complete and f"the training is complete ({complete}) but its "
                        f"{SUMMARY_FILE} may not be written (metrics.jsonl holds the run's evaluations)"):
            all_stats = ctx.gather_objects(stats)
            # A failed summary.json write (a full disk) ends every rank, not only rank 0.
            ctx.on_main(lambda: self.write_summary(all_stats, complete))
        if ctx.is_main and self.target_reached:
            hit = self.target_reached
            print(f"reached test accuracy {hit['test_accuracy']:.2%} (--stop-at-accuracy "
                  f"{self.cfg.stop_at_accuracy:g}) at step {hit['step']}, {hit['elapsed_s']:.2f} s after the first "
                  f"step; stopped, checkpoint saved in {self.checkpoint_dir}", flush=True)
        if ctx.is_main and stopped_by:
            # A stop on the run's last step: its final evaluation and checkpoint are done, and a rerun does nothing.
            then = ("The run is complete." if complete is not None
                    else f"Run {self.rerun().command()} to resume.")
            print(f"stopped by {stopped_by} at step {self.state.step}; checkpoint saved in {self.checkpoint_dir}. "
                  f"{then}", flush=True)
        if ctx.is_main and self.last_checkpoint and self.last_checkpoint.seconds is not None:
            path, size, seconds = self.last_checkpoint.path, self.last_checkpoint.size, self.last_checkpoint.seconds
            print(f"last checkpoint: {path} ({size / 2**20:.1f} MiB, written in {seconds * 1e3:.0f} ms)", flush=True)
        self.writer.close()
        with self.phase("the final summary", complete and f"the training is complete ({complete}) and its "
                        "summary done"):
            ctx.barrier()
        check_replicas_in_sync([r["params_digest"] for r in all_stats])

    def write_summary(self, all_stats: list[dict[str, Any]], complete: str | None = None) -> None:
        """Rank 0: summary.json and the table; `complete`: why the training is complete, where it is (a failed
        write then has nothing to resume: "rerun to resume from the last checkpoint" was wrong)."""
        if not (self.timer.steps.count or self.measured_step_s.count):
            return
        peak_source = "--peak-tflops"
        peak = self.cfg.peak_tflops * 1e12
        if not peak:
            dtype = self.settings.amp_dtype or torch.float32
            emulated = dtype == torch.bfloat16 and not self.settings.native_bf16
            # Emulated bf16 computes in float32, whose peak is the hardware's; an emulated 1024^3 bf16 matmul took
            # 6-7 s on a 2-core AMD EPYC, and the measurement runs four of them.
            dtype = torch.float32 if emulated else dtype
            peak = measure_matmul_peak(self.ctx.device, dtype)
            peak_source = f"measured {dtype_name(dtype)} matmul" + (", bf16 being emulated" if emulated else "")
        measured = [r["measured_step_time_s"] for r in all_stats]  # None on a rank that took one step
        mean_step = None if None in measured else statistics.fmean(measured)
        summary = build_summary(
            all_stats,
            global_samples_per_sec=self.global_batch / mean_step if mean_step else None,
            epoch_time_s=mean_step * self.steps_per_epoch if mean_step else None,
            flops=flops_per_sample(self.parts.module),
            peak_flops_per_process=peak, peak_source=peak_source, comm_hook=self.cfg.ddp_comm_hook,
            amp=dtype_name(self.settings.amp_dtype), device_type=self.ctx.device.type,
            native_bf16=self.settings.native_bf16, num_workers=self.data.num_workers)
        # Start-up cost: process start (python, imports, data, model, rendezvous) to the first step.
        summary.update(self.startup.report(self.clock.first_step_unix))
        summary["first_step_unix"] = self.clock.first_step_unix
        summary["config"] = self.run_config  # the settings this summary's steps ran under (config.json's)
        # This process's steps, which every figure above is of: after a resume, not the whole run's.
        summary["first_step"], summary["last_step"] = self.first_step, self.state.step
        summary["phase_timing"] = {**self.timer.describe(), "wall_per_step": self.clock.wall_per_step}
        summary["cuda_graphs"] = self.graphed  # config.json has the decision; this is what ran
        summary["pauses_s"] = dict(self.clock.pauses_s)  # this process's pauses, by what paused
        if self.target_reached:
            summary["stop_at_accuracy"] = {"target": self.cfg.stop_at_accuracy,
                                           **{k: self.target_reached[k] for k in ("step", "epoch", "test_accuracy",
                                                                                  "elapsed_s")}}
        try:
            self.writer.write_json(SUMMARY_FILE, summary)
        except WriteFailed as exc:
            if complete is None or exc.folder_gone:
                raise
            raise UserError(f"{exc.failed}; the training is complete ({complete}) and its last checkpoint is "
                            f"{self.newest_checkpoint()}: only {SUMMARY_FILE} is missing, whose step times ended with "
                            f"this process (metrics.jsonl holds the run's evaluations); nothing is left to resume") \
                from None
        print(format_summary(summary), flush=True)


def run_training(cfg: TrainConfig, ctx: DistContext, startup: StartupTimer | None = None) -> None:
    """One run in an open distributed session: the recipe, the ranks' agreement, the locked run folder, the loop."""
    # The recipe needs the device, which only the distributed session knows; the ranks then compare the values
    # they will train with, before anything that would hang on ranks with other flags.
    resolution = apply_recipe(cfg, ctx.device.type)
    agree_on_recipe(resolution.config, ctx)
    # What this device cannot run (--amp fp16 or --cuda-graphs on on a CPU, ...) is refused before the run folder
    # exists: a refused command leaves nothing behind.
    run_cfg = resolution.config
    settings = resolve_speed_settings(run_cfg, ctx.device)
    refuse_powersgd_with_fp16(run_cfg.ddp_comm_hook, run_cfg.amp, settings.amp_dtype, ctx.world_size)
    graphs = graph_decision(run_cfg.cuda_graphs, ctx.device.type, ctx.world_size, settings.amp_dtype,
                            run_cfg.compile, run_cfg.grad_accum_steps)
    with open_run_dir(run_cfg, ctx) as run_dir:
        Trainer(resolution, ctx, run_dir, settings, graphs, startup).fit()


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, open the distributed session, train. User errors become one line and exit code 1; a
    Ctrl-C or SIGTERM outside the training loop one line and exit code 130 or 143. Standard output whose reader
    goes away (`| head`) does not end the run (dist_mnist/console.py)."""
    with kept_stdout(), warnings_end_open_line(), failure_path:
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    rank = os.environ.get("RANK", "0")
    try:
        startup = StartupTimer()
        cfg = parse_args(argv)
        if cfg.compile:
            # Before the import thread, which reads TORCHINDUCTOR_CACHE_DIR (and the compile, which loads code from
            # the folders): a cache folder another user can write to runs their code as this user.
            check_compile_caches()
        try:
            # Collectives after the first step are named by their own phase; any failing before it is start-up's.
            # Which checkpoint the run has is not known out here (Trainer.newest_checkpoint knows it inside).
            with distributed_session(cfg, startup) as ctx, collectives.phase("start-up", None, cfg.timeout_s, None,
                                                                            checkpoint_known=False):
                # The first optimizer imports torch._dynamo (torch.optim's dynamo guards), RunWriter TensorBoard.
                # Not before the process group opens: init_process_group touches torch._dynamo once it is in
                # sys.modules, so it would wait for the whole import under the module's lock (0.9 s on the 2-core
                # CPU) and nothing would overlap it. From here it overlaps the data and the kernel warm-up.
                startup.import_in_background("torch._dynamo",
                                             *(["torch.utils.tensorboard"] if cfg.tensorboard else []))
                run_training(cfg, ctx, startup)
        except BaseException:
            # A thread still importing while the interpreter shuts down can crash: joined, as the failure's own. It
            # is failing first, so torchrun's SIGTERM to every rank (one failed the same way) in the join is noted,
            # not a Terminated that replaced this failure's line and exit code; the import's own error is the lesser
            # news.
            failure_path.begin()
            with suppress(UserError):
                startup.join_background_imports()
            raise
        startup.join_background_imports()
    except UserError as exc:
        return report_failure(rank, str(exc), exc.exit_code)
    except (KeyboardInterrupt, Terminated) as exc:  # before the Trainer's loop (Trainer.failure_line words those after)
        error = interrupted_early(exc)
        return report_failure(rank, str(error), error.exit_code)
    except (RuntimeError, ConnectionError, EOFError) as exc:
        # A dead DataLoader worker's error that torch's SIGCHLD handler raised in the moment before Trainer.fit's
        # cleanup took the handler back: the step and the checkpoint are not known here.
        if (reason := collectives.lost_data_worker(exc)) is None:
            raise
        restart = restart_advice(None, known=False)
        then = (f"{restart} (with the same --num-workers)" if restart else
                "then rerun the command with a lower --num-workers to resume from the run's last checkpoint (see its "
                "checkpoints folder)")
        return report_failure(
            rank, f"a DataLoader worker of this process died ({reason}), {collectives.LOST_WORKER_REMEDY}; {then}", 1)
    return 0


def report_failure(rank: str, message: str, code: int) -> int:
    """Write a failed run's one error line; returns its exit code.

    Called inside the `except` clause, while the exception still holds the failed loop's frames: leaving the clause
    frees them, and the DataLoader iterator among them joins its worker processes (a second or so). torchrun
    SIGTERMs every rank the moment one fails, so a surviving rank with --num-workers died in those joins without
    having said why.
    """
    failure_path.begin()  # a start-up failure's first sight of it; and the line's joins after it end in order too
    rank_line(rank, "error", message)
    return code


if __name__ == "__main__":
    # Refused rather than trained: run as a script, this module imports torch before any stop signal's handler is set
    # (a Ctrl-C in those seconds would be a traceback, dist_mnist/__main__.py says why its order matters), and it
    # would load twice, as __main__ and as dist_mnist.train, each with classes of its own. It used to exit 0 having
    # trained nothing, which a job script takes for success.
    rank_line(os.environ.get("RANK", "0"), "error", "dist_mnist.train is not an entry point: run "
              "`python -m dist_mnist [flags]` (or `torchrun --nproc_per_node=N -m dist_mnist [flags]`)")
    raise SystemExit(2)
