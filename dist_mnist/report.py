"""Re-read a finished run and print its summary table: `python -m dist_mnist.report profiles/<run-name>`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_mnist.errors import UserError
from dist_mnist.metrics import format_eval
from dist_mnist.profiling import format_summary


def _read_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt: {exc}") from None


def _format_or_fail(path: Path, formatter: Callable[[Any], str], record: Any) -> str:
    """`formatter(record)`, or a UserError naming the file when the record lacks the fields a run writes."""
    try:
        return formatter(record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a dist_mnist run file (missing or bad field {exc})") from None


def report(run_dir: Path) -> str:
    """The last evaluation line (when metrics.jsonl has one) and the summary table, as the run printed them."""
    if not run_dir.is_dir():
        raise UserError(f"no run folder {run_dir}; pass a folder inside --output-dir, e.g. profiles/<run-name>")
    summary_path = run_dir / "summary.json"
    try:
        summary_text = summary_path.read_text()
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no summary.json: rank 0 writes it when a run ends, so this run is still "
                        "going, crashed, or stopped before its first step") from None
    except OSError as exc:
        raise UserError(f"cannot read {summary_path}: {exc.strerror or exc}") from None
    lines = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        records = metrics_path.read_text().strip().splitlines()
        if records:
            lines.append(_format_or_fail(metrics_path, format_eval, _read_json(metrics_path, records[-1])))
    lines.append(_format_or_fail(summary_path, format_summary, _read_json(summary_path, summary_text)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_mnist.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. profiles/<run-name>")
    args = parser.parse_args(argv)
    try:
        print(report(args.run_dir))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
