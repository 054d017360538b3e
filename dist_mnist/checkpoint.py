"""Checkpoints: atomic writes by rank 0, rotation, safe loading (weights_only) with fallback to an older file."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import random
import re
import stat
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from numpy.typing import NDArray

from dist_mnist.argtypes import on_off
from dist_mnist.console import shown
from dist_mnist.durable import temp_path, write_durably
from dist_mnist.errors import UserError, first_line, join_thread
from dist_mnist.runfiles import CHECKPOINTS_DIR, file_kind

FORMAT_VERSION = 2  # 2: one entry per stateful part (model, optimizer, ..., train_state, clock)
_NAME = re.compile(r"^step(\d{8})\.pt$")
# Config fields a checkpoint must share with the run that resumes it: they fix the model, the data order, the
# learning-rate schedule and the update rule (--grad-clip rescales every clipped step's gradients), so continuing
# with another value would silently train something else.
RESUME_FIELDS = ("dataset", "synthetic_train_size", "batch_size", "epochs", "lr", "weight_decay", "warmup_frac",
                 "label_smoothing", "grad_clip", "seed", "grad_accum_steps")
# numpy's MT19937 generator state as get_state() returns it by default (legacy=True). numpy's stubs type a call
# without `legacy` as the dict form (their first overload matches it), so numpy_parts casts to this.
MT19937State = tuple[str, NDArray[np.uint32], int, int, float]


def numpy_parts(state: object) -> tuple[NDArray[np.uint32], int, int, float]:
    """What a checkpoint saves of a numpy generator's state (get_state()'s tuple): all but its name, as Python
    numbers, for the global generator (rng_state) and PowerSGD's (comm)."""
    _, keys, pos, has_gauss, cached = cast(MT19937State, state)
    return keys, int(pos), int(has_gauss), float(cached)


def numpy_state(keys: Any, pos: Any, has_gauss: Any, cached: Any) -> MT19937State:
    """numpy_parts back into the state that set_state takes (the keys as any array of whole numbers); set_state
    refuses one that is not a generator state."""
    return ("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached)


class Stateful(Protocol):
    """A part of a run that saves and restores itself: a checkpoint is a dict of these, by name."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, newest (highest step) first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), reverse=True)


@dataclass(frozen=True)
class PartialWrite:
    """A checkpoint's temp file (durable.temp_path) that a process killed mid-write left."""
    path: Path
    size: int
    checkpoint: str  # the name of the checkpoint it was to become

    @property
    def sized(self) -> str:
        return f"{self.path.name} ({self.size / 2**20:.1f} MiB)"

    @property
    def cause(self) -> str:
        return f"a partial write of {self.checkpoint} left by a process that died while writing it"


def partial_writes(folder: Path) -> list[PartialWrite]:
    """The checkpoints' temp files in `folder`. One gone before its size was read (a live writer's on a folder no
    lock guards: NFS without a lock manager) is left out."""
    found = []
    for tmp in (folder.iterdir() if folder.is_dir() else ()):
        name = tmp.name[1:-4]  # temp_path's ".NAME.tmp"
        if _NAME.match(name) and temp_path(tmp.with_name(name)) == tmp:
            with contextlib.suppress(FileNotFoundError):
                found.append(PartialWrite(tmp, tmp.lstat().st_size, name))
    return found


def remove_partial_writes(folder: Path) -> list[PartialWrite]:
    """Remove the checkpoints' temp files (durable.temp_path) in `folder`, with their sizes: what a process killed
    mid-write left (SIGKILL, the out-of-memory killer, a lost node). Never renamed into place, never read, and never
    rotated away, each up to a whole checkpoint's size (14 MiB) for good. Only for the folder's holder (rundir's
    lock): no other process writes there."""
    removed = []
    for partial in partial_writes(folder):
        with contextlib.suppress(OSError):
            partial.path.unlink()
            removed.append(partial)
    return removed


def checkpoint_step(path: Path) -> int:
    """The step in a listed checkpoint's name (list_checkpoints)."""
    match = _NAME.match(path.name)
    assert match, path
    return int(match.group(1))


def serialize(state: dict[str, Any]) -> bytes:
    """The checkpoint's bytes, in memory: a snapshot that later training steps cannot change, and a size a failed
    write can name (torch.save copies GPU tensors to host memory anyway; the extra host copy is a few MB here).

    `getvalue()`, not `getbuffer()`: it hands over the BytesIO's own bytes object without a copy (0.01-0.5 ms for
    14 MB), where a memoryview export of the BytesIO crashed Python 3.12.1 (the GPU machines run a 3.12) with a
    segmentation fault: a failed write's error, raised again in the training thread, puts the view in a reference
    cycle, and the garbage collector freed the BytesIO under it (CPython gh-111049, gh-111331; docs/pitfalls.md).
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class RotationFailed(Exception):
    """The checkpoint is written and whole, but an older one could not be removed (the message says which and
    why): a warning, never the end of a run whose newest checkpoint is good."""


def write_checkpoint(data: bytes, folder: Path, step: int, keep: int) -> Path:
    """Write atomically (temp file, fsync, os.replace), then keep it and the `keep - 1` highest-step others. A
    failed write (a full disk) removes the temp file, leaves the older checkpoints as they were and raises a
    UserError naming the folder and the size; a failed removal of an older one raises RotationFailed."""
    path = checkpoint_path(folder, step)
    write_durably(path, data)
    # Never the file just written, even when older-timeline files with higher steps exist (a run resumed from an
    # earlier checkpoint by path): deleting it would leave nothing of this run to resume.
    try:
        for old in [p for p in list_checkpoints(folder) if p != path][keep - 1:]:
            old.unlink(missing_ok=True)
    except OSError as exc:  # NFS's EBUSY or ESTALE, another user's file in a shared folder, a read-only remount
        raise RotationFailed(f"{path.name} is written, but the rotation (--keep-checkpoints {keep}) could not remove "
                             f"{exc.filename or folder}: {exc.strerror or exc}; it stays until a later checkpoint's "
                             "rotation removes it") from None
    return path


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    size: int  # bytes
    seconds: float | None = None  # from the save's start (the loop's snapshot) to the file on disk; None: writing
    note: str | None = None  # what went wrong after the file was written (RotationFailed): a warning to print


class BackgroundWriter:
    """Rank 0's checkpoint files, written and fsynced by a thread while training goes on: the loop pauses only to
    snapshot and serialize its state (torchtitan's asynchronous checkpointing, its file half). The write and the
    fsync release the GIL; on our 2-core CPU they were 50-85 ms of a 13.7 MiB checkpoint's 85-120.

    One write at a time: `submit` and `wait` first finish the one in flight and raise its error (a full disk) then,
    so a failed write still ends the run with its one line and never leaves a later checkpoint behind it; `failed`
    lets the loop see the failure within a step, without waiting. The thread is not a daemon: a process that exits
    for another reason still completes the file it was writing (the rename makes a half-written one impossible
    either way).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done: WrittenCheckpoint | None = None
        self._error: BaseException | None = None
        self._finished = threading.Event()  # set by the write in flight as it ends, either way

    def submit(self, data: bytes, folder: Path, step: int, keep: int, started: float) -> WrittenCheckpoint:
        """Start writing `data` as step `step`'s checkpoint, once the previous write is complete; returns the new
        one, being written (`seconds` None)."""
        self.wait()
        finished = self._finished = threading.Event()

        path, name = checkpoint_path(folder, step), f"checkpoint-step{step}"

        # What goes wrong is raised in the training thread, by the next submit or wait: as a UserError, whatever it
        # is, so the run ends with one line on every rank (DistContext.on_main sends only those to the others).
        def write() -> None:
            note = None
            try:
                try:
                    write_checkpoint(data, folder, step, keep)
                except RotationFailed as exc:
                    note = str(exc)  # printed by the training thread: a thread's print would cut a progress line
                self._done = WrittenCheckpoint(path, len(data), time.perf_counter() - started, note)
            except UserError as exc:
                self._error = exc
            except Exception as exc:
                self._error = UserError(f"the checkpoint writer (thread {name}) failed on {path}: "
                                        f"{type(exc).__name__}: {exc}")
            except BaseException as exc:  # a SystemExit: raised as it is
                self._error = exc
            finally:
                finished.set()

        self._thread = threading.Thread(target=write, name=name)
        self._thread.start()
        return WrittenCheckpoint(path, len(data))

    @property
    def failed(self) -> bool:
        """Whether the write in flight has ended in an error that wait has yet to raise; without blocking, so the
        loop can look every step (preemption.Vote.WRITE_FAILED)."""
        return self._finished.is_set() and self._error is not None

    def wait(self) -> WrittenCheckpoint | None:
        """Block until the write in flight is on disk; returns it (None if there was none), or raises its error."""
        if self._thread is None:
            return None
        join_thread(self._thread, self._finished)
        self._thread = None
        done, error, self._done, self._error = self._done, self._error, None, None
        if error is not None:
            raise error
        return done


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, so a crafted pickle is refused, never run."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"checkpoint {path} is unreadable ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        newest = list_checkpoints(path) or list_checkpoints(path / CHECKPOINTS_DIR)  # a checkpoints or a run folder
        hint = (f"a checkpoint file in it (the newest is {newest[0].relative_to(path)})" if newest
                else "a checkpoint file")
        raise UserError(f"checkpoint {path} is a folder; give {hint}, or --resume auto for this run's own newest")
    if not stat.S_ISREG(mode):
        # A FIFO blocked the open below until something wrote to it (the resume hung); a device read on and on.
        raise UserError(f"checkpoint {path} is not a regular file ({file_kind(mode)}); the files are <run "
                        "folder>/checkpoints/step*.pt")
    if not _is_pickle_or_archive(path):
        # A config.json or a log given by mistake, or bytes a disk scrambled: torch's pickle machine reads such a file
        # as opcodes and may fail with anything (an IndexError, a KeyError: its memo and stack) or, worse, succeed.
        raise UserError(f"checkpoint {path} is not a checkpoint: neither a torch.save archive nor a pickle (the "
                        "files are <run folder>/checkpoints/step*.pt)")
    if refusal := _archive_refusal(path):
        raise UserError(f"checkpoint {path} {refusal}")
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 4 in the checkpoint": a second line before the error below, which says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message starts with advice to retry with weights_only=False: the one thing never to do here.
        if culprit := re.search(r"GLOBAL (\S+)", str(exc)):
            raise UserError(f"checkpoint {path} was refused: it references {culprit.group(1)}, which needs arbitrary "
                            "unpickling (running code from the file); only tensors and plain containers are "
                            "loaded") from None
        # A pickle torch.save did not write (another protocol, another program): the safe loader's own words.
        said = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
        raise UserError(f"checkpoint {path} is not a checkpoint: a pickle the safe loader does not read "
                        f"({said.group(1).strip() if said else type(exc).__name__}; torch.save writes protocol "
                        "2 in a zip archive)") from None
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # whatever the reader raised on these bytes means the same to the user
        # RuntimeError, EOFError, BadZipFile and ValueError from a cut or damaged archive; IndexError and KeyError
        # from a pickle whose bytes changed. The reader's first sentence says what broke; the rest is generic advice.
        reason = first_line(exc).split(". ")[0]
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupt: {reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not a dist_mnist checkpoint (format {FORMAT_VERSION} expected)")
    if damaged := _record_failing_its_crc(path):
        raise UserError(f"checkpoint {path} is damaged: its record {damaged} fails its CRC-32 check (the bytes "
                        "changed after the file was written: a disk, memory or copy error)")
    try:
        # First, before anything walks it: _check_structure's messages, non_finite_entry, the compatibility checks
        # and the broadcast to the other ranks all go through the state as a tree, recursively.
        _check_tree(state)
        _check_structure(state)
    except _Malformed as exc:
        raise UserError(f"checkpoint {path} is malformed: {exc} (not as this program writes it)") from None
    if bad := non_finite_entry(state):
        # Refused here, not left to the resumed run: a NaN weight makes every loss NaN, and the resume stopped at its
        # first step with "training loss became non-finite ... (the last good checkpoint is <this file>). Lower
        # --lr", advice that cannot help; an infinite AdamW second moment leaves the weights finite and that weight's
        # update zero, unnoticed until the save-time check of the resumed run's first checkpoint.
        raise UserError(f"checkpoint {path} holds non-finite values ({bad}), checked in every floating-point tensor "
                        "of its training state (the weights, the optimizer's moments, PowerSGD's residuals): a run "
                        "resumed from it would not train as it should (a NaN weight makes every loss NaN, an infinite "
                        "AdamW second moment freezes that weight's updates)")
    return state


def non_finite_entry(state: Any) -> str | None:
    """Where `state` (a checkpoint, or a part's state_dict: dicts, lists and tuples of tensors and plain values)
    holds a floating-point tensor with a NaN or an infinity, as "model.fc1.weight holds NaN"; None where every one
    is finite. The weights, the optimizer's moments and PowerSGD's residuals above all: a run's checks look at its
    losses only, and the update after the last finite loss can still overflow them."""
    # A list, not a dict by name: dotted names can collide ({"a": {"b": t}} and {"a.b": t}, or the keys 0 and "0"),
    # and a dict would keep only the last tensor of each name, leaving the others unchecked.
    tensors = list(_float_tensors(state))
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in tensors:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    # One host sync per device, not one per tensor: on a GPU each would wait for the queue, at every checkpoint.
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    name, tensor = next((name, t) for name, t in tensors if not bool(torch.isfinite(t).all()))
    return f"{name} holds {'NaN' if bool(torch.isnan(tensor).any()) else 'an infinity'}"


def _float_tensors(state: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every floating-point (or complex) tensor in `state`, under its dotted name, in the state's own order.

    Without recursion, and into each dict, list or tuple once: load_checkpoint refuses shared and deeply nested
    containers before this runs (_check_tree), but the save-time check walks live state, which nothing vetted. As a
    tree, a list holding one list twice, 60 times over (500 bytes of pickle), was 2^60 visits: a resume that hung at
    100% CPU for ever; and a list nested 100,000 deep a RecursionError traceback (review_security F5, F7)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", state)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                yield name, value
            continue
        # A container met again: its tensors are checked already (the state holds it, so the id is no other's).
        if not isinstance(value, (dict, list, tuple)) or id(value) in seen:
            continue
        seen.add(id(value))
        items: list[tuple[Any, Any]] = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        # Reversed onto the stack, so they come off it in the state's own order, as the recursion took them.
        stack.extend((f"{name}.{key}" if name else str(key), item) for key, item in reversed(items))


# -- what a loaded checkpoint must hold ----------------------------------------------------------------------------
# weights_only loading refuses code, but not values of the wrong type or range: a step "abc", a world size of 0, an
# `rng` list without the entry of a rank. Each field the resume reads is checked here, so a crafted or edited file is
# one line naming the field, never a traceback deep in the resume, a hang, or a run that trains on silently from a
# step of -5.


class _Malformed(Exception):
    """What is wrong with a loaded checkpoint's contents (load_checkpoint words it as a UserError)."""


def _show(value: object) -> str:
    # An int past Python's 4300 digits for a str() raises ValueError; one of 200 bits is already no count a run keeps.
    if isinstance(value, int) and value.bit_length() > 200:
        return f"a {value.bit_length()}-bit integer"
    return _cut(repr(value))


# The largest count a checkpoint holds (steps, epochs, processes): an int64's, as torch's own counters.
_MOST = 2**63 - 1


def _whole(value: object, name: str, least: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= _MOST:
        raise _Malformed(f"{name} is {_show(value)}, not a whole number from {least} to 2**63 - 1")
    return value


def _real(value: object, name: str, least: float | None = 0.0) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or (least is not None and value < least)):
        bound = "" if least is None else f" >= {least:g}"
        raise _Malformed(f"{name} is {_show(value)}, not a finite number{bound}")


def _dict(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise _Malformed(f"{name} is {_show(value) if not isinstance(value, dict) else 'a dict'}, not a dict by name")
    return value


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _Malformed(f"{name} is {_show(value)}, not a list")
    return list(value)


# torch.save writes what it is given; this program gives it a tree at most 5 containers deep (a world's PowerSGD
# state: comm_hook.ranks[r].orders[bucket] is a list). 32 leaves room for what later versions add, and keeps the
# recursive walks over a loaded checkpoint (_show's repr, _kind, pickling it for the other ranks) far from Python's
# recursion limit of 1000 frames.
_MAX_NESTING = 32
# Items of tuples met again (see _check_tree) that a walk as a tree goes through once more: AdamW's betas, 2 per
# param group. A list of N references to one tuple of M numbers is a few bytes per reference and N * M items for
# every walk (repr, _kind, json) of it.
_MAX_REPEATED_ITEMS = 10_000


def _contents(value: object) -> list[tuple[object, object]] | None:
    """What a walk goes into from `value`, as (key, item) pairs (a dict's keys are items too: a tuple can be one), or
    None where it stops: a tensor's data, a number, a string. Attributes count: the weights-only loader sets them
    on an OrderedDict (a state_dict's _metadata) and on tensors, so pickling the state for the other ranks walks
    them too."""
    pairs: list[tuple[object, object]]
    if isinstance(value, dict):
        pairs = [pair for key, item in value.items() for pair in ((key, key), (key, item))]
    elif isinstance(value, (list, tuple)):
        pairs = list(enumerate(value))
    elif isinstance(value, (set, frozenset)):
        pairs = [("<item>", item) for item in value]
    else:
        pairs = []
    attributes = getattr(value, "__dict__", None)  # a class's own is a mappingproxy: not gone into
    if isinstance(attributes, dict):
        pairs.extend(attributes.items())
    return pairs if pairs or isinstance(value, (dict, list, tuple, set, frozenset)) else None


def _label(key: object) -> str:
    """A key in a place's dotted name, short and on one line whatever the file holds (str() of a tuple key is a walk
    of its own, of an int of 5,000 digits a ValueError)."""
    if isinstance(key, str):
        return key if key.isprintable() and len(key) <= 40 else _show(key)
    if isinstance(key, int) and -10**18 < key < 10**18:
        return str(key)
    return f"<{type(key).__name__}>"


def _check_tree(state: object) -> None:
    """Refuse (_Malformed) a loaded checkpoint that is not a tree of modest depth, with one walk that enters each
    container once and never recurses.

    The weights-only loader builds what the pickle says: a list holding one list twice, 60 times over, is 500 bytes
    and 2^60 places to a walk as a tree (non_finite_entry spun at 100% CPU for ever, review_security F5); a list in
    itself never ends; one nested 100,000 deep ended the resume in a RecursionError traceback (F7). A container met a
    second time is refused, but for a tuple of plain values: torch.save memoizes a tuple it meets twice (AdamW's
    param groups share the betas of its defaults), and every empty tuple is Python's one `()`."""
    first_place: dict[int, str] = {id(state): "the checkpoint"}
    repeated = 0
    # (dotted name, depth, the (key, item) pairs inside, the top-level entry it is in: what a refusal names)
    stack: list[tuple[str, int, list[tuple[object, object]], str]] = [("", 0, _contents(state) or [], "")]
    while stack:
        name, depth, pairs, top = stack.pop()
        for key, item in pairs:
            inner = _contents(item)
            if inner is None:
                continue
            place = f"{name}.{_label(key)}" if name else _label(key)
            if id(item) in first_place:  # the state holds every item, so an id is no other object's
                if isinstance(item, tuple) and all(_contents(each) is None for each in item):
                    repeated += len(item)
                    if repeated > _MAX_REPEATED_ITEMS:
                        raise _Malformed(f"it holds the same tuples in place after place (more than "
                                         f"{_MAX_REPEATED_ITEMS} items again, up to {_cut(place)}), which every walk "
                                         "over it would go through again each time")
                    continue
                raise _Malformed(f"{_cut(place)} is the same {type(item).__name__} as {_cut(first_place[id(item)])}: "
                                 "a container held in two places, or inside itself, which a walk over it as a tree "
                                 "would go through over and over, or for ever")
            if depth + 1 > _MAX_NESTING:
                raise _Malformed(f"{top} nests containers more than {_MAX_NESTING} deep, where this program's "
                                 "checkpoints nest 5")
            first_place[id(item)] = place
            stack.append((place, depth + 1, inner, top or place))


def _cut(place: str) -> str:
    return place if len(place) <= 60 else place[:57] + "..."


def _check_structure(state: dict[str, Any]) -> None:
    """The fields a resume reads, of the types and in the ranges this program writes them (raises _Malformed)."""
    if not isinstance(state.get("model_class"), str):
        raise _Malformed(f"model_class is {_show(state.get('model_class'))}, not a class name")
    model = _dict(state.get("model"), "model")
    if bad := next((key for key, value in model.items() if not isinstance(value, torch.Tensor)), None):
        raise _Malformed(f"model entry {bad!r} is {_show(model[bad])}, not a tensor")
    config = _dict(state.get("config"), "config")
    world_size = _whole(state.get("world_size"), "world_size", least=1)
    rng = _list(state.get("rng"), "rng")
    if len(rng) != world_size:
        raise _Malformed(f"rng holds {len(rng)} entries, not one per process of its world of {world_size}")
    for rank, entry in enumerate(rng):
        _check_rng(entry, f"rng[{rank}]")
    train_loss = _list(state.get("train_loss", []), "train_loss")  # checkpoints before it was saved hold none
    if train_loss and len(train_loss) != world_size:
        raise _Malformed(f"train_loss holds {len(train_loss)} entries, not one per process of its world of "
                         f"{world_size}")
    for rank, entry in enumerate(train_loss):
        pair = _list(entry, f"train_loss[{rank}]")
        if len(pair) != 2:
            raise _Malformed(f"train_loss[{rank}] is {_show(entry)}, not a [sum, count] pair")
        _real(pair[0], f"train_loss[{rank}] sum", least=None)
        _whole(pair[1], f"train_loss[{rank}] count")
    train_state = _dict(state.get("train_state"), "train_state")
    step = _whole(train_state.get("step"), "train_state.step")
    epoch = _whole(train_state.get("epoch"), "train_state.epoch")
    _whole(train_state.get("batch_in_epoch"), "train_state.batch_in_epoch")
    epochs = config.get("epochs")
    if isinstance(epochs, int) and epoch > epochs:
        raise _Malformed(f"train_state.epoch {epoch} is past the {epochs} epochs of its config")
    for number, record in enumerate(_list(train_state.get("metrics"), "train_state.metrics")):
        name = f"train_state.metrics[{number}]"
        record = _dict(record, name)
        if bad := next((key for key, value in record.items()
                        if value is not None and not isinstance(value, (bool, int, float, str))), None):
            raise _Malformed(f"{name}.{bad} is {_show(record[bad])}, not a number or a word")
        if _whole(record.get("step"), f"{name}.step") > step:
            raise _Malformed(f"{name}.step {record['step']} is past the checkpoint's step {step}")
        _real(record.get("test_accuracy"), f"{name}.test_accuracy")
    for name in ("optimizer", "scheduler", "scaler", "clock", "progress", "comm_hook", "numerics"):
        if name in state:
            _dict(state[name], name)
    # The rounding settings are compared and named in the resume's note (numerics_changes): flags, words, counts.
    for key, value in state.get("numerics", {}).items():
        if value is not None and not isinstance(value, (bool, int, str)):
            raise _Malformed(f"numerics.{key} is {_show(value)}, not a setting")
    if clock := state.get("clock"):
        _real(clock.get("elapsed_s"), "clock.elapsed_s")
        _real(clock.get("paused_s", 0.0), "clock.paused_s")
    if progress := state.get("progress"):
        _real(progress.get("loss_sum"), "progress.loss_sum", least=None)
        _whole(progress.get("loss_count"), "progress.loss_count")


def _check_rng(entry: object, name: str) -> None:
    """One process's generator states (rng_state), set into scratch generators: the ones set_rng_state sets accept
    exactly what these do."""
    entry = _dict(entry, name)
    cpu = entry.get("torch")
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise _Malformed(f"{name}.torch is {_show(cpu)}, not a generator state (a uint8 tensor)")
    cuda = _list(entry.get("cuda"), f"{name}.cuda")
    if any(not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 for t in cuda):
        raise _Malformed(f"{name}.cuda holds {_show(cuda)}, not generator states (uint8 tensors)")
    saved_numpy = _list(entry.get("numpy"), f"{name}.numpy")
    python_state = entry.get("python")
    try:
        torch.Generator().set_state(cpu)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise _Malformed(f"{name}.torch is not a generator state ({first_line(exc)})") from None
    try:
        keys, pos, has_gauss, cached = saved_numpy
        np.random.RandomState().set_state(numpy_state(keys, pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError, IndexError) as exc:
        raise _Malformed(f"{name}.numpy is not numpy's generator state ({first_line(exc)})") from None
    try:
        random.Random().setstate(cast(tuple[Any, ...], python_state))  # refused unless it is one
    except (TypeError, ValueError, OverflowError, IndexError) as exc:
        raise _Malformed(f"{name}.python is not Python's generator state ({first_line(exc)})") from None


def _is_pickle_or_archive(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle of protocol 2 or later (its first byte is PROTO, 0x80); an
    empty file counts as one cut short (a full disk at the write), and one that cannot be opened is left to the
    loader's own error."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return not head or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


_METHODS = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def _archive_refusal(path: Path) -> str | None:
    """Why a checkpoint's zip must not reach torch.load (the rest of the sentence after its path), or None.

    torch.save stores every record as it is (ZIP_STORED), yet torch's reader inflates a compressed one, allocating
    the size its header declares first: 1 MB of DEFLATEd zeros took 1 GiB of memory before any check, 8 MB 8 GiB
    (review_security F6), and _record_failing_its_crc's testzip inflated it all again. Records declaring more bytes
    in all than the file holds are refused too: torch.save never writes them, and the sizes are what a reader
    allocates (torch's miniz refused the ones tried as corrupt, but this check does not rest on it). Both from the
    zip's directory alone, nothing read or inflated. A file torch reads as a zip (it starts with a local header) but
    zipfile cannot list is refused too, as unreadable: a junk record with a malformed extra field made zipfile give
    up where torch's reader, which skips the field, loaded the rest, compressed records included."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # torch.load reads such a file as a pickle (the legacy format): no zip
                return None
            size = os.fstat(f.fileno()).st_size
            with zipfile.ZipFile(f) as archive:
                records = archive.infolist()
    except OSError:
        return None  # the loader's own error says it
    except Exception as exc:  # BadZipFile, a UnicodeDecodeError, ...: whatever zipfile raised on these bytes
        return f"is unreadable (truncated or corrupt: its zip directory does not read: {first_line(exc)})"
    if packed := next((r for r in records if r.compress_type != zipfile.ZIP_STORED), None):
        method = _METHODS.get(packed.compress_type, f"zip method {packed.compress_type}")
        return (f"was refused: its record {_show(packed.filename)} is compressed ({method}), which torch.save never "
                "writes; it is not read, as a small file can inflate to gigabytes in memory (a zip bomb)")
    declared = sum(max(record.file_size, record.compress_size) for record in records)
    if declared > size:
        return (f"was refused: its records declare {declared} bytes, more than the {size} of the file, which "
                "torch.save never writes; it is not read")
    return None


def _record_failing_its_crc(path: Path) -> str | None:
    """The first record of a checkpoint's zip whose bytes do not match the CRC-32 torch.save stored for it.

    torch.load does not check them: a flipped bit in the tensor data loads as a wrong weight (one fc1 weight became
    -1.8e36 in a test by hand) and the run trains on and checkpoints it again. Reading the 14 MB again costs about
    13 ms per resume."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError):  # torch.load read it, so another container (the legacy format): no CRCs
        return None


@dataclass(frozen=True)
class ResumeSource:
    path: Path
    state: dict[str, Any]
    note: str  # why it is not the file --resume named ('' when it is)


def resume_from_path(requested: Path, own_folder: Path, restarted: bool) -> ResumeSource:
    """`--resume PATH`, in a run folder whose own checkpoints may have gone past PATH's step.

    A torchrun restart or a SLURM requeue runs the job's command again, PATH included: it continues from the run's
    newest checkpoint that loads where that is further than PATH (or PATH no longer loads: the rotation may have
    removed it), as `--resume auto` would, or each restart would train from PATH again. A launch by hand into a
    folder whose checkpoints go further is refused: it would train those steps again and overwrite their files and
    records (a branch from PATH belongs in a folder of its own). So is one into a folder whose checkpoints are of
    another run (_refuse_another_run).
    """
    if restarted and (own := find_resume_checkpoint(own_folder)) is not None:
        own_step = int(own[1]["train_state"]["step"])
        try:
            state = load_checkpoint(requested)
        except UserError as exc:
            why = str(exc)
        else:
            if own_step <= int(state["train_state"]["step"]):
                _refuse_another_run(requested, state, own_folder, own)
                return ResumeSource(requested, state, "")
            why = f"step {state['train_state']['step']}"
        return ResumeSource(*own, f"note: a restart continues from this run's newest checkpoint, step {own_step}, not "
                                  f"from --resume {requested} ({why})")
    state = load_checkpoint(requested)
    step = int(state["train_state"]["step"])
    # (A restart gets here only where none of the run's own checkpoints loads: find_resume_checkpoint set them
    # all aside, so none is listed.)
    newer = [p for p in list_checkpoints(own_folder) if checkpoint_step(p) > step]
    if newer:
        raise UserError(f"this run's checkpoints go up to step {checkpoint_step(newer[0])} ({newer[0]}); --resume "
                        f"{requested} (step {step}) would train the steps after it again and overwrite them. Use "
                        "--resume auto to continue from the newest, or a new --run-name to branch from that file "
                        "(nothing was changed)")
    _refuse_another_run(requested, state, own_folder)
    return ResumeSource(requested, state, "")


def _refuse_another_run(requested: Path, state: dict[str, Any], own_folder: Path,
                        own: tuple[Path, dict[str, Any]] | None = None) -> None:
    """Refuse `--resume PATH` (`state`, no further than them) into a folder whose own checkpoints are not an earlier
    point of PATH's run: the resume rewrites the run's metrics.jsonl and config.json from PATH and puts its
    checkpoints beside theirs, where the rotation removes them (review_combos finding 1).

    A run's evaluation records only grow along it, and their times make each run's its own: the folder's newest
    checkpoint (that loads) must hold records, and they must begin PATH's (or, at PATH's own step, PATH's begin
    them: a process resumed from PATH evaluated that step, adapt_to_world_size's epoch end). A checkpoint without
    records cannot be told apart from another run's, so it is refused too. PATH in the folder itself is its own.
    `own` is the folder's newest checkpoint that loads where the caller has loaded it already (a restart's search).
    """
    own_checkpoints = list_checkpoints(own_folder)
    if not own_checkpoints or requested.resolve().parent == own_folder.resolve():
        return
    step, records = int(state["train_state"]["step"]), state["train_state"]["metrics"]
    # Read only: the refusal must change nothing, and --resume auto sets the unreadable ones aside.
    own = own or find_resume_checkpoint(own_folder, set_aside=False)
    if own is None:
        why = "none of them loads"
    else:
        own_step, own_records = int(own[1]["train_state"]["step"]), own[1]["train_state"]["metrics"]
        if own_records and (records[:len(own_records)] == own_records
                            or (own_step == step and own_records[:len(records)] == records)):
            return
        why = (f"the newest that loads, {own[0].name}, has no evaluation record to show it" if not own_records
               else f"the evaluation records of the newest that loads, {own[0].name}, are not those of that run")
    raise UserError(f"this run's checkpoints (up to {own_checkpoints[0]}) are not an earlier point of the run of "
                    f"--resume {requested} (step {step}): {why}; resuming that file here would replace this run's "
                    "records. Use --resume auto to continue this run, or a new --run-name to branch from that file "
                    "(nothing was changed)")


def find_resume_checkpoint(folder: Path, set_aside: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `folder` that loads, and its path; unreadable ones are reported and set aside
    (`set_aside` False: passed over in silence, for a check that must leave the folder as it is)."""
    for path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except UserError as exc:
            if not set_aside:
                continue
            # Left under its name, a broken file would be retried on every restart and, having the highest step,
            # outlive the good checkpoints written after it in the rotation.
            aside = path.with_name(f"{path.name}.unreadable")
            os.replace(path, aside)
            # shown: the refusal quotes the pickle's GLOBAL name, which a crafted file fills with terminal escapes.
            print(shown(f"warning: {exc}; renamed it to {aside.name}, trying the previous checkpoint"),
                  file=sys.stderr, flush=True)
    return None


def check_compatible(state: dict[str, Any], model: torch.nn.Module, config: dict[str, Any], source: str,
                     recipe: str) -> None:
    """Refuse a checkpoint from another model or recipe with an error naming the mismatch.

    `config` holds the values this run resolved (its recipe's, or the flags that override them), so a recipe
    change that alters any of RESUME_FIELDS is refused, and the error names both recipes.
    """
    if state.get("model_class") != type(model).__name__:
        raise UserError(f"checkpoint {source} holds a {state.get('model_class')}, not a {type(model).__name__}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["model"].items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise UserError(f"checkpoint {source} does not fit the model: parameters differ at {diff}")
    # A --checkpoint-dir is found by that flag, not by the run's name: a new --run-name would find it again.
    fresh = ("another --checkpoint-dir (this one holds a run with other settings)" if config.get("checkpoint_dir")
             else "--resume never with a new --run-name")
    for name in RESUME_FIELDS:
        saved = state["config"].get(name)
        if saved != config.get(name):
            raise UserError(f"checkpoint {source} was trained with --{name.replace('_', '-')} "
                            f"{saved} (recipe {state.get('recipe', 'unknown')}), this run has "
                            f"{config.get(name)} (recipe {recipe}); use the same value or recipe, or {fresh}")


def check_training_parts(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                         source: str) -> None:
    """Refuse optimizer, scheduler and scaler states that this run's parts would take without a word and fail on
    (or worse) later: torch's load_state_dict checks little. A fused AdamW moment of another shape than its
    parameter crashed the process (a segmentation fault) at the first step; a scheduler's state is set into its
    __dict__ as it comes (a key "step" replaced the method)."""
    try:
        if saved := state.get("optimizer"):
            _check_optimizer(saved, optimizer)
        for name, part in (("scheduler", scheduler), ("scaler", scaler)):
            if (saved := state.get(name)) and (live := part.state_dict()):
                _check_like(saved, live, part, name)
    except _Malformed as exc:
        raise UserError(f"checkpoint {source} does not load into this run: {exc}") from None


def _kind(value: object) -> object:
    """A value's kind as a state dict holds it: a float may be saved as an int, a None flag as a bool."""
    if value is None or isinstance(value, bool):
        return "flag"
    if isinstance(value, (list, tuple)):
        return tuple(_kind(v) for v in value)
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        # A learning rate as a one-element tensor: what a run with CUDA graphs keeps (graphs.use_tensor_learning_rates)
        # and may save in its scheduler's _last_lr; a number where the other run keeps floats.
        return "number"
    return type(value).__name__


def _check_value(saved: object, live: object, name: str) -> None:
    if _kind(saved) != _kind(live):
        raise _Malformed(f"its {name} is {_show(saved)}, where this run has {_show(live)}")
    if isinstance(saved, (list, tuple)):
        for i, (s, lv) in enumerate(zip(saved, live)):  # type: ignore[call-overload]  # same kind: a sequence too
            _check_value(s, lv, f"{name}[{i}]")
    elif _kind(saved) == "number":
        _real(saved.item() if isinstance(saved, torch.Tensor) else saved, f"its {name}")
        if isinstance(saved, int) and abs(saved) > _MOST:  # LambdaLR's float of such a last_epoch: an OverflowError
            raise _Malformed(f"its {name} is {_show(saved)}, past any count a run keeps")
        if isinstance(live, int) and not isinstance(saved, int):
            raise _Malformed(f"its {name} is {_show(saved)}, not a whole number")


def _check_like(saved: dict[str, Any], live: dict[str, Any], part: object, name: str) -> None:
    """A state set into an object's attributes (LambdaLR's, GradScaler's): the kinds of this run's own, and no key
    that would replace something else of the object (a method). A key this torch's object does not have, with a
    plain value, is let through: another torch version's (a checkpoint of torch 2.14 resumed under the GPU
    machines' 2.11) may hold a private field this one lacks."""
    for key, value in _dict(saved, name).items():
        if key in live:
            _check_value(value, live[key], f"{name} state's {key}")
        elif hasattr(part, key) or _kind(value) not in ("flag", "number", "str"):
            raise _Malformed(f"its {name} state holds {key!r}, which this run's {type(part).__name__} does not")


def _check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    live = optimizer.state_dict()
    states = saved.get("state")
    if not isinstance(states, dict):  # by parameter number
        raise _Malformed(f"its optimizer state's state is {_show(states)}, not a dict")
    groups = _list(saved.get("param_groups"), "optimizer state's param_groups")
    if len(groups) != len(live["param_groups"]):
        raise _Malformed(f"its optimizer state has {len(groups)} parameter groups, this run's "
                         f"{len(live['param_groups'])}")
    parameters: dict[int, torch.Tensor] = {}
    for number, (group, live_group, params) in enumerate(zip(groups, live["param_groups"], optimizer.param_groups)):
        name = f"optimizer state's param_groups[{number}]"
        group = _dict(group, name)
        saved_params = group.get("params")
        # Compared as a list of ints only: a tensor there made `!=` itself raise ("Boolean value of Tensor ...").
        if (not isinstance(saved_params, list) or not all(type(p) is int for p in saved_params)
                or saved_params != live_group["params"]):
            raise _Malformed(f"its {name} holds the parameters {_show(group.get('params'))}, this run's "
                             f"{_show(live_group['params'])}")
        for key, value in group.items():
            if key != "params" and key in live_group:
                _check_value(value, live_group[key], f"{name}.{key}")
        parameters.update(zip(live_group["params"], params["params"]))
        # AdamW's moments (amsgrad adds the maximum); a state without them failed at the first step.
        needs = ("step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if group.get("amsgrad") else []))
        for index in live_group["params"]:
            per_parameter = states.get(index)
            if per_parameter is None:
                continue  # not stepped yet: AdamW makes its state at the first step
            where = f"optimizer state of parameter {index}"
            per_parameter = _dict(per_parameter, where)
            if missing := [key for key in needs if key not in per_parameter]:
                raise _Malformed(f"its {where} lacks {', '.join(missing)}")
            for key, value in per_parameter.items():
                if not isinstance(value, torch.Tensor):
                    raise _Malformed(f"its {where}: {key} is {_show(value)}, not a tensor")
                if key == "step" and value.numel() != 1:
                    raise _Malformed(f"its {where}: step has {value.numel()} elements, not 1")
                if key != "step" and value.shape != parameters[index].shape:
                    raise _Malformed(f"its {where}: {key} has the shape {tuple(value.shape)}, the parameter "
                                     f"{tuple(parameters[index].shape)}")
    if unknown := [key for key in states if key not in parameters]:
        raise _Malformed(f"its optimizer state holds state for {_show(unknown)}, not parameters of this model")


def part_refused(source: str, part: str, exc: BaseException) -> UserError:
    """The error for a checkpoint part whose own load_state_dict (or the resume's use of it) failed on its state."""
    return UserError(f"checkpoint {source} does not load into this run: its {part} state was refused "
                     f"({type(exc).__name__}: {first_line(exc)})")


def check_position(state: dict[str, Any], source: str, batches_per_epoch: int, world_size: int, batch_size: int,
                   train_size: int) -> None:
    """Refuse a place in the epoch past its end: the checkpoint's processes counted `batch_in_epoch` of their
    batches (this run's `batches_per_epoch` in the same world; in another, at most the epoch's samples)."""
    train_state, old_world = state["train_state"], state["world_size"]
    done = train_state["batch_in_epoch"]
    beyond = (done >= batches_per_epoch if old_world == world_size else done * batch_size * old_world > train_size)
    if beyond:
        raise UserError(f"checkpoint {source} is malformed: train_state.batch_in_epoch {done} is past the end of an "
                        f"epoch of this run ({batches_per_epoch} batches per process of {world_size}, "
                        f"{train_size} training images)")


def numerics_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """A note naming the settings a resume changes that round differently ("--amp bfloat16 -> off"), or None.

    They are not refused like RESUME_FIELDS: a requeued job may land on another kind of node (no bf16, no GPU), and
    the run is still correct. But a resumed run equals an uninterrupted one only under the same settings, and a user
    comparing the two must be told why they differ. Checkpoints written before these were saved hold none.
    """
    if not saved:
        return None
    changed = [f"--{name.replace('_', '-')} {on_off(saved[name])} -> {on_off(value)}" for name, value in current.items()
               if name in saved and saved[name] != value]
    if not changed:
        return None
    # PowerSGD all-reduces a low-rank approximation of the gradients, not the gradients rounded: switching it on
    # or off moved fc1's weights by a third of their largest value over 20 steps, no rounding effect.
    hooks = {saved.get("ddp_comm_hook"), current.get("ddp_comm_hook")}
    differ = ("by more than rounding (PowerSGD all-reduces a low-rank approximation of the gradients)"
              if "powersgd" in hooks and len(hooks) == 2 and None not in hooks else "in the last bits")
    if _other_dropout_masks(saved, current):
        differ += " and in dropout's random masks"
    return (f"note: this run continues with other settings than the checkpoint's ({', '.join(changed)}): training "
            f"goes on correctly, but its numbers will differ {differ} from a run that was never interrupted")


def _other_dropout_masks(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the change draws other dropout masks from the same generator state, not only rounds otherwise: a mask
    is drawn in the activation's memory order (channels_last), and inductor's compiled code draws its own (the eager
    and aot_eager backends draw eager's). The first step after it then moved fc1's weights by a whole update."""
    if "channels_last" in saved and saved["channels_last"] != current.get("channels_last"):
        return True

    def inductor(numerics: dict[str, Any]) -> bool:  # checkpoints before compile_backend was saved: the default
        return bool(numerics.get("compile")) and numerics.get("compile_backend", "inductor") == "inductor"

    return "compile" in saved and inductor(saved) != inductor(current)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, in types that weights_only loading accepts. On CUDA the generator of this
    process's own GPU only: a resume may see fewer GPUs per process (one per task under SLURM, say)."""
    keys, pos, has_gauss, cached = numpy_parts(np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": [keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    np.random.set_state(numpy_state(*state["numpy"]))
    random.setstate(state["python"])
