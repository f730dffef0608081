"""`kd check`: everything that can be known wrong before a build starts, each problem on its own line.

params.yaml against its schema, every template it names (syntax, sandbox, declared variables), every seed file, each
template rendered against the first rows of its seed files (as its stage will render it, without a teacher), and
dvc.yaml against the stage graph params.yaml gives (kd.pipeline.spec).
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import yaml

from kd.config import Dataset, Labeling, LocalTeacher, Params, load_params
from kd.config.students import FromConfig, FromTeacher
from kd.elicit import curation, expansion, labeling
from kd.elicit.common import iter_inputs
from kd.errors import KdError
from kd.paths import DATA_DIR, DVC_FILE, under
from kd.pipeline.spec import dataset_reads, differences, dvc_data
from kd.prompts import load_prompt
from kd.records import iter_seeds, load_seeds
from kd.runtime import judges
from kd.runtime.models import trusted_code

MODE_SEEKING = ("reverse_kl", "jsd", "skew_reverse_kl")
SAMPLE_ROWS = 3  # rows of each seed file rendered through its templates: what the first requests would be
TEACHER_TEXT = "(the teacher's text)"  # stands in where a stage renders a teacher's earlier output


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


def render_samples(cfg: Dataset, root: Path) -> None:
    """Render each template of a generation dataset with the first SAMPLE_ROWS rows of its seed files, as its stage
    will: a sandbox violation, a runaway template or a seed row without a field its method needs (every row is
    checked for that) is reported now, naming template, seed file and row, not mid-build.

    Raises:
        KdError: the first problem, one line.
    """
    match cfg.method:
        case "labeling" | "feedback" | "self_knowledge":
            prompt = load_prompt(root, cfg.template, labeling.VARIABLES)  # the three share (instruction, category)
            judge = getattr(cfg, "judge", None)
            judged = judge is not None and judge.template is not None
            rubric = judged and judge.kind == "rubric"
            judge_prompt = load_prompt(root, judge.template, judges.RUBRIC_VARIABLES if rubric
                                       else judges.PAIRWISE_VARIABLES) if judged else None
            for source in (s for s in cfg.inputs if s.seeds is not None):
                # every row is read (and checked: fields, duplicate ids), one at a time; the first few rendered
                for n, x in enumerate(iter_inputs(root, source, root / DATA_DIR), 1):
                    if n > SAMPLE_ROWS:
                        continue
                    where = f"{source.seeds} row {n}"
                    prompt.render(where, instruction=x.text, category=x.category)
                    if judge_prompt is not None and rubric:
                        judge_prompt.render(where, instruction=x.text, response=TEACHER_TEXT, aspects=list(judge.aspects),
                                            low=judge.low, high=judge.high, allow_prose=judge.allow_prose)
                    elif judge_prompt is not None:
                        judge_prompt.render(where, instruction=x.text, response_a=TEACHER_TEXT,
                                            response_b=TEACHER_TEXT, allow_prose=judge.allow_prose)
        case "expansion":
            seeds = load_seeds(root, cfg.seeds, ("instruction",))
            load_prompt(root, cfg.template, expansion.SELF_INSTRUCT_VARIABLES).render(
                f"{cfg.seeds} rows 1-{min(cfg.demos, len(seeds))}", demos=[s["instruction"] for s in seeds[:cfg.demos]])
            for template in cfg.evol.templates if cfg.evol else []:
                evol = load_prompt(root, template, expansion.EVOL_VARIABLES)
                for n, s in enumerate(seeds[:SAMPLE_ROWS], 1):
                    evol.render(f"{cfg.seeds} row {n}", instruction=s["instruction"], category=str(s.get("category", "")))
        case "curation":
            topics = load_seeds(root, cfg.topics, ("topic",))
            attributes = load_seeds(root, cfg.attributes, ("attribute",))
            question = load_prompt(root, cfg.question_template, curation.QUESTION_VARIABLES)
            answer = load_prompt(root, cfg.answer_template, curation.ANSWER_VARIABLES)
            for n in range(max(min(SAMPLE_ROWS, len(topics)), min(SAMPLE_ROWS, len(attributes)))):
                t, a = topics[n % len(topics)], attributes[n % len(attributes)]
                where = f"{cfg.topics} row {n % len(topics) + 1}, {cfg.attributes} row {n % len(attributes) + 1}"
                question.render(where, topic=t["topic"], domain=t.get("domain", ""), attribute=a["attribute"])
                answer.render(where, question=TEACHER_TEXT, topic=t["topic"], domain=t.get("domain", ""))
        case "feature":
            pass


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
                deque(iter_seeds(root, f, ()), maxlen=0)  # every row checked, none held: a seed file may be huge
            render_samples(cfg, root)
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
