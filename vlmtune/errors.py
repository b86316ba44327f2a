"""Errors vlmtune raises on purpose. The CLI prints their message without a traceback."""


class VlmtuneError(Exception):
    """A problem the user can fix; the message says what is wrong, where, and what to do."""


class ConfigError(VlmtuneError):
    """A bad configuration value or key."""
