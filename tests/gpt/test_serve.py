"""gpt.serve on a live server (127.0.0.1, a free port): the official `openai` client against
every endpoint, raw HTTP for every error status, concurrency, disconnects, CORS, and the
`python -m gpt.serve` command itself (a subprocess: its URL line, its key, Ctrl-C, its errors)."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from conftest import API_KEY, REPO, SERVER_MAX_TOKENS

from gpt.bpe import BPETokenizer
from gpt.checkpoint import checkpoint_path, uses_best
from gpt.config import GPTConfig
from gpt.sample import generate
from gpt.serve import create_app, is_loopback, open_warning, running

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def request(url: str, method: str, path: str, body=None, headers=None, timeout=30):
    """(status, headers as a lower-case dict, body bytes) of one HTTP request."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):  # JSON, said so (the server requires it)
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(url: str, path: str, body, headers=AUTH):
    status, _, data = request(url, "POST", path, body, {"Content-Type": "application/json",
                                                        **headers})
    return status, json.loads(data)


def events(data: bytes) -> list:
    """The data of each server-sent event; [DONE] as the string."""
    out = []
    for block in data.decode("utf-8").split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def state(server):
    """The server's counters, once no generation from an earlier test is running."""
    st = server[1].state.model
    assert wait_until(lambda: st.active == 0)
    return st


# ---- the official client -----------------------------------------------------------------------
def test_health_needs_no_key(server):
    status, _, body = request(server[0], "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"


def test_completion(client, tiny_model):
    model, tok = tiny_model
    r = client.completions.create(model="tiny", prompt="The boat", max_tokens=20, seed=1)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and isinstance(c.text, str)
    assert c.finish_reason == "length" and r.usage.completion_tokens == 20 == len(c.text)
    assert r.usage.prompt_tokens == len(tok.encode("The boat"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    assert "The boat" + c.text == generate(model, tok, "The boat", 20, seed=1)


def test_chat_completion_reads_every_message(client, tiny_model):
    model, tok = tiny_model
    messages = [{"role": "system", "content": "Tell a story."},
                {"role": "user", "content": "Where is the boat?"},
                {"role": "assistant", "content": "At the harbour."},
                {"role": "user", "content": "And the miller?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, seed=2,
                                       temperature=0.8)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert "\n\n" not in c.message.content and c.finish_reason in ("stop", "length")
    prompt = ("system: Tell a story.\n\nuser: Where is the boat?\n\nassistant: At the harbour."
              "\n\nuser: And the miller?\n\nassistant: ")
    # the model reads only the last block_size tokens, and usage counts what it read
    assert r.usage.prompt_tokens == min(len(tok.encode(prompt)), model.config.block_size) == 32
    whole = generate(model, tok, prompt, 60, temperature=0.8, seed=2)[len(prompt):]
    assert c.message.content == whole.split("\n\n")[0]


def test_streams_give_the_same_text_as_whole_answers(client):
    kwargs = {"model": "tiny", "max_tokens": 40, "seed": 3, "temperature": 0.9}
    whole = client.completions.create(prompt="Rosa", **kwargs).choices[0]
    chunks = list(client.completions.create(prompt="Rosa", stream=True, **kwargs))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == whole.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    assert len(chunks) == len(whole.text) + 1  # a chunk per (char) token, and the last

    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(messages=messages, **kwargs).choices[0]
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_wrong_or_missing_key_is_an_authentication_error(server):
    for key in ("wrong", API_KEY[:-1], API_KEY + "4"):  # (no key at all: see the raw tests)
        bad = openai.OpenAI(base_url=server[0] + "v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="The", max_tokens=3)


def test_n_and_seed_give_what_gpt_sample_prints(client, tiny_run):
    """n=2 with a seed: the two samples of `python -m gpt.sample --num-samples 2` (one random
    generator for both, in order)."""
    args = ["--out-dir", str(tiny_run), "--prompt", "The ", "--max-new-tokens", "40",
            "--seed", "5", "--num-samples", "2", "--temperature", "0.9", "--top-k", "10",
            "--top-p", "0.95"]
    cli = subprocess.run([sys.executable, "-m", "gpt.sample", *args], capture_output=True,
                         text=True, timeout=120, check=False)
    assert cli.returncode == 0, cli.stderr
    printed = re.split(r"\n?-{10} sample \d -{10}\n", cli.stdout)[1:]
    r = client.completions.create(model="tiny", prompt="The ", max_tokens=40, seed=5, n=2,
                                  temperature=0.9, top_p=0.95, extra_body={"top_k": 10})
    assert [c.index for c in r.choices] == [0, 1]
    assert ["The " + c.text + "\n" for c in r.choices] == printed
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == sum(len(c.text) for c in r.choices)  # char tokens


def test_stop_cuts_the_text_before_the_stop_string(client):
    # (EOS is never drawn, as in gpt.sample: the text runs to max_tokens unless a stop cuts it)
    kwargs = {"model": "tiny", "prompt": "The ", "max_tokens": 60, "temperature": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    assert len(whole) == 60
    stop = whole[30:32]
    cut = client.completions.create(stop=[stop, "\n\n"], **kwargs).choices[0]
    assert cut.text == whole[: whole.find(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(ch.choices[0].text for ch in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stream_options_include_usage(server):
    status, headers, data = request(server[0], "POST", "/v1/completions", {
        "prompt": "The", "max_tokens": 5, "stream": True, "temperature": 0,
        "stream_options": {"include_usage": True}}, AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    evs = events(data)
    assert evs[-1] == "[DONE]" and evs[-2]["choices"] == []
    assert evs[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


class ByteScript:
    """A stand-in model that predicts the bytes of `data` one after another (for a byte-level
    BPE tokenizer without merges: token id = byte), then EOS (which sampling masks).
    Where it is in `data` follows from how many positions its decoder has seen."""

    def __init__(self, data: bytes, eos_id: int):
        self.config = GPTConfig(eos_id + 1, block_size=64, n_layer=1, n_head=1, n_embd=4)
        self.dtype, self.data, self.eos_id = np.float32, data, eos_id

    def decoder(self):
        return ByteScriptDecoder(self)

    def batch_decoder(self, slots: int):
        return ByteScriptBatch(self, slots)


class ByteScriptDecoder:
    """ByteScript's decoder (as GPT.decoder()): the next byte's logits after `length` positions."""

    def __init__(self, script: ByteScript):
        self.script, self.length = script, 0

    def reset(self):
        self.length = 0

    def __call__(self, ids):
        self.length += len(ids)
        i, data = self.length - 1, self.script.data  # the prompt is BOS alone
        logits = np.zeros(self.script.config.vocab_size, dtype=np.float32)
        logits[data[i] if i < len(data) else self.script.eos_id] = 50.0
        return logits


class ByteScriptBatch:
    """ByteScript's batch decoder (as gpt.batching.BatchDecoder): a ByteScriptDecoder a slot."""

    def __init__(self, script: ByteScript, slots: int):
        self.slots = [ByteScriptDecoder(script) for _ in range(slots)]

    def prefill(self, slot, ids):
        self.slots[slot].reset()
        return self.slots[slot](ids)

    def prefill_many(self, slots, prompts):
        return np.stack([self.prefill(s, ids) for s, ids in zip(slots, prompts)])

    def step(self, slots, tokens):
        return np.stack([self.slots[s]([t]) for s, t in zip(slots, tokens)])


def test_a_character_split_over_tokens_streams_whole():
    text = "héllo wörld, 5 € ✓"
    tok = BPETokenizer([])  # bytes only: é is 2 tokens, € and ✓ are 3
    model = ByteScript((text + "|").encode(), tok.eos_id)
    with running(create_app(model, tok, "bytes")) as url:
        status, _, data = request(url, "POST", "/v1/completions",
                                  {"prompt": "", "max_tokens": 100, "stream": True, "stop": "|"},
                                  {})
    assert status == 200
    *chunks, last, done = events(data)
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == text and len(pieces) == len(text)  # one chunk per character
    assert last["choices"][0]["finish_reason"] == "stop" and done == "[DONE]"


# ---- every error, and the server survives each -------------------------------------------------
BIG = json.dumps({"prompt": "a" * (1 << 20)})


def chunked_big_body():
    for _ in range(20):
        yield b" " * 100_000  # 2 MB of whitespace, sent without a Content-Length


@pytest.mark.parametrize("method, path, body, headers, status, code", [
    ("POST", "/v1/completions", b'{"prompt": "The", ', AUTH, 400, "invalid_json"),
    ("POST", "/v1/completions", b'\xff\xfe{}', AUTH, 400, "invalid_json"),
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, AUTH, 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", AUTH, 400,
     "invalid_json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', AUTH, 400,
     "invalid_type"),
    ("POST", "/v1/completions", {"prompt": 5}, AUTH, 400, "invalid_type"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, AUTH, 400, "invalid_type"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": SERVER_MAX_TOKENS + 1}, AUTH, 400,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, AUTH, 400, "invalid_type"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, AUTH, 400,
     "invalid_value"),
    ("GET", "/v1/nothing", None, AUTH, 404, "not_found"),
    ("POST", "/v2/completions", {"prompt": "x"}, AUTH, 404, "not_found"),
    ("GET", "/v1/completions", None, AUTH, 405, "http_error"),
    ("POST", "/v1/completions", {"prompt": "x"}, {}, 401, "invalid_api_key"),
    ("POST", "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer nope"}, 401,
     "invalid_api_key"),
    ("GET", "/v1/models", None, {"Authorization": API_KEY}, 401, "invalid_api_key"),
    ("POST", "/v1/completions", BIG, AUTH, 413, "request_too_large"),
    ("POST", "/v1/completions", chunked_big_body, AUTH, 413, "request_too_large"),
    # a page elsewhere may POST text/plain without a preflight: JSON only
    ("POST", "/v1/completions", b'{"prompt": "x"}', {**AUTH, "Content-Type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, AUTH, 404, "model_not_found"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": True}, AUTH, 400,
     "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": 1e-7}, AUTH, 400, "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": 1e-7, "stream": True}, AUTH, 400,
     "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": ["user"], "content": "x"}]}, AUTH,
     400, "invalid_value"),
    ("GET", "/v1/models", None, {**AUTH, "Host": "evil.test"}, 421, "misdirected_request"),
    ("POST", "/v1/completions", b'{"prompt": "x"}', {**AUTH, "Host": "rebound.test:8000"}, 421,
     "misdirected_request"),
])
def test_errors_have_openai_shape_and_the_server_goes_on(server, method, path, body, headers,
                                                         status, code):
    url = server[0]
    if method == "POST":
        headers = {"Content-Type": "application/json", **headers}
    if callable(body):  # chunked transfer encoding: the limit is counted as the body arrives
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request(method, path, body=body(), headers=headers, encode_chunked=True)
        r = conn.getresponse()
        got, data = r.status, r.read()
        conn.close()
    else:
        got, _, data = request(url, method, path, body, headers)
    err = json.loads(data)["error"]
    assert got == status, err
    assert err["code"] == code and err["message"] and err["type"]
    assert "Traceback" not in err["message"]
    good, answer = post(url, "/v1/completions", {"prompt": "The", "max_tokens": 3})
    assert good == 200 and len(answer["choices"][0]["text"]) <= 3


def test_loopback_host_names_are_accepted(server):
    port = urlsplit(server[0]).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        assert request(server[0], "GET", "/health", headers={"Host": host})[0] == 200, host
    for host in ("127.0.0.1.evil.test", "[::1].evil.test", "example.com:80", ""):
        assert request(server[0], "GET", "/health", headers={"Host": host})[0] == 421, host


def test_both_transfer_encoding_and_content_length_are_refused(server):
    parts = urlsplit(server[0])
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     b"f\r\n{\"prompt\": \"x\"}\r\n0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1  # nothing was read as a second request


def test_a_body_that_never_completes_gets_408(tiny_model):
    model, tok = tiny_model
    app = create_app(model, tok, "tiny", body_timeout=0.5)
    with running(app) as url:
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"prompt": ')
            answer = b""
            while b"request_timeout" not in answer and (chunk := sock.recv(65536)):
                answer += chunk  # (the status line and the body may come apart)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer
        assert request(url, "GET", "/health")[0] == 200


def test_headers_that_never_complete_get_408_and_the_connection_closes(tiny_model):
    model, tok = tiny_model
    with running(create_app(model, tok, "tiny"), header_timeout=0.5) as url:
        parts = urlsplit(url)
        socks = [socket.create_connection((parts.hostname, parts.port), timeout=30)
                 for _ in range(3)]
        socks[0].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no end
        socks[1].sendall(b"GET /hea")  # half a request line
        started = time.monotonic()
        for sock in socks:  # (the third sent nothing at all)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer
            sock.close()
        assert time.monotonic() - started < 10
        assert request(url, "GET", "/health")[0] == 200  # a prompt client is served as ever
        # a keep-alive connection that answers in time is not cut
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        for _ in range(2):
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status":"ok"}'
        conn.close()


def test_a_client_dropping_mid_body_logs_one_quiet_line(server, caplog):
    parts = urlsplit(server[0])
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"prompt": ')
        time.sleep(0.2)
    assert wait_until(lambda: any("went away" in r.getMessage() for r in caplog.records))
    time.sleep(0.3)  # (a traceback would be logged right after)
    assert not any(r.exc_info for r in caplog.records)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "gpt.serve: a client went away while sending its request (POST /v1/completions)"]
    assert request(server[0], "GET", "/health")[0] == 200


def test_stop_at_the_earliest_stop_string_not_the_first_listed():
    """stops ["b", "ab"] on the text "ab": "ab" starts first, so nothing is left."""
    tok = BPETokenizer([])
    model = ByteScript(b"ab" * 20, tok.eos_id)
    with running(create_app(model, tok, "bytes")) as url:
        for stream in (False, True):
            status, _, data = request(url, "POST", "/v1/completions", {
                "prompt": "", "max_tokens": 10, "stop": ["b", "ab"], "stream": stream})
            assert status == 200
            texts = [c["choices"][0]["text"] for c in events(data)[:-1]] if stream else [
                json.loads(data)["choices"][0]["text"]]
            assert "".join(texts) == "", texts


def test_unknown_characters_are_named(server):
    status, body = post(server[0], "/v1/completions", {"prompt": "Zoë's UFO", "max_tokens": 3})
    assert status == 400 and body["error"]["param"] == "prompt"
    msg = body["error"]["message"]
    assert "3 character(s)" in msg and all(c in msg for c in ("'Z'", "'ë'", "'U'"))
    status, body = post(server[0], "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Zebra"}]})
    assert status == 400 and "'Z'" in body["error"]["message"]


def test_the_page_is_one_file_that_works_offline(server):
    status, headers, body = request(server[0], "GET", "/")
    page = body.decode("utf-8")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<script>" in page and "<style>" in page  # inline
    for outside in ("://", "src=", "href=", "@import", "url("):
        assert outside not in page, outside  # nothing fetched from elsewhere


def test_the_page_has_security_headers(server):
    status, headers, _ = request(server[0], "GET", "/")
    policy = headers["content-security-policy"]
    assert status == 200
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and policy.count("'sha256-") == 2
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert request(server[0], "GET", "/health")[1]["x-content-type-options"] == "nosniff"


def test_public_paths_and_preflights_need_no_key(server):
    assert request(server[0], "GET", "/favicon.ico")[0] == 204  # not 401
    assert request(server[0], "GET", "/")[0] == 200
    assert request(server[0], "GET", "/health")[0] == 200
    status, headers, _ = request(server[0], "OPTIONS", "/v1/completions", headers={
        "Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"})
    assert status == 405  # not 401; and CORS is off: no header lets the origin in
    assert "access-control-allow-origin" not in headers


# ---- concurrency, streaming as tokens come, disconnects -----------------------------------------
def test_eight_concurrent_streams_are_each_correct(client, tiny_model, state):
    model, tok = tiny_model
    prompts = ["The ", "Silas", "Down at", "A boy", "Rosa", "Years later", "The rain", "Tobin"]
    start, results, most_active = threading.Barrier(len(prompts)), {}, [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            most_active[0] = max(most_active[0], state.active)
            time.sleep(0.002)

    def stream(i):
        start.wait(30)
        try:
            chunks = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=150,
                                               seed=i, temperature=0.9, stream=True,
                                               extra_body={"top_k": 20})
            results[i] = "".join(ch.choices[0].text for ch in chunks)
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            results[i] = e

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    assert most_active[0] >= 2  # they really ran side by side
    for i, prompt in enumerate(prompts):
        expect = generate(model, tok, prompt, 150, temperature=0.9, top_k=20, seed=i)
        assert prompt + results[i] == expect, i


def open_stream(url: str, max_tokens: int):
    """A streaming request whose first event has been read: (connection, response, event)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "The", "max_tokens": max_tokens, "stream": True, "temperature": 0}),
        {"Content-Type": "application/json", **AUTH})
    r = conn.getresponse()
    assert r.status == 200
    first = r.readline()
    assert first.startswith(b"data: ")
    return conn, r, json.loads(first[len(b"data: "):])


def test_tokens_arrive_as_sampled_and_a_disconnect_stops_the_generation(server, state):
    before = state.sampled
    conn, r, first = open_stream(server[0], SERVER_MAX_TOKENS)
    assert first["choices"][0]["text"]
    # The first token is here while the model is still sampling (not one burst at the end) ...
    assert state.active == 1 and state.sampled - before < SERVER_MAX_TOKENS
    # ... and the event loop answers others meanwhile: sampling runs in a worker thread.
    assert request(server[0], "GET", "/health")[0] == 200 and state.active == 1
    r.close()
    conn.close()
    assert wait_until(lambda: state.active == 0), "the generation went on after the disconnect"
    assert state.sampled - before < SERVER_MAX_TOKENS // 2


def test_a_disconnect_stops_a_whole_answer_too(server, state):
    parts = urlsplit(server[0])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "The", "max_tokens": SERVER_MAX_TOKENS, "temperature": 0}),
        {"Content-Type": "application/json", **AUTH})
    assert wait_until(lambda: state.active == 1)
    before = state.sampled
    conn.close()
    assert wait_until(lambda: state.active == 0), "the generation went on after the disconnect"
    assert state.sampled - before < SERVER_MAX_TOKENS // 2


# ---- CORS --------------------------------------------------------------------------------------
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_lets_the_named_origins_in_and_no_others(tiny_model):
    model, tok = tiny_model
    app = create_app(model, tok, "tiny", 100, API_KEY, cors_origins=["http://page.test"])
    with running(app) as url:
        status, headers, _ = request(url, "OPTIONS", "/v1/completions",
                                     headers={"Origin": "http://page.test", **PREFLIGHT})
        assert status == 200 and headers["access-control-allow-origin"] == "http://page.test"
        assert "authorization" in headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in headers
        status, headers, _ = request(url, "OPTIONS", "/v1/completions",
                                     headers={"Origin": "http://evil.test", **PREFLIGHT})
        assert status == 400 and "access-control-allow-origin" not in headers
        status, headers, _ = request(url, "POST", "/v1/completions", {"prompt": "The"},
                                     {"Origin": "http://page.test", **AUTH})
        assert status == 200 and headers["access-control-allow-origin"] == "http://page.test"
        status, headers, _ = request(url, "POST", "/v1/completions", {"prompt": "The"},
                                     {"Origin": "http://page.test"})  # a 401 the page can read
        assert status == 401 and headers["access-control-allow-origin"] == "http://page.test"


def test_cors_star_never_comes_with_credentials(tiny_model):
    model, tok = tiny_model
    with running(create_app(model, tok, "tiny", cors_origins=["*"])) as url:
        status, headers, _ = request(url, "OPTIONS", "/v1/completions",
                                     headers={"Origin": "http://any.test", **PREFLIGHT})
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in headers


# ---- python -m gpt.serve -----------------------------------------------------------------------
def serve_cli(*args):
    """`python -m gpt.serve ARGS` run to its end (these all fail before serving)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "gpt.serve", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_one_line_error(proc, *words):
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_missing_or_corrupt_checkpoint_exits_2(tiny_run, tmp_path):
    assert_one_line_error(serve_cli("--out-dir", tmp_path / "nothing", "--port", 0),
                          "no checkpoint")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    shutil.rmtree(broken / "best", ignore_errors=True)  # the latest is what gets loaded then
    weights = broken / "checkpoint" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_one_line_error(serve_cli("--out-dir", broken, "--port", 0), "model.safetensors")
    assert weights.read_bytes() == data[: len(data) // 2]  # left as it was


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "--port"),
    (["--port", "http"], "--port"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--api-key", " "], "--api-key"),
    (["--cors-origin", "http://page.test/app"], "--cors-origin"),
    (["--model-name", ""], "--model-name"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--time-limit", "-5"], "--time-limit"),
    (["--time-limit", "nan"], "--time-limit"),
    (["--max-connections", "0"], "--max-connections"),
    (["--stream-interval", "-0.001"], "--stream-interval"),
    (["--stream-interval", "nan"], "--stream-interval"),
    (["--no-such-flag"], "unrecognized"),
])
def test_bad_flags_exit_2_with_one_line(tiny_run, args, words):
    assert_one_line_error(serve_cli("--out-dir", tiny_run, *args), words)


@contextlib.contextmanager
def serve_command(*args, env_extra=None):
    """`python -m gpt.serve ARGS --port 0` in a subprocess: yields (process, its URL line)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "gpt.serve", *map(str, args), "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, proc.stdout.readline()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def assert_ctrl_c_stops_cleanly(proc):
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "stopped" in out and err == ""


def test_the_command_serves_until_ctrl_c(tiny_run):
    with serve_command("--out-dir", tiny_run, "--model-name", "my-model", "--max-tokens", 8,
                       env_extra={"GPT_API_KEY": "from-the-env"}) as (proc, line):
        match = re.search(r"serving my-model \((.+)\) at (http://127\.0\.0\.1:\d+/)", line)
        assert match, line
        source, url = match.groups()
        # the checkpoint gpt.sample takes: OUT/best when training wrote one, else the latest
        assert source == checkpoint_path(str(tiny_run), uses_best(str(tiny_run)))
        assert request(url, "GET", "/health")[0] == 200
        assert request(url, "GET", "/v1/models")[0] == 401
        key = {"Authorization": "Bearer from-the-env"}
        status, _, body = request(url, "GET", "/v1/models", headers=key)
        assert status == 200 and json.loads(body)["data"][0]["id"] == "my-model"
        status, body = post(url, "/v1/completions", {"prompt": "The", "max_tokens": 9}, key)
        assert status == 400 and "at most 8" in body["error"]["message"]
        assert_ctrl_c_stops_cleanly(proc)


def test_latest_serves_the_latest_checkpoint(tiny_run):
    with serve_command("--out-dir", tiny_run, "--latest") as (proc, line):
        assert f"({tiny_run / 'checkpoint'})" in line, line
        assert_ctrl_c_stops_cleanly(proc)


def test_listening_beyond_loopback_without_a_key_warns():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert open_warning("127.0.0.1", None) is None and open_warning("0.0.0.0", "k") is None
    assert "without an API key" in open_warning("0.0.0.0", None)
