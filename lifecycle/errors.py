"""User-facing errors.

Anything a person can fix (a missing file, a bad flag, a corrupt checkpoint) raises a subclass of
`LmforgeError`. The CLI prints it as one line and exits non-zero; a traceback is shown only with
`--debug`. Messages say what was wrong, where (file, line, field) and what to do.
"""


class LmforgeError(Exception):
    """Base class of errors that are the user's to fix; the CLI prints `str(err)` and exits 2."""


class ConfigError(LmforgeError):
    """A config file, flag or preset holds an unknown key or an impossible value."""


class DataError(LmforgeError):
    """An input data file is missing, empty, or not in the expected format."""


class CheckpointError(LmforgeError):
    """A directory is not a checkpoint, or a file in it does not match its manifest hash."""
