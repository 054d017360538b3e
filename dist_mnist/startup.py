"""Start-up timing: where the seconds from process start to the first training step go, phase by phase."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from dist_mnist.caches import inductor_cache_dir
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
        """`startup_s` and its breakdown in seconds, and `bytecode_cache`, the folder Python kept its bytecode in
        when not beside the sources (dist_mnist.caches.use_bytecode_cache's, or the user's PYTHONPYCACHEPREFIX),
        else None (the summary.json fields)."""
        startup_s = first_step_unix - self.process_start
        return {"startup_s": startup_s,
                "startup": {**self.phases, "other": max(0.0, startup_s - sum(self.phases.values()))},
                "bytecode_cache": sys.pycache_prefix}
