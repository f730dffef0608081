"""Build one dataset: params -> method -> records -> atomic dataset + card + metrics.

A generation method is a function `method(name, cfg, root, data_dir, askers) -> (records, rejected, templates)`
with one Asker per role (kd.runtime.roles); its stage script passes it here. The build runs it twice: once
against stand-in teachers for the forecast it prints first, then for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache
from kd.config import Params, dataset_config, load_params
from kd.elicit.common import Summary
from kd.paths import CACHE_DIR, DATA_DIR, METRICS_DIR
from kd.provenance.cards import render_card
from kd.provenance.forecast import cost_of, forecast, money
from kd.records import MANIFEST_FILE, ensure_writable, write_dataset, write_json
from kd.runtime.ask import Asker, Totals
from kd.runtime.roles import Role, make_backends, roles

Method = Callable[[str, Any, Path, Path, dict[str, Asker]], tuple[list[dict], list[dict], dict[str, str]]]


def build_dataset(name: str, method: str, run_method: Method, root: Path = Path("."), data_dir: Path | None = None,
                  metrics_dir: Path | None = None, cache_dir: Path | None = None) -> str:
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

    def run(askers: dict[str, Asker]) -> tuple[list, list, dict]:
        return run_method(name, cfg, root, data_dir, askers)

    print(forecast(name, params, root, cache, run, data_dir).line(), flush=True)
    backends = make_backends(rs, params, root)
    askers = {role: Asker(b, cache, name if len(rs) == 1 else f"{name} {role}") for role, b in backends.items()}
    records, rejected, templates = run(askers)
    totals = Totals.of(list(askers.values()))
    # deterministic figures (every request that built the dataset) go to metrics and the card
    cost = _cost(params, rs, askers, "usage")
    parents = sorted({p["dataset"] for r in records for p in r["provenance"]["parents"]} - {name})

    seed_rows: dict[str, set] = {}  # seed file -> the rows the records descend from directly, for the card
    for r in records:
        for s in r["provenance"]["seeds"]:
            seed_rows.setdefault(s["file"], set()).add(s["id"])

    def card(manifest: dict) -> str:
        return render_card(manifest, [parent_ref(data_dir, p) for p in parents], totals.usage, money(cost),
                           {f: len(ids) for f, ids in seed_rows.items()})

    identity = backends["teacher"].identity if "teacher" in rs else {r: b.identity for r, b in backends.items()}
    manifest = write_dataset(data_dir / name, name, method, records, rejected, templates, identity, card=card)
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
