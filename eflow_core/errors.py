"""User-facing errors: the CLI prints these as one clear message and exits non-zero."""


class EflowError(Exception):
    """A problem the user can fix (bad name, bad config, bad path); printed without a traceback."""


class ConfigError(EflowError, ValueError):
    """A configuration value is wrong; the message names the field and the fix."""
