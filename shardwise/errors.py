"""The one error type a user can cause.

Anything a user gets wrong (a config key, a value, a path, a layout that does
not fit the world size) raises :class:`ShardwiseError`. The CLI and the worker
turn it into one line on stderr and exit status 2, with no traceback.
"""

EXIT_USAGE = 2


class ShardwiseError(ValueError):
    """A problem the user can fix; the message names the field and the values."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class TrainingDiverged(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient (train.max_bad_steps)."""
