"""The curl and `openai` examples of docs/serving.md, run as written against a live server
(only its address, 127.0.0.1:8000 in the docs, and the model's name, "out" there, are replaced
by the test server's)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import API_KEY, REPO

DOC = REPO / "docs" / "serving.md"
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", flags=re.DOTALL)
DOC_BASE = "http://127.0.0.1:8000"


def for_the_test_server(code: str, base: str) -> str:
    """The example aimed at the test server: its address, and its model's name ("tiny")."""
    for quote in ('"', "'"):
        code = code.replace(f'"model": {quote}out{quote}', '"model": "tiny"')
    return code.replace(DOC_BASE, base.rstrip("/")).replace('model="out"', 'model="tiny"')


def examples(language: str, marker: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(DOC.read_text(encoding="utf-8"))
            if lang == language and marker in code and ">>>" not in code]


def test_the_page_has_examples():
    assert len(examples("bash", "curl ")) >= 4 and len(examples("python", "OpenAI(")) == 1


@pytest.mark.parametrize("code", examples("bash", "curl "))
def test_curl_examples(server, code):
    base = server[0].rstrip("/")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", for_the_test_server(code, base)],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={"GPT_API_KEY": API_KEY, "PATH": "/usr/bin:/bin:/usr/local/bin"})
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out and '"error"' not in out, out
    if '"stream": true' in code:
        assert out.rstrip().endswith("data: [DONE]") and out.count("data: ") > 2
    else:  # one JSON document per curl
        decoder, pos, docs = json.JSONDecoder(), 0, []
        while pos < len(out.strip()):
            doc, end = decoder.raw_decode(out, pos)
            docs.append(doc)
            pos = end + len(out[end:]) - len(out[end:].lstrip())
        assert len(docs) == code.count("curl ")


def test_openai_client_example(server):
    (code,) = examples("python", "OpenAI(")
    env = dict(os.environ, GPT_API_KEY=API_KEY)
    run = subprocess.run([sys.executable, "-c", for_the_test_server(code, server[0])],
                         capture_output=True, text=True, timeout=120, check=False, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()  # the completion, then the chat answer (which may be empty)
