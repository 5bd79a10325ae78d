"""Where a CLI's "total wall time" starts: at the process start, so start-up (interpreter, torch and
transformers imports, a first-use kernel build) is counted, not only the work after ``main()`` began."""

from __future__ import annotations

import os
import time

__all__ = ["WallClock", "seconds_since_process_start"]

# Fallback origin where /proc is unavailable: the first import of this module (by compressm_hf.cli).
_IMPORTED_AT = time.monotonic()


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started, from ``/proc/self/stat`` (Linux); ``None`` elsewhere.

    Resolution is one clock tick (usually 10 ms).
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # fields after "pid (comm) ": the 1st is field 3 (state), so field 22 (starttime) is index 19
        start_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        elapsed = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return elapsed if elapsed >= 0 else None


class WallClock:
    """A wall clock that says what it covers.

    ``WallClock(from_process_start=True)`` starts at the process start (:func:`seconds_since_process_start`;
    where that is unknown, at the first import of ``compressm_hf.cli.clock``); ``WallClock()`` starts now (for a
    ``main(argv)`` called in-process, e.g. from a test or a notebook, where the process started long before).
    """

    def __init__(self, from_process_start: bool = False) -> None:
        now = time.monotonic()
        if from_process_start:
            since = seconds_since_process_start()
            if since is not None:
                self.origin, self.covers = now - since, "from process start"
            else:
                self.origin, self.covers = _IMPORTED_AT, "from the import of compressm_hf.cli.clock"
        else:
            self.origin, self.covers = now, "from the call of main()"

    def elapsed(self) -> float:
        """Seconds since the origin."""
        return time.monotonic() - self.origin
