"""Build one dataset: params -> method -> records -> atomic dataset + card + metrics.

A generation method is a function `method(name, cfg, root, data_dir, askers) -> (records, rejected, templates)`
with one Asker per role (kd.runtime.roles); its stage script passes it here. The build runs it twice: once
against stand-in teachers for the forecast it prints first, then for real.

A method whose requests are all known before any answer (kd.elicit.common.Streamed: labeling) is built in one
streamed pass instead: its requests are rendered and looked up once for the forecast (kd.runtime.plan), the
uncached ones sent from a spool file through the teacher's bounded concurrency, each answer cached as it
arrives, and the records made from the cache and written through an index sorted by id
(kd.records.DatasetWriter): memory holds keys and offsets, not requests, answers or records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache
from kd.config import Params, dataset_config, load_params
from kd.elicit.common import Streamed, Summary
from kd.paths import CACHE_DIR, DATA_DIR, METRICS_DIR
from kd.prompts import Prompt, load_prompt
from kd.provenance.cards import render_card
from kd.provenance.forecast import Forecast, cost_of, forecast, money, planned
from kd.records import MANIFEST_FILE, DatasetWriter, ensure_writable, write_json
from kd.runtime.ask import Asker, Totals
from kd.runtime.environment import collect, resolved
from kd.runtime.plan import CHUNK, Plan
from kd.runtime.roles import Role, make_backends, roles

Method = Callable[[str, Any, Path, Path, dict[str, Asker]], tuple[list[dict], list[dict], dict[str, str]]]


class Tally:
    """What the card says about the records' origins, counted as they are written: parent datasets, seed rows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parents: set[str] = set()
        self.seed_rows: dict[str, set[str]] = {}  # seed file -> the rows the records descend from directly

    def add(self, record: dict[str, Any]) -> None:
        self.parents.update(p["dataset"] for p in record["provenance"]["parents"])
        for s in record["provenance"]["seeds"]:
            self.seed_rows.setdefault(s["file"], set()).add(s["id"])


def build_dataset(name: str, method: str, run_method: Method | Streamed, root: Path = Path("."),
                  data_dir: Path | None = None, metrics_dir: Path | None = None, cache_dir: Path | None = None) -> str:
    """Generate `datasets.<name>` (whose `method` must be `method`) with `run_method`; return the summary line.
    Nothing is written unless it all succeeds.

    Prints the forecast first (what will reach the teacher, tokens, cost), so a surprise can be stopped.
    """
    summary = Summary()
    params = load_params(root)
    cfg = dataset_config(params, name, method)
    data_dir = data_dir or root / DATA_DIR
    metrics_dir = metrics_dir or root / METRICS_DIR
    ensure_writable(data_dir, metrics_dir)  # before any request: answers must not be lost at the end
    cache = RequestCache(cache_dir or root / CACHE_DIR)
    rs = roles(cfg)  # feedback and self-knowledge ask a generator and a judge; the others one teacher
    if isinstance(run_method, Streamed):
        return _streamed(name, method, run_method, params, cfg, root, data_dir, metrics_dir, cache, summary)

    def run(askers: dict[str, Asker]) -> tuple[list, list, dict]:
        return run_method(name, cfg, root, data_dir, askers)

    print(forecast(name, params, root, cache, run, data_dir).line(), flush=True)
    backends = make_backends(rs, params, root)
    askers = {role: Asker(b, cache, name if len(rs) == 1 else f"{name} {role}") for role, b in backends.items()}
    records, rejected, templates = run(askers)
    writer, tally = DatasetWriter(data_dir / name, name, method), Tally(name)
    for r in records:
        tally.add(r)
        writer.add(r)
    for row in rejected:
        writer.reject(row)
    identity = backends["teacher"].identity if "teacher" in rs else {r: b.identity for r, b in backends.items()}
    return _finish(name, params, rs, askers, writer, tally, templates, identity, metrics_dir, data_dir, cache, summary)


def _streamed(name: str, method: str, m: Streamed, params: Params, cfg: Any, root: Path, data_dir: Path,
              metrics_dir: Path, cache: RequestCache, summary: Summary) -> str:
    """One pass (see the module doc): plan and forecast, send what the cache lacks, make and write the records."""
    fc, plan, prompt = plan_streamed(name, m, params, root, cache, data_dir, spool=True)
    print(fc.line(), flush=True)
    rs = roles(cfg)
    try:
        teacher = make_backends(rs, params, root)["teacher"]
        identity = teacher.identity
        assert identity == plan.identity, "the forecast planned the requests of another teacher identity"
        asker = Asker(teacher, cache, name)
        asker.cached = plan.cached
        refused = {**plan.refused, **asker.send(plan.misses(), plan.new)}  # rows too long to render, refusals
    finally:
        plan.discard()
    writer, tally = DatasetWriter(data_dir / name, name, method), Tally(name)
    damaged: dict[str, list[Any]] = {}  # key -> its items: entries found damaged now are asked again below

    def emit(item: Any, key: str, response: dict[str, Any], request: dict[str, Any] | None) -> None:
        record, rejected = m.assemble(name, cfg, prompt, identity, item, key, response, request)
        if record is not None:
            tally.add(record)
            writer.add(record)
        else:
            writer.reject(rejected)

    def made(chunk: list[tuple[int, Any]]) -> None:
        keys = [plan.key(n) for n, _ in chunk]
        entries = cache.read_many(k for k in keys if k not in refused)  # each entry read and verified once, here
        for (n, item), key in zip(chunk, keys, strict=True):
            entry = {"response": refused[key], "request": None} if key in refused else entries.get(key)
            if entry is None:
                damaged.setdefault(key, []).append(item)
                continue
            if plan.first[n]:
                asker.count(entry["response"])
            emit(item, key, entry["response"], entry["request"])

    try:
        n, chunk = -1, []
        for n, item in enumerate(m.items(cfg, root, data_dir)):
            chunk.append((n, item))
            if len(chunk) == CHUNK:
                made(chunk)
                chunk = []
        made(chunk)
        assert n + 1 == plan.calls, f"{name}: {plan.calls} requests planned, {n + 1} items read back"
        if damaged:
            asker.cached -= len(damaged)
            again = {(c := m.render(asker, prompt, cfg, items[0])).key: c.request for items in damaged.values()}
            answers = asker.send(list(again.items()), len(again), keep_all=True)
            for key, items in damaged.items():
                asker.count(answers[key])
                for item in items:
                    emit(item, key, answers[key], again[key])
    except BaseException:
        writer.abort()
        raise
    return _finish(name, params, rs, {"teacher": asker}, writer, tally, {prompt.path: prompt.sha256, **prompt.includes},
                   identity, metrics_dir, data_dir, cache, summary)


def plan_streamed(name: str, m: Streamed, params: Params, root: Path, cache: Any, data_dir: Path,
                  spool: bool) -> tuple[Forecast, Plan, Prompt]:
    """The forecast of a streamed method's dataset (what `kd status` prints for it, and the stage before it asks)
    and the plan it made; `spool` keeps the uncached requests for the build to send."""
    cfg = params.datasets[name]
    prompt = load_prompt(root, cfg.template, m.variables)
    fc, plan = planned(name, params, root, cache, prompt, m.items(cfg, root, data_dir),
                       lambda asker, item: m.render(asker, prompt, cfg, item), m.values, spool)
    return fc, plan, prompt


def _finish(name: str, params: Params, rs: dict[str, Role], askers: dict[str, Asker], writer: DatasetWriter,
            tally: Tally, templates: dict[str, str], identity: dict[str, Any], metrics_dir: Path, data_dir: Path,
            cache: RequestCache, summary: Summary) -> str:
    """Close the dataset with its card, write the metrics, and return the summary line."""
    totals = Totals.of(list(askers.values()))
    # deterministic figures (every request that built the dataset) go to metrics and the card
    cost = _cost(params, rs, askers, "usage")
    parents = sorted(tally.parents - {name})

    def card(manifest: dict) -> str:
        return render_card(manifest, [parent_ref(data_dir, p) for p in parents], totals.usage, money(cost),
                           {f: len(ids) for f, ids in tally.seed_rows.items()})

    # once per dataset, never in its records: a rebuild from the cache elsewhere keeps its records' bytes
    environment = collect(*resolved([a.teacher for a in askers.values()]))
    manifest = writer.close(templates, identity, {"environment": environment}, card=card)
    metrics = {
        "records": manifest["records"],
        "rejected": sum(manifest["rejected"].values()),
        "rejected_by_reason": manifest["rejected"],
        "requests": totals.cached + totals.new,
        **({"requests_by_role": {r: a.cached + a.new for r, a in askers.items()}} if len(rs) > 1 else {}),
        **totals.usage,
        **({"cost": cost} if cost is not None else {}),  # unknown without a price: no number rather than 0
    }
    write_json(metrics_dir / f"{name}.json", metrics)
    # what this run paid for (new requests only) varies run to run, so it goes to stdout, not to metrics
    paid = totals.new_usage
    paid_cost = _cost(params, rs, askers, "new_usage")
    by_role = "".join(f"; {r}: {a.cached} cached, {a.new} new" for r, a in askers.items()) if len(rs) > 1 else ""
    return (f"{summary.line(name, manifest, totals)}; paid for {totals.new} requests: {paid['prompt_tokens']} prompt + "
            f"{paid['completion_tokens']} completion tokens, {money(paid_cost)}{by_role}{cache.stats.note()}")


def _cost(params: Params, rs: dict[str, Role], askers: dict[str, Asker], usage: str) -> float | None:
    """Price of every role's usage (`usage` or `new_usage`); None when any teacher's price is unknown."""
    total = 0.0
    for name, role in rs.items():
        if role.teacher is None:
            continue  # a reward model directory runs on your own hardware
        u = getattr(askers[name], usage)
        cost = cost_of(params, role.teacher, u["prompt_tokens"], u["completion_tokens"])
        if cost is None:
            return None
        total += cost
    return total


def parent_ref(data_dir: Path, name: str) -> dict:
    path = data_dir / name / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"name": name, "fingerprint": manifest.get("fingerprint"), "records": manifest.get("records")}
