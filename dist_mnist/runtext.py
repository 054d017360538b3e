"""How a run's figures read as text: the evaluation line (a metrics.jsonl record) and the summary table
(summary.json) that a run prints and `python -m dist_mnist.report` prints again from its files, with the facts of the
summary's layout they rest on (the step's phases, the warm-up steps its figures leave out, the steps a resumed
process's figures are of).

Standard library only: `python -m dist_mnist.report` and its comparison of two runs read run folders copied to a
laptop or a login node, which may have no torch, and `import dist_mnist.report` took 1.7 s on our 2-core CPU while
these came from the torch modules metrics and profiling, 0.04-0.07 s since. Those import them from here."""

from __future__ import annotations

from typing import Any

from dist_mnist.runfiles import TRACES_DIR

# The phases of one training step, in order. Their trace labels are "train/<phase>".
PHASES = ("data", "to_device", "forward", "backward", "optimizer")


def warmup_steps(timed: int) -> int:
    """How many of a rank's first timed steps its figures leave out: a fifth, at most 5. The first steps pay for
    what happens once (DataLoader workers starting, the first use of each kernel, lazy allocations); under 5 timed
    steps there is nothing else, the figures include them and the summary makes no diagnosis from them."""
    return min(timed // 5, 5)


def resumed_steps(summary: dict[str, Any]) -> str | None:
    """"steps A-B", the steps a resumed process ran and its summary's figures are of; None for a run not resumed
    (and for summaries written before `first_step` was recorded). The run's table, the comparison's header and the
    picture's title all say it."""
    if not summary.get("first_step"):
        return None
    return f"steps {summary['first_step'] + 1}-{summary['last_step']}"


def format_eval(record: dict[str, Any]) -> str:
    """One metrics.jsonl record as the progress line the run printed (also used by `python -m dist_mnist.report`)."""
    return (f"eval  epoch {record['epoch']} step {record['step']}: test loss {record['test_loss']:.4f}, "
            f"accuracy {record['test_accuracy']:.2%} of {record['test_samples']} images, "
            f"{record['elapsed_s']:.1f} s since the first step")


TABLE_SHARES = (("data", "data"), ("to_device", "to_device"), ("forward", "forward"),
                ("backward_compute", "bwd comp"), ("comm_exposed", "comm wait"), ("optimizer", "optimizer"))


def _percent(value: float | None) -> str:
    return f"{'n/a':>9}" if value is None else f"{value:>9.1%}"


def _trace_failures(ranks: list[dict[str, Any]]) -> list[str]:
    """A line for each rank that could not write a profiler trace, so the table of a run whose traces folder is short
    says why. Summaries written without --profile hold `traces` null, older ones no `traces` at all."""
    traced = [r for r in ranks if r.get("traces")]
    written = sum(r["traces"]["written"] for r in traced)
    return [f"profiler: rank {r['rank']} {r['traces']['write_failure']}, and recorded no more traces; training went "
            f"on ({written} traces written by all ranks, in {TRACES_DIR}/)"
            for r in traced if r["traces"]["write_failure"]]


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
        timed = r["backward_share"] is not None
        shares = {"backward_compute": r.get("backward_compute_share", r["backward_share"]),
                  "comm_exposed": (r.get("comm_exposed_share") or 0.0) if timed else None,
                  **{p: r[f"{p}_share"] for p in ("data", "to_device", "forward", "optimizer")}}
        comm_s = r.get("allreduce_time_per_step_s")
        if comm_s is None:
            comm = f" {'-':>8} {'-':>7} {'-':>8} {'-':>7}"
        else:
            overlap = r["allreduce_overlapped_per_step_s"] / comm_s if comm_s else 0.0
            bandwidth = r["allreduce_bandwidth_bytes_per_s"] or 0.0
            comm = (f" {comm_s * 1e3:>8.2f} {overlap:>7.0%} {r['allreduce_bytes_per_step'] / 1e6:>8.2f}"
                    f" {bandwidth / 1e6:>7.0f}")
        straggler = "n/a" if r["straggler"] is None else (r.get("straggler_phase") or "YES") if r["straggler"] else "no"
        lines.append(f"{r['rank']:>4} {r['step_time_p50_s'] * 1e3:>8.2f} {r['step_time_p90_s'] * 1e3:>8.2f} "
                     f"{r['samples_per_sec']:>10.0f} " + " ".join(_percent(shares[p]) for p, _ in TABLE_SHARES) +
                     comm + f" {_percent(r['explained_fraction'])} {r['peak_rss_bytes'] / 2**20:>6.0f}MiB"
                     f" {straggler:>9}")
    timing = summary.get("phase_timing")  # absent in summaries written before --phase-timers existed
    if timing and timing["mode"] == "off":
        per_step = "" if timing.get("wall_per_step", True) else (
            " (p50 and p90 are the mean step: on CUDA a single step is not timed without waiting for the GPU)")
        lines.append(f"phase timers off (--phase-timers off): no phase shares; step times are wall-clock{per_step}")
    elif timing and timing["mode"] == "sample":
        timed = timing["steps_timed"]
        cold = "" if warmup_steps(timed) or not timed else (
            ": too few to leave the first, cold step out, so nothing is set against the measured step (explained n/a)")
        lines.append(f"phase shares from one step in {timing['every_n_steps']} ({timed} "
                     f"step{'' if timed == 1 else 's'} timed on rank 0{cold})")
    lines.extend(_trace_failures(summary["ranks"]))
    mfu = f"{summary['mfu']:.1%}" if summary["mfu"] is not None else "n/a"
    achieved = summary["achieved_tflops"]
    if summary["mfu"] is None and achieved is not None and achieved > summary["peak_tflops_per_process"] * len(
            summary["ranks"]) > 0:
        mfu = "n/a (the run achieved more than this peak, so it is no yardstick)"
    epoch = f"{summary['epoch_time_s']:.1f} s" if summary["epoch_time_s"] else "n/a"
    rate = ("samples/s n/a (one step: no interval between two steps to time)" if summary["samples_per_sec"] is None
            else f"{summary['samples_per_sec']:.0f} samples/s")
    achieved_text = "n/a" if achieved is None else f"{achieved:.3f}"
    lines.append(f"global: {rate}, epoch {epoch}, {summary['flops_per_sample'] / 1e6:.1f} MFLOP/sample, "
                 f"{achieved_text} TFLOP/s achieved, MFU {mfu} of {summary['peak_tflops_per_process']:.3f} TFLOP/s "
                 f"per process ({summary['peak_source']}); parameters identical on all ranks: "
                 f"{'yes' if summary['ranks_in_sync'] else 'NO'}")
    if summary.get("diagnosis"):
        lines.append(f"diagnosis: {summary['diagnosis']}")
    if steps := resumed_steps(summary):
        lines.append(f"resumed at step {summary['first_step']}: these figures are of {steps}, run by the process "
                     "that resumed the run, not of its earlier steps")
    return "\n".join(lines)
