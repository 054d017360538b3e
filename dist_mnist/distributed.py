"""Distributed session: environment -> rank, world size, device and backend; process-group setup and teardown."""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dist_mnist.collectives import enable_flight_recorder
from dist_mnist.config import TrainConfig
from dist_mnist.errors import UserError, first_line
from dist_mnist.restarts import env_whole_number, torchrun_restarts
from dist_mnist.startup import StartupTimer

T = TypeVar("T")
# What rank 0's store (a TCPStore it serves on MASTER_PORT) says when the other processes did not all connect in time.
_CLIENTS_JOINED = re.compile(r"Timed out after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined")
# The highest TCP port: torch's store refused MASTER_PORT past it with a ValueError traceback.
MAX_PORT = 65535


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    # A gloo group for small CPU-side messages (stop flags, stats, run name). On nccl this keeps control traffic
    # off the GPU stream, so checking for a stop request every step never forces a CUDA synchronize.
    control_group: Any
    # Under torchrun, the agent that started this process (its parent as the session began); None otherwise.
    agent_pid: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # A world of one has nobody to exchange with: these return at once, without a collective (each costs a pickle
    # and a gloo round trip, paid at every evaluation, progress report and checkpoint).
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.control_group)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum a host tensor over every rank, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.control_group)

    def on_main(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0; every rank returns its result, or raises its UserError (a full disk, a taken run
        folder). A barrier as well: nobody moves on before rank 0 is done, and its failure ends every rank at once
        instead of leaving the others waiting for it in the next collective."""
        result, error = None, ""
        if self.is_main:
            try:
                result = work()
            except UserError as exc:
                error = str(exc)
        result, error = self.broadcast_object((result, error))
        if error:
            raise UserError(error)
        return result


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    cuda_ok = torch.cuda.is_available()
    if cfg.device == "cuda" or cfg.backend == "nccl":
        if not cuda_ok:
            why = "--backend nccl" if cfg.backend == "nccl" else "--device cuda"
            raise UserError(f"{why} needs a CUDA GPU and none is available here; use --device cpu --backend gloo")
    if cfg.device == "cpu" or (cfg.device == "auto" and not cuda_ok):
        if cfg.backend == "nccl":
            raise UserError("--backend nccl runs on CUDA only; use --backend gloo with --device cpu")
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                        "start at most that many processes per node")
    return torch.device("cuda", local_rank)


def resolve_backend(device: torch.device, world_size: int) -> str:
    """--backend auto: nccl where CUDA processes exchange gradients, gloo everywhere else. A process on its own
    exchanges nothing (DistContext answers at once, evaluation adds nothing up), so its process group only names
    rank and world size; on one H200 `init_process_group` with nccl took 5.5-6.1 s of every such run's start-up
    (docs/benchmarks.md), with no collective to show for it."""
    return "nccl" if device.type == "cuda" and world_size > 1 else "gloo"


def _rendezvous_address() -> str:
    """MASTER_ADDR:MASTER_PORT, which env:// needs: checked here, where the error can say what to do."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} {verb} not: start with torchrun, "
                        "which sets all of them, or set MASTER_ADDR and MASTER_PORT to rank 0's host and a free port "
                        "on it, or unset RANK for one process")
    # Port 0 is not refused by torch: rank 0's store then serves on a port the OS picks, which no other process can
    # know, so they could never join it (torchrun gives its workers the port its own store got, never 0).
    env_whole_number("MASTER_PORT", least=1, most=MAX_PORT)
    return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"


def _rendezvous_failed(exc: dist.DistError, address: str, rank: int, world_size: int, timeout_s: float) -> UserError:
    """One line for a rendezvous that did not complete: who joined where torch says, and its own words."""
    reason = first_line(exc)
    joined = _CLIENTS_JOINED.search(reason)
    if joined:
        seconds, arrived, expected = joined.groups()
        return UserError(f"the rendezvous at {address} timed out after {seconds} s with {arrived} of {expected} "
                         f"processes joined ({reason}); start all {world_size} processes within --timeout-s "
                         f"{timeout_s:g}, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE")
    return UserError(f"the rendezvous at {address} failed for rank {rank} of {world_size} ({reason}); MASTER_ADDR and "
                     "MASTER_PORT must name rank 0's host and a free port there, the same in every process, and all "
                     f"processes must start within --timeout-s {timeout_s:g}")


def _peers_missing(exc: dist.DistError, rank: int, world_size: int, timeout_s: float) -> UserError:
    """One line for a process group whose peers did not all connect. Under torchrun the rendezvous (the agent's own
    store) returns at once, so a peer that froze or died after torchrun started it is first waited for here."""
    reason = first_line(exc)
    return UserError(f"the process group did not open for rank {rank} of {world_size}: not every process connected "
                     f"within --timeout-s {timeout_s:g} ({reason}); a process that froze, crashed or is still "
                     "starting holds up the others: check every process's own output, then start them all again")


def _launch_position() -> tuple[int | None, int | None]:
    """(RANK, WORLD_SIZE) as the launcher set them, checked: both set, or neither (WORLD_SIZE=1 alone is allowed);
    (None, None) or (None, 1) for a process on its own. A rank no world holds, or a world of 0 or of more than this
    process without a rank, used to wait --timeout-s for peers that cannot exist (ignoring Ctrl-C in torch's
    C++ wait), then end in torch's traceback; WORLD_SIZE=0 ran silently as a world of one."""
    rank, world_size = env_whole_number("RANK"), env_whole_number("WORLD_SIZE", least=1)
    if rank is not None and world_size is None:
        raise UserError("RANK is set but WORLD_SIZE is not; start with torchrun, or unset RANK for one process")
    if rank is None and world_size is not None and world_size > 1:
        # The other way round, a process would open a process group of world_size alone as rank 0 and wait for
        # the others. WORLD_SIZE=1 alone is no contradiction: it is the world of one this process runs anyway.
        raise UserError(f"WORLD_SIZE is set ({world_size}) but RANK is not; start with torchrun, which sets both, "
                        "or unset WORLD_SIZE for one process")
    if rank is not None and world_size is not None and rank >= world_size:
        raise UserError(f"RANK={rank} is outside a world of WORLD_SIZE={world_size} processes (ranks 0 to "
                        f"{world_size - 1}); start with torchrun, which numbers them, or give each process its own "
                        "RANK below WORLD_SIZE")
    return rank, world_size


def torchrun_agent_pid(environ: Mapping[str, str]) -> int | None:
    """The torchrun agent that started this process: its parent, read before the rendezvous (an agent lost during
    the start-up's minutes is seen too). Only where the agent's own variables say a torchrun agent started it:
    TORCHELASTIC_RUN_ID alone a user may export to name a run (rundir reads it), and a process of its own is
    reparented when its shell exits (`nohup python launch/train.py &`), which must not stop it."""
    launched_by_agent = "TORCHELASTIC_RUN_ID" in environ and "TORCHELASTIC_USE_AGENT_STORE" in environ
    return os.getppid() if launched_by_agent else None


def _check_later_numbers() -> None:
    """The launcher's other whole numbers, read at start-up before anything is written: later code reads them
    where a bad one ended a rank part-way (LOCAL_WORLD_SIZE in the --num-workers note, the restart counts in the run
    folder's checks and in a failure's advice), and SLURM_RESTART_COUNT=x was a traceback."""
    torchrun_restarts()
    env_whole_number("SLURM_RESTART_COUNT", 0)
    env_whole_number("LOCAL_WORLD_SIZE", 1, least=1)  # torchrun's processes on this host


# The variables gloo and NCCL read for the interface their sockets use; unset, both take the address the host name
# resolves to, which may be a public one.
SOCKET_INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """The environment variables in `values` set for the duration, then put back as they were (unset again where
    they were unset)."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def loopback_only(world_size: int) -> AbstractContextManager[None]:
    """The process groups' sockets on the loopback interface while they open, where no peer is on another host:
    gloo's device listens for peers on the host name's address, so a run listened on the machine's public address
    where the host name resolves to one (servers bind to 127.0.0.1 unless asked), and the ranks' object collectives
    unpickle what arrives there (review_security 14). A world of one has no peer: gloo and NCCL both. A world whose
    ranks are all on this host (torchrun's LOCAL_WORLD_SIZE is the world's size, as with --standalone): gloo, the
    group that carries pickles; NCCL, which carries tensors, keeps its own choice, untried on lo across GPUs. An
    interface the user chose stays; the variables are put back after, so nothing a later group or process inherits
    changes."""
    if world_size == 1:
        names: tuple[str, ...] = SOCKET_INTERFACE_VARIABLES
    elif env_whole_number("LOCAL_WORLD_SIZE", 1, least=1) == world_size:
        names = ("GLOO_SOCKET_IFNAME",)
    else:
        names = ()
    return temporary_env({name: "lo" for name in names if name not in os.environ})


def beyond_host_cpus(per_rank: int, ranks_on_host: int, cpus: int, what: str) -> str | None:
    """'N {what} on this host's C CPUs' (with the split by rank where there are several) when `per_rank` of them
    for each of the host's ranks are more than its `cpus`; None when they fit. The shared part of the notes on
    oversubscribed CPUs (data.worker_count_note, thread_count_note)."""
    on_host = per_rank * ranks_on_host
    if on_host <= cpus:
        return None
    ranks = f" ({per_rank} per rank x {ranks_on_host} ranks)" if ranks_on_host > 1 else ""
    return f"{on_host} {what} on this host's {cpus} CPUs{ranks}"


def thread_count_note(threads: int, ranks_on_host: int, cpus: int) -> str | None:
    """A `note:` when --threads times the ranks on this host is more than its CPUs; None otherwise (and for 0,
    torch's own choice). Config refuses --threads above the CPUs of one process; with several ranks on the host each
    may stay under them while all together do not, which slowed 2 ranks of --threads 2 on 2 CPUs by a third."""
    if not threads or (count := beyond_host_cpus(threads, ranks_on_host, cpus, "intra-op threads")) is None:
        return None
    return (f"note: --threads {threads} runs {count}: threads beyond the CPUs wait for each other in every "
            "parallel kernel and slow each step; --threads 0 leaves the count to torch (and torchrun's "
            "OMP_NUM_THREADS)")


@contextmanager
def distributed_session(cfg: TrainConfig, startup: StartupTimer | None = None) -> Iterator[DistContext]:
    """Open the process group (torchrun's env:// rendezvous, or an in-process world of one) and always close it."""
    timer = startup or StartupTimer()
    rank, world_size = _launch_position()
    agent_pid = torchrun_agent_pid(os.environ)
    # This process's GPU (cuda:LOCAL_RANK) on a GPU host: a negative one named no device.
    local_rank = env_whole_number("LOCAL_RANK")
    _check_later_numbers()
    launched = rank is not None
    rank, world_size = rank or 0, world_size or 1
    local_rank = rank if local_rank is None else local_rank

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else resolve_backend(device, world_size)
    if device.type == "cuda":
        # Before init_process_group, so NCCL binds this process to its own GPU and not to GPU 0. The first
        # allocation creates the CUDA context here, so the start-up breakdown shows it apart from NCCL's set-up.
        with timer.phase("cuda_context"):
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)
    if backend == "nccl":
        enable_flight_recorder(cfg)  # NCCL reads these variables when the process group opens

    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    init_kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if backend == "nccl" and world_size > 1:
        # Sets NCCL's communicator up here, at start-up, not in the first collective. A world of one (gloo unless
        # --backend nccl asks otherwise) runs no collective at all, so it never makes a communicator.
        init_kwargs["device_id"] = device
    if launched:
        address = _rendezvous_address()
        with timer.phase("rendezvous"):
            try:
                store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
            except dist.DistError as exc:  # DistStoreError (rank 0 waited in vain), DistNetworkError (no connection)
                raise _rendezvous_failed(exc, address, rank, world_size, cfg.timeout_s) from None
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # The workers meet in the agent's own store, which lives as long as the agent: restarted workers
                # would find the addresses their dead predecessors published and gloo would connect to those
                # (refused, or a hang), so key each restart apart. Without store sharing
                # (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, needed for nodes that join or replace others) every
                # rendezvous round starts a fresh store, and a replacement node's restart count differs from the
                # others', so no prefix there.
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                store = dist.PrefixStore(f"dist_mnist/attempt_{attempt}", store)
    else:
        store = dist.HashStore()  # a world of one needs no rendezvous: an in-process store, so no port is opened
    with timer.phase("process_group"), loopback_only(world_size):
        try:
            dist.init_process_group(store=store, rank=rank, world_size=world_size, **init_kwargs)
        except dist.DistError as exc:  # DistStoreError: a peer's address never came (a world of one waits on none)
            if world_size == 1:
                raise
            raise _peers_missing(exc, rank, world_size, cfg.timeout_s) from None
    try:
        # A world of one exchanges no control messages (DistContext returns at once), so it makes no gloo group.
        with timer.phase("control_group"), loopback_only(world_size):
            try:
                control_group = (dist.new_group(backend="gloo", timeout=timeout)
                                 if backend == "nccl" and world_size > 1 else dist.group.WORLD)
            except dist.DistError as exc:  # the same wait, for a peer that stopped between the two groups
                raise _peers_missing(exc, rank, world_size, cfg.timeout_s) from None
        yield DistContext(rank=rank, world_size=world_size, device=device,
                          backend=backend, control_group=control_group, agent_pid=agent_pid)
    finally:
        dist.destroy_process_group()
