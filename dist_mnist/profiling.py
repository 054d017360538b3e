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

from dist_mnist.comm import CommStep
from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext
from dist_mnist.metrics import PHASES

# A rank is a straggler when its own work per step (the step less the time it waited for the gradient
# all-reduce after its backward compute: a slow rank waits least, the others wait for it) is this much above the
# median rank's, and the excess, which every other rank spends waiting, is a noticeable share of a step (so
# sub-millisecond jitter on fast steps is no straggler).
STRAGGLER_RATIO = 1.25
STRAGGLER_MIN_STEP_SHARE = 0.05
# The phases a rank's own work splits into: backward compute is the backward phase less the exposed all-reduce.
OWN_PHASES = ("data", "to_device", "forward", "backward_compute", "optimizer")
# The diagnosis calls a run bound by waiting for data, host-to-device copies or communication when that share of
# a step (averaged over ranks) is at least this; otherwise it is compute-bound.
BOUND_SHARE = 0.25


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


def comm_stats(timed: list[dict[str, float]], comm: list[CommStep] | None) -> dict[str, Any]:
    """Per-rank all-reduce figures (None in a world of one) and the exposed comm per step, capped by backward."""
    if not comm:
        return {"comm_exposed_share": None, "allreduce_time_per_step_s": None,
                "allreduce_exposed_per_step_s": None, "allreduce_overlapped_per_step_s": None,
                "allreduce_bytes_per_step": None, "allreduce_buckets": None, "allreduce_bandwidth_bytes_per_s": None}
    exposed = [min(c.exposed_s, s["backward"]) for c, s in zip(comm, timed)]
    busy = sum(c.seconds for c in comm)
    nbytes = sum(c.nbytes for c in comm)
    n = len(comm)
    return {
        "comm_exposed_share": sum(exposed) / (sum(sum(s.values()) for s in timed) or 1e-12),
        "allreduce_time_per_step_s": busy / n,
        "allreduce_exposed_per_step_s": sum(exposed) / n,
        "allreduce_overlapped_per_step_s": (busy - sum(exposed)) / n,
        "allreduce_bytes_per_step": round(nbytes / n),
        "allreduce_buckets": max(c.buckets for c in comm),
        "allreduce_bandwidth_bytes_per_s": nbytes / busy if busy else None,
    }


def rank_stats(rank: int, steps: list[dict[str, float]], samples_per_step: int, measured_step_s: list[float],
               peak_rss_bytes: int, cuda_peak_bytes: int | None, params_digest: str,
               comm: list[CommStep] | None = None) -> dict[str, Any]:
    """This rank's figures for summary.json. The first steps (warm-up, lazy init) are left out.

    `comm` holds one entry per step of `steps` (the gradient all-reduce of each optimizer step), or None.
    """
    skip = min(len(steps) // 5, 5)
    timed = steps[skip:] or steps
    timed_comm = (comm[skip:] or comm) if comm else None
    step_times = [sum(s.values()) for s in timed]
    total = sum(step_times) or 1e-12
    shares = {f"{phase}_share": sum(s[phase] for s in timed) / total for phase in PHASES}
    comm_figures = comm_stats(timed, timed_comm)
    exposed = ([min(c.exposed_s, s["backward"]) for c, s in zip(timed_comm, timed)] if timed_comm
               else [0.0] * len(timed))
    backward_compute_share = shares["backward_share"] - (comm_figures["comm_exposed_share"] or 0.0)
    mean_step = total / len(timed) if timed else 0.0
    phase_time = {phase: shares[f"{phase}_share"] * mean_step for phase in OWN_PHASES if phase != "backward_compute"}
    phase_time["backward_compute"] = backward_compute_share * mean_step
    wall = measured_step_s[min(len(measured_step_s) // 5, 5):] or measured_step_s
    measured = statistics.fmean(wall) if wall else 0.0
    return {
        "rank": rank,
        "steps": len(steps),
        "step_time_p50_s": percentile(step_times, 0.5) if step_times else 0.0,
        "step_time_p90_s": percentile(step_times, 0.9) if step_times else 0.0,
        "samples_per_sec": samples_per_step * len(timed) / total,
        **shares,
        # backward_share split in two: backward compute, and the all-reduce the step waited for after it.
        "backward_compute_share": backward_compute_share,
        **comm_figures,
        # Mean seconds per step of each part of the rank's own work; where a straggler's excess lies.
        "phase_time_per_step_s": {phase: phase_time[phase] for phase in OWN_PHASES},
        # Own work per step: what a slow rank makes the others wait for in the all-reduce.
        "own_time_p50_s": percentile([t - e for t, e in zip(step_times, exposed)], 0.5) if timed else 0.0,
        # Wall time between step starts (eval and checkpoints left out), and the share of it the phases explain.
        "measured_step_time_s": measured,
        "explained_fraction": statistics.fmean(step_times) / measured if measured and step_times else 0.0,
        "peak_rss_bytes": peak_rss_bytes,
        "cuda_peak_allocated_bytes": cuda_peak_bytes,
        "params_digest": params_digest,
    }


def flag_stragglers(ranks: list[dict[str, Any]]) -> None:
    """Set `straggler`, `straggler_phase` (the part of its own work where its excess lies) and
    `straggler_cost_share` (the share of the median step every other rank spends waiting for it) on each rank."""
    median_own = statistics.median(r["own_time_p50_s"] for r in ranks)
    median_step = statistics.median(r["step_time_p50_s"] for r in ranks)
    for r in ranks:
        excess = r["own_time_p50_s"] - median_own
        r["straggler"] = (len(ranks) > 1 and r["own_time_p50_s"] > STRAGGLER_RATIO * median_own
                          and excess > STRAGGLER_MIN_STEP_SHARE * median_step)
        r["straggler_phase"] = None
        r["straggler_cost_share"] = excess / median_step if r["straggler"] and median_step else None
        if r["straggler"]:
            def phase_excess(phase: str, rank: dict[str, Any] = r) -> float:
                return rank["phase_time_per_step_s"][phase] - statistics.median(
                    other["phase_time_per_step_s"][phase] for other in ranks)
            r["straggler_phase"] = max(OWN_PHASES, key=phase_excess)


PHASE_WORDS = {"data": "data loading", "to_device": "host-to-device copies", "forward": "forward compute",
               "backward_compute": "backward compute", "optimizer": "the optimizer step"}


def diagnose(ranks: list[dict[str, Any]]) -> str:
    """One sentence a person can act on, from the summary's figures."""
    stragglers = [r for r in ranks if r["straggler"]]
    if stragglers:
        r = max(stragglers, key=lambda rank: rank["straggler_cost_share"])
        return (f"straggler: rank {r['rank']} is slow in {PHASE_WORDS[r['straggler_phase']]}, and every other rank "
                f"waits for it in the gradient all-reduce, {r['straggler_cost_share']:.0%} of its step; find out "
                f"why rank {r['rank']}'s {PHASE_WORDS[r['straggler_phase']]} is slower (its host, its data, its "
                "device)")

    def mean(key: str) -> float:
        return statistics.fmean(r[key] or 0.0 for r in ranks)

    bounds = {"input": mean("data_share"), "host-to-device": mean("to_device_share"),
              "communication": mean("comm_exposed_share")}
    kind, share = max(bounds.items(), key=lambda item: item[1])
    if share < BOUND_SHARE:
        compute = mean("forward_share") + mean("backward_compute_share") + mean("optimizer_share")
        return (f"compute-bound: forward, backward and optimizer compute take {compute:.0%} of a step; mixed "
                "precision, a larger batch per device or faster devices are what make it faster")
    if kind == "input":
        return (f"input-bound: the ranks wait for data {share:.0%} of each step; load batches in parallel "
                "(--num-workers), or make the data source faster")
    if kind == "host-to-device":
        return (f"host-to-device-bound: copying batches to the device takes {share:.0%} of each step; keep the "
                "dataset on the device (--data-on-device on)")
    mb = statistics.fmean(r["allreduce_bytes_per_step"] for r in ranks) / 1e6
    return (f"communication-bound: {share:.0%} of each step waits for the gradient all-reduce ({mb:.1f} MB per "
            "step); send fewer bytes (--ddp-comm-hook bf16 or powersgd), all-reduce less often (--grad-accum-steps) "
            "or raise --batch-size")


def build_summary(ranks: list[dict[str, Any]], global_samples_per_sec: float, epoch_time_s: float | None,
                  flops: float, peak_flops_per_process: float, peak_source: str) -> dict[str, Any]:
    flag_stragglers(ranks)
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
        "diagnosis": diagnose(ranks),
    }


TABLE_SHARES = (("data", "data"), ("to_device", "to_device"), ("forward", "forward"),
                ("backward_compute", "bwd comp"), ("comm_exposed", "comm wait"), ("optimizer", "optimizer"))


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table for the terminal (also used by `python -m dist_mnist.report`).

    The six share columns add up to 100%: backward is split into its compute and the all-reduce it waited for.
    """
    head = (f"{'rank':>4} {'p50 ms':>8} {'p90 ms':>8} {'samples/s':>10} " +
            " ".join(f"{title:>9}" for _, title in TABLE_SHARES) +
            f" {'comm ms':>8} {'overlap':>7} {'MB/step':>8} {'MB/s':>7}"
            f" {'explained':>9} {'peak RSS':>9} {'straggler':>9}")
    lines = [head]
    for r in summary["ranks"]:
        # Summaries written before the all-reduce was measured lack the comm fields: shown as "-".
        shares = {"backward_compute": r.get("backward_compute_share", r["backward_share"]),
                  "comm_exposed": r.get("comm_exposed_share") or 0.0,
                  **{p: r[f"{p}_share"] for p in ("data", "to_device", "forward", "optimizer")}}
        comm_s = r.get("allreduce_time_per_step_s")
        if comm_s is None:
            comm = f" {'-':>8} {'-':>7} {'-':>8} {'-':>7}"
        else:
            overlap = r["allreduce_overlapped_per_step_s"] / comm_s if comm_s else 0.0
            bandwidth = r["allreduce_bandwidth_bytes_per_s"] or 0.0
            comm = (f" {comm_s * 1e3:>8.2f} {overlap:>7.0%} {r['allreduce_bytes_per_step'] / 1e6:>8.2f}"
                    f" {bandwidth / 1e6:>7.0f}")
        straggler = (r.get("straggler_phase") or "YES") if r["straggler"] else "no"
        lines.append(f"{r['rank']:>4} {r['step_time_p50_s'] * 1e3:>8.2f} {r['step_time_p90_s'] * 1e3:>8.2f} "
                     f"{r['samples_per_sec']:>10.0f} " + " ".join(f"{shares[p]:>9.1%}" for p, _ in TABLE_SHARES) +
                     comm + f" {r['explained_fraction']:>9.1%} {r['peak_rss_bytes'] / 2**20:>7.0f}MB"
                     f" {straggler:>9}")
    mfu = f"{summary['mfu']:.1%}" if summary["mfu"] is not None else "n/a"
    epoch = f"{summary['epoch_time_s']:.1f} s" if summary["epoch_time_s"] else "n/a"
    lines.append(f"global: {summary['samples_per_sec']:.0f} samples/s, epoch {epoch}, "
                 f"{summary['flops_per_sample'] / 1e6:.1f} MFLOP/sample, {summary['achieved_tflops']:.3f} TFLOP/s "
                 f"achieved, MFU {mfu} of {summary['peak_tflops_per_process']:.3f} TFLOP/s per process "
                 f"({summary['peak_source']}); parameters identical on all ranks: "
                 f"{'yes' if summary['ranks_in_sync'] else 'NO'}")
    if summary.get("diagnosis"):
        lines.append(f"diagnosis: {summary['diagnosis']}")
    return "\n".join(lines)
