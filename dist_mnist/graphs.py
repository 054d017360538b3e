"""Whole-step CUDA graphs: normalisation, forward, backward, gradient clipping and fused AdamW captured once in one
`torch.cuda.graph` and replayed every step, with static input buffers each batch is copied into.

A step of this small CNN is launch-bound on a GPU (a bare eager step at batch 16 took 2.46 ms on an H100, the same
step replayed from a graph 0.30 ms: issue 9), so one replay instead of ~100 kernel launches is most of the speed.
The learning rate reaches the graph as a 0-dim tensor per parameter group: LambdaLR fills it in place after each
step (torch's schedulers write into tensor learning rates), so the schedule is the eager one, with no host sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_mnist.data import normalize
from dist_mnist.errors import UserError
from dist_mnist.metrics import StepTimer

if TYPE_CHECKING:
    from dist_mnist.train import TrainParts

# Eager runs of the step before capture: they create the optimizer state and let cuDNN and the allocator settle,
# so nothing is allocated lazily during capture. Their effect on weights and optimizer is undone afterwards.
WARMUP_STEPS = 3

Capture = Callable[[Callable[[], None]], Callable[[], None]]


@dataclass(frozen=True)
class GraphDecision:
    enabled: bool
    note: str  # one line for the run's output when `auto` fell back to eager; '' otherwise


def graph_decision(mode: str, device_type: str, world_size: int, amp_dtype: torch.dtype | None, compile: bool,
                   accumulation_steps: int = 1) -> GraphDecision:
    """Whether the training step is captured: `auto` captures where it can and says why not elsewhere (on CUDA);
    `on` refuses a run it cannot capture."""
    if mode == "off":
        return GraphDecision(False, "")
    if device_type != "cuda":
        if mode == "on":
            raise UserError("--cuda-graphs on needs CUDA; use --cuda-graphs auto or off on CPU")
        return GraphDecision(False, "")
    blockers = []
    if world_size > 1:
        # DDP's all-reduce is launched from autograd hooks and waited on by the host: not capturable as it stands.
        blockers.append(f"DDP across {world_size} processes")
    if amp_dtype == torch.float16:
        blockers.append("fp16's GradScaler (its unscale, inf check and scale update are not in the captured step)")
    if compile:
        blockers.append("--compile (its mode reduce-overhead makes CUDA graphs of its own)")
    if accumulation_steps > 1:
        # Several forward/backward passes per optimizer step would need one graph per micro-batch position.
        blockers.append("gradient accumulation")
    if not blockers:
        return GraphDecision(True, "")
    reasons = ", ".join(blockers)
    if mode == "on":
        raise UserError(f"--cuda-graphs on cannot capture this run's step ({reasons}); use --cuda-graphs auto or off")
    # Under --compile the steps that run instead are compiled ones, not eager.
    return GraphDecision(False, f"note: CUDA graphs off, {'compiled' if compile else 'eager'} steps ({reasons})")


def reduce_overhead_note(compile_mode: str, device_type: str) -> str | None:
    """A `note:` for --compile-mode reduce-overhead off CUDA; None otherwise. Inductor's reduce-overhead mode is its
    default mode plus CUDA graphs (torch._inductor.list_mode_options(): triton.cudagraphs), so a run on the CPU
    compiles as the default mode does and captures nothing. Config refuses the mode without --compile on inductor,
    where it is never read."""
    if compile_mode != "reduce-overhead" or device_type == "cuda":
        return None
    return (f"note: --compile-mode reduce-overhead adds CUDA graphs to inductor's default mode, and a run on "
            f"{device_type} has none: its steps compile as --compile-mode default's do")


def capture_failure_note(exc: RuntimeError, mode: str) -> str:
    """The run's note when capturing failed under `auto` (eager steps take over); under `on` a UserError."""
    reason = " ".join(str(exc).split())[:200]
    if mode == "on":
        raise UserError(f"--cuda-graphs on: capturing the training step failed ({reason}); use --cuda-graphs off")
    # torch 2.11 (the GPU machines') never releases a failed capture's private memory pool (pytorch/pytorch#190348),
    # and where ending an invalidated capture fails it leaves the caching allocator believing a capture is underway
    # (#180395), so a torch.cuda.empty_cache() or a second capture in this process would fail an internal assert. A
    # training process does neither after this (tests/test_gpu_paths.py); the reserved memory is what lasts.
    return (f"note: CUDA graph capture failed ({reason}); eager steps, and the GPU memory the failed capture took "
            "stays reserved in this process (torch 2.11 keeps a failed capture's memory pool until the process ends: "
            "pytorch/pytorch#190348)")


def capture_cuda_graph(body: Callable[[], None]) -> Callable[[], None]:
    """Warm `body` up on a side stream, capture it in one CUDA graph and return the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_STEPS):
            body()
    caller = torch.cuda.current_stream()
    caller.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            body()
    except RuntimeError as exc:
        # torch.cuda.graph's exit ends the capture before it switches streams back, so a failed capture would
        # leave the capture stream current for the eager steps; and its "operation failed due to a previous error
        # during capture" hides the operation that broke the capture, which is the error it was raised during.
        torch.cuda.set_stream(caller)
        # Only a capture that ends well takes the device's generator out of capture mode: after a failed one the
        # first eager dropout would raise "Offset increment outside graph capture encountered unexpectedly". A copy
        # of its state is a state out of capture mode; TrainingSnapshot.restore sets its seed and offset after this.
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        generator.graphsafe_set_state(generator.clone_state())
        cause = exc.__context__ if isinstance(exc.__context__, RuntimeError) else exc
        raise RuntimeError(str(cause)) from exc
    return graph.replay


def capture_eagerly(body: Callable[[], None]) -> Callable[[], None]:
    """The CPU stand-in for capture_cuda_graph (tests): the same warm-up, and a 'replay' that runs `body` again."""
    for _ in range(WARMUP_STEPS):
        body()
    return body


def use_tensor_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Make each group's lr a 0-dim tensor on the parameters' device (a float would be baked into the graph) and
    the optimizer capturable; checkpoints still hold plain floats, so eager and graphed runs resume each other."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["capturable"] = True
    optimizer.register_state_dict_post_hook(_plain_learning_rates)


def _plain_learning_rates(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])  # a sync, at checkpoint time only
        group["capturable"] = False
    return state


class TrainingSnapshot:
    """Weights, optimizer state and random generators as they were, to undo the warm-up steps that capture needs.

    The generators matter for resume: a run resumed from a checkpoint restores the generator state of the step it
    stopped at, and its first replayed step must draw the dropout masks the uninterrupted run drew there, not those
    three warm-up steps later. A captured graph reads the CUDA generator's seed and offset at each replay (torch's
    graph-safe RNG), so setting the state after capture is what the replays continue from.
    """

    def __init__(self, parts: TrainParts) -> None:
        self.model = {k: v.detach().clone() for k, v in parts.module.state_dict().items()}
        self.optimizer = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                          for p, s in parts.optimizer.state.items()}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(parts.device) if parts.device.type == "cuda" else None

    def restore(self, parts: TrainParts) -> None:
        """Copy back into the same tensors (the graph holds their addresses); state the warm-up created is zeroed,
        which is what a fresh AdamW state is."""
        with torch.no_grad():
            for key, tensor in parts.module.state_dict().items():
                tensor.copy_(self.model[key])
            for p, state in parts.optimizer.state.items():
                saved = self.optimizer.get(id(p), {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key in saved:
                        value.copy_(saved[key])
                    elif isinstance(value, torch.Tensor):
                        value.zero_()
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, parts.device)


class GraphedStep:
    """`train_step` as a graph replay: the same signature, so the loop calls either."""

    def __init__(self, parts: TrainParts, batch_size: int, capture: Capture = capture_cuda_graph) -> None:
        self.parts = parts
        self.images = torch.zeros(batch_size, 28, 28, dtype=torch.uint8, device=parts.device)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=parts.device)
        self.loss = torch.zeros((), dtype=torch.float32, device=parts.device)
        use_tensor_learning_rates(parts.optimizer)
        snapshot = TrainingSnapshot(parts)  # after any resume: the graph replays from the restored state
        try:
            self.replay = capture(self._body)
        except BaseException:
            # Eager steps take over, and they add their gradients to whatever .grad holds: not the warm-up's. (After
            # a capture the gradients stay: the graph writes into those very tensors.)
            parts.optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            snapshot.restore(parts)  # also after a failed capture, so eager steps can take over from here

    def _body(self) -> None:
        parts, settings = self.parts, self.parts.settings
        # In place: the warm-up created the gradients, so the graph captures a memset of these same persistent
        # tensors and backward accumulating into them, and every replay starts from zero again.
        parts.optimizer.zero_grad(set_to_none=False)
        x = normalize(self.images, parts.device, settings.channels_last)
        # cache_enabled=False: autocast's weight-cast cache would hold tensors from outside the graph's pool.
        with torch.autocast(parts.device.type, dtype=settings.amp_dtype, enabled=settings.amp_dtype is not None,
                            cache_enabled=False):
            loss = F.cross_entropy(parts.train_model(x), self.labels, label_smoothing=parts.label_smoothing)
        loss.backward()
        if parts.grad_clip:
            # clip_grad_norm_ computes and applies the clip coefficient on the device: no host sync to capture.
            nn.utils.clip_grad_norm_(parts.module.parameters(), parts.grad_clip)
        parts.optimizer.step()
        self.loss.copy_(loss.detach())

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], timer: StepTimer) -> torch.Tensor:
        """The loop's entry, as `accumulation_step`'s: graphs run only without gradient accumulation
        (graph_decision), so there is one micro-batch."""
        ((images, labels),) = micro_batches
        return self(images, labels, timer)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, timer: StepTimer) -> torch.Tensor:
        """One optimizer step on one batch; returns the loss (a copy: the static one is overwritten next step)."""
        with timer.phase("to_device"):
            self.images.copy_(images, non_blocking=True)
            self.labels.copy_(labels, non_blocking=True)
        # One replay holds forward, backward and the optimizer: its time is booked as "forward", and "backward"
        # gets no mark of its own (it would time nothing, and a timed step's marks are what the timers cost).
        with timer.phase("forward"):
            self.replay()
        with timer.phase("optimizer"):
            self.parts.scheduler.step()  # fills the lr tensors in place: no sync, read by the next replay
        return self.loss.clone()
