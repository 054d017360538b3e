"""Named training recipes per device: the values a run uses for the flags the user left out.

The device is known only once the distributed session has resolved it, so the command line is parsed first (with
each recipe-managed flag holding the CPU recipe's value as its plain default) and `apply_recipe` fills the chosen
recipe in afterwards, keeping every flag the user gave explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dist_mnist.errors import UserError

# The largest --warmup-frac validation allows (it must be below 1): a recipe's warm-up as long as the run or longer
# becomes this share of the run's steps.
MAX_WARMUP_FRAC = math.nextafter(1.0, 0.0)


@dataclass(frozen=True)
class Recipe:
    """One device's training settings. The field names are TrainConfig fields (and so flags), except
    `warmup_epochs`: the learning-rate warm-up as a length in epochs, which sets --warmup-frac (a share of the
    schedule's steps) for the run's resolved --epochs, so that `--epochs 1` keeps the warm-up the recipe meant."""
    batch_size: int
    lr: float
    epochs: int
    warmup_epochs: float
    eval_every: int
    eval_batch_size: int
    checkpoint_every: int
    epoch_checkpoints: str
    ddp_comm_hook: str
    bucket_cap_mb: float

    def warmup_frac(self, epochs: int) -> float:
        """--warmup-frac for a run of `epochs` epochs: `warmup_epochs` of them, below 1 (validation's limit)."""
        # Rounded to 6 digits: the run's first line and config.json show 0.133333 for 0.4 epochs of 3, not 17 digits.
        return min(round(self.warmup_epochs / epochs, 6), MAX_WARMUP_FRAC)

    def flag_values(self, epochs: int | None = None) -> dict[str, Any]:
        """The TrainConfig values this recipe sets, for a run of `epochs` epochs (None: the recipe's)."""
        share = self.warmup_frac(self.epochs if epochs is None else epochs)
        values = {**dataclasses.asdict(self), "warmup_frac": share}
        return {name: values[name] for name in RECIPE_FIELDS}


# The one table to edit; README.md's "Recipe and accuracy" table is checked against it by tests/test_recipes.py.
RECIPES: dict[str, Recipe] = {
    # Small global batches are what reach 98.9% in one epoch and 99.1% in two on MNIST (README, "Recipe"): 16 per
    # process is global 32 on 2 ranks, the largest that still reaches 98.9% in one epoch. Evaluations count in the
    # time to accuracy (about 0.7 s each for 10,000 images on 2 ranks) and 99.0% comes within the second epoch:
    # every 750 steps (0.4 epoch at 2 x 16) sees it without evaluating often. The bf16 hook halves the bytes of the
    # fp32 all-reduce at unchanged accuracy; torch's default buckets (bucket_cap_mb 0) overlap a 1 MiB first bucket
    # with backward (issue 12, docs/benchmarks.md). Evaluation batches of 250, not 1000: the same accuracy, and an
    # evaluation 0.79x as long on the 2-core AMD CPU (docs/benchmarks.md, "The cpu recipe's evaluation batch").
    # Its warm-up of 0.2 epochs is 0.1 of the steps at its 2 epochs.
    "cpu": Recipe(batch_size=16, lr=2e-3, epochs=2, warmup_epochs=0.2, eval_every=750, eval_batch_size=250,
                  checkpoint_every=200, epoch_checkpoints="on", ddp_comm_hook="bf16", bucket_cap_mb=0.0),
    # A GPU step costs about the same for 16 or 256 samples, so larger batches reach 99% first in wall time; the
    # step count to 99.0% does not depend on the device, so a CPU study ranked the candidates (docs/benchmarks.md,
    # "The cuda recipe's steps to 99.0%"), and launch/gpu_check.sh timed the closest ones on one H200, each
    # stopped at 99.0% (docs/benchmarks.md, "GPU, 2026-11-27"): batch 512 over 4 epochs, evaluating every 20
    # steps, reached 99.0% at step 234 in 0.59 s after the first step, against 0.78 s for batch 256 over 3 epochs
    # (step 440), 0.82 s for 256 evaluating every 20 and 0.96 s for 128 over 2. On CPU, over three seeds, batch
    # 512 reached 99.0% at step 260-280 and ended at 99.12-99.19%; one epoch (`--epochs 1`) reached 98.30-98.36%,
    # above the classic example's 98.22-98.31% that a one-epoch run is compared with (issue 9). Batch 1024 never
    # reached 99.0%.
    # With conv2's bias and ReLU after the pool (model.py) and this recipe at warm-up 0.1, seeds 0 and 1 on CPU:
    # 99.0% at step 300 / 320, 99.14 / 99.13% at the end, 98.35 / 98.33% after `--epochs 1`.
    # Evaluating every 40 steps, not 20: on the H200 an evaluation of the 10,000 test images took 8.5 ms, six
    # steps' worth, and the 13 before 99.0% took 0.14 of the 0.65 s. Every 40 makes 6 or 7 fewer evaluations before
    # 99.0% at step 234 or 280 and sees it at most 20 steps (about 28 ms) later (docs/benchmarks.md, "Evaluations
    # and checkpoints on the GPU"); gpu_check.sh times every 20 beside it. Checkpoints at epoch ends only: an
    # epoch is 0.2 s of a GPU's time, and the cpu recipe's 200 steps put one more pause (30 ms) before 99.0%.
    # Gradients cross NVLink or InfiniBand, where 4.8 MB of fp32 all-reduce is tens of microseconds
    # (docs/cluster.md): no compression, exact fp32 gradients.
    # A warm-up of 0.4 epochs: 0.1 of the steps at the recipe's 4 epochs, 0.4 of a one-epoch run's (`--epochs 1`).
    # On the H200 (2026-11-29) a share of 0.1 reached 99.0% at step 234, 0.37 s after the first step, where 0.2 (the
    # recipe before) took until step 314, 0.53 s (issue 9's bar is 0.5 s). A share of 0.1 of one epoch, though, left
    # `--epochs 1` at 98.33 / 98.35% on CPU (seeds 0 / 1), below the classic example's one epoch on that GPU
    # (98.37%); 0.4 of it gave 98.51 / 98.54% (docs/benchmarks.md, "The cuda recipe's warm-up").
    # No checkpoint between the run's start and its end (a stop still saves one): the whole run is about 0.75 s of
    # the H200's time and 9 s of start-up, so a restart from step 0 loses less than a checkpoint's pause costs, and
    # the two epoch-end checkpoints before 99.0% (step 314) took about 70 ms of its 0.53 s there (run 3).
    "cuda": Recipe(batch_size=512, lr=8e-3, epochs=4, warmup_epochs=0.4, eval_every=40, eval_batch_size=10_000,
                   checkpoint_every=0, epoch_checkpoints="off", ddp_comm_hook="none", bucket_cap_mb=0.0),
}
# The TrainConfig fields (flags) a recipe sets: its own fields, with --warmup-frac for its warm-up in epochs.
RECIPE_FIELDS = tuple("warmup_frac" if f.name == "warmup_epochs" else f.name for f in dataclasses.fields(Recipe))
DEFAULT_RECIPE = RECIPES["cpu"]  # the plain defaults of the flags, so `TrainConfig()` is the CPU recipe


@dataclass(frozen=True)
class AppliedRecipe:
    """Which recipe a run uses, the values it set and the flags given explicitly that override it."""
    name: str
    set: dict[str, Any]
    overridden: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"recipe": self.name, "recipe_values": self.set, "recipe_overridden_by_flags": self.overridden}

    def summary_line(self) -> str:
        values = ", ".join(f"{_flag(k)} {v}" for k, v in self.set.items())
        kept = f"; flags kept: {', '.join(f'{_flag(k)} {v}' for k, v in self.overridden.items())}" \
            if self.overridden else ""
        return f"recipe {self.name} ({values}{kept})"


def recipe_name(requested: str, device_type: str) -> str:
    """`auto` picks the recipe of the device; a named one is used on any device."""
    if requested == "auto":
        return "cuda" if device_type == "cuda" else "cpu"
    if requested not in RECIPES:
        raise UserError(f"--recipe must be auto or one of {', '.join(RECIPES)}, got {requested!r}")
    return requested


def recipe_values(cfg: Any, name: str, explicit: frozenset[str]) -> AppliedRecipe:
    """The recipe's value for every recipe field not in `explicit`; the explicit ones are reported as overrides.
    Its warm-up in epochs becomes --warmup-frac for the run's epochs, the given --epochs or the recipe's."""
    recipe = RECIPES[name].flag_values(cfg.epochs if "epochs" in explicit else None)
    return AppliedRecipe(name=name,
                         set={k: v for k, v in recipe.items() if k not in explicit},
                         overridden={k: getattr(cfg, k) for k in RECIPE_FIELDS if k in explicit})


def value_source(cfg: Any, field: str, device_type: str) -> str:
    """How an error names where a value came from: " (the cuda recipe's)" where the recipe set `field`, "" where a
    flag did: a user who never typed --batch-size 512 must learn what did."""
    return "" if field in cfg.explicit() else f" (the {recipe_name(cfg.recipe, device_type)} recipe's)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
