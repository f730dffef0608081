"""Build one generated dataset: params -> method -> records -> atomic dataset + metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd.cache import DEFAULT_DIR, RequestCache
from kd.config import (
    Curation,
    Expansion,
    Feature,
    Feedback,
    Labeling,
    Params,
    SelfKnowledge,
    dataset_config,
    dataset_teachers,
    load_params,
)
from kd.elicit.common import Asker, Summary, Totals
from kd.elicit.scoring import Role, make_backends, roles
from kd.prompts import load_prompt
from kd.records import MANIFEST_FILE, atomic_write_text, write_dataset


def build_dataset(name: str, method: str, root: Path = Path("."), data_dir: Path | None = None,
                  metrics_dir: Path | None = None, cache_dir: Path | None = None) -> str:
    """Generate `datasets.<name>` and return the summary line. Nothing is written unless it all succeeds.

    Prints the forecast first (what will reach the teacher, tokens, cost), so a surprise can be stopped.
    """
    from kd.cards import render_card
    from kd.forecast import forecast, money

    summary = Summary()
    params = load_params(root)
    cfg = dataset_config(params, name, method)
    data_dir = data_dir or root / "data"
    cache = RequestCache(cache_dir or root / DEFAULT_DIR)

    rs = roles(cfg)  # feedback and self-knowledge ask a generator and a judge; the others one teacher

    def run(askers: dict[str, Asker]) -> tuple[list, list, dict]:
        return run_method(name, cfg, root, data_dir, askers)

    print(forecast(name, params, root, cache, run, data_dir).line(), flush=True)
    backends = make_backends(rs, params, root)
    askers = {role: Asker(b, cache, name if len(rs) == 1 else f"{name} {role}") for role, b in backends.items()}
    if cfg.method == "feature":
        return _build_features(name, cfg, params, backends["teacher"], askers["teacher"], data_dir,
                               metrics_dir or root / "metrics", summary)
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
        return render_card(manifest, [_parent(data_dir, p) for p in parents], totals.usage, money(cost),
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
    atomic_write_text((metrics_dir or root / "metrics") / f"{name}.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # what this run paid for (new requests only) varies run to run, so it goes to stdout, not to metrics
    paid = totals.new_usage
    paid_cost = _cost(params, rs, askers, "new_usage")
    by_role = "".join(f"; {r}: {a.cached} cached, {a.new} new" for r, a in askers.items()) if len(rs) > 1 else ""
    return (f"{summary.line(name, manifest, totals)}; paid for {totals.new} requests: {paid['prompt_tokens']} prompt + "
            f"{paid['completion_tokens']} completion tokens, {money(paid_cost)}{by_role}")


def _cost(params: Params, rs: dict[str, Role], askers: dict[str, Asker], usage: str) -> float | None:
    """Price of every role's usage (`usage` or `new_usage`); None when any teacher's price is unknown."""
    from kd.forecast import cost_of

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


def run_method(name: str, cfg: Labeling | Expansion | Curation | Feedback | SelfKnowledge, root: Path,
               data_dir: Path, askers: dict[str, Asker]) -> tuple[list, list, dict]:
    """(records, rejected, templates) of one generation method; the build and its forecast both call it.

    `askers` holds one Asker per role of `kd.elicit.scoring.roles(cfg)`.
    """
    match cfg.method:
        case "labeling":
            from kd.elicit.labeling import label

            return label(name, cfg, root, data_dir, askers["teacher"])
        case "expansion":
            from kd.elicit.expansion import expand

            return expand(name, cfg, root, askers["teacher"])
        case "curation":
            from kd.elicit.curation import curate

            return curate(name, cfg, root, askers["teacher"])
        case "feedback":
            from kd.elicit.feedback import feedback

            return feedback(name, cfg, root, data_dir, askers)
        case "self_knowledge":
            from kd.elicit.self_knowledge import self_knowledge

            return self_knowledge(name, cfg, root, data_dir, askers)
    raise AssertionError(cfg.method)


def _build_features(name: str, cfg: Feature, params: Params, teacher: Any, asker: Asker, data_dir: Path,
                    metrics_dir: Path, summary: Summary) -> str:
    """A feature dataset: white-box, so no requests; it has its own cache and writes logits next to records."""
    from kd.cards import render_card
    from kd.elicit.feature import elicit_features
    from kd.forecast import cost_of, money

    def card(manifest: dict) -> str:
        usage = {"prompt_tokens": manifest["tokens"], "completion_tokens": 0}  # scored by forward passes
        return render_card(manifest, [_parent(data_dir, cfg.dataset)], usage,
                           money(cost_of(params, cfg.teacher, manifest["tokens"], 0)))

    result = elicit_features(name, cfg, teacher, data_dir, asker.cache.dir / "features", card=card)
    asker.cached, asker.new = result["cached"], result["new"]
    manifest = result["manifest"]
    metrics = {
        "records": manifest["records"],
        "rejected": sum(manifest["rejected"].values()),
        "rejected_by_reason": manifest["rejected"],
        **{k: manifest[k] for k in ("tokens", "completion_tokens", "bytes_per_token", "top_k")},
    }
    atomic_write_text(metrics_dir / f"{name}.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return summary.line(name, manifest, asker)


def _parent(data_dir: Path, name: str) -> dict:
    path = data_dir / name / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"name": name, "fingerprint": manifest.get("fingerprint"), "records": manifest.get("records")}


def files_read(cfg: Labeling | Expansion | Curation | Feature | Feedback | SelfKnowledge, params: Params,
               root: Path) -> dict[str, list[str]]:
    """What a generation stage reads, by kind: its dvc.yaml stage must list these as deps and params.

    Loading the templates also checks them (syntax, sandbox-safe includes, declared variables).
    """
    from kd.elicit import curation, expansion, feedback, judges, labeling

    match cfg.method:
        case "labeling":
            templates = [(cfg.template, labeling.VARIABLES)]
            seeds = [s.seeds for s in cfg.inputs if s.seeds]
            datasets = [s.dataset for s in cfg.inputs if s.dataset]
        case "expansion":
            templates = [(cfg.template, expansion.SELF_INSTRUCT_VARIABLES)]
            templates += [(t, expansion.EVOL_VARIABLES) for t in (cfg.evol.templates if cfg.evol else [])]
            seeds, datasets = [cfg.seeds], []
        case "curation":
            templates = [(cfg.question_template, curation.QUESTION_VARIABLES),
                         (cfg.answer_template, curation.ANSWER_VARIABLES)]
            seeds, datasets = [cfg.topics, cfg.attributes], []
        case "feature":
            templates, seeds, datasets = [], [], [cfg.dataset]
        case "feedback" | "self_knowledge":
            templates = [(cfg.template, feedback.VARIABLES)]
            if cfg.judge is not None and cfg.judge.template is not None:
                templates.append((cfg.judge.template, judges.RUBRIC_VARIABLES if cfg.judge.kind == "rubric"
                                  else judges.PAIRWISE_VARIABLES))
            seeds = [s.seeds for s in cfg.inputs if s.seeds]
            datasets = [s.dataset for s in cfg.inputs if s.dataset]
    paths: list[str] = []
    for path, variables in templates:
        prompt = load_prompt(root, path, variables)
        paths += [prompt.path, *prompt.includes]
    keys = sorted(set(dataset_teachers(cfg).values()))  # a generator and its judge may be one teacher
    models = [params.teachers[k].path for k in keys if params.teachers[k].backend == "local"]
    if getattr(cfg, "reward_model", None) is not None:
        models.append(cfg.reward_model)
    return {
        "templates": sorted(set(paths)),
        "seeds": sorted(set(seeds)),
        "datasets": [f"data/{d}" for d in sorted(set(datasets))],
        "teacher": models,
        "params": [f"teachers.{k}" for k in keys],
    }
