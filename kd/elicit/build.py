"""Build one generated dataset: params -> method -> records -> atomic dataset + metrics."""

from __future__ import annotations

import json
from pathlib import Path

from kd.cache import DEFAULT_DIR, RequestCache
from kd.config import Curation, Expansion, Feature, Labeling, Params, dataset_config, load_params
from kd.elicit.common import Asker, Summary
from kd.prompts import load_prompt
from kd.records import atomic_write_text, write_dataset
from kd.teachers import make_teacher


def build_dataset(name: str, method: str, root: Path = Path("."), data_dir: Path | None = None,
                  metrics_dir: Path | None = None, cache_dir: Path | None = None) -> str:
    """Generate `datasets.<name>` and return the summary line. Nothing is written unless it all succeeds."""
    summary = Summary()
    params = load_params(root)
    cfg = dataset_config(params, name, method)
    data_dir = data_dir or root / "data"
    teacher = make_teacher(cfg.teacher, params.teachers[cfg.teacher], root)
    asker = Asker(teacher, RequestCache(cache_dir or root / DEFAULT_DIR), name)
    match method:
        case "labeling":
            from kd.elicit.labeling import label

            records, rejected, templates = label(name, cfg, root, data_dir, asker)
        case "expansion":
            from kd.elicit.expansion import expand

            records, rejected, templates = expand(name, cfg, root, asker)
        case "curation":
            from kd.elicit.curation import curate

            records, rejected, templates = curate(name, cfg, root, asker)
        case _:
            raise AssertionError(method)
    manifest = write_dataset(data_dir / name, name, method, records, rejected, templates, teacher.identity)
    metrics = {
        "records": manifest["records"],
        "rejected": sum(manifest["rejected"].values()),
        "rejected_by_reason": manifest["rejected"],
        "requests": asker.cached + asker.new,
        **asker.usage,
    }
    atomic_write_text((metrics_dir or root / "metrics") / f"{name}.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return summary.line(name, manifest, asker)


def files_read(cfg: Labeling | Expansion | Curation | Feature, params: Params, root: Path) -> dict[str, list[str]]:
    """What a generation stage reads, by kind: its dvc.yaml stage must list these as deps and params.

    Loading the templates also checks them (syntax, sandbox-safe includes, declared variables).
    """
    from kd.elicit import curation, expansion, labeling

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
    paths: list[str] = []
    for path, variables in templates:
        prompt = load_prompt(root, path, variables)
        paths += [prompt.path, *prompt.includes]
    teacher = params.teachers[cfg.teacher]
    return {
        "templates": sorted(set(paths)),
        "seeds": sorted(set(seeds)),
        "datasets": [f"data/{d}" for d in sorted(set(datasets))],
        "teacher": [teacher.path] if teacher.backend == "local" else [],
        "params": [f"teachers.{cfg.teacher}"],
    }
