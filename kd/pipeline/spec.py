"""The stage graph, derived from params.yaml: every stage's command, deps, params keys and outs, in one place.

`dvc.yaml` is written from it (`kd pipeline --write`) and `kd check` fails when the committed one differs, so
adding a dataset or a student to params.yaml is one command, and dvc.yaml stays an ordinary DVC file. A stage
depends on exactly what it reads: its code (the stage script and every kd module it imports, kd.pipeline.code),
the templates, seeds, upstream data and models its params name, and the params keys it uses.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kd.config import PARAMS_STAGE, Dataset, Params, RewardModel, Student
from kd.config.students import FromPretrained, Training, logits_readers
from kd.elicit import curation, expansion, feedback, labeling
from kd.errors import KdError, one_line
from kd.paths import (
    DATA_DIR,
    DVC_FILE,
    FIGURES_DIR,
    METRICS_DIR,
    MODELS_DIR,
    PARAMS_CHECKED,
    PARAMS_FILE,
    PLOTS_DIR,
    REPORTS_DIR,
)
from kd.pipeline.code import closure
from kd.prompts import load_prompt
from kd.runtime import judges
from kd.runtime.roles import roles

Kind = Literal["params", "teacher", "dataset", "student", "reward_model", "evaluate"]
HEADER = """\
# Written by `kd pipeline --write` from params.yaml: edit params.yaml, then run it again (`kd check` fails when
# this file and params.yaml disagree). Each stage lists as deps exactly the code, templates, seeds, data and
# models it reads, and as params exactly its keys, so `dvc repro` reruns only what an edit affects; inside a
# stale generation stage kd's request cache sends only changed requests to the teacher.
"""


@dataclass
class Stage:
    name: str
    kind: Kind
    cmd: str
    deps: list[str]
    params: list[str]
    outs: list[str]
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # training curves (x: step, y: loss), or a directory
    builds: str | None = None  # the params key of what it builds (a dataset, student or reward model name)

    def as_dvc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd": self.cmd, "deps": self.deps}
        if self.params:
            out["params"] = self.params
        out["outs"] = self.outs
        if self.metrics:
            out["metrics"] = [{m: {"cache": False}} for m in self.metrics]
        if self.plots:
            out["plots"] = [{p: {"cache": False, **({"x": "step", "y": "loss"} if p.endswith(".csv") else {})}}
                            for p in self.plots]
        return out


def _script(kind: str) -> str:
    return f"stages/{kind}.py"


def command(*words: str) -> str:
    """A stage's command line, each word quoted for the shell DVC runs it with. Names are identifiers already
    (kd.config.base.NAME), so this changes no shipped command; it is the second wall should one ever get through."""
    return " ".join(shlex.quote(w) for w in words)


def _inside(root: Path, path: str) -> bool:
    """Whether `path` (relative to the project `root`) names a place inside the project where it says: no `..`
    (`data/../prompts` is inside, but it is prompts/), not absolute, not the root, and the directories leading there
    resolved (a symlink among them may lead out). The out itself is taken as written: with DVC's symlink cache type
    a file out is a link into the DVC cache, which may live outside (a shared cache)."""
    base, p = root.resolve(), Path(path)
    if p.is_absolute() or ".." in p.parts or p.name in ("", "."):
        return False
    return ((base / p).parent.resolve() / p.name).is_relative_to(base)


def _outs_inside(root: Path, stages: list[Stage]) -> None:
    """DVC deletes a stage's outs before running it, so an out that leads elsewhere (`data/../prompts`, an absolute
    path, a symlink leading out of the project) would delete what is there.

    Raises:
        KdError: the first such out, one line naming the stage.
    """
    for st in stages:
        for path in [*st.outs, *st.metrics, *st.plots]:
            if not _inside(root, path):
                raise KdError(one_line(f"{DVC_FILE}: stage {st.name}: out {path} leads out of its place in the "
                                       f"project (`..`, an absolute path, a symlink leading out); DVC deletes a "
                                       f"stage's outs before it runs"))


def dataset_reads(name: str, cfg: Dataset, params: Params, root: Path) -> dict[str, list[str]]:
    """What a generation stage reads: templates (with their includes), seeds, upstream datasets, models and
    teacher params keys. Loading the templates also checks them (syntax, sandbox-safe includes, variables)."""
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
    keys = sorted({role.teacher for role in roles(cfg).values() if role.teacher})  # a generator may also judge
    models = [params.teachers[k].path for k in keys if params.teachers[k].backend == "local"]
    models += [role.path for role in roles(cfg).values() if role.path]  # a reward model directory
    return {
        "templates": sorted(set(paths)),
        "seeds": sorted(set(seeds)),
        "datasets": [str(DATA_DIR / d) for d in sorted(set(datasets))],
        "models": models,
        "params": [f"teachers.{k}" for k in keys]
        # a feature dataset stores the teacher's tail at each temperature its students train at
        + ([_temperature_key(s, params.students[s]) for s in logits_readers(params.students, name)]
           if cfg.method == "feature" else []),
    }


def _temperature_key(name: str, s: Student) -> str:
    """The narrowest params key holding a student's kd.temperature that params.yaml spells out (DVC fails on a
    declared key the file lacks, and the temperature has a default)."""
    if "kd" not in s.model_fields_set:
        return f"students.{name}"
    return f"students.{name}.kd.temperature" if "temperature" in s.kd.model_fields_set else f"students.{name}.kd"


def _outputs(params: Params) -> set[str]:
    """Every model directory some stage builds."""
    built = {str(MODELS_DIR / n) for n in [*params.students, *params.reward_models]}
    return built | ({params.embedded_teacher.out} if _embedded_used(params) else set())


def _embedded_used(params: Params) -> bool:
    return any(t.backend == "local" and t.path.rstrip("/") == params.embedded_teacher.out.rstrip("/")
               for t in params.teachers.values())


def _init_models(init: Any, params: Params, root: Path) -> tuple[list[str], list[str]]:
    """(model deps, teacher keys) of an `init:` section: a teacher's directory, or a local directory that a stage
    builds or that exists (a hub id is not a file)."""
    if isinstance(init, FromPretrained):
        path = init.path.rstrip("/")
        return ([path] if path in _outputs(params) or (root / path).is_dir() else []), []
    return [], [init.teacher]


def launcher(t: Training) -> str:
    """`python`, or `accelerate launch` with `training.processes` processes. `--multi_gpu` is accelerate's
    torchrun launcher, the one that starts N local processes, also on CPU (its `--cpu` starts only one); the
    other flags are its defaults, spelled out so that it does not warn about each. With
    `training.accelerate_config` the file says how (FSDP, DeepSpeed) and params say how many processes."""
    if t.processes == 1:
        return "python"
    if t.accelerate_config:  # FSDP or DeepSpeed: the file names the distributed type and its settings
        return f"accelerate launch --config_file {shlex.quote(t.accelerate_config)} --num_processes {t.processes} --num_machines 1"
    return (f"accelerate launch --multi_gpu --num_processes {t.processes} --num_machines 1 --mixed_precision no "
            f"--dynamo_backend no")


def student_stage(name: str, cfg: Student, params: Params, root: Path) -> Stage:
    models, teachers = _init_models(cfg.init, params, root)
    online = [x.teacher for x in (cfg.on_policy, cfg.hidden, cfg.rl) if x is not None and x.teacher]
    teachers = sorted({*teachers, *online, *([params.datasets[cfg.logits].teacher] if cfg.logits else [])})
    data = [str(DATA_DIR / d) for d in [*cfg.datasets, *([cfg.logits] if cfg.logits else [])]]
    if cfg.rl is not None and cfg.rl.reward_model:
        data.append(str(MODELS_DIR / cfg.rl.reward_model))
    script = _script("student")
    return Stage(
        name, "student", f"{launcher(cfg.training)} {command(script, name)}",
        deps=closure(root, script) + data + sorted({*models, *(params.teachers[t].path for t in teachers)})
        + ([cfg.training.accelerate_config] if cfg.training.accelerate_config else []),
        # Finer than `teachers.<t>`: a teacher's batch_size does not change this student.
        params=[f"students.{name}", *(f"teachers.{t}.path" for t in teachers),
                *sorted({f"teachers.{t}.dtype" for t in online})],
        outs=[str(MODELS_DIR / name)], metrics=[str(METRICS_DIR / f"{name}.json")],
        plots=[str(PLOTS_DIR / f"{name}.csv")], builds=name)


def reward_model_stage(name: str, cfg: RewardModel, params: Params, root: Path) -> Stage:
    models, teachers = _init_models(cfg.init, params, root)
    script = _script("reward_model")
    return Stage(
        name, "reward_model", command("python", script, name),
        deps=closure(root, script) + [str(DATA_DIR / d) for d in cfg.datasets]
        + sorted({*models, *(params.teachers[t].path for t in teachers)}),
        params=[f"reward_models.{name}", *(f"teachers.{t}.path" for t in teachers)],
        outs=[str(MODELS_DIR / name)], metrics=[str(METRICS_DIR / f"{name}.json")],
        plots=[str(PLOTS_DIR / f"{name}.csv")], builds=name)


def _evaluate(params: Params, root: Path) -> Stage:
    ev = params.evaluation
    base = ev.baseline or ev.students[0]
    teachers = sorted({ev.teacher, *([ev.judge.teacher] if ev.judge else [])})
    templates: list[str] = []
    if ev.judge is not None and ev.judge.template:
        prompt = load_prompt(root, ev.judge.template, judges.PAIRWISE_VARIABLES)
        templates = sorted({prompt.path, *prompt.includes})
    base_models, _ = _init_models(params.students[base].init, params, root)
    models = [*(params.teachers[t].path for t in teachers if params.teachers[t].backend == "local"),
              *base_models, *(str(MODELS_DIR / s) for s in ev.students),
              *([str(MODELS_DIR / ev.reward_model)] if ev.reward_model else [])]
    script = _script("evaluate")
    return Stage(
        "evaluate", "evaluate", command("python", script),
        deps=closure(root, script) + templates + [ev.prompts] + list(dict.fromkeys(models)),
        params=["evaluation", *(f"teachers.{t}" for t in teachers), f"students.{base}.init",
                f"students.{base}.training.seed"],
        outs=[str(REPORTS_DIR / "report.md"), str(REPORTS_DIR / FIGURES_DIR), str(REPORTS_DIR / "generations.jsonl")],
        metrics=[str(REPORTS_DIR / "metrics.json")], plots=[str(REPORTS_DIR / "plots")])


def stages(params: Params, root: Path) -> list[Stage]:
    """Every stage `params` declares, in build order: the `params` check, the embedded teacher, datasets, students
    and reward models (in params order), the evaluation.

    Every stage depends on the `params` stage's out, so `dvc repro` validates params.yaml, templates and seeds
    before DVC removes any stage's outputs (it does so before running a stage's command): a typo stops the build
    with the data intact.

    Raises:
        KdError: a template that does not load (its path, line and what is wrong); an out outside the project.
    """
    out = []
    checked: set[str] = set()  # the templates and seeds the `params` stage validates
    if _embedded_used(params):
        script = _script("teacher")
        out.append(Stage("teacher", "teacher", command("python", script), deps=closure(root, script),
                         params=["embedded_teacher"], outs=[params.embedded_teacher.out]))
    for name, cfg in params.datasets.items():
        reads = dataset_reads(name, cfg, params, root)
        checked |= {*reads["templates"], *reads["seeds"]}
        script = _script(cfg.method)
        out.append(Stage(
            name, "dataset", command("python", script, name),
            deps=closure(root, script) + list(dict.fromkeys(reads["models"] + reads["seeds"] + reads["datasets"]
                                                           + reads["templates"])),
            params=[*reads["params"], f"datasets.{name}"], outs=[str(DATA_DIR / name)],
            metrics=[str(METRICS_DIR / f"{name}.json")], builds=name))
    out += [student_stage(n, cfg, params, root) for n, cfg in params.students.items()]
    out += [reward_model_stage(n, cfg, params, root) for n, cfg in params.reward_models.items()]
    if params.evaluation is not None:
        out.append(_evaluate(params, root))
    for st in out:
        st.deps.insert(0, str(PARAMS_CHECKED))
    script = _script(PARAMS_STAGE)
    check = Stage(PARAMS_STAGE, "params", command("python", script),
                  deps=closure(root, script) + [PARAMS_FILE, *sorted(checked)], params=[], outs=[str(PARAMS_CHECKED)])
    _outs_inside(root, [check, *out])
    return [check, *out]


def dvc_data(params: Params, root: Path) -> dict[str, Any]:
    """dvc.yaml as data: the stages, and one training-curve plot per kind of trained model."""
    st = stages(params, root)
    data: dict[str, Any] = {"stages": {s.name: s.as_dvc() for s in st}}
    curves = [(title, [p for s in st if s.kind == kind for p in s.plots])
              for title, kind in (("training loss", "student"), ("reward model loss", "reward_model"))]
    if plots := [{title: {"x": "step", "y": {p: "loss" for p in paths}}} for title, paths in curves if paths]:
        data["plots"] = plots
    return data


class _Dumper(yaml.SafeDumper):
    """Lists indented under their key, as DVC's own examples write them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


def dvc_yaml(params: Params, root: Path) -> str:
    """The text of dvc.yaml: deterministic, one blank line between stages."""
    data = dvc_data(params, root)
    parts = [HEADER.rstrip("\n"), "stages:"]
    for name, stage in data["stages"].items():
        body = yaml.dump({name: stage}, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
        parts.append("".join(f"  {line}\n" if line else "\n" for line in body.splitlines()))
    text = parts[0] + "\n" + parts[1] + "\n" + "\n".join(parts[2:])
    if "plots" in data:
        text += "\n" + yaml.dump({"plots": data["plots"]}, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                                 width=120)
    return text


def differences(committed: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between a committed dvc.yaml and the one params.yaml gives, one line per stage and field."""
    out = []
    have, want = committed.get("stages") or {}, expected.get("stages") or {}
    for name in want.keys() - have.keys():
        out.append(f"stage {name}: missing (params.yaml declares it)")
    for name in have.keys() - want.keys():
        out.append(f"stage {name}: not declared by params.yaml")
    for name in want.keys() & have.keys():
        a, b = have[name] or {}, want[name]
        for key in sorted(set(a) | set(b)):
            old, new = a.get(key), b.get(key)
            if old is None and isinstance(new, list):
                old = []  # `outs:` with no items parses as None
            if old == new:
                continue
            if isinstance(old, list) and isinstance(new, list):
                lacks = [x for x in new if x not in old]
                extra = [x for x in old if x not in new]
                what = "; ".join(filter(None, [f"lacks {_items(lacks)}" if lacks else "",
                                               f"has extra {_items(extra)}" if extra else ""])) or "order differs"
                out.append(f"stage {name}: {key} {what}")
            else:
                out.append(f"stage {name}: {key} is {old!r}, params.yaml gives {new!r}")
    if committed.get("plots") != expected.get("plots"):
        out.append("plots: differ")
    return sorted(out)


def _items(items: list[Any]) -> str:
    return ", ".join(str(next(iter(i))) if isinstance(i, dict) else str(i) for i in items)
