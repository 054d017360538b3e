"""Config validation: every impossible value is a UserError that names its flag; good values parse."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import pytest
from conftest import SMOKE_FLAGS

from dist_mnist.config import TrainConfig, apply_recipe, build_parser, parse_args, usable_cpus
from dist_mnist.errors import UserError
from dist_mnist.recipes import RECIPE_FIELDS


@pytest.mark.parametrize(("flag", "value"), [
    ("--batch-size", "0"), ("--batch-size", "-4"), ("--epochs", "0"), ("--epochs", "-1"),
    ("--eval-batch-size", "0"), ("--log-every", "0"), ("--synthetic-train-size", "0"),
    ("--synthetic-test-size", "-3"), ("--keep-checkpoints", "0"), ("--profile-active", "0"),
    ("--max-steps", "-1"), ("--num-workers", "-1"), ("--eval-every", "-5"), ("--checkpoint-every", "-1"),
    ("--threads", "-2"), ("--grad-clip", "-0.5"), ("--weight-decay", "-0.01"),
    ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan"),
    ("--warmup-frac", "-0.1"), ("--warmup-frac", "1"), ("--warmup-frac", "1.5"),
    ("--timeout-s", "0"), ("--timeout-s", "-10"), ("--timeout-s", "1e9"), ("--label-smoothing", "-0.1"),
    ("--label-smoothing", "1"), ("--peak-tflops", "-1"), ("--train-timeout-s", "0"), ("--train-timeout-s", "nan"),
    ("--train-timeout-s", "1e9"), ("--seed", "-1"), ("--seed", "4294967296"),
    ("--bucket-cap-mb", "1e15"), ("--peak-tflops", "989e12"), ("--peak-tflops", "1e300"),
    ("--timeout-s", "0.5"), ("--train-timeout-s", "0.001"),
])
def test_impossible_value_names_the_flag(flag: str, value: str) -> None:
    with pytest.raises(UserError, match=f"^{flag} must"):
        parse_args([f"{flag}={value}"])  # the = form, so argparse takes "-1e-3" as a value


FLOAT_FLAGS = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig) if f.type == "float"]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_flag_must_be_finite(flag: str, value: str) -> None:
    with pytest.raises(UserError, match=f"^{flag} must be a finite number, got {value}$"):
        parse_args([f"{flag}={value}"])


@pytest.mark.parametrize(("flags", "refused"), [
    (["--weight-decay=1e30"], True),  # it ended in "training loss became non-finite ... Lower --lr"
    (["--weight-decay=500"], True),  # 500 x the cpu recipe's 2e-3: every weight to zero at each step
    (["--weight-decay=499", "--lr=2e-3"], False),
    (["--weight-decay=0.01", "--lr=8e-3"], False),
])
def test_weight_decay_times_lr_must_leave_the_weights_shrinking_not_flipping(flags: list[str], refused: bool) -> None:
    if refused:
        with pytest.raises(UserError, match=r"^--weight-decay \S+ with --lr 0\.002 would shrink every weight to zero "
                                            r"or past it at each step .*: their product must be below 1$"):
            apply_recipe(parse_args(flags), "cpu")
    else:
        apply_recipe(parse_args(flags), "cpu")


def test_float_flags_are_found() -> None:
    assert {"--lr", "--weight-decay", "--warmup-frac", "--label-smoothing", "--grad-clip", "--timeout-s",
            "--peak-tflops"} <= set(FLOAT_FLAGS)


@pytest.mark.parametrize("run_name", ["a/b", "/abs", "..", "."])
def test_run_name_must_be_a_plain_folder_name(run_name: str) -> None:
    with pytest.raises(UserError, match="--run-name must be a plain folder name"):
        parse_args(["--run-name", run_name])


@pytest.mark.parametrize(("flag", "message"), [
    ("--resume", "--resume must be auto, never or the path of a checkpoint file, got ''"),
    ("--output-dir", "--output-dir must name a folder, got ''"),
    ("--data-dir", r"--data-dir \(default: \$DIST_MNIST_DATA\) must name a folder, got ''"),
])
def test_an_empty_path_is_refused(flag: str, message: str) -> None:
    """Path('') is the current directory: --output-dir '' wrote runs there, --resume '' read a checkpoint '.'."""
    with pytest.raises(UserError, match=f"^{message}$"):
        parse_args([flag, ""])


@pytest.mark.parametrize(("value", "hint"), [("99", "; for 99% give 0.99"), ("99.5", "; for 99.5% give 0.995"),
                                             ("100", "; for 100% give 1"), ("101", ""), ("-1", "")])
def test_a_stop_at_accuracy_above_1_is_refused_with_the_fraction_a_percentage_means(value: str, hint: str) -> None:
    """review_combos finding 9: --stop-at-accuracy 99 is a percentage; the refusal says which fraction it means."""
    with pytest.raises(UserError) as refused:
        parse_args(["--stop-at-accuracy", value])
    assert str(refused.value) == f"--stop-at-accuracy must be in (0, 1] (0: off), got {float(value)}{hint}"


def test_an_empty_data_dir_is_no_matter_for_synthetic_data() -> None:
    assert parse_args(["--dataset", "synthetic", "--data-dir", ""]).data_dir == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["--profile-wait", "1"], "--profile-wait has no effect without --profile; add it or drop --profile-wait"),
    (["--profile-active", "2", "--profile-memory"],
     "--profile-active and --profile-memory have no effect without --profile; add it or drop --profile-active and "
     "--profile-memory"),
    (["--compile-mode", "max-autotune"], "--compile-mode has no effect without --compile"),
    (["--compile-backend", "eager", "--no-compile"], "--compile-backend has no effect without --compile"),
    (["--phase-timers", "every", "--phase-timer-every", "5"],
     r"--phase-timer-every has no effect without --phase-timers sample \(or auto, sampled on CUDA\)"),
    (["--phase-timers", "off", "--phase-timer-every", "5"], "--phase-timer-every has no effect"),
    (["--synthetic-train-size", "100"], "--synthetic-train-size has no effect without --dataset synthetic"),
    (["--dataset", "mnist", "--synthetic-test-size", "100"], "--synthetic-test-size has no effect"),
])
def test_a_flag_without_the_flag_it_depends_on_is_refused(argv: list[str], message: str) -> None:
    """Each of these was ignored without a word: --profile-wait without --profile recorded nothing."""
    with pytest.raises(UserError, match=f"^{message}"):
        parse_args(argv)


@pytest.mark.parametrize("argv", [
    ["--profile", "--profile-wait", "1", "--profile-stack"], ["--no-profile-memory"],
    ["--compile", "--compile-mode", "max-autotune"], ["--phase-timers", "sample", "--phase-timer-every", "5"],
    ["--phase-timer-every", "5"],  # auto: sampled on CUDA
    ["--dataset", "synthetic", "--synthetic-train-size", "100"],
])
def test_a_flag_with_the_flag_it_depends_on_parses(argv: list[str]) -> None:
    parse_args(argv)


def test_configs_built_in_code_may_hold_any_schedule() -> None:
    """The profiler benchmark switches --profile per measurement on a config that keeps its schedule."""
    assert TrainConfig(profile=False, profile_wait=3).profile_wait == 3


def test_a_path_with_a_tilde_means_the_home_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shell leaves ~ in --output-dir=~/runs as it is; the run went into a folder named '~'."""
    monkeypatch.setenv("HOME", "/home/u")
    cfg = parse_args(["--output-dir=~/runs", "--data-dir=~/data", "--checkpoint-dir=~/ck", "--resume=~/ck/a.pt"])
    assert (cfg.output_dir, cfg.data_dir, cfg.checkpoint_dir, cfg.resume) == (
        "/home/u/runs", "/home/u/data", "/home/u/ck", "/home/u/ck/a.pt")
    assert parse_args(["--resume", "never"]).resume == "never"
    assert parse_args([]).checkpoint_dir == ""  # still: inside the run folder


def test_data_on_device_excludes_workers() -> None:
    with pytest.raises(UserError, match="--data-on-device on .* --num-workers"):
        parse_args(["--data-on-device", "on", "--num-workers", "2"])


def test_the_same_checks_apply_without_the_command_line() -> None:
    with pytest.raises(UserError, match="--batch-size must be positive"):
        TrainConfig(batch_size=0)


def test_defaults_are_valid_and_flags_parse() -> None:
    cfg = parse_args(["--batch-size", "64", "--lr", "0.01", "--no-download", "--no-tensorboard", "--deterministic",
                      "--backend", "gloo", "--run-name", "r1", "--warmup-frac", "0"])
    assert (cfg.batch_size, cfg.lr, cfg.no_download, cfg.tensorboard, cfg.deterministic) == (64, 0.01, True, False,
                                                                                             True)
    assert cfg.to_json()["backend"] == "gloo"
    assert TrainConfig().to_json() == parse_args([]).to_json()


def test_seed_takes_numpys_whole_range() -> None:
    """The seed reaches numpy's global generator, which took 0 to 2**32 - 1 and raised a traceback past that."""
    assert parse_args(["--seed", "0"]).seed == 0
    assert parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_bucket_cap_reaches_1_tib() -> None:
    """From 2**43 MiB DDP's Reducer refused the byte count (an int64) with a traceback; 1 TiB is one bucket anyway."""
    assert parse_args(["--bucket-cap-mb", str(2**20)]).bucket_cap_mb == 2**20
    with pytest.raises(UserError, match=r"^--bucket-cap-mb must be at most 1048576 \(1 TiB; 0: torch's default\), "
                                        r"got 1048577.0$"):
        parse_args(["--bucket-cap-mb", str(2**20 + 1)])


def test_peak_tflops_is_in_tflops() -> None:
    """989e12 (an H100's FLOP/s) made the MFU read 0.0%; 1e300 made summary.json's peak Infinity."""
    assert parse_args(["--peak-tflops", "1e6"]).peak_tflops == 1e6
    with pytest.raises(UserError, match=r"^--peak-tflops must be at most 1e\+06 \(TFLOP/s per process, not FLOP/s\), "
                                        r"got 9\.89e\+14$"):
        parse_args(["--peak-tflops", "989e12"])


def test_help_shows_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """README: `python launch/train.py --help` lists every flag with its default. The parser that answered --help
    was the one built without defaults (to tell the flags given from those left out), so it showed none."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    # Each option's entry starts at a line "  --flag ..." and runs to the next one; argparse wraps its lines.
    entries: dict[str, str] = {}
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif line.strip():
            entries[flag] += " " + line.strip()
    cli = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]
    assert len(entries) == len(cli) + 1  # -h
    for f in cli:
        entry = " ".join(entries["--" + f.name.replace("_", "-")].split())
        # Where the help says the default in words (a timestamp, <run folder>/checkpoints), argparse's is left out;
        # a recipe flag's names the other recipes' values after it (tests/test_recipes.py).
        assert entry.endswith(f"(default: {f.default})") or "(default:" in f.metadata["help"] or (
            f.name in RECIPE_FIELDS and f"(default: {f.default}; " in entry), entry
        assert entry.count("(default:") == 1, entry


def test_relative_folders_are_the_current_directorys_and_their_errors_say_which(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher imports its checkout from any directory, but run output and MNIST follow the current one: --help
    says so, and an error about a relative folder names it in full (which "profiles" could not be written?)."""
    from dist_mnist.data import MNIST_FILES, missing_mnist_error
    from dist_mnist.rundir import _choose_run_dir

    helps = {action.dest: " ".join((action.help or "").split()) for action in build_parser()._actions}
    assert "relative to the current directory" in helps["output_dir"]
    assert "relative to the current directory" in helps["data_dir"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").write_text("a file where the folder would be")
    with pytest.raises(UserError, match=f"^cannot write to --output-dir {re.escape(str(tmp_path / 'profiles'))}: "):
        _choose_run_dir(parse_args(["--output-dir", "profiles", "--run-name", "r"]))
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert str(missing_mnist_error(Path("data/MNIST/raw"), list(MNIST_FILES), "fetch them")).startswith(
        f"MNIST files missing in {raw}: ")


def test_help_says_batch_size_is_per_process() -> None:
    assert "PER PROCESS" in build_parser().format_help()


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "mpi"], "argument --backend: invalid choice: 'mpi'"),
    (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    (["--epoch-count", "3"], "unrecognized arguments: --epoch-count 3"),
])
def test_a_command_line_argparse_cannot_read_is_one_error_line(argv: list[str], message: str) -> None:
    """argparse printed its usage and exited with 2; bad flags are one error line and exit code 1 (README)."""
    with pytest.raises(UserError, match=f"^{message}.* \\(see --help\\)$"):
        parse_args(argv)


def test_a_command_line_error_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from dist_mnist.train import main

    assert main(["--batch-size", "abc"]) == 1
    assert capsys.readouterr().err == "error: argument --batch-size: invalid int value: 'abc' (see --help)\n"


def test_num_workers_far_past_the_cpus_are_refused_and_up_to_32_per_cpu_taken() -> None:
    """More workers than CPUs is a note; 10**20 (or a typo's 400 for 4) had DataLoader start processes until the
    machine stalled."""
    cpus = usable_cpus()  # those this process may run on: a job given 2 CPUs of a 256-core node may start 64
    limit = 32 * cpus
    with pytest.raises(UserError, match=rf"^--num-workers must be at most {limit} \(32 per CPU this process may run "
                                        rf"on, {cpus}\), got {10**20}: each worker is a process with torch loaded"):
        parse_args(["--num-workers", str(10**20)])
    with pytest.raises(UserError, match=rf"got {limit + 1}:"):
        parse_args(["--num-workers", str(limit + 1)])
    assert parse_args(["--num-workers", str(limit)]).num_workers == limit


def test_a_compile_mode_only_inductor_reads_is_refused_on_another_backend() -> None:
    """The eager and aot_eager backends drop --compile-mode with a warning of torch's: the run compiled without it."""
    with pytest.raises(UserError, match=r"^--compile-mode has no effect without --compile on the inductor backend"):
        parse_args(["--compile", "--compile-backend", "eager", "--compile-mode", "reduce-overhead"])
    assert parse_args(["--compile", "--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
    assert parse_args(["--compile", "--compile-backend", "aot_eager"]).compile_backend == "aot_eager"


def test_threads_are_at_most_the_machines_cpus() -> None:
    """Past the thread limit torch crashed in the first process group (a segmentation fault); below it, more threads
    than CPUs only contend for them. 0 keeps torch's own count."""
    cpus = os.cpu_count() or 1
    with pytest.raises(UserError, match=rf"^--threads must be at most this machine's {cpus} CPUs, got 100000 "
                                        r"\(0: torch's default\)$"):
        parse_args(["--threads", "100000"])
    assert parse_args(["--threads", str(cpus)]).threads == cpus
    assert parse_args([]).threads == 0


@pytest.mark.parametrize("flag", ["--batch-size", "--eval-batch-size", "--synthetic-train-size",
                                  "--synthetic-test-size"])
@pytest.mark.parametrize("value", [2**31, 2**62, 10**20])
def test_sample_counts_are_at_most_2_31_minus_1(flag: str, value: int) -> None:
    """--eval-batch-size from 2**63 passed and ended in islice's traceback at the first evaluation, after the run
    folder was written; a synthetic size of 10**20 or 2**62 in torch's (int64 overflow, storage size)."""
    with pytest.raises(UserError, match=rf"^{flag} must be at most 2147483647 \(2\*\*31 - 1 samples, more than any "
                                        rf"machine's memory holds\), got {value}$"):
        parse_args(["--dataset", "synthetic", flag, str(value)])
    assert getattr(parse_args(["--dataset", "synthetic", flag, str(2**31 - 1)]),
                   flag[2:].replace("-", "_")) == 2**31 - 1


def test_an_eval_batch_past_sys_maxsize_is_one_line_before_the_run_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dist_mnist.train import main

    assert main([*SMOKE_FLAGS, "--eval-batch-size", str(10**20), "--max-steps", "1",
                 "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: --eval-batch-size must be at most 2147483647 (2**31 - 1 samples, more than any machine's memory "
        f"holds), got {10**20}\n")
    assert not list(tmp_path.iterdir())


# Every variable a launcher sets that dist_mnist reads, cleared before each case sets its own.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                      "SLURM_RESTART_COUNT")
RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("env", "message"), [
    # Each waited --timeout-s for peers that cannot exist, then printed advice or torch's C++ lines.
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set (2) but RANK is not; start with torchrun, which sets both, or unset "
                          "WORLD_SIZE for one process"),
    ({"RANK": "3", "WORLD_SIZE": "2", **RENDEZVOUS},
     "RANK=3 is outside a world of WORLD_SIZE=2 processes (ranks 0 to 1); start with torchrun, which numbers them, "
     "or give each process its own RANK below WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2", **RENDEZVOUS}, "RANK=2 is outside a world of WORLD_SIZE=2 processes"),
    ({"RANK": "-1", "WORLD_SIZE": "2", **RENDEZVOUS},
     "environment variable RANK='-1' must be a whole number of at least 0"),
    # Ran silently as a world of one.
    ({"RANK": "0", "WORLD_SIZE": "0", **RENDEZVOUS},
     "environment variable WORLD_SIZE='0' must be a whole number of at least 1"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0' must be a whole number of at least 1"),
    ({"RANK": "", "WORLD_SIZE": "1", **RENDEZVOUS},
     "environment variable RANK='' must be a whole number of at least 0"),
    ({"LOCAL_RANK": "-1"}, "environment variable LOCAL_RANK='-1' must be a whole number of at least 0"),
    ({"LOCAL_RANK": "x"}, "environment variable LOCAL_RANK='x' must be a whole number of at least 0"),
    # A 24-line traceback: "ValueError: port must have value from 0 to 65535".
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "environment variable MASTER_PORT='99999' must be a whole number from 1 to 65535"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"},
     "environment variable MASTER_PORT='0' must be a whole number from 1 to 65535"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "environment variable MASTER_PORT='abc' must be a whole number from 1 to 65535"),
    # Tracebacks from bare int() where each was read (the --num-workers note, the run folder's restart checks).
    ({"LOCAL_WORLD_SIZE": ""}, "environment variable LOCAL_WORLD_SIZE='' must be a whole number of at least 1"),
    ({"LOCAL_WORLD_SIZE": "0"}, "environment variable LOCAL_WORLD_SIZE='0' must be a whole number of at least 1"),
    ({"TORCHELASTIC_RESTART_COUNT": "abc"},
     "environment variable TORCHELASTIC_RESTART_COUNT='abc' must be a whole number of at least 0"),
    ({"TORCHELASTIC_MAX_RESTARTS": "abc"},
     "environment variable TORCHELASTIC_MAX_RESTARTS='abc' must be a whole number of at least 0"),
    ({"TORCHELASTIC_MAX_RESTARTS": ""},
     "environment variable TORCHELASTIC_MAX_RESTARTS='' must be a whole number of at least 0"),
    ({"SLURM_RESTART_COUNT": "x"}, "environment variable SLURM_RESTART_COUNT='x' must be a whole number of at least 0"),
], ids=lambda value: " ".join(f"{k}={v}" for k, v in value.items() if RENDEZVOUS.get(k) != v)
    if isinstance(value, dict) else "")
def test_a_launcher_variable_no_run_can_use_is_one_line_at_once(
        env: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from dist_mnist.train import main

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert main([*SMOKE_FLAGS, "--max-steps", "1", "--timeout-s", "1", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    # Off rank 0 the line names the process's RANK, as it is.
    assert re.fullmatch(rf"(\[rank {re.escape(env.get('RANK', '0'))}\] )?error: {re.escape(message)}.*\n", err), err
    assert time.monotonic() - start < 1  # refused before any wait for peers (--timeout-s 1)
    assert not list(tmp_path.iterdir())  # and before the run folder


def test_world_size_1_alone_is_the_world_of_one_it_runs_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_mnist.distributed import _launch_position

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert _launch_position() == (None, None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _launch_position() == (None, 1)
    monkeypatch.setenv("RANK", "0")
    assert _launch_position() == (0, 1)


def test_env_whole_number_reads_a_launchers_numbers() -> None:
    from dist_mnist.restarts import env_whole_number, torchrun_restarts

    assert env_whole_number("N", 1, environ={}) == 1
    assert env_whole_number("N", environ={}) is None
    assert env_whole_number("N", 1, least=1, environ={"N": "4"}) == 4
    assert env_whole_number("N", least=1, most=4, environ={"N": "4"}) == 4
    for value, allowed in (("", "of at least 0"), (" ", "of at least 0"), ("1.5", "of at least 0"),
                           ("-1", "of at least 0")):
        with pytest.raises(UserError, match=rf"^environment variable N='{value}' must be a whole number {allowed}$"):
            env_whole_number("N", 0, environ={"N": value})
    with pytest.raises(UserError, match=r"^environment variable N='5' must be a whole number from 1 to 4$"):
        env_whole_number("N", least=1, most=4, environ={"N": "5"})
    assert torchrun_restarts({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3"}) == (1, 3)
    assert torchrun_restarts({}) == (0, 0)
    with pytest.raises(UserError, match=r"^environment variable TORCHELASTIC_RESTART_COUNT='abc' must be"):
        torchrun_restarts({"TORCHELASTIC_RESTART_COUNT": "abc"})


@pytest.mark.parametrize(("argv0", "prog", "commands"), [
    ("/repo/launch/train.py", "launch/train.py", "`torchrun --nproc_per_node=N launch/train.py` for N processes, or "
                                                 "`python launch/train.py` for a world of one"),
    ("/site-packages/dist_mnist/__main__.py", "python -m dist_mnist",
     "`torchrun --nproc_per_node=N -m dist_mnist` for N processes, or `python -m dist_mnist` for a world of one")])
def test_the_usage_line_names_the_command_the_user_ran(monkeypatch: pytest.MonkeyPatch, argv0: str, prog: str,
                                                       commands: str) -> None:
    """`python -m dist_mnist --help` (and its errors' usage line) named launch/train.py, which an installed package
    does not have."""
    monkeypatch.setattr("sys.argv", [argv0])
    parser = build_parser()
    assert parser.format_usage().startswith(f"usage: {prog} ")
    assert commands in " ".join(parser.format_help().split())
