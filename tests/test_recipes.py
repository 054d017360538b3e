"""Recipes: the README's table is the code's, `auto` follows the device, explicit flags win, and the choice is
recorded; `--stop-at-accuracy` stops, saves and reports; the start-up breakdown adds up."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, SMOKE_FLAGS, train_in_process

from dist_mnist.config import TrainConfig, apply_recipe, build_parser, parse_args
from dist_mnist.errors import UserError
from dist_mnist.recipes import RECIPE_FIELDS, RECIPES, Recipe
from dist_mnist.train import Trainer, TrainState, main

# README column -> Recipe field, in table order after the name.
README_COLUMNS = {"per-process batch": "batch_size", "peak lr": "lr", "epochs": "epochs",
                  "warm-up epochs": "warmup_epochs",
                  "eval every": "eval_every", "eval batch": "eval_batch_size", "checkpoint every": "checkpoint_every",
                  "epoch checkpoints": "epoch_checkpoints", "comm hook": "ddp_comm_hook",
                  "bucket MiB": "bucket_cap_mb"}


def readme_recipes() -> dict[str, Recipe]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe | per-process batch |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        types = {f.name: str(f.type) for f in dataclasses.fields(Recipe)}  # source text (postponed annotations)
        parse: dict[str, Callable[[str], Any]] = {"int": lambda text: int(text.replace(",", "")), "float": float,
                                                  "str": lambda text: text.strip("`")}
        values = {field: parse[types[field]](cells[column]) for column, field in README_COLUMNS.items()}
        table[cells["recipe"]] = Recipe(**values)
    return table


def test_readme_recipe_table_is_the_code_table() -> None:
    assert set(README_COLUMNS.values()) == {f.name for f in dataclasses.fields(Recipe)}
    assert readme_recipes() == RECIPES


def test_readme_gives_each_recipes_warmup_share_at_its_epochs_and_at_one() -> None:
    """README's paragraph under the table turns each recipe's warm-up in epochs into --warmup-frac, at the recipe's
    epochs and at `--epochs 1`."""
    text = " ".join((REPO / "README.md").read_text().split())
    for name, recipe in RECIPES.items():
        assert re.search(rf"the {name} recipe's {recipe.warmup_epochs:g} epochs are (`--warmup-frac` )?"
                         rf"{recipe.warmup_frac(recipe.epochs):g} at its {recipe.epochs} epochs and "
                         rf"{recipe.warmup_frac(1):g} with `--epochs 1`", text), name


def test_readme_lists_the_cuda_recipes_evaluation_steps() -> None:
    """The README's example of --eval-every counting from the last evaluation: the steps the loop's rule gives for
    the cuda recipe on one GPU (60,000 images, an epoch's end evaluating too)."""
    recipe = RECIPES["cuda"]
    steps_per_epoch = 60_000 // recipe.batch_size
    text = " ".join((REPO / "README.md").read_text().split())
    stated = re.search(rf"the cuda recipe's {steps_per_epoch}-step epochs evaluate at steps ([\d, ]+), \.\.\.", text)
    assert stated, "README: the cuda recipe's evaluation steps"
    listed = [int(n) for n in stated.group(1).strip(", ").split(", ")]
    state = TrainState()
    for step in range(1, listed[-1] + 1):
        state.step = step
        if step % steps_per_epoch == 0 or state.evaluation_due(recipe.eval_every):
            state.record_evaluation({"step": step}, cadence=True)
    assert [m["step"] for m in state.metrics] == listed


def test_plain_defaults_are_the_cpu_recipe() -> None:
    assert {k: getattr(TrainConfig(), k) for k in RECIPE_FIELDS} == RECIPES["cpu"].flag_values()
    assert "--recipe" in build_parser().format_help()


@pytest.mark.parametrize(("requested", "device", "expected"), [
    ("auto", "cuda", "cuda"), ("auto", "cpu", "cpu"), ("cpu", "cuda", "cpu"), ("cuda", "cpu", "cuda")])
def test_auto_follows_the_device_and_a_named_recipe_any_device(requested: str, device: str, expected: str) -> None:
    resolved = apply_recipe(parse_args(["--recipe", requested]), device)
    assert resolved.recipe.name == expected
    assert {k: getattr(resolved.config, k) for k in RECIPE_FIELDS} == RECIPES[expected].flag_values()


def test_explicit_flags_win_even_when_they_equal_the_plain_default() -> None:
    # 16 is also the plain default: only the command line can tell it was asked for.
    resolved = apply_recipe(parse_args(["--batch-size", "16", "--lr=1e-3"]), "cuda")
    assert (resolved.config.batch_size, resolved.config.lr) == (16, 1e-3)
    assert resolved.config.epochs == RECIPES["cuda"].epochs
    assert resolved.recipe.overridden == {"batch_size": 16, "lr": 1e-3}
    assert "batch_size" not in resolved.recipe.set
    assert resolved.recipe.summary_line() == ("recipe cuda (--epochs 4, --warmup-frac 0.1, --eval-every 40, "
                                              "--eval-batch-size 10000, --checkpoint-every 0, --epoch-checkpoints off, "
                                              "--ddp-comm-hook none, --bucket-cap-mb 0.0; flags kept: --batch-size 16, "
                                              "--lr 0.001)")


@pytest.mark.parametrize(("recipe", "flags", "expected"), [
    ("cuda", [], 0.1), ("cuda", ["--epochs", "1"], 0.4), ("cuda", ["--epochs", "2"], 0.2),
    ("cpu", [], 0.1), ("cpu", ["--epochs", "1"], 0.2), ("cpu", ["--epochs", "4"], 0.05),
    ("auto", ["--epochs", "1"], 0.4),  # on the cuda device below
    # A --warmup-frac given explicitly wins, whatever --epochs is.
    ("cuda", ["--epochs", "1", "--warmup-frac", "0.1"], 0.1), ("cpu", ["--warmup-frac", "0.3"], 0.3),
    ("cpu", ["--epochs", "1", "--warmup-frac", "0"], 0.0),
])
def test_the_recipes_warmup_is_a_length_in_epochs(recipe: str, flags: list[str], expected: float) -> None:
    """A recipe's warm-up is in epochs: --warmup-frac, unless given, is it over the run's epochs (given or the
    recipe's), so `--epochs 1` keeps 0.4 epochs of the cuda recipe's warm-up rather than 0.1 of one epoch."""
    resolved = apply_recipe(parse_args(["--recipe", recipe, *flags]), "cuda")
    assert resolved.config.warmup_frac == expected
    if "--warmup-frac" in flags:
        assert resolved.recipe.overridden["warmup_frac"] == expected and "warmup_frac" not in resolved.recipe.set
    else:
        assert resolved.recipe.set["warmup_frac"] == expected
        assert f"--warmup-frac {expected}" in resolved.recipe.summary_line()


def test_a_warmup_as_long_as_the_run_stays_below_the_whole_schedule() -> None:
    """--warmup-frac must be below 1: a recipe's warm-up of as many epochs as the run has, or more, is the largest
    share below 1, which validation takes."""
    recipe = dataclasses.replace(RECIPES["cpu"], warmup_epochs=3.0)
    for epochs in (1, 2, 3):
        assert recipe.warmup_frac(epochs) < 1
        TrainConfig(warmup_frac=recipe.warmup_frac(epochs), epochs=epochs)
    assert recipe.warmup_frac(4) == 0.75


@pytest.mark.timeout(120)
def test_a_run_records_the_warmup_share_its_epochs_resolved(tmp_path: Path) -> None:
    """`--epochs 1` under the cpu recipe trains with --warmup-frac 0.2 (its 0.2 epochs), and the first line,
    config.json (the value and the `resolved` block's recipe values) and the checkpoint record 0.2."""
    result = train_in_process(*SMOKE_FLAGS, "--epochs", "1", "--max-steps", "2", "--output-dir", str(tmp_path),
                              "--run-name", "run")
    assert result.returncode == 0, result.stderr
    assert "recipe cpu (" in result.stdout.splitlines()[0] and "--warmup-frac 0.2," in result.stdout.splitlines()[0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["warmup_frac"] == 0.2 and config["resolved"]["recipe_values"]["warmup_frac"] == 0.2
    assert config["resolved"]["recipe_overridden_by_flags"]["epochs"] == 1
    (newest,) = sorted((tmp_path / "run" / "checkpoints").glob("step*.pt"))[-1:]
    assert torch.load(newest, weights_only=True)["config"]["warmup_frac"] == 0.2


def test_a_config_built_in_code_keeps_the_values_it_changed() -> None:
    resolved = apply_recipe(TrainConfig(batch_size=64), "cuda")
    assert (resolved.config.batch_size, resolved.config.lr) == (64, RECIPES["cuda"].lr)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_stop_at_accuracy_must_be_a_fraction(value: str) -> None:
    # nan is caught by the finiteness check every float flag gets.
    with pytest.raises(UserError, match="^--stop-at-accuracy must be (in|a finite)"):
        parse_args([f"--stop-at-accuracy={value}"])


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run evaluated every 2 steps that stops at the first evaluation reaching 30% (step 2 or 4 at most:
    the synthetic classes separate within a few steps); 40 steps would be allowed."""
    output_dir = tmp_path_factory.mktemp("stop")
    code = main([*SMOKE_FLAGS, "--output-dir", str(output_dir), "--run-name", "run", "--timeout-s", "60",
                 "--max-steps", "40", "--eval-every", "2", "--stop-at-accuracy", "0.3"])
    assert code == 0
    return output_dir / "run"


@pytest.mark.timeout(120)
def test_stop_at_accuracy_stops_saves_and_reports(stopped_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = [json.loads(line) for line in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    hits = [m for m in metrics if m["test_accuracy"] >= 0.3]
    assert hits == metrics[-1:]  # evaluated until the first hit, not after
    step = metrics[-1]["step"]
    assert step < 40
    assert (stopped_run / "checkpoints" / f"step{step:08d}.pt").is_file()
    summary = json.loads((stopped_run / "summary.json").read_text())
    assert summary["stop_at_accuracy"] == {"target": 0.3, "step": step, "epoch": metrics[-1]["epoch"],
                                           "test_accuracy": metrics[-1]["test_accuracy"],
                                           "elapsed_s": metrics[-1]["elapsed_s"]}
    # Launched again, the run is complete rather than training on, and its files are left as they were: config.json
    # keeps describing the run that made them, also when the new launch had other flags.
    files = {p.name: p.read_bytes() for p in stopped_run.iterdir() if p.is_file() and p.name != ".lock"}
    assert main([*SMOKE_FLAGS, "--output-dir", str(stopped_run.parent), "--run-name", "run", "--timeout-s", "60",
                 "--max-steps", "30", "--eval-every", "3", "--stop-at-accuracy", "0.3"]) == 0
    last = metrics[-1]
    assert (f"is already complete at step {step} (--stop-at-accuracy 0.3 met by the evaluation at step {step}, "
            f"{last['test_accuracy']:.2%}); nothing to do") in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in stopped_run.iterdir() if p.is_file() and p.name != ".lock"} == files


def test_run_records_its_recipe(stopped_run: Path) -> None:
    resolved = json.loads((stopped_run / "config.json").read_text())["resolved"]
    assert resolved["recipe"] == "cpu"
    assert resolved["recipe_overridden_by_flags"] == {"batch_size": 16, "eval_batch_size": 50, "eval_every": 2}
    assert resolved["recipe_values"] == {"lr": 2e-3, "epochs": 2, "warmup_frac": 0.1, "checkpoint_every": 200,
                                         "epoch_checkpoints": "on", "ddp_comm_hook": "bf16", "bucket_cap_mb": 0.0}
    assert resolved["cuda_graphs"] is False


def test_startup_breakdown_adds_up_to_startup_s(stopped_run: Path) -> None:
    summary = json.loads((stopped_run / "summary.json").read_text())
    phases = summary["startup"]
    assert {"imports", "process_group", "data", "background_imports", "model", "tensorboard", "resume",
            "run_files", "other"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= summary["startup_s"] + 1e-9
    # README's summary.json section names every phase and every kind of pause a run records.
    readme = (REPO / "README.md").read_text()
    assert [name for name in [*phases, *summary["pauses_s"]] if f"`{name}`" not in readme] == []


def test_the_import_thread_starts_once_the_process_group_is_open(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """init_process_group reaches into torch._dynamo once it is in sys.modules: with the thread importing it
    already, the main thread waited for the whole import there (0.9 s on the 2-core CPU) and overlapped nothing."""
    import torch.distributed as dist

    from dist_mnist.startup import StartupTimer

    order: list[str] = []
    real_init, real_start = dist.init_process_group, StartupTimer.import_in_background

    def init(*args: Any, **kwargs: Any) -> None:
        order.append("process_group")
        real_init(*args, **kwargs)

    def start(self: StartupTimer, *modules: str) -> None:
        order.append("imports: " + " ".join(modules))
        real_start(self, *modules)

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(StartupTimer, "import_in_background", start)
    assert main([*SMOKE_FLAGS, "--output-dir", str(tmp_path), "--max-steps", "2", "--no-tensorboard"]) == 0
    assert order == ["process_group", "imports: torch._dynamo"]


def test_the_process_start_is_read_to_the_clock_tick() -> None:
    """startup_s counts from the process's start: a child launched after `before` cannot have started earlier
    (psutil's create_time, whole-second boot time and all, put it up to a second earlier)."""
    before = time.time()
    child = subprocess.run([sys.executable, "-c", "import time; from dist_mnist.startup import process_start_unix; "
                            "print(repr(process_start_unix()), repr(time.time()))"],
                           capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    after = time.time()
    start, child_now = (float(v) for v in child.stdout.split())
    assert before - 0.02 <= start <= child_now <= after  # one clock tick of slack


def test_help_gives_every_recipes_value_of_a_recipe_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe flags' plain defaults are the cpu recipe's: `--checkpoint-every ... (default: 200)` read on a GPU,
    which gets 0, misled. Each says the other recipes' values beside it, from RECIPES."""
    parser = build_parser()
    formatter = parser._get_formatter()
    helps = {action.dest: " ".join(formatter._expand_help(action).split()) for action in parser._actions}
    for name in RECIPE_FIELDS:
        if name == "warmup_frac":
            continue
        values = "; ".join(f"{recipe} recipe: {getattr(settings, name)}" for recipe, settings in RECIPES.items()
                           if recipe != "cpu")
        assert helps[name].endswith(f"(default: {getattr(RECIPES['cpu'], name)}; {values})"), helps[name]
    # --warmup-frac's default is the cpu recipe's 0.2 epochs at its 2 epochs; each recipe's warm-up is in epochs.
    assert helps["warmup_frac"].endswith(
        "(default: 0.1; cpu recipe: 0.2 epochs' worth (0.1 at 2 epochs); cuda recipe: 0.4 epochs' worth (0.1 at 4 "
        "epochs))"), helps["warmup_frac"]
    assert (RECIPES["cpu"].warmup_epochs, RECIPES["cpu"].epochs, RECIPES["cuda"].warmup_epochs,
            RECIPES["cuda"].epochs) == (0.2, 2, 0.4, 4)
    # The other entry points show their defaults too.
    from dist_mnist import commmodel, gpucheck

    for command, entry, default in ((commmodel.main, [], "(default: 50)"),
                                    (gpucheck.main, ["step-kernels"], "(default: 15)")):
        with pytest.raises(SystemExit):
            command([*entry, "--help"])
        assert default in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("flags", "saved"), [
    ([], [16, 32, 48]),  # an epoch's end each (16 steps: 256 images, batch 16)
    (["--epoch-checkpoints", "off"], [48]),  # the run's end only
    # A --checkpoint-every step on an epoch's end.
    (["--epoch-checkpoints", "off", "--checkpoint-every", "32"], [32, 48]),
    (["--epoch-checkpoints", "off", "--max-steps", "40"], [40]),  # a --max-steps end
    (["--epoch-checkpoints", "off", "stop"], [4]),  # a stop signal at the first progress line
    # A --stop-at-accuracy end: the first evaluation (the epoch's end) reaches 1%.
    (["--epoch-checkpoints", "off", "--stop-at-accuracy", "0.01"], [16]),
])
def test_epoch_checkpoints_off_leaves_the_runs_end_and_its_checkpoint_every_steps(
        tmp_path: Path, flags: list[str], saved: list[int]) -> None:
    written: list[int] = []
    save = Trainer._save_checkpoint

    def spy(self: Trainer) -> None:
        written.append(self.state.step)
        save(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", spy)
        if "stop" in flags:
            patch.setattr(Trainer, "log_progress", lambda self: os.kill(os.getpid(), signal.SIGTERM))
        assert main([*SMOKE_FLAGS, "--synthetic-train-size", "256", "--epochs", "3", "--checkpoint-every", "0",
                     "--keep-checkpoints", "5", *(f for f in flags if f != "stop"), "--output-dir", str(tmp_path)]) == 0
    assert written == saved
