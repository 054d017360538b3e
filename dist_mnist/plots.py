"""A picture of one run (a PNG a person can open anywhere): per-rank phase bars, step time, loss and accuracy curves."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_mnist.compare import mean_step_s, phase_ms, phase_names
from dist_mnist.durable import open_new, temp_path

if TYPE_CHECKING:  # matplotlib is imported only when a picture is drawn: training never pays for it
    from matplotlib.axes import Axes


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, in step order: the first one written for it.

    A resumed run repeats the steps after its checkpoint, and a run whose last step is also an `--eval-every`
    step evaluates it twice, the second time with no training since (train loss and samples/s 0).
    """
    first: dict[int, dict[str, Any]] = {}
    for record in records:
        first.setdefault(record["step"], record)
    return sorted(first.values(), key=lambda r: r["step"])


def _no_data(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({why})", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# An empty progress.jsonl is what a run shorter than --log-every leaves; a missing one, a run from before the file.
NO_PROGRESS = "no record in progress.jsonl:\nthe run ended before its first --log-every step,\nor predates the file"
EXPOSED_ALLREDUCE = "all-reduce (exposed)"
BACKWARD_COMPUTE = "backward (compute)"


def bar_segments(ranks: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per rank, milliseconds per step in each stacked segment: the step phases, with backward split into its
    compute and the gradient all-reduce it waited for where the summaries time DDP's buckets (2+ ranks), as
    summary.json's `backward_compute_share` and `comm_exposed_share` do. Segments add up to the mean timed step."""
    phases = phase_names(ranks)
    split = "backward" in phases and any(r.get("comm_exposed_share") is not None for r in ranks)
    segments = []
    for rank in ranks:
        times = {phase: ms or 0.0 for phase, ms in phase_ms(rank, phases).items()}
        if not split:
            segments.append(times)
            continue
        step_ms = (mean_step_s(rank) or 0.0) * 1e3
        exposed = min((rank.get("comm_exposed_share") or 0.0) * step_ms, times["backward"])
        parts: dict[str, float] = {}
        for phase, ms in times.items():
            parts.update({BACKWARD_COMPUTE: ms - exposed, EXPOSED_ALLREDUCE: exposed} if phase == "backward"
                         else {phase: ms})
        segments.append(parts)
    return segments


def _phase_bars(ax: Axes, summary: dict[str, Any] | None) -> None:
    """`summary` None: the run wrote none (it did not finish), so there are no phase shares to draw."""
    ax.set_title("where a step's time goes, per rank")
    if summary is None:
        _no_data(ax, "no summary.json: the run did not finish")
        return
    ranks = summary["ranks"]
    if not ranks or not phase_names(ranks):
        _no_data(ax, "summary.json has no per-rank phase shares\n(--phase-timers off times no phase)")
        return
    labels = [str(r["rank"]) for r in ranks]
    bottoms = [0.0] * len(ranks)
    segments = bar_segments(ranks)
    for name in segments[0]:
        heights = [s[name] for s in segments]
        ax.bar(labels, heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xlabel("rank")
    ax.set_ylabel("ms per step (mean)")
    handles, names = ax.get_legend_handles_labels()
    # Listed top to bottom, as the segments are stacked.
    ax.legend(handles[::-1], names[::-1], fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))


def _step_times(ax: Axes, progress: list[dict[str, Any]]) -> None:
    ax.set_title("step time (rank 0, mean per log interval)")
    if not progress:
        _no_data(ax, NO_PROGRESS)
        return
    timed = [r for r in progress if r["step_time_ms"] is not None]  # None: no step of that interval was timed
    if not timed:
        _no_data(ax, "no timed steps (--phase-timers off)")
        return
    # An untimed interval is a gap in the line (NaN), not a straight line drawn across it as if measured.
    ax.plot([r["step"] for r in progress], [math.nan if r["step_time_ms"] is None else r["step_time_ms"]
                                            for r in progress], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)


def _losses(ax: Axes, progress: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> None:
    ax.set_title("loss")
    if not progress and not metrics:
        _no_data(ax, "no record in progress.jsonl or metrics.jsonl")
        return
    if progress:
        ax.plot([r["step"] for r in progress], [r["train_loss"] for r in progress],
                label="train (mean per log interval)")
    if metrics:
        steps = [r["step"] for r in metrics]
        ax.plot(steps, [r["train_loss"] for r in metrics], marker="o", label="train (mean between evaluations)")
        ax.plot(steps, [r["test_loss"] for r in metrics], marker="o", label="test")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")


def _accuracy(ax: Axes, metrics: list[dict[str, Any]]) -> None:
    ax.set_title("test accuracy")
    if not metrics:
        _no_data(ax, "no evaluation in metrics.jsonl")
        return
    steps = [r["step"] for r in metrics]
    accuracy = [100 * r["test_accuracy"] for r in metrics]
    ax.plot(steps, accuracy, marker="o")
    low, high = ax.get_ylim()
    # No accuracy is above 100%: an axis of 100% evaluations ran from 96% to 104%.
    ax.set_ylim(low, min(high, 100.5))
    # In the title: a label beside the last point lay over the curve of a run that was still rising.
    ax.set_title(f"test accuracy (last {accuracy[-1]:.2f}% at step {steps[-1]})")
    ax.set_xlabel("step")
    ax.set_ylabel("%")


def write_run_picture(path: Path, title: str, summary: dict[str, Any] | None, progress: list[dict[str, Any]],
                      metrics: list[dict[str, Any]]) -> None:
    """Draw the four panels under `title` into a PNG at `path` (written to a temporary name first, so a failure
    keeps the old)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display needed

    fig = Figure(figsize=(11, 7.5), dpi=90, layout="constrained")
    axes = fig.subplots(2, 2)
    _phase_bars(axes[0, 0], summary)
    _step_times(axes[0, 1], _by_step(progress))
    _losses(axes[1, 0], _by_step(progress), _by_step(metrics))
    _accuracy(axes[1, 1], _by_step(metrics))
    # parse_math=False: the title holds the run folder's name, and a `$` there ('r$\\bad{$') was parsed as mathtext
    # and ended the report in a traceback; the name is drawn as it is.
    fig.suptitle(title, parse_math=False)
    tmp = temp_path(path)
    try:
        with open_new(tmp) as f:  # not through a symlink planted at the temp name
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
