"""What follows a worker's failure under torchrun: its restarts (--max-restarts), read from the environment torchrun
gives its workers, and how any whole number a launcher passes that way is read (env_whole_number). Kept apart from
collectives.py, which imports torch.distributed, so that durable writes can word their advice without it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import overload

from dist_mnist.errors import UserError


@overload
def env_whole_number(name: str, default: int, least: int = 0, most: int | None = None,
                     environ: Mapping[str, str] = os.environ) -> int: ...


@overload
def env_whole_number(name: str, default: None = None, least: int = 0, most: int | None = None,
                     environ: Mapping[str, str] = os.environ) -> int | None: ...


def env_whole_number(name: str, default: int | None = None, least: int = 0, most: int | None = None,
                     environ: Mapping[str, str] = os.environ) -> int | None:
    """The whole number from `least` to `most` (None: no limit) in environment variable `name`; `default` where it
    is unset.

    A bare int() of a launcher's variable ended in a traceback (LOCAL_WORLD_SIZE=abc, SLURM_RESTART_COUNT=x), or in
    a wait of --timeout-s for peers that cannot exist (RANK=-1). An empty value is a mistake too, not unset (the
    restart counts' `or 0` used to read it as 0): torchrun and Slurm never set one empty, so it comes from a script's
    `export NAME=$UNSET_VARIABLE`, which meant some number.
    """
    value = environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < least or (most is not None and number > most):
        allowed = f"of at least {least}" if most is None else f"from {least} to {most}"
        raise UserError(f"environment variable {name}={value!r} must be a whole number {allowed}")
    return number


def torchrun_restarts(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(restarts done so far, --max-restarts) of the torchrun job this process is a worker of; (0, 0) outside one.
    torchrun passes both to its workers (TORCHELASTIC_RESTART_COUNT counts from 0 in the first attempt)."""
    done, allowed = (env_whole_number(name, 0, environ=environ) for name in ("TORCHELASTIC_RESTART_COUNT",
                                                                             "TORCHELASTIC_MAX_RESTARTS"))
    return done, allowed


class _StopSignal:
    """Whether the ranks agreed to stop on a stop signal (preemption.StopVote): the job is ending. A failure from then
    on (a full disk at the stop's checkpoint, a peer lost in the final summary) is followed by no restart: torchrun,
    signalled as well, shuts its workers down instead, and the line that promised "torchrun restarts the workers
    (restart 1 of 3)" was followed by torchrun's own exit."""

    agreed = False


def stop_agreed(agreed: bool = True) -> None:
    """Set by the training loop when its stop vote says stop; cleared as a run starts (main() may run more than one
    in a process: tests, a sweep)."""
    _StopSignal.agreed = agreed


def next_restart() -> str | None:
    """The words "torchrun restarts the workers (restart N of M)" where it will once this process fails (restarts
    left under --max-restarts, and the job not stopping on a signal), which makes any advice to rerun the command
    wrong; None where it will not."""
    done, allowed = torchrun_restarts()
    if _StopSignal.agreed:
        return None
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
