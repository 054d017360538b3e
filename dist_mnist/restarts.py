"""What follows a worker's failure under torchrun: its restarts (--max-restarts), read from the environment torchrun
gives its workers. Kept apart from collectives.py, which imports torch.distributed, so that durable writes can word
their advice without it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def torchrun_restarts(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(restarts done so far, --max-restarts) of the torchrun job this process is a worker of; (0, 0) outside one.
    torchrun passes both to its workers (TORCHELASTIC_RESTART_COUNT counts from 0 in the first attempt)."""
    done, allowed = (int(environ.get(name, "0") or 0) for name in ("TORCHELASTIC_RESTART_COUNT",
                                                                    "TORCHELASTIC_MAX_RESTARTS"))
    return done, allowed


def next_restart() -> str | None:
    """The words "torchrun restarts the workers (restart N of M)" where it will once this process fails (restarts
    left under --max-restarts), which makes any advice to rerun the command wrong; None where it will not."""
    done, allowed = torchrun_restarts()
    return f"torchrun restarts the workers (restart {done + 1} of {allowed})" if done < allowed else None


def restart_advice(last_checkpoint: Path | None, known: bool = True) -> str | None:
    """What happens next where torchrun restarts the workers by itself (next_restart), where from; None where it
    does not. `last_checkpoint` and `known` as for collectives.resume_advice."""
    restart = next_restart()
    if restart is None:
        return None
    restarts = f"{restart} and they "
    if last_checkpoint:
        return restarts + "resume from it"
    if not known:
        return restarts + "resume from the newest if there is one, else start again from step 0"
    return restarts + "start again from step 0"
