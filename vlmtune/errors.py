"""Errors vlmtune raises on purpose. The CLI prints their message without a traceback.

Every exception class of vlmtune is here, so any layer can raise or catch one without importing
the layer that usually raises it.
"""


class VlmtuneError(Exception):
    """A problem the user can fix; the message says what is wrong, where, and what to do."""


class ConfigError(VlmtuneError):
    """A bad configuration value or key."""


class DataError(VlmtuneError):
    """Bad input data. The message names the file, the record and what to do."""


class BadSampleError(DataError):
    """A training sample that failed to load mid-run under `data.on_bad_sample: error`."""


class Stopped(VlmtuneError):
    """The run stopped on a signal after saving a checkpoint (exit code 130 or 143)."""

    label = "stopped"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(VlmtuneError):
    """The loss or the gradient norm stopped being a finite number."""
