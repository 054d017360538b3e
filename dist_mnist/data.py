"""Data: MNIST IDX files (or synthetic data) decoded once into uint8 tensors, sharded per rank, sliced into batches."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from dist_mnist.config import TrainConfig
from dist_mnist.distributed import DistContext, beyond_host_cpus
from dist_mnist.durable import WriteFailed, missing_folders, remove_empty_folders, write_durably
from dist_mnist.errors import UserError
from dist_mnist.preemption import DataWorkerContext, leave_stop_signals_to_the_rank
from dist_mnist.recipes import value_source

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The classic MNIST normalisation constants (mean and std of the training pixels scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SYNTHETIC_SEED = 1234
# The most images an IDX pair may declare (7.8 GB of 28x28 images), checked before a body is read: a sparse file's
# header can declare any count its size matches at no cost on disk. Far above MNIST's 60,000, and the 8.1 million of
# its largest derivative (infinite MNIST's mnist8m).
MAX_IDX_IMAGES = 10_000_000


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def mnist_raw_dir(data_dir: str) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def read_idx_header(f: BufferedReader, ndim: int) -> tuple[int, ...]:
    """The shape an IDX file of unsigned bytes declares (MNIST's format: 0x00 0x00 0x08 ndim, big-endian uint32
    sizes, the bytes), checked against the file's size; `f` is left at the body's start.

    The files are read here rather than with torchvision's reader: importing torchvision took about 1.7 s, most of
    it torch._dynamo, which the first optimizer needs too but which main() imports in a thread (StartupTimer); a
    torchvision import on the main thread would wait for it. Only the download still uses torchvision.
    """
    header = 4 + 4 * ndim
    # The file's size against the one the header implies, before the body is read: a file whose header claims one
    # image but that is gigabytes long (a sparse file costs nothing to make) was read whole.
    size = os.fstat(f.fileno()).st_size
    head = f.read(header)
    if len(head) < header or head[:4] != bytes([0, 0, 0x08, ndim]):
        raise ValueError(f"expected the magic number 0x0000080{ndim} and {ndim} sizes")
    shape = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    if size - header != math.prod(shape):
        raise ValueError(f"{size - header} data bytes for a shape of {shape}")
    return shape


def read_idx_body(f: BufferedReader, shape: tuple[int, ...]) -> torch.Tensor:
    """The body of an IDX file whose header read_idx_header read, straight into the tensor it becomes (readinto):
    reading it into bytes and copying those out held it twice."""
    tensor = torch.empty(shape, dtype=torch.uint8)
    buffer = tensor.view(-1).numpy().data  # the tensor's own bytes, as a memoryview
    filled = 0
    while filled < len(buffer) and (got := f.readinto(buffer[filled:])):
        filled += got
    if filled != len(buffer):  # the file changed while it was read
        raise ValueError(f"{filled} data bytes for a shape of {shape}")
    return tensor


@contextmanager
def _idx_file_errors(path: Path) -> Iterator[None]:
    """A bad or unreadable IDX file at `path` as one line naming it."""
    try:
        yield
    except ValueError as exc:
        detail = f": {exc}" if str(exc) else ""
        raise UserError(f"{path} is not a valid MNIST IDX file (wrong magic number, dimensions or size"
                        f"{detail}); replace it with the original file") from None
    except OSError as exc:  # no read permission, an I/O error of the disk or the network filesystem
        raise UserError(f"cannot read {path}: {exc.strerror or exc}; make it readable by this process, or "
                        "point --data-dir at a copy that is") from None


def _read_idx_pair(raw: Path, prefix: str) -> Split:
    """A split's images and labels, their shapes checked against each other before either body is read.

    A header can declare any shape its file's size matches, and a sparse file of that size costs 4 KiB on disk: in a
    shared data folder, images of (2^22, 16, 16) over a 1 GiB hole were read and copied (2.7 GB at the peak) before
    the 28x28 shape was checked (review_security F11). The shapes, the count the labels agree on, and a bound on it
    come first; a body is then read once, into its tensor."""
    images_path, labels_path = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    with ExitStack() as files:
        opened = []
        for path, ndim in ((images_path, 3), (labels_path, 1)):
            with _idx_file_errors(path):
                f = files.enter_context(open(path, "rb"))
                opened.append((path, f, read_idx_header(f, ndim)))
        images_shape, labels_shape = opened[0][2], opened[1][2]
        if images_shape[1:] != (28, 28) or images_shape[0] != labels_shape[0]:
            raise UserError(f"{images_path} and {labels_path} do not match: {images_shape} images of 28x28 expected "
                            f"with as many labels, got {labels_shape[0]} labels")
        if not images_shape[0]:  # the evaluation would divide by its zero images after training
            raise UserError(f"{images_path} and {labels_path} hold no images; replace them with the original files")
        if images_shape[0] > MAX_IDX_IMAGES:
            raise UserError(f"{images_path} and {labels_path} hold {images_shape[0]:,} images by their headers, more "
                            f"than the {MAX_IDX_IMAGES:,} this reader takes (MNIST has 60,000 training and 10,000 "
                            "test images); replace them with the original files")
        tensors = []
        for path, f, shape in opened:
            with _idx_file_errors(path):
                tensors.append(read_idx_body(f, shape))
    images, labels = tensors
    if int(labels.max()) > 9:
        raise UserError(f"{labels_path} holds labels outside 0-9; replace it with the original file")
    return Split(images, labels.long())


def load_mnist(cfg: TrainConfig, ctx: DistContext) -> tuple[Split, Split]:
    """Decode the four IDX files (_read_idx_pair); rank 0 downloads them first with torchvision when allowed.

    Every rank takes the same branches whatever its own disk holds: with node-local --data-dir folders one rank can
    lack the files another has, and a rank waiting in the download's broadcast while the others went on would sit
    there until --timeout-s (then name a timed-out collective, not the missing files).
    """
    raw = mnist_raw_dir(cfg.data_dir)
    missing = missing_mnist_files(raw)
    views = ctx.gather_objects(DataView(str(raw), missing, cfg.no_download))  # no collective in a world of one
    if views[0].missing and not views[0].no_download:
        error = ""
        if ctx.is_main:
            error = fetch_missing(raw, missing, cfg.data_dir)
        # Other ranks wait, so only one process downloads; all of them learn whether it worked.
        error = ctx.broadcast_object(error)
        if error:
            raise UserError(f"could not download MNIST into {views[0].raw} ({error}); copy the files "
                            f"{', '.join(views[0].missing)} there, or point --data-dir / DIST_MNIST_DATA at a folder "
                            "holding MNIST/raw/")
        missing = missing_mnist_files(raw)
        views = ctx.gather_objects(DataView(str(raw), missing, cfg.no_download))
    if missing:
        how_to_fetch = ("drop --no-download to let torchvision fetch them" if cfg.no_download else
                        f"copy them there: only global rank 0 downloads, into its own --data-dir ({views[0].raw})")
        raise missing_mnist_error(raw, missing, how_to_fetch)
    if lacking := [rank for rank, view in enumerate(views) if view.missing]:
        where = ", ".join(f"{views[rank].raw} on rank {rank}" for rank in lacking)
        raise UserError(f"MNIST files missing in {where} (the error line of each rank named lists the files); "
                        "point --data-dir at a folder every node sees, or copy MNIST/raw/ to every node")
    return _read_idx_pair(raw, "train"), _read_idx_pair(raw, "t10k")


def fetch_missing(raw: Path, missing: list[str], root: str) -> str:
    """Download the files `missing` from `raw` (MNIST/raw/ under --data-dir `root`) with torchvision: "" once they
    are there, else why not, in one line.

    torchvision writes each `.gz` and the file it extracts with open(path, "wb"), through whatever stands at that
    name: in a shared --data-dir another user could plant `raw/<name>.gz -> ~victim/file`, and the victim's download
    wrote over that file (review_security F3). A check of `raw` first left a race, and a staging folder inside a
    `raw` others can write to could be renamed away and replaced by theirs (review_download 1). So torchvision
    fetches into a folder of this process's own in the temporary folder (mkdtemp: mode 0700, in /tmp, whose sticky
    bit keeps others from renaming it), and each file is written into `raw` by durable.write_durably. The `.gz`
    files are not kept. Any failure of the fetch (a network error of any kind) is the line, not a traceback on this
    rank while the others wait in the broadcast of it."""
    from torchvision.datasets import MNIST  # only for downloading: see read_idx_header

    class MissingFiles(MNIST):
        """torchvision's MNIST download, of the files `raw` lacks only: its own fetches all four whenever one is
        missing, writing over the others (through a symbolic link, over its target). Into `staging`."""
        resources = [(name, md5) for name, md5 in MNIST.resources if name.removesuffix(".gz") in missing]

        @property
        def raw_folder(self) -> str:  # torchvision's is named after the class
            return staging

        def _check_legacy_exist(self) -> bool:
            # torchvision would torch.load the old processed .pt files where it finds them under the root, and skip
            # the download: no concern of a download of IDX files (review_download 3).
            return False

        def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
            # torchvision decodes the split after its download; _read_idx_pair does, with its checks, and a present
            # file that is damaged must fail there, not here as a failed download.
            return torch.empty(0), torch.empty(0)

    made = missing_folders(raw)
    if blocked := unsafe_download_targets(raw, missing):
        # Refused before anything is fetched; every rank learns it from the broadcast.
        return f"{'; '.join(blocked)}; remove {'it' if len(blocked) == 1 else 'them'} first"
    staging = tempfile.mkdtemp(prefix="dist_mnist-download-")
    try:
        MissingFiles(root, train=True, download=True)
        raw.mkdir(parents=True, exist_ok=True)
        for name in missing:
            # A new file beside the name (open_new: O_EXCL, O_NOFOLLOW, so never a link planted first), renamed
            # over it, which replaces whatever stands there, a link too (a rename does not follow one).
            write_durably(raw / name, (Path(staging) / name).read_bytes())
    except WriteFailed as exc:
        remove_empty_folders(made)
        return exc.failed  # which file, where, why: the advice after it is a run's, not a download's
    except Exception as exc:
        remove_empty_folders(made)  # the MNIST/raw/ made for files that never came
        # torchvision's message spans lines ("Error downloading X:", "Tried URL, got: ..."): keep one.
        return " ".join(str(exc).split()) or type(exc).__name__
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ""


@dataclass(frozen=True)
class DataView:
    """What one rank's disk holds of MNIST, which every rank learns before any of them downloads or decodes."""
    raw: str
    missing: list[str]
    no_download: bool


def missing_mnist_files(raw: Path) -> list[str]:
    """The four IDX files' names that `raw` (a MNIST/raw/ folder) lacks, in MNIST_FILES' order."""
    return [name for name in MNIST_FILES if not (raw / name).is_file()]


def unsafe_download_targets(raw: Path, missing: list[str]) -> list[str]:
    """What stands at a missing file's name in `raw` that the downloaded file cannot be renamed over, each as
    `<name> is ...`: a folder, which the rename would fail on after the whole fetch. A symbolic link there (dangling:
    a link to a file that exists is that file, not missing) is replaced by the rename, never written through, as is
    any other file; the .gz files are fetched in the staging folder only (fetch_missing)."""
    found = []
    for name in missing:
        try:
            mode = (raw / name).lstat().st_mode
        except OSError:  # absent (to be written), or unreadable: the rename's own error says so
            continue
        if stat.S_ISDIR(mode):
            found.append(f"{name} is a folder, where the download would put the file")
    return found


def missing_mnist_error(raw: Path, missing: list[str], how_to_fetch: str) -> UserError:
    """The files `raw` lacks, what to point at instead, and `how_to_fetch` them with the command that failed."""
    # Naming the expected files again only where some are there: with none, the list would repeat itself.
    expected = f" (expected {', '.join(MNIST_FILES)})" if len(missing) < len(MNIST_FILES) else ""
    # Absolute: the default --data-dir, ./data, is the current directory's.
    return UserError(f"MNIST files missing in {raw.absolute()}: {', '.join(missing)}{expected}; point --data-dir or "
                     f"DIST_MNIST_DATA at the folder holding MNIST/raw/, or {how_to_fetch}")


def synthetic_splits(train_size: int, test_size: int) -> tuple[Split, Split]:
    """Learnable MNIST-shaped data: a fixed random template per class plus noise; the same on every call."""
    templates = torch.rand(10, 28, 28, generator=torch.Generator().manual_seed(SYNTHETIC_SEED)) * 255

    def make(n: int, seed: int, flag: str) -> Split:
        gen = torch.Generator().manual_seed(seed)
        try:
            labels = torch.randint(0, 10, (n,), generator=gen)
            noise = torch.randn(n, 28, 28, generator=gen) * 60
        except (RuntimeError, TypeError) as exc:
            # torch's CPU allocator refuses what cannot fit at once; its error is a C++ traceback of several lines.
            # Counts past its byte arithmetic (config's MAX_SAMPLES keeps the command line below them; code can
            # call this with any) fail before any allocation: from 2**62 a RuntimeError "Storage size calculation
            # overflowed", from 2**63 a TypeError "Overflow when unpacking long long".
            if not any(words in str(exc) for words in ("can't allocate memory", "overflowed", "Overflow")):
                raise
            raise UserError(f"{flag} {n}: {n:,} synthetic images (made in float32, 3 KiB each) do not fit in this "
                            "machine's memory; lower it") from None
        images = (templates[labels] * 0.6 + noise + 40).clamp_(0, 255).to(torch.uint8)
        return Split(images, labels)

    return (make(train_size, SYNTHETIC_SEED + 1, "--synthetic-train-size"),
            make(test_size, SYNTHETIC_SEED + 2, "--synthetic-test-size"))


def load_splits(cfg: TrainConfig, ctx: DistContext) -> tuple[Split, Split]:
    if cfg.dataset == "synthetic":
        return synthetic_splits(cfg.synthetic_train_size, cfg.synthetic_test_size)
    return load_mnist(cfg, ctx)


class BatchIndexDataset(Dataset):
    """Whole-batch indexing: one tensor gather per batch instead of per-sample Python work and collation."""

    def __init__(self, split: Split, device: torch.device | None = None) -> None:
        self.images = split.images if device is None else split.images.to(device)
        self.labels = split.labels if device is None else split.labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.images[index], self.labels[index]


class ResumableBatchSampler(Sampler[list[int]]):
    """This rank's batches of a DistributedSampler epoch, optionally starting `skip_batches` into it."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batches = BatchSampler(sampler, batch_size, drop_last=True)
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        # Without set_epoch every epoch would replay the same order (pytorch/pytorch#31771).
        self.sampler.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.skip_batches, None)

    def __len__(self) -> int:
        return len(self.batches) - self.skip_batches


class ShardSampler(Sampler[int]):
    """Strided, unpadded shard for evaluation: every sample on exactly one rank, at any world size.

    DistributedSampler pads by repeating samples, which would count some test images twice
    (pytorch/pytorch#25162), so evaluation uses this instead.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sampler_order(sampler: Iterable[int]) -> torch.Tensor:
    """The indices `sampler` yields, in its order, as one int64 tensor.

    DistributedSampler's order is computed here in tensors, step for step as its __iter__ does (a seeded CPU
    randperm, padding by repetition or a cut, then every world_size-th index from rank): its __iter__ builds Python
    lists of every index, and those 60,000 ints, made into a tensor, took 4.4 ms of host time at each epoch's
    start on our CPU (0.27 ms here), which on a GPU the idle device waits out. tests/test_data.py checks it against
    the sampler's own iteration, so a torch that changes the algorithm fails there, not silently in a run.
    """
    if isinstance(sampler, DistributedSampler):
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if sampler.shuffle:
            generator = torch.Generator()
            generator.manual_seed(sampler.seed + sampler.epoch)
            indices = torch.randperm(size, generator=generator)
        else:
            indices = torch.arange(size)
        padding = sampler.total_size - size
        if sampler.drop_last or padding <= 0:
            indices = indices[:sampler.total_size]
        else:
            indices = torch.cat([indices, indices.repeat(math.ceil(padding / size))[:padding]])
        return indices[sampler.rank:sampler.total_size:sampler.num_replicas]
    if isinstance(sampler, ShardSampler):
        return torch.arange(sampler.indices.start, sampler.indices.stop, sampler.indices.step)
    return torch.as_tensor(list(sampler), dtype=torch.long)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to `device`, asynchronously only on CUDA.

    There the batch is pinned (the loaders' pin_memory) or already on the GPU (--data-on-device), the two cases in
    which non_blocking means something; on CPU the copy is a no-op.
    """
    return tensor.to(device, non_blocking=device.type == "cuda")


class DeviceBatchLoader:
    """The batches of a batch sampler, gathered from tensors already on the device: each pass builds the sampler's
    index order once and uploads it once, and every batch is a slice of it, so a step does no host-side index work
    and no host-to-device copy. The order is the sampler's own (for training: the DistributedSampler epoch with
    ResumableBatchSampler's skip), so resume and elastic world-size changes see the batches they always did."""

    def __init__(self, dataset: BatchIndexDataset, batches: BatchSampler | ResumableBatchSampler) -> None:
        self.dataset = dataset
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.batches.batches if isinstance(self.batches, ResumableBatchSampler) else self.batches
        skip = self.batches.skip_batches if isinstance(self.batches, ResumableBatchSampler) else 0
        device = self.dataset.labels.device
        order = sampler_order(sampler.sampler)
        if device.type == "cuda":
            # From pinned memory the upload is queued behind the running steps instead of waiting for them. Made
            # contiguous first: with 2+ ranks the order is a strided view (every W-th index), which the upload
            # would copy into an unpinned temporary and send from there, waiting.
            order = order.contiguous().pin_memory()
        order = order.to(device, non_blocking=True)
        size = sampler.batch_size
        for i in range(skip, len(sampler)):
            index = order[i * size:(i + 1) * size]
            yield self.dataset.images[index], self.dataset.labels[index]

    def __len__(self) -> int:
        return len(self.batches)


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 28, 28] -> normalised float32 [B, 1, 28, 28] on `device`, done once per batch.

    With one channel, NCHW and NHWC are the same bytes, and only the strides tell a convolution which layout to
    run: `contiguous(memory_format=torch.channels_last)` keeps NCHW's (784, 784, 28, 1), which counts as
    channels-last-contiguous, so conv1 ran in NCHW and its output was copied to NHWC for conv2 (and back for the
    backward pass). Made as a [B, 28, 28, 1] tensor seen as [B, 1, 28, 28], the strides are (784, 1, 28, 1) and
    conv1 runs and answers in NHWC like the rest: the same values, and on the 2-core CPU an 11% faster step.
    """
    x = to_device(images, device).unsqueeze(-1 if channels_last else 1).float()
    x = x.sub_(MNIST_MEAN * 255).mul_(1.0 / (MNIST_STD * 255))
    return x.permute(0, 3, 1, 2) if channels_last else x


@dataclass
class DataPipeline:
    train_loader: DataLoader | DeviceBatchLoader
    train_batches: ResumableBatchSampler
    test_loader: DataLoader | DeviceBatchLoader
    train_size: int
    # Images in this rank's first evaluation batch: its shard of the test set, cut at --eval-batch-size.
    first_test_batch: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_batches.batches)

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes of each loader (0 with the data on the device)."""
        return self.train_loader.num_workers if isinstance(self.train_loader, DataLoader) else 0

    @property
    def workers(self) -> bool:
        """Whether DataLoader worker processes load the batches (never with the data on the device)."""
        return self.num_workers > 0


def worker_count_note(workers: int, cpus: int, ranks_on_host: int) -> str | None:
    """A `note:` when --num-workers starts more loader processes on this host than it has CPUs (`cpus`, those this
    process may run on, for `ranks_on_host` ranks); None otherwise.

    A note, not a refusal or a silent cap, up to config's refusal of more than MAX_WORKERS_PER_CPU per CPU: torch
    itself only warns, the limit that bites first (memory) depends on the host, and a user may mean it. But each
    worker is a spawned Python process with torch loaded: on the 2-core CPU 64 of them took over 3 minutes without
    finishing 5 steps, and over 14 GiB (PSS) before the evaluation's 64 started.
    """
    if (count := beyond_host_cpus(workers, ranks_on_host, cpus, "DataLoader processes")) is None:
        return None
    return (f"note: --num-workers {workers} starts {count}, "
            "and as many again at the first evaluation: more workers than CPUs load no faster, and each costs seconds "
            "of start-up and hundreds of MB (a process with torch loaded)")



def accumulation_note(train_size: int, world_size: int, batch_size: int, batches_per_rank: int,
                      accumulation_steps: int) -> str | None:
    """A `note:` when --grad-accum-steps leaves an epoch's last batches of each rank out (they fill no whole round
    of `accumulation_steps`); None when the rounds use them all.

    It counts the images an epoch then leaves out, beside those the sampler already does (a share's last images that
    fill no batch, README's "Training covers an epoch"): the ranks train the first W x (trained batches) x B places
    of the epoch's order, and places past the training set are the padding's repeats of its first images, so
    max(0, N - W x batches x B) images are left out."""
    used = batches_per_rank // accumulation_steps * accumulation_steps
    if used == batches_per_rank:
        return None

    def left_out(batches: int) -> int:
        return max(0, train_size - world_size * batches * batch_size)

    by_batches, total = left_out(batches_per_rank), left_out(used)
    return (f"note: --grad-accum-steps {accumulation_steps} trains whole rounds only: {used:,} of each rank's "
            f"{batches_per_rank:,} batches an epoch, so an epoch leaves out {total:,} of the {train_size:,} training "
            f"images ({total - by_batches:,} in the batches that fill no round, {by_batches:,} that fill no batch)")


def synthetic_data_note(cfg: TrainConfig) -> str | None:
    """A `note:` when --data-dir or --no-download is given with --dataset synthetic, which reads no files.

    A note, not the refusal that --synthetic-train-size gets without --dataset synthetic (config._DEPENDENT_FLAGS):
    that run would train on other data than the flag asks for, while this one trains on exactly what --dataset asks
    for, and the flags only say where MNIST is and whether it may be fetched. A job script that passes them on every
    run (launch/gpu_check.sh's smoke runs do) stays usable for a synthetic smoke run, and an empty --data-dir is
    accepted there for the same reason (tests/test_config.py)."""
    given = cfg.given_flags("data_dir", "no_download")
    if cfg.dataset != "synthetic" or not given:
        return None
    listed = " and ".join(given)
    return (f"note: {listed} {'has' if len(given) == 1 else 'have'} no effect with --dataset synthetic (it makes its "
            "data, and reads or downloads no files)")

def build_pipeline(cfg: TrainConfig, ctx: DistContext, train: Split, test: Split, on_device: bool) -> DataPipeline:
    cuda = ctx.device.type == "cuda"
    dataset_device = ctx.device if on_device else None
    train_set, test_set = BatchIndexDataset(train, dataset_device), BatchIndexDataset(test, dataset_device)
    train_sampler: DistributedSampler[int] = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                                                shuffle=True, seed=cfg.seed)
    train_batches = ResumableBatchSampler(train_sampler, cfg.batch_size)
    if len(train_batches.batches) == 0:
        raise UserError(f"--batch-size {cfg.batch_size}{value_source(cfg, 'batch_size', ctx.device.type)} is larger "
                        f"than this rank's share of the training set ({len(train_sampler)} samples); give a smaller "
                        "--batch-size")
    test_shard = ShardSampler(len(test), ctx.rank, ctx.world_size)
    test_batches = BatchSampler(test_shard, cfg.eval_batch_size, drop_last=False)
    first_test_batch = min(cfg.eval_batch_size, len(test_shard))
    if on_device:
        return DataPipeline(DeviceBatchLoader(train_set, train_batches), train_batches,
                            DeviceBatchLoader(test_set, test_batches), len(train), first_test_batch)
    workers = cfg.num_workers
    # Own generator: iterating a loader otherwise draws a seed from the global RNG, so an extra evaluation or a
    # resumed epoch would shift every later dropout mask and a resumed run would not match an uninterrupted one.
    generator = torch.Generator().manual_seed(cfg.seed)
    # spawn, not fork: by now the rank is multithreaded (gloo, NCCL, queue feeders), and a forked child inherits
    # every lock another thread held at that instant; a CI run hung waiting on a forked worker. The decoded tensors
    # reach the workers through shared memory (/dev/shm); persistent workers start once a run.
    context = DataWorkerContext() if workers else None
    init = leave_stop_signals_to_the_rank if workers else None
    if workers:
        # torch warns of more workers than CPUs in a paragraph with its file path, when a loader is made and when it
        # starts its workers, counting this process alone; worker_count_note says it in one line, for the host.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)

    def loader(dataset: BatchIndexDataset, batches: Sampler[list[int]]) -> DataLoader:
        # batch_size=None: the sampler already yields whole batches and the dataset gathers them in one indexing op.
        return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers, pin_memory=cuda,
                          persistent_workers=workers > 0, generator=generator, multiprocessing_context=context,
                          worker_init_fn=init)

    return DataPipeline(loader(train_set, train_batches), train_batches, loader(test_set, test_batches), len(train),
                        first_test_batch)
