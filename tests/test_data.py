"""Data: IDX reading and its errors, training shards and their order, exact evaluation shards, and the fast
batch pipeline against the plain torchvision one."""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import math
import stat
import struct
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_mnist_dir, write_idx
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision import datasets, transforms

from dist_mnist.config import TrainConfig, parse_args, usable_cpus
from dist_mnist.data import (
    MAX_IDX_IMAGES,
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    DataView,
    ResumableBatchSampler,
    ShardSampler,
    Split,
    accumulation_note,
    build_pipeline,
    load_mnist,
    mnist_raw_dir,
    normalize,
    sampler_order,
    synthetic_data_note,
    synthetic_splits,
    to_device,
    worker_count_note,
)
from dist_mnist.distributed import DistContext, thread_count_note
from dist_mnist.errors import UserError

WORLD_SIZES = [1, 2, 3, 7]
CPU = torch.device("cpu")


def cpu_ctx(rank: int = 0, world_size: int = 1) -> DistContext:
    """Rank `rank` of a world that needs no process group: the code under test makes no collective call."""
    return DistContext(rank=rank, world_size=world_size, device=CPU, backend="gloo",
                       control_group=None)


def mnist_cfg(data_dir: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(data_dir=str(data_dir), no_download=True, **overrides)


def train_batches(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int = 0
                  ) -> ResumableBatchSampler:
    indices = TensorDataset(torch.arange(num_samples))  # a dataset of that size: the sampler reads only its length
    sampler: DistributedSampler[int] = DistributedSampler(indices, num_replicas=world_size, rank=rank, shuffle=True,
                                                          seed=seed)
    return ResumableBatchSampler(sampler, batch_size)


def epoch_batches(batches: ResumableBatchSampler, epoch: int, skip: int = 0) -> list[list[int]]:
    batches.set_epoch(epoch, skip_batches=skip)
    return list(batches)


# ---------------------------------------------------------------------------------------------------------------
# Training shards


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_train_shards_disjoint_and_complete(world_size: int) -> None:
    # 210 divides by 1, 2, 3 and 7, and batch 5 divides every shard: nothing is padded or dropped.
    shards = [sum(epoch_batches(train_batches(210, 5, r, world_size), epoch=0), []) for r in range(world_size)]
    counts = collections.Counter(i for shard in shards for i in shard)
    assert sorted(counts) == list(range(210))
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_uneven_train_set_gives_every_rank_the_same_number_of_steps(world_size: int) -> None:
    # DDP hangs when one rank runs a step the others do not: shards must stay equal even when 203 does not divide.
    per_rank = [epoch_batches(train_batches(203, 4, r, world_size), epoch=0) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    samplers = [train_batches(203, 4, r, world_size).sampler for r in range(world_size)]
    assert set().union(*(set(s) for s in samplers)) == set(range(203))
    assert sum(len(s) for s in samplers) == math.ceil(203 / world_size) * world_size


def test_set_epoch_reshuffles_and_is_repeatable() -> None:
    batches = train_batches(203, 8, rank=1, world_size=2, seed=5)
    epoch0, epoch1 = epoch_batches(batches, 0), epoch_batches(batches, 1)
    assert epoch0 != epoch1
    assert epoch_batches(train_batches(203, 8, rank=1, world_size=2, seed=5), 1) == epoch1
    assert epoch_batches(train_batches(203, 8, rank=1, world_size=2, seed=6), 1) != epoch1


@pytest.mark.parametrize("skip", [0, 3, 12])
def test_skip_batches_continues_the_same_order(skip: int) -> None:
    batches = train_batches(203, 8, rank=0, world_size=2)
    full = epoch_batches(batches, 4)
    resumed = epoch_batches(train_batches(203, 8, rank=0, world_size=2), 4, skip=skip)
    assert resumed == full[skip:]
    assert len(batches) == len(full)
    batches.set_epoch(4, skip_batches=skip)
    assert len(batches) == len(full) - skip
    batches.set_epoch(5)  # a new epoch starts from its first batch again
    assert len(batches) == len(full)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("size", "shuffle", "drop_last"), [(203, True, False), (203, False, False),
                                                            (203, True, True), (2, True, False), (60_000, True, False)])
def test_sampler_order_is_the_distributed_samplers_own(world_size: int, size: int, shuffle: bool,
                                                       drop_last: bool) -> None:
    """The device loader's tensor order equals DistributedSampler's own iteration, padding (2 samples over 7 ranks
    repeat the set) and cut included, on every rank, epoch and seed."""
    for rank in range(world_size):
        sampler: DistributedSampler[int] = DistributedSampler(TensorDataset(torch.arange(size)),
                                                              num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                              seed=3, drop_last=drop_last)
        for epoch in (0, 1, 5):
            sampler.set_epoch(epoch)
            order = sampler_order(sampler)
            assert order.dtype == torch.int64 and order.tolist() == list(sampler)
    shard = ShardSampler(203, 1, world_size)
    assert sampler_order(shard).tolist() == list(shard)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation shards


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shard_sampler_counts_every_test_index_once(world_size: int) -> None:
    shards = [list(ShardSampler(203, r, world_size)) for r in range(world_size)]
    assert sorted(sum(shards, [])) == list(range(203))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardSampler(203, r, world_size)) for r in range(world_size)] == list(map(len, shards))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_eval_loader_yields_every_test_image_once(world_size: int) -> None:
    train, test = synthetic_splits(64, 203)
    # Labels replaced by positions, so each yielded label says which test image it came with.
    tagged = Split(test.images, torch.arange(len(test)))
    cfg = TrainConfig(batch_size=4, eval_batch_size=50)
    seen: list[int] = []
    for rank in range(world_size):
        pipeline = build_pipeline(cfg, cpu_ctx(rank, world_size), train, tagged, on_device=False)
        for images, positions in pipeline.test_loader:
            assert torch.equal(images, test.images[positions])
            seen += positions.tolist()
    assert sorted(seen) == list(range(203))


# ---------------------------------------------------------------------------------------------------------------
# IDX files


def test_idx_files_decode_to_the_written_tensors(tmp_path: Path) -> None:
    train, test = load_mnist(mnist_cfg(make_mnist_dir(tmp_path, train_size=300, test_size=101)), cpu_ctx())
    expected_train, expected_test = synthetic_splits(300, 101)
    for got, expected in ((train, expected_train), (test, expected_test)):
        assert got.images.dtype == torch.uint8 and got.labels.dtype == torch.int64
        assert torch.equal(got.images, expected.images) and torch.equal(got.labels, expected.labels)


def _wrong_magic(data: bytes) -> bytes:
    return b"\x12\x34\x56\x78" + data[4:]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _header_only(data: bytes) -> bytes:
    return data[:6]


@pytest.mark.parametrize("corrupt", [_wrong_magic, _truncated, _header_only, lambda data: b""],
                         ids=["wrong-magic", "truncated", "cut-in-header", "empty"])
@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_corrupt_idx_file_is_named(tmp_path: Path, name: str, corrupt: Callable[[bytes], bytes]) -> None:
    data_dir = make_mnist_dir(tmp_path)
    path = mnist_raw_dir(str(data_dir)) / name
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(UserError, match=f"^{path} is not a valid MNIST IDX file") as excinfo:
        load_mnist(mnist_cfg(data_dir), cpu_ctx())
    assert "\n" not in str(excinfo.value)


def test_an_idx_file_longer_than_its_header_says_is_refused_before_its_body_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sparse file of 8 GiB whose header claims one image: the size is checked against the header's first, so
    # the body is never read (reading it whole allocated the 8 GiB).
    data_dir = make_mnist_dir(tmp_path)
    path = mnist_raw_dir(str(data_dir)) / "train-images-idx3-ubyte"
    write_idx(path, torch.zeros(1, 28, 28))
    with open(path, "r+b") as f:
        f.truncate(8 << 30)
    reads: list[int] = []
    real_open = open

    class CountingFile:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> CountingFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def fileno(self) -> int:
            return int(self.f.fileno())

        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            return bytes(self.f.read(n))

    monkeypatch.setattr("dist_mnist.data.open", lambda p, *a, **k: CountingFile(real_open(p, *a, **k)),
                        raising=False)
    with pytest.raises(UserError, match=f"^{path} is not a valid MNIST IDX file .*{(8 << 30) - 16} data bytes for a "
                                        r"shape of \(1, 28, 28\)") as excinfo:
        load_mnist(mnist_cfg(data_dir), cpu_ctx())
    assert "\n" not in str(excinfo.value)
    assert reads == [16]  # the header only


def _sparse_idx(path: Path, shape: tuple[int, ...]) -> None:
    """An IDX file whose header declares `shape` and whose body is a hole of that size: 4 KiB on disk."""
    with open(path, "wb") as f:
        f.write(struct.pack(f">I{len(shape)}I", 0x0800 + len(shape), *shape))
        f.truncate(4 + 4 * len(shape) + math.prod(shape))


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts the data module's file reads ask for (read and readinto), from here on."""
    reads: list[int] = []
    real_open = open

    class CountingFile(io.BufferedReader):
        def read(self, n: int | None = -1) -> bytes:
            reads.append(-1 if n is None else n)
            return super().read(n)

        def readinto(self, buffer: Any) -> int:
            reads.append(len(memoryview(buffer)))
            return super().readinto(buffer)

    def counting_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        assert mode == "rb"
        return CountingFile(real_open(path, "rb", buffering=0))

    monkeypatch.setattr("dist_mnist.data.open", counting_open, raising=False)
    return reads


@pytest.mark.parametrize(("images", "labels", "refusal"), [
    # review_security F11's file: 2^22 images of 16x16 over a 1 GiB hole (here 2^16: the same checks, 16 MiB)
    ((1 << 16, 16, 16), None, r"do not match: \(65536, 16, 16\) images of 28x28 expected with as many labels, got "
                              "300 labels"),
    ((1 << 16, 28, 28), None, r"do not match: \(65536, 28, 28\) images of 28x28 expected with as many labels, got "
                              "300 labels"),
    # Both sparse and agreeing: only the bound stops them (7.8 GB of images over a hole).
    ((MAX_IDX_IMAGES + 1, 28, 28), (MAX_IDX_IMAGES + 1,), "hold 10,000,001 images by their headers, more than the "
                                                         "10,000,000 this reader takes"),
], ids=["16x16", "more-images-than-labels", "beyond-the-bound"])
def test_an_idx_pairs_shapes_are_checked_before_either_body_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: tuple[int, ...], labels: tuple[int, ...] | None,
        refusal: str) -> None:
    """A sparse IDX file costs nothing on disk and its header can declare any shape its size matches: in a shared
    data folder one was read and copied whole (2.7 GB at the peak) before its 28x28 shape was checked. The headers
    of both files of the split are read and checked against each other first, and no body is read."""
    data_dir = make_mnist_dir(tmp_path, train_size=300)
    raw = mnist_raw_dir(str(data_dir))
    _sparse_idx(raw / "train-images-idx3-ubyte", images)
    if labels is not None:
        _sparse_idx(raw / "train-labels-idx1-ubyte", labels)
    reads = _count_reads(monkeypatch)
    with pytest.raises(UserError, match=f"^{raw / 'train-images-idx3-ubyte'} and {raw / 'train-labels-idx1-ubyte'} "
                                        f"{refusal}"):
        load_mnist(mnist_cfg(data_dir), cpu_ctx())
    assert reads == [16, 8]  # the two headers only


def test_an_idx_body_is_read_once_into_its_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bodies go straight into their tensors (readinto), not into bytes copied out afterwards."""
    data_dir = make_mnist_dir(tmp_path, train_size=300, test_size=101)
    reads = _count_reads(monkeypatch)
    train, test = load_mnist(mnist_cfg(data_dir), cpu_ctx())
    assert reads == [16, 8, 300 * 784, 300, 16, 8, 101 * 784, 101]
    expected_train, expected_test = synthetic_splits(300, 101)
    assert torch.equal(train.images, expected_train.images) and torch.equal(test.labels, expected_test.labels)


def test_images_and_labels_that_do_not_match_are_refused(tmp_path: Path) -> None:
    data_dir = make_mnist_dir(tmp_path, train_size=300, test_size=101)
    raw = mnist_raw_dir(str(data_dir))
    (raw / "train-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(UserError, match="train-images-idx3-ubyte and .*train-labels-idx1-ubyte do not match"):
        load_mnist(mnist_cfg(data_dir), cpu_ctx())


def test_labels_outside_0_to_9_are_refused(tmp_path: Path) -> None:
    data_dir = make_mnist_dir(tmp_path, train_size=300, test_size=101)
    write_idx(mnist_raw_dir(str(data_dir)) / "t10k-labels-idx1-ubyte", torch.full((101,), 12))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte holds labels outside 0-9"):
        load_mnist(mnist_cfg(data_dir), cpu_ctx())


def test_missing_files_name_all_four_and_the_flags(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        load_mnist(mnist_cfg(tmp_path / "nowhere"), cpu_ctx())
    message = str(excinfo.value)
    assert all(message.count(name) == 1 for name in MNIST_FILES)  # each named once, not listed twice
    assert "--data-dir" in message and "DIST_MNIST_DATA" in message and "--no-download" in message
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message


def test_a_download_fetches_only_the_missing_files_and_writes_over_none(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's MNIST download fetches all four files when one is missing, writing over the others (through a
    symbolic link, over its target); a failure named all four, the present ones too."""
    import torchvision.datasets.mnist

    source_raw = mnist_raw_dir(str(make_mnist_dir(tmp_path / "source")))
    data_dir = make_mnist_dir(tmp_path / "data")
    raw = mnist_raw_dir(str(data_dir))
    shared = tmp_path / "shared-train-images"  # a link into another folder, whose file must stay as it is
    (raw / "train-images-idx3-ubyte").rename(shared)
    (raw / "train-images-idx3-ubyte").symlink_to(shared)
    written = shared.stat().st_mtime_ns
    (raw / "t10k-images-idx3-ubyte").unlink()
    fetched = []

    def download(url: str, download_root: str, filename: str, md5: str) -> None:
        fetched.append(filename)
        name = filename.removesuffix(".gz")
        (Path(download_root) / name).write_bytes((source_raw / name).read_bytes())

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", download)
    train, test = load_mnist(TrainConfig(data_dir=str(data_dir)), cpu_ctx())
    assert fetched == ["t10k-images-idx3-ubyte.gz"]
    assert shared.stat().st_mtime_ns == written and (len(train.labels), len(test.labels)) == (300, 101)

    def unreachable(url: str, download_root: str, filename: str, md5: str) -> None:
        raise RuntimeError("no route to host")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", unreachable)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError) as failure:
        load_mnist(TrainConfig(data_dir=str(data_dir)), cpu_ctx())
    # torchvision's own words around the failure differ by version (0.26 passes the fetch's error on as it is).
    assert str(failure.value).startswith(f"could not download MNIST into {raw} (")
    assert "no route to host" in str(failure.value)
    assert "); copy the files t10k-labels-idx1-ubyte there, or point --data-dir" in str(failure.value)
    # A present file that is damaged is read by our reader after the download, with its own line: torchvision's
    # decoding after its download failed on it first, as a failed download (or an uncaught AssertionError).
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", download)
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x12\x34\x56\x78" + labels.read_bytes()[4:])
    with pytest.raises(UserError, match=f"^{labels} is not a valid MNIST IDX file"):
        load_mnist(TrainConfig(data_dir=str(data_dir)), cpu_ctx())
    assert fetched[-1] == "t10k-labels-idx1-ubyte.gz"


class _Mirror(http.server.SimpleHTTPRequestHandler):
    """A local MNIST mirror (127.0.0.1) that records what it is asked for, quietly."""
    requests: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:
        _Mirror.requests.append(self.path)


@pytest.fixture
def local_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """torchvision's MNIST downloads from a folder served on 127.0.0.1 and takes its files' md5s, so its real
    download code runs (its writes included) without a network; yields the folder the files go in."""
    served = tmp_path / "mirror"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Mirror, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    real_resources = datasets.MNIST.resources

    class Resources:
        """MNIST.resources with the md5 of each file the mirror serves, read as load_mnist reads the list."""
        def __iter__(self) -> Iterator[tuple[str, str]]:
            return iter([(name, hashlib.md5((served / name).read_bytes()).hexdigest()
                          if (served / name).exists() else md5) for name, md5 in real_resources])

    monkeypatch.setattr(datasets.MNIST, "resources", Resources())
    _Mirror.requests = []
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("planted", ["t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"])
def test_a_download_writes_through_no_symbolic_link_planted_in_the_data_folder(
        tmp_path: Path, local_mirror: Path, planted: str) -> None:
    """review_security F3: in a shared --data-dir another user deletes a file and plants a link where torchvision's
    download writes (its .gz, or the file it extracts, where a dangling link counts as the file missing): the
    victim's run wrote through it, over the victim's file. torchvision's real download (from a local mirror) now
    writes in a staging folder, and the file is renamed into place: the victim's file is untouched, and a link at
    the file's name is replaced by the file."""
    data_dir = make_mnist_dir(tmp_path / "data", test_size=101)
    raw = mnist_raw_dir(str(data_dir))
    labels = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (local_mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("the victim's notes")
    # The .gz link names an existing file, the extracted name's a new one (dangling).
    (raw / planted).symlink_to(victim / ("notes.txt" if planted.endswith(".gz") else "new.txt"))
    _, test = load_mnist(TrainConfig(data_dir=str(data_dir)), cpu_ctx())
    assert sorted(path.name for path in victim.iterdir()) == ["notes.txt"]
    assert (victim / "notes.txt").read_text() == "the victim's notes"
    assert len(test.labels) == 101 and (raw / "t10k-labels-idx1-ubyte").read_bytes() == labels
    assert not (raw / "t10k-labels-idx1-ubyte").is_symlink()
    assert set(_Mirror.requests) == {"/t10k-labels-idx1-ubyte.gz"}


def test_a_folder_where_a_missing_file_goes_is_refused_before_the_download(tmp_path: Path,
                                                                         local_mirror: Path) -> None:
    """The rename into place would fail on a folder, after the whole fetch: refused before anything is fetched."""
    data_dir = make_mnist_dir(tmp_path / "data", test_size=101)
    raw = mnist_raw_dir(str(data_dir))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").mkdir()
    with pytest.raises(UserError) as refused:
        load_mnist(TrainConfig(data_dir=str(data_dir)), cpu_ctx())
    assert str(refused.value) == (
        f"could not download MNIST into {raw} (t10k-labels-idx1-ubyte is a folder, where the download would put the "
        "file; remove it first); copy the files t10k-labels-idx1-ubyte there, or point --data-dir / DIST_MNIST_DATA at "
        "a folder holding MNIST/raw/")
    assert _Mirror.requests == []


def test_a_link_planted_while_the_download_runs_is_replaced_not_written_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal above checks before the download; a link planted after the check, while torchvision fetches,
    was written through all the same (the check-then-use race, noticed 2026-11-29). The files are fetched into a
    folder of this process's own and renamed into place: a rename replaces the link at the name."""
    import torchvision.datasets.mnist

    source_raw = mnist_raw_dir(str(make_mnist_dir(tmp_path / "source")))
    data_dir = make_mnist_dir(tmp_path / "data")
    raw = mnist_raw_dir(str(data_dir))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("the victim's notes")

    temporary = tmp_path / "tmp"
    temporary.mkdir(mode=0o1777)  # /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    staged: list[Path] = []

    def download(url: str, download_root: str, filename: str, md5: str) -> None:
        name = filename.removesuffix(".gz")
        staged.append(Path(download_root))
        (raw / name).symlink_to(victim)  # planted after the check, before the file is written
        for written in (filename, name):  # torchvision writes the .gz, then the file it extracts
            (Path(download_root) / written).write_bytes((source_raw / name).read_bytes())

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", download)
    _, test = load_mnist(TrainConfig(data_dir=str(data_dir)), cpu_ctx())
    assert victim.read_text() == "the victim's notes" and len(test.labels) == 101
    assert not (raw / "t10k-labels-idx1-ubyte").is_symlink()
    assert stat.S_IMODE((raw / "t10k-labels-idx1-ubyte").stat().st_mode) == 0o644
    # Fetched outside the shared folder, where nobody else could rename the staging folder away and put theirs in
    # its place (review_download 1), and nothing left behind: no staging folder, no temporary file, no .gz.
    assert [folder.parent for folder in staged] == [temporary] and list(temporary.iterdir()) == []
    assert sorted(path.name for path in raw.iterdir()) == sorted(MNIST_FILES)


def test_one_missing_file_is_named_first(tmp_path: Path) -> None:
    data_dir = make_mnist_dir(tmp_path)
    (mnist_raw_dir(str(data_dir)) / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(UserError, match="^MNIST files missing in .*: t10k-images-idx3-ubyte \\(expected"):
        load_mnist(mnist_cfg(data_dir), cpu_ctx())


@dataclasses.dataclass(frozen=True)
class TwoNodeCtx(DistContext):
    """A rank of a world of two whose peer's disk is `peer` (its DataView); collectives answer from that."""
    peer: DataView | None = None

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj, self.peer] if self.rank == 0 else [self.peer, obj]

    def broadcast_object(self, obj: Any) -> Any:
        raise AssertionError("a download was attempted: rank 0 has the files")


def forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torchvision's MNIST was asked to download")
    monkeypatch.setattr(datasets, "MNIST", refuse)


def test_a_rank_whose_node_lacks_the_files_that_rank_0_has_is_told_to_copy_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 went to the download's broadcast while rank 0, whose files were there, went on: both waited for
    --timeout-s and then blamed a timed-out collective. Nothing downloads: rank 0 has the files."""
    forbid_downloads(monkeypatch)
    rank0_raw = mnist_raw_dir(str(make_mnist_dir(tmp_path / "node0")))
    ctx = TwoNodeCtx(rank=1, world_size=2, device=CPU, backend="gloo", control_group=None,
                     peer=DataView(str(rank0_raw), [], no_download=False))
    raw = tmp_path / "node1" / "MNIST" / "raw"
    with pytest.raises(UserError) as excinfo:
        load_mnist(TrainConfig(data_dir=str(tmp_path / "node1")), ctx)
    assert str(excinfo.value) == (
        f"MNIST files missing in {raw}: {', '.join(MNIST_FILES)}; point --data-dir or DIST_MNIST_DATA at the folder "
        f"holding MNIST/raw/, or copy them there: only global rank 0 downloads, into its own --data-dir ({rank0_raw})")
    assert not raw.exists()


@pytest.mark.parametrize("no_download", [False, True])
def test_rank_0_names_the_rank_that_lacks_the_files_instead_of_waiting_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: bool) -> None:
    forbid_downloads(monkeypatch)
    peer_raw = str(tmp_path / "node1" / "MNIST" / "raw")
    ctx = TwoNodeCtx(rank=0, world_size=2, device=CPU, backend="gloo", control_group=None,
                     peer=DataView(peer_raw, list(MNIST_FILES[2:]), no_download=no_download))
    with pytest.raises(UserError) as excinfo:
        load_mnist(TrainConfig(data_dir=str(make_mnist_dir(tmp_path / "node0"))), ctx)
    assert str(excinfo.value) == (
        f"MNIST files missing in {peer_raw} on rank 1 (the error line of each rank named lists the files); point "
        "--data-dir at a folder every node sees, or copy MNIST/raw/ to every node")


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def test_cpu_loaders_do_not_pin_memory_and_workers_are_spawned_once() -> None:
    train, test = synthetic_splits(64, 20)
    pipeline = build_pipeline(TrainConfig(batch_size=8), cpu_ctx(), train, test, on_device=False)
    assert isinstance(pipeline.train_loader, DataLoader) and isinstance(pipeline.test_loader, DataLoader)
    assert not pipeline.train_loader.pin_memory and not pipeline.test_loader.pin_memory
    assert pipeline.train_loader.num_workers == 0 and not pipeline.train_loader.persistent_workers
    with_workers = build_pipeline(TrainConfig(batch_size=8, num_workers=2), cpu_ctx(), train, test, on_device=False)
    for loader in (with_workers.train_loader, with_workers.test_loader):
        assert isinstance(loader, DataLoader)
        assert loader.persistent_workers and loader.multiprocessing_context.get_start_method() == "spawn"


@pytest.mark.parametrize(("workers", "cpus", "ranks", "noted"), [
    (0, 1, 4, False), (2, 2, 1, False), (1, 2, 2, False), (3, 2, 1, True), (2, 2, 2, True), (500, 2, 1, True)])
def test_more_workers_than_the_hosts_cpus_draws_one_note(workers: int, cpus: int, ranks: int, noted: bool) -> None:
    """The note counts every rank's workers on the host against its CPUs; within them there is nothing to say."""
    note = worker_count_note(workers, cpus, ranks)
    if not noted:
        assert note is None
        return
    assert note is not None and "\n" not in note
    on_host = f"{workers * ranks} DataLoader processes on this host's {cpus} CPUs"
    per_rank = f" ({workers} per rank x {ranks} ranks)" if ranks > 1 else ""
    assert note.startswith(f"note: --num-workers {workers} starts {on_host}{per_rank}, and as many again at the "
                           "first evaluation: more workers than CPUs load no faster"), note


@pytest.mark.parametrize(("threads", "ranks", "cpus", "expected"), [
    (2, 2, 2, "note: --threads 2 runs 4 intra-op threads on this host's 2 CPUs (2 per rank x 2 ranks): threads "
              "beyond the CPUs wait for each other"),
    (3, 1, 2, "note: --threads 3 runs 3 intra-op threads on this host's 2 CPUs: threads"),
    (1, 2, 2, None), (2, 1, 2, None), (0, 8, 2, None)])  # 0: torch's own count (torchrun's OMP_NUM_THREADS)
def test_threads_times_the_hosts_ranks_beyond_its_cpus_draw_one_note(threads: int, ranks: int, cpus: int,
                                                                      expected: str | None) -> None:
    """review_combos finding 6: the --num-workers note's count, for --threads (2 ranks of --threads 2 on 2 CPUs ran
    a third slower, without a word)."""
    note = thread_count_note(threads, ranks, cpus)
    assert note == expected if expected is None else note is not None and note.startswith(expected)


@pytest.mark.parametrize(("size", "world", "batch", "accumulation", "expected"), [
    # review_combos' example: 31 batches, one round of 16; every image of the share fills a batch.
    (496, 1, 16, 16, "note: --grad-accum-steps 16 trains whole rounds only: 16 of each rank's 31 batches an epoch, "
                     "so an epoch leaves out 240 of the 496 training images (240 in the batches that fill no round, 0 "
                     "that fill no batch)"),
    # 8 ranks of the cuda recipe's 512: 14 batches each, and the 2,656 images README's sampler count gives for them.
    (60_000, 8, 512, 4, "note: --grad-accum-steps 4 trains whole rounds only: 12 of each rank's 14 batches an epoch, "
                        "so an epoch leaves out 10,848 of the 60,000 training images (8,192 in the batches that fill "
                        "no round, 2,656 that fill no batch)"),
    (60_000, 2, 16, 3, None),  # 1,875 batches a rank: whole rounds of 3
    (60_000, 4, 16, 1, None),
])
def test_accumulation_note_counts_the_images_an_epoch_leaves_out(size: int, world: int, batch: int,
                                                                  accumulation: int, expected: str | None) -> None:
    """review_combos finding 3: batches beyond whole rounds were left out of every epoch without a word; the count
    stands beside the sampler's own (README's "Training covers an epoch"), which the run's samplers agree with."""
    images = TensorDataset(torch.arange(size))
    ranks = [ResumableBatchSampler(DistributedSampler(images, num_replicas=world, rank=r, shuffle=False), batch)
             for r in range(world)]
    per_rank = len(ranks[0].batches)
    assert accumulation_note(size, world, batch, per_rank, accumulation) == expected
    used = per_rank // accumulation * accumulation
    trained = {i for sampler in ranks for batch_ in list(sampler.batches)[:used] for i in batch_}
    if expected:
        assert f"leaves out {size - len(trained):,} of" in expected


def test_a_run_with_accumulation_notes_what_it_leaves_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dist_mnist.train import main
    assert main(["--dataset", "synthetic", "--synthetic-train-size", "496", "--synthetic-test-size", "20",
                 "--batch-size", "16", "--grad-accum-steps", "16", "--epochs", "1", "--peak-tflops", "1",
                 "--no-tensorboard", "--output-dir", str(tmp_path), "--run-name", "ga"]) == 0
    out = capsys.readouterr().out
    assert "global batch 256, 1 step/epoch," in out  # not "1 steps/epoch"
    assert "note: --grad-accum-steps 16 trains whole rounds only: 16 of each rank's 31 batches" in out


@pytest.mark.parametrize(("flags", "expected"), [
    (["--data-dir", "/nonexistent"], "note: --data-dir has no effect with --dataset synthetic (it makes its data, and "
                                     "reads or downloads no files)"),
    (["--no-download", "--data-dir", ""], "note: --data-dir and --no-download have no effect with --dataset "
                                          "synthetic"),
    ([], None),
])
def test_mnist_file_flags_with_synthetic_data_draw_a_note(flags: list[str], expected: str | None) -> None:
    """review_combos finding 5: a note, not a refusal (synthetic_data_note says why); with mnist there is none."""
    note = synthetic_data_note(parse_args(["--dataset", "synthetic", *flags]))
    assert note == expected if expected is None else note is not None and note.startswith(expected)
    assert synthetic_data_note(parse_args(["--data-dir", "/x", "--no-download"])) is None


def test_torchs_own_paragraph_on_too_many_workers_is_left_to_the_note() -> None:
    train, test = synthetic_splits(64, 20)
    too_many = usable_cpus() + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_pipeline(TrainConfig(batch_size=8, num_workers=too_many), cpu_ctx(), train, test, on_device=False)
    assert [str(w.message) for w in caught] == []


def test_batch_larger_than_the_shard_is_a_user_error() -> None:
    train, test = synthetic_splits(64, 20)
    with pytest.raises(UserError) as given:
        build_pipeline(TrainConfig(batch_size=40), cpu_ctx(1, 2), train, test, on_device=False)
    assert str(given.value) == ("--batch-size 40 is larger than this rank's share of the training set (32 samples); "
                                "give a smaller --batch-size")
    # Set by the recipe, not typed: the line says which recipe set it (`--recipe cuda` on a small training set).
    with pytest.raises(UserError) as from_recipe:
        build_pipeline(TrainConfig(recipe="cuda", batch_size=512, explicit_flags=("recipe",)), cpu_ctx(1, 2), train,
                       test, on_device=False)
    assert str(from_recipe.value).startswith("--batch-size 512 (the cuda recipe's) is larger than")


class CopyRecorder:
    """Stands in for a tensor: records how it was asked to move."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.device, bool]] = []

    def to(self, device: torch.device, non_blocking: bool = False) -> CopyRecorder:
        self.calls.append((device, non_blocking))
        return self


@pytest.mark.parametrize(("device", "non_blocking"), [(torch.device("cpu"), False),
                                                      (torch.device("cuda", 0), True)])
def test_copies_are_asynchronous_on_cuda_only(device: torch.device, non_blocking: bool) -> None:
    # On CUDA the loaders pin their batches or keep them on the GPU, so an asynchronous copy is safe and useful.
    tensor = CopyRecorder()
    to_device(tensor, device)  # type: ignore[arg-type]
    assert tensor.calls == [(device, non_blocking)]


def reference_mnist(data_dir: Path, train: bool) -> datasets.MNIST:
    """The straightforward pipeline: torchvision's MNIST with per-sample ToTensor and Normalize."""
    per_sample = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    return datasets.MNIST(str(data_dir), train=train, download=False, transform=per_sample)


def check_normalized(x: torch.Tensor, expected: torch.Tensor, channels_last: bool) -> None:
    assert x.dtype == torch.float32 and x.shape == expected.shape
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rank", [0, 1])
def test_fast_train_pipeline_matches_torchvision(tmp_path: Path, rank: int, channels_last: bool) -> None:
    """BatchIndexDataset + per-batch normalize == MNIST + ToTensor + Normalize per sample, batch for batch."""
    data_dir = make_mnist_dir(tmp_path, train_size=300, test_size=101)
    world_size, seed, batch_size, epoch = 2, 7, 16, 1
    cfg = mnist_cfg(data_dir, batch_size=batch_size, seed=seed)
    ctx = cpu_ctx(rank, world_size)
    # Decoded as one process: the ranks' compare of their folders (load_mnist) is a collective.
    pipeline = build_pipeline(cfg, ctx, *load_mnist(cfg, cpu_ctx()), on_device=False)
    pipeline.train_batches.set_epoch(epoch)

    reference_set = reference_mnist(data_dir, train=True)
    reference_sampler: DistributedSampler[int] = DistributedSampler(reference_set, num_replicas=world_size, rank=rank,
                                                                    shuffle=True, seed=seed)
    reference_sampler.set_epoch(epoch)
    reference = DataLoader(reference_set, batch_size=batch_size, sampler=reference_sampler, drop_last=True)

    fast = list(pipeline.train_loader)
    assert len(fast) == len(reference) == pipeline.steps_per_epoch
    for (images, labels), (expected_x, expected_y) in zip(fast, reference):
        check_normalized(normalize(images, CPU, channels_last), expected_x, channels_last)
        assert torch.equal(labels, expected_y)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_eval_pipeline_matches_torchvision(tmp_path: Path, channels_last: bool) -> None:
    data_dir = make_mnist_dir(tmp_path, train_size=300, test_size=101)
    cfg = mnist_cfg(data_dir, batch_size=16, eval_batch_size=32)
    pipeline = build_pipeline(cfg, cpu_ctx(), *load_mnist(cfg, cpu_ctx()), on_device=False)
    images, labels = map(torch.cat, zip(*pipeline.test_loader))
    expected_x, expected_y = map(torch.stack, zip(*((x, torch.tensor(y)) for x, y in reference_mnist(data_dir, False))))
    check_normalized(normalize(images, CPU, channels_last), expected_x, channels_last)
    assert torch.equal(labels, expected_y)


@pytest.mark.parametrize(("sizes", "flag"), [((10**15, 10), "--synthetic-train-size"),
                                             ((10, 10**15), "--synthetic-test-size")])
def test_synthetic_data_that_cannot_fit_in_memory_names_its_flag(sizes: tuple[int, int], flag: str) -> None:
    """10**15 images are beyond any address space, so the allocation fails at once (no memory is touched); it was a
    C++ allocator traceback."""
    with pytest.raises(UserError, match=f"^{flag} {10**15}: 1,000,000,000,000,000 synthetic images .* do not fit in "
                                        "this machine's memory; lower it$"):
        synthetic_splits(*sizes)


@pytest.mark.parametrize("size", [2**62, 10**20])
def test_synthetic_data_past_torchs_size_arithmetic_names_its_flag(size: int) -> None:
    """From 2**62 images torch's size arithmetic overflows before any allocation: a RuntimeError ("Storage size
    calculation overflowed"), and from 2**63 a TypeError traceback (randint's size is an int64). The command line
    stops at config.MAX_SAMPLES; code that calls this directly gets the same line as for memory."""
    with pytest.raises(UserError, match=f"^--synthetic-train-size {size}: {size:,} synthetic images .* do not fit "
                                        "in this machine's memory; lower it$"):
        synthetic_splits(size, 10)
