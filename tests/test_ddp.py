"""Real gloo process groups (torch.multiprocessing spawn, a file:// store, no ports) driving the package's own
training step and evaluation: replicas stay identical, W ranks at batch B equal one process at batch W*B, and
evaluation counts every test image once with the same result on every rank."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_mnist_dir, one_intra_op_thread

from dist_mnist.config import TrainConfig
from dist_mnist.data import DataPipeline, build_pipeline, load_splits
from dist_mnist.distributed import DistContext
from dist_mnist.metrics import StepTimer
from dist_mnist.model import MnistCNN
from dist_mnist.train import TrainParts, build_train_parts, evaluate, resolve_speed_settings, train_step

TEST_SIZE = 203  # odd, and divides by neither 2 nor 3: evaluation shards are uneven
STEPS = 3
PER_RANK_BATCH = 16
PG_TIMEOUT_S = 60  # the process group's own timeout: a lost rank fails the collective instead of hanging
SPAWN_TIMEOUT_S = 120  # the parent's: kill the ranks if they have not finished by then
Scenario = Callable[[DistContext, int], dict[str, Any]]


def _rank_main(rank: int, world_size: int, store: str, out_dir: str, scenario: Scenario, batch_size: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        ctx = DistContext(rank=rank, world_size=world_size, device=torch.device("cpu"),
                          backend="gloo", control_group=dist.group.WORLD)
        torch.save(scenario(ctx, batch_size), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # No interpreter finalization after DDP over gloo: it aborts now and then there (dist_mnist/commmodel.py,
    # _measure_rank), and the result is on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_world(world_size: int, scenario: Scenario, out_dir: Path, batch_size: int = PER_RANK_BATCH
                ) -> list[dict[str, Any]]:
    """Run `scenario` on every rank of a fresh gloo world; returns each rank's result, in rank order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(world_size, str(out_dir / "store"), str(out_dir), scenario,
                                                   batch_size),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        # join() re-raises a rank's exception with its traceback (and stops the other ranks).
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def in_process_world(scenario: Scenario, batch_size: int) -> dict[str, Any]:
    """`scenario` on a world of one in this process, on one thread as a spawned rank: no process to start (each
    imports torch again, ~5 CPU-s). A world of one wraps no DDP, whose gloo teardown _rank_main avoids."""
    with one_intra_op_thread():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        try:
            return scenario(DistContext(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo",
                                        control_group=dist.group.WORLD), batch_size)
        finally:
            dist.destroy_process_group()


def _cfg(batch_size: int) -> TrainConfig:
    # fp32 all-reduce (not the default bf16 hook): W ranks must equal one process up to float rounding.
    return TrainConfig(dataset="synthetic", synthetic_train_size=256, synthetic_test_size=TEST_SIZE,
                       batch_size=batch_size, eval_batch_size=50, amp="off", channels_last="off", seed=0,
                       ddp_comm_hook="none")


def _build(ctx: DistContext, batch_size: int) -> tuple[DataPipeline, TrainParts]:
    """The data pipeline and training parts exactly as Trainer builds them (fp32, no channels_last)."""
    cfg = _cfg(batch_size)
    data = build_pipeline(cfg, ctx, *load_splits(cfg, ctx), on_device=False)
    parts = build_train_parts(cfg, ctx, resolve_speed_settings(cfg, ctx.device), cfg.epochs * data.steps_per_epoch)
    return data, parts


def _train(ctx: DistContext, batch_size: int, dropout: bool) -> dict[str, Any]:
    """The package's loop body for STEPS steps; evaluation before and after."""
    data, parts = _build(ctx, batch_size)
    initial_eval = evaluate(parts, data.test_loader)
    if not dropout:
        parts.module.eval()  # a deterministic step: the same function of the batch however it is split
    timer = StepTimer(ctx.device)
    data.train_batches.set_epoch(0)
    losses = []
    for images, labels in itertools.islice(data.train_loader, STEPS):
        timer.begin_step()
        losses.append(train_step(parts, images, labels, timer))
        timer.end_step()
    optimizer_params = [id(p) for group in parts.optimizer.param_groups for p in group["params"]]
    eval_forward_modes: set[tuple[bool, bool]] = set()
    hook = parts.module.register_forward_hook(
        lambda module, args, out: eval_forward_modes.add((torch.is_inference_mode_enabled(), module.training)))
    final_eval = evaluate(parts, data.test_loader)
    hook.remove()
    return {
        "params": {k: v.detach().clone() for k, v in parts.module.state_dict().items()},
        "losses": torch.stack(losses),
        "losses_detached": all(loss.grad_fn is None and not loss.requires_grad for loss in losses),
        "optimizer_holds_module_params": optimizer_params == [id(p) for p in parts.module.parameters()],
        "steps_timed": len(timer.drain()),
        "initial_eval": initial_eval,
        "final_eval": final_eval,
        "eval_forward_modes": sorted(eval_forward_modes),  # (inference mode on, training mode on) per forward
        "training_mode_after_eval": parts.module.training,
    }


def train_both_ways(ctx: DistContext, batch_size: int) -> dict[str, Any]:
    # One world for both runs: starting ranks (importing torch) costs more than the steps.
    return {"dropout": _train(ctx, batch_size, dropout=True), "deterministic": _train(ctx, batch_size, dropout=False)}


def evaluate_initial_model(ctx: DistContext, batch_size: int) -> dict[str, Any]:
    data, parts = _build(ctx, batch_size)
    return {"initial_eval": evaluate(parts, data.test_loader)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn_world(2, train_both_ways, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    return in_process_world(train_both_ways, batch_size=2 * PER_RANK_BATCH)


def assert_same_eval(a: dict[str, float], b: dict[str, float]) -> None:
    assert a["test_samples"] == b["test_samples"] == TEST_SIZE
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_replicas_stay_identical_after_training(two_ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (result["dropout"] for result in two_ranks)
    assert rank0["params"].keys() == rank1["params"].keys()
    for name, tensor in rank0["params"].items():
        assert torch.equal(tensor, rank1["params"][name]), name
    # ...and they did train: the parameters moved away from the shared initial weights.
    assert rank0["initial_eval"]["test_loss"] != rank0["final_eval"]["test_loss"]


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_step_hygiene(two_ranks: list[dict[str, Any]]) -> None:
    for result in (run for ranks in two_ranks for run in ranks.values()):
        assert result["losses_detached"]  # a stored loss must not keep its graph alive
        assert result["optimizer_holds_module_params"]  # the model was on its device before the optimizer
        assert result["eval_forward_modes"] == [(True, False)]  # evaluate() ran in inference_mode and eval()
        assert result["training_mode_after_eval"]  # ...and switched back to train() afterwards
        assert result["steps_timed"] == STEPS


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_two_ranks_at_batch_b_equal_one_process_at_batch_2b(
        two_ranks: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    expected = one_process["deterministic"]
    ranks = [result["deterministic"] for result in two_ranks]
    # The two ranks' batches together are the single process's batch: same samples, so the same mean loss.
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, expected["losses"])
    for result in ranks:
        for name, tensor in result["params"].items():
            # AdamW divides by sqrt(v): for the few weights whose gradient is ~0, float rounding differences of
            # the split sum can move an update by up to ~lr * 1e-2, hence atol 1e-4 (most differ by < 1e-7).
            torch.testing.assert_close(tensor, expected["params"][name], rtol=1e-4, atol=1e-4, msg=name)
    assert_same_eval(ranks[0]["final_eval"], expected["final_eval"])


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_evaluation_is_exact_and_identical_on_every_rank(
        tmp_path: Path, two_ranks: list[dict[str, Any]], one_process: dict[str, Any]) -> None:
    expected = one_process["dropout"]["initial_eval"]
    three = [result["initial_eval"] for result in spawn_world(3, evaluate_initial_model, tmp_path)]
    two = [result["dropout"]["initial_eval"] for result in two_ranks]
    for results in (two, three):
        assert all(result == results[0] for result in results)  # bit-identical on every rank
        assert_same_eval(results[0], expected)
    trained = [result["dropout"]["final_eval"] for result in two_ranks]
    assert trained[0] == trained[1]


class PixelLogits(MnistCNN):
    """Ten of an image's normalized pixels as its logits: elementwise, so bit for bit the same in a batch of any
    size (the network's own logits may not be: its kernels are chosen by the batch's shape, and 3 of 203 images
    differed in their last bit between batches of 203 and 50 on the 2-core CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, 400:410] * 4


def evaluate_in_batches_of(ctx: DistContext, batch_size: int) -> dict[str, Any]:
    """One model's evaluation with --eval-batch-size 7, 50 and the whole test set."""
    _, parts = _build(ctx, batch_size)
    parts.module = PixelLogits()
    results = {}
    for eval_batch in (7, 50, TEST_SIZE):
        cfg = dataclasses.replace(_cfg(batch_size), eval_batch_size=eval_batch)
        data = build_pipeline(cfg, ctx, *load_splits(cfg, ctx), on_device=False)
        results[f"batch {eval_batch}"] = evaluate(parts, data.test_loader)
    return results


def test_the_test_loss_does_not_depend_on_the_eval_batch_size() -> None:
    """The images' losses add up in float64: summed in float32 per batch first, the test loss changed in its last
    bits with --eval-batch-size (5.507894628740884 at 7, 5.507894788469587 at 50, 5.507894281096059 at 203), and
    with the world size, which cuts the test set into other batches (review_repro finding 2)."""
    results = in_process_world(evaluate_in_batches_of, PER_RANK_BATCH)
    assert results["batch 7"] == results["batch 50"] == results[f"batch {TEST_SIZE}"]


# ---------------------------------------------------------------------------------------------------------------
# python -m dist_mnist.bench --only scaling: what its efficiency figure is measured against


@pytest.mark.parametrize("counts", [[1, 2, 4], [2, 4], [2]], ids=["from-1", "from-2", "one-count"])
def test_scaling_efficiency_is_given_against_the_first_count_and_never_for_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, counts: list[int]) -> None:
    """Per-process throughput at N against that at the first count: the first count's own figure would be 100% by
    definition, so it has none, and a list of one count prints no efficiency at all."""
    from dist_mnist import bench

    def launch(nproc: int, flags: list[str], threads: int, out_dir: Path, run_name: str) -> tuple[dict, list, float]:
        rate = {"scale1": 1000.0, "scale2": 1800.0, "scale4": 3000.0}.get(run_name, 2000.0)
        return {"samples_per_sec": rate, "ranks": [{"backward_share": 0.5, "comm_exposed_share": 0.1,
                                                    "allreduce_bytes_per_step": 1e6}]}, [], 0.0

    monkeypatch.setattr(bench, "_launch", launch)
    runs = bench.measure_scaling([], counts, steps=10, per_process_batch=16, out_dir=tmp_path)
    first, *rest = counts
    assert "efficiency" not in runs[f"{first}x1"]
    per_process = {1: 1000.0, 2: 900.0, 4: 750.0}
    for n in rest:
        assert runs[f"{n}x1"]["efficiency"] == pytest.approx(per_process[n] / per_process[first])
        assert runs[f"{n}x1"]["efficiency_against"] == first
    lines = bench.render_markdown({"machine": "2-core CPU", "date": "2026-11-28", "torch": torch.__version__,
                                   "command": "python -m dist_mnist.bench", "scaling": runs}).splitlines()
    rows = [line for line in lines if " process(es) x 1 thread(s)" in line]
    assert len(rows) == len(counts) and "efficiency" not in rows[0]
    if counts == [2, 4]:
        assert rows[1].endswith("3,000 samples/s, scaling efficiency 83% (per process, against 2 processes) |")
    if counts == [1, 2, 4]:
        assert rows[2].endswith("3,000 samples/s, scaling efficiency 75% |")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--scaling", "1,x", "argument --scaling: expected comma-separated whole numbers such as 1,2, not '1,x'"),
    ("--graph-batches", "16,0", "argument --graph-batches: each number must be at least 1: '16,0'"),
    ("--profiler-batch-sizes", "", "argument --profiler-batch-sizes: expected comma-separated whole numbers"),
])
def test_bench_refuses_a_bad_list_before_any_section_runs(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], flag: str, value: str,
                                                          message: str) -> None:
    """A list flag is read when the command is, not minutes later when its section comes, as a traceback."""
    from dist_mnist import bench

    def no_session(cfg: TrainConfig) -> None:
        raise AssertionError("a section started")

    monkeypatch.setattr(bench, "distributed_session", no_session)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--only", "scaling", "--output", "", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_refuses_an_empty_data_dir_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The training config refuses an empty --data-dir; the bench builds one before its sections run."""
    from dist_mnist import bench

    assert bench.main(["--only", "throughput", "--output", "", "--data-dir", ""]) == 1
    assert capsys.readouterr().err == "error: --data-dir (default: $DIST_MNIST_DATA) must name a folder, got ''\n"


def test_bench_finds_an_unwritable_output_before_measuring_and_a_failed_write_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A missing folder for --output or --json is refused before any section runs; a write that fails at the end
    (here the folder is removed while the sections run) is one error line after the table, not a traceback."""
    from types import SimpleNamespace

    from dist_mnist import bench

    started = []
    gone = tmp_path / "gone"

    @contextmanager
    def session(cfg: TrainConfig) -> Any:
        started.append(cfg)
        if gone.is_dir():
            gone.rmdir()
        yield SimpleNamespace(device=torch.device("cpu"), world_size=1)

    monkeypatch.setattr(bench, "distributed_session", session)
    data = ["--data-dir", str(make_mnist_dir(tmp_path / "data"))]
    for flag in ("--output", "--json"):
        target = tmp_path / "missing" / "bench.out"
        argv = [*data, "--only", "graphs", "--output", "", flag, str(target)]
        assert bench.main(argv) == 1 and not started
        assert capsys.readouterr().err == f"error: cannot write {flag} {target}: {target.parent} is not a writable " \
                                          "folder\n"
    gone.mkdir()
    assert bench.main([*data, "--only", "graphs", "--output", "", "--json", str(gone / "bench.json")]) == 1 and started
    out, err = capsys.readouterr()
    assert out.startswith("### ") and err == (f"error: cannot write {gone / 'bench.json'}: No such file or directory; "
                                              "the table above holds the results\n")


def test_bench_table_says_when_the_graphs_section_was_skipped() -> None:
    """`--only graphs` off CUDA: the table says so, rather than being a header without a row."""
    from dist_mnist import bench

    results = {"machine": "2-core CPU", "date": "2026-11-28", "torch": torch.__version__,
               "command": "python -m dist_mnist.bench --only graphs",
               "graphs": {"skipped": "CUDA graphs are measured on one CUDA process only"}}
    assert bench.render_markdown(results).splitlines()[-1] == \
        "| CUDA graphs section | skipped: CUDA graphs are measured on one CUDA process only |"


@pytest.mark.cli
def test_bench_says_why_its_training_run_failed_in_one_line(tmp_path: Path) -> None:
    """A damaged MNIST file met by a section that launches training runs: their error line, not a traceback around
    it."""
    from conftest import run

    images = make_mnist_dir(tmp_path / "data") / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(b"\x12\x34\x56\x78" + images.read_bytes()[4:])
    result = run([sys.executable, "-m", "dist_mnist.bench", "--only", "scaling", "--scaling", "1",
                  "--data-dir", str(tmp_path / "data"), "--output", ""], timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: the bench's training run scale1 failed (exit 1): {images} is not a valid MNIST "
                           "IDX file")


def test_bench_without_mnist_says_so_before_measuring_with_advice_it_can_take(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The training runs' advice ("drop --no-download") named a flag the bench has not: it never downloads."""
    from dist_mnist import bench

    raw = tmp_path / "none" / "MNIST" / "raw"
    assert bench.main(["--data-dir", str(tmp_path / "none"), "--output", ""]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"error: MNIST files missing in {raw}: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                   "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; point --data-dir or DIST_MNIST_DATA at the folder "
                   f"holding MNIST/raw/, or run `python launch/train.py --data-dir {tmp_path / 'none'} --max-steps 1` "
                   "once to download them (the bench never does)\n")
    assert not raw.exists()


def test_bench_records_the_command_it_was_given_as_a_shell_would_read_it() -> None:
    """An empty argument (`--output ''`) was dropped from the recorded command, which then meant another."""
    from dist_mnist import bench

    assert bench.invocation(["--output", "", "--json", "a b.json"]) == \
        "python -m dist_mnist.bench --output '' --json 'a b.json'"


@pytest.mark.parametrize(("args", "torchrun", "message"), [
    (["--output", "{tmp}"], False, "error: cannot write --output {tmp}: it is a folder; name a file"),
    (["--output", "", "--json", "{tmp}"], False, "error: cannot write --json {tmp}: it is a folder; name a file"),
    (["--output", "", "--only", "profiler", "--profiler-run-steps", "5"], False,
     "error: --profiler-run-steps 5 ends the profiled runs before their window (steps 6-10) closes; give at least 10, "
     "or 0 for the recipe's whole schedule"),
    (["--output", "", "--only", "throughput", "--only", "scaling"], True,
     "error: --only scaling starts training jobs of its own, which cannot run inside torchrun's; run it as "
     "`python -m dist_mnist.bench`"),
], ids=["output-folder", "json-folder", "profiled-runs-end-in-the-window", "scaling-under-torchrun"])
def test_bench_refuses_what_it_would_find_only_after_measuring(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str],
        torchrun: bool, message: str) -> None:
    """Each was found after the sections ran (a folder as --output or --json), or not at all: a profiled run that
    ended before its window recorded nothing and still passed "with --profile / without", and under torchrun the
    sections that launch jobs were dropped from the table without a word."""
    from dist_mnist import bench

    def no_session(cfg: TrainConfig) -> None:
        raise AssertionError("a section started")

    monkeypatch.setattr(bench, "distributed_session", no_session)
    if torchrun:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
    assert bench.main([arg.format(tmp=tmp_path) for arg in args]) == 1
    assert capsys.readouterr().err == message.format(tmp=tmp_path) + "\n"


def test_bench_table_says_what_it_left_out_and_when_powersgd_did_not_compress() -> None:
    from dist_mnist import bench

    hooks = {"none": {"bytes_per_step": 4.8e6, "samples_per_sec": 1000.0, "ratio": 1.0},
             "powersgd": {"bytes_per_step": 4.8e6, "samples_per_sec": 990.0, "ratio": 0.99}}
    lines = bench.render_markdown({"machine": "2-core CPU", "date": "2026-11-29", "torch": "2.14.1",
                                   "command": bench.invocation(["--only", "scaling"], 2),
                                   "skipped": "time-to-accuracy, scaling", "scaling": {"hooks": hooks}}).splitlines()
    # Markdown needs the blank lines to start the command's paragraph and the table.
    assert lines[:4] == ["### 2-core CPU — 2026-11-29", "", "torch 2.14.1, command: `python -m dist_mnist.bench --only "
                         "scaling (under torchrun, 2 processes)`", ""]
    assert lines[6].startswith("| time-to-accuracy, scaling | skipped: they start training jobs of their own")
    assert "powersgd: 4.80 MB all-reduced per step (not compressed: the run ended within the LR warm-up" in lines[-1]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--timer-rounds", "0", "argument --timer-rounds: must be at least 1, not 0"),  # divided by it after measuring
    ("--scaling-steps", "0", "argument --scaling-steps: must be at least 1, not 0"),  # --max-steps 0: no limit
    ("--batch-size", "0", "argument --batch-size: must be at least 1, not 0"),
    ("--seconds", "nan", "argument --seconds: must be a finite number above 0, not nan"),
    ("--seconds", "inf", "argument --seconds: must be a finite number above 0, not inf"),  # a loop without end
    ("--profiler-pairs", "-1", "argument --profiler-pairs: must be at least 0, not -1"),
])
def test_bench_refuses_a_count_that_cannot_be_measured_before_any_section_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: str, value: str,
        message: str) -> None:
    from dist_mnist import bench

    def no_session(cfg: TrainConfig) -> None:
        raise AssertionError("a section started")

    monkeypatch.setattr(bench, "distributed_session", no_session)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--output", "", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
