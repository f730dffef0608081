"""A real deadline and a real memory budget for rendering a template, in any thread (kd.sandbox uses it).

While a render runs, a watchdog thread looks at the clock and the process's resident memory every POLL seconds
and, past RENDER_SECONDS or RENDER_MEMORY bytes more than at its first look, raises `Runaway` inside the
rendering thread: CPython's asynchronous exception (PyThreadState_SetAsyncExc), which lands at the next bytecode
of whatever Python code runs. No signal is used, so a render in any thread is watched (`kd view` plans in
threads, where SIGALRM cannot reach). One C-level operation is not interrupted: kd.sandbox bounds those by size
before they start. Registering a render costs about a microsecond; the watchdog sleeps after a second without any.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from threading import get_ident

RENDER_SECONDS = 1.0  # a prompt renders in ≈40 µs; an 8M-character row through a long template in ≈0.1 s
RENDER_MEMORY = 192 << 20  # bytes of resident memory a render may add (an 8M-character row is 8–32 MB)
POLL = 0.02  # s between the watchdog's looks: at ≈3 GB/s of fresh pages, ≈60 MB past the budget at most


class Runaway(BaseException):  # noqa: N818 - a BaseException so that no `except Exception` in a filter swallows it
    """Raised inside a rendering thread by the watchdog: the render passed its time or memory budget."""


# --- the watchdog -------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_active: dict[int, list] = {}  # thread id -> [deadline, resident bytes at the first look, why it was stopped or ""]
_state = {"sleeping": False}
_wake = threading.Event()
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc  # (thread id, exception class or NULL to clear)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident(fd: int | None) -> int:
    """Resident bytes of this process now (Linux /proc; elsewhere 0: only the deadline then holds)."""
    try:
        return int(os.pread(fd, 100, 0).split()[1]) * _PAGE if fd is not None else 0
    except (OSError, ValueError, IndexError):
        return 0


def _watch() -> None:
    """The watchdog's loop: polls while renders run, sleeps on `_wake` after a second without any."""
    try:
        fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)  # kept open: one read per look
    except OSError:
        fd = None
    idle = 0.0
    while True:
        if _active:
            idle = 0.0
        elif (idle := idle + POLL) > 1.0:
            _state["sleeping"] = True  # before looking again: a render added after this look sets `_wake`
            _wake.clear()
            if not _active:
                _wake.wait()
            _state["sleeping"], idle = False, 0.0
        time.sleep(POLL)
        now, resident = time.monotonic(), _resident(fd)
        with _lock:
            for tid, w in list(_active.items()):
                if w[1] is None:  # measured here, not by the render: reading /proc costs a third of a render
                    w[1] = resident
                elif now > w[0] or resident - w[1] > RENDER_MEMORY:
                    w[2] = f"{RENDER_SECONDS:g} s" if now > w[0] else f"{RENDER_MEMORY >> 20} MB of memory"
                    del _active[tid]  # fired once; a thread that finished meanwhile clears it (`unwatch`)
                    _set_async_exc(ctypes.c_ulong(tid), ctypes.py_object(Runaway))


def _start_watchdog() -> None:
    threading.Thread(target=_watch, name="kd-template-watchdog", daemon=True).start()
    _state["started"] = True


_state["started"] = False
os.register_at_fork(after_in_child=lambda: _state.update(started=False))  # threads do not survive a fork


def watch() -> list | None:
    """Start watching the calling thread's render: its budget entry (`[2]` later says what stopped it), or None
    inside a render already watched (an include runs within its includer's budget). End it with `unwatch`."""
    tid = get_ident()
    if tid in _active:
        return None
    w = _active[tid] = [time.monotonic() + RENDER_SECONDS, None, "", tid]
    if _state["sleeping"] or not _state["started"]:
        _wake_up()
    return w


def _wake_up() -> None:
    with _lock:
        if not _state["started"]:
            _start_watchdog()
    _wake.set()


def unwatch(w: list | None) -> None:
    """Stop watching; raises Runaway if the watchdog fired and its exception has not landed yet (it never will)."""
    if w is None:
        return
    with _lock:
        _active.pop(w[3], None)
        if w[2]:
            _set_async_exc(ctypes.c_ulong(w[3]), None)  # fired but not delivered: it must not land in the caller
    if w[2]:
        raise Runaway
