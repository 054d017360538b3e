"""Benchmark: fast vs classic throughput, time to 99% accuracy, DDP overhead, scaling and MFU, side by side in one run.

    python -m dist_mnist.bench --data-dir ../shared/data            # everything, writes docs/benchmarks.md
    torchrun --nproc_per_node=2 -m dist_mnist.bench --only throughput   # throughput of DDP across the ranks

Absolute numbers on shared machines are noise; the ratios, measured back to back in one run, are what hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms

from dist_mnist.argtypes import positive_seconds, whole_number_at_least, whole_numbers
from dist_mnist.config import COMM_HOOKS, RawDescriptionDefaultsHelpFormatter, TrainConfig
from dist_mnist.console import kept_stdout
from dist_mnist.data import (
    MNIST_MEAN,
    MNIST_STD,
    ResumableBatchSampler,
    build_pipeline,
    load_splits,
    missing_mnist_error,
    missing_mnist_files,
    mnist_raw_dir,
)
from dist_mnist.distributed import DistContext, distributed_session
from dist_mnist.errors import UserError
from dist_mnist.gpucheck import GraphsRow
from dist_mnist.graphs import GraphedStep
from dist_mnist.metrics import StepTimer, resolve_phase_timers
from dist_mnist.profiler_bench import (
    measure_phase_timers,
    measure_profiler_overhead,
    render_phase_timers,
    render_profiler_overhead,
    render_verdicts,
)
from dist_mnist.profiling import flops_per_sample, measure_matmul_peak
from dist_mnist.recipes import RECIPES
from dist_mnist.runfiles import METRICS_FILE, SUMMARY_FILE
from dist_mnist.runjson import json_text
from dist_mnist.train import SpeedSettings, build_train_parts, dtype_name, resolve_speed_settings, train_step

# The folder holding this package: a checkout, or site-packages for an installed copy.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "time-to-accuracy", "scaling", "profiler", "graphs")
# Sections that start training jobs of their own: under torchrun they would nest torchruns (the profiler section's
# whole runs too, its in-process parts run anywhere).
LAUNCHING_SECTIONS = ("time-to-accuracy", "scaling")
StepFn = Callable[[torch.Tensor, torch.Tensor, StepTimer], torch.Tensor]
CLOCK_EVERY = TrainConfig.log_every  # steps between the synchronising clock checks of a timed loop


def default_output(package_root: Path = PACKAGE_ROOT) -> str:
    """--output's default: the checkout's record of results, docs/benchmarks.md; an installed copy has none beside it
    (site-packages is no place to write), so benchmarks.md in the current directory."""
    checkout_record = package_root / "docs" / "benchmarks.md"
    return str(checkout_record) if checkout_record.is_file() else "benchmarks.md"


def from_checkout(package_root: Path = PACKAGE_ROOT) -> bool:
    """Whether the package runs from a checkout (with its launcher), not from an installed copy."""
    return (package_root / "launch" / "train.py").is_file()


def train_command(package_root: Path = PACKAGE_ROOT) -> str:
    """The training command as the user has it: the checkout's launcher, else the installed package's entry point."""
    return "python launch/train.py" if from_checkout(package_root) else "python -m dist_mnist"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    samples_per_sec: float  # global
    host_s_per_step: float  # the host's own time per step: wall time less the waits for the device


def _timed_steps(step: StepFn, batches: Any, ctx: DistContext, seconds: float, warmup: int = 5) -> LoopTiming:
    """Global training samples/s of `step` (train_step or a GraphedStep) over `seconds` after `warmup` steps, and
    the host's time per step; batches cycle forever. The phase timers run as in a run with the default flags
    (sampled on CUDA), and the clock is checked every `CLOCK_EVERY` steps, as often as a run's progress report
    (--log-every) syncs. A host time per step below the device's means the loop keeps the GPU busy."""
    timer = StepTimer(ctx.device, resolve_phase_timers(TrainConfig.phase_timers, ctx.device),
                      TrainConfig.phase_timer_every)
    samples, steps, start, waited = 0, 0, 0.0, 0.0

    def wait() -> None:
        nonlocal waited
        begin = time.perf_counter()
        _sync(ctx.device)
        waited += time.perf_counter() - begin

    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            _sync(ctx.device)
            start = time.perf_counter()
        timer.begin_step()
        step(images, labels, timer)
        timer.end_step()
        if i >= warmup:
            samples += len(labels)
            steps += 1
        # Every rank must stop at the same step, so rank 0's clock decides.
        if i >= warmup and i % CLOCK_EVERY == 0:
            wait()
            timer.drain()
            if ctx.broadcast_object(time.perf_counter() - start >= seconds):
                break
    wait()
    elapsed = time.perf_counter() - start
    return LoopTiming(samples * ctx.world_size / elapsed, (elapsed - waited) / max(steps, 1))


T = TypeVar("T")


def _forever(loader: Iterable[T], sampler: DistributedSampler | ResumableBatchSampler) -> Iterator[T]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class _ClassicBatches:
    """The classic pytorch/examples pipeline: PIL images, per-sample ToTensor + Normalize, default collate."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, batch_size: int) -> None:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
        dataset = datasets.MNIST(cfg.data_dir, train=True, download=False, transform=transform)
        self.sampler: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                                                   seed=cfg.seed)
        cuda = ctx.device.type == "cuda"
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=1 if cuda else 0, pin_memory=cuda)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Undo ToTensor+Normalize into the uint8 form train_step expects, exactly, so both configurations
        # run the same step code; the classic per-sample work has been paid in full by then.
        for images, labels in _forever(self.loader, self.sampler):
            raw = (images.squeeze(1) * MNIST_STD + MNIST_MEAN).mul_(255).round_().to(torch.uint8)
            yield raw, labels


def measure_throughput(cfg: TrainConfig, ctx: DistContext, seconds: float) -> dict[str, Any]:
    """Default fast configuration vs the classic one (fp32, eager, batch 64, per-sample transforms)."""
    fast = resolve_speed_settings(cfg, ctx.device)
    classic = SpeedSettings(amp_dtype=None, channels_last=False, data_on_device=False)
    train, test = load_splits(cfg, ctx)
    results: dict[str, Any] = {}
    for name, settings, batch_size in (("classic", classic, 64), ("fast", fast, cfg.batch_size)):
        run_cfg = dataclasses.replace(cfg, batch_size=batch_size)
        parts = build_train_parts(run_cfg, ctx, settings, total_steps=10**6)
        if name == "classic":
            batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = _ClassicBatches(run_cfg, ctx, batch_size)
        else:
            pipeline = build_pipeline(run_cfg, ctx, train, test, settings.data_on_device)
            batches = _forever(pipeline.train_loader, pipeline.train_batches)
        results[name] = {"samples_per_sec": _timed_steps(partial(train_step, parts), iter(batches), ctx,
                                                         seconds).samples_per_sec,
                         "batch_size": batch_size, **settings.describe()}
    results["speedup"] = results["fast"]["samples_per_sec"] / results["classic"]["samples_per_sec"]
    dtype = fast.amp_dtype or torch.float32
    flops = flops_per_sample(parts.module)
    peak = measure_matmul_peak(ctx.device, dtype)
    results["mfu"] = {"flops_per_sample": flops, "peak_tflops_per_process": peak / 1e12,
                      "dtype": dtype_name(dtype),
                      "mfu": results["fast"]["samples_per_sec"] * flops / (peak * ctx.world_size)}
    return results


def _timed_replays(step: GraphedStep, device: torch.device, seconds: float, warmup: int = 10) -> float:
    """Samples/s of the captured step alone: replays of one fixed batch, no loop, copies or scheduler around it."""
    for _ in range(warmup):
        step.replay()
    _sync(device)
    start, replays = time.perf_counter(), 0
    # One round at least: a process descheduled longer than `seconds` before the first check replayed nothing and
    # reported 0 samples/s (CI's test, 0.01 s on 2 busy cores).
    while replays == 0 or time.perf_counter() - start < seconds:
        for _ in range(50):
            step.replay()
        replays += 50
        _sync(device)
    return replays * len(step.labels) / (time.perf_counter() - start)


def graphs_skipped(ctx: DistContext) -> str | None:
    """Why the graphs section cannot run here, or None (tests/test_gpucheck.py runs it on CPU, replayed eagerly)."""
    if ctx.device.type != "cuda" or ctx.world_size > 1:
        return "CUDA graphs are measured on one CUDA process only"
    return None


def measure_graphs(cfg: TrainConfig, ctx: DistContext, seconds: float, batch_sizes: list[int]) -> dict[str, Any]:
    """Per batch size, side by side: the eager loop, the loop with the step captured in a CUDA graph (both with
    the on-device batches and the step timer of a run), and the bare captured step replayed on a fixed batch."""
    if skipped := graphs_skipped(ctx):
        return {"skipped": skipped}
    settings = resolve_speed_settings(cfg, ctx.device)
    train, test = load_splits(cfg, ctx)
    results: dict[str, Any] = {"amp": dtype_name(settings.amp_dtype)}
    for batch_size in batch_sizes:
        run_cfg = dataclasses.replace(cfg, batch_size=batch_size)
        pipeline = build_pipeline(run_cfg, ctx, train, test, settings.data_on_device)
        eager = build_train_parts(run_cfg, ctx, settings, total_steps=10**6)
        graphed = GraphedStep(build_train_parts(run_cfg, ctx, settings, total_steps=10**6), batch_size)
        loops = {name: _timed_steps(step, iter(_forever(pipeline.train_loader, pipeline.train_batches)), ctx,
                                    seconds)
                 for name, step in (("eager_loop", partial(train_step, eager)), ("graphed_loop", graphed))}
        row = GraphsRow(eager_loop=loops["eager_loop"].samples_per_sec,
                        graphed_loop=loops["graphed_loop"].samples_per_sec,
                        bare_captured_step=_timed_replays(graphed, ctx.device, seconds),
                        graphed_loop_host_us=loops["graphed_loop"].host_s_per_step * 1e6)
        results[str(batch_size)] = dataclasses.asdict(row)
    return results


def _launch(nproc: int, flags: list[str], threads: int, out_dir: Path, run_name: str,
            timeout: float = 900) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Run `python -m dist_mnist` (under torchrun when nproc > 1); returns summary.json, metrics.jsonl, launch time."""
    # A checkout's package first on the path, as launch/train.py puts it: `-m` would otherwise import an installed
    # copy before it (a dist_mnist folder in the current directory, which `-m` puts first, still wins). Not
    # site-packages, where an installed copy is found anyway: PYTHONPATH's entries come before the standard library's.
    checkout = [str(PACKAGE_ROOT)] if from_checkout() else []
    python_path = os.pathsep.join(filter(None, [*checkout, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path,
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
              if nproc > 1 else [sys.executable])
    cmd = [*prefix, "-m", "dist_mnist", *flags, "--threads", str(threads), "--output-dir", str(out_dir),
           "--run-name", run_name, "--no-tensorboard", "--checkpoint-every", "0"]
    launched = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        # The run's own error line says why (missing data, a bad flag); a crash without one, its last line.
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        why = errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else "no output")
        raise UserError(f"the bench's training run {run_name} failed (exit {proc.returncode}): {why}")
    run_dir = out_dir / run_name
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    metrics = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return summary, metrics, launched


def measure_time_to_accuracy(data_flags: list[str], nproc: int, threads: int, out_dir: Path,
                             target: float = 0.99) -> dict[str, Any]:
    """The default recipe with its own evaluation cadence (evaluations count in the time): wall time to `target`
    from the first step and from launch; then the same recipe trained for one epoch, for its accuracy."""
    summary, metrics, launched = _launch(nproc, data_flags, threads, out_dir, "tta")
    hit = next((m for m in metrics if m["test_accuracy"] >= target), None)
    startup = summary["first_step_unix"] - launched
    _, one_epoch, _ = _launch(nproc, [*data_flags, "--epochs", "1"], threads, out_dir, "one-epoch")
    return {
        "nproc": nproc, "threads": threads, "target": target,
        "final_accuracy": metrics[-1]["test_accuracy"],
        "one_epoch_accuracy": one_epoch[-1]["test_accuracy"],
        "reached_at_step": hit["step"] if hit else None,
        "seconds_from_first_step": hit["elapsed_s"] if hit else None,
        "seconds_total": startup + hit["elapsed_s"] if hit else None,
        "startup_s": startup,
    }


def measure_scaling(data_flags: list[str], process_counts: list[int], steps: int, per_process_batch: int,
                    out_dir: Path) -> dict[str, Any]:
    """Throughput for N processes of 1 thread each (batch fixed per process, the default comm hook); for the
    largest N each DDP comm hook, and 1 process with N threads at the same global batch: what DDP costs against
    intra-op threads on one host, with the best hook."""
    # PowerSGD compresses only after the LR warm-up: a short warm-up lets it compress within `steps`.
    flags = [*data_flags, "--max-steps", str(steps), "--warmup-frac", "0.01"]
    runs: dict[str, Any] = {}
    base: tuple[int, float] | None = None  # the first count and its per-process rate, which efficiency is against
    for nproc in process_counts:
        summary, _, _ = _launch(nproc, flags, 1, out_dir, f"scale{nproc}")
        sps = summary["samples_per_sec"]
        runs[f"{nproc}x1"] = {"samples_per_sec": sps, "backward_share": summary["ranks"][0]["backward_share"],
                              "comm_exposed_share": summary["ranks"][0]["comm_exposed_share"]}
        if base is None:
            base = nproc, sps / nproc  # its own efficiency would be 100% by definition: none is given
        else:
            runs[f"{nproc}x1"].update(efficiency=sps / (base[1] * nproc), efficiency_against=base[0])
    most = max(process_counts)
    if most > 1:
        hooks = {}
        for hook in COMM_HOOKS:
            summary, _, _ = _launch(most, [*flags, "--ddp-comm-hook", hook], 1, out_dir, f"hook-{hook}")
            hooks[hook] = {"samples_per_sec": summary["samples_per_sec"],
                           "bytes_per_step": summary["ranks"][0]["allreduce_bytes_per_step"]}
        for measured in hooks.values():
            measured["ratio"] = measured["samples_per_sec"] / hooks["none"]["samples_per_sec"]
        runs["hooks"] = hooks
        summary, _, _ = _launch(1, [*flags, "--batch-size", str(per_process_batch * most)], most, out_dir,
                                f"single{most}")
        runs[f"1x{most}"] = {"samples_per_sec": summary["samples_per_sec"]}
        best = max(hooks, key=lambda name: hooks[name]["samples_per_sec"])
        runs["best_hook"] = best
        runs["ddp_ratio"] = hooks[best]["samples_per_sec"] / runs[f"1x{most}"]["samples_per_sec"]
    return runs


def measure_profiler_cost(data_flags: list[str], steps: int, batch_sizes: list[int], out_dir: Path,
                          pairs: int = 2) -> dict[int, dict[str, float]]:
    """Whole runs, --profile vs no profiling, per batch size, mean over `pairs` alternating pairs of runs: the
    median step (the few steps of the profiling window hardly move it), the mean step, window included (trace
    writing is left out of step times, as every pause is), and the wall time from the first step to the last
    evaluation, everything included. `steps` 0: each run is the recipe's whole schedule (on a GPU a few hundred
    steps take a fraction of a second, which the window's fixed costs would dominate)."""
    results = {}
    for batch in batch_sizes:
        flags = [*data_flags, *(["--max-steps", str(steps)] if steps else []), "--batch-size", str(batch)]
        ratios: dict[str, list[float]] = {"median_step_ratio": [], "mean_throughput_ratio": [], "wall_ratio": []}
        for pair in range(pairs):  # alternating, so drift in the machine's load hits both alike
            plain, plain_metrics, _ = _launch(1, flags, 0, out_dir, f"noprof{batch}-{pair}")
            profiled, profiled_metrics, _ = _launch(1, [*flags, "--profile"], 0, out_dir, f"prof{batch}-{pair}")
            ratios["median_step_ratio"].append(plain["ranks"][0]["step_time_p50_s"] /
                                               profiled["ranks"][0]["step_time_p50_s"])
            ratios["mean_throughput_ratio"].append(profiled["samples_per_sec"] / plain["samples_per_sec"])
            ratios["wall_ratio"].append(profiled_metrics[-1]["elapsed_s"] / plain_metrics[-1]["elapsed_s"])
        results[batch] = {key: sum(values) / pairs for key, values in ratios.items()}
        results[batch]["steps"] = plain_metrics[-1]["step"]
    return results


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores ({_cpu_model()})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def render_markdown(results: dict[str, Any]) -> str:
    # The blank lines after the heading and the command line are markdown's paragraph breaks; the table's empty
    # strings below are rows a result does not have.
    head = [f"### {results['machine']} — {results['date']}", "", f"torch {results['torch']}, command: "
            f"`{results['command']}`", ""]
    lines = ["| measure | value |", "|---|---|"]
    if "skipped" in results:
        lines.append(f"| {results['skipped']} | skipped: they start training jobs of their own, which cannot run "
                     "inside torchrun's (run `python -m dist_mnist.bench` for them) |")
    tp = results.get("throughput")
    if tp:
        lines += [
            f"| classic config (fp32, eager, batch 64, per-sample transforms) | "
            f"{tp['classic']['samples_per_sec']:,.0f} samples/s |",
            f"| default config ({tp['fast']['amp']}, channels_last={tp['fast']['channels_last']}, batch "
            f"{tp['fast']['batch_size']}, whole-batch indexing) | {tp['fast']['samples_per_sec']:,.0f} samples/s |",
            f"| **speed-up default / classic** | **{tp['speedup']:.2f}x** |",
            f"| model FLOPs per training sample | {tp['mfu']['flops_per_sample'] / 1e6:.1f} MFLOP |",
            f"| measured {tp['mfu']['dtype']} matmul peak per process | "
            f"{tp['mfu']['peak_tflops_per_process']:.3f} TFLOP/s |",
            f"| **MFU of the default config** | **{tp['mfu']['mfu']:.1%}** |",
        ]
    tta = results.get("time_to_accuracy")
    if tta:
        hit = tta["seconds_from_first_step"]
        lines += [
            f"| time to {tta['target']:.1%} test accuracy, {tta['nproc']} process(es) x {tta['threads']} thread(s),"
            f" from the first step | **{hit:.1f} s** (step {tta['reached_at_step']}) |" if hit is not None else
            f"| time to {tta['target']:.1%} test accuracy | not reached (final {tta['final_accuracy']:.2%}) |",
            f"| the same including start-up | {tta['seconds_total']:.1f} s |" if hit is not None else "",
            f"| test accuracy at the end of that run / of the same recipe trained for one epoch | "
            f"{tta['final_accuracy']:.2%} / {tta['one_epoch_accuracy']:.2%} |",
            f"| start-up to first training step (launch, imports, data, model) | {tta['startup_s']:.1f} s |",
        ]
    sc = results.get("scaling")
    if sc:
        for key, run in sc.items():
            if key in ("ddp_ratio", "hooks", "best_hook"):
                continue
            against = run.get("efficiency_against", 1)  # bench.json files before 2026-11-28: against the first
            eff = (f", scaling efficiency {run['efficiency']:.0%}"
                   f"{f' (per process, against {against} processes)' if against != 1 else ''}"
                   if "efficiency" in run else "")
            lines.append(f"| {key.replace('x', ' process(es) x ', 1)} thread(s) | "
                         f"{run['samples_per_sec']:,.0f} samples/s{eff} |")
        hooks = sc.get("hooks", {})
        for name, hook in hooks.items():
            # PowerSGD compresses only after the LR warm-up: a run that ended within it sent what `none` sends.
            uncompressed = (" (not compressed: the run ended within the LR warm-up, after which PowerSGD starts; "
                            "raise --scaling-steps)" if name == "powersgd" and "none" in hooks
                            and hook["bytes_per_step"] >= 0.9 * hooks["none"]["bytes_per_step"] else "")
            lines.append(f"| --ddp-comm-hook {name}: {hook['bytes_per_step'] / 1e6:.2f} MB all-reduced per step"
                         f"{uncompressed} | {hook['samples_per_sec']:,.0f} samples/s, {hook['ratio']:.2f}x of none |")
        if "ddp_ratio" in sc:
            lines.append(f"| **DDP ratio: N ranks x 1 thread (--ddp-comm-hook {sc['best_hook']}) / 1 process x N "
                         f"threads** | **{sc['ddp_ratio']:.2f}** |")
    for batch, pr in results.get("profiler", {}).items():
        steps = f"{pr['steps']} steps" if "steps" in pr else "whole runs"  # bench.json files before 2026-11-27
        lines += [f"| batch {batch}: whole runs ({steps}), speed with --profile / without, median step (outside the "
                  f"window) | {pr['median_step_ratio']:.3f} |",
                  f"| batch {batch}: the same, mean over the whole run (the 5 profiled steps included) | "
                  f"{pr['mean_throughput_ratio']:.3f} |"]
        if "wall_ratio" in pr:
            lines.append(f"| batch {batch}: the same, wall time from the first step to the end (evaluations, trace "
                         f"writing and every other pause included), profiled / not | {pr['wall_ratio']:.3f} |")
    gr = results.get("graphs")
    if gr and "skipped" in gr:  # said, or a run asked for this section alone appends a table without a figure
        lines.append(f"| CUDA graphs section | skipped: {gr['skipped']} |")
    elif gr:
        for batch, measured in gr.items():
            if batch == "amp":
                continue
            row = GraphsRow(**measured)
            lines += [f"| batch {batch} ({gr['amp']}): eager loop / loop with the step in a CUDA graph / bare captured "
                      f"step | {row.eager_loop:,.0f} / {row.graphed_loop:,.0f} / "
                      f"{row.bare_captured_step:,.0f} samples/s |",
                      f"| **batch {batch}: graphed loop / eager loop; graphed loop / bare captured step** | "
                      f"**{row.graphed_over_eager:.2f}x; {row.graphed_loop_over_bare:.0%}** |",
                      f"| batch {batch}: the graphed loop's host time per step against the bare step's time (below "
                      f"it, the loop keeps the GPU fed) | {row.graphed_loop_host_us:,.0f} / "
                      f"{int(batch) / row.bare_captured_step * 1e6:,.0f} us |"]
    if "profiler_steps" in results:
        lines += render_profiler_overhead(results["profiler_steps"])
        lines += render_verdicts(results["profiler_steps"], results.get("profiler", {}))
    if "phase_timers" in results:
        lines += render_phase_timers(results["phase_timers"])
    return "\n".join([*head, *(line for line in lines if line)]) + "\n"


# Steps, rounds and batch sizes: 0 divided by zero after a section's measuring, and 0 --scaling-steps became
# --max-steps 0, a whole recipe run with no limit. The flags whose 0 means something take 0.
_count = whole_number_at_least(1)
_count_or_zero = whole_number_at_least(0)


def invocation(args: list[str], world_size: int | None = None) -> str:
    """The bench's command line as a shell reads it back (an empty `--output ''` kept), for the table's header; with
    the number of processes where torchrun started it."""
    command = shlex.join(["python", "-m", "dist_mnist.bench", *args])
    return command if world_size is None else f"{command} (under torchrun, {world_size} processes)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dist_mnist.bench", description=__doc__,
                                     formatter_class=RawDescriptionDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("DIST_MNIST_DATA", "./data"),
                        help="folder holding MNIST/raw/ (default: $DIST_MNIST_DATA, else ./data)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--batch-size", type=_count, default=TrainConfig.batch_size,
                        help="per-process batch of the default configuration (the classic one always uses 64)")
    parser.add_argument("--seconds", type=positive_seconds, default=8.0,
                        help="timed seconds per throughput configuration")
    parser.add_argument("--graph-batches", type=whole_numbers, default=f"16,{RECIPES['cuda'].batch_size}",
                        help="per-process batch sizes of the graphs section (CUDA only)")
    parser.add_argument("--scaling", type=whole_numbers, default="1,2",
                        help="process counts for the scaling section, comma-separated")
    parser.add_argument("--scaling-steps", type=_count, default=300,
                        help="training steps per scaling run")
    parser.add_argument("--profiler-batch-sizes", type=whole_numbers, default=f"16,{RECIPES['cuda'].batch_size}",
                        help="per-process batch sizes of the profiler section (16 and the cuda recipe's)")
    parser.add_argument("--profiler-steps", type=_count, default=20,
                        help="profiler section: steps before and after the window, per arrangement and round")
    parser.add_argument("--profiler-rounds", type=_count, default=5,
                        help="profiler section: turns each arrangement takes (they alternate, against drift)")
    parser.add_argument("--timer-steps", type=_count, default=200,
                        help="profiler section, phase timers: steps per block (the modes take turns block by block)")
    parser.add_argument("--timer-rounds", type=_count, default=4,
                        help="profiler section, phase timers: blocks per mode")
    parser.add_argument("--profiler-run-steps", type=_count_or_zero, default=300,
                        help="profiler section: training steps per whole run (0: the recipe's whole schedule)")
    parser.add_argument("--profiler-pairs", type=_count_or_zero, default=2,
                        help="profiler section: alternating pairs of whole runs with and without --profile per batch "
                             "size (0: none)")
    parser.add_argument("--output", default=default_output(),
                        help="markdown file the result table is appended to ('' to skip); the checkout's "
                             "docs/benchmarks.md when the package runs from a checkout, else benchmarks.md in the "
                             "current directory")
    parser.add_argument("--json", default="", help="also write the raw results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, target in (("--output", args.output), ("--json", args.json)):
        folder = Path(target).parent
        # Found now, not after minutes of measuring.
        if target and not (folder.is_dir() and os.access(folder, os.W_OK)):
            print(f"error: cannot write {flag} {target}: {folder} is not a writable folder", file=sys.stderr)
            return 1
        if target and Path(target).is_dir():
            print(f"error: cannot write {flag} {target}: it is a folder; name a file", file=sys.stderr)
            return 1
    # The profiled whole runs' window (the launcher's defaults) must close before they end, or the profiler records
    # nothing and "with --profile / without" compares two unprofiled runs.
    window_end = TrainConfig.profile_wait + TrainConfig.profile_warmup + TrainConfig.profile_active
    if ("profiler" in (args.only or SECTIONS) and args.profiler_pairs and
            0 < args.profiler_run_steps < window_end):
        print(f"error: --profiler-run-steps {args.profiler_run_steps} ends the profiled runs before their window "
              f"(steps {TrainConfig.profile_wait + 1}-{window_end}) closes; give at least {window_end}, or 0 for the "
              "recipe's whole schedule", file=sys.stderr)
        return 1
    launched_by_torchrun = "RANK" in os.environ
    if launched_by_torchrun and (nested := [s for s in args.only or [] if s in LAUNCHING_SECTIONS]):
        print(f"error: --only {' --only '.join(nested)} starts training jobs of its own, which cannot run inside "
              "torchrun's; run it as `python -m dist_mnist.bench`", file=sys.stderr)
        return 1
    sections = args.only or list(SECTIONS)
    profiler_batches = args.profiler_batch_sizes
    try:
        cfg = TrainConfig(data_dir=args.data_dir, no_download=True, tensorboard=False, batch_size=args.batch_size)
    except UserError as exc:  # an empty --data-dir, a --batch-size the training config refuses
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raw = mnist_raw_dir(cfg.data_dir)
    if missing := missing_mnist_files(raw):
        # Found before any measuring, with advice the bench can take: every section reads real MNIST, and it never
        # downloads (its training runs get --no-download: they are timed, a download is not).
        fetch = (f"run `{train_command()} --data-dir {shlex.quote(cfg.data_dir)} --max-steps 1` once to download "
                 "them (the bench never does)")
        print(f"error: {missing_mnist_error(raw, missing, fetch)}", file=sys.stderr)
        return 1
    try:
        world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun else None
        results: dict[str, Any] = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                   "command": invocation(argv or sys.argv[1:], world_size)}
        left_out = [s for s in sections if s in LAUNCHING_SECTIONS] + (
            ["the profiler section's whole runs"] if "profiler" in sections and args.profiler_pairs else [])
        if launched_by_torchrun and left_out:
            results["skipped"] = ", ".join(left_out)
        with distributed_session(cfg) as ctx:
            results["machine"] = machine_description(ctx.device)
            if "throughput" in sections:
                results["throughput"] = measure_throughput(cfg, ctx, args.seconds)
            if "graphs" in sections:
                results["graphs"] = measure_graphs(cfg, ctx, args.seconds,
                                                   args.graph_batches)
            if "profiler" in sections:
                # The timers first: the profiler's last arrangements leave CUPTI subscribed for the rest of the
                # process (on CUDA), which every timer's event record would then pay.
                results["phase_timers"] = measure_phase_timers(cfg, ctx, profiler_batches, args.timer_steps,
                                                               args.timer_rounds)
                results["profiler_steps"] = measure_profiler_overhead(cfg, ctx, profiler_batches, args.profiler_steps,
                                                                      args.profiler_steps, args.profiler_rounds)
        if launched_by_torchrun and int(os.environ["RANK"]) != 0:
            return 0
        data_flags = ["--data-dir", args.data_dir, "--no-download"]
        with tempfile.TemporaryDirectory(prefix="dist_mnist_bench_") as tmp:
            # Sections that start their own training jobs would nest torchruns, so they run only stand-alone.
            if not launched_by_torchrun:
                cuda = torch.cuda.is_available()
                if "time-to-accuracy" in sections:
                    results["time_to_accuracy"] = measure_time_to_accuracy(
                        data_flags, nproc=1 if cuda else 2, threads=1 if not cuda else 0, out_dir=Path(tmp))
                if "scaling" in sections:
                    counts = args.scaling
                    if cuda and max(counts) > torch.cuda.device_count():
                        counts = [n for n in counts if n <= torch.cuda.device_count()]
                    results["scaling"] = measure_scaling(data_flags, counts, args.scaling_steps, cfg.batch_size,
                                                         Path(tmp))
                if "profiler" in sections and args.profiler_pairs:
                    results["profiler"] = measure_profiler_cost(data_flags, args.profiler_run_steps, profiler_batches,
                                                                Path(tmp), args.profiler_pairs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = render_markdown(results)
    print(table, flush=True)
    try:
        if args.json:
            Path(args.json).write_text(json_text(results, indent=2))
        if args.output:
            with open(args.output, "a") as f:
                f.write("\n" + table)
    except OSError as exc:  # a full disk, or the folder gone since the start: the table above is the result
        print(f"error: cannot write {exc.filename}: {exc.strerror or exc}; the table above holds the results",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with kept_stdout(note=None):  # `... | head` ends the output, not the tool's work
        code = main()
    sys.exit(code)
