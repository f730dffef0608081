"""Build one generated dataset: params -> method -> records -> atomic dataset + metrics."""

from __future__ import annotations

import json
from pathlib import Path

from kd.cache import DEFAULT_DIR, RequestCache
from kd.config import dataset_config, load_params
from kd.elicit.common import Asker, Summary
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
