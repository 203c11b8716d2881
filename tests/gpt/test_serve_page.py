"""The page at GET /, in a real headless browser (Debian's chromium, driven by selenium through
chromium-driver; .ci/run installs both): it loads from the server, a prompt is typed and
submitted, the text streams in (several updates, not one), it is the text the API gives
for the same seed, and each token shows the probability the API's logprobs give it. A
screenshot goes to the test's tmp dir.

The README's picture is this test's screenshot of a real run:
    GPT_SCREENSHOT=docs/img/serve-page.png GPT_SCREENSHOT_RUN=out python -m pytest tests/gpt/test_serve_page.py
(GPT_SCREENSHOT_RUN: serve that run's checkpoint instead of the tiny test model.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import API_KEY, PacedDecoder
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from gpt.batching import BatchDecoder
from gpt.serve import create_app, running

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "The boat"
SETTINGS = {"temperature": "0.8", "top_p": "0.9", "max_tokens": "160", "seed": "7"}

# Counts the changes of the generated text, to tell a stream from one late burst.
COUNT_UPDATES = """
window.updates = 0;
new MutationObserver(() => { window.updates += 1; }).observe(
    document.getElementById("completion"), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture
def browser(tmp_path, monkeypatch):
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), f"{path} is missing: apt-get install chromium chromium-driver"
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1000,720",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class PacedModel:
    """The model, its batched decoder steps a few milliseconds slower: a tiny model on a busy
    machine can sample all its tokens before the browser paints once, and the test must see
    them stream."""

    def __init__(self, model):
        self._model = model

    def batch_decoder(self, slots: int):
        return PacedDecoder(BatchDecoder(self._model, slots))

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture
def page_server(tiny_run):
    """(url, model name) of a server with an API key: the tiny run, or $GPT_SCREENSHOT_RUN."""
    from gpt.checkpoint import load_model

    run = Path(os.environ.get("GPT_SCREENSHOT_RUN") or tiny_run)
    model, tokenizer = load_model(str(run))
    with running(create_app(PacedModel(model), tokenizer, run.name, 1000, API_KEY)) as url:
        yield url, run.name


def api_answer(url: str) -> dict:
    """The choice POST /v1/completions answers for the page's settings (with logprobs)."""
    from test_serve import post

    body = {"prompt": PROMPT, **{k: float(v) for k, v in SETTINGS.items()}, "logprobs": 3}
    body["max_tokens"], body["seed"] = int(body["max_tokens"]), int(body["seed"])
    status, answer = post(url, "/v1/completions", body)
    assert status == 200, json.dumps(answer)
    return answer["choices"][0]


def test_the_page_streams_a_completion(browser, page_server, tmp_path):
    url, name = page_server
    browser.get(url)
    assert browser.title == "gpt.serve"
    browser.find_element(By.ID, "api_key").send_keys(API_KEY)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    for field, value in SETTINGS.items():
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.execute_script(COUNT_UPDATES)
    browser.find_element(By.ID, "generate").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    wait.until(lambda b: name in b.find_element(By.ID, "model_name").text)

    shown = browser.find_element(By.ID, "completion").get_property("textContent")
    status = browser.find_element(By.ID, "status").text
    assert "finish_reason" in status and "error" not in status, status
    assert browser.find_element(By.ID, "prompt_echo").get_property("textContent") == PROMPT
    api = api_answer(url)
    assert shown and shown == api["text"]  # the same seed gives the same text
    assert browser.execute_script("return window.updates") > 5  # it streamed in
    # each token's probability, as the API's logprobs give it: a span a streamed piece, its
    # shade from the least probable of its tokens (one a line of its title)
    spans = browser.find_elements(By.CSS_SELECTOR, "#completion span.tok")
    shown_p = [float(s.get_attribute("data-p")) for s in spans]
    api_p, expect = [math.exp(lp) for lp in api["logprobs"]["token_logprobs"]], []
    for span in spans:
        n = span.get_attribute("title").count("\n") + 1
        expect.append(min(api_p[:n]))
        api_p = api_p[n:]
    assert api_p == [] and np.allclose(shown_p, expect, atol=1e-4)
    assert all(0 < p <= 1 for p in shown_p) and len(spans) > 5
    assert "%" in spans[0].get_attribute("title") and "most probable" in spans[0].get_attribute(
        "title")
    assert browser.find_element(By.ID, "probs").text.startswith("last token:")
    # the seed box shows its whole placeholder; the empty prompt box does not look filled in
    assert browser.execute_script("""const s = document.getElementById("seed");
        const c = document.createElement("canvas").getContext("2d");
        c.font = getComputedStyle(s).font;
        return c.measureText(s.placeholder).width + 24 <= s.clientWidth;""")
    assert "empty" in browser.find_element(By.ID, "prompt").get_attribute("placeholder")
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("GPT_SCREENSHOT"):
        shutil.copy(shot, os.environ["GPT_SCREENSHOT"])


def test_the_page_says_what_went_wrong(browser, page_server):
    """A wrong key (and so any API error) is shown on the page, not swallowed."""
    url, _ = page_server
    browser.get(url)
    browser.find_element(By.ID, "api_key").send_keys("wrong-key")
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("error:") and "API key" in status, status
