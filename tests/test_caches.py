"""The bytecode cache (dist_mnist/caches.py: use_bytecode_cache): where Python has no bytecode of torch and may not
write any beside it (the GPU machine's image: no `__pycache__` anywhere, PYTHONDONTWRITEBYTECODE=1), every process
compiled torch from source, 4.7 s of `import torch` and 4.1 s of torch._dynamo. A package of the test's own stands
in for torch; none of these tests imports torch in a child."""

from __future__ import annotations

import os
import py_compile
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, TRAIN_SCRIPT, cpu_env

from dist_mnist import caches
from dist_mnist.caches import (
    BYTECODE_CACHE_VARIABLE,
    COMPILE_CACHE_VARIABLES,
    bytecode_missing,
    check_compile_caches,
    use_bytecode_cache,
)
from dist_mnist.errors import UserError

PACKAGE = "cacheless_pkg"


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A two-module package with no bytecode, importable from `tmp_path/src`, and this user's cache folder in
    `tmp_path/cache`; Python's own bytecode settings as the test leaves them are put back afterwards."""
    source = tmp_path / "src" / PACKAGE
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("ANSWER = 42\n")
    (source / "sub.py").write_text("from cacheless_pkg import ANSWER\nDOUBLE = 2 * ANSWER\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "")  # recorded, so that teardown takes away what the test sets
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    monkeypatch.delenv(BYTECODE_CACHE_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    # In this process: not the hundreds of modules pytest and torch loaded (the subprocess test covers it).
    monkeypatch.setattr(caches, "_cache_loaded_modules", lambda: None)
    return source


def test_bytecode_is_missing_only_where_python_neither_has_it_nor_may_write_it(
        package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bytecode_missing(PACKAGE)  # no __pycache__, PYTHONDONTWRITEBYTECODE
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert not bytecode_missing(PACKAGE)  # Python writes it on the first import
    monkeypatch.setattr(caches.os, "access", lambda path, mode: False)  # a read-only site-packages (root writes all)
    assert bytecode_missing(PACKAGE)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    py_compile.compile(str(package / "__init__.py"), cfile=caches.importlib.util.cache_from_source(
        str(package / "__init__.py")))
    assert not bytecode_missing(PACKAGE)  # pip's installs: the bytecode is there
    assert not bytecode_missing("no_such_package_here")


def test_a_package_without_bytecode_is_compiled_once_into_a_private_cache_then_read_from_it(
        package: Path, tmp_path: Path) -> None:
    """Two processes as the GPU machine starts them (PYTHONDONTWRITEBYTECODE=1, no bytecode): the first compiles
    into ~/.cache/dist_mnist/pycache (mode 0700) and tells its children where it is; the second loads the
    bytecode from there (`python -v` names each code object's file). Nothing is written beside the sources."""
    folder = tmp_path / "cache" / "dist_mnist" / "pycache"
    script = (f"from dist_mnist.caches import use_bytecode_cache; print(use_bytecode_cache({PACKAGE!r})); "
              f"import {PACKAGE}.sub, os; print(os.environ['PYTHONPYCACHEPREFIX'])")
    env = cpu_env(PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=str(tmp_path / "cache"),
                  PYTHONPATH=os.pathsep.join([str(tmp_path / "src"), str(REPO)]))
    env.pop("PYTHONPYCACHEPREFIX", None)
    runs = [subprocess.run([sys.executable, "-v", "-c", script], env=env, capture_output=True, text=True,
                           timeout=60, check=True) for _ in range(2)]
    cached = folder / str(package).lstrip(os.sep) / f"sub.{sys.implementation.cache_tag}.pyc"  # no __pycache__
    for run in runs:
        assert run.stdout.splitlines() == [str(folder), str(folder)]
    assert cached.is_file() and stat.S_IMODE(folder.stat().st_mode) == 0o700
    # What the process had loaded before the cache was chosen is there too: a process that starts with the prefix
    # (a worker, torchrun's own) looks for it there, not beside the sources.
    loaded_before = Path(caches.__file__).resolve().parent / "console.py"
    assert (folder / str(loaded_before.parent).lstrip(os.sep) /
            f"console.{sys.implementation.cache_tag}.pyc").is_file()
    # Not the frozen modules (os, codecs: the interpreter loads its own copy) nor the script.
    assert not list(folder.rglob(f"codecs.{sys.implementation.cache_tag}.pyc"))
    assert f"# code object from '{cached}'" not in runs[0].stderr  # compiled from source, then written
    assert f"# code object from '{cached}'" in runs[1].stderr
    assert sorted(path.name for path in package.iterdir()) == ["__init__.py", "sub.py"]


def test_the_cache_is_left_alone_where_the_user_chose_or_turned_it_off(
        package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(BYTECODE_CACHE_VARIABLE, "off")
    assert use_bytecode_cache(PACKAGE) is None and sys.pycache_prefix is None
    monkeypatch.setenv(BYTECODE_CACHE_VARIABLE, "auto")
    monkeypatch.setattr(sys, "pycache_prefix", "/elsewhere")  # PYTHONPYCACHEPREFIX or -X pycache_prefix
    assert use_bytecode_cache(PACKAGE) is None and sys.pycache_prefix == "/elsewhere" and sys.dont_write_bytecode
    monkeypatch.setenv(BYTECODE_CACHE_VARIABLE, "yes")
    with pytest.raises(UserError, match=r"^DIST_MNIST_BYTECODE_CACHE='yes': expected one of auto, off \(auto: "):
        use_bytecode_cache(PACKAGE)
    assert capsys.readouterr() == ("", "")


def test_a_prefix_naming_the_cache_folder_is_the_cache_so_torchrun_can_read_it_too(
        package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: torchrun's own process imports torch before our code runs; started with PYTHONPYCACHEPREFIX naming our
    folder (written as the user likes: `//`, `/./`) it reads the cache, and the ranks it starts (the prefix
    inherited, PYTHONDONTWRITEBYTECODE too) must still write to it, even where Python has bytecode of its own, which
    a prefix makes it ignore. Found unsafe there, the folder has been read from since the process began: the run
    stops (review_bytecode 3)."""
    folder = tmp_path / "cache" / "dist_mnist" / "pycache"
    monkeypatch.setattr(sys, "pycache_prefix", f"{tmp_path}//cache/./dist_mnist/pycache")
    monkeypatch.setattr(caches, "bytecode_missing", lambda package: False)
    assert use_bytecode_cache(PACKAGE) == str(folder)
    assert not sys.dont_write_bytecode and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with pytest.raises(UserError, match=re.escape(
            f"PYTHONPYCACHEPREFIX={folder} names the bytecode cache, which Python has loaded code from since this "
            f"process began, and the cache {folder} is writable by its group and others (mode 777)")):
        use_bytecode_cache(PACKAGE)
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "mine"))  # a prefix of the user's own: theirs
    assert use_bytecode_cache(PACKAGE) is None and sys.pycache_prefix == str(tmp_path / "mine")


def test_the_cache_folder_is_checked_and_used_where_a_link_leads(package: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A link in place of the folder (a cache moved off a small home) was checked against its own parent, and the
    prefix kept the link, whose target's parent others could write to (review_bytecode 2): checked and used where
    it leads, as --compile's caches are."""
    shared = tmp_path / "shared"
    (shared / "pycache").mkdir(parents=True, mode=0o700)
    shared.chmod(0o777)  # no sticky bit: anyone can put a folder of theirs in the cache's place
    (tmp_path / "cache" / "dist_mnist").mkdir(parents=True, mode=0o700)
    (tmp_path / "cache" / "dist_mnist" / "pycache").symlink_to(shared / "pycache")
    assert use_bytecode_cache(PACKAGE) is None
    assert f"the bytecode cache {shared / 'pycache'} lies in {shared}, which its group and others can write to" in (
        capsys.readouterr().err)
    shared.chmod(0o755)
    assert use_bytecode_cache(PACKAGE) == sys.pycache_prefix == str(shared / "pycache")


def test_a_umask_of_002_leaves_the_caches_private(package: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Under umask 002 (a user with a group of their own, on many distributions) ~/.cache/dist_mnist was made
    group-writable, and the caches in it were then refused for that: every run noted the bytecode cache unused,
    and --compile stopped (review_bytecode 1)."""
    for variable in COMPILE_CACHE_VARIABLES:  # which check_compile_caches sets: put back afterwards
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    previous = os.umask(0o002)
    try:
        assert use_bytecode_cache(PACKAGE) == str(tmp_path / "cache" / "dist_mnist" / "pycache")
        check_compile_caches()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "cache" / "dist_mnist").stat().st_mode) == 0o700


def test_a_cache_folder_an_older_version_left_group_writable_is_refused_with_the_mend(
        package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A `dist_mnist` folder made under umask 002 before it was made 0700 stays so: refused (a group member could
    have put a folder there), with the command that mends it, which its owner may run (review_session2 1)."""
    parent = tmp_path / "cache" / "dist_mnist"
    parent.mkdir(parents=True)
    parent.chmod(0o775)
    assert use_bytecode_cache(PACKAGE) is None
    assert (f"lies in {parent}, which its group can write to (mode 775, no sticky bit) and so put a folder of their "
            f"own in its place; `chmod go-w {parent}` where nobody else can have written to it, or set "
            "DIST_MNIST_BYTECODE_CACHE=off") in capsys.readouterr().err
    parent.chmod(0o755)
    assert use_bytecode_cache(PACKAGE) == str(parent / "pycache")


def test_another_build_of_torch_empties_its_part_of_the_cache(package: Path, tmp_path: Path) -> None:
    """A cache in a home outlives an image, and a rebuilt image can change a source and keep its size and time
    (reproducible builds fix the times), when Python would load the old bytecode (review_bytecode 5): another
    build (another version.py) empties what the cache holds of the package's site-packages, and only that."""
    folder = tmp_path / "cache" / "dist_mnist" / "pycache"
    (package / "version.py").write_text("__version__ = '2.11.0'\n")
    mirror = folder / str(package.parent).lstrip(os.sep)
    elsewhere = folder / "usr" / "lib" / "python3" / f"os.{sys.implementation.cache_tag}.pyc"
    assert use_bytecode_cache(PACKAGE) == str(folder)
    old = mirror / PACKAGE / f"sub.{sys.implementation.cache_tag}.pyc"
    for pyc in (old, elsewhere):
        pyc.parent.mkdir(parents=True, exist_ok=True)
        pyc.write_bytes(b"bytecode")
    reset_prefix(use_bytecode_cache)
    assert old.is_file()  # the same build: kept
    (package / "version.py").write_text("__version__ = '2.11.1'\n")  # the same size
    reset_prefix(use_bytecode_cache)
    assert not old.exists() and elsewhere.is_file() and (mirror / caches.BUILD_FILE).is_file()


def reset_prefix(use: Callable[[str], str | None]) -> None:
    """`use(PACKAGE)` as a new process of the same environment would call it: no prefix yet."""
    sys.pycache_prefix = None
    sys.dont_write_bytecode = True
    assert use(PACKAGE) is not None


def test_a_cache_folder_others_can_write_to_is_not_used_and_the_first_rank_of_a_host_says_so(
        package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Python runs what the cache holds: a folder another user could write to is no cache (the checks --compile's
    caches get); the run goes on compiling from source, with one note from each host's first rank."""
    folder = tmp_path / "cache" / "dist_mnist" / "pycache"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert use_bytecode_cache(PACKAGE) is None
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert use_bytecode_cache(PACKAGE) is None
    assert sys.pycache_prefix is None and sys.dont_write_bytecode and "PYTHONPYCACHEPREFIX" not in os.environ
    assert capsys.readouterr().err == (
        f"note: Python has no bytecode for {PACKAGE} here and may not write it beside its sources, so every import "
        f"compiles it (seconds); the bytecode cache {folder} is writable by its group and others (mode 777), who "
        "could put code there that Python would load and run as you; remove it (or `chmod go-w "
        f"{folder}` where nobody else can have written to it), or set DIST_MNIST_BYTECODE_CACHE=off to silence "
        "this, or PYTHONPYCACHEPREFIX to a folder only you can write to (with PYTHONDONTWRITEBYTECODE unset)\n")
    folder.chmod(0o700)
    assert use_bytecode_cache(PACKAGE) == str(folder)
    assert sys.pycache_prefix == os.environ["PYTHONPYCACHEPREFIX"] == str(folder) and not sys.dont_write_bytecode


def test_bytecode_of_a_source_edited_since_is_compiled_again(tmp_path: Path) -> None:
    """_cache_loaded_modules compiles what the process loaded before the cache: a cached file that merely existed
    stayed stale after the source changed (review_session2 5)."""
    source, cached = tmp_path / "mod.py", tmp_path / "cache" / "mod.pyc"
    source.write_text("X = 1\n")
    cached.parent.mkdir()
    py_compile.compile(str(source), cfile=str(cached), doraise=True)
    assert caches._fresh(str(cached), str(source))
    source.write_text("X = 22\n")  # another size
    assert not caches._fresh(str(cached), str(source))
    assert not caches._fresh(str(tmp_path / "none.pyc"), str(source))


def test_the_entry_point_chooses_the_cache_before_it_imports_torch() -> None:
    """The cache must be chosen before `import torch` in dist_mnist/__main__.py's run(): torch imported first is
    compiled from source, the cache unused for it."""
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, dist_mnist.caches as caches\n"
        "def chosen(): print('torch' in sys.modules); raise SystemExit(0)\n"
        "caches.use_bytecode_cache = chosen\n"
        "from dist_mnist.__main__ import run\n"
        "run()")], capture_output=True, text=True, timeout=60, env=cpu_env())
    assert probe.stdout.strip() == "False", probe.stderr


def test_an_unknown_setting_ends_the_launcher_in_one_line_before_torch_loads(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, "--dataset", "synthetic"], capture_output=True,
                            text=True, timeout=60, env=cpu_env(**{BYTECODE_CACHE_VARIABLE: "on"}))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("error: DIST_MNIST_BYTECODE_CACHE='on': expected one of auto, off (auto: a bytecode "
                             "cache where Python has none for torch)\n")


def test_the_entry_point_chooses_the_cache_before_anything_imports_torch() -> None:
    """README, Development: caches.py is torch-free, and so is all that dist_mnist/__main__.py imports before it
    calls use_bytecode_cache: a module that imported torch first would compile it from source before the cache
    was chosen."""
    probe = subprocess.run([sys.executable, "-c", "import sys, dist_mnist.__main__; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60, env=cpu_env())
    assert probe.stdout.strip() == "False", probe.stderr
