"""Templates: sandboxed, strict, literal seed text, declared variables, hashes that cover includes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import REPO

from kd.config import load_params
from kd.errors import KdError
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
