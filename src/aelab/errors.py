"""Errors caused by what the user asked for, reported as one line without a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class ConfigError(UserError):
    """A config value outside what the project supports."""


class DataError(UserError):
    """Dataset files that are missing, truncated or not in MNIST's IDX format."""


class CheckpointError(UserError):
    """A checkpoint path that is missing or does not hold a model of this project."""


class DivergedError(UserError):
    """A loss that became NaN or infinite, usually from a learning rate too high."""
