"""Durable writes: a file is either its old or its new content after a crash, and a full disk is one clear line.
And folders a failed start made: taken away again (missing_folders, remove_empty_folders)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from dist_mnist.errors import UserError
from dist_mnist.restarts import next_restart


class WriteFailed(UserError):
    """A failed write's line (write_failed); `failed` is its first part (which file, where, why, what it needed),
    for a caller that knows better what comes next (the summary of a run whose training is complete)."""

    def __init__(self, message: str, failed: str, folder_gone: bool) -> None:
        super().__init__(message)
        self.failed = failed
        self.folder_gone = folder_gone


def write_failed(path: Path, needed_bytes: int | None, exc: OSError) -> WriteFailed:
    """A file that could not be written (a full disk, a quota, a lost mount, a folder removed or renamed while the
    run wrote to it): the folder, the size (None: not known beforehand), the reason, and what comes next.

    Any write can fail, before a run's first checkpoint too, and the same command is refused for a run folder with
    files but no checkpoint: the advice covers both cases, which the writer does not know apart. Under torchrun with
    restarts left the workers come back by themselves, and each restart fails the same way until the cause is gone:
    the line says so instead of asking for a rerun. A folder that is gone takes other advice than a full disk: its
    files went with it (or are where it was moved), and freeing space brings nothing back."""
    needed = "" if needed_bytes is None else f" (it needed {needed_bytes:,} bytes there)"
    failed = f"could not write {path.name} to {path.parent}: {exc.strerror or exc}{needed}"
    if exc.errno == errno.ENOENT:
        gone = (f"{failed}: the folder was removed or renamed while the run wrote to it, and what it held went with "
                "it")
        if restart := next_restart():
            return WriteFailed(f"{gone}; {restart}, from a checkpoint still where the run looks (from step 0 where "
                               "none is)", failed, True)
        return WriteFailed(f"{gone}. To resume, point --output-dir and --run-name (or --checkpoint-dir) at where its "
                           "checkpoints are now; a run whose checkpoints were removed starts again under a new "
                           "--run-name", failed, True)
    written = f"{failed}; the files written before are intact"
    # ENOSPC and EDQUOT are space; any other error (a read-only remount, an I/O error) is named by its own words.
    space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if restart := next_restart():
        return WriteFailed(f"{written}; {restart} from the last checkpoint (from step 0 where the run wrote none), and "
                           f"they fail the same way unless {'space is freed there' if space else 'that is fixed'} "
                           "first", failed, False)
    fix = "Free space there, then rerun" if space else "Once that is fixed, rerun"
    return WriteFailed(f"{written}. {fix} the same command to resume from the last checkpoint; a run that wrote none "
                       "yet starts again under a new --run-name", failed, False)


def open_new(path: Path) -> BinaryIO:
    """`path` opened for writing as a new file of this process's: whatever is at that name first goes (a temp file a
    killed process left), and a symlink planted there in between is refused (O_EXCL, O_NOFOLLOW), not written
    through. A planted `.summary.json.tmp -> ~/victim` in a shared --output-dir had each write replace the victim's
    content."""
    path.unlink(missing_ok=True)  # a symlink goes, never its target
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def temp_path(path: Path) -> Path:
    """Where write_durably writes `path`'s new content before renaming it into place."""
    return path.with_name(f".{path.name}.tmp")


def write_durably(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename over `path`, fsync of the folder: after a crash either the old or the new file is
    there, complete. On any OSError the temp file is removed and the error says what it needed."""
    tmp = temp_path(path)
    try:
        with open_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # The rename is durable only once the directory entry itself is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, len(data), exc) from None


def read_own_records(path: Path) -> bytes | None:
    """The bytes of the line-per-record file `path` that a process is about to cut or rewrite (keep_records); None
    where there is none. A file that is not the run's own is refused with one line (UserError) before a byte of it is
    read: a symlink (its target's lines were printed to stderr as damaged records, a private key into a shared job
    log), a file with other hard links (the cut and the appends reached every linked copy: a victim's file linked in,
    a folder snapshotted with `cp -al` or `rsync --link-dest`), or no regular file (a FIFO blocked the resume;
    O_NONBLOCK lets the open return so fstat can refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW's answer to a symlink
            raise UserError(f"{path} is a symbolic link: a resume cuts and rewrites this file, and does not follow a "
                            f"link to do it; replace the link by a copy of the file it leads to (or remove it), then "
                            "rerun") from None
        raise write_failed(path, None, exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path} is not a regular file: a resume cuts and rewrites this file; remove it, then "
                            "rerun")
        if info.st_nlink > 1:
            raise UserError(f"{path} has {info.st_nlink - 1} other hard link(s) (a copy made with cp -al or rsync "
                            "--link-dest, or a file linked in): a resume cuts and rewrites this file, and would change "
                            f"every linked copy; give it a copy of its own (cp {path} {path}.copy && mv {path}.copy "
                            f"{path}), then rerun")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as exc:
        raise write_failed(path, None, exc) from None
    finally:
        os.close(fd)


_UNREAD = object()


def keep_records(path: Path, data: bytes, current: bytes | None | object = _UNREAD) -> None:
    """Make the line-per-record file `path` hold exactly `data`: the records a run keeps as a process starts.
    `current`: the file's bytes as the caller has just read them with read_own_records (None: no file), so a caller
    that read them to choose `data` does not read the whole file again.

    Where the file already begins with `data` it is cut there in place (nothing is done where it holds no more), not
    replaced by a rename: a follower holding the file open sees the same file shrink and can follow on (GNU `tail -f`
    says `file truncated` and reads it again from its start), where after a rename it read the old, unlinked file for
    ever. A follower that keeps its byte offset without checking the size reads from the middle of a record: the README
    says so. A file with other hard links, or a symlink, is refused first (read_own_records). Crash-safe as
    write_durably is: a truncation changes only the file's length, in one update of its inode, so after a crash the file
    has its old length or the new one, and both end at a whole record (`data` is whole records, and so is what was
    appended after it); the fsync makes the new length durable before the run appends after it. Any other content (a
    damaged line dropped, records that are not the file's start) is written with write_durably."""
    if current is _UNREAD:
        current = read_own_records(path)
    if current == data:
        return
    if not isinstance(current, bytes) or not current.startswith(data):
        write_durably(path, data)
        return
    try:
        # O_NOFOLLOW: a record file replaced by a symlink is refused, not cut wherever it points.
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_failed(path, None, exc) from None


def open_for_appending(path: Path) -> int:
    """A descriptor for append_whole_to; a failure (no space for a new file, no permission) is one line."""
    try:
        # O_NOFOLLOW: a record file replaced by a symlink is refused, not appended to wherever it points.
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise write_failed(path, None, exc) from None


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` entirely or not at all: a write the disk cut short is truncated away, so readers of a
    line-per-record file only ever see whole records."""
    fd = open_for_appending(path)
    try:
        append_whole_to(fd, path, data)
    finally:
        os.close(fd)


def append_whole_to(fd: int, path: Path, data: bytes) -> None:
    """append_whole on a descriptor from open_for_appending, for a file written often; `path` names it in errors."""
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        written = 0
        while written < len(data):  # the kernel may take part of it, then refuse the rest
            written += os.write(fd, data[written:])
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        raise write_failed(path, len(data), exc) from None


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet: what `mkdir(parents=True)` of it would make, so a
    command that fails before writing anything can take them away again (remove_empty_folders)."""
    missing = []
    for path in (folder, *folder.parents):
        try:
            if path.exists():
                break
        except OSError:  # a name too long, a parent not searchable: nothing here can be made, so nothing to remove
            break
        missing.append(path)
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of `folders` that are empty, deepest first; any other stays as it is (something is in it, or
    another process uses it)."""
    for folder in sorted(folders, key=lambda path: len(path.absolute().parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
