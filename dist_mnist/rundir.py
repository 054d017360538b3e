"""Run folder: a name every rank agrees on (stable across torchrun restarts), writability, no silent overwrite,
one job at a time (an OS lock held for the run's life)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dist_mnist.checkpoint import list_checkpoints, partial_writes, remove_partial_writes
from dist_mnist.config import TrainConfig
from dist_mnist.console import rank_line
from dist_mnist.distributed import DistContext
from dist_mnist.durable import missing_folders, remove_empty_folders, write_durably, write_failed
from dist_mnist.errors import UserError
from dist_mnist.restarts import env_whole_number, torchrun_restarts
from dist_mnist.runfiles import CHECKPOINTS_DIR, is_plain_name, run_id_file_name

# In the run folder; it holds who has the folder ("PID 1234 on host node7 (job 99) since ..."), for the refusal.
LOCK_FILE = ".lock"


def checkpoint_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else run_dir / CHECKPOINTS_DIR


def _ensure_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A name no other process can plant a symlink at beforehand (a PID is guessable): the probe once truncated
        # what a link of that name pointed to.
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        # Absolute: a relative folder is the current directory's, which the user may not have in mind.
        raise UserError(f"cannot write to {flag} {folder.absolute()}: {exc.strerror or exc}") from None


def _default_name(output_dir: Path, made_above: list[Path]) -> tuple[str, bool, Path | None]:
    """A timestamp, whether this call made its folder, and the torchrun run-id marker it wrote (None: none written);
    under torchrun the same name after every restart of the job, found through its run id. Folders it made for the
    marker are added to `made_above`."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    # torchrun keeps its run id across restarts (--standalone makes a fresh one per launch), so a marker
    # keyed by it maps a restarted job back to the folder of its first attempt.
    marker = output_dir / ".torchelastic" / run_id_file_name(run_id)
    try:
        name = marker.read_text().strip() if run_id and marker.is_file() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read torchrun's run id marker {marker}: {getattr(exc, 'strerror', None) or exc}; "
                        "remove it to start the run afresh") from None
    if name:
        # Written by this program as a folder name right inside --output-dir; anything else (an absolute path,
        # `../x`) would put the run, its checkpoint rotation and its overwrites outside it.
        if not is_plain_name(name):
            raise UserError(f"torchrun's run id marker {marker} names {name!r}, which is no folder name inside "
                            "--output-dir (this program writes only such names there); remove it to start the run "
                            "afresh")
        return name, False, None
    name = _claim_fresh_folder(output_dir, time.strftime("%Y%m%d-%H%M%S"))
    if not run_id:
        return name, True, None
    made_above.extend(missing_folders(marker.parent))
    try:
        _make_folder(marker.parent, f"folder of torchrun run ids {marker.parent}", "--output-dir")
        # Whole or not at all: an empty marker left by a full disk would name --output-dir itself as the run
        # folder.
        write_durably(marker, name.encode())
    except UserError:
        remove_empty_folders([output_dir / name])
        raise
    return name, True, marker


def _claim_fresh_folder(output_dir: Path, stamp: str) -> str:
    """`stamp`, or `stamp-2`, `stamp-3`, ... where a folder of that name exists: two runs started in the same second
    without --run-name (a sweep launching jobs side by side) each get a folder of their own, where the second was
    refused as "in use". Claimed by making the folder, which only one process can do."""
    for attempt in range(1, 1000):
        name = stamp if attempt == 1 else f"{stamp}-{attempt}"
        try:
            (output_dir / name).mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot write to --output-dir {output_dir.absolute()}: {exc.strerror or exc}") from None
        return name
    raise UserError(f"{output_dir} already holds 999 run folders named {stamp}*; give --run-name")


def _refuse_fresh_starts_on_restarts(cfg: TrainConfig) -> None:
    """--resume never under torchrun --max-restarts: each restart would begin at step 0 and rewrite the run's files."""
    if cfg.resume == "never" and torchrun_restarts()[1] > 0:
        raise UserError("--resume never cannot be combined with torchrun --max-restarts above 0: every restart would "
                        "start again from step 0 and rewrite the run's files; use --resume auto (the default), which "
                        "continues from the last checkpoint")


def _cannot_write(what: str, flag: str, exc: OSError) -> UserError:
    """The one line for a folder that cannot be made or written; a name too long says which flag to shorten."""
    shorter = f"; pick a shorter {flag}" if exc.errno == errno.ENAMETOOLONG else ""
    return UserError(f"cannot write to the {what}: {exc.strerror or exc}{shorter}")


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """A descriptor of `path`, and whether this call created the file."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            # O_NOFOLLOW: a symlink planted as the lock file is refused, not truncated and signed through.
            return os.open(path, os.O_RDWR | os.O_NOFOLLOW), False
        except FileNotFoundError:  # removed in between (HeldRunDir.remove_unused): create it after all
            continue


def _lock_folder(folder: Path, what: str, choose_another: str) -> tuple[int | None, bool]:
    """Hold `folder` for this process's life: an flock on its lock file, which the kernel releases when the
    process dies however it dies, so a crash never leaves a stale lock and a torchrun restart or a SLURM requeue
    (whose earlier workers are dead) gets in. Returns the descriptor that holds it (None where the filesystem
    has no locks) and whether this call created the lock file. `what` names the folder in messages ("run folder
    X"), `choose_another` the flag to change."""
    path = folder / LOCK_FILE
    for _ in range(100):
        try:
            fd, created = _open_lock_file(path)
        except OSError as exc:
            raise _cannot_write(what, choose_another, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{what} is in use by {holder}: another job is training there. Wait for it to end or "
                            f"stop it, or pick another {choose_another} (nothing was changed)") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: NFS without a lock manager, some parallel filesystems
            os.close(fd)
            print(f"warning: cannot lock the {what} ({exc.strerror or exc}); a second job started in it would not "
                  "be refused", file=sys.stderr, flush=True)
            return None, created
        # A holder that failed to start removes the lock file it made (HeldRunDir.remove_unused) before letting it
        # go: a lock taken on the removed file holds nothing, so take the one now at `path`.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same:
            return fd, created
        os.close(fd)
    raise UserError(f"cannot lock the {what}: its {LOCK_FILE} was replaced 100 times in a row")


def _sign_lock(fd: int, folder: Path) -> None:
    """Say who holds the folder, for the refusal a second job prints."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    holder = (f"PID {os.getpid()} on host {socket.gethostname()}" + (f" (job {job})" if job else "") +
              f" since {time.strftime('%Y-%m-%d %H:%M:%S')}").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
    except OSError as exc:  # a full disk: the lock holds all the same, but the run could write nothing else there
        raise write_failed(folder / LOCK_FILE, len(holder), exc) from None


def is_restart() -> bool:
    """Whether this process runs a job's command again: a torchrun restart of the workers or a SLURM requeue."""
    return any(env_whole_number(var, 0) > 0 for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def _check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    checkpoints_in = checkpoint_dir(cfg, run_dir)
    checkpoints = list_checkpoints(checkpoints_in)
    # A folder without files is what a run that failed during start-up (say, on missing data) leaves: reuse it.
    if any(p.is_file() and p.name != LOCK_FILE for p in run_dir.rglob("*")):
        if cfg.resume == "never":
            # A requeued job runs its command again: with `never` every attempt would start over the last one's.
            again = (" (this is a restart of the job, which runs the same command again: --resume auto continues "
                     "from the last checkpoint)" if is_restart() else "")
            raise UserError(f"run folder {run_dir} already exists and --resume never would start again from step 0 "
                            f"over it{again}; pick another --run-name (nothing was overwritten)")
        # A restart may find a folder without checkpoints: its first attempt died before the first one. Otherwise
        # only a run with checkpoints of its own is continued, from its newest (`auto`) or from a file no older than
        # them (`--resume PATH`, checkpoint.resume_from_path): another run's records are never replaced.
        if not (is_restart() or checkpoints):
            # A process killed by a second signal during its first checkpoint's write: the temp file is all there
            # is, and the refusal comes before the holder's cleanup of such files, so the user learns of it here.
            partial = [f"{write.sized}, {write.cause}" for write in partial_writes(checkpoints_in)]
            left = (f"; its checkpoints folder {checkpoints_in} holds only {', '.join(partial)}, which nothing resumes "
                    "from: remove the run folder to use this name again" if partial else "")
            raise UserError(f"run folder {run_dir} already exists and holds no checkpoint to resume; "
                            f"pick another --run-name (nothing was overwritten){left}")
    elif cfg.resume == "never" and checkpoints:  # a --checkpoint-dir outside the run folder, another run's
        raise UserError(f"--checkpoint-dir {checkpoints_in} already holds checkpoints (the newest "
                        f"{checkpoints[0].name}) and --resume never would write over them; pick another "
                        "--checkpoint-dir, or --resume auto to continue from them (nothing was overwritten)")
    _ensure_writable(checkpoints_in, "--checkpoint-dir")


@dataclass
class HeldRunDir:
    path: Path
    locks: dict[Path, int]  # folder -> the descriptor whose flock holds it (none where the filesystem has no locks)
    created: list[Path] = field(default_factory=list)  # the folders this process made (not there before it)
    # Folders above them it made too (--output-dir and its parents, a --checkpoint-dir's, .torchelastic/): removed
    # where empty.
    made_above: list[Path] = field(default_factory=list)
    made_locks: list[Path] = field(default_factory=list)  # the lock files this process made (not there before it)
    marker: Path | None = None  # the torchrun run-id marker this process wrote, naming `path`

    def remove_unused(self, refused: bool = False) -> None:
        """Remove the folders this process made where it wrote nothing but its lock file (empty folders aside): a
        run that fails before its first file (missing data, a refused flag) leaves no run folder to wonder about
        later, nor the torchrun run-id marker it wrote for it. In a folder that was there before, the lock file it
        made goes where it wrote nothing else: always on a `refused` start (nothing written yet), otherwise where
        the folder holds no other file. Called while the locks are still held; anything another process put there
        since keeps the folder."""
        lock_files = {folder / LOCK_FILE for folder in (*self.created, *self.locks)} | set(self.made_locks)

        def holds_only_locks(inside: list[Path]) -> bool:
            return not any(not p.is_dir() and p not in lock_files for p in inside)

        for folder in reversed(self.created):
            try:  # a folder it never got to make (a name too long) is no error here either
                inside = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)  # deepest first
                if not holds_only_locks(inside):
                    continue
                for entry in inside:
                    if entry.is_dir():
                        entry.rmdir()
                    else:
                        entry.unlink()
                folder.rmdir()
            except OSError:  # a file that appeared meanwhile, a read-only mount: the folder stays as it is
                pass
        for lock in self.made_locks:
            if lock.parent not in self.created:
                with contextlib.suppress(OSError):
                    if refused or holds_only_locks(list(lock.parent.rglob("*"))):
                        lock.unlink()
        if self.marker is not None and not self.path.exists():
            # Only now that the folder it names is gone: a torchrun restart of a job whose first attempt made the
            # folder finds it through the marker (and wrote none of its own).
            with contextlib.suppress(OSError):
                if self.marker.read_text().strip() == self.path.name:
                    self.marker.unlink()

    def release(self, remove_unused: bool = False, refused: bool = False) -> None:
        """Let the folders go; with `remove_unused`, first remove those this process made and wrote no file into
        (remove_unused, where `refused` says the start was refused before writing anything)."""
        if remove_unused:
            self.remove_unused(refused)
            remove_empty_folders(self.made_above)
        for fd in self.locks.values():
            os.close(fd)  # releases the lock
        self.locks = {}


def _make_folder(folder: Path, what: str, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(what, flag, exc) from None


def _choose_run_dir(cfg: TrainConfig) -> HeldRunDir:
    _refuse_fresh_starts_on_restarts(cfg)
    output_dir = Path(cfg.output_dir)
    made_above = missing_folders(output_dir)
    try:
        _ensure_writable(output_dir, "--output-dir")
    except UserError:
        remove_empty_folders(made_above)
        raise
    try:
        name, claimed, marker = (cfg.run_name, False, None) if cfg.run_name else _default_name(output_dir, made_above)
    except UserError:
        remove_empty_folders(made_above)
        raise
    run_dir = output_dir / name
    held = HeldRunDir(run_dir, {}, created=[run_dir] if claimed else [], made_above=made_above, marker=marker)
    try:
        # Locked before anything in them is read or written (the write probe too), so a second job never sees a
        # half-written file of the first, and a refused one leaves the folders as it found them. The checkpoint
        # folder is held too, inside the run folder or not: two runs writing one would overwrite and rotate away
        # each other's files, and another job's --checkpoint-dir may name this run's own checkpoints/ (which its
        # run folder's lock alone did not guard: both jobs trained on, in one folder).
        folders = {run_dir: (f"run folder {run_dir}", "--run-name")}
        checkpoints = checkpoint_dir(cfg, run_dir)
        # os.path.realpath, not Path.resolve: a name too long is the error of the folder's making below.
        real_checkpoints, real_run_dir = Path(os.path.realpath(checkpoints)), Path(os.path.realpath(run_dir))
        # One folder, one lock (a second flock would refuse itself): a --checkpoint-dir equal to the run folder is
        # held by the run folder's.
        checkpoints_held_as = checkpoints if real_checkpoints != real_run_dir else run_dir
        if checkpoints_held_as == checkpoints:
            flag = "--run-name" if real_checkpoints.is_relative_to(real_run_dir) else "--checkpoint-dir"
            folders[checkpoints] = (f"checkpoint folder {checkpoints}", flag)
        for folder, (what, flag) in folders.items():
            try:
                exists = folder.exists()
            except OSError as exc:  # a name too long
                raise _cannot_write(what, flag, exc) from None
            if not exists:
                held.created.append(folder)
                held.made_above.extend(missing_folders(folder.parent))
            _make_folder(folder, what, flag)
            fd, made_lock = _lock_folder(folder, what, flag)
            if made_lock:
                held.made_locks.append(folder / LOCK_FILE)
            if fd is not None:
                held.locks[folder] = fd
        _ensure_writable(run_dir, "the run folder")
        _check_run_dir(cfg, run_dir)
        for folder, fd in held.locks.items():
            _sign_lock(fd, folder)  # only now: a refused run leaves the folders as it found them
    except UserError:
        held.release(remove_unused=True, refused=True)
        raise
    if checkpoints_held_as in held.locks:
        # Held, so no write of another process is in flight there: a temp file is a dead process's.
        for write in remove_partial_writes(checkpoints):
            rank_line(0, "note", f"removed {write.sized} from {write.path.parent}: {write.cause}")
    return held


@contextmanager
def open_run_dir(cfg: TrainConfig, ctx: DistContext) -> Iterator[Path]:
    """Rank 0 picks, checks and locks the folder for the run's life; every rank gets the same path or the same
    error."""
    held: HeldRunDir | None = None

    def choose() -> Path:
        nonlocal held
        held = _choose_run_dir(cfg)
        return held.path

    try:
        yield ctx.on_main(choose)
    finally:
        if held is not None:
            # Failed or not: a start that failed before its first file, and a run found complete in another run's
            # --checkpoint-dir (nothing to do, nothing written), leave no run folder holding only a lock file.
            held.release(remove_unused=True)
