"""What --profile and the phase timers cost, step by step: `python -m dist_mnist.bench --only profiler`.

One process trains the real model on a fixed set of random batches under one arrangement after another (no profiler,
labels always on, a profiler per window, one long-lived profiler, CUPTI kept subscribed), each for the same steps
before, inside and after a profiling window, and reports the median step of each stretch.
The step is the one a run with the same flags takes: on one CUDA process the whole step replayed from a CUDA graph
(the default there), elsewhere the eager step. Every arrangement differs from the baseline in one suspect, so each
ratio rules one in or out. On CUDA a step is wall time up to a synchronize, so it includes its GPU work; on CPU it
is the process's CPU time (time.process_time), which other processes on a loaded machine do not inflate as they do
wall time. The profiler's own calls between steps (opening a window, closing it and writing the trace) are timed
apart, as the training loop leaves them out of step times.

CUPTI is per process: once a profiler stopped without tearing it down, it stays subscribed for the rest of the
process. So the arrangements run in this order, and the baseline runs again after the ones that tear CUPTI down
(`plain_again`) and last, after the one that does not (`plain_last`): what a profiler leaves behind shows there.

The phase timers are measured apart (`measure_phase_timers`): blocks of many steps with the timers off, sampled and
on every step, taking turns, each block timed as a run runs (the host queues steps and waits for the device only at
progress reports). A sample's cost is one timed step in N, which a median over a few dozen steps never sees and the
mean of a short stretch cannot tell from noise.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext, temporary_env
from dist_mnist.graphs import GraphedStep, graph_decision
from dist_mnist.metrics import StepTimer, resolve_phase_timers
from dist_mnist.profiling import TRACES_DIR, WindowedProfiler, make_profiler
from dist_mnist.runfiles import trace_window_dir
from dist_mnist.train import TrainParts, build_train_parts, resolve_speed_settings, train_step

WARMUP, ACTIVE = 2, 3  # the window: --profile-warmup and --profile-active as in the default schedule
PROGRESS_EVERY = TrainConfig.log_every  # a run waits for the device and drains its timers at each progress report
# The phase timer study's modes, in each round's order: `off_again` repeats `off`, so its ratio is the noise floor.
TIMER_MODES = ("off", "sample", "every", "off_again")


@dataclass(frozen=True)
class Arrangement:
    name: str
    suspect: str  # what it differs in from the baseline
    profiler: str = "none"  # none | per_window (what --profile does) | long_lived (--profile before issue 10)
    labels_always: bool = False  # record_function phase labels on every step, not only while a profiler records
    teardown_cupti: bool = True  # TEARDOWN_CUPTI=1 when a window closes (CUDA)
    write_trace: bool = True


ARRANGEMENTS = (
    Arrangement("plain", "baseline: no profiler, phase timers as a run has them (auto: every step on CPU, every "
                         f"{TrainConfig.phase_timer_every}th on CUDA)"),
    Arrangement("labels_always", "record_function phase labels on every step, no profiler", labels_always=True),
    Arrangement("per_window", "--profile now: a profiler per window, labels only while recording",
                profiler="per_window"),
    Arrangement("per_window_no_trace", "the same, the trace not written", profiler="per_window", write_trace=False),
    Arrangement("long_lived", "one profiler open from the first step to the last, labels on every step",
                profiler="long_lived", labels_always=True),
    Arrangement("plain_again", "baseline again, after profilers that tore CUPTI down"),
    Arrangement("per_window_no_teardown", "a profiler per window with TEARDOWN_CUPTI=0 (CUPTI stays subscribed)",
                profiler="per_window", teardown_cupti=False),
    Arrangement("plain_last", "baseline last, after a profiler that left CUPTI subscribed"),
)


StepFn = Callable[[torch.Tensor, torch.Tensor, StepTimer], torch.Tensor]


def steps_to_time(cfg: TrainConfig, ctx: DistContext, settings: Any) -> list[tuple[str, str, StepFn]]:
    """(key suffix, label, step) for each kind of step to time: the one a run with `cfg` takes here first (the bars
    of issue 10 are the default run's, whose steps on one CUDA process are graph replays), then, where that is a
    graph replay, the eager step too (what DDP runs across GPUs take). Each has parts of its own: eager steps set
    the gradients to None, which a graph must keep."""
    def parts() -> TrainParts:
        return build_train_parts(cfg, ctx, settings, total_steps=10**6)

    eager: tuple[str, str, StepFn] = ("", "eager steps", partial(train_step, parts()))
    if not graph_decision(cfg.cuda_graphs, ctx.device.type, ctx.world_size, settings.amp_dtype, cfg.compile,
                          cfg.grad_accum_steps).enabled:
        return [eager]
    return [("", "graph replays", GraphedStep(parts(), cfg.batch_size)), ("_eager", *eager[1:])]


def step_clock(device: torch.device) -> Callable[[], float]:
    """Wall time on CUDA (the GPU's work is what a step costs); the process's CPU time on CPU."""
    return time.perf_counter if device.type == "cuda" else time.process_time


@dataclass
class Stretches:
    """Step times (s) before, inside and after the window, and the profiler's own calls, over one or more rounds."""
    before: list[float] = dataclasses.field(default_factory=list)
    inside: list[float] = dataclasses.field(default_factory=list)
    after: list[float] = dataclasses.field(default_factory=list)
    profiler_calls: list[float] = dataclasses.field(default_factory=list)  # per round: open, step, close, write

    def medians_ms(self) -> dict[str, float]:
        """Median steps per stretch (robust to a slow step at an edge)."""
        return {"before_ms": statistics.median(self.before) * 1e3, "inside_ms": statistics.median(self.inside) * 1e3,
                "after_ms": statistics.median(self.after) * 1e3,
                "profiler_calls_ms": statistics.fmean(self.profiler_calls) * 1e3}


def _batches(batch_size: int, device: torch.device, count: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """MNIST-shaped uint8 batches, made once (on the device when there is one, as --data-on-device does)."""
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (batch_size, 28, 28), dtype=torch.uint8, generator=generator).to(device),
             torch.randint(0, 10, (batch_size,), generator=generator).to(device)) for _ in range(count)]
    while True:
        yield from data


class _LongLivedProfiler(AbstractContextManager):
    """--profile before issue 10: one torch.profiler.profile driven by its schedule, open for the whole loop."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, trace_dir: Path, write_trace: bool) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=cfg.profile_wait, warmup=cfg.profile_warmup, active=cfg.profile_active, repeat=1),
            # Into the one window's folder, as the run's traces are laid out (its first recorded step names it).
            on_trace_ready=(tensorboard_trace_handler(
                str(trace_dir / trace_window_dir(cfg.profile_wait + cfg.profile_warmup + 1)),
                worker_name=f"rank{ctx.rank}", use_gzip=True) if write_trace else None))

    def __enter__(self) -> _LongLivedProfiler:
        self.profiler.__enter__()
        return self

    def begin_step(self) -> None:
        pass  # torch's profile.step() after each step begins the next one's range

    def step(self) -> None:
        self.profiler.step()

    def __exit__(self, *exc_info: Any) -> None:
        self.profiler.__exit__(*exc_info)


def _profiler(arrangement: Arrangement, cfg: TrainConfig, ctx: DistContext, run_dir: Path) -> Any:
    if arrangement.profiler == "long_lived":
        return _LongLivedProfiler(cfg, ctx, run_dir / TRACES_DIR, arrangement.write_trace)
    profiler = make_profiler(cfg, ctx, run_dir, first_step=0, step_limit=10**9)
    if isinstance(profiler, WindowedProfiler) and not arrangement.write_trace:
        profiler.trace_handler = None
    return profiler


def measure_arrangement(arrangement: Arrangement, cfg: TrainConfig, ctx: DistContext, step: StepFn,
                        batches: Iterator[tuple[torch.Tensor, torch.Tensor]], before: int, after: int,
                        run_dir: Path, into: Stretches) -> None:
    """Train before + window + after steps under `arrangement`; adds their step times to `into`."""
    cfg = dataclasses.replace(cfg, profile=arrangement.profiler != "none", profile_wait=before,
                              profile_warmup=WARMUP, profile_active=ACTIVE, profile_repeat=1)
    label: Callable[[], bool] = (lambda: True) if arrangement.labels_always else torch.autograd._profiler_enabled
    timer = StepTimer(ctx.device, resolve_phase_timers(cfg.phase_timers, ctx.device), cfg.phase_timer_every,
                      label=label)
    cuda = ctx.device.type == "cuda"
    clock = step_clock(ctx.device)
    step_s: list[float] = []
    profiler_s = 0.0
    with temporary_env({"TEARDOWN_CUPTI": "1" if arrangement.teardown_cupti else "0"} if cuda else {}):
        started = clock()
        with _profiler(arrangement, cfg, ctx, run_dir) as profiler:
            profiler_s += clock() - started
            for i in range(before + WARMUP + ACTIVE + after):
                images, labels = next(batches)
                start = clock()
                profiler.begin_step()
                profiler_s += clock() - start
                start = clock()
                timer.begin_step()
                with timer.phase("data"):
                    pass  # the batches are ready: the data phase is only its labels and marks
                step(images, labels, timer)
                timer.end_step()
                if cuda:
                    torch.cuda.synchronize(ctx.device)
                step_s.append(clock() - start)
                start = clock()
                profiler.step()
                if i % 10 == 9:
                    timer.drain()  # as often as the training loop's progress lines
                profiler_s += clock() - start
            started = clock()
        profiler_s += clock() - started
    window_end = before + WARMUP + ACTIVE
    # The first steps of each arrangement are left out: the switch itself (allocator, caches) may show there.
    into.before += step_s[min(3, before // 2):before]
    into.inside += step_s[before:window_end]
    into.after += step_s[window_end:]
    into.profiler_calls.append(profiler_s)


def measure_profiler_overhead(cfg: TrainConfig, ctx: DistContext, batch_sizes: list[int], before: int,
                              after: int, rounds: int,
                              arrangements: tuple[Arrangement, ...] = ARRANGEMENTS) -> dict[str, Any]:
    """Every arrangement at every batch size and kind of step: {"batch_<B>[_eager]": {arrangement: median step ms
    per stretch}}, named in "sets" ("batch 16 (graph replays)").

    The arrangements take turns, `rounds` times, so a change in the machine's load hits them all alike; those that
    leave CUPTI subscribed (and the baseline that checks what they leave) take their turns after all others, of every
    set: the first arrangements of a later set would otherwise run with CUPTI still subscribed by the set before.
    """
    settings = resolve_speed_settings(cfg, ctx.device)
    results: dict[str, Any] = {"before_steps": before, "window_steps": WARMUP + ACTIVE, "after_steps": after,
                               "rounds": rounds, "clock": "wall" if ctx.device.type == "cuda" else "process CPU",
                               "arrangements": {a.name: a.suspect for a in arrangements}, "sets": {}}
    last = next((i for i, a in enumerate(arrangements) if not a.teardown_cupti), len(arrangements))
    sets: list[tuple[str, StepFn, Iterator[tuple[torch.Tensor, torch.Tensor]]]] = []
    for batch_size in batch_sizes:
        batches = _batches(batch_size, ctx.device)
        for suffix, label, step in steps_to_time(dataclasses.replace(cfg, batch_size=batch_size), ctx, settings):
            key = f"batch_{batch_size}{suffix}"
            results["sets"][key] = f"batch {batch_size} ({label})"
            sets.append((key, step, batches))
    stretches = {key: {a.name: Stretches() for a in arrangements} for key, _, _ in sets}
    with tempfile.TemporaryDirectory(prefix="dist_mnist_profiler_bench_") as tmp:
        for group in (arrangements[:last], arrangements[last:]):
            for key, step, batches in sets:
                for turn in range(rounds):
                    for a in group:
                        measure_arrangement(a, cfg, ctx, step, batches, before, after,
                                            Path(tmp) / f"{key}-{a.name}-{turn}", stretches[key][a.name])
    for key, _, _ in sets:
        results[key] = {name: t.medians_ms() for name, t in stretches[key].items()}
    return results


def measure_phase_timers(cfg: TrainConfig, ctx: DistContext, batch_sizes: list[int], block: int,
                         rounds: int) -> dict[str, Any]:
    """The mean step with the phase timers off, sampled (every `cfg.phase_timer_every`th step), on every step and
    off again, in blocks of `block` steps that take turns `rounds` times (each round starting one mode later, against
    drift): {"batch_<B>[_eager]": {mode: mean step ms}}, named in "sets" like measure_profiler_overhead's.

    A block runs as a run's loop does: the host queues steps without waiting, and every PROGRESS_EVERY steps waits
    for the device and drains the timers, in every mode alike (a run's progress report waits either way). Each mode
    keeps one StepTimer for all its blocks, as a run keeps one.
    """
    settings = resolve_speed_settings(cfg, ctx.device)
    cuda = ctx.device.type == "cuda"
    clock = step_clock(ctx.device)

    def wait() -> None:
        if cuda:
            torch.cuda.synchronize(ctx.device)

    results: dict[str, Any] = {"block_steps": block, "rounds": rounds, "every_n": cfg.phase_timer_every,
                               "run_mode": resolve_phase_timers(cfg.phase_timers, ctx.device),
                               "clock": "wall" if cuda else "process CPU", "sets": {}}
    for batch_size in batch_sizes:
        batches = _batches(batch_size, ctx.device)
        for suffix, label, step in steps_to_time(dataclasses.replace(cfg, batch_size=batch_size), ctx, settings):
            key = f"batch_{batch_size}{suffix}"
            timers = {mode: StepTimer(ctx.device, mode.removesuffix("_again"), cfg.phase_timer_every)
                      for mode in TIMER_MODES}
            seconds: dict[str, list[float]] = {mode: [] for mode in TIMER_MODES}
            for turn in range(rounds):
                for mode in TIMER_MODES[turn % len(TIMER_MODES):] + TIMER_MODES[:turn % len(TIMER_MODES)]:
                    timer = timers[mode]
                    wait()
                    start = clock()
                    for i in range(block):
                        images, labels = next(batches)
                        timer.begin_step()
                        with timer.phase("data"):
                            pass  # the batches are ready, as in measure_arrangement
                        step(images, labels, timer)
                        timer.end_step()
                        if i % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                            wait()
                            timer.drain()
                    wait()
                    seconds[mode].append(clock() - start)
                    timer.drain()
            results[key] = {mode: sum(s) / (block * rounds) * 1e3 for mode, s in seconds.items()}
            results["sets"][key] = f"batch {batch_size} ({label})"
    return results


def render_phase_timers(results: dict[str, Any]) -> list[str]:
    """Markdown rows: per kind of step, the mean steps of each mode, the cost of the timers a run has (the bar: within
    2% of none, issue 10) with the noise floor beside it, and the cost of timing every step."""
    lines = []
    run_mode, every_n = results["run_mode"], results["every_n"]
    what = "on every step" if run_mode == "every" else f"on every {every_n}th step"
    for key, label in results["sets"].items():
        ms = results[key]
        ratio = ms[run_mode] / ms["off"]
        noise = abs(ms["off_again"] / ms["off"] - 1)
        lines += [f"| {label}: mean step ms, phase timers off / every {every_n}th step / every step / off again "
                  f"({results['rounds']} rounds of {results['block_steps']} steps each, {results['clock']} time) | "
                  f"{ms['off']:.4f} / {ms['sample']:.4f} / {ms['every']:.4f} / {ms['off_again']:.4f} |",
                  f"| {label}: phase timers as a run has them ({what}) / off, mean step (bar: ≤ 1.02) | "
                  f"{ratio:.3f} {'PASS' if ratio <= 1.02 else 'FAIL'} (noise floor ±{noise:.1%}) |",
                  f"| {label}: phase timers on every step / off (--phase-timers every) | "
                  f"{ms['every'] / ms['off']:.3f} |"]
    return lines


def render_profiler_overhead(results: dict[str, Any]) -> list[str]:
    """Markdown rows: per batch size, each arrangement's median steps and their ratios to the baseline's."""
    lines = [f"| profiler overhead, step by step: median step ms before ({results['before_steps']} steps) / inside "
             f"({results['window_steps']}) / after ({results['after_steps']}) the window, {results['rounds']} rounds, "
             f"{results['clock']} time; × = ratio to `plain` (>1: slower) | |"]
    for key, label in results["sets"].items():
        arrangements = results[key]
        base = arrangements["plain"]
        for name, t in arrangements.items():
            lines.append(
                f"| {label}, `{name}` ({results['arrangements'][name]}) | "
                f"{t['before_ms']:.2f} / {t['inside_ms']:.2f} / {t['after_ms']:.2f} ms; before "
                f"{t['before_ms'] / base['before_ms']:.3f}×, after {t['after_ms'] / base['after_ms']:.3f}×; "
                f"profiler calls {t['profiler_calls_ms']:.0f} ms |")
    return lines


def render_verdicts(steps: dict[str, Any], whole_runs: dict[Any, Any]) -> list[str]:
    """Markdown rows: issue 10's bars for --profile, met or not: steps outside the window within 3% of unprofiled
    ones, whole profiled runs within 5% (the phase timers' bar is render_phase_timers'). For each kind of step timed
    (a set named "batch 16 (graph replays)"); the bars are the default run's, and its kind of step is each batch
    size's first set."""
    lines = []
    for key, label in steps["sets"].items():
        arrangements = steps[key]
        base = arrangements["plain"]
        window = arrangements["per_window"]
        outside = max(window["before_ms"] / base["before_ms"], window["after_ms"] / base["after_ms"])
        if "plain_again" in arrangements:  # the same code measured twice: how far apart noise alone puts them
            again = arrangements["plain_again"]
            noise = max(abs(again[s] / base[s] - 1) for s in ("before_ms", "after_ms"))
            lines.append(f"| {label}: noise floor, `plain_again` against `plain` | ±{noise:.1%} |")
        lines.append(f"| {label}: --profile, steps outside the window / unprofiled, the worse of before and after "
                     f"(bar: ≤ 1.03) | {outside:.3f} {'PASS' if outside <= 1.03 else 'FAIL'} |")
    for batch, run in whole_runs.items():
        ratio = run["mean_throughput_ratio"]
        lines.append(f"| batch {batch}: whole run with --profile / without, throughput (bar: ≥ 0.95) | {ratio:.3f} "
                     f"{'PASS' if ratio >= 0.95 else 'FAIL'} |")
    return lines
