"""Every `error:`, `warning:` and `note:` line README.md and docs/*.md quote is what the code prints in the situation
the text describes: each quote has a producer here that makes the line with the code's own functions, and the
quote, read as a pattern (`quote_pattern`), must match it whole. A new quote without a producer fails, and so does a
producer no text quotes any more."""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import REPO
from test_data import cpu_ctx, mnist_cfg

from dist_mnist import agreement, collectives, console, distributed
from dist_mnist.checkpoint import numerics_changes
from dist_mnist.config import TrainConfig
from dist_mnist.data import accumulation_note, load_mnist, worker_count_note
from dist_mnist.distributed import DistContext
from dist_mnist.durable import write_failed
from dist_mnist.errors import Terminated, UserError, interrupted_early
from dist_mnist.profiling import WindowedProfiler
from dist_mnist.rundir import _choose_run_dir
from dist_mnist.runfiles import trace_file_name
from dist_mnist.train import world_size_warning

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A quoted line: in backticks, which may wrap over lines; not inside fenced blocks (those are sample output).
QUOTE = re.compile(r"`((?:error|warning|note): [^`]+)`")
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# The stand-ins a quote may use, as regular expressions; everything else in it is literal.
STAND_INS = re.compile(
    r"(?P<rest>\.\.\.)"  # whatever follows or stands there
    r"|(?P<name><[^>]+>)|(?P<upper>\b(?:DIR|ADDR|PORT)\b)"  # a value: <phase>, DIR
    r"|(?P<flag>--flag\b)"  # any flag
    r"|(?P<letter>\b[A-Z]'?(?![\w']))"  # a number named by a letter: step N, sample S'
    r"|(?P<number>(?<![\w.])\d[\d,.:/-]*(?<![.,:/-]))")  # a number as an example: 8, 14,435,453, 2026-11-27
PATTERNS = {"rest": ".*", "name": ".+?", "upper": ".+?", "flag": "--[a-z][a-z-]*", "letter": r"[\d.]+",
            "number": r"[\d,.:/-]+"}


def quote_pattern(quote: str) -> re.Pattern[str]:
    """The lines `quote` stands for: its literal text, with each stand-in (STAND_INS) for any value of its kind."""
    parts, at = [], 0
    for stand_in in STAND_INS.finditer(quote):
        parts += [re.escape(quote[at:stand_in.start()]), PATTERNS[stand_in.lastgroup or ""]]
        at = stand_in.end()
    return re.compile("".join([*parts, re.escape(quote[at:])]), re.DOTALL)


def quoted_lines() -> list[tuple[str, str]]:
    """(document, quote) for every quoted line of the docs, whitespace made single spaces; a bare `error: ...`
    (any error line) quotes nothing in particular."""
    quotes = []
    for doc in DOCS:
        text = FENCED.sub("", doc.read_text())
        for match in QUOTE.finditer(text):
            quote = " ".join(match.group(1).split())
            if quote.split(": ", 1)[1] != "...":
                quotes.append((doc.name, quote))
    return quotes


@dataclass
class Situation:
    """What a producer may use to put the code where the text says: a folder, the environment, captured output."""
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]


def error_line(make: Callable[[], object]) -> str:
    """The line main() prints for the UserError `make` raises."""
    with pytest.raises(UserError) as failure:
        make()
    return f"error: {failure.value}"


def recipe_disagreement(s: Situation) -> str:
    # A world of two whose rank 1 was started with another --lr: what gathering the ranks' views brings back.
    s.monkeypatch.setattr(DistContext, "gather_objects", lambda ctx, view: [view, {**view, "--lr": 0.004}])
    return error_line(lambda: agreement.agree_on_recipe(TrainConfig(lr=0.002), cpu_ctx(world_size=2)))


def diverged_replicas(s: Situation) -> str:
    return error_line(lambda: agreement.check_replicas_in_sync(["ab12", "cd34"]))


def collective_timeout(s: Situation) -> str:
    def fail() -> None:
        with collectives.phase("the checkpoint", 8, 100, s.tmp_path / "step00000004.pt"):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 100000ms for "
                               "send operation to complete")
    return error_line(fail)


def kept_timeout(s: Situation) -> str:
    class RefusingGroup:  # a backend whose set_timeout raises, as some torch versions' do
        def set_timeout(self, timeout: object) -> None:
            raise RuntimeError("Backend nccl does not support setting timeout")

    group, before = RefusingGroup(), dist.group.WORLD
    dist.group.WORLD = group  # type: ignore[assignment]
    try:
        ctx = DistContext(rank=0, world_size=2, device=cpu_ctx().device, backend="nccl", control_group=group)
        return collectives.CollectiveTimeout(300, 100).switch_to_training(ctx) or ""
    finally:
        dist.group.WORLD = before


def lost_data_worker(s: Situation) -> str:
    error = collectives.lost_data_worker_error("DataLoader worker (pid 25410) is killed by signal: Killed", 202,
                                               s.tmp_path / "step00000200.pt", collectives.Rerun())
    return f"error: {error}"


def held_run_folder(s: Situation) -> str:
    s.monkeypatch.setenv("SLURM_JOB_ID", "99")
    s.monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    cfg = TrainConfig(output_dir=str(s.tmp_path), run_name="run")
    held = _choose_run_dir(cfg)  # a second open of the lock file in this process is refused as another job's is
    try:
        return error_line(lambda: _choose_run_dir(cfg))
    finally:
        held.release()


def rendezvous_without_address(s: Situation) -> str:
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2")):
        s.monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        s.monkeypatch.delenv(name, raising=False)
    return error_line(distributed._rendezvous_address)


def rendezvous_timeout(s: Situation) -> str:
    reason = dist.DistError("Timed out after 300 seconds waiting for clients. 1/2 clients joined.")
    return f"error: {distributed._rendezvous_failed(reason, 'ADDR:PORT', 1, 2, 300)}"


def peers_missing(s: Situation) -> str:
    """A torchrun worker whose peer froze after torchrun started it (tests/test_faults.py runs the whole path)."""
    reason = dist.DistError("wait timeout after 300000ms, keys: /dist_mnist/attempt_0/0//cpu//0/1")
    return f"error: {distributed._peers_missing(reason, 0, 2, 300)}"


def full_disk_checkpoint(s: Situation) -> str:
    for name in ("TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT"):  # no restarts left: the plain advice
        s.monkeypatch.delenv(name, raising=False)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return f"error: {write_failed(s.tmp_path / 'step00000008.pt', 14_435_453, full)}"


class FullDiskWindow:
    def export_chrome_trace(self, path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_trace(s: Situation) -> str:
    s.monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)  # configure_kineto may set it; put back afterwards
    profiler = WindowedProfiler(TrainConfig(profile=True), cpu_ctx(), s.tmp_path / "traces", 0, 10)
    profiler._write_trace(FullDiskWindow())  # type: ignore[arg-type]
    return s.capsys.readouterr().err.rstrip("\n")


def stuck_absent_rank_trace(s: Situation) -> str:
    # Rank 0 of a world of 2 wrote its trace of a window that still holds rank 3's, of an earlier world of 4, which
    # the folder's permissions keep it from removing.
    folder = s.tmp_path / "traces" / "step00000012"
    folder.mkdir(parents=True)
    (folder / trace_file_name(3)).write_bytes(b"")
    profiler = WindowedProfiler(TrainConfig(profile=True), cpu_ctx(world_size=2), s.tmp_path / "traces", 0, 10)

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    s.monkeypatch.setattr(Path, "unlink", refused)
    profiler._remove_traces_of_absent_ranks(folder)
    return s.capsys.readouterr().err.rstrip("\n")


def missing_mnist(s: Situation) -> str:
    return error_line(lambda: load_mnist(mnist_cfg(s.tmp_path / "nowhere"), cpu_ctx()))


# The producer of each quoted line, by the words the quote opens with.
PRODUCERS: dict[str, Callable[[Situation], str]] = {
    "note: standard output was closed": lambda s: console.READER_GONE,
    "note: --num-workers 64 starts": lambda s: worker_count_note(64, 2, 1) or "",
    "note: --grad-accum-steps 4 trains whole rounds only": lambda s: accumulation_note(60_000, 2, 16, 1875, 4) or "",
    "note: this run continues with other settings": lambda s: numerics_changes(
        {"amp": "bfloat16", "channels_last": True}, {"amp": "off", "channels_last": False}) or "",
    "error: interrupted (SIGTERM) during start-up": lambda s: f"error: {interrupted_early(Terminated())}",
    "error: ranks disagree on --": recipe_disagreement,
    "error: ranks disagree on the final parameters": diverged_replicas,
    "error: a collective in ": collective_timeout,
    "note: this torch cannot change a process group's timeout": kept_timeout,
    "error: a DataLoader worker of this process died": lost_data_worker,
    "error: run folder DIR is in use by": held_run_folder,
    "error: RANK and WORLD_SIZE are set but": rendezvous_without_address,
    "error: the rendezvous at ": rendezvous_timeout,
    "error: the process group did not open": peers_missing,
    "error: could not write step00000008.pt": full_disk_checkpoint,
    "note: could not write rank0.": full_disk_trace,
    "note: could not remove from DIR/traces/step<S>": stuck_absent_rank_trace,
    "error: MNIST files missing in": missing_mnist,
    "warning: the checkpoint was written by": lambda s: f"warning: {world_size_warning(4, 2, 1, 29_952, 29_952, 0.35)}",
}


def producer_of(quote: str) -> str:
    (opening,) = [opening for opening in PRODUCERS if quote.startswith(opening)] or [quote]
    return opening


def test_every_quoted_line_has_one_producer_and_every_producer_a_quote() -> None:
    quotes = quoted_lines()
    assert [q for _, q in quotes if producer_of(q) not in PRODUCERS] == []
    assert set(PRODUCERS) == {producer_of(q) for _, q in quotes}


@pytest.mark.parametrize(("doc", "quote"), quoted_lines(), ids=lambda value: value[:60])
def test_a_quoted_line_is_what_the_code_prints(doc: str, quote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    printed = PRODUCERS[producer_of(quote)](Situation(tmp_path, monkeypatch, capsys))
    assert quote_pattern(quote).fullmatch(printed), f"{doc} quotes\n  {quote}\nthe code prints\n  {printed}"


@pytest.mark.parametrize(("quote", "line", "matches"), [
    ("error: a collective in <phase> failed after step N: ...", "error: a collective in evaluation failed after "
     "step 12: a peer did not answer", True),
    ("error: a collective in <phase> failed after step N: ...", "error: a collective in evaluation failed before "
     "the first step: a peer", False),
    ("error: ranks disagree on --flag (...)", "error: ranks disagree on --lr (0.002 on rank 0); start", False),
    ("error: ranks disagree on --flag (...); ...", "error: ranks disagree on --lr (0.002 on rank 0); start", True),
    ("note: could not write rank0.<ns>.pt to DIR/traces: No space", "note: could not write rank0.17.pt to "
     "/x/traces: No space", True),
    ("warning: at sample S (it had reached S'), schedule at P%", "warning: at sample 8 (it had reached 16), "
     "schedule at 3.5%", True),
    ("error: could not write step00000008.pt (it needed 14,435,453 bytes)", "error: could not write "
     "step00000008.pt (it needed 1,024 bytes)", True),
    ("error: could not write step00000008.pt", "error: could not write step00000016.pt", False),
])
def test_a_quote_reads_as_a_pattern_of_its_stand_ins(quote: str, line: str, matches: bool) -> None:
    assert bool(quote_pattern(quote).fullmatch(line)) is matches
