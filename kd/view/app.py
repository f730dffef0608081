"""`kd view`: a read-only local web app over a kd project (Starlette routes, server-rendered Jinja pages).

Safe by construction: templates autoescape (Starlette's Jinja2Templates escapes *.html), so data is text, never
markup, and a Content-Security-Policy forbids scripts anyway; names in URLs are looked up among what the project
has (datasets with a manifest, models with kd_model.json), never joined into paths; a seed file must resolve
inside the project; every route is GET; an unknown id is a 404 page and a user's mistake (a bad revision) a
400 page with kd's one-line message, never a traceback; no page shows the project's absolute path. Only loopback
addresses are accepted as Host (`[::1]` too), so a web page elsewhere cannot read the viewer through DNS rebinding.

Nothing slow runs on the event loop: the status forecast and diffs run in a worker process (kd/view/work.py), the
other pages in Starlette's thread pool (plain `def` routes), so one slow page never freezes the others, and a
SIGTERM or Ctrl-C stops the server (and kills the worker) within seconds.
"""

from __future__ import annotations

import html
import json
import re
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from kd.errors import KdError
from kd.paths import DATA_DIR, MODELS_DIR
from kd.provenance import audit
from kd.provenance.forecast import money
from kd.provenance.revisions import git
from kd.records import CARD_FILE, MANIFEST_FILE, read_jsonl, seed_id
from kd.runtime.models import INFO_FILE
from kd.secrets import redact
from kd.view import pages
from kd.view.index import DatasetIndex
from kd.view.work import WAIT_S, Worker, build_state

HERE = Path(__file__).parent
PAGE = 50  # records a page
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # addresses to bind; as a Host header an IPv6 one is in brackets
LOOPBACK_HOSTS = tuple(f"[{h}]" if ":" in h else h for h in LOOPBACK)
MAX_OFFSET = 10**9  # a number parameter beyond this (or not a number) is a 400 page (SQLite's integers end at 2**63)
REFRESH = 2  # seconds before a page still computing reloads itself (a meta refresh: the pages run no script)
_HEX = re.compile(r"[0-9a-f]{4,64}")
_REV = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/~^@{}-]{0,99}")  # a revision git understands, never an option
HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'none'; object-src 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes *.html


def _pretty(value: Any) -> str:
    """JSON for people (escaped by the template like any text; Jinja's tojson would show \\u003c for <)."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _part(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return str(value[-1].get("content", ""))
    return ""


templates.env.filters.update(
    pretty=_pretty, money=money,
    prompt_text=lambda r: _part(r, ("prompt", "messages", "instruction")),
    answer_text=lambda r: _part(r, ("completion", "chosen", "response", "answer")))


class Project:
    """The project directory the viewer shows, with one open index per dataset fingerprint."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.indexes: dict[Path, DatasetIndex] = {}
        self.lock = threading.Lock()  # pages run in a thread pool: one index opened per fingerprint
        # the project's absolute path as messages may spell it (resolved or as given), longest first
        spelled = {str(self.root), str(root.absolute())}
        self.hidden = sorted(spelled | {html.escape(p) for p in spelled}, key=len, reverse=True)

    def relative(self, text: str) -> str:
        """`text` with the project's absolute path shown relative to the project (pages never show where it is)."""
        for path in self.hidden:
            text = text.replace(path + "/", "").replace(path, ".")
        return text

    def datasets(self) -> list[str]:
        return sorted(p.parent.name for p in (self.root / DATA_DIR).glob(f"*/{MANIFEST_FILE}"))

    def models(self) -> list[str]:
        return sorted(p.parent.name for p in (self.root / MODELS_DIR).glob(f"*/{INFO_FILE}"))

    def index(self, name: str) -> DatasetIndex:
        if name not in self.datasets():
            raise HTTPException(404, f"no dataset {name!r} in {DATA_DIR}/")
        with self.lock:
            index = DatasetIndex.open(self.root, self.root / DATA_DIR / name)
            if index.path in self.indexes:  # already open: keep the first connection
                index.close()
                return self.indexes[index.path]
            self.indexes[index.path] = index
            return index


def page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    project: Project = request.app.state.project
    body = templates.TemplateResponse(request, template, {"project": project.root.name, "status": status, **context})
    return HTMLResponse(project.relative(bytes(body.body).decode()), status_code=status, headers=HEADERS)


def _int(request: Request, key: str) -> int:
    """A whole-number query parameter (0 when absent); anything else is a 400 page naming it."""
    value = request.query_params.get(key, "") or "0"
    if not (value.isascii() and value.isdigit() and int(value) <= MAX_OFFSET):
        raise KdError(f"{key}={value[:40]!r}: expected a whole number from 0 to {MAX_OFFSET}")
    return int(value)


async def pipeline(request: Request) -> Response:
    """The stage graph and kd status's forecast, computed off the event loop once per build state."""
    project: Project = request.app.state.project
    state = await run_in_threadpool(build_state, project.root)
    found = await request.app.state.worker.get("pipeline", state, pages.pipeline, project.root)
    return page(request, "pipeline.html", nav="pipeline", p=found.value, found=found, refresh=REFRESH,
                datasets=await run_in_threadpool(project.datasets))


def dataset(request: Request) -> Response:
    project: Project = request.app.state.project
    name = request.path_params["name"]
    index = project.index(name)
    q = request.query_params
    filters = {k: q.get(k, "") for k in ("q", "category", "seed", "parent")}
    offset = _int(request, "offset")
    found = index.records(filters["q"], filters["category"], filters["seed"], filters["parent"], offset, PAGE)
    def link(**change: Any) -> str:
        return f"?{urlencode({k: v for k, v in {**filters, 'offset': offset, **change}.items() if v})}"
    return page(request, "dataset.html", nav="data", name=name, m=index.manifest, page=found, filters=filters,
                offset=offset, size=PAGE, categories=index.categories(), link=link)


def rejected(request: Request) -> Response:
    project: Project = request.app.state.project
    name = request.path_params["name"]
    index = project.index(name)
    reason = request.query_params.get("reason", "")
    offset = _int(request, "offset")
    found = index.rejected(reason, offset, PAGE)
    def link(**change: Any) -> str:
        return f"?{urlencode({k: v for k, v in {'reason': reason, 'offset': offset, **change}.items() if v})}"
    return page(request, "rejected.html", nav="data", name=name, m=index.manifest, page=found, reason=reason,
                offset=offset, size=PAGE, link=link)


def record(request: Request) -> Response:
    project: Project = request.app.state.project
    name, rid = request.path_params["name"], request.path_params["id"]
    if not _HEX.fullmatch(rid) or project.index(name).record(rid) is None:
        raise HTTPException(404, f"no record {rid[:64]!r} in {DATA_DIR / name}")
    report = audit.audit_record(project.root, f"{name}:{rid}")
    return page(request, "record.html", nav="data", name=name, r=report)


def seed(request: Request) -> Response:
    project: Project = request.app.state.project
    file, sid = request.query_params.get("file", ""), request.query_params.get("id", "")
    path = (project.root / file).resolve()
    if (not file or not path.is_relative_to(project.root) or path.suffix != ".jsonl" or not path.is_file()
            or any(part.startswith(".") for part in path.relative_to(project.root).parts)):
        raise HTTPException(404, f"no seed file {file[:200]!r} in this project")
    rows = [r for r in read_jsonl(path) if seed_id(r) == sid]
    if not rows:
        raise HTTPException(404, f"no row with id {sid[:64]!r} in {file[:200]}")
    return page(request, "seed.html", nav="data", file=file, sid=sid, row=rows[0],
                ref=f"{file}:{sid}", datasets=project.datasets())


def revisions(root: Path) -> list[tuple[str, str]]:
    """(commit, subject) of the last commits, newest first, for the diff page's pickers; [] without git."""
    try:
        log = git(root, "log", "-30", "--format=%h %s").decode(errors="replace")
    except KdError:
        return []
    return [tuple(line.split(" ", 1)) if " " in line else (line, "") for line in log.splitlines()]


async def diff_page(request: Request) -> Response:
    """A dataset's record-level diff between revisions, computed off the event loop once per build state."""
    project: Project = request.app.state.project
    q = request.query_params
    name, rev_a, rev_b = q.get("dataset", ""), q.get("a", "HEAD") or "HEAD", q.get("b", "")
    found = None
    if name:
        if name not in await run_in_threadpool(project.datasets):
            raise HTTPException(404, f"no dataset {name!r} in {DATA_DIR}/")
        for rev in (rev_a, rev_b):
            if rev and not _REV.fullmatch(rev):
                raise KdError(f"{rev[:100]!r}: not a git revision")
        n = min(_int(request, "n") or 5, 50)
        state = await run_in_threadpool(build_state, project.root)
        found = await request.app.state.worker.get(("diff", name, rev_a, rev_b, n), state, pages.dataset_diff,
                                                   project.root, name, rev_a, rev_b, n)
    return page(request, "diff.html", nav="diff", datasets=await run_in_threadpool(project.datasets),
                revs=await run_in_threadpool(revisions, project.root), name=name, rev_a=rev_a, rev_b=rev_b,
                r=found.value if found else None, found=found, refresh=REFRESH, side_by_side=pages.side_by_side)


def models(request: Request) -> Response:
    project: Project = request.app.state.project
    rows = [audit.audit_model(project.root, project.root / MODELS_DIR / m) for m in project.models()]
    return page(request, "models.html", nav="models", models=rows, evaluation=pages.evaluation(project.root))


def model(request: Request) -> Response:
    project: Project = request.app.state.project
    name = request.path_params["name"]
    if name not in project.models():
        raise HTTPException(404, f"no model {name!r} in {MODELS_DIR}/")
    directory = project.root / MODELS_DIR / name
    card = directory / CARD_FILE
    return page(request, "model.html", nav="models", m=audit.audit_model(project.root, directory),
                card=card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None,
                curve=pages.model_curve(project.root, name))


async def not_found(request: Request, exc: HTTPException) -> Response:
    title = {404: "Not found", 405: "Read-only: only GET is served"}.get(exc.status_code, "Error")
    return page(request, "error.html", status=exc.status_code, title=title, message=str(exc.detail))


async def user_error(request: Request, exc: KdError) -> Response:
    return page(request, "error.html", status=400, title="Cannot show this", message=redact(str(exc)))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.worker.warm()
    yield
    app.state.worker.close()  # the server stops: so does every computation


async def server_error(request: Request, exc: Exception) -> Response:
    # repr: the URL and the message may carry control characters, shown escaped rather than sent to the terminal
    print(f"kd view: {request.url.path!r}: {type(exc).__name__}: {redact(str(exc))!r}", file=sys.stderr)
    return page(request, "error.html", status=500, title="Something went wrong",
                message="the viewer failed on this page; the terminal running `kd view` says why")


def create_app(root: Path, hosts: tuple[str, ...] = LOOPBACK_HOSTS, wait_s: float = WAIT_S) -> Starlette:
    """The viewer over the project at `root`; `hosts`: the Host names it answers to; `wait_s`: how long a page
    waits for a slow computation before it shows "computing…" (tests that read the result wait longer)."""
    routes = [
        Route("/", pipeline),
        Route("/data/{name}", dataset),
        Route("/data/{name}/rejected", rejected),
        Route("/data/{name}/{id}", record),
        Route("/seed", seed),
        Route("/diff", diff_page),
        Route("/models", models),
        Route("/models/{name}", model),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))],
                    exception_handlers={HTTPException: not_found, KdError: user_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.project = Project(root)
    app.state.worker = Worker(wait_s)
    return app


def serve(root: Path, host: str, port: int) -> None:
    """Run the viewer until Ctrl-C. Any address but loopback is said out loud: the viewer has no login."""
    import uvicorn

    if host not in LOOPBACK:
        print(f"kd view: listening on {host}, not 127.0.0.1: anyone who can reach this machine on port {port} can "
              f"read the project's data (the viewer has no login)", file=sys.stderr)
    hosts = LOOPBACK_HOSTS if host in LOOPBACK else ("*",)
    shown = f"[{host}]" if ":" in host else host
    print(f"kd view: http://{shown}:{port}/  (read-only; Ctrl-C to stop)", flush=True)
    try:  # a request still running 2 s after SIGTERM or Ctrl-C is cancelled: the server always stops
        uvicorn.run(create_app(root, hosts), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has stopped: exit 130, no traceback
        sys.exit(130)
