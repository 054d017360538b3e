"""Profiling: torch.profiler traces per rank, FLOP counting, matmul peak, and the end-of-run performance summary."""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler
from torch.utils.flop_counter import FlopCounterMode

from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext
from dist_mnist.metrics import PHASES

# A rank is a straggler when its own work per step (everything but backward, where the gradient all-reduce
# makes fast ranks wait for slow ones) is this much above the median rank's, and the excess, which every other
# rank spends waiting, is a noticeable share of a step (so sub-millisecond jitter on fast steps is no straggler).
STRAGGLER_RATIO = 1.25
STRAGGLER_MIN_STEP_SHARE = 0.05


class _NoProfiler(nullcontext):
    def __enter__(self) -> _NoProfiler:
        return self

    def step(self) -> None:
        pass


def make_profiler(cfg: TrainConfig, ctx: DistContext, run_dir: Path, steps_left: int) -> profile | _NoProfiler:
    """A torch.profiler writing one gzipped trace per rank and window into the run folder, or a no-op.

    Call its `step()` after every training step; a window's trace is written when its last active step ends
    (or when training ends inside a window).
    """
    if not cfg.profile:
        return _NoProfiler()
    if ctx.is_main and steps_left <= cfg.profile_wait + cfg.profile_warmup:
        # A warning, not an error: a resumed run may legitimately have only a few steps left.
        print(f"warning: --profile records nothing: {steps_left} steps are left, and the first window only starts "
              f"recording after --profile-wait {cfg.profile_wait} + --profile-warmup {cfg.profile_warmup} steps",
              file=sys.stderr, flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=cfg.profile_wait, warmup=cfg.profile_warmup, active=cfg.profile_active,
                          repeat=cfg.profile_repeat),
        on_trace_ready=tensorboard_trace_handler(str(run_dir), worker_name=f"rank{ctx.rank}", use_gzip=True),
        record_shapes=cfg.profile_shapes,
        profile_memory=cfg.profile_memory,
        with_stack=cfg.profile_stack,
    )


def flops_per_sample(model: nn.Module, device: torch.device) -> float:
    """Forward + backward FLOPs of one training sample, counted by torch.utils.flop_counter."""
    batch = 4
    x = torch.zeros(batch, 1, 28, 28, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of large square matmuls in `dtype` on this process's threads: the yardstick for MFU."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
            iters += 1
        sync()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def parameter_digest(model: nn.Module) -> str:
    """A hash of all parameter bytes: equal on every rank exactly when DDP kept the replicas in sync."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def rank_stats(rank: int, steps: list[dict[str, float]], samples_per_step: int, measured_step_s: list[float],
               peak_rss_bytes: int, cuda_peak_bytes: int | None, params_digest: str) -> dict[str, Any]:
    """This rank's figures for summary.json. The first steps (warm-up, lazy init) are left out."""
    timed = steps[min(len(steps) // 5, 5):] or steps
    step_times = [sum(s.values()) for s in timed]
    total = sum(step_times) or 1e-12
    shares = {f"{phase}_share": sum(s[phase] for s in timed) / total for phase in PHASES}
    wall = measured_step_s[min(len(measured_step_s) // 5, 5):] or measured_step_s
    measured = statistics.fmean(wall) if wall else 0.0
    return {
        "rank": rank,
        "steps": len(steps),
        "step_time_p50_s": percentile(step_times, 0.5) if step_times else 0.0,
        "step_time_p90_s": percentile(step_times, 0.9) if step_times else 0.0,
        "samples_per_sec": samples_per_step * len(timed) / total,
        **shares,
        # Own work per step: what a slow rank makes the others wait for inside backward's all-reduce.
        "own_time_p50_s": percentile([t - s["backward"] for t, s in zip(step_times, timed)], 0.5) if timed else 0.0,
        # Wall time between step starts (eval and checkpoints left out), and the share of it the phases explain.
        "measured_step_time_s": measured,
        "explained_fraction": statistics.fmean(step_times) / measured if measured and step_times else 0.0,
        "peak_rss_bytes": peak_rss_bytes,
        "cuda_peak_allocated_bytes": cuda_peak_bytes,
        "params_digest": params_digest,
    }


def build_summary(ranks: list[dict[str, Any]], global_samples_per_sec: float, epoch_time_s: float | None,
                  flops: float, peak_flops_per_process: float, peak_source: str) -> dict[str, Any]:
    median_own = statistics.median(r["own_time_p50_s"] for r in ranks)
    median_step = statistics.median(r["step_time_p50_s"] for r in ranks)
    for r in ranks:
        excess = r["own_time_p50_s"] - median_own
        r["straggler"] = (len(ranks) > 1 and r["own_time_p50_s"] > STRAGGLER_RATIO * median_own
                          and excess > STRAGGLER_MIN_STEP_SHARE * median_step)
    achieved = global_samples_per_sec * flops
    return {
        "world_size": len(ranks),
        "ranks_in_sync": len({r["params_digest"] for r in ranks}) == 1,
        "samples_per_sec": global_samples_per_sec,
        "epoch_time_s": epoch_time_s,
        "flops_per_sample": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops_per_process": peak_flops_per_process / 1e12,
        "peak_source": peak_source,
        "mfu": achieved / (peak_flops_per_process * len(ranks)) if peak_flops_per_process else None,
        "ranks": ranks,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table for the terminal (also used by `python -m dist_mnist.report`)."""
    head = (f"{'rank':>4} {'p50 ms':>8} {'p90 ms':>8} {'samples/s':>10} " +
            " ".join(f"{p[:9]:>9}" for p in PHASES) + f" {'explained':>9} {'peak RSS':>9} {'straggler':>9}")
    lines = [head]
    for r in summary["ranks"]:
        lines.append(f"{r['rank']:>4} {r['step_time_p50_s'] * 1e3:>8.2f} {r['step_time_p90_s'] * 1e3:>8.2f} "
                     f"{r['samples_per_sec']:>10.0f} " + " ".join(f"{r[p + '_share']:>9.1%}" for p in PHASES) +
                     f" {r['explained_fraction']:>9.1%} {r['peak_rss_bytes'] / 2**20:>7.0f}MB"
                     f" {'YES' if r['straggler'] else 'no':>9}")
    mfu = f"{summary['mfu']:.1%}" if summary["mfu"] is not None else "n/a"
    epoch = f"{summary['epoch_time_s']:.1f} s" if summary["epoch_time_s"] else "n/a"
    lines.append(f"global: {summary['samples_per_sec']:.0f} samples/s, epoch {epoch}, "
                 f"{summary['flops_per_sample'] / 1e6:.1f} MFLOP/sample, {summary['achieved_tflops']:.3f} TFLOP/s "
                 f"achieved, MFU {mfu} of {summary['peak_tflops_per_process']:.3f} TFLOP/s per process "
                 f"({summary['peak_source']}); parameters identical on all ranks: "
                 f"{'yes' if summary['ranks_in_sync'] else 'NO'}")
    return "\n".join(lines)
