"""The one exception type for mistakes a user can fix: reported as a single line, never a traceback."""


class UserError(Exception):
    """Bad input (flags, data files, folders, checkpoints) with a message that says how to fix it."""
