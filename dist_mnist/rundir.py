"""Run folder: a name every rank agrees on (stable across torchrun restarts), writability, no silent overwrite."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dist_mnist.checkpoint import list_checkpoints
from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext
from dist_mnist.errors import UserError


def checkpoint_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else run_dir / "checkpoints"


def _ensure_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {flag} {folder}: {exc.strerror or exc}") from None


def _default_name(output_dir: Path) -> str:
    """A timestamp; under torchrun the same one after every restart of the job, found through its run id."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not run_id:
        return stamp
    # torchrun keeps its run id across restarts (--standalone makes a fresh one per launch), so a marker
    # keyed by it maps a restarted job back to the folder of its first attempt.
    marker = output_dir / ".torchelastic" / run_id
    if marker.is_file():
        return marker.read_text().strip()
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(stamp)
    return stamp


def _refuse_fresh_starts_on_restarts(cfg: TrainConfig) -> None:
    """--resume never under torchrun --max-restarts: each restart would begin at step 0 and rewrite the run's files."""
    if cfg.resume == "never" and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        raise UserError("--resume never cannot be combined with torchrun --max-restarts above 0: every restart would "
                        "start again from step 0 and rewrite the run's files; use --resume auto (the default), which "
                        "continues from the last checkpoint")


def _choose_run_dir(cfg: TrainConfig) -> Path:
    _refuse_fresh_starts_on_restarts(cfg)
    output_dir = Path(cfg.output_dir)
    _ensure_writable(output_dir, "--output-dir")
    run_dir = output_dir / (cfg.run_name or _default_name(output_dir))
    # A folder without files is what a run that failed during start-up (say, on missing data) leaves: reuse it.
    if run_dir.exists() and any(p.is_file() for p in run_dir.rglob("*")):
        # A torchrun restart, or a SLURM requeue of a job whose first attempt died before its first checkpoint.
        restarted = any(int(os.environ.get(var, "0") or 0) > 0
                        for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
        resumable = cfg.resume not in ("auto", "never") or (
            cfg.resume == "auto" and list_checkpoints(checkpoint_dir(cfg, run_dir)))
        if not (restarted or resumable):
            raise UserError(f"run folder {run_dir} already exists and holds no checkpoint to resume; "
                            "pick another --run-name (nothing was overwritten)")
    _ensure_writable(run_dir, "the run folder")
    _ensure_writable(checkpoint_dir(cfg, run_dir), "--checkpoint-dir")
    return run_dir


def open_run_dir(cfg: TrainConfig, ctx: DistContext) -> Path:
    """Rank 0 picks and checks the folder; every rank gets the same path or the same error."""
    run_dir, error = None, ""
    if ctx.is_main:
        try:
            run_dir = _choose_run_dir(cfg)
        except UserError as exc:
            error = str(exc)
    run_dir, error = ctx.broadcast_object((run_dir, error))
    if error:
        raise UserError(error)
    return run_dir
