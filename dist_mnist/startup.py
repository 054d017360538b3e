"""Start-up timing: where the seconds from process start to the first training step go, phase by phase."""

from __future__ import annotations

import getpass
import importlib
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from dist_mnist.errors import UserError, join_thread


def process_start_unix() -> float:
    """The Unix time this process started, to the clock tick (10 ms).

    Not psutil's create_time: it adds the start's ticks since boot to /proc/stat's `btime`, which is whole seconds,
    so it reads up to a second early (0.91 s on our CI machine), and every start-up figure with it. Here the
    process's age comes from the same clock as its start tick (CLOCK_BOOTTIME), and only that age meets the wall
    clock. Elsewhere (not Linux) psutil's figure stands.
    """
    try:
        with open("/proc/self/stat") as stat:
            # Field 22, starttime; the fields after the command name, which may hold spaces, start at field 3.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return psutil.Process().create_time()
    return time.time() - age


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
    folder = os.path.join(base, "dist_mnist")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return folder


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
    parent = os.path.dirname(folder)
    source = (f"the default, {variable} being unset" if not inherited else
              variable if os.path.abspath(value) == folder else f"{variable}={value}")
    what = f"--compile's cache folder {folder} ({source})"
    own = f"set {variable} to a folder of your own that only you can write to"
    if inherited:
        own += " (or unset it)"
    try:
        os.makedirs(parent, exist_ok=True)
        _private_folder(folder)
        info, parent_info = os.stat(folder), os.stat(parent)
    except OSError as exc:
        raise UserError(f"{what} cannot be used: {exc.strerror or exc}; {own}") from None
    uid = os.getuid()
    planted = "could put code there that the compile would load and run as you"
    if not stat.S_ISDIR(info.st_mode):
        problem = f"is no folder; {own}"
    elif info.st_uid != uid:
        problem = (f"is owned by uid {info.st_uid}, not by this user (uid {uid}): its owner {planted}; remove it, or "
                   f"{own}")
    elif info.st_mode & 0o022:
        problem = (f"is writable by {_writers(info.st_mode)} (mode {stat.S_IMODE(info.st_mode):o}), who {planted}; "
                   f"remove it (or `chmod go-w {folder}` where nobody else can have written to it), or {own}")
    elif parent_info.st_uid not in (uid, 0):
        problem = (f"lies in {parent}, owned by uid {parent_info.st_uid}, who could put a folder of their own in its "
                   f"place; {own}")
    elif parent_info.st_mode & 0o022 and not parent_info.st_mode & stat.S_ISVTX:
        problem = (f"lies in {parent}, which {_writers(parent_info.st_mode)} can write to (mode "
                   f"{stat.S_IMODE(parent_info.st_mode):o}, no sticky bit) and so put a folder of their own in its "
                   f"place; {own}")
    else:
        return folder
    raise UserError(f"{what} {problem}")


def _writers(mode: int) -> str:
    """Who besides the owner may write to a file of `mode`, in words."""
    return " and ".join(who for who, bit in (("its group", 0o020), ("others", 0o002)) if mode & bit)


def import_failure(module: str, exc: Exception) -> UserError:
    """A background import's failure as one line: TensorBoard missing (GPU images often have torch and no index to
    install from; --tensorboard is the default), or whatever else broke the import."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "tensorboard":
        return UserError("--tensorboard needs the tensorboard package (pip install tensorboard), or run with "
                         "--no-tensorboard")
    return UserError(f"background import of {module} (thread 'imports') failed: {type(exc).__name__}: {exc}")


class StartupTimer:
    """Created as `main` starts, so its first phase is the interpreter and the imports; the loop's first step ends
    it. What no phase covers (run folder, config.json, ...) is reported as `other`, so the phases add up to
    `startup_s`."""

    def __init__(self) -> None:
        self.process_start = process_start_unix()
        self.phases: dict[str, float] = {"imports": time.time() - self.process_start}
        self._importer: threading.Thread | None = None
        self._import_error: BaseException | None = None
        self._imported = threading.Event()  # set by the import thread as it ends, either way (one thread a timer)

    def import_in_background(self, *modules: str) -> None:
        """Import `modules` in a thread, overlapping the data loading and (on CUDA) the kernel warm-up.

        torch.optim imports torch._dynamo when the first optimizer is built (0.8-1.0 s on the 2-core CPU), and
        TensorBoard takes about a second. The main thread must not import a module the thread is importing in the
        meantime, or touch one it has begun (init_process_group reaches into torch._dynamo once it is in
        sys.modules): it would wait under the module's lock for the whole import. Nor may it import torch._inductor
        (torch.use_deterministic_algorithms does): torch._inductor and torch._dynamo import each other, and two
        threads entering that cycle from opposite ends make one of the imports fail (tests/test_e2e.py).
        """
        # torch._dynamo's import sets TORCHINDUCTOR_CACHE_DIR (torch._inductor's cache_dir()). glibc's setenv of a
        # name new to the environment reallocates the environ array, which the main thread's C code (OpenMP, cuBLAS,
        # NCCL initialisation) may be walking in getenv meanwhile, without a lock: a segmentation fault. Made here,
        # in the main thread, with our default (a --compile run has set and checked it before: check_compile_caches),
        # the thread's write only replaces an entry's value.
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
        self._importer = threading.Thread(target=self._import, args=(modules,), name="imports", daemon=True)
        self._importer.start()

    def _import(self, modules: tuple[str, ...]) -> None:
        name = ""
        try:
            for name in modules:
                importlib.import_module(name)
        except Exception as exc:  # raised in the main thread by join_background_imports, as one line
            self._import_error = import_failure(name, exc)
        except BaseException as exc:  # a SystemExit: raised as it is
            self._import_error = exc
        finally:
            self._imported.set()

    def join_background_imports(self) -> None:
        """Wait for the background imports (timed as their own phase); their failure is raised here."""
        if self._importer is None:
            return
        with self.phase("background_imports"):
            join_thread(self._importer, self._imported)
        self._importer = None
        if self._import_error is not None:
            raise self._import_error

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def report(self, first_step_unix: float) -> dict[str, Any]:
        """`startup_s` and its breakdown in seconds (the summary.json fields)."""
        startup_s = first_step_unix - self.process_start
        return {"startup_s": startup_s,
                "startup": {**self.phases, "other": max(0.0, startup_s - sum(self.phases.values()))}}
