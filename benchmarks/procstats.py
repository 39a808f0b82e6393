"""Process and machine probes shared by the benchmark scripts (Linux /proc, with fallbacks)."""
from __future__ import annotations

import os
import platform
import resource
import sys


def _status_kb(field: str) -> int | None:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident memory of this process, MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def hwm_mb() -> float | None:
    """Peak resident memory of this process since the last `reset_hwm`, MiB."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024.0


def reset_hwm() -> bool:
    """Reset this process's peak-RSS counter (VmHWM) to the current RSS; False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    """Whole-process peak RSS (ru_maxrss; kB on Linux, bytes on macOS), MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def cpu_model() -> str:
    """The processor's model name."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
