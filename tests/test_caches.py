"""The bytecode cache (dist_mnist/caches.py: use_bytecode_cache): where Python has no bytecode of torch and may not
write any beside it (the GPU machine's image: no `__pycache__` anywhere, PYTHONDONTWRITEBYTECODE=1), every process
compiled torch from source, 4.7 s of `import torch` and 4.1 s of torch._dynamo. A package of the test's own stands
in for torch; none of these tests imports torch in a child."""

from __future__ import annotations

import os
import py_compile
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TRAIN_SCRIPT, cpu_env

from dist_mnist import caches
from dist_mnist.caches import BYTECODE_CACHE_VARIABLE, bytecode_missing, use_bytecode_cache
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
    folder it reads the cache, and the ranks it starts (the prefix inherited, PYTHONDONTWRITEBYTECODE too) must
    still write to it, even where Python has bytecode of its own, which a prefix makes it ignore."""
    folder = tmp_path / "cache" / "dist_mnist" / "pycache"
    monkeypatch.setattr(sys, "pycache_prefix", str(folder))
    monkeypatch.setattr(caches, "bytecode_missing", lambda package: False)
    assert use_bytecode_cache(PACKAGE) == str(folder)
    assert not sys.dont_write_bytecode and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)  # unsafe: not read from any more, Python's default instead
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert use_bytecode_cache(PACKAGE) is None
    assert sys.pycache_prefix is None and "PYTHONPYCACHEPREFIX" not in os.environ and sys.dont_write_bytecode


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
