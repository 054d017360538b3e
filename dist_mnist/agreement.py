"""Start-up agreement: every rank checks that the others run the same recipe, code and data.

Ranks that disagree train different models (a different --lr), or hang in the first collective whose shapes or
counts no longer match (a different --batch-size or --log-every) until the timeout. Gathering each rank's view once,
right after the process group opens, turns both into the same one-line error on every rank within seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext
from dist_mnist.errors import UserError

# Config fields that may differ between nodes: where this node finds its data and how it reads it, and where rank 0
# writes (every rank uses the folder rank 0 chose and broadcast). Every other field shapes the model, the data
# order, the schedule or the sequence of collectives, so all ranks must hold the same value.
PER_NODE_FIELDS = frozenset({"data_dir", "no_download", "num_workers", "data_on_device", "threads", "output_dir",
                             "checkpoint_dir"})


def code_version() -> str:
    """A digest of this package's source: nodes with different checkouts of dist_mnist run different code."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def recipe_view(cfg: TrainConfig) -> dict[str, Any]:
    """What this rank must share with all others before training: flags, then the code and torch versions."""
    flags = {f"--{name.replace('_', '-')}": value for name, value in cfg.to_json().items()
             if name not in PER_NODE_FIELDS}
    return {**flags, "the dist_mnist code (digest of its source)": code_version(),
            "the torch version": torch.__version__}


def data_view(train_size: int, test_size: int) -> dict[str, Any]:
    return {"the training set size": train_size, "the test set size": test_size}


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def disagreement(views: list[dict[str, Any]], advice: str) -> str | None:
    """The error naming every item that differs between ranks' views, with each value's ranks; None when all agree."""
    differences = []
    for key in views[0]:
        by_value: dict[str, list[int]] = {}
        for rank, view in enumerate(views):
            by_value.setdefault(repr(view.get(key)), []).append(rank)
        if len(by_value) > 1:
            values = ", ".join(f"{value} on {_ranks(ranks)}" for value, ranks in by_value.items())
            differences.append(f"{key} ({values})")
    return f"ranks disagree on {' and '.join(differences)}; {advice}" if differences else None


def agree(ctx: DistContext, view: dict[str, Any], advice: str) -> None:
    """Every rank sends its view to every other; each raises the same error if any two differ."""
    if ctx.world_size == 1:
        return
    error = disagreement(ctx.gather_objects(view), advice)
    if error:
        raise UserError(error)


def agree_on_recipe(cfg: TrainConfig, ctx: DistContext) -> None:
    """Call right after the process group opens, before any collective that depends on the config."""
    agree(ctx, recipe_view(cfg), "start every node with the same flags and the same dist_mnist and torch")


def agree_on_data(ctx: DistContext, train_size: int, test_size: int) -> None:
    """Call after the data is loaded: nodes read their own copies of the files, which may differ."""
    agree(ctx, data_view(train_size, test_size), "every node needs the same data files")


def check_replicas_in_sync(digests: list[str]) -> None:
    """After training: DDP keeps the replicas identical, so differing parameters mean a broken run."""
    error = disagreement([{"the final parameters (digest)": d} for d in digests],
                         "the replicas diverged and rank 0's checkpoint holds one of them; do not use this run")
    if error:
        raise UserError(error)
