"""Seconds of work, not of waiting: a clock that leaves out the time the process spent stopped.

A long run on a shared machine gets paused (Ctrl-Z, `kill -STOP`) while something else runs. Every
duration the library records (an attack's seconds, an epoch's, a cell's) is taken with `now()`, which
is `time.perf_counter()` minus the time the process was stopped, so a paused run records how long
its work took. `watch_stops()` turns the accounting on; the command line does, once, at its entry
point (a library must not install signal handlers on import). Without it, `now()` is perf_counter.

How a stop is seen: a daemon thread wakes every `tick` seconds and notes how long it did not run; the
kernel delivers SIGCONT when a stopped process continues, and Python's C-level handler writes it to a
wakeup pipe the thread reads. Only then is the gap counted as stopped time (a gap without a SIGCONT is
the machine being busy, and is work time).
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

_stopped = 0.0                  # seconds the process spent stopped since watch_stops()
_watching = False


def now() -> float:
    """perf_counter() less the seconds the process was stopped (where watch_stops() runs)."""
    return time.perf_counter() - _stopped


def stopped_seconds() -> float:
    """Seconds the process has spent stopped since watch_stops() (0.0 when it was not called)."""
    return _stopped


def watch_stops(tick: float = 0.05) -> bool:
    """Count the time this process spends stopped, from now on. Call from the main thread of an entry
    point; True when the accounting runs (False: no SIGCONT on this platform, not the main thread, or
    another part of the program owns the signal wakeup fd)."""
    global _watching
    if _watching:
        return True
    if not hasattr(signal, "SIGCONT") or threading.current_thread() is not threading.main_thread():
        return False
    r, w = os.pipe()
    os.set_blocking(w, False)
    old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    if old != -1:                                 # someone else's: leave it to them
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
        return False
    if signal.getsignal(signal.SIGCONT) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCONT, lambda *_: None)   # a Python handler, so the wakeup fd gets the byte
    threading.Thread(target=_watch, args=(r, tick), name="nnlaunder-clock", daemon=True).start()
    _watching = True
    return True


def _watch(fd: int, tick: float) -> None:
    """Wake every `tick`; a gap longer than a tick is time the thread did not run. When SIGCONT arrives, the
    longest gap of the last two seconds was the stop (the thread may wake, on its timeout, before the
    signal's byte is written, so the gap and the byte can come on different wake-ups)."""
    global _stopped
    last = seen_at = time.perf_counter()
    longest = 0.0
    while True:
        ready, _, _ = select.select([fd], [], [], tick)
        t = time.perf_counter()
        if t - seen_at > 2.0:
            longest = 0.0
        if t - last - tick > longest:
            longest, seen_at = t - last - tick, t
        if ready and signal.SIGCONT in os.read(fd, 512):
            _stopped += longest
            longest = 0.0
        last = t
