"""`kd check`: everything that can be known wrong before a build starts, each problem on its own line.

params.yaml against its schema, every template it names (syntax, sandbox, declared variables), every seed file,
and dvc.yaml against the stage graph params.yaml gives (kd.pipeline.spec).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kd.config import load_params
from kd.errors import KdError
from kd.paths import DVC_FILE
from kd.pipeline.spec import dataset_reads, differences, dvc_data
from kd.records import load_seeds


def check(root: Path) -> str:
    """The one-line verdict when all is well.

    Raises:
        KdError: one line per problem, each naming the params key, file or stage at fault.
    """
    params = load_params(root)
    problems: list[str] = []
    templates: set[str] = set()
    for name, cfg in params.datasets.items():
        try:
            reads = dataset_reads(name, cfg, params, root)
            templates |= set(reads["templates"])
            for f in reads["seeds"]:
                load_seeds(root, f, ())
        except KdError as e:
            problems.append(f"datasets.{name}: {e}")
    if problems:
        raise KdError("\n".join(problems))
    expected = dvc_data(params, root)
    path = root / DVC_FILE
    if not path.is_file():
        raise KdError(f"{DVC_FILE}: missing; write it from params.yaml with `kd pipeline --write`")
    try:
        committed = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KdError(f"{DVC_FILE}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if diffs := differences(committed, expected):
        raise KdError("\n".join(f"{DVC_FILE}: {d}" for d in diffs)
                      + f"\n{DVC_FILE} does not match params.yaml; rewrite it with `kd pipeline --write`")
    return (f"kd check: params.yaml OK ({len(params.teachers)} teachers, {len(params.datasets)} datasets, "
            f"{len(params.students)} students, {len(templates)} templates); {DVC_FILE} matches "
            f"({len(expected['stages'])} stages)")
