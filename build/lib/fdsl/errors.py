"""Exceptions raised for bad input. Each message names the offending value and what to do."""


class FDSLError(Exception):
    """Base class of every error FDSL raises on purpose."""


class ConfigError(FDSLError, ValueError):
    """An option or combination of options is invalid."""


class DataError(FDSLError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


class CheckpointError(FDSLError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""
