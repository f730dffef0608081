"""`kd check`: everything that can be known wrong before a build starts, each problem on its own line.

params.yaml against its schema, every template it names (syntax, sandbox, declared variables), every seed file,
and dvc.yaml against the stage graph params.yaml gives (kd.pipeline.spec).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from kd.config import Labeling, LocalTeacher, Params, load_params
from kd.config.students import FromConfig, FromTeacher
from kd.errors import KdError
from kd.paths import DVC_FILE, under
from kd.pipeline.spec import dataset_reads, differences, dvc_data
from kd.records import load_seeds
from kd.runtime.models import trusted_code

MODE_SEEKING = ("reverse_kl", "jsd", "skew_reverse_kl")


def warnings(params: Params) -> list[str]:
    """Combinations that validate but cannot show distillation, each naming the key to change."""
    out = []
    for name, st in params.students.items():
        untrained = isinstance(st.init, FromTeacher | FromConfig)
        if untrained and (st.objective == "on_policy" or (st.objective == "kd" and st.kd.divergence in MODE_SEEKING)):
            what = "on-policy KD" if st.objective == "on_policy" else f"{st.kd.divergence}"
            out.append(f"students.{name}.init: {what} from an untrained {st.init.kind} student barely learns (the "
                       f"gradient vanishes where the student puts no mass on the teacher's tokens); start it from an "
                       f"SFT student, `init: {{kind: from_pretrained, path: models/<sft student>}}`, as GKD and "
                       f"MiniLLM do")
    ev = params.evaluation
    if params.students and ev is None:
        out.append("evaluation: students are trained but nothing evaluates them; add an `evaluation` section "
                   "(held-out prompts, the teacher, the students)")
    if ev is not None:
        for name in params.students:
            if name not in ev.students:
                out.append(f"evaluation.students: `{name}` is trained but not evaluated")
        system = {params.datasets[d].template for n in ev.students for d in params.students[n].datasets
                  if isinstance(params.datasets[d], Labeling) and params.datasets[d].keep_system}
        if system and ev.template is None:
            out.append(f"evaluation.template: the students were trained with the system message of "
                       f"{', '.join(sorted(system))} but are asked bare instructions; set evaluation.template to it")
        if len(ev.students) > 1 and not ev.compare:
            out.append("evaluation.compare: several students but no comparison; without one the report shows no "
                       "interval for their difference")
    return out


def validate(root: Path) -> tuple[Params, set[str]]:
    """params.yaml, every template its datasets name and every seed file they read; returns (params, templates).
    What the `params` stage runs before any other stage (kd.pipeline.spec), and `kd check` before comparing dvc.yaml.

    Raises:
        KdError: one line per problem, each naming the params key or file at fault.
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
    for name, teacher in params.teachers.items():  # pinned code is checked now, not when a stage loads it
        if isinstance(teacher, LocalTeacher) and teacher.trust_remote_code and under(root, teacher.path).is_dir():
            try:
                trusted_code(under(root, teacher.path), teacher, f"teachers.{name}")
            except KdError as e:
                problems.append(str(e))
    if problems:
        raise KdError("\n".join(problems))
    return params, templates


def check(root: Path) -> str:
    """The one-line verdict when all is well; warnings (kd.pipeline.check.warnings) go to stderr.

    Raises:
        KdError: one line per problem, each naming the params key, file or stage at fault.
    """
    params, templates = validate(root)
    for w in warnings(params):
        print(f"kd: warning: {w}", file=sys.stderr)
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
