"""Training configuration: one validated dataclass and the command line built from it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from dist_mnist.errors import UserError
from dist_mnist.recipes import DEFAULT_RECIPE, RECIPE_FIELDS, RECIPES, AppliedRecipe, Recipe, recipe_name, recipe_values

# --timeout-s becomes a C++ duration inside torch.distributed; a week is more than any rendezvous or collective
# should wait, and far from where such a duration overflows.
MAX_TIMEOUT_S = 7 * 24 * 3600
# The shortest wait the ranks can keep: legitimate waits between them (rank 0 measuring the matmul peak, 0.3 s on
# CPU, or writing a checkpoint) take up to a second, and below it a healthy 2-rank run failed as a lost peer (with
# --train-timeout-s 0.001 gloo then aborted a rank with SIGABRT after its error line).
MIN_TIMEOUT_S = 1.0
# DDP turns --bucket-cap-mb into a byte count held in a C++ int64: from 2**43 MiB on its Reducer refused it with a
# TypeError traceback. A bucket larger than the gradient is one bucket, so 1 TiB loses nothing.
MAX_BUCKET_CAP_MB = 2**20
# --peak-tflops is in TFLOP/s: a GPU's dense peak is about 1e3, so 1e6 (an exaFLOP/s per process) is far beyond any
# device, and a value above it is almost surely FLOP/s typed in (989e12 for an H100), which made the MFU read 0.0%;
# past 1.8e296 the FLOP/s overflowed to inf, written into summary.json as Infinity.
MAX_PEAK_TFLOPS = 1e6
# --seed also seeds numpy's global generator, whose legacy seeding takes 0 to 2**32 - 1 and raises past it.
MAX_SEED = 2**32 - 1
# --num-workers: each worker is a Python process with torch loaded (hundreds of MB). 64 on the 2-core CPU held over
# 14 GiB and had not finished 5 steps in 3.5 minutes (a note says so); an unbounded count (a typo, 400 for 4, or
# 10**20) had DataLoader start processes until the machine stalled.
MAX_WORKERS_PER_CPU = 32
# --batch-size, --eval-batch-size and the synthetic set's sizes count samples. 2**31 MNIST images are 1.6 TiB as
# bytes (6.4 TiB in float32, as synthetic data is made and every batch is fed), beyond any machine's memory; larger
# counts ended in tracebacks: an --eval-batch-size from 2**63 at the first evaluation (itertools.islice's limit),
# after the run folder was written, and a synthetic size from 2**62 in torch's size arithmetic.
MAX_SAMPLES = 2**31 - 1


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers, Slurm and taskset narrow), as DataLoader's
    own check counts them; torch's helper for it (torch._utils.cpu_count) is not in every torch we run (2.11)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no CPU affinity
        return os.cpu_count() or 1


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that carries its own `--help` text and argparse options."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")


@dataclass
class TrainConfig:
    # Data
    dataset: str = _opt("mnist", "mnist: the real IDX files; synthetic: deterministic MNIST-shaped data for smoke runs",
                        choices=["mnist", "synthetic"])
    data_dir: str = _opt(os.environ.get("DIST_MNIST_DATA", "./data"),
                         "folder holding MNIST/raw/<four IDX files>, relative to the current directory; "
                         "$DIST_MNIST_DATA sets the default, else ./data")
    no_download: bool = _opt(False, "never download MNIST; fail with a clear error when the files are missing")
    synthetic_train_size: int = _opt(60_000, "training samples made by --dataset synthetic (at most 2**31 - 1)")
    synthetic_test_size: int = _opt(10_000, "test samples made by --dataset synthetic (at most 2**31 - 1)")
    num_workers: int = _opt(0, "DataLoader worker processes per rank, for training and as many for evaluation "
                               "(spawned once per run; the dataset reaches them through /dev/shm; more on a host "
                               f"than its CPUs draw a note, more than {MAX_WORKERS_PER_CPU} per CPU are "
                               "refused); batches are sliced from decoded tensors, so 0 is fastest on CPU "
                               "(measured, see docs/benchmarks.md)")
    data_on_device: str = _opt("auto", "keep the whole decoded dataset, training and test splits (55 MB), on the GPU "
                                       "and slice batches there; auto: on with CUDA unless --num-workers > 0; on: "
                                       "refused without CUDA",
                               choices=["auto", "on", "off"])

    # Model and recipe
    recipe: str = _opt("auto", "named settings for --batch-size, --lr, --epochs, --warmup-frac, --eval-every, "
                               "--eval-batch-size, --checkpoint-every, --epoch-checkpoints, --ddp-comm-hook and "
                               "--bucket-cap-mb "
                               "(README, 'Recipe'); flags "
                               "given explicitly win. auto: the recipe of the device the run resolves to. The "
                               "defaults shown are the cpu recipe's",
                       choices=["auto", *RECIPES])
    epochs: int = _opt(DEFAULT_RECIPE.epochs, "passes over the training set")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: no limit); for smoke runs")
    batch_size: int = _opt(DEFAULT_RECIPE.batch_size,
                           "training batch size PER PROCESS; the global batch is this times the world size (and "
                           "--grad-accum-steps). Small global batches reach a given accuracy in fewer epochs, larger "
                           "ones run faster per sample but need more epochs (README, 'Recipe and accuracy'); at most "
                           "2**31 - 1")
    eval_batch_size: int = _opt(DEFAULT_RECIPE.eval_batch_size, "evaluation batch size per process (at most "
                                                                "2**31 - 1)")
    lr: float = _opt(DEFAULT_RECIPE.lr, "peak learning rate of the warm-up + cosine schedule (AdamW)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_frac: float = _opt(DEFAULT_RECIPE.warmup_frac(DEFAULT_RECIPE.epochs),
                              "share of all steps spent warming the learning rate up to --lr. Left out, the recipe's "
                              "warm-up, a length in epochs, sets it for the run's --epochs (given or the recipe's)")
    label_smoothing: float = _opt(0.1, "label smoothing of the training loss (evaluation loss is plain)")
    grad_clip: float = _opt(0.0, "clip the global gradient norm to this value (0: off); with fp16 the gradients "
                                 "are unscaled first")
    grad_accum_steps: int = _opt(1, "micro-batches of --batch-size per optimizer step (gradient accumulation): the "
                                    "global batch is batch x world size x this; DDP all-reduces only on the last "
                                    "micro-batch (no_sync), and the LR schedule counts optimizer steps")
    seed: int = _opt(0, f"seed for weights, dropout and the data order (0 to {MAX_SEED})")
    deterministic: bool = _opt(False, "use only deterministic kernels (torch.use_deterministic_algorithms)")
    stop_at_accuracy: float = _opt(0.0, "stop, save a checkpoint and report once an evaluation's test accuracy "
                                        "reaches this fraction, e.g. 0.99 (0: off)")

    # Speed
    amp: str = _opt("auto", "mixed precision. auto: bf16 where the hardware runs it natively (CPUs with AVX512-BF16/"
                            "AMX, CUDA GPUs from Ampere on), fp16 with a GradScaler on older GPUs, off elsewhere",
                    choices=["auto", "off", "bf16", "fp16"])
    channels_last: str = _opt("auto", "NHWC memory format for the convolutions; auto: on, on every device (on CPU it "
                                      "was faster in fp32 and in bf16: docs/benchmarks.md)",
                              choices=["auto", "on", "off"])
    compile: bool = _opt(False, "torch.compile the model. Off by default: this small CNN ran slower compiled than "
                                "eager on an H100 (125k vs 149k samples/s at batch 512, compile time aside) and on a "
                                "2-core CPU, where compiling took 10-20 s (docs/benchmarks.md); on one GPU the "
                                "default captures CUDA graphs instead")
    compile_mode: str = _opt("default", "torch.compile mode",
                             choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    compile_backend: str = _opt("inductor", "torch.compile backend; eager and aot_eager only check the wiring",
                                choices=["inductor", "aot_eager", "eager"])
    cuda_graphs: str = _opt("auto", "capture the whole training step (forward, backward, AdamW, learning rate) in "
                                    "one CUDA graph and replay it. auto: on with CUDA where it applies (one "
                                    "process, no fp16 GradScaler, no --compile, no gradient accumulation), else "
                                    "eager with a note",
                            choices=["auto", "on", "off"])
    threads: int = _opt(0, "intra-op CPU threads per process, at most the machine's CPU count (0: torch's "
                           "default, which torchrun sets to 1 when it starts 2+ processes per host and "
                           "OMP_NUM_THREADS is unset)")

    # Distributed
    backend: str = _opt("auto", "process-group backend; auto: nccl on CUDA with 2+ processes, else gloo (a process "
                                "on its own exchanges nothing; nccl's set-up took 6 s on an H200)",
                        choices=["auto", "nccl", "gloo"])
    device: str = _opt("auto", "auto: CUDA when available, else CPU", choices=["auto", "cpu", "cuda"])
    ddp_comm_hook: str = _opt(
        DEFAULT_RECIPE.ddp_comm_hook, "DDP communication hook (torch.distributed.algorithms.ddp_comm_hooks): none "
        "(fp32 all-reduce), bf16 or fp16 (gradients sent in half precision), powersgd (low-rank compression after "
        "the LR warm-up; state saved in checkpoints; on gloo all gradients go into one bucket)",
        choices=list(COMM_HOOKS))
    bucket_cap_mb: float = _opt(DEFAULT_RECIPE.bucket_cap_mb, "DDP gradient bucket size in MiB (0: torch's default, "
                                                             "25 MiB with a 1 MiB first bucket); given, it also "
                                                             "caps the first bucket; at most 1 TiB")
    timeout_s: float = _opt(300.0, "seconds the start-up may wait for the other ranks (rendezvous, the download, "
                                   "torch.compile and everything else up to the end of the first step); 1 s to a week")
    train_timeout_s: float = _opt(100.0, "seconds a collective may wait for the other ranks after the first step; "
                                         "a hung or lost peer ends the job this long after it stopped; 1 s to a week")

    # Evaluation, logging and run output
    eval_every: int = _opt(DEFAULT_RECIPE.eval_every,
                           "also evaluate once N optimizer steps have passed since the last evaluation (each "
                           "epoch's end evaluates and restarts the count; 0: only at the end of each epoch)")
    log_every: int = _opt(50, "print progress (percent, elapsed, ETA, samples/s) every N optimizer steps, rank 0 "
                              "only: one line each when stdout is not a terminal, updated in place on one")
    output_dir: str = _opt("profiles", "root folder for run output, relative to the current directory")
    run_name: str = _opt("", "run folder name inside --output-dir (default: the start's timestamp, with -2, -3, ... "
                             "where that folder exists; under torchrun, stable across restarts of the same job)")
    tensorboard: bool = _opt(True, "write TensorBoard scalars into the run folder (--no-tensorboard to skip)")

    # Profiling
    profile: bool = _opt(False, "record torch.profiler traces of a few steps on every rank")
    profile_wait: int = _opt(5, "profiler schedule: steps to skip before each window")
    profile_warmup: int = _opt(2, "profiler schedule: warm-up steps per window (recorded, then discarded)")
    profile_active: int = _opt(3, "profiler schedule: steps recorded per window")
    profile_repeat: int = _opt(1, "profiler schedule: number of windows (0: until training ends)")
    profile_memory: bool = _opt(False, "record tensor allocations in the traces (bigger traces)")
    profile_shapes: bool = _opt(False, "record operator input shapes in the traces")
    profile_stack: bool = _opt(False, "record Python stacks in the traces (much bigger traces)")
    cuda_memory_snapshot: bool = _opt(False, "CUDA only: dump a memory snapshot, the allocator's last 100,000 events "
                                             "with Python stacks (view at pytorch.org/memory_viz)")
    peak_tflops: float = _opt(0.0, "peak TFLOP/s (not FLOP/s) per process for the MFU figure, at most "
                                     f"{MAX_PEAK_TFLOPS:g} (0: measure a matmul peak)")
    phase_timers: str = _opt("auto", "per-phase step timers behind summary.json's phase shares: every step, every "
                                     "Nth step (--phase-timer-every), or off; auto: every step on CPU, sampled on "
                                     "CUDA (a CUDA event per phase of a timed step)",
                             choices=["auto", "every", "sample", "off"])
    phase_timer_every: int = _opt(20, "with sampled phase timers: time every Nth step (on CUDA a step right after a "
                                      "pause that waited for the GPU passes it on to the next)")

    # Checkpoints and fault tolerance
    checkpoint_every: int = _opt(DEFAULT_RECIPE.checkpoint_every,
                                 "save a checkpoint every N optimizer steps (0: none between epoch ends)")
    epoch_checkpoints: str = _opt(DEFAULT_RECIPE.epoch_checkpoints,
                                  "save a checkpoint at each epoch's end too; off: only every --checkpoint-every "
                                  "steps, at the run's end and when it stops early",
                                  choices=["on", "off"])
    checkpoint_dir: str = _opt("", "where checkpoints go (default: <run folder>/checkpoints)")
    keep_checkpoints: int = _opt(2, "how many of the newest checkpoints to keep")
    resume: str = _opt("auto", "auto: continue from the run's newest valid checkpoint if any; never: start fresh; "
                               "or a path to a checkpoint file")

    # Not a flag: the fields the command line set explicitly (None: built in code, where every value that differs
    # from the default counts as explicit), so a recipe never overrides what the user asked for.
    explicit_flags: tuple[str, ...] | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        # A shell expands ~ in `--output-dir ~/runs` but not in `--output-dir=~/runs` (nor in a quoted path or
        # $DIST_MNIST_DATA="~/data"), and Path does not: the run then went into a folder named "~" under the
        # working directory. The paths are expanded here, as the shell would have.
        for name in ("data_dir", "output_dir", "checkpoint_dir"):
            setattr(self, name, os.path.expanduser(getattr(self, name)))
        if self.resume not in ("auto", "never"):
            self.resume = os.path.expanduser(self.resume)
        for f in dataclasses.fields(self):
            # nan passes every comparison below, and inf overflows the timedelta of --timeout-s.
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"--{_flag(f.name)} must be a finite number, got {getattr(self, f.name)}")
        positive = ["epochs", "batch_size", "eval_batch_size", "log_every", "synthetic_train_size",
                    "synthetic_test_size", "keep_checkpoints", "profile_active", "phase_timer_every",
                    "grad_accum_steps"]
        non_negative = ["max_steps", "num_workers", "eval_every", "checkpoint_every", "threads", "profile_wait",
                        "profile_warmup", "profile_repeat", "grad_clip", "weight_decay", "peak_tflops",
                        "bucket_cap_mb"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size", "synthetic_train_size", "synthetic_test_size"):
            if getattr(self, name) > MAX_SAMPLES:
                raise UserError(f"--{_flag(name)} must be at most {MAX_SAMPLES} (2**31 - 1 samples, more than any "
                                f"machine's memory holds), got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.lr * self.weight_decay >= 1:
            # AdamW multiplies every weight by 1 - lr x weight_decay each step: from 1 on it zeroes or flips them, and
            # --weight-decay 1e30 ended in "training loss became non-finite ... Lower --lr, or use --grad-clip".
            raise UserError(f"--weight-decay {self.weight_decay:g} with --lr {self.lr:g} would shrink every weight to "
                            "zero or past it at each step (AdamW multiplies them by 1 - lr x weight decay): their "
                            "product must be below 1")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.warmup_frac < 1:
            raise UserError(f"--warmup-frac must be in [0, 1), got {self.warmup_frac}")
        for name in ("timeout_s", "train_timeout_s"):
            if not MIN_TIMEOUT_S <= getattr(self, name) <= MAX_TIMEOUT_S:
                raise UserError(f"--{_flag(name)} must be at least {MIN_TIMEOUT_S:g} and at most {MAX_TIMEOUT_S} "
                                f"(a week), got {getattr(self, name)}")
        if self.bucket_cap_mb > MAX_BUCKET_CAP_MB:
            raise UserError(f"--bucket-cap-mb must be at most {MAX_BUCKET_CAP_MB} (1 TiB; 0: torch's default), "
                            f"got {self.bucket_cap_mb}")
        if self.peak_tflops > MAX_PEAK_TFLOPS:
            raise UserError(f"--peak-tflops must be at most {MAX_PEAK_TFLOPS:g} (TFLOP/s per process, not FLOP/s), "
                            f"got {self.peak_tflops:g}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        if not 0 <= self.stop_at_accuracy <= 1:
            # A value up to 100 is almost surely a percentage, as the evaluation lines print accuracy.
            hint = (f"; for {self.stop_at_accuracy:g}% give {self.stop_at_accuracy / 100:g}"
                    if 1 < self.stop_at_accuracy <= 100 else "")
            raise UserError(f"--stop-at-accuracy must be in (0, 1] (0: off), got {self.stop_at_accuracy}{hint}")
        # An empty path is no folder or file: Path("") is the current directory, so --output-dir "" wrote runs
        # there, and --resume "" was read as a checkpoint file named ".".
        if not self.resume:
            raise UserError("--resume must be auto, never or the path of a checkpoint file, got ''")
        if not self.output_dir:
            raise UserError("--output-dir must name a folder, got ''")
        if self.dataset == "mnist" and not self.data_dir:
            raise UserError("--data-dir (default: $DIST_MNIST_DATA) must name a folder, got ''")
        if self.run_name and (os.sep in self.run_name or self.run_name in {".", ".."}):
            raise UserError(f"--run-name must be a plain folder name, got {self.run_name!r}")
        cpus = os.cpu_count() or 1
        if self.threads > cpus:
            # More threads than CPUs only slow a step down, and past the thread limit torch crashed on the first
            # process group (a segmentation fault after "Resource temporarily unavailable").
            raise UserError(f"--threads must be at most this machine's {cpus} CPUs, got {self.threads} "
                            "(0: torch's default)")
        usable = usable_cpus()
        if self.num_workers > MAX_WORKERS_PER_CPU * usable:
            # More workers than CPUs is only a note (data.worker_count_note); a count this far past them is a typo
            # (400 for 4) or worse, and DataLoader would start every one: the machine runs out of memory first.
            raise UserError(f"--num-workers must be at most {MAX_WORKERS_PER_CPU * usable} ({MAX_WORKERS_PER_CPU} "
                            f"per CPU this process may run on, {usable}), got {self.num_workers}: each worker is a "
                            "process with torch loaded (0 loads in the training process, the fastest on CPU)")
        if self.data_on_device == "on" and self.num_workers > 0:
            raise UserError("--data-on-device on slices batches on the GPU; it cannot use --num-workers > 0")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "explicit_flags"}

    def explicit(self) -> frozenset[str]:
        if self.explicit_flags is not None:
            return frozenset(self.explicit_flags)
        return frozenset(f.name for f in dataclasses.fields(self)
                         if f.metadata.get("cli", True) and getattr(self, f.name) != f.default)

    def given_flags(self, *names: str) -> list[str]:
        """The flags among `names` (field names) the command line gave, spelled as flags (--data-dir). A switch
        given as off (--no-profile-memory) asks for nothing, so it is left out."""
        explicit = self.explicit()
        return [f"--{_flag(n)}" for n in names if n in explicit and getattr(self, n) is not False]


@dataclass(frozen=True)
class RecipeResolution:
    config: TrainConfig  # with the recipe's values filled in
    recipe: AppliedRecipe


def apply_recipe(cfg: TrainConfig, device_type: str) -> RecipeResolution:
    """Fill in the recipe of `cfg.recipe` (auto: of `device_type`) for every recipe flag not given explicitly."""
    applied = recipe_values(cfg, recipe_name(cfg.recipe, device_type), cfg.explicit())
    return RecipeResolution(dataclasses.replace(cfg, **applied.set), applied)


def _flag(name: str) -> str:
    return name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse whose command-line errors (an unknown flag, a value of the wrong type or not among the choices) are
    UserErrors: main prints them as every other bad input, one `error: ...` line and exit code 1, where argparse
    printed its usage and exited with 2, a code README's exit codes do not have."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help says it in words ("(default: a timestamp ...)") or there
    is none to show (None, ''). The launcher's and the bench's."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or "") or action.default in (None, ""):
            return action.help
        return super()._get_help_string(action)


class RawDescriptionDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """The module docstring's layout kept, and each option's default shown as the launcher's --help shows it: the
    bench's, commmodel's and gpucheck's."""


def _recipe_help(name: str, help: str) -> str:
    """A recipe-managed flag's help: the cpu recipe's value is its plain default; the other recipes' stand beside it,
    as a run on their device uses them (`--checkpoint-every ... (default: 200)` read on a GPU, which gets 0)."""
    if name == "warmup_frac":
        # A share that follows --epochs: each recipe's warm-up in epochs, and the share at its own epochs.
        others = "; ".join(f"{recipe} recipe: {_warmup(values)}" for recipe, values in RECIPES.items())
    else:
        others = "; ".join(f"{recipe} recipe: {getattr(values, name)}" for recipe, values in RECIPES.items()
                           if values != DEFAULT_RECIPE)
    return f"{help} (default: %(default)s; {others})"


def _warmup(recipe: Recipe) -> str:
    """A recipe's warm-up as --help gives it: "0.4 epochs' worth (0.1 at 4 epochs)"."""
    return f"{recipe.warmup_epochs:g} epochs' worth ({recipe.warmup_frac(recipe.epochs):g} at {recipe.epochs} epochs)"


def _prog() -> str:
    """How the user started training, for the usage line: `python -m dist_mnist` (an installed package; Python sets
    argv[0] to the package's __main__.py) or the checkout's launcher."""
    return "python -m dist_mnist" if Path(sys.argv[0]).name == "__main__.py" else "launch/train.py"


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command line; with `suppress_defaults` a flag left out is absent from the result (explicit-flag check)."""
    prog = _prog()
    torchrun_target = "-m dist_mnist" if prog.startswith("python -m") else prog
    one = prog if prog.startswith("python") else f"python {prog}"
    parser = _Parser(
        prog=prog,
        description="Train the MNIST CNN with DistributedDataParallel. Run as `torchrun --nproc_per_node=N "
                    f"{torchrun_target}` for N processes, or `{one}` for a world of one.",
        formatter_class=DefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        kwargs = {k: v for k, v in f.metadata.items() if k != "cli"}
        if f.name in RECIPE_FIELDS:
            kwargs["help"] = _recipe_help(f.name, kwargs["help"])
        if f.type == "bool":
            # --no-download is itself a negation; the other switches get a --no-X form.
            kwargs["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
        else:
            # `from __future__ import annotations` leaves every field's type as its source text.
            assert isinstance(f.type, str)
            kwargs["type"] = {"int": int, "float": float, "str": str}[f.type]
        default = argparse.SUPPRESS if suppress_defaults else f.default
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, default=default, **kwargs)
    return parser


# Flags that only mean something under another flag's value: (the dependent flags, whether that value is set, what
# to add). Given without it, each used to be ignored without a word (a --profile-wait without --profile recorded
# nothing; --compile-mode without --compile compiled nothing).
_DEPENDENT_FLAGS: tuple[tuple[tuple[str, ...], Callable[[TrainConfig], bool], str], ...] = (
    (("profile_wait", "profile_warmup", "profile_active", "profile_repeat", "profile_memory", "profile_shapes",
      "profile_stack"), lambda cfg: cfg.profile, "--profile"),
    (("compile_backend",), lambda cfg: cfg.compile, "--compile"),
    # Only inductor reads a mode: the eager and aot_eager backends drop it with a warning of torch's.
    (("compile_mode",), lambda cfg: cfg.compile and cfg.compile_backend == "inductor",
     "--compile on the inductor backend (--compile-backend's default)"),
    (("phase_timer_every",), lambda cfg: cfg.phase_timers in ("sample", "auto"),
     "--phase-timers sample (or auto, sampled on CUDA)"),
    (("synthetic_train_size", "synthetic_test_size"), lambda cfg: cfg.dataset == "synthetic", "--dataset synthetic"),
)


def _refuse_flags_without_effect(cfg: TrainConfig) -> None:
    """Command-line flags given without the flag they depend on. Only what the command line gave: code (the
    benchmarks) builds configs with schedule values whose --profile it switches per measurement."""
    for names, applies, needs in _DEPENDENT_FLAGS:
        given = cfg.given_flags(*names)
        if given and not applies(cfg):
            listed = " and ".join(given)
            raise UserError(f"{listed} {'has' if len(given) == 1 else 'have'} no effect without {needs}; "
                            f"add it or drop {listed}")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a validated config; bad values raise UserError."""
    # The parser with defaults first: it answers --help, and the one without them would show none.
    given = vars(build_parser().parse_args(argv))
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    cfg = TrainConfig(**given, explicit_flags=tuple(sorted(explicit)))
    _refuse_flags_without_effect(cfg)
    return cfg
