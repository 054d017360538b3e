"""What an installed package, not a checkout, can do: a wheel holds dist_mnist/ alone (no launch/, docs/ or tests/),
so its entry points must live in the package; and what the checkout keeps out of builds and git."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE_FLAGS, cpu_env, make_mnist_dir, run

from dist_mnist import bench


def installed_copy(tmp_path: Path) -> Path:
    """A folder holding what a wheel installs, the package alone, to put on PYTHONPATH (before the test environment's
    editable install of the checkout)."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "dist_mnist", site / "dist_mnist", ignore=shutil.ignore_patterns("__pycache__"))
    return site


@pytest.mark.timeout(120)
def test_an_installed_package_trains_with_python_m_and_refuses_python_m_dist_mnist_train(tmp_path: Path) -> None:
    site = installed_copy(tmp_path)
    env = cpu_env(PYTHONPATH=str(site))
    flags = [*SMOKE_FLAGS, "--max-steps", "2", "--output-dir", str(tmp_path / "out"), "--run-name", "r"]
    trained = run([sys.executable, "-m", "dist_mnist", *flags], env=env, cwd=tmp_path, timeout=100)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["last_step"] == 2
    # Before: exit 0 having trained nothing, which a job script takes for success.
    refused = run([sys.executable, "-m", "dist_mnist.train", *flags], env=env, cwd=tmp_path, timeout=100)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == ("error: dist_mnist.train is not an entry point: run `python -m dist_mnist [flags]` "
                              "(or `torchrun --nproc_per_node=N -m dist_mnist [flags]`)\n")


@pytest.mark.timeout(120)
def test_an_installed_package_trains_under_torchrun_m(tmp_path: Path) -> None:
    site = installed_copy(tmp_path)
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
                  "dist_mnist", *SMOKE_FLAGS, "--max-steps", "2", "--output-dir", str(tmp_path / "out"),
                  "--run-name", "r"], env=cpu_env(PYTHONPATH=str(site)), cwd=tmp_path, timeout=100)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["last_step"] == 2


def test_a_launcher_copied_out_of_a_checkout_runs_the_installed_package(tmp_path: Path) -> None:
    """launch/train.py puts its grandparent first on sys.path only where that holds the package: a copy elsewhere
    (here beside a stray dist_mnist/ folder without __init__.py) imports the installed one."""
    site = installed_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "dist_mnist").mkdir(parents=True)
    (elsewhere / "launch").mkdir()
    shutil.copy(REPO / "launch" / "train.py", elsewhere / "launch" / "train.py")
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); import dist_mnist; "
             "print(dist_mnist.__file__, sys.argv[2] in sys.path)")
    result = subprocess.run([sys.executable, "-c", probe, str(elsewhere / "launch" / "train.py"), str(elsewhere)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=cpu_env(PYTHONPATH=str(site)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(site / "dist_mnist" / "__init__.py"), "False"]


@pytest.mark.cli
@pytest.mark.timeout(150)
def test_the_bench_of_an_installed_package_launches_its_training_through_the_package(tmp_path: Path) -> None:
    """Before: every launching section ran site-packages/launch/train.py, which no wheel holds, and --output's
    default was site-packages/docs/benchmarks.md."""
    site = installed_copy(tmp_path)
    env = cpu_env(PYTHONPATH=str(site))
    data = make_mnist_dir(tmp_path / "data", train_size=64, test_size=32)
    result = run([sys.executable, "-m", "dist_mnist.bench", "--data-dir", str(data), "--only", "scaling",
                  "--scaling", "1", "--scaling-steps", "2", "--output", ""], env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    helped = run([sys.executable, "-m", "dist_mnist.bench", "--help"], env=env, cwd=tmp_path, timeout=60)
    assert helped.returncode == 0 and str(site) not in helped.stdout
    assert "(default: benchmarks.md)" in " ".join(helped.stdout.split())


def test_the_bench_writes_to_and_advises_what_its_checkout_or_installed_copy_has(tmp_path: Path) -> None:
    assert (bench.default_output(REPO), bench.train_command(REPO)) == (
        str(REPO / "docs" / "benchmarks.md"), "python launch/train.py")
    site = installed_copy(tmp_path)
    assert (bench.default_output(site), bench.train_command(site)) == ("benchmarks.md", "python -m dist_mnist")


def test_ci_lists_the_requirements_without_tomllib(tmp_path: Path) -> None:
    """.ci/run's fallback interpreter may be a Python 3.10 (requires-python), which has no tomllib: pip's vendored
    tomli reads pyproject.toml there. Before: `import tomllib` in an inline script, and the whole CI run ended."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["tomllib"] = None\n')
    result = subprocess.run([sys.executable, str(REPO / ".ci" / "requirements.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=cpu_env(PYTHONPATH=str(hide)))
    assert result.returncode == 0, result.stderr
    listed = result.stdout.splitlines()
    assert "psutil>=5.9" in listed and "pytest>=8" in listed
    assert "torch-tb-profiler>=0.4.3" in listed
    assert not [line for line in listed if line.startswith(("torch>", "torch=", "torchvision"))]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_build_outputs_are_git_ignored() -> None:
    """`pip install .` / `pip wheel .` leave build/ (which setuptools reuses: a later wheel shipped a module deleted
    from the source) and dist/ in the checkout."""
    result = subprocess.run(["git", "check-ignore", "build/", "dist/", "dist_mnist.egg-info/"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["build/", "dist/", "dist_mnist.egg-info/"], result.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (the `pytest` script's sys.path) is 3.11's")
def test_the_suite_imports_the_checkout(tmp_path: Path) -> None:
    """Under the `pytest` script (`python -P -m pytest`: no current directory on sys.path) the tests imported an
    installed dist_mnist in-process while the runs they start import the checkout."""
    decoy = installed_copy(tmp_path)
    probe = tmp_path / "test_probe.py"
    probe.write_text("import dist_mnist\ndef test_probe():\n    print(dist_mnist.__file__)\n")
    result = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-c",
                             str(REPO / "pyproject.toml"), "--rootdir", str(REPO), str(probe)], cwd=REPO,
                            env=cpu_env(PYTHONPATH=str(decoy)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(REPO / "dist_mnist" / "__init__.py") in result.stdout, result.stdout


def test_the_torch_range_holds_both_torches_ci_runs_the_suite_under() -> None:
    """pyproject.toml asks for a range of torch and torchvision (an environment's own torch stays), and CI runs the
    suite under a torch at each end: the GPU machines' (.ci/run) and the pinned one (.ci/constraints.txt)."""
    from packaging.requirements import Requirement

    # Not tomllib: the project supports Python 3.10, which lacks it.
    block = (REPO / "pyproject.toml").read_text().split("\ndependencies = [\n", 1)[1].split("\n]", 1)[0]
    dependencies = re.findall(r'^\s*"([^"]+)",', block, re.MULTILINE)
    wanted = {req.name: req.specifier for req in map(Requirement, dependencies) if req.name in ("torch", "torchvision")}
    assert all(not any(spec.operator == "==" for spec in specifier) for specifier in wanted.values()), wanted
    gpu = re.search(r"torch==(\S+) torchvision==(\S+)", (REPO / ".ci" / "run").read_text())
    constraints = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (REPO / ".ci" / "constraints.txt").read_text(),
                                  re.MULTILINE))
    assert gpu and constraints.keys() == {"torch", "torchvision"}
    for versions in ({"torch": gpu.group(1), "torchvision": gpu.group(2)}, constraints):
        for name, version in versions.items():
            assert version in wanted[name], f"{name} {version} is outside pyproject.toml's {wanted[name]}"
