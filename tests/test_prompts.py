"""Templates: sandboxed, strict, literal seed text, declared variables, hashes that cover includes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import REPO

from kd.config import load_params
from kd.errors import KdError
from kd.pipeline.check import render_samples
from kd.pipeline.spec import dataset_reads
from kd.prompts import declared_variables, load_prompt


def write(root: Path, name: str, text: str) -> str:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
    return name


def test_every_shipped_template_declares_exactly_what_it_uses(tmp_path):
    # load_prompt raises if a template uses an undeclared variable or declares one its method lacks; the shipped
    # params files (the default recipe and the profiles) between them use every template
    import shutil

    used = set()
    for i, file in enumerate([REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]):
        root = tmp_path / str(i)
        for d in ("prompts", "seeds"):
            shutil.copytree(REPO / d, root / d)
        shutil.copy(file, root / "params.yaml")
        params = load_params(root)
        for name, cfg in params.datasets.items():
            used |= set(dataset_reads(name, cfg, params, root)["templates"])
            render_samples(cfg, root)  # and each renders with its seed rows, as `kd check` renders it
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "prompts").rglob("*.jinja")}
    # the plain alternative to explain.jinja, and the text judges (the default recipe judges by likelihood);
    # tests/test_feedback.py loads the judge templates with their method's variables
    assert shipped - used <= {"prompts/labeling/answer.jinja", "prompts/feedback/rubric.jinja",
                              "prompts/feedback/pairwise.jinja"}
    prompt = load_prompt(REPO, "prompts/labeling/answer.jinja", ("instruction", "category"))
    assert prompt.variables == ("instruction",)


def test_seed_text_with_jinja_syntax_is_rendered_literally(tmp_path):
    name = write(tmp_path, "p.jinja", "{# vars: instruction #}{% block user %}Q: {{ instruction }}{% endblock %}")
    hostile = "{{ 7 * 7 }} {% for x in range(3) %}{{ x }}{% endfor %} {{ ''.__class__.__mro__ }}"
    messages = load_prompt(tmp_path, name, ["instruction"]).render(instruction=hostile)
    assert messages == [{"role": "user", "content": f"Q: {hostile}"}]


def test_hostile_template_is_blocked_with_its_name(tmp_path):
    name = write(tmp_path, "evil.jinja",
                 "{# vars: instruction #}{% block user %}{{ ''.__class__.__mro__ }}{{ instruction }}{% endblock %}")
    with pytest.raises(KdError, match=r"evil\.jinja: blocked by the template sandbox"):
        load_prompt(tmp_path, name, ["instruction"]).render(instruction="x")


def test_template_cannot_mutate_data(tmp_path):
    name = write(tmp_path, "m.jinja", "{# vars: demos #}{% block user %}{{ demos.append(1) }}{% endblock %}")
    demos = ["a"]
    with pytest.raises(KdError, match="sandbox"):
        load_prompt(tmp_path, name, ["demos"]).render(demos=demos)
    assert demos == ["a"]


def test_undeclared_and_unprovided_variables_are_errors(tmp_path):
    name = write(tmp_path, "u.jinja", "{# vars: instruction #}{% block user %}{{ instruction }}{{ extra }}{% endblock %}")
    with pytest.raises(KdError, match="uses extra but its header declares only: instruction"):
        load_prompt(tmp_path, name, ["instruction", "extra"])
    name = write(tmp_path, "v.jinja", "{# vars: instruction, topic #}{% block user %}{{ topic }}{% endblock %}")
    with pytest.raises(KdError, match="declares topic, which this method does not provide"):
        load_prompt(tmp_path, name, ["instruction"])
    name = write(tmp_path, "h.jinja", "{% block user %}{{ instruction }}{% endblock %}")
    with pytest.raises(KdError, match="header comment must declare"):
        load_prompt(tmp_path, name, ["instruction"])


def test_blocks_make_messages_and_syntax_errors_name_the_line(tmp_path):
    name = write(tmp_path, "b.jinja",
                 "{# vars: x #}\n{% block system %}  sys {{ x }} {% endblock %}\n{% block user %}u{% endblock %}")
    assert load_prompt(tmp_path, name, ["x"]).render(x=1) == [
        {"role": "system", "content": "sys 1"}, {"role": "user", "content": "u"}]
    name = write(tmp_path, "s.jinja", "{# vars: x #}\n{% block user %}\n{{ x }\n{% endblock %}")
    with pytest.raises(KdError, match=r"s\.jinja:3: template syntax error"):
        load_prompt(tmp_path, name, ["x"])
    name = write(tmp_path, "n.jinja", "{# vars: x #}{% block system %}{{ x }}{% endblock %}")
    with pytest.raises(KdError, match="needs a {% block user %}"):
        load_prompt(tmp_path, name, ["x"])


def test_hash_is_sha256sum_and_digest_covers_includes(tmp_path):
    write(tmp_path, "inc/persona.jinja", "{# vars: #}Be kind.")
    name = write(tmp_path, "t.jinja",
                 '{# vars: x #}{% block system %}{% include "inc/persona.jinja" %}{% endblock %}'
                 "{% block user %}{{ x }}{% endblock %}")
    before = load_prompt(tmp_path, name, ["x"])
    assert before.sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert set(before.includes) == {"inc/persona.jinja"}
    assert before.render(x=1)[0]["content"] == "Be kind."
    write(tmp_path, "inc/persona.jinja", "{# vars: #}Be terse.")
    after = load_prompt(tmp_path, name, ["x"])
    assert after.sha256 == before.sha256 and after.digest != before.digest
    assert after.render(x=1)[0]["content"] == "Be terse."


def test_declared_variables_parsing():
    assert declared_variables("{# A template.\n   vars: b, a #}\nbody") == ("a", "b")
    assert declared_variables("{#- vars:\n#}") == ()
    assert declared_variables("no header") is None


def one_line_error(fn, match: str) -> str:
    with pytest.raises(KdError, match=match) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("include", ["../" * 30 + "etc/hostname", "../outside.jinja", "ABSOLUTE", "prompts/link.jinja",
                                     ".env"])
def test_include_cannot_read_outside_the_project(tmp_path, include):
    # regression: `{% include "../../../etc/hostname" %}` read (and hashed) a file outside the project, then failed
    # with a traceback; an absolute path or a symlink out of the project did the same
    outside = tmp_path / "outside.jinja"
    outside.write_text("{# vars: #}SECRET-OUTSIDE")
    root = tmp_path / "project"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "link.jinja").symlink_to(outside)
    (root / ".env").write_text("KEY=SECRET-ENV")
    include = str(outside) if include == "ABSOLUTE" else include
    name = write(root, "prompts/evil.jinja", f'{{# vars: x #}}{{% block user %}}{{% include "{include}" %}}{{% endblock %}}')
    msg = one_line_error(lambda: load_prompt(root, name, ["x"]), r"^prompts/evil\.jinja: includes ")
    assert "SECRET" not in msg


def test_self_recursion_is_one_line(tmp_path):
    # regression: `{{ self.user() }}` ended in RecursionError
    name = write(tmp_path, "r.jinja", "{# vars: x #}{% block user %}{{ self.user() }}{% endblock %}")
    one_line_error(lambda: load_prompt(tmp_path, name, ["x"]).render("seeds/s.jsonl row 1", x=1),
                   r"^r\.jinja \(seeds/s\.jsonl row 1\): the user block calls itself without end")


def test_no_output_that_changes_between_runs(tmp_path):
    # regression: `{{ lipsum }}` rendered a memory address, so the request key changed every run
    name = write(tmp_path, "l.jinja", "{# vars: x #}{% block user %}{{ lipsum }}{% endblock %}")
    one_line_error(lambda: load_prompt(tmp_path, name, ["x"]), r"uses lipsum but its header declares only")
    for body in ("{{ range }}", "{{ x.upper }}", "{{ cycler(1, 2) }}"):
        name = write(tmp_path, "a.jinja", "{# vars: x #}{% block user %}" + body + "{% endblock %}")
        one_line_error(lambda n=name: load_prompt(tmp_path, n, ["x"]).render(x="hi"), "is not the same from run to run")
    # kept: range, dict, namespace, cycler and joiner, whose output is plain data
    name = write(tmp_path, "k.jinja", "{# vars: x #}{% block user %}{% set ns = namespace(n=0) %}{% set c = cycler('a', 'b') %}"
                 "{% for i in range(3) %}{% set ns.n = ns.n + i %}{{ c.next() }}{% endfor %} {{ ns.n }} {{ dict(a=1) }}"
                 "{% endblock %}")
    assert load_prompt(tmp_path, name, ["x"]).render(x=0)[0]["content"] == "aba 3 {'a': 1}"


@pytest.mark.parametrize("body", ["{{ 'a' * 10**8 }}", "{% for i in range(100000) %}{{ 'a' * 100000 }}{% endfor %}",
                                  "{{ range(10**9)|length }}", "{{ x|center(10**9) }}", "{{ '%999999999d' % 1 }}",
                                  "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                                  "{% endfor %}{{ ns.s }}"])
def test_rendered_size_is_bounded(tmp_path, body):
    # regression: nothing bounded the rendered size (`'a' * 10**8` rendered 100 MB)
    import time

    name = write(tmp_path, "big.jinja", "{# vars: x #}{% block user %}" + body + "{% endblock %}")
    start = time.perf_counter()
    one_line_error(lambda: load_prompt(tmp_path, name, ["x"]).render("seeds/s.jsonl row 4", x="hi"),
                   r"^big\.jinja \(seeds/s\.jsonl row 4\): ")
    assert time.perf_counter() - start < 2


def test_non_utf8_template_is_one_line_naming_the_file(tmp_path):
    # regression: a non-UTF-8 template ended in a UnicodeDecodeError traceback
    (tmp_path / "latin.jinja").write_bytes(b"{# vars: x #}{% block user %}caf\xe9 {{ x }}{% endblock %}")
    one_line_error(lambda: load_prompt(tmp_path, "latin.jinja", ["x"]), r"^latin\.jinja: not UTF-8 text")
    write(tmp_path, "main.jinja", '{# vars: x #}{% block user %}{% include "latin.jinja" %}{% endblock %}')
    one_line_error(lambda: load_prompt(tmp_path, "main.jinja", ["x"]), r"^main\.jinja: includes latin\.jinja: not UTF-8")


def test_kd_check_renders_templates_against_seed_rows(project):
    # regression: `kd check` did not render templates, so a sandbox violation or a seed row without the field its
    # method needs surfaced only mid-build
    from kd.pipeline.check import check

    check(project)  # the shipped project passes
    template = project / "prompts" / "labeling" / "explain.jinja"
    good = template.read_text()
    template.write_text(good.replace("{{ instruction }}", "{{ instruction }}{{ 'a' * 10**8 }}"))
    msg = one_line_error(lambda: check(project), r"^datasets\.\w+: prompts/labeling/explain\.jinja "
                                                 r"\(seeds/instructions\.jsonl row 1\): blocked by the template sandbox")
    template.write_text(good)
    seeds = project / "seeds" / "instructions.jsonl"
    rows = seeds.read_text().splitlines()
    rows[4] = '{"id": "no-instruction", "category": "math", "question": "What is 2 + 2?"}'
    seeds.write_text("\n".join(rows) + "\n")
    msg = str(pytest.raises(KdError, check, project).value)
    assert "seeds/instructions.jsonl: record 5 (no-instruction): needs a non-empty string `instruction`" in msg


@pytest.mark.parametrize("kind", ["rubric", "pairwise"])
def test_kd_check_renders_judge_templates(tmp_path, kind):
    # a text judge's template is rendered too (with the seed row's instruction and a stand-in answer), so a judge
    # template that cannot render fails `kd check`, naming it and the row
    import shutil

    import yaml

    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, tmp_path / d)
    params = yaml.safe_load((REPO / "profiles" / "survey.yaml").read_text())
    params["datasets"]["prefs"]["judge"] = {"teacher": "smollm2", "kind": kind, "template": f"prompts/feedback/{kind}.jinja"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    render_samples(load_params(tmp_path).datasets["prefs"], tmp_path)
    judge = tmp_path / "prompts" / "feedback" / f"{kind}.jinja"
    judge.write_text(judge.read_text().replace("{{ instruction }}", "{{ instruction.__class__.__mro__ }}", 1))
    one_line_error(lambda: render_samples(load_params(tmp_path).datasets["prefs"], tmp_path),
                   rf"^prompts/feedback/{kind}\.jinja \(seeds/instructions\.jsonl row 1\): ")
