"""`kd view`: every page answers over a small built project; data is shown as text, URLs stay inside the
project, nothing is writable, unknown ids are 404 pages; the index pages and searches without reading the
dataset into Python."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from viewproject import SCRIPT, shared_view_project

from kd.view import index as view_index
from kd.view.app import create_app
from kd.view.index import VIEW_DIR


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_view_project(tmp_path_factory)


@pytest.fixture(scope="module")
def client(project: Path) -> TestClient:
    # the pipeline page's forecast runs in a worker process: wait for it (a real page shows "computing…" after 5 s)
    return TestClient(create_app(project, wait_s=120), base_url="http://127.0.0.1", raise_server_exceptions=False)


def rows(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "data" / name / "records.jsonl").read_text().splitlines()]


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


# every page a user opens answers 200 and shows what it is about
def test_each_page_answers(project, client):
    qa = rows(project, "qa")
    derived = rows(project, "derived")[0]
    pages = {
        "/": ["qa", "derived", "will run", "new requests"],
        "/data/qa": [qa[0]["id"][:12], "length : 1"],
        "/data/qa/rejected": ["a raw answer cut"],
        f"/data/derived/{derived['id']}": ["Parent", "qa:", "seeds/instructions.jsonl:"],
        "/seed?file=seeds/instructions.jsonl&id=math-001": ["What is 15% of 240?"],
        "/diff": ["workspace"],
        "/diff?dataset=qa&a=HEAD~1&b=HEAD": ["template prompts/labeling/explain.jinja", "one step per line"],
        "/models": ["student_sft", "rouge_l", "student_sft says math-001"],
        "/models/student_sft": ["Training curve", "matches today's manifest", "stale"],
    }
    for url, wanted in pages.items():
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:500])
        for w in wanted:
            assert w in text(r.text), (url, w)


# the pipeline page shows kd status's forecast for the stale generation stage (what `kd status` prints)
def test_pipeline_shows_the_forecast(client):
    page = text(client.get("/").text)
    assert re.search(r"qa dataset data/qa will run .*datasets\.qa.* 4 0 \d+ \d+", page), page


# a record whose text is <script>…</script> is shown as text, never as markup (and no page carries a script)
def test_script_in_data_is_escaped(project, client):
    rec = next(r for r in rows(project, "qa") if r["completion"][0]["content"] == SCRIPT)
    for url in (f"/data/qa/{rec['id']}", "/data/qa", "/models/student_sft"):
        html = client.get(url).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html, url
    r = client.get("/data/qa")
    assert "script-src 'none'" in r.headers["content-security-policy"]


# URLs cannot reach files outside the project (or its hidden directories)
@pytest.mark.parametrize("url", ["/seed?file=../../../etc/passwd&id=x", "/seed?file=/etc/passwd&id=root",
                                 "/seed?file=.kd/x.jsonl&id=x", "/data/..%2F..%2Fetc", "/static/../app.py",
                                 "/static/%2e%2e/app.py", "/models/..%2Fdata"])
def test_paths_outside_the_project_are_refused(client, url):
    r = client.get(url)
    assert r.status_code == 404 and "root:" not in r.text and "Traceback" not in r.text


# unknown ids and names give a 404 page, not a traceback; a bad revision is a one-line 400 page
def test_unknown_ids_are_404_pages(client):
    for url in ("/data/qa/" + "0" * 64, "/data/qa/not-hex", "/data/nope", "/models/nope", "/nope",
                "/seed?file=seeds/instructions.jsonl&id=nope", "/diff?dataset=nope"):
        r = client.get(url)
        assert r.status_code == 404 and "<h1>404" in r.text and "Traceback" not in r.text, url
    r = client.get("/diff?dataset=qa&a=--output=/tmp/x")
    assert r.status_code == 400 and "not a git revision" in r.text
    r = client.get("/diff?dataset=qa&a=nosuchrev")
    assert r.status_code == 400 and "nosuchrev: not a git revision" in r.text


# nothing is writable: every route answers GET only
def test_no_write_routes(project, client):
    before = sorted(p.relative_to(project) for p in project.rglob("*") if ".git" not in p.parts)
    for url in ("/", "/data/qa", "/diff", "/models", "/seed"):
        for method in ("post", "put", "delete", "patch"):
            assert getattr(client, method)(url).status_code == 405, (method, url)
    after = sorted(p.relative_to(project) for p in project.rglob("*") if ".git" not in p.parts)
    assert before == after
    assert all(set(getattr(r, "methods", None) or {"GET"}) <= {"GET", "HEAD"} for r in client.app.routes)


# a page asked for through another Host name (DNS rebinding) is refused
def test_only_loopback_hosts(project):
    assert TestClient(create_app(project), base_url="http://evil.example").get("/").status_code == 400


# text search, category/seed/parent filters and rejection reasons narrow the records
def test_search_and_filters(project, client):
    qa = rows(project, "qa")
    math = [r["id"][:12] for r in qa if r["category"] == "math"]
    page = text(client.get("/data/qa?category=math").text)
    assert all(i in page for i in math) and "2 matching" in page
    page = text(client.get("/data/qa?q=reverse+a+str*").text)  # every word; `str*`: any word starting so
    assert "1 matching" in page and "Reverse a string" in page
    assert "0 matching" in text(client.get("/data/qa?q=reverse+a+str").text)
    assert "0 matching" in text(client.get("/data/qa?q=%22%29%28*").text)  # FTS5 syntax is never passed through
    assert "1 matching" in text(client.get("/data/qa?seed=seeds/instructions.jsonl:code-001").text)
    parent = rows(project, "derived")[0]["provenance"]["parents"][0]
    assert "1 matching" in text(client.get(f"/data/derived?parent=qa:{parent['id']}").text)
    assert "1 rejected" in text(client.get("/data/qa/rejected?reason=length").text)


# a failure inside a page is a 500 page naming no internals; the details go to the terminal
def test_a_crash_is_a_page_not_a_traceback(project, monkeypatch, capsys):
    from kd.view import pages

    monkeypatch.setattr(pages, "evaluation", lambda root: 1 / 0)
    r = TestClient(create_app(project), base_url="http://127.0.0.1", raise_server_exceptions=False).get("/models")
    assert r.status_code == 500 and "ZeroDivisionError" not in r.text and "Traceback" not in r.text
    assert "ZeroDivisionError" in capsys.readouterr().err


# the record page's lookups (kd audit) still find records written in the compact JSON form, and an empty records
# file maps to no bytes rather than failing (both changed with the 1M-record benchmark)
def test_record_lookups_after_the_speedups(tmp_path):
    from kd.provenance.audit import mapped
    from kd.provenance.lineage import find_by_id

    compact = b'{"id":"abcd1234","x":1}\n{"id":"abce","x":2}\n'
    assert [r["x"] for r in find_by_id(compact, "abcd")] == [1]
    spaced = b'{"id": "abcd1234", "provenance": {"parents": [{"id": "abcd9999"}]}}\n'
    assert [r["id"] for r in find_by_id(spaced, "abcd")] == ["abcd1234"]
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "one.jsonl").write_bytes(spaced)
    assert mapped(tmp_path / "empty.jsonl") == b"" and mapped(tmp_path / "missing.jsonl") == b""
    assert find_by_id(mapped(tmp_path / "one.jsonl"), "abcd")[0]["id"] == "abcd1234"


# the index is built once per fingerprint under .kd/view/ and rebuilt when the dataset changes
def test_index_follows_the_fingerprint(project, tmp_path, monkeypatch):
    calls = []
    real = view_index.build
    monkeypatch.setattr(view_index, "build", lambda *a: (calls.append(a), real(*a))[1])
    for p in (project / VIEW_DIR).glob("qa-*"):
        p.unlink()
    for _ in range(2):
        view_index.DatasetIndex.open(project, project / "data/qa").close()
    assert len(calls) == 1
    copy = tmp_path / "p"
    (copy / "data").mkdir(parents=True)
    from kd.records import write_dataset

    write_dataset(copy / "data/qa", "qa", "labeling", rows(project, "qa")[:2], [], {}, None)
    first = view_index.DatasetIndex.open(copy, copy / "data/qa")
    assert first.records().total == 2
    write_dataset(copy / "data/qa", "qa", "labeling", rows(project, "qa")[:3], [], {}, None)
    again = view_index.DatasetIndex.open(copy, copy / "data/qa")
    assert again.records().total == 3 and again.path != first.path and len(calls) == 3


# `kd view` binds 127.0.0.1 by default, and says so when asked for another address
def test_binds_loopback_by_default_and_warns_otherwise(project, monkeypatch, capsys):
    import uvicorn

    from kd.cli.main import main

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.append((host, port)))
    for argv in (["view"], ["view", "--host", "0.0.0.0", "--port", "9001"]):
        with pytest.raises(SystemExit) as e:
            main(["--root", str(project), *argv])
        assert e.value.code == 0
    out = capsys.readouterr()
    assert seen == [("127.0.0.1", 8765), ("0.0.0.0", 9001)]
    assert "http://127.0.0.1:8765/" in out.out
    assert out.err.count("not 127.0.0.1") == 1 and "no login" in out.err


# --- browser tests: `kd view` in a subprocess, driven by headless Chromium (Debian's chromium + chromium-driver)

CHROMEDRIVER = next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).is_file()), None)
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


@pytest.fixture(scope="module")
def browser(project: Path, tmp_path_factory: pytest.TempPathFactory):
    if CHROMEDRIVER is None:
        pytest.skip("chromium-driver is not installed (apt-get install chromium chromium-driver; CI installs it)")
    import socket
    import subprocess
    import sys
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "kd.cli", "--root", str(project), "view", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:  # the server is up once it answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.stdout else ""
            time.sleep(0.1)
    shots = tmp_path_factory.mktemp("screenshots")
    yield driver, base, shots
    driver.quit()
    server.terminate()
    server.wait(10)


def shot(driver, shots: Path, name: str) -> Path:
    from selenium.webdriver.common.by import By

    height = driver.find_element(By.TAG_NAME, "body").size["height"]
    driver.set_window_size(1280, min(max(height + 40, 600), 2400))
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


# a person opens each page, follows a record's lineage to its seed row, opens a diff, and sees <script> as text
def test_browser_walks_the_pages(browser, project):
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver, base, shots = browser
    driver.get(base + "/")  # the forecast is computed in the background; the page reloads itself until it is there
    WebDriverWait(driver, 60).until(lambda d: "will run" in d.find_element(By.TAG_NAME, "main").text)
    shot(driver, shots, "pipeline")
    driver.find_element(By.LINK_TEXT, "data/derived").click()
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Dataset derived")
    shot(driver, shots, "dataset")
    driver.find_element(By.CSS_SELECTOR, "td.mono a").click()  # the first record
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Record derived:")
    driver.find_element(By.CSS_SELECTOR, ".lineage h3 a").click()  # up to its parent in qa
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Record qa:")
    record_png = shot(driver, shots, "record")
    driver.find_element(By.PARTIAL_LINK_TEXT, "seeds/instructions.jsonl:").click()  # up to the seed row
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Seed row seeds/instructions.jsonl:")
    shot(driver, shots, "seed")

    html = next(r for r in rows(project, "qa") if r["completion"][0]["content"] == SCRIPT)
    driver.get(f"{base}/data/qa/{html['id']}")
    assert SCRIPT in driver.find_element(By.TAG_NAME, "main").text  # shown as text; no alert opened
    assert driver.execute_script("return document.querySelectorAll('main script').length") == 0

    driver.get(base + "/diff")
    Select(driver.find_element(By.NAME, "dataset")).select_by_visible_text("qa")
    Select(driver.find_element(By.NAME, "a")).select_by_index(1)  # v1
    Select(driver.find_element(By.NAME, "b")).select_by_index(1)  # v2 (HEAD)
    driver.find_element(By.CSS_SELECTOR, "form button").click()
    main = driver.find_element(By.TAG_NAME, "main").text
    assert "template prompts/labeling/explain.jinja" in main and "one step per line" in main
    assert driver.find_elements(By.CSS_SELECTOR, "table.diff td.add")
    diff_png = shot(driver, shots, "diff")

    driver.get(base + "/models")
    assert "student_sft says math-001" in driver.find_element(By.TAG_NAME, "main").text
    shot(driver, shots, "models")
    driver.find_element(By.LINK_TEXT, "student_sft").click()
    assert driver.find_elements(By.CSS_SELECTOR, "svg polyline")
    shot(driver, shots, "model")
    driver.get(base + "/data/qa/" + "0" * 64)
    assert "404" in driver.find_element(By.TAG_NAME, "h1").text
    if os.environ.get("KD_VIEW_README_SHOTS"):  # refresh the README's two (not on every run: they would differ)
        shutil.copy(record_png, DOCS_IMG / "view-record.png")
        shutil.copy(diff_png, DOCS_IMG / "view-diff.png")
