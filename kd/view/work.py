"""The slow computations behind `kd view`'s pages (the pipeline's status forecast, a dataset diff), run in a worker
process, once per build state, never on the server's event loop.

Why a process: a forecast renders every template, and a template can spin in C for minutes (squaring a huge int
never releases the GIL), so a thread would freeze every page and a SIGTERM alike; a process is killed. Each
computation's result is kept per (what, build state): five clients loading `/` at once start one computation, and
none starts again until a file the result depends on changes (or it is REFRESH_S old: the request cache fills
during a build). A page waits at most WAIT_S for its result; then it shows the last result for the same question
(marked as being recomputed) or "computing…", and refreshes itself. A computation is killed after LIMIT_S (CPU
time: the worker's own rlimit also ends it if the server itself is killed), when the build state it was asked for
has changed, and when the server stops.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.paths import CACHE_DIR, DATA_DIR, DVC_FILE, PARAMS_FILE

WAIT_S = 5.0  # how long a page waits for its computation before it shows what it has (other pages never wait)
LIMIT_S = 120  # a computation running longer is killed and the page says so
REFRESH_S = 30.0  # a result older than this is recomputed (shown meanwhile): cache hits change during a build
MAX_JOBS = 4  # computations at once (2-core laptops; each is one process)
KEEP = 64  # finished results kept
STATE_FILES = (PARAMS_FILE, DVC_FILE, "dvc.lock", str(CACHE_DIR / "requests.sqlite3"), ".git/HEAD", ".git/packed-refs")
STATE_DIRS = ("prompts", "seeds", ".git/refs/heads")  # git: a diff against HEAD~1 changes with a commit
# forkserver: each worker forks from a small server with no threads (forking the server itself, which has threads,
# can copy a held lock into the child); the modules a computation needs are loaded there once
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["kd.view.pages"])


def build_state(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every file a forecast or diff depends on: params, the graph and its lock, the
    templates and seeds, the datasets' manifests, the request cache, git's HEAD and branches. A few hundred stat
    calls, no reads."""
    paths = [root / f for f in STATE_FILES] + sorted((root / DATA_DIR).glob("*/manifest.json"))
    for d in STATE_DIRS:
        paths += sorted(p for p in (root / d).rglob("*") if p.is_file()) if (root / d).is_dir() else []
    state = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        state.append((str(p.relative_to(root)), st.st_mtime_ns, st.st_size))
    return tuple(state)


@dataclass
class Outcome:
    """What a page shows: the value (None while nothing is known), and whether it is for today's build state."""

    value: Any
    current: bool
    running_s: float = 0.0  # how long the computation for today's state has run
    busy: bool = False  # too many computations at once: none was started for this page


class Superseded(Exception):
    """The computation was stopped: its build state changed, or the server stops."""


@dataclass
class _Job:
    what: Hashable
    state: Hashable
    future: Future = field(default_factory=Future)
    process: Any = None
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...], limit_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (limit_s, limit_s + 5))  # ends it even if nobody is left to kill it
    os.nice(10)  # on a 2-core laptop a spinning forecast must not slow the pages the server answers meanwhile
    try:
        conn.send((fn(*args), None))
    except KdError as e:
        conn.send((None, ("kd", str(e))))
    except BaseException as e:  # reported to the page's error handler, in the server's terminal
        conn.send((None, ("crash", f"{type(e).__name__}: {e}")))


class Worker:
    """Runs `fn(*args)` in a worker process per (what, build state), keeps the results, and stops them all."""

    def __init__(self, wait_s: float = WAIT_S, limit_s: int = LIMIT_S) -> None:
        self.wait_s, self.limit_s = wait_s, limit_s
        self.lock = threading.Lock()
        self.running: dict[tuple[Hashable, Hashable], _Job] = {}
        self.done: dict[Hashable, tuple[Hashable, Any, float]] = {}  # what -> (state, value, when), newest last
        self.closed = False

    async def get(self, what: Hashable, state: Hashable, fn: Callable[..., Any], *args: Any) -> Outcome:
        """The value of `fn(*args)` for this build state, waiting at most `wait_s` for it (see Outcome)."""
        with self.lock:
            done = self.done.get(what)
            if done and done[0] == state and time.monotonic() - done[2] < REFRESH_S:
                return Outcome(done[1], True)
            job = self.running.get((what, state))
            if job is None:
                for other in [j for (w, _), j in self.running.items() if w == what]:
                    other.stop()  # asked for a build state that is gone
                if self.closed or len(self.running) >= MAX_JOBS:
                    return Outcome(done[1] if done else None, False, busy=True)
                job = self._start(what, state, fn, args)
        try:
            value = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), self.wait_s)
        except (TimeoutError, Superseded):
            return Outcome(done[1] if done else None, False, time.monotonic() - job.started)
        return Outcome(value, True)

    def _start(self, what: Hashable, state: Hashable, fn: Callable[..., Any], args: tuple[Any, ...]) -> _Job:
        job = _Job(what, state)
        ours, theirs = _CONTEXT.Pipe(duplex=False)
        job.process = _CONTEXT.Process(target=_child, args=(theirs, fn, args, self.limit_s), daemon=True,
                                       name=f"kd view: {what}")
        job.process.start()
        theirs.close()  # the child's end: when the child dies, our recv() ends (EOF)
        self.running[(what, state)] = job
        threading.Thread(target=self._watch, args=(job, ours), daemon=True).start()
        return job

    def _watch(self, job: _Job, conn: Any) -> None:
        value, error = None, None
        try:
            if conn.poll(self.limit_s):
                value, error = conn.recv()
            else:
                error = ("kd", f"gave up after {self.limit_s} s (the viewer's limit for one computation); the same "
                               f"command in a terminal (`kd status`, `kd diff`) shows what takes so long")
        except (EOFError, OSError):
            error = ("stopped", "") if job.stopped else ("crash", f"the worker died (exit {job.process.exitcode})")
        finally:
            conn.close()
            job.stop()
            job.process.join()
        with self.lock:
            self.running.pop((job.what, job.state), None)
            if error is None:
                self.done[job.what] = (job.state, value, time.monotonic())
                while len(self.done) > KEEP:
                    self.done.pop(next(iter(self.done)))
        match error:
            case None:
                job.future.set_result(value)
            case ("stopped", _):
                job.future.set_exception(Superseded())
            case ("kd", message):
                job.future.set_exception(KdError(message))
            case (_, message):
                job.future.set_exception(RuntimeError(message))

    @staticmethod
    def warm() -> None:
        """Start the fork server in the background (a second or two of imports), before the first page needs it."""
        threading.Thread(target=multiprocessing.forkserver.ensure_running, daemon=True).start()

    def close(self) -> None:
        """Stop every computation (the server is stopping)."""
        with self.lock:
            self.closed = True
            jobs = list(self.running.values())
        for job in jobs:
            job.stop()
