"""Training configuration: one validated dataclass and the command line built from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from dist_mnist.errors import UserError


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that carries its own `--help` text and argparse options."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")

# ---------------------------------------------------------------------------------------------------------------
# The CPU recipe: the defaults with which 2 ranks x 1 thread on the project's 2-core CPU reach 99.0% test accuracy
# soonest (issue 12; figures in docs/benchmarks.md). Kept in one block so a named-recipe mechanism can take them
# over as they are; the fields below read their defaults from here.
CPU_RECIPE: dict[str, Any] = {
    "batch_size": 16,  # per process: global 32, the largest that still reaches 98.9% in one epoch (README, Recipe)
    "lr": 2e-3,
    "epochs": 2,  # 99.0% needs a second epoch at this batch
    "warmup_frac": 0.1,
    # Evaluations count in the time to accuracy (about 0.7 s each for 10,000 images on 2 ranks), and 99.0% comes
    # within the second epoch: every 750 steps (0.4 epoch at 2 x 16) sees it without evaluating often.
    "eval_every": 750,
    "ddp_comm_hook": "bf16",  # half the bytes of an fp32 all-reduce at unchanged accuracy
    "bucket_cap_mb": 0.0,  # torch's default buckets (a 1 MiB first bucket overlaps with backward)
}


@dataclass
class TrainConfig:
    # Data
    dataset: str = _opt("mnist", "mnist: the real IDX files; synthetic: deterministic MNIST-shaped data for smoke runs",
                        choices=["mnist", "synthetic"])
    data_dir: str = _opt(os.environ.get("DIST_MNIST_DATA", "./data"),
                         "folder holding MNIST/raw/<four IDX files> (default: $DIST_MNIST_DATA, else ./data)")
    no_download: bool = _opt(False, "never download MNIST; fail with a clear error when the files are missing")
    synthetic_train_size: int = _opt(60_000, "training samples made by --dataset synthetic")
    synthetic_test_size: int = _opt(10_000, "test samples made by --dataset synthetic")
    num_workers: int = _opt(0, "DataLoader worker processes per rank (spawned once per run; the dataset reaches "
                               "them through /dev/shm); batches are sliced from decoded tensors, so 0 is fastest "
                               "on CPU (measured, see docs/benchmarks.md)")
    data_on_device: str = _opt("auto", "keep the whole decoded dataset (47 MB) on the GPU and slice batches there; "
                                       "auto: on with CUDA", choices=["auto", "on", "off"])

    # Model and recipe
    epochs: int = _opt(CPU_RECIPE["epochs"], "passes over the training set")
    max_steps: int = _opt(0, "stop after this many optimizer steps (0: no limit); for smoke runs")
    batch_size: int = _opt(
        CPU_RECIPE["batch_size"], "training batch size PER PROCESS; the global batch is this times the world size "
        "(and --grad-accum-steps). Small global batches reach 98.8%% in one epoch and 99%% in two; larger ones run "
        "faster per sample but need more epochs (README, 'Recipe')")
    eval_batch_size: int = _opt(1000, "evaluation batch size per process")
    lr: float = _opt(CPU_RECIPE["lr"], "peak learning rate of the warm-up + cosine schedule (AdamW)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_frac: float = _opt(CPU_RECIPE["warmup_frac"],
                              "share of all steps spent warming the learning rate up to --lr")
    label_smoothing: float = _opt(0.1, "label smoothing of the training loss (evaluation loss is plain)")
    grad_clip: float = _opt(0.0, "clip the global gradient norm to this value (0: off); with fp16 the gradients "
                                 "are unscaled first")
    grad_accum_steps: int = _opt(1, "micro-batches of --batch-size per optimizer step (gradient accumulation): the "
                                    "global batch is batch x world size x this; DDP all-reduces only on the last "
                                    "micro-batch (no_sync), and the LR schedule counts optimizer steps")
    seed: int = _opt(0, "seed for weights, dropout and the data order")
    deterministic: bool = _opt(False, "use only deterministic kernels (torch.use_deterministic_algorithms)")

    # Speed
    amp: str = _opt("auto", "mixed precision. auto: bf16 where the hardware runs it natively (CPUs with AVX512-BF16/"
                            "AMX, CUDA GPUs from Ampere on), fp16 with a GradScaler on older GPUs, off elsewhere",
                    choices=["auto", "off", "bf16", "fp16"])
    channels_last: str = _opt("auto", "NHWC memory format for the convolutions; auto: on (measured faster on CPU "
                                      "with bf16 and on CUDA)", choices=["auto", "on", "off"])
    compile: bool = _opt(False, "torch.compile the model. Pays on CUDA for long runs; on a 2-core CPU the classic "
                                "CNN ran slower than eager and compiling took 10-20 s (docs/benchmarks.md)")
    compile_mode: str = _opt("default", "torch.compile mode",
                             choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    compile_backend: str = _opt("inductor", "torch.compile backend; eager and aot_eager only check the wiring",
                                choices=["inductor", "aot_eager", "eager"])
    threads: int = _opt(0, "intra-op CPU threads per process (0: torch's default; torchrun sets OMP_NUM_THREADS=1)")

    # Distributed
    backend: str = _opt("auto", "process-group backend; auto: nccl on CUDA, gloo on CPU",
                        choices=["auto", "nccl", "gloo"])
    device: str = _opt("auto", "auto: CUDA when available, else CPU", choices=["auto", "cpu", "cuda"])
    ddp_comm_hook: str = _opt(
        CPU_RECIPE["ddp_comm_hook"], "DDP communication hook (torch.distributed.algorithms.ddp_comm_hooks): none "
        "(fp32 all-reduce), bf16 or fp16 (gradients sent in half precision), powersgd (low-rank compression after "
        "the LR warm-up; state saved in checkpoints; on gloo all gradients go into one bucket)",
        choices=list(COMM_HOOKS))
    bucket_cap_mb: float = _opt(CPU_RECIPE["bucket_cap_mb"], "DDP gradient bucket size in MiB (0: torch's default, "
                                                             "25 MiB with a 1 MiB first bucket); given, it also caps "
                                                             "the first bucket")
    timeout_s: float = _opt(300.0, "seconds a rendezvous or collective may wait before the job fails")

    # Evaluation, logging and run output
    eval_every: int = _opt(CPU_RECIPE["eval_every"],
                           "also evaluate every N optimizer steps (0: only at the end of each epoch)")
    log_every: int = _opt(50, "print progress every N optimizer steps (rank 0 only)")
    output_dir: str = _opt("profiles", "root folder for run output")
    run_name: str = _opt("", "run folder name inside --output-dir (default: a timestamp; under torchrun, stable "
                             "across restarts of the same job)")
    tensorboard: bool = _opt(True, "write TensorBoard scalars next to the traces (--no-tensorboard to skip)")

    # Profiling
    profile: bool = _opt(False, "record torch.profiler traces of a few steps on every rank")
    profile_wait: int = _opt(5, "profiler schedule: steps to skip before each window")
    profile_warmup: int = _opt(2, "profiler schedule: warm-up steps per window (recorded, then discarded)")
    profile_active: int = _opt(3, "profiler schedule: steps recorded per window")
    profile_repeat: int = _opt(1, "profiler schedule: number of windows (0: until training ends)")
    profile_memory: bool = _opt(False, "record tensor allocations in the traces (bigger traces)")
    profile_shapes: bool = _opt(False, "record operator input shapes in the traces")
    profile_stack: bool = _opt(False, "record Python stacks in the traces (much bigger traces)")
    cuda_memory_snapshot: bool = _opt(False, "CUDA only: dump a memory snapshot (view at pytorch.org/memory_viz)")
    peak_tflops: float = _opt(0.0, "peak TFLOP/s per process for the MFU figure (0: measure a matmul peak)")

    # Checkpoints and fault tolerance
    checkpoint_every: int = _opt(200, "save a checkpoint every N optimizer steps (0: only at epoch ends)")
    checkpoint_dir: str = _opt("", "where checkpoints go (default: <run folder>/checkpoints)")
    keep_checkpoints: int = _opt(2, "how many of the newest checkpoints to keep")
    resume: str = _opt("auto", "auto: continue from the run's newest valid checkpoint if any; never: start fresh; "
                               "or a path to a checkpoint file")

    def __post_init__(self) -> None:
        positive = ["epochs", "batch_size", "eval_batch_size", "log_every", "synthetic_train_size",
                    "synthetic_test_size", "keep_checkpoints", "profile_active", "grad_accum_steps"]
        non_negative = ["max_steps", "num_workers", "eval_every", "checkpoint_every", "threads", "profile_wait",
                        "profile_warmup", "profile_repeat", "grad_clip", "weight_decay", "peak_tflops",
                        "bucket_cap_mb"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.warmup_frac < 1:
            raise UserError(f"--warmup-frac must be in [0, 1), got {self.warmup_frac}")
        if not self.timeout_s > 0:
            raise UserError(f"--timeout-s must be positive, got {self.timeout_s}")
        if self.run_name and (os.sep in self.run_name or self.run_name in {".", ".."}):
            raise UserError(f"--run-name must be a plain folder name, got {self.run_name!r}")
        if self.data_on_device == "on" and self.num_workers > 0:
            raise UserError("--data-on-device on slices batches on the GPU; it cannot use --num-workers > 0")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train the MNIST CNN with DistributedDataParallel. Run as `torchrun --nproc_per_node=N "
                    "launch/train.py` for N processes, or `python launch/train.py` for a world of one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        kwargs = {k: v for k, v in f.metadata.items()}
        if f.type == "bool":
            # --no-download is itself a negation; the other switches get a --no-X form.
            kwargs["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[f.type]
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, default=f.default, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line into a validated config; bad values raise UserError."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))
