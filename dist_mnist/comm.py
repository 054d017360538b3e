"""DDP gradient communication: the comm hook chosen by --ddp-comm-hook, wrapped so that every bucket's all-reduce
is timed and its bytes counted, and the hook's own state (PowerSGD's) saved in checkpoints.

Timing per step, from marks taken by the wrapper (perf_counter on CPU; on CUDA, events on the current stream, read
only when the step timer drains, so there is no host sync per step):
- a bucket's all-reduce starts when DDP hands the bucket to the hook (its gradients are ready) and completes when
  the hook's future completes (marked in a `.then()` callback);
- `seconds`: the time at least one bucket was in flight (the union of the buckets' intervals);
- `exposed_s`: from the start of the last bucket to start (when backward compute has produced the last gradient)
  to the completion of the last bucket to complete: the time the step waited for communication after its own
  compute was done. A rank that is late makes the others wait here;
- overlapped = seconds - exposed_s: communication hidden behind backward compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_mnist.checkpoint import numpy_parts, numpy_state
from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext
from dist_mnist.errors import UserError
from dist_mnist.metrics import Marks, StepSample, seconds_between

# PowerSGD: rank-2 factors, error feedback and warm start (torch's recommended settings); compression starts after
# the learning-rate warm-up, when gradients have settled (torch's advice for start_powerSGD_iter).
POWERSGD_RANK = 2
POWERSGD_MIN_START = 2  # torch's minimum with error feedback and warm start


@dataclass
class BucketRecord:
    """One bucket's all-reduce in one step."""
    start: Any  # mark (metrics.Marks) when DDP handed the bucket to the hook
    nbytes: int  # bytes this rank sent into the collective(s) for the bucket
    end: Any = None  # mark when its future completed


@dataclass
class CommStep:
    """The gradient communication of one optimizer step on this rank."""
    seconds: float  # time at least one bucket was in flight
    exposed_s: float  # time the step waited for communication after backward compute ended
    nbytes: int  # bytes all-reduced
    buckets: int

    @property
    def overlapped_s(self) -> float:
        return self.seconds - self.exposed_s


def resolve_step(records: list[BucketRecord]) -> CommStep:
    """A step's figures from its bucket records (see the module docstring)."""
    if not records:
        return CommStep(0.0, 0.0, 0, 0)
    origin = records[0].start
    spans = sorted((seconds_between(origin, r.start), seconds_between(origin, r.end)) for r in records)
    busy, covered_to = 0.0, float("-inf")
    for start, end in spans:
        busy += max(0.0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    last_start = max(start for start, _ in spans)
    return CommStep(seconds=busy, exposed_s=max(0.0, covered_to - last_start),
                    nbytes=sum(r.nbytes for r in records), buckets=len(records))


class PowerSGDHookState:
    """PowerSGD's state, kept in the layout of DDP's current buckets, and saved in checkpoints.

    PowerSGD keeps per bucket a flat error-feedback residual and flat P and Q factors, laid out in the order of the
    bucket's parameters. DDP builds its buckets in one order and rebuilds them after the first step in the order
    gradients became ready, so a process that resumes starts with another layout: `align` moves the state into the
    layout of the bucket at hand whenever the order changed. The residuals differ per rank (each holds what
    compression dropped from its own gradients), so `state_dict()` gathers every rank's: it is a collective and
    must be called on every rank. Checkpointed as tensors, ints, floats and dicts: weights_only-loadable.
    """

    def __init__(self, module: nn.Module, ctx: DistContext, start_iter: int) -> None:
        self.state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=POWERSGD_RANK,
            start_powerSGD_iter=max(POWERSGD_MIN_START, start_iter), random_seed=0)
        self.ctx = ctx
        self.params = list(module.parameters())
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.orders: dict[int, list[int]] = {}  # bucket index -> its parameters' indices, in layout order

    def _pieces(self, order: list[int]) -> list[tuple[int, int, int]]:
        """(residual, P, Q) elements of each parameter of a bucket, as the hook lays them out."""
        pieces = []
        for i in order:
            numel, n = self.params[i].numel(), self.params[i].shape[0]
            m = numel // n
            rank = min(n, m, self.state.matrix_approximation_rank)
            compressed = powerSGD_hook._should_compress(n, m, rank, self.state.min_compression_rate)[0]
            pieces.append((numel, n * rank if compressed else 0, m * rank if compressed else 0))
        return pieces

    def align(self, bucket: dist.GradBucket) -> None:
        """Move the bucket's residual and factors into its current parameter order."""
        index = bucket.index()
        order = [self._index[id(p)] for p in bucket.parameters()]
        old = self.orders.get(index)
        self.orders[index] = order
        if old is None or old == order:
            return
        old_pieces = dict(zip(old, self._pieces(old)))
        s = self.state
        for which, store in enumerate((s.error_dict, s.p_memory_dict, s.q_memory_dict)):
            if index in store:
                parts = dict(zip(old, store[index].split([old_pieces[i][which] for i in old])))
                store[index] = torch.cat([parts[i] for i in order])

    def _local(self) -> dict[str, Any]:
        s = self.state
        keys, pos, has_gauss, cached = numpy_parts(s.rng.get_state())
        # On the host: every rank unpickles every other rank's part of the gather, and a CUDA tensor comes back on
        # the GPU it left (rank 0 made a context on rank 1's GPU, or failed where each process sees its own only).
        host = torch.device("cpu")
        return {"iter": s.iter, "orders": dict(self.orders), "error": _tensors_to(s.error_dict, host),
                "p": _tensors_to(s.p_memory_dict, host), "q": _tensors_to(s.q_memory_dict, host),
                "rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                        "cached_gaussian": cached},
                "numel_before": s.total_numel_before_compression, "numel_after": s.total_numel_after_compression,
                "next_stats_report": s.next_stats_report}

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ctx.gather_objects(self._local())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks")
        if not isinstance(ranks, list) or not ranks:
            raise ValueError(f"its ranks are {str(ranks)[:60]}, not a list of one state per process")

        def whole(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        # Each rank's saved state (_local) in the types and sizes the hook and `align` use it in: a residual or a
        # factor of another size than its bucket's parameters failed the first compressed step (or `align`), a
        # traceback in the training loop. Every rank's, on every rank: all of them refuse it, or none. A ValueError
        # names what is wrong; the resume words it as one line.
        for number, saved in enumerate(ranks):
            name = f"ranks[{number}]"
            if not isinstance(saved, dict):
                raise ValueError(f"{name} is not a dict")
            for key in ("iter", "numel_before", "numel_after", "next_stats_report"):
                if not whole(saved.get(key)):
                    raise ValueError(f"{name}.{key} is {str(saved.get(key))[:40]}, not a whole number >= 0")
            orders = saved.get("orders")
            if not isinstance(orders, dict) or not all(
                    whole(index) and isinstance(order, list) and order and all(whole(i) for i in order)
                    and max(order) < len(self.params) and len(set(order)) == len(order)
                    for index, order in orders.items()):
                raise ValueError(f"{name}.orders is not a dict of bucket numbers to lists of parameter numbers")
            for which, key in enumerate(("error", "p", "q")):
                store = saved.get(key)
                if not isinstance(store, dict):
                    raise ValueError(f"{name}.{key} is not a dict of bucket numbers to tensors")
                for index, tensor in store.items():
                    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or not tensor.is_floating_point():
                        raise ValueError(f"{name}.{key}[{index}] is not a flat tensor of floats")
                    # A bucket the hook ran on has its order (`align` records it first); its size follows from it.
                    size = sum(piece[which] for piece in self._pieces(orders[index])) if index in orders else None
                    if size is not None and tensor.numel() != size:
                        raise ValueError(f"{name}.{key}[{index}] holds {tensor.numel()} elements of {tensor.dtype}, "
                                         f"not the {size} floats of its bucket's parameters")
            rng = saved.get("rng")
            keys = rng.get("keys") if isinstance(rng, dict) else None
            try:
                if not isinstance(rng, dict) or not isinstance(keys, torch.Tensor):
                    raise TypeError("not a dict with a tensor of keys")
                np.random.RandomState().set_state(numpy_state(  # refused unless it is one
                    keys.numpy(), rng.get("pos"), rng.get("has_gauss"), rng.get("cached_gaussian")))
            except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
                raise ValueError(f"{name}.rng is not numpy's generator state ({exc})") from None
        # Another world size (an elastic restart): the factors and counters are the same on every rank, the
        # residuals are per rank and start from zero again (the run stays correct, not bit-identical).
        same_world = len(ranks) == self.ctx.world_size
        mine = ranks[self.ctx.rank] if same_world else ranks[0]
        s = self.state
        s.iter = mine["iter"]
        self.orders = dict(mine["orders"])
        # Onto the gradients' device: a checkpoint is loaded onto the host, and the hook adds the residuals to the
        # bucket and multiplies into P and Q in place (on a GPU, host tensors failed the first compressed step).
        device = self.params[0].device
        s.error_dict = _tensors_to(mine["error"], device) if same_world else {}
        s.p_memory_dict, s.q_memory_dict = _tensors_to(mine["p"], device), _tensors_to(mine["q"], device)
        rng = mine["rng"]
        s.rng.set_state(numpy_state(rng["keys"].numpy(), rng["pos"], rng["has_gauss"], rng["cached_gaussian"]))
        s.total_numel_before_compression, s.total_numel_after_compression = mine["numel_before"], mine["numel_after"]
        s.next_stats_report = mine["next_stats_report"]


def _tensors_to(tensors: dict[int, torch.Tensor], device: torch.device) -> dict[int, torch.Tensor]:
    """PowerSGD's per-bucket tensors (residuals, P, Q) on `device`."""
    return {index: tensor.to(device) for index, tensor in tensors.items()}


class CommRecorder:
    """Wraps a DDP comm hook: marks each bucket's start and completion and counts the bytes it sends.

    `end_step()` closes the records of one optimizer step (micro-batches under `no_sync()` send nothing);
    `drain()` resolves them, after the step timer has waited for the device. Only the steps the phase timers time
    are marked (`timing`, set by the step): the summary pairs each all-reduce record with its step's phases, and on
    CUDA a mark is two events and a completion callback per bucket, which untimed steps would pay for nothing; the
    events are recorded again once a drain has read them. `new_event` stands in for CUDA's event in tests.
    """

    def __init__(self, ddp: DDP, hook_name: str, ctx: DistContext, powersgd_start: int,
                 new_event: Callable[[], Any] | None = None) -> None:
        self.marks = Marks(ctx.device.type == "cuda", new_event)
        self.hook_name = hook_name
        self.timing = True  # whether the step in progress is timed (accumulation_step sets it from the StepTimer)
        self._current: list[BucketRecord] = []
        self._pending: list[list[BucketRecord]] = []
        self.steps: StepSample[CommStep] = StepSample()  # the timed steps' records, a sample past its cap
        # The hook's state, a checkpoint part: PowerSGD's; the other hooks have none.
        self.powersgd = PowerSGDHookState(ddp.module, ctx, powersgd_start) if hook_name == "powersgd" else None
        ddp.register_comm_hook(None, self._hook)

    def _run_hook(self, bucket: dist.GradBucket) -> tuple[torch.futures.Future[torch.Tensor], int]:
        """The chosen hook's future and the bytes it sends for `bucket`."""
        buffer = bucket.buffer()
        # The default group, DDP's: what the hooks use when given None, which their annotations do not allow.
        group = dist.group.WORLD
        assert group is not None  # DDP runs this hook inside the process group it was built in
        if self.hook_name == "none":
            return default_hooks.allreduce_hook(group, bucket), buffer.numel() * buffer.element_size()
        if self.hook_name in ("bf16", "fp16"):
            hook = default_hooks.bf16_compress_hook if self.hook_name == "bf16" else default_hooks.fp16_compress_hook
            return hook(group, bucket), buffer.numel() * 2
        assert self.powersgd is not None
        self.powersgd.align(bucket)
        state = self.powersgd.state
        compressing = state.iter >= state.start_powerSGD_iter
        numel_before = state.total_numel_after_compression
        future = powerSGD_hook.powerSGD_hook(state, bucket)
        # Compressed: the uncompressed tensors, then the P and Q factors; the hook counts their elements.
        numel = state.total_numel_after_compression - numel_before if compressing else buffer.numel()
        return future, numel * buffer.element_size()

    def _hook(self, _state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not self.timing:
            return self._run_hook(bucket)[0]
        record = BucketRecord(start=self.marks.mark(), nbytes=0)
        future, record.nbytes = self._run_hook(bucket)
        self._current.append(record)

        def completed(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            # On CUDA the callback runs on a stream that waits for the collective: the event marks its end.
            record.end = self.marks.mark()
            return fut.value()

        return future.then(completed)

    def end_step(self) -> None:
        """Close one optimizer step's records: a timed step's are kept, so the summary pairs each with the step's
        phases; an untimed step made none."""
        if self.timing:
            self._pending.append(self._current)
        self._current = []

    def drain(self) -> list[CommStep]:
        """Resolve the steps ended since the last call (on CUDA, after the step timer synchronized)."""
        if self.marks.events and self._pending and self._pending[-1]:
            self._pending[-1][-1].end.synchronize()
        new = [resolve_step(records) for records in self._pending]
        self.marks.recycle(mark for records in self._pending for r in records for mark in (r.start, r.end))
        self._pending = []
        self.steps.extend(new)
        return new


# DDP checks a hook's annotations against the real classes; `from __future__ import annotations` made them strings.
CommRecorder._hook.__annotations__.update(bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]})


def ddp_bucket_kwargs(hook_name: str, bucket_cap_mb: float, ctx: DistContext, module: nn.Module) -> dict[str, Any]:
    """DDP's bucket size: torch's default (25 MiB, a 1 MiB first bucket) unless --bucket-cap-mb is given.

    PowerSGD on gloo needs all gradients in one bucket: the hook issues its P and Q all-reduces from `.then()`
    callbacks, which gloo runs on its own worker thread when the previous collective completes, so with two buckets
    they race the next bucket's all-reduce from the autograd thread, the ranks issue collectives in different
    orders, and gloo aborts ("Received data size doesn't match expected size"). NCCL completes a future when its
    collective is enqueued on the GPU stream, so the callbacks run at once on the issuing thread, in order.
    """
    if hook_name != "powersgd" or ctx.backend != "gloo":
        return {"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb else {}
    grad_mib = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad) / 2**20
    if bucket_cap_mb and bucket_cap_mb < grad_mib:
        raise UserError(f"--ddp-comm-hook powersgd on gloo needs all gradients in one bucket: --bucket-cap-mb "
                        f"{bucket_cap_mb:g} is below the gradient size ({grad_mib:.2f} MiB); drop the flag or raise it")
    # Given explicitly, the cap also applies to DDP's first bucket, so this makes exactly one bucket.
    return {"bucket_cap_mb": bucket_cap_mb or max(grad_mib, 25.0)}


def refuse_powersgd_with_fp16(hook_name: str, amp_flag: str, amp_dtype: torch.dtype | None, world_size: int) -> None:
    """Refuse PowerSGD under fp16's GradScaler where DDP runs (a world of one has no hook, and gets its note).

    The GradScaler overflows now and then by design: at its start, and each time it doubles the scale (every 2000
    clean steps). Once PowerSGD compresses, an overflowed step's inf gradients enter its error feedback, which keeps
    each bucket's gradient minus its approximation and adds it to the next step's: the residual (and the warm-start
    factors) stay non-finite for good, every later step's gradients are NaN and the scaler skips every step. The
    weights never change again while the forward loss stays finite and the ranks agree, so nothing else stops the
    run (review_combos finding 2).
    """
    if hook_name == "powersgd" and amp_dtype == torch.float16 and world_size > 1:
        how = "--amp fp16" if amp_flag == "fp16" else f"--amp {amp_flag} on this GPU without native bf16"
        raise UserError(f"--ddp-comm-hook powersgd cannot train under fp16's GradScaler ({how}): one overflowed step "
                        "leaves PowerSGD's error feedback non-finite and every later step is skipped; use --amp off "
                        "(or bf16 on a GPU that has it), or --ddp-comm-hook fp16 or none")


def note_ignored_comm_flags(cfg: TrainConfig, ctx: DistContext) -> str | None:
    """A world of one has no DDP and nothing to all-reduce: comm flags the user gave are ignored, with this note.
    Only flags given: the recipe's own values (the cuda recipe's hook is `none`) are no choice of the user's."""
    given = cfg.given_flags("ddp_comm_hook", "bucket_cap_mb")
    if ctx.world_size > 1 or not given:
        return None
    return (f"note: {' and '.join(given)} {'has' if len(given) == 1 else 'have'} no effect in a world of one process "
            "(no DDP, nothing is all-reduced)")
