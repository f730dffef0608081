"""A hostile model directory or server gets nowhere (issue 19, items 3, 4, 5, 13, 16): remote code runs only from
inside the pinned directory, an API key echoed in any encoding is scrubbed wherever the text lands, credentials in a
`base_url` are refused, and a server's bad numbers and huge answers are bounded."""

from __future__ import annotations

import base64
import itertools
import json
import random
import string
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai import FakeOpenAI
from pydantic import ValidationError

import kd.secrets
from kd.cache.store import request_key
from kd.config import LocalTeacher as LocalConfig
from kd.config import OpenAITeacher as OpenAIConfig
from kd.config import Sampling
from kd.config.students import FromPretrained
from kd.errors import KdError, TeacherError
from kd.runtime.local import LocalTeacher
from kd.runtime.models import code_digest, trusted_code
from kd.runtime.openai import OpenAITeacher
from kd.secrets import redact

REPO = Path(__file__).resolve().parents[1]
KEY_CHARS = string.ascii_letters + string.digits + "-_./+~="  # what keys are made of, `/` and `+` included


@pytest.fixture(autouse=True)
def _known_keys_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys remembered here are forgotten after each test: every later answer would be scanned for them."""
    monkeypatch.setattr(kd.secrets, "_known", dict(getattr(kd.secrets, "_known", {})), raising=False)


# ------------------------------------------------------------------------------------------ remote code (item 3)


def model_dir(root: Path, auto_map: dict[str, Any], config: str = "config.json") -> Path:
    """A model directory without code files whose `config` maps classes as given; a module outside it
    (`evil/mod.py`) writes root/PWNED when imported."""
    evil = root / "evil"
    evil.mkdir(parents=True, exist_ok=True)
    (evil / "mod.py").write_text(f"open({str(root / 'PWNED')!r}, 'w').write('ran')\n"
                                 "from transformers import PretrainedConfig\n"
                                 "class C(PretrainedConfig):\n    model_type = 'llama'\n")
    d = root / "models" / "m"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    data = json.loads((d / config).read_text()) if (d / config).is_file() else {}
    (d / config).write_text(json.dumps({**data, **auto_map}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


# Regression (issue 19 item 3): a directory without code files hashed to the digest of the empty set; its
# config.json (not in the digest) then mapped AutoConfig to `/abs/dir--mod.C`, and transformers imported that module.
def test_auto_map_to_code_outside_the_pinned_directory_never_runs(tmp_path: Path) -> None:
    d = model_dir(tmp_path, {"auto_map": {"AutoConfig": f"{tmp_path / 'evil'}--mod.C"}})
    cfg = LocalConfig(backend="local", path="models/m", trust_remote_code=True, code_digest=code_digest(d))
    with pytest.raises(KdError) as err:
        LocalTeacher("custom", cfg, tmp_path).context_length()  # loads only the config: where auto_map is read
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("teachers.custom.trust_remote_code: models/m: config.json maps a class")
    assert not (tmp_path / "PWNED").exists()


# Regression (issue 19 item 3): every reference that leaves the directory is refused, in any config transformers
# reads, at any depth, even with the digest pinned; references inside it are not.
def test_auto_map_table(tmp_path: Path) -> None:
    outside = [("config.json", {"auto_map": {"AutoConfig": "/abs/dir--mod.C"}}),
               ("config.json", {"auto_map": {"AutoModelForCausalLM": "evil-org/evil-repo--modeling.Model"}}),
               ("config.json", {"auto_map": {"AutoModel": "repo--modeling.Model"}}),
               ("config.json", {"auto_map": {"AutoModel": "../elsewhere/modeling.Model"}}),
               ("config.json", {"auto_map": {"AutoModel": "sub/modeling.Model"}}),
               ("config.json", {"text_config": {"auto_map": {"AutoConfig": "x--c.C"}}}),
               ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["/abs--tok.T", None]}}),
               ("processor_config.json", {"auto_map": {"AutoProcessor": "hub/repo--proc.P"}}),
               ("generation_config.json", {"custom_pipelines": {"t": {"impl": "..\\evil.P"}}})]
    wrong = []
    for n, (config, mapping) in enumerate(outside):
        d = model_dir(tmp_path / str(n), mapping, config)
        cfg = LocalConfig(backend="local", path="models/m", trust_remote_code=True, code_digest=code_digest(d))
        try:
            trusted_code(d, cfg, "teachers.t")
            wrong.append((config, mapping))
        except KdError as e:
            if not str(e).startswith(f"teachers.t.trust_remote_code: models/m: {config} maps a class to "):
                wrong.append((config, mapping, str(e)))
    assert wrong == []
    inside = model_dir(tmp_path / "ok", {"auto_map": {"AutoConfig": "configuration_m.MConfig",
                                                      "AutoTokenizer": ["tokenization_m.MTok", None]}})
    cfg = LocalConfig(backend="local", path="models/m", trust_remote_code=True, code_digest=code_digest(inside))
    assert trusted_code(inside, cfg, "teachers.t") is True


# Regression (issue 19 item 3): the digest covered code files only, so a config edit (another auto_map, a new
# tokenizer_config.json) kept the pin valid.
def test_code_digest_covers_every_config_that_picks_code(tmp_path: Path) -> None:
    d = model_dir(tmp_path, {"auto_map": {"AutoConfig": "configuration_m.MConfig"}})
    before = code_digest(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "other.Config"}}))
    assert code_digest(d) != before
    changed = code_digest(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))
    assert code_digest(d) != changed
    cfg = LocalConfig(backend="local", path="models/m", trust_remote_code=True, code_digest=changed)
    with pytest.raises(KdError, match="teachers.t.code_digest: the code in models/m is not the code pinned"):
        trusted_code(d, cfg, "teachers.t")


# Regression (issue 19 item 3): a hub id with trust_remote_code was trusted with any `revision`, a branch too.
def test_hub_remote_code_needs_a_commit(tmp_path: Path) -> None:
    for revision in ("main", "v1.0", "deadbeef"):
        init = FromPretrained(kind="from_pretrained", path="org/model", trust_remote_code=True, revision=revision)
        with pytest.raises(KdError, match=r"^students\.s\.init\.revision: trust_remote_code: true on hub model"):
            trusted_code(tmp_path / "org" / "model", init, "students.s.init")
    init = FromPretrained(kind="from_pretrained", path="org/model", trust_remote_code=True, revision="ab" * 20)
    assert trusted_code(tmp_path / "org" / "model", init, "students.s.init") is True


# ------------------------------------------------------------------------------------------ base_url (item 5)


# Regression (issue 19 item 5): `;token=`, `#token=`, `?sessionid=` were accepted and written to dvc.lock.
def test_base_url_credentials_table() -> None:
    refused = ["http://h/v1;token=abc", "http://h/v1/;jsessionid=abc", "http://h/v1#token=abc",
               "http://h/v1#access_token=abc&x=1", "http://h/v1?sessionid=abc", "http://h/v1?session=abc",
               "http://h/v1?sig=abc", "http://h/v1?api_key=abc", "http://h/v1?apikey=abc", "http://h/v1?token=abc",
               "http://h/v1?X-Amz-Signature=abc", "http://h/v1?X-Goog-Credential=abc", "http://h/v1?auth=abc",
               "http://h/v1?%74oken=abc", "http://h/v1?jwt=abc", "http://h/v1?password=abc",
               "http://user:pass@h/v1", "http://tok@h/v1", "http://h;token=abc/v1", "http://h/v1/sk-abcdefghijklmnopqrst"]
    accepted = ["http://h/v1", "https://api.openai.com/v1", "http://h/v1?api-version=2024-02-01",
                "http://h/v1?max_tokens=5", "http://[::1]:8000/v1", "http://h/v1#section", "http://h/v1;v=2"]
    wrong = []
    for url in refused:
        try:
            OpenAIConfig(backend="openai", base_url=url, model="m")
            wrong.append(("accepted", url))
        except ValidationError as e:
            msg = e.errors()[0]["msg"]  # what kd shows (kd.config.errors): never pydantic's input_value
            if "credentials in a URL are refused" not in msg or "abc" in msg:
                wrong.append(("message", url, msg))
    for url in accepted:
        try:
            OpenAIConfig(backend="openai", base_url=url, model="m")
        except ValidationError as e:
            wrong.append(("refused", url, str(e)))
    assert wrong == []


# ------------------------------------------------------------------------------------------ echoed keys (item 4)


def a_key(rng: random.Random) -> str:
    """A key of no well-known shape (so only knowing its value can scrub it), with `/`, `+`, `-` in it."""
    return "".join(rng.choice(string.ascii_letters) for _ in range(4)) + "-" + \
        "".join(rng.choice(KEY_CHARS) for _ in range(rng.randint(20, 48))) + "/+x"


def encodings(key: str, rng: random.Random) -> dict[str, str]:
    """The key as servers echo it; each is valid inside a JSON string literal (it goes into a body raw)."""

    def mixed() -> str:  # split by escaping: each character plain, \\u-escaped or percent-encoded
        forms = (lambda c: c, lambda c: f"\\u{ord(c):04x}", lambda c: f"%{ord(c):02X}", lambda c: f"%{ord(c):02x}")
        return "".join(rng.choice(forms)(c) for c in key)

    quoted = urllib.parse.quote(key, safe="")
    return {
        "raw": key,
        "json slash": json.dumps(key)[1:-1].replace("/", "\\/"),
        "json unicode": "".join(f"\\u{ord(c):04x}" for c in key),
        "json unicode upper": "".join(f"\\u{ord(c):04X}" for c in key),
        "json twice": json.dumps(json.dumps(key))[1:-1],
        "mixed": mixed(),
        "mixed again": mixed(),
        "percent": quoted,
        "percent lower": "".join(f"%{b:02x}" for b in key.encode()),
        "percent all upper": "".join(f"%{b:02X}" for b in key.encode()),
        "percent plus": urllib.parse.quote_plus(key),
        "percent twice": urllib.parse.quote(quoted, safe=""),
        "base64": base64.b64encode(key.encode()).decode(),
        "base64 urlsafe": base64.urlsafe_b64encode(key.encode()).decode(),
        "base64 unpadded": base64.b64encode(key.encode()).decode().rstrip("="),
        "basic auth": base64.b64encode(f"user:{key}".encode()).decode(),
        "basic auth 2": base64.b64encode(f"ab:{key}".encode()).decode(),
        "basic auth urlsafe": base64.urlsafe_b64encode(f"u:{key}".encode()).decode(),
        "hex": key.encode().hex(),
        "html": "".join(f"&#{ord(c)};" if rng.random() < 0.5 else f"&#x{ord(c):x};" for c in key),
    }


def leaks(text: str, key: str, forms: dict[str, str]) -> list[str]:
    """Which encodings of `key` (the raw key included) are in `text`."""
    return [name for name, form in {"key": key, **forms}.items() if form in text]


# Regression (issue 19 item 4): only the raw key was scrubbed; escaped echoes reached the terminal and files.
def test_fuzz_every_encoding_of_a_known_key_is_redacted() -> None:
    rng = random.Random(19)
    for _ in range(12):
        key = a_key(rng)
        kd.secrets.remember(key)  # what kd.runtime.openai does with the key it reads
        for name, form in encodings(key, rng).items():
            before = rng.choice(["", "error: ", '{"message": "Incorrect API key provided: '])
            after = rng.choice(["", ".", " end", '"}'])
            out = redact(before + form + after)
            assert form not in out and key not in out, (name, key, out)
    from kd.tracking import loggable_params
    from kd.tracking import redact as redact_tags

    key = a_key(rng)
    kd.secrets.remember(key)
    forms = encodings(key, rng)
    logged = {**loggable_params({"note": dict(forms)}), **redact_tags({f"tag.{k}": v for k, v in forms.items()})}
    assert leaks(json.dumps(logged), key, forms) == []


def labeling_project(root: Path, url: str, limit: int) -> Path:
    """prompts/, seeds/ and params.yaml: one openai teacher (key in KD_HOSTILE_KEY), one labeling dataset `qa`."""
    import shutil

    root.mkdir(parents=True)
    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, root / d)
    params = {"project": "kd-test",
              "teachers": {"fake": {"backend": "openai", "base_url": url, "model": "fake",
                                    "api_key_env": "KD_HOSTILE_KEY", "concurrency": 4, "timeout_s": 5,
                                    "max_attempts": 2, "backoff_s": 0.01, "backoff_max_s": 0.02}},
              "datasets": {"qa": {"method": "labeling", "teacher": "fake",
                                  "inputs": [{"seeds": "seeds/instructions.jsonl", "limit": limit}],
                                  "template": "prompts/labeling/explain.jinja",
                                  "sampling": {"temperature": 0.0, "max_tokens": 64}}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_stage(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The labeling stage of `qa`, in this process (kd.stage.run: one-line errors, exit codes); (exit, output)."""
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label
    from kd.stage import run

    code = 0
    try:
        run(lambda: build_dataset("qa", "labeling", label, root))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def cycling(forms: list[str]) -> Callable[[Any], str]:
    """A thread-safe echo that gives the next form on each call (the fake server answers on several threads)."""
    lock, it = threading.Lock(), itertools.cycle(forms)

    def echo(_: Any) -> str:
        with lock:
            return next(it)

    return echo


# Regression (issue 19 item 4): a 400 "context length" echoing the key JSON-escaped or percent-encoded put it into
# data/<name>/rejected.jsonl, a DVC output; an answer echoing it went into the cache and the records.
def test_echoed_key_reaches_no_file_and_no_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(4)
    key = a_key(rng)
    forms = encodings(key, rng)
    monkeypatch.setenv("KD_HOSTILE_KEY", key)
    monkeypatch.chdir(tmp_path)
    echo = cycling(list(forms.values()))
    n = len(forms)
    with FakeOpenAI(api_key=key, faults=["context"] * n, echo=echo,
                    answer=lambda messages: "Your key is " + echo(None)) as server:
        root = labeling_project(tmp_path / "p", server.url, limit=2 * n)
        code, printed = run_stage(root, capsys)
    assert code == 0, printed
    rejected = [json.loads(line) for line in (root / "data" / "qa" / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["too_long"] * n and all("***" in r["error"] for r in rejected)
    assert all(r["error"].startswith("HTTP 400: {") for r in rejected)
    records = [json.loads(line) for line in (root / "data" / "qa" / "records.jsonl").read_text().splitlines()]
    assert len(records) == n and all("Your key is" in json.dumps(r) for r in records)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(".kd" in p.parts for p in files)  # the cache was written
    found = {str(p.relative_to(root)): leaks(p.read_bytes().decode("utf-8", "replace"), key, forms) for p in files}
    found.update({"rejected errors": leaks("".join(r["error"] for r in rejected), key, forms),
                  "terminal": leaks(printed, key, forms)})
    assert {k: v for k, v in found.items() if v} == {}


# Regression (issue 19 item 4): a 401 echoing the key escaped printed it on the terminal.
def test_key_echoed_on_401_is_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(401)
    key = a_key(rng)
    forms = encodings(key, rng)
    monkeypatch.setenv("KD_HOSTILE_KEY", key)
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI(api_key="the-right-key-is-another-one", echo=cycling(list(forms.values()))) as server:
        cfg = OpenAIConfig(backend="openai", base_url=server.url, model="fake", api_key_env="KD_HOSTILE_KEY",
                           max_attempts=1)
        teacher = OpenAITeacher("fake", cfg)
        request = {"backend": "openai", "teacher": teacher.identity, "messages": [{"role": "user", "content": "hi"}],
                   "sampling": Sampling(max_tokens=8).model_dump(), "sample_index": 0, "response_format": None}
        for name in forms:
            with pytest.raises(TeacherError) as err:
                teacher.generate([(request_key(request), request)], lambda k, r: None)
            assert leaks(str(err.value), key, forms) == [], name
        root = labeling_project(tmp_path / "p", server.url, limit=1)
        code, printed = run_stage(root, capsys)
    assert code == 2 and "HTTP 401" in printed and leaks(printed, key, forms) == []
    assert [line for line in printed.splitlines() if line.startswith("kd: error:")] == printed.splitlines()[-1:]


# ------------------------------------------------------------------------------------------ bad numbers (item 13)


# Regression (issue 19 item 13): a non-ASCII key in the environment ended in an h11 traceback.
def test_a_non_ascii_key_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("clé-ünicode-0123456789", "line\nbreak-0123456789", "ключ-0123456789abcdef"):
        monkeypatch.setenv("KD_HOSTILE_KEY", value)
        cfg = OpenAIConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env="KD_HOSTILE_KEY")
        with pytest.raises(KdError) as err:
            OpenAITeacher("fake", cfg)
        msg = str(err.value)
        assert msg.startswith("teachers.fake.api_key_env: environment variable KD_HOSTILE_KEY holds characters")
        assert "\n" not in msg and value not in msg


def ask_once(server: FakeOpenAI, max_tokens: int = 64, n: int = 1) -> list[dict[str, Any]]:
    cfg = OpenAIConfig(backend="openai", base_url=server.url, model="fake", api_key_env=None, max_attempts=2,
                       backoff_s=0.01, timeout_s=10)
    teacher = OpenAITeacher("fake", cfg)
    items = []
    for i in range(n):
        request = {"backend": "openai", "teacher": teacher.identity,
                   "messages": [{"role": "user", "content": f"question {i}"}],
                   "sampling": Sampling(max_tokens=max_tokens).model_dump(), "sample_index": 0, "response_format": None}
        items.append((request_key(request), request))
    answers: dict[str, dict[str, Any]] = {}
    teacher.generate(items, answers.__setitem__)
    return [answers[k] for k, _ in items]


# Regression (issue 19 item 13): `usage.prompt_tokens: 1e400` made the stage exit 1 with an OverflowError traceback.
# Usage only prices the build and the answer is fine: a number that is not a count is counted as 0, with a warning.
def test_usage_that_is_not_a_count_is_counted_as_zero(capsys: pytest.CaptureFixture[str]) -> None:
    for usage, expect in (('{"prompt_tokens": 1e400, "completion_tokens": 3}', {"prompt_tokens": 0, "completion_tokens": 3}),
                          ('{"prompt_tokens": -5, "completion_tokens": 2.0}', {"prompt_tokens": 0, "completion_tokens": 2}),
                          ('{"prompt_tokens": "lots", "completion_tokens": 1e30}', {"prompt_tokens": 0, "completion_tokens": 0}),
                          ('{"prompt_tokens": NaN, "completion_tokens": true}', {"prompt_tokens": 0, "completion_tokens": 0}),
                          ('[1, 2]', {"prompt_tokens": 0, "completion_tokens": 0})):
        with FakeOpenAI(usage_json=usage) as server:
            answers = ask_once(server, n=2)
        assert [a["usage"] for a in answers] == [expect] * 2, usage
        assert all(type(v) is int for a in answers for v in a["usage"].values())  # what the cache accepts
        assert answers[0]["text"].startswith("Answer: ")
        warned = [line for line in capsys.readouterr().err.splitlines() if "not a token count" in line]
        assert len(warned) == (0 if usage == "[1, 2]" else 1), usage  # once per teacher, not per answer


# Regression (issue 19 item 16): a 60 MB answer to `max_tokens: 64` was read whole and kept (120 MB in records and
# cache). An answer over 32 characters a token of max_tokens is the rejection `oversized_answer`; a body over the
# cap is not read further; a huge error body is not read whole either.
def test_oversized_answers_are_rejections_and_bodies_are_bounded(tmp_path: Path) -> None:
    from kd.runtime.ask import verdict

    with FakeOpenAI(answer=lambda m: "x" * (32 * 64 + 1)) as server:
        over = ask_once(server)[0]
    assert over["finish_reason"] == "oversized_answer" and over["text"] == "" and verdict(over, False) == "oversized_answer"
    with FakeOpenAI(answer=lambda m: "x" * (32 * 64)) as server:  # at the limit: kept
        assert ask_once(server)[0]["finish_reason"] == "stop"
    huge = "y" * 60_000_000
    with FakeOpenAI(answer=lambda m: huge) as server:
        start = time.monotonic()
        answer = ask_once(server)[0]
        took = time.monotonic() - start
    assert answer["finish_reason"] == "oversized_answer" and "not read further" in answer["error"]
    assert took < 5, took
    with FakeOpenAI(api_key="k" * 20, echo=lambda got: "z" * 30_000_000) as server, \
            pytest.raises(TeacherError) as err:  # a 30 MB 401 body
        ask_once(server)
    assert len(str(err.value)) < 600 and "HTTP 401" in str(err.value)


# Regression (issue 19 item 16): through the Batch API too, an answer far beyond max_tokens was kept.
def test_oversized_batch_answers_are_rejections(tmp_path: Path) -> None:
    from kd.runtime.batch import BatchTeacher

    with FakeOpenAI(answer=lambda m: "x" * (32 * 64 + 1) if "0" in m[-1]["content"] else "fine") as server:
        server.batch_polls = 0
        cfg = OpenAIConfig(backend="openai", base_url=server.url, model="fake", api_key_env=None, mode="batch",
                           poll_s=0.01, poll_max_s=0.01, backoff_s=0.01)
        teacher = BatchTeacher("fake", cfg, tmp_path)
        items = []
        for i in range(2):
            request = {"backend": "openai", "teacher": teacher.identity,
                       "messages": [{"role": "user", "content": f"question {i}"}],
                       "sampling": Sampling(max_tokens=64).model_dump(), "sample_index": 0, "response_format": None}
            items.append((request_key(request), request))
        answers: dict[str, dict[str, Any]] = {}
        teacher.generate(items, answers.__setitem__)
    assert [answers[k]["finish_reason"] for k, _ in items] == ["oversized_answer", "stop"]
