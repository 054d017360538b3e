"""Two runs side by side: per-rank and global figures of their summaries with B/A ratios, and their config diff."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dist_mnist.runtext import PHASES, resumed_steps

# Numbers that identify or count rather than measure: a ratio of them means nothing (the steps a summary covers are
# named with the run instead, by run_label). A rank's `steps` is how many steps its phase timers timed, the size of
# a sample (0 with --phase-timers off, whose "0.00x" against a timed run read as a figure that collapsed).
# `phase_timing` is the timers' settings and count of timed steps, `traces` how many windows were written;
# `phase_time_per_step_s` is shown as the phases' ms rows; `config`, the settings, as the config diff.
_NOT_COMPARED = {"rank", "first_step_unix", "first_step", "last_step", "steps", "phase_timing", "traces",
                 "phase_time_per_step_s", "config"}
# Counts worth seeing side by side, without a ratio, by label: the world size, and DDP's gradient buckets
# (--bucket-cap-mb sets them).
_COUNTS = {"world_size": "ranks", "allreduce_buckets": "allreduce_buckets"}


def run_label(name: str, summary: dict[str, Any]) -> str:
    """A run's name for the comparison's header, with the steps its summary covers where a resume cut them short."""
    steps = resumed_steps(summary)
    return f"{name} (figures of {steps} only: resumed there)" if steps else name


@dataclass(frozen=True)
class Figure:
    """How one summary field is shown: its label and how a value reads (the raw number is what the ratio uses)."""

    label: str
    show: Callable[[float], str]


@dataclass(frozen=True)
class ComparisonRow:
    section: str  # "global" or "rank N"
    label: str
    a: float | None  # None: the field is absent from that run's summary
    b: float | None
    shown_a: str
    shown_b: str

    @property
    def ratio(self) -> float | None:
        """B / A, or None when either is absent or A is zero."""
        if self.a is None or self.b is None or self.a == 0:
            return None
        return self.b / self.a


@dataclass(frozen=True)
class ConfigChange:
    key: str  # dotted for nested blocks, e.g. "resolved.world_size"
    a: Any  # ABSENT when that run's config.json lacks the key
    b: Any


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


# The value of a setting one config.json does not have (a flag added after that run).
ABSENT: Any = _Absent()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _percent(fraction: float) -> str:
    return f"{fraction:.1%}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _generic(value: float) -> str:
    return f"{value:.4g}"


def _seconds(value: float) -> str:
    return f"{value:.4g} s"


def _megabytes(value: float) -> str:
    return f"{value / 1e6:,.2f} MB"  # decimal, as the run's table gives the all-reduce's MB/step and MB/s


def _shown_by_name(key: str) -> Callable[[float], str]:
    """How a field without a Figure of its own reads, by the unit its name gives (the summary's naming): a share as
    a percent, bytes and bytes/s in MB, seconds with "s"; the raw number was a fraction to compare with % rows."""
    if key.endswith("_share"):
        return _percent
    if key.endswith("bytes_per_s"):
        return lambda value: f"{_megabytes(value)}/s"
    if key.endswith(("_bytes", "_bytes_per_step")):
        return _megabytes
    if key.endswith("_s") or key.split(".", 1)[0] in ("startup", "pauses_s"):
        return _seconds
    return _generic


RANK_FIGURES = {
    "step_time_p50_s": Figure("step p50 ms", _ms),
    "step_time_p90_s": Figure("step p90 ms", _ms),
    "samples_per_sec": Figure("samples/s", _count),
    "own_time_p50_s": Figure("own work p50 ms", _ms),
    "measured_step_time_s": Figure("measured step ms", _ms),
    "explained_fraction": Figure("explained", _percent),
    "peak_rss_bytes": Figure("peak RSS", _mib),
    "cuda_peak_allocated_bytes": Figure("CUDA peak allocated", _mib),
}
GLOBAL_FIGURES = {
    "samples_per_sec": Figure("samples/s", _count),
    "epoch_time_s": Figure("epoch s", lambda v: f"{v:.1f}"),
    "mfu": Figure("MFU", _percent),
    "startup_s": Figure("startup s", lambda v: f"{v:.1f}"),
    "achieved_tflops": Figure("achieved TFLOP/s", lambda v: f"{v:.3f}"),
    "peak_tflops_per_process": Figure("peak TFLOP/s per process", lambda v: f"{v:.3f}"),
    "flops_per_sample": Figure("MFLOP per sample", lambda v: f"{v / 1e6:.1f}"),
}


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    # bool is an int to Python, but a yes/no flag has no ratio.
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _flat_numbers(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its blocks' fields (`startup`, `pauses_s`) as fields of their own, named `block.field`."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and key not in _NOT_COMPARED:
            flat.update({f"{key}.{field}": inner for field, inner in value.items()})
        else:
            flat[key] = value
    return flat


def phase_names(ranks: list[dict[str, Any]]) -> list[str]:
    """The step phases (runtext.PHASES, which add up to the step) the summaries have a `<phase>_share` for.

    Other `*_share` fields are not phases (they may overlap one) and are compared as plain numbers. A share of None
    (--phase-timers off writes every one so) is no share: it has no bar and no ms.
    """
    return [p for p in PHASES if any(_number(r, f"{p}_share") is not None for r in ranks)]


def mean_step_s(rank: dict[str, Any]) -> float | None:
    """The mean timed step of a rank: the shares are fractions of it.

    `phase_time_per_step_s` is that mean split by phase, less the all-reduce the step waited for (its share
    `comm_exposed_share`), so the phases' ms rows are the summary's own figures. Summaries written before it:
    `explained_fraction` is a mean timed step over the mean wall time between step starts, so their product is close
    (over the steps with an interval, not all the timed ones: up to 4% apart); without those, the median step.
    """
    per_phase = rank.get("phase_time_per_step_s")
    if isinstance(per_phase, dict) and per_phase:
        return sum(per_phase.values()) / (1.0 - (_number(rank, "comm_exposed_share") or 0.0))
    explained, measured = _number(rank, "explained_fraction"), _number(rank, "measured_step_time_s")
    if explained and measured:
        return explained * measured
    return _number(rank, "step_time_p50_s")


def phase_ms(rank: dict[str, Any], phases: list[str]) -> dict[str, float | None]:
    """Milliseconds per step spent in each phase (share × mean step); None where the summary lacks the share."""
    step = mean_step_s(rank)
    out: dict[str, float | None] = {}
    for phase in phases:
        share = _number(rank, f"{phase}_share")
        out[phase] = share * step * 1e3 if share is not None and step is not None else None
    return out


def _row(section: str, label: str, a: float | None, b: float | None, show: Callable[[float], str]) -> ComparisonRow:
    return ComparisonRow(section, label, a, b, "-" if a is None else show(a), "-" if b is None else show(b))


def _figure_rows(section: str, a: dict[str, Any], b: dict[str, Any], figures: dict[str, Figure],
                 skip: set[str]) -> list[ComparisonRow]:
    """The named figures first, then every other numeric field either record has, under its own name (a block's
    fields as `block.field`)."""
    a, b = _flat_numbers(a), _flat_numbers(b)
    rows = [_row(section, fig.label, _number(a, key), _number(b, key), fig.show) for key, fig in figures.items()
            if _number(a, key) is not None or _number(b, key) is not None]
    rows += [ComparisonRow(section, label, None, None, _shown_count(a.get(key)), _shown_count(b.get(key)))
             for key, label in _COUNTS.items() if a.get(key) is not None or b.get(key) is not None]
    others = [k for k in dict.fromkeys([*a, *b])
              if k not in figures and k not in skip and k not in _NOT_COMPARED and k not in _COUNTS]
    # A block's fields together (a startup part only B has came after A's pauses), blocks in the order met.
    blocks = list(dict.fromkeys(key.split(".", 1)[0] for key in others))
    others.sort(key=lambda key: blocks.index(key.split(".", 1)[0]))
    rows += [_row(section, key, _number(a, key), _number(b, key), _shown_by_name(key)) for key in others
             if _number(a, key) is not None or _number(b, key) is not None]
    return rows


def _shown_count(value: Any) -> str:
    """A count as the table shows it; a field the run lacks or left null (a world of one has no buckets) is `-`."""
    return "-" if value is None else str(value)


def _flag(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _rank_rows(section: str, a: dict[str, Any], b: dict[str, Any], phases: list[str]) -> list[ComparisonRow]:
    """Step time and throughput, each phase as a share and in ms, the straggler flag, then every other number."""
    first = ("step_time_p50_s", "step_time_p90_s", "samples_per_sec")
    rows = [_row(section, RANK_FIGURES[k].label, _number(a, k), _number(b, k), RANK_FIGURES[k].show) for k in first]
    ms_a, ms_b = phase_ms(a, phases), phase_ms(b, phases)
    for phase in phases:
        rows.append(_row(section, f"{phase} share", _number(a, f"{phase}_share"), _number(b, f"{phase}_share"),
                         _percent))
        rows.append(_row(section, f"{phase} ms", ms_a[phase], ms_b[phase], lambda v: f"{v:.2f}"))
    rows.append(ComparisonRow(section, "straggler", None, None, _flag(a.get("straggler")), _flag(b.get("straggler"))))
    shown = {*first, *(f"{p}_share" for p in phases)}
    rest = {k: f for k, f in RANK_FIGURES.items() if k not in shown}
    return rows + _figure_rows(section, a, b, rest, skip=shown)


def compare_summaries(a: dict[str, Any], b: dict[str, Any]) -> list[ComparisonRow]:
    """Rows for the global figures, then for every rank either run had (a rank only one run had shows '-')."""
    rows = _figure_rows("global", a, b, GLOBAL_FIGURES, skip={"ranks"})
    ranks_a = {r["rank"]: r for r in a["ranks"]}
    ranks_b = {r["rank"]: r for r in b["ranks"]}
    phases = phase_names([*a["ranks"], *b["ranks"]])
    for rank in sorted(ranks_a.keys() | ranks_b.keys()):
        rows += _rank_rows(f"rank {rank}", ranks_a.get(rank, {}), ranks_b.get(rank, {}), phases)
    return rows


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[ConfigChange]:
    """The settings that differ between two config.json files (one only one has: ABSENT on the other side)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    changes = []
    for key in dict.fromkeys([*flat_a, *flat_b]):
        value_a, value_b = flat_a.get(key, ABSENT), flat_b.get(key, ABSENT)
        if value_a != value_b:
            changes.append(ConfigChange(key, value_a, value_b))
    return changes


def format_ratio(ratio: float | None) -> str:
    """B/A to two decimals, or below 0.1 to two significant digits, in fixed point: a GPU run against a CPU run
    read `0.00x`."""
    if ratio is None:
        return "-"
    if ratio >= 0.1 or ratio <= 0:
        return f"{ratio:.2f}x"
    return f"{ratio:.{1 - math.floor(math.log10(ratio))}f}x"


def format_comparison(name_a: str, name_b: str, rows: list[ComparisonRow], changes: list[ConfigChange] | None) -> str:
    """The comparison as text: the config diff (None: a run lacks config.json), then one block per section."""
    lines = [f"A: {name_a}", f"B: {name_b}"]
    if changes is None:
        lines.append("config: not compared (a run has no config.json)")
    elif not changes:
        lines.append("config: identical")
    else:
        lines.append("config (A -> B):")
        lines += [f"  {c.key}: {c.a!r} -> {c.b!r}" for c in changes]
    width_a = max([len("A"), *(len(r.shown_a) for r in rows)])
    width_b = max([len("B"), *(len(r.shown_b) for r in rows)])
    width_label = max([0, *(len(r.label) for r in rows)]) + 2
    section = ""
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(f"{section:<{width_label}} {'A':>{width_a}} {'B':>{width_b}} {'B/A':>7}")
        lines.append(f"  {row.label:<{width_label - 2}} {row.shown_a:>{width_a}} {row.shown_b:>{width_b}} "
                     f"{format_ratio(row.ratio):>7}")
    return "\n".join(lines)
