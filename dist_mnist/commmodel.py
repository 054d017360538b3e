"""What DDP's gradient all-reduce costs on more nodes: a bandwidth + latency model of a hierarchical all-reduce.

`python -m dist_mnist.commmodel` prints the tables of docs/cluster.md ("What to expect from more nodes");
`python -m dist_mnist.commmodel --measure-gloo` measures, on this machine, what the model takes from it: the bytes
DDP all-reduces per step and the bandwidth of a 2-rank gloo all-reduce over loopback.
"""

# No `from __future__ import annotations`: DDP checks a comm hook's annotations as objects, not strings.

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import SimpleQueue

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

from dist_mnist.config import RawDescriptionDefaultsHelpFormatter
from dist_mnist.console import kept_stdout
from dist_mnist.model import MnistCNN

GPUS_PER_NODE = 8
NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64)
# torch's PowerSGD default: a layer is compressed only if that at least halves its bytes.
POWERSGD_MIN_COMPRESSION_RATE = 2.0


@dataclass(frozen=True)
class Encoding:
    """How the gradients cross the network each optimizer step."""

    name: str
    bytes_per_step: int
    collectives_per_step: int  # each pays the latency terms once


@dataclass(frozen=True)
class Network:
    """One node type and its interconnect, as bandwidths NCCL reaches (not line rates) and latencies per hop."""

    name: str
    intra_bus_gbps: float  # GB/s per GPU inside a node (NVLink)
    intra_hop_s: float
    inter_node_gbps: float  # GB/s per node across nodes, all its NICs together
    inter_hop_s: float


@dataclass(frozen=True)
class GlooMeasurement:
    """What `--measure-gloo` measured: DDP's bytes per step and a 2-rank gloo all-reduce of that many bytes."""

    bytes_per_step: int
    buckets: int
    allreduce_s: float  # median
    small_allreduce_s: float  # median of a 4-byte all-reduce: the latency of one collective

    @property
    def bus_gbps(self) -> float:
        """Bus bandwidth: 2(n-1)/n × bytes / time, which for n = 2 is bytes / time."""
        return self.bytes_per_step / self.allreduce_s / 1e9


# Measured on this project's 2-core CPU machine, torch 2.14.1, 2026-11-27 (docs/benchmarks.md has the command).
MEASURED_GLOO = GlooMeasurement(bytes_per_step=4_799_528, buckets=2, allreduce_s=4.65e-3, small_allreduce_s=99e-6)
# DDP's buckets at the default bucket_cap_mb (25 MB, the first one 1 MB): fc2 + fc1, then the convolutions.
DDP_BUCKETS = MEASURED_GLOO.buckets
# PowerSGD all-reduces three things per bucket: the layers it leaves uncompressed, then P, then Q.
POWERSGD_COLLECTIVES_PER_BUCKET = 3

# One 8-GPU H100 SXM node: NVLink 4 (900 GB/s per GPU in both directions; NCCL's all-reduce bus bandwidth reaches
# 350-450 GB/s on large messages), with three kinds of network between nodes. Bandwidths are about 80% of line
# rate, what NCCL's all-reduce reaches on large messages; latencies are per hop of a ring inside the node and of
# NCCL's tree across nodes.
NETWORKS = (
    Network("InfiniBand NDR, 8 × 400 Gb/s NICs per node", 360.0, 1e-6, 320.0, 5e-6),
    Network("Ethernet, 1 × 100 Gb/s NIC per node", 360.0, 1e-6, 10.0, 20e-6),
    Network("Ethernet, 1 × 25 Gb/s NIC per node", 360.0, 1e-6, 2.5, 20e-6),
)
# The step's compute on one H100 at batch 512 per GPU: 512 / 149,049 samples/s (docs/benchmarks.md).
H100_STEP_S = 512 / 149_049
# The step's compute on this CPU, one thread per rank, batch 16: 16 / 1,482-1,759 samples/s (docs/benchmarks.md).
CPU_STEP_S = 16 / 1_620


def gradient_encodings(model: nn.Module) -> list[Encoding]:
    """Bytes per step of fp32 gradients, of torch's bf16/fp16 compression hooks, and of PowerSGD at rank 1 and 4."""
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    encodings = [Encoding("fp32 (no hook)", 4 * numel, DDP_BUCKETS),
                 Encoding("bf16 or fp16 hook", 2 * numel, DDP_BUCKETS)]
    for rank in (1, 4):
        encodings.append(Encoding(f"PowerSGD rank {rank}", 4 * powersgd_elements(params, rank),
                                  POWERSGD_COLLECTIVES_PER_BUCKET * DDP_BUCKETS))
    return encodings


def powersgd_elements(params: list[nn.Parameter], rank: int) -> int:
    """Elements PowerSGD all-reduces per step: each gradient seen as an n × m matrix goes as P (n × r) and Q
    (m × r) when torch's own test finds that worth it, whole otherwise (biases always)."""
    total = 0
    for p in params:
        n = p.shape[0]
        m = p.numel() // n
        r = min(n, m, rank)
        compress, uncompressed, _ = _should_compress(n, m, r, POWERSGD_MIN_COMPRESSION_RATE)
        total += (n + m) * r if compress else uncompressed
    return total


def allreduce_s(encoding: Encoding, nodes: int, net: Network, gpus_per_node: int = GPUS_PER_NODE) -> float:
    """Seconds per step for a hierarchical all-reduce: reduce-scatter inside each node over NVLink, an all-reduce
    of each GPU's shard across the nodes, all-gather inside the node (NCCL's ring and tree algorithms move the same
    bytes). Latency, per collective: a ring of 2(g-1) hops inside the node, a tree of 2⌈log2 N⌉ hops across nodes."""
    g, size = gpus_per_node, encoding.bytes_per_step
    # Inside a node each GPU sends and receives 2(g-1)/g of the buffer; across nodes each node sends and receives
    # 2(N-1)/N of it, spread over its NICs.
    bandwidth = 2 * (g - 1) / g * size / (net.intra_bus_gbps * 1e9)
    bandwidth += 2 * (nodes - 1) / nodes * size / (net.inter_node_gbps * 1e9)
    latency = 2 * (g - 1) * net.intra_hop_s + 2 * math.ceil(math.log2(nodes)) * net.inter_hop_s
    return bandwidth + encoding.collectives_per_step * latency


def efficiency(step_s: float, comm_s: float) -> float:
    """Step compute over compute plus all-reduce: no overlap, the per-GPU batch fixed (a lower bound)."""
    return step_s / (step_s + comm_s)


def _cell(comm_s: float, step_s: float) -> str:
    eff = efficiency(step_s, comm_s)
    text = f"{comm_s * 1e3:.2f} ms ({eff:.0%})"
    return f"**{text}**" if comm_s > step_s else text  # communication-bound: the all-reduce outlasts the compute


def bytes_table(encodings: list[Encoding]) -> str:
    fp32 = encodings[0].bytes_per_step
    lines = ["| gradients | bytes per step | of fp32 | all-reduces per step |", "|---|---|---|---|"]
    lines += [f"| {e.name} | {e.bytes_per_step:,} | {e.bytes_per_step / fp32:.2%} | {e.collectives_per_step} |"
              for e in encodings]
    return "\n".join(lines)


def nodes_table(encodings: list[Encoding]) -> str:
    head = " | ".join(f"{n} × {GPUS_PER_NODE}" for n in NODE_COUNTS)
    lines = [f"| network | gradients | {head} |", "|---|---|" + "---|" * len(NODE_COUNTS)]
    for net in NETWORKS:
        for i, e in enumerate(encodings):
            cells = " | ".join(_cell(allreduce_s(e, n, net), H100_STEP_S) for n in NODE_COUNTS)
            lines.append(f"| {net.name if i == 0 else ''} | {e.name} | {cells} |")
    return "\n".join(lines)


def gloo_line(measured: GlooMeasurement, fp32: Encoding) -> str:
    """The model's prediction for this machine's 2 CPU ranks, from the measured loopback bandwidth."""
    comm = fp32.bytes_per_step / (measured.bus_gbps * 1e9) + (fp32.collectives_per_step - 1) * \
        measured.small_allreduce_s
    return (f"This machine, 2 CPU ranks over gloo on loopback: {measured.bus_gbps:.2f} GB/s measured, "
            f"{measured.small_allreduce_s * 1e6:.0f} µs per small all-reduce; "
            f"the model predicts {comm * 1e3:.1f} ms of all-reduce per step against {CPU_STEP_S * 1e3:.1f} ms of "
            f"compute (batch 16, one thread), a scaling efficiency of {efficiency(CPU_STEP_S, comm):.0%}.")


def model_tables() -> str:
    """The text docs/cluster.md holds between its commmodel markers."""
    encodings = gradient_encodings(MnistCNN())
    return "\n\n".join([bytes_table(encodings), nodes_table(encodings), gloo_line(MEASURED_GLOO, encodings[0])])


# -- measurement ---------------------------------------------------------------------------------------------------

def _median_s(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure_rank(rank: int, world: int, store_path: str, repeats: int, queue: SimpleQueue[GlooMeasurement]) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: what two ranks on one host use
    # A peer that died must not leave this rank waiting for gloo's default 30 minutes.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(MnistCNN())
        buckets: list[int] = []

        def count_bucket(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        model.register_comm_hook(None, count_bucket)
        # DDP rebuilds its buckets after the first step, in the order the gradients became ready: count the third.
        for _ in range(3):
            buckets.clear()
            model(torch.zeros(2, 1, 28, 28)).sum().backward()
        grads = torch.zeros(sum(buckets) // 4)  # zeros: repeated in-place sums stay finite
        small = torch.zeros(1)
        measured = GlooMeasurement(bytes_per_step=sum(buckets), buckets=len(buckets),
                                   allreduce_s=_median_s(lambda: dist.all_reduce(grads), repeats),
                                   small_allreduce_s=_median_s(lambda: dist.all_reduce(small), repeats))
        if rank == 0:
            queue.put(measured)  # written to the pipe before put returns
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalization: after DDP has run over gloo, about 1 exit in 15 aborted there
    # ("terminate called without an active exception", SIGABRT; a gloo worker thread still holding work while the
    # interpreter tears down, pytorch/pytorch#179291), and the measurement is complete by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure_gloo(repeats: int = 50) -> GlooMeasurement:
    """DDP's bytes per step (counted by a comm hook) and the all-reduce time of that many bytes, 2 ranks, gloo."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_measure_rank, args=(2, os.path.join(tmp, "store"), repeats, queue),
                                              nprocs=2, start_method="spawn")
    return queue.get()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_mnist.commmodel", description=__doc__,
                                     formatter_class=RawDescriptionDefaultsHelpFormatter)
    parser.add_argument("--measure-gloo", action="store_true",
                        help="measure DDP's bytes per step and a 2-rank gloo all-reduce of them on this machine")
    parser.add_argument("--repeats", type=int, default=50, help="timed all-reduces per size with --measure-gloo")
    args = parser.parse_args(argv)
    if not args.measure_gloo:
        print(model_tables())
        return 0
    if args.repeats < 1:
        print(f"error: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 1
    try:
        m = measure_gloo(args.repeats)
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException) as exc:
        # The child's traceback ends with its exception, the line that says what went wrong.
        print(f"error: the gloo measurement failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"DDP all-reduces {m.bytes_per_step:,} bytes per step in {m.buckets} buckets; 2-rank gloo all-reduce of "
          f"them: {m.allreduce_s * 1e3:.2f} ms (median of {args.repeats}), {m.bus_gbps:.2f} GB/s bus bandwidth; "
          f"4-byte all-reduce: {m.small_allreduce_s * 1e6:.0f} µs")
    return 0


if __name__ == "__main__":
    with kept_stdout(note=None):  # `... | head` ends the output, not the tool's work
        code = main()
    sys.exit(code)
