"""The service's own pages in a real headless browser (Debian's Chromium, driven by Playwright):
the docs page at / runs its examples against `bentoml serve`, the playground classifies with
probability bars and highlighted n-grams, streams a continuation, finds a word's neighbours and
reads a digit drawn on its canvas. Every request the browser makes is recorded: none may leave
the server (the pages work offline), and none may fail.

TEXTSERVE_SCREENSHOT_DIR=docs writes the playground's screenshots there (docs/playground.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.conftest import REPOSITORY, ZOO
from tests.serving import free_port, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TEXTSERVE_REQUIRE_DEPLOY_TOOLS"),
                                reason="no chromium here (apt-get install chromium; .ci/run installs it)")
MODELS = ("kim-cnn-trec6", "lstm-trec6", "char-lm-small-ptb", "digits-cnn")
TIMEOUT_MS = 30_000


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    for name in MODELS:
        shutil.copytree(ZOO / name, zoo / name)
    with running_server(tmp_path_factory.mktemp("pages"), zoo, grpc_port=str(GRPC_PORT)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    """A page whose every request is recorded; any to another host is aborted (and fails the test)."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    opened = context.new_page()
    opened.requests, opened.elsewhere, opened.failures = [], [], []

    def only_this_server(route):
        if route.request.url.startswith(server):
            opened.requests.append(route.request.url)
            return route.continue_()
        opened.elsewhere.append(route.request.url)
        return route.abort()

    opened.route("**/*", only_this_server)
    opened.on("pageerror", lambda error: opened.failures.append(str(error)))
    opened.on("console", lambda message: message.type == "error" and opened.failures.append(message.text))
    yield opened
    assert opened.elsewhere == [], f"the page fetched from elsewhere: {opened.elsewhere}"
    assert opened.failures == [], opened.failures
    context.close()


def test_the_docs_page_is_ours_and_fetches_nothing_from_the_internet(server):
    answer = requests.get(f"{server}/", timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    text = answer.text
    assert "<title>textserve 0.1.0: API</title>" in text
    for foreign in ("BentoML Team", "googletagmanager", "created with BentoML", "swagger-ui"):
        assert foreign not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "a link or script from another host"
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    for route in ("/classify", "/explain", "/lm/generate", "/lm/neighbors", "/v2/models/{name}/infer", "/v2/repository/index"):
        assert f"<code>{route}</code>" in text
    assert requests.get(f"{server}/docs", timeout=10).text == text  # FastAPI's CDN-bound /docs is gone: the same page
    assert "No example here" not in text  # every kind of model is loaded: every route has its example


def test_the_openapi_document_carries_the_real_examples(server):
    document = requests.get(f"{server}/openapi.json", timeout=10).json()
    classify = document["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert classify == {"model": "kim-cnn-trec6", "texts": ["How far is it from Denver to Aspen ?", "Who wrote Hamlet ?"]}
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["example"]["inputs"][0]["datatype"] == "BYTES"
    assert next(p for p in infer["parameters"] if p["name"] == "name")["example"] == "kim-cnn-trec6"
    assert document["info"]["version"] == "0.1.0"


def run_example(page, section: str) -> str:
    example = page.locator(f"#{section} .example")
    example.locator("button").click()
    page.wait_for_selector(f"#{section} .example[data-status]", timeout=TIMEOUT_MS)
    assert example.get_attribute("data-status") == "200", example.locator(".response").inner_text()
    return example.locator(".response").inner_text()


def test_the_docs_page_runs_its_examples_in_a_browser(page, server):
    page.goto(f"{server}/")
    assert page.title() == "textserve 0.1.0: API"
    classified = run_example(page, "post-classify")
    assert '"label": "NUM"' in classified and '"label": "HUM"' in classified
    page.locator("#post-classify").scroll_into_view_if_needed()
    screenshot(page, "docs-page.png", full_page=False)
    inferred = run_example(page, "post-v2-models-name-infer")
    assert '"name": "label"' in inferred and "NUM" in inferred
    assert '"prefix_tokens"' in run_example(page, "post-lm-generate")
    assert '"name": "probabilities"' in run_example(page, "post-v2-models-name-versions-version-infer")
    assert '"state": "READY"' in run_example(page, "post-v2-repository-index")
    assert '"max_batch_size": 256' in run_example(page, "get-v2-models-name-config")
    assert '"inference_stats"' in run_example(page, "get-v2-models-stats")
    # the curl lines name the server the page came from, not make serve's default address
    assert page.locator("#post-classify pre.curl").text_content().startswith(f"curl -s {server}/classify -d ")
    assert all(url.startswith(server) for url in page.requests)


def screenshot(page, name: str, full_page: bool = True) -> None:
    folder = os.environ.get("TEXTSERVE_SCREENSHOT_DIR")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=full_page)


def test_the_playground_classifies_with_bars_and_the_ngrams_that_decided(page, server):
    page.goto(f"{server}/playground")
    assert page.locator("#model option:checked").inner_text() == "kim-cnn-trec6"
    page.click("#classify")
    page.wait_for_selector("#classified[data-done]", timeout=TIMEOUT_MS)
    results = page.locator("#classified .result")
    assert results.count() == 3
    assert [results.nth(i).get_attribute("data-label") for i in range(3)] == ["NUM", "HUM", "ABBR"]
    assert results.nth(0).locator(".bar").count() == 6  # one bar per TREC class, the winner first
    assert results.nth(0).locator(".bar").first.get_attribute("data-label") == "NUM"
    assert results.nth(0).locator("mark").count() >= 1 and results.nth(0).locator(".ngram").count() == 4
    screenshot(page, "playground.png")
    # An LSTM cannot explain: no highlight offered, bars still drawn.
    page.select_option("#model", label="lstm-trec6")
    assert page.locator("#explain").is_hidden()
    page.click("#classify")
    page.wait_for_selector("#classified[data-done]", timeout=TIMEOUT_MS)
    assert page.locator("#classified mark").count() == 0 and page.locator("#classified .bar").count() == 18


def test_the_playground_streams_a_continuation_and_finds_neighbours(page, server):
    page.goto(f"{server}/playground")
    page.select_option("#model", label="char-lm-small-ptb")
    page.fill("#words", "12")
    page.click("#generate")
    page.wait_for_selector("#continuation[data-done]", timeout=TIMEOUT_MS)
    assert page.locator("#continuation").get_attribute("data-done") == "12"
    assert len(page.locator("#continuation").inner_text().split()) == 3 + 12  # the prefix's three words, then twelve
    page.click("#neighbors")
    page.wait_for_selector("#nearest[data-done]", timeout=TIMEOUT_MS)
    assert "look" in page.locator("#nearest li").first.inner_text()  # Table 6 of Kim et al.: looooook -> look
    screenshot(page, "playground-lm.png")


def test_the_playground_reads_a_digit_drawn_on_its_canvas(page, server):
    page.goto(f"{server}/playground")
    page.select_option("#model", label="digits-cnn")
    box = page.locator("#pad").bounding_box()
    strokes = [[(40, 30), (150, 30), (100, 170)]]  # a 7: the bar, then the stem
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=12)
        page.mouse.up()
    page.click("#read")
    page.wait_for_selector("#digit[data-label]", timeout=TIMEOUT_MS)
    assert page.locator("#digit").get_attribute("data-label") == "7"
    assert page.locator("#digit .bar").count() == 10
    screenshot(page, "playground-digit.png")


def test_bentomls_own_clients_discover_and_call_the_json_api(server):
    import asyncio
    import concurrent.futures

    import bentoml
    from bentoml.exceptions import BentoMLException

    with bentoml.SyncHTTPClient(server) as client:
        answer = client.classify(model="kim-cnn-trec6", texts=["Who wrote Hamlet ?", "How far is it from Denver to Aspen ?"])
        assert [result["label"] for result in answer["results"]] == ["HUM", "NUM"]
        explained = client.explain(model="kim-cnn-trec6", texts=["Who wrote Hamlet ?"], top_k=2)
        assert explained["results"][0]["label"] == "HUM" and len(explained["results"][0]["ngrams"]) == 2
        neighbours = client.lm_neighbors(model="char-lm-small-ptb", words=["looooook"], top_k=1)
        assert neighbours["results"][0]["neighbors"][0]["word"] == "look"
        assert client.classify_image(model="digits-cnn", images=[docs_seven()])["results"][0]["label"] == "7"
        with pytest.raises(BentoMLException, match="unknown model 'nope'"):
            client.classify(model="nope", texts=["x"])
        with pytest.raises(TypeError, match="Missing required arguments in endpoint classify"):
            client.classify(model="kim-cnn-trec6")

    async def asynchronously():
        async with bentoml.AsyncHTTPClient(server) as client:
            return await client.lm_score(model="char-lm-small-ptb", texts=["the company said"])

    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # Playwright's loop runs in this thread
        scored = thread.submit(asyncio.run, asynchronously()).result(timeout=60)
    assert [token["token"] for token in scored["results"][0]["tokens"]] == ["the", "company", "said", "<eos>"]


def docs_seven() -> str:
    import base64

    return base64.b64encode((REPOSITORY / "docs" / "examples" / "seven.png").read_bytes()).decode()


def readme_curl_lines() -> list[str]:
    """The README's and docs' curl calls of this server's models (the own-model example's run in
    test_own_model.py; a line with a shell variable needs a key this server does not have)."""
    lines = []
    for document in (REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))):
        for line in document.read_text().splitlines():
            if line.startswith("curl -s localhost:3000") and "my-trec6" not in line and "$" not in line:
                lines.append(re.sub(r"\s+#\s.*$", "", line))
    return lines


def test_every_curl_line_of_the_readme_and_docs_answers_as_its_comment_says(server):
    import json
    import subprocess

    lines = readme_curl_lines()
    assert len(lines) >= 6
    for line in lines:
        done = subprocess.run(["bash", "-c", line.replace("localhost:3000", server.removeprefix("http://"))],
                              cwd=REPOSITORY, capture_output=True, text=True, timeout=60)
        answer = json.loads(done.stdout)
        assert done.returncode == 0 and "error" not in answer, (line, done.stdout[:500])
    labels = {line.split("/")[1].split()[0]: json.loads(subprocess.run(
        ["bash", "-c", line.replace("localhost:3000", server.removeprefix("http://"))], cwd=REPOSITORY,
        capture_output=True, text=True, timeout=60).stdout) for line in lines if "/classify" in line}
    assert labels["classify"]["results"][0]["label"] == "NUM" and labels["classify-image"]["results"][0]["label"] == "7"


def test_the_readmes_sample_neighbours_are_what_the_service_answers(server):
    readme = (REPOSITORY / "README.md").read_text()
    call = re.search(r"^(curl -s localhost:3000/lm/neighbors .*)\n# (.*)\n#(.*)$", readme, re.M)
    assert call, "README.md lost its /lm/neighbors sample"
    shown = call.group(2) + call.group(3)
    words = re.findall(r'\{"word":"(\w+)"', shown.split('"neighbors":', 1)[1])
    first_cosine = float(re.search(r'"cosine":([\d.]+)', shown).group(1))
    body = json.loads(re.search(r"-d '(.*)'", call.group(1)).group(1))
    answer = requests.post(f"{server}/lm/neighbors", json=body, timeout=30).json()
    neighbours = answer["results"][0]["neighbors"]
    assert [n["word"] for n in neighbours] == words
    assert round(neighbours[0]["cosine"], 3) == first_cosine


def test_the_readmes_python_clients_run_as_written(server):
    import subprocess
    import sys

    block = re.search(r"### Clients that work unmodified.*?```python\n(.*?)```", (REPOSITORY / "README.md").read_text(), re.S)
    assert block, "README.md lost its clients example"
    code = block.group(1).replace("http://127.0.0.1:3000", server).replace("127.0.0.1:8001", f"127.0.0.1:{GRPC_PORT}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["HUM", "[b'NUM']"]
