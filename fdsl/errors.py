"""Exceptions raised for bad input. Each message names the offending value and what to do."""


class FDSLError(Exception):
    """Base class of every error FDSL raises on purpose."""


class ConfigError(FDSLError, ValueError):
    """An option or combination of options is invalid."""


class DataError(FDSLError, ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


class CheckpointError(FDSLError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def user_message(exc: BaseException) -> str:
    """The one line to show for `exc`.

    A DataLoader worker's exception reaches the main process re-raised by torch with the same type but a
    message holding the worker's whole traceback; the original message is its last line
    (``<module>.<Type>: message``), which is what the user sees.
    """
    text = str(exc)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        name = type(exc).__name__
        for line in reversed(lines):
            head, sep, rest = line.partition(": ")
            if sep and (head == name or head.endswith("." + name)):
                return rest.strip()
    return " ".join(text.split())
