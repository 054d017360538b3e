"""The one exception type for mistakes a user can fix: reported as a single line, never a traceback."""


class UserError(Exception):
    """Bad input (flags, data files, folders, checkpoints) with a message that says how to fix it; `exit_code` is
    the process's (1; 130 for a Ctrl-C, the shell's code for an end by SIGINT)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# A Ctrl-C before a run has written anything (launch/train.py's imports included): the run folder, if made, is empty,
# and the same command reuses it.
INTERRUPTED_EARLY = ("interrupted (SIGINT) during start-up, before the first step; this process wrote nothing to "
                     "resume from: rerun the same command to start again (a run with checkpoints resumes from them)")
