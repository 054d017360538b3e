"""This user's cache folders, and the checks that make them safe to load code from: torch.compile's (inductor's
and Triton's, for --compile) and Python's bytecode cache (every run where Python has no bytecode of torch of its own).

Torch-free (the standard library and dist_mnist's console, errors and durable): the bytecode cache is chosen before
`import torch`, which it speeds up."""

from __future__ import annotations

import getpass
import hashlib
import importlib.util
import os
import py_compile
import re
import shutil
import stat
import sys
import tempfile
from contextlib import suppress
from pathlib import Path

from dist_mnist.console import rank_line
from dist_mnist.durable import write_durably
from dist_mnist.errors import UserError


def torch_default_inductor_cache_dir() -> str:
    """torch._inductor's default cache folder (torch/_inductor/runtime/cache_dir_utils.py: default_cache_dir), which
    cannot be imported without importing torch._dynamo. A name in the shared temporary folder that anyone can guess:
    used only where this user has no cache folder of their own (user_cache_dir), and then checked as any other
    (check_compile_caches)."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):  # no name for this uid (a container): torch 2.14's fallback
        # (2.11 has none: its own default raised there, so this value also spares 2.11 that error)
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def user_cache_dir() -> str | None:
    """This user's cache folder for dist_mnist, `$XDG_CACHE_HOME/dist_mnist` (`~/.cache/dist_mnist`), made where
    missing; None where there is none to make (no home, a read-only one). Inside the home, which no other user can
    write to, nobody can make it first: torch's own default, /tmp/torchinductor_<user>, another local user could
    create before this user's first --compile and fill with pickles the compile then loaded (review_security F2)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is invalid and ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # no HOME and no passwd entry: expanduser left `~` as it was
        return None
    folder = os.path.normpath(os.path.join(base, "dist_mnist"))
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        return None
    # Mode 0700 too: the caches in it are checked for a parent others cannot write to, and a umask of 002 (many
    # distributions' default for a user with a group of their own) made it group-writable, so every cache in it
    # was refused (review_bytecode 1).
    return folder if _private_folder(folder) else None


def _private_folder(path: str) -> bool:
    """Make the folder `path` with mode 0700 where it is missing (nobody else may write in a cache of code this
    process loads); whether it now exists."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    return os.path.isdir(path)


def inductor_cache_dir(base: str | None = None) -> str:
    """The folder this run gives torch._inductor when TORCHINDUCTOR_CACHE_DIR is not set: `inductor` in
    user_cache_dir (`base`, where the caller has it already), made with mode 0700; torch's own default where this
    user has no cache folder."""
    if base is None:
        base = user_cache_dir()
    if base is not None and _private_folder(folder := os.path.join(base, "inductor")):
        return folder
    return torch_default_inductor_cache_dir()


COMPILE_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def check_compile_caches() -> None:
    """--compile: the folders torch.compile's caches load code from, made safe to use before any compile.

    Both caches hold what the compiled step runs: inductor's FX graph and automatic-dynamic entries are pickles it
    loads, its generated modules are imported, and Triton's holds compiled kernels. A folder another user can write
    to (or owns, and so can open to writing) lets them plant code that runs as this user. Unset variables get ours
    (TRITON_CACHE_DIR beside the inductor folder; torch would put it inside). Every folder, ours or inherited, is
    made with mode 0700 where missing and must then be a folder this uid owns that neither its group nor others can
    write to, in a parent folder owned by this uid or root that others cannot rename it out of (not writable by its
    group or others, or sticky; the folders above it are not checked); otherwise the run stops with one line naming
    it. Each
    variable is then set to the folder's resolved path, so a symbolic link on the way cannot be pointed elsewhere
    after the check. Called before the import thread starts: torch._dynamo's import reads and sets the variable."""
    inherited = {variable for variable in COMPILE_CACHE_VARIABLES if variable in os.environ}
    if "TORCHINDUCTOR_CACHE_DIR" not in inherited:
        base = user_cache_dir()
        inductor = os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(base)
        # Triton's beside it only where inductor's is in our own cache folder: where that could not be made (a
        # read-only home), neither can Triton's, and torch's default for it is the one left.
        if "TRITON_CACHE_DIR" not in inherited and base is not None and os.path.dirname(inductor) == base:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(base, "triton")
    for variable in COMPILE_CACHE_VARIABLES:
        if variable in os.environ:
            os.environ[variable] = _checked_cache_folder(os.environ[variable], variable, variable in inherited)


def _checked_cache_folder(value: str, variable: str, inherited: bool) -> str:
    """check_compile_caches for one folder: its resolved path, or a UserError saying what is wrong and the fix."""
    # abspath as torch does (cache_dir_utils.cache_dir): an empty value is the current folder.
    folder = os.path.realpath(os.path.abspath(value))
    source = (f"the default, {variable} being unset" if not inherited else
              variable if os.path.abspath(value) == folder else f"{variable}={value}")
    what = f"--compile's cache folder {folder} ({source})"
    own = f"set {variable} to a folder of your own that only you can write to"
    if inherited:
        own += " (or unset it)"
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        _private_folder(folder)
        problem = _unsafe_folder(folder, "the compile", own)
    except OSError as exc:
        raise UserError(f"{what} cannot be used: {exc.strerror or exc}; {own}") from None
    if problem is None:
        return folder
    raise UserError(f"{what} {problem}")


def _unsafe_folder(folder: str, loader: str, own: str) -> str | None:
    """What makes the existing `folder`, a cache of code that `loader` loads, unsafe to use, in words that end with
    the fix `own`; None where it is a folder this uid owns that neither its group nor others can write to, in a
    parent folder owned by this uid or root that others cannot rename it out of. OSError where it cannot be read."""
    parent = os.path.dirname(folder)
    info, parent_info = os.stat(folder), os.stat(parent)
    uid = os.getuid()
    planted = f"could put code there that {loader} would load and run as you"
    if not stat.S_ISDIR(info.st_mode):
        return f"is no folder; {own}"
    if info.st_uid != uid:
        return (f"is owned by uid {info.st_uid}, not by this user (uid {uid}): its owner {planted}; remove it, or "
                f"{own}")
    if info.st_mode & 0o022:
        return (f"is writable by {_writers(info.st_mode)} (mode {stat.S_IMODE(info.st_mode):o}), who {planted}; "
                f"remove it (or `chmod go-w {folder}` where nobody else can have written to it), or {own}")
    if parent_info.st_uid not in (uid, 0):
        return (f"lies in {parent}, owned by uid {parent_info.st_uid}, who could put a folder of their own in its "
                f"place; {own}")
    if parent_info.st_mode & 0o022 and not parent_info.st_mode & stat.S_ISVTX:
        # A parent of this user's own (dist_mnist's folder made group-writable by a umask of 002 before it was made
        # 0700) is mended by its owner; the command is named, not run: only they know who else could write there.
        mend = (f"`chmod go-w {parent}` where nobody else can have written to it, or "
                if parent_info.st_uid == uid else "")
        return (f"lies in {parent}, which {_writers(parent_info.st_mode)} can write to (mode "
                f"{stat.S_IMODE(parent_info.st_mode):o}, no sticky bit) and so put a folder of their own in its "
                f"place; {mend}{own}")
    return None


def _writers(mode: int) -> str:
    """Who besides the owner may write to a file of `mode`, in words."""
    return " and ".join(who for who, bit in (("its group", 0o020), ("others", 0o002)) if mode & bit)


BYTECODE_CACHE_VARIABLE = "DIST_MNIST_BYTECODE_CACHE"
BYTECODE_CACHE_SETTINGS = ("auto", "off")
# In the bytecode cache's mirror of torch's site-packages: which build of torch filled it (_empty_for_another_build).
BUILD_FILE = "dist_mnist-torch-build"


def use_bytecode_cache(package: str = "torch") -> str | None:
    """Where Python has no bytecode of `package`'s modules (torch's; tests name their own) and may not write any
    beside them, keep it in `pycache` in user_cache_dir (`~/.cache/dist_mnist/pycache`, mode 0700) from this process
    on: the folder, or None where the run goes on as Python would have it.

    Container images often carry packages without their `__pycache__` folders, and with PYTHONDONTWRITEBYTECODE=1
    (or in a read-only site-packages) Python compiles every module it imports from source in every process: on the
    H200 machine, whose image is such, `import torch` took 4.7 s and `torch._dynamo`, which every torch.optim
    optimizer imports, 4.1 s more, against 2.4 s and 0.8-1.4 s with a cache (2026-11-29; docs/benchmarks.md). Python's
    own `sys.pycache_prefix` (PYTHONPYCACHEPREFIX) keeps bytecode in a separate tree, checked against each source's
    size and modification time as `__pycache__` is; the first run fills it (about 55 MB for torch and what it
    imports), later runs read it. Set here, before `import torch`, and in the environment for the processes this one
    starts (a DataLoader's spawned workers, inductor's compile workers), which read it. The modules this process
    loaded before (the standard library's, dist_mnist's first few) are compiled into it too, since a process that
    starts with the prefix looks for theirs there. A cache outlives an image in a mounted home, and an image
    rebuilt with its files' times fixed (reproducible builds) can change a source and keep its size and time: what
    the cache holds of `package`'s site-packages is emptied when another build of `package` comes to use it
    (_empty_for_another_build).

    Nothing changes where the sources have their bytecode or Python may write it beside them (pip's installs,
    CI's), where the user chose a prefix of their own (PYTHONPYCACHEPREFIX, `-X pycache_prefix`), or with
    DIST_MNIST_BYTECODE_CACHE=off. A prefix naming this folder is taken as this folder: torchrun's own process reads
    the cache where it is started with it, and the ranks it starts fill it. A folder that is not safe to load code
    from (see _unsafe_folder; a symbolic link is checked where it leads) or cannot be made is left unused, with one
    `note:` line from each host's first rank; an unknown setting, or an inherited prefix naming the folder when it
    is not safe (Python has read from it since the process began), is a UserError.
    """
    setting = os.environ.get(BYTECODE_CACHE_VARIABLE, "auto")
    if setting not in BYTECODE_CACHE_SETTINGS:
        raise UserError(f"{BYTECODE_CACHE_VARIABLE}={setting!r}: expected one of "
                        f"{', '.join(BYTECODE_CACHE_SETTINGS)} (auto: a bytecode cache where Python has none for "
                        "torch)")
    if setting == "off":
        return None
    chosen = sys.pycache_prefix
    if chosen is None and not bytecode_missing(package):
        return None
    base = user_cache_dir()
    folder = None if base is None else os.path.join(base, "pycache")
    if chosen is not None and (folder is None or os.path.realpath(chosen) != os.path.realpath(folder)):
        return None  # the user's own prefix
    own = (f"set {BYTECODE_CACHE_VARIABLE}=off to silence this, or PYTHONPYCACHEPREFIX to a folder only you can "
           "write to (with PYTHONDONTWRITEBYTECODE unset)")
    if folder is None:
        problem = f"has no folder of this user's own to go in (no home, or a read-only one); {own}"
    else:
        try:
            _private_folder(folder)
            folder = os.path.realpath(folder)  # checked, and used, where a link leads: it cannot be re-pointed after
            found = _unsafe_folder(folder, "Python", own)
        except OSError as exc:
            found = f"cannot be used: {exc.strerror or exc}; {own}"
        if found is None:
            _empty_for_another_build(folder, package)
            sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"] = folder
            sys.dont_write_bytecode = False  # PYTHONDONTWRITEBYTECODE's point, no files beside the sources, holds
            _cache_loaded_modules()
            return folder
        problem = f"{folder} {found}"
    if chosen is not None:
        raise UserError(f"PYTHONPYCACHEPREFIX={chosen} names the bytecode cache, which Python has loaded code from "
                        f"since this process began, and the cache {problem}")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        rank_line(os.environ.get("RANK", "0"), "note", f"Python has no bytecode for {package} here and may not "
                  f"write it beside its sources, so every import compiles it (seconds); the bytecode cache {problem}")
    return None


def bytecode_missing(package: str) -> bool:
    """Whether importing `package` (a top-level one, found without importing it) compiles it from source: no
    bytecode beside its `__init__.py`, and none Python may write there (PYTHONDONTWRITEBYTECODE, `-B`, or a folder
    this user cannot write to). A package that is absent, or not plain source, is not missing any."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return False
    cached = importlib.util.cache_from_source(spec.origin)
    if os.path.exists(cached):
        return False
    folder = os.path.dirname(cached)  # __pycache__, which Python makes in the package's folder where it is missing
    return sys.dont_write_bytecode or not os.access(folder if os.path.isdir(folder) else os.path.dirname(folder),
                                                    os.W_OK)


def _empty_for_another_build(folder: str, package: str) -> None:
    """Empty the part of the bytecode cache `folder` that mirrors `package`'s site-packages where another build of
    `package` filled it, then record this one's (BUILD_FILE there: a hash of its version.py, which names torch's
    version and git commit). Each environment has its own part (the cache mirrors sources' paths), so two of them
    used in turn keep theirs. Ranks that start together may both empty it: a file one of them has just written is
    compiled again by the next run."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return
    package_dir = os.path.dirname(os.path.abspath(spec.origin))
    try:
        with open(os.path.join(package_dir, "version.py"), "rb") as file:
            key = hashlib.sha256(file.read(65536)).hexdigest()
    except OSError:  # no version.py: nothing says which build this is
        return
    # Where cache_from_source puts the bytecode of a source in site-packages: the folder's path below the prefix.
    mirror = os.path.join(folder, os.path.dirname(package_dir).lstrip(os.sep))
    record = os.path.join(mirror, BUILD_FILE)
    try:
        with open(record) as file:
            if file.read().strip() == key:
                return
    except OSError:
        pass
    shutil.rmtree(mirror, ignore_errors=True)
    if os.path.lexists(mirror):  # not emptied (a file it may not remove): not recorded, so the next run tries again
        return
    try:
        os.makedirs(mirror, exist_ok=True)
        write_durably(Path(record), f"{key}\n".encode())
    except (OSError, UserError):  # unrecorded: the next run empties it again
        pass


def _cache_loaded_modules() -> None:
    """Compile into the cache the modules this process loaded from source before the cache was chosen (the
    standard library's that start-up needs, dist_mnist's first few): they came from their own `__pycache__`, which a
    process started with the prefix (a DataLoader or compile worker, torchrun's own process) does not look in, so
    it compiled each from source (41 modules, 0.27 s of compiling on the 2-core CPU, review_bytecode 6). Frozen
    modules (the interpreter's own, loaded from itself) and the script are left out: no process reads theirs. A
    module whose cached bytecode is not of its source as it is now (edited since) is compiled again."""
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        spec = getattr(module, "__spec__", None)
        if (name == "__main__" or not isinstance(source, str) or not source.endswith(".py")
                or getattr(spec, "origin", None) == "frozen"):
            continue
        cached = importlib.util.cache_from_source(source)
        if not _fresh(cached, source):
            with suppress(OSError, py_compile.PyCompileError, ValueError):
                py_compile.compile(source, cfile=cached, doraise=True)


def _fresh(cached: str, source: str) -> bool:
    """Whether the bytecode file `cached` is of `source` as it is now, by the source's modification time and size
    as a timestamp-checked .pyc holds them (importlib's own check; a hash-checked one is taken as fresh)."""
    try:
        with open(cached, "rb") as file:
            header = file.read(16)
        info = os.stat(source)
    except OSError:
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    if int.from_bytes(header[4:8], "little") & 1:  # hash-based (PEP 552)
        return True
    return (int.from_bytes(header[8:12], "little") == int(info.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == info.st_size & 0xFFFFFFFF)
