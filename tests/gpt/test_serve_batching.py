"""gpt.serve's continuous batching (gpt/batching.py): the batched step against the model's own
decoder, texts among others equal to the same seeds alone, joining and leaving mid-batch, a
disconnect freeing its slot, a full queue (429), the time limit, logprobs against the model's
log-softmax, and /metrics read by prometheus_client's parser."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from conftest import API_KEY, PacedDecoder
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_serve import AUTH, events, post, request, wait_until

from gpt.api import CompletionRequest
from gpt.batching import BatchDecoder, Batcher, Sequence, log_softmax, most_probable
from gpt.model import GPT
from gpt.sample import generate
from gpt.serve import create_app, running
from tensorlite import no_grad


# ---- the batched step ---------------------------------------------------------------------------
def test_batched_steps_give_each_sequence_its_own_logits(tiny_model):
    """Sequences of different lengths in one step, one leaving, and a new one read into its
    slot while the others take a step (as the Batcher does: that step must leave the slot's
    new cache alone), then joining: each row is what the model's own decoder gives that
    sequence alone."""
    check_batched_steps(tiny_model[0])


def test_batched_steps_of_a_gpt2_shaped_model():
    """The same with GPT-2's architecture (LayerNorm, GELU, biases, tied head)."""
    from gpt.config import GPTConfig
    from gpt.model import GPT

    cfg = GPTConfig(vocab_size=50, block_size=40, n_layer=2, n_head=2, n_embd=16,
                    norm="layernorm", activation="gelu", bias=True, tied_head=True)
    model, rng = GPT(cfg, seed=1), np.random.default_rng(1)
    for p in model.parameters():
        p.data += rng.normal(0, 0.1, p.shape).astype(p.dtype)  # biases off 0, gains off 1
    check_batched_steps(model)


def check_batched_steps(model):
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    batch, alone = BatchDecoder(model, 4), {}

    def read(slot, ids):
        alone[slot] = model.decoder()
        np.testing.assert_allclose(batch.prefill(slot, ids), alone[slot](ids), rtol=0, atol=0)

    for slot, ids in {0: [5, 9, 3], 1: [7], 2: list(rng.integers(0, V, 20)), 3: [4]}.items():
        read(slot, ids)
    active = [0, 1, 2, 3]
    for step in range(10):
        if step == 3:  # slot 1 leaves
            active.remove(1)
        if step == 5:  # a new prompt goes into slot 1 while 0, 2 and 3 step ...
            read(1, [1, 2, 6])
        if step == 6:  # ... and it joins them
            active.insert(1, 1)
        tokens = list(rng.integers(0, V, len(active)))
        rows = batch.step(active, tokens)
        for row, slot, t in zip(rows, active, tokens):
            np.testing.assert_allclose(row, alone[slot]([t]), rtol=1e-4, atol=1e-4)
    assert list(batch.lengths) == [3 + 10, 3 + 4, 20 + 10, 1 + 10]
    read(0, [8, 8, 2])  # one sequence alone: the model's own Decoder, to the bit
    assert np.array_equal(batch.step([0], [3])[0], alone[0]([3]))
    # prompts of different lengths read together (slots 3 and 1; 0 and 2 keep theirs),
    # then they step on with slot 0 (2's cache is full): each as alone
    prompts = {3: list(rng.integers(0, V, 17)), 1: [6]}
    rows = batch.prefill_many(list(prompts), list(prompts.values()))
    for row, (slot, ids) in zip(rows, prompts.items()):
        alone[slot] = model.decoder()
        np.testing.assert_allclose(row, alone[slot](ids), rtol=1e-4, atol=1e-4)
    assert list(batch.lengths) == [3 + 1, 1, 20 + 10, 17]
    for _ in range(3):
        tokens = list(rng.integers(0, V, 3))
        for slot, t, row in zip([0, 1, 3], tokens, batch.step([0, 1, 3], tokens)):
            np.testing.assert_allclose(row, alone[slot]([t]), rtol=1e-4, atol=1e-4)


def test_the_batcher_samples_what_gpt_sample_does(tiny_model):
    """8 sequences with prompts of 1 to 8 characters, 150 tokens each: every one's context
    window (32) slides several times, each at its own step, while the others go on."""
    model, tok = tiny_model
    batcher = Batcher(model, max_batch=8, max_queue=0)
    done, ended = threading.Event(), []

    def emit(kind, *data):
        if kind == "end":
            ended.append(data)
            if len(ended) == 8:
                done.set()

    prompts = ["The rain and the sea"[: i + 1] for i in range(8)]
    seqs = [Sequence(CompletionRequest("", 150, temperature=0.9, seed=i), tok.encode(p),
                     np.random.default_rng(i), i, tok, emit, math.inf, model.config.block_size)
            for i, p in enumerate(prompts)]
    batcher.submit(seqs)
    assert done.wait(120)
    batcher.stop()
    for i, (p, seq) in enumerate(zip(prompts, seqs)):
        assert p + seq.choice.text == generate(model, tok, p, 150, temperature=0.9, seed=i), i


def test_a_bfloat16_model_batches_as_its_own_decoder_rounds(tiny_model):
    """gpt.serve --dtype bfloat16: the batched step rounds the linear layers' operands as the
    model's own decoder does (and so differs from float32's)."""
    model, _ = tiny_model
    mixed = GPT(model.config, dtype="bfloat16")
    mixed.load_state_dict(model.state_dict())
    batch, alone = BatchDecoder(mixed, 2), [mixed.decoder(), mixed.decoder()]
    for slot, ids in enumerate(([5, 9, 3], [7])):
        batch.prefill(slot, ids), alone[slot](ids)
    rows = batch.step([0, 1], [4, 2])
    for slot, t in enumerate((4, 2)):
        np.testing.assert_allclose(rows[slot], alone[slot]([t]), rtol=1e-4, atol=1e-4)
    wide = BatchDecoder(model, 2)
    for slot, ids in enumerate(([5, 9, 3], [7])):
        wide.prefill(slot, ids)
    assert not np.allclose(wide.step([0, 1], [4, 2]), rows, rtol=1e-4, atol=1e-4)


# ---- a server with small limits -------------------------------------------------------------------
@contextlib.contextmanager
def small_server(tiny_model, **limits):
    model, tok = tiny_model
    app = create_app(model, tok, "tiny", 50_000, API_KEY, **limits)
    with running(app) as url:
        yield url, app.state.model


def open_stream(url: str, body: dict):
    """A streaming request whose first event has been read: (connection, response)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"stream": True, **body}),
                 {"Content-Type": "application/json", **AUTH})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")
    return conn, r


def test_texts_among_others_equal_the_same_seeds_alone(tiny_model):
    """Requests that arrive at different times, with prompts of different lengths, their own
    settings and n = 2, through 3 slots (so some wait and join later): each text is the one
    gpt.sample's generate gives for its seed alone."""
    model, tok = tiny_model
    asks = [("The ", 60, {"temperature": 0.9, "top_k": 20}),
            ("Down at the harbour the boats", 45, {"temperature": 0.7}),
            ("A", 80, {"temperature": 1.0, "top_p": 0.9}),
            ("Rosa went", 30, {"temperature": 0}),
            ("The rain", 70, {"temperature": 1.2, "top_k": 5, "top_p": 0.8})]
    results = {}
    with small_server(tiny_model, max_batch=3) as (url, state):
        def ask(i):
            time.sleep(0.02 * i)  # staggered: they join a batch already running
            prompt, max_tokens, settings = asks[i]
            body = {"prompt": prompt, "max_tokens": max_tokens, "seed": 100 + i, "n": 2,
                    **settings}
            results[i] = post(url, "/v1/completions", body)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = state.metrics
    assert metrics.batch.count > 0 and metrics.batch.sum / metrics.batch.count > 1.5
    for i, (prompt, max_tokens, settings) in enumerate(asks):
        status, answer = results[i]
        assert status == 200, answer
        rng = np.random.default_rng(100 + i)  # gpt.sample --num-samples 2: one generator
        for choice in answer["choices"]:
            expect = generate(model, tok, prompt, max_tokens, rng=rng, **settings)
            assert prompt + choice["text"] == expect, (i, choice["index"])


def test_a_disconnect_frees_the_slot_for_a_waiting_request(tiny_model):
    with small_server(tiny_model, max_batch=1) as (url, state):
        conn, r = open_stream(url, {"prompt": "The", "max_tokens": 40_000, "temperature": 0})
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(
            answer=post(url, "/v1/completions", {"prompt": "A", "max_tokens": 5, "seed": 1})))
        t.start()
        assert wait_until(lambda: state.batcher.queued == 1)  # no free slot: it waits
        time.sleep(0.3)
        assert "answer" not in waiting
        r.close()
        conn.close()  # the first client goes away: its slot goes to the waiting request
        t.join(30)
        status, answer = waiting["answer"]
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
        assert wait_until(lambda: not state.batcher.active and state.active == 0)


def test_a_full_queue_answers_429_with_retry_after(tiny_model):
    with small_server(tiny_model, max_batch=1, max_queue=1) as (url, state):
        conn, r = open_stream(url, {"prompt": "The", "max_tokens": 40_000, "temperature": 0})
        conn2, r2 = None, None
        try:
            parts = urlsplit(url)
            conn2 = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn2.request("POST", "/v1/completions", json.dumps(
                {"prompt": "A", "max_tokens": 3, "stream": True}),
                {"Content-Type": "application/json", **AUTH})  # queued behind the first
            assert wait_until(lambda: state.batcher.queued == 1)
            status, headers, data = request(url, "POST", "/v1/completions",
                                            {"prompt": "x", "max_tokens": 3}, AUTH)
            err = json.loads(data)["error"]
            assert status == 429 and int(headers["retry-after"]) >= 1
            assert err["code"] == "rate_limit_exceeded" and "busy" in err["message"]
            client = openai.OpenAI(base_url=url + "v1", api_key=API_KEY, max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2)
        finally:
            r.close()
            conn.close()
        r2 = conn2.getresponse()
        assert r2.status == 200 and events(r2.read())[-1] == "[DONE]"  # it got its turn
        conn2.close()
        assert post(url, "/v1/completions", {"prompt": "The", "max_tokens": 3})[0] == 200


def test_more_choices_than_slots_and_queue_hold_is_400_not_429(tiny_model):
    with small_server(tiny_model, max_batch=2, max_queue=1) as (url, _):
        status, body = post(url, "/v1/completions", {"prompt": "x", "n": 4})
        assert status == 400 and body["error"]["param"] == "n" and "--max-batch" in body[
            "error"]["message"]
        status, body = post(url, "/v1/completions", {"prompt": "x", "n": 3, "max_tokens": 2})
        assert status == 200 and len(body["choices"]) == 3  # 2 in slots, 1 waiting its turn


class BrokenDecoder:
    """A batch decoder with a bug: every read of a prompt fails."""

    def prefill_many(self, slots, prompts):
        raise RuntimeError("boom")


def test_a_bug_in_a_step_is_a_500_and_the_batcher_goes_on(tiny_model, monkeypatch):
    model, tok = tiny_model
    monkeypatch.setattr(model, "batch_decoder", lambda slots: BrokenDecoder(), raising=False)
    with running(create_app(model, tok, "tiny", 100, API_KEY)) as url:
        for _ in range(2):  # the second is answered too: the batcher thread lives on
            status, body = post(url, "/v1/completions", {"prompt": "The", "max_tokens": 3})
            assert status == 500 and "sampling failed: RuntimeError: boom" in body["error"][
                "message"]
        status, _, data = request(url, "POST", "/v1/completions",
                                  {"prompt": "The", "max_tokens": 3, "stream": True}, AUTH)
        assert status == 200 and events(data)[-1]["error"]["code"] == "server_error"


def test_the_time_limit_ends_a_request(tiny_model):
    with small_server(tiny_model, time_limit=0.3) as (url, state):
        started = time.monotonic()
        status, answer = post(url, "/v1/completions", {"prompt": "The", "max_tokens": 40_000})
        assert status == 200 and time.monotonic() - started < 10
        choice = answer["choices"][0]  # (on a busy machine it may end before its first token)
        assert choice["finish_reason"] == "length" and answer["usage"][
            "completion_tokens"] < 40_000
        assert wait_until(lambda: not state.batcher.active)


# ---- logprobs -----------------------------------------------------------------------------------
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(0, 45))
def test_most_probable_is_the_top_of_a_stable_sort(values, k):
    lp = np.array(values, dtype=np.float64)  # small integers: many ties
    k = min(k, lp.size)
    assert most_probable(lp, k).tolist() == np.argsort(-lp, kind="stable")[:k].tolist()


def model_log_softmax(model, ids: list[int]) -> np.ndarray:
    """(len(ids), V): log-softmax of the model's logits (its full forward) at each position."""
    with no_grad():
        logits = model(np.array([ids]))[0].data[0]
    return np.stack([log_softmax(row) for row in logits])


def test_completion_logprobs_are_the_models_log_softmax(server, tiny_model):
    model, tok = tiny_model
    status, answer = post(server[0], "/v1/completions", {
        "prompt": "The boat", "max_tokens": 12, "seed": 4, "temperature": 0.8, "logprobs": 3})
    assert status == 200
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    ids = tok.encode("The boat" + choice["text"])
    expect = model_log_softmax(model, ids)[len(tok.encode("The boat")) - 1: -1]  # (12, V)
    assert lp["tokens"] == [tok.decode([t]) for t in ids[-12:]]
    np.testing.assert_allclose(lp["token_logprobs"],
                               [row[t] for row, t in zip(expect, ids[-12:])], atol=1e-4)
    for row, top in zip(expect, lp["top_logprobs"]):
        best = np.argsort(-row, kind="stable")[:3]
        assert list(top) == [tok.decode([t]) for t in best]
        np.testing.assert_allclose(list(top.values()), row[best], atol=1e-4)
    assert lp["text_offset"] == list(range(12))  # one character a token
    assert answer["choices"][0]["logprobs"] is not None
    plain = post(server[0], "/v1/completions", {"prompt": "The", "max_tokens": 2})[1]
    assert plain["choices"][0]["logprobs"] is None  # only when asked for


def test_chat_logprobs_streamed_and_whole(server, tiny_model):
    model, tok = tiny_model
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "seed": 2,
            "logprobs": True, "top_logprobs": 2, "stop": ["zzz"]}
    status, whole = post(server[0], "/v1/chat/completions", body)
    assert status == 200
    content = whole["choices"][0]["logprobs"]["content"]
    text = whole["choices"][0]["message"]["content"]
    assert "".join(c["token"] for c in content) == text
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode())
               for c in content)
    assert all(c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-9 for c in content)
    status, _, data = request(server[0], "POST", "/v1/chat/completions", {**body, "stream": True},
                              AUTH)
    chunks = [e for e in events(data) if e != "[DONE]"]
    streamed = [c for e in chunks for ch in e["choices"] if ch["logprobs"]
                for c in ch["logprobs"]["content"]]
    assert streamed == content
    ids = tok.encode("user: Hello\n\nassistant: " + text)
    expect = model_log_softmax(model, ids)[-len(content) - 1: -1]
    np.testing.assert_allclose([c["logprob"] for c in content],
                               [row[t] for row, t in zip(expect, ids[-len(content):])], atol=1e-4)


# ---- /metrics ---------------------------------------------------------------------------------
def test_metrics_parse_as_prometheus_text(tiny_model):
    with small_server(tiny_model, max_batch=4) as (url, _):
        for i in range(3):
            assert post(url, "/v1/completions", {"prompt": "The", "max_tokens": 7, "n": 2,
                                                 "seed": i})[0] == 200
        post(url, "/v1/completions", {"prompt": "x", "top_p": 7})
        assert request(url, "GET", "/metrics")[0] == 401  # behind the key, as the API
        status, headers, data = request(url, "GET", "/metrics", headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(data.decode())}

    def value(family, sample_name, **labels):
        return next(s.value for s in families[family].samples
                    if s.name == sample_name and all(s.labels.get(k) == v
                                                     for k, v in labels.items()))

    assert value("gpt_serve_requests", "gpt_serve_requests_total", endpoint="completions",
                 status="200") == 3
    assert value("gpt_serve_requests", "gpt_serve_requests_total", status="400") == 1
    assert value("gpt_serve_tokens_generated", "gpt_serve_tokens_generated_total") == 42
    assert value("gpt_serve_active_sequences", "gpt_serve_active_sequences") == 0
    assert value("gpt_serve_queued_sequences", "gpt_serve_queued_sequences") == 0
    assert families["gpt_serve_batch_size"].type == "histogram"
    assert value("gpt_serve_batch_size", "gpt_serve_batch_size_bucket", le="+Inf") >= 7
    assert value("gpt_serve_batch_size", "gpt_serve_batch_size_bucket", le="1.0") < value(
        "gpt_serve_batch_size", "gpt_serve_batch_size_bucket", le="2.0")  # n=2 batched
    assert value("gpt_serve_time_to_first_token_seconds",
                 "gpt_serve_time_to_first_token_seconds_count") == 6
    assert value("gpt_serve_time_per_token_seconds",
                 "gpt_serve_time_per_token_seconds_count") == 36


# ---- the hand-over to the event loop ----------------------------------------------------------
class RecordingLoop:
    """Stands in for the event loop: runs what is handed to it at once, and counts wake-ups."""

    def __init__(self):
        self.wakeups = 0

    def call_soon_threadsafe(self, callback, *args):
        self.wakeups += 1
        callback(*args)


class Inbox:
    def __init__(self):
        self.events = []

    def receive(self, events):
        self.events.extend(events)


def test_the_mailbox_writes_text_at_most_every_interval_and_firsts_and_ends_at_once():
    from gpt.serve import Mailbox

    loop, a, b = RecordingLoop(), Inbox(), Inbox()
    box = Mailbox(interval=3600.0)
    box.post(loop, a, ("token", 0, "x", [], 0), urgent=True)  # a first token: at once
    box.flush()
    assert a.events == [("token", 0, "x", [], 0)] and loop.wakeups == 1
    for i in range(3):  # later tokens, within the interval: they wait, however many steps
        box.post(loop, a, ("token", 0, "y", [], 1 + i))
        box.post(loop, b, ("token", 1, "z", [], i))
        box.flush()
    assert len(a.events) == 1 and b.events == [] and loop.wakeups == 1
    box.post(loop, b, ("end", 1, "length"), urgent=True)  # an end: everything waiting, in order
    box.flush()
    assert [e[4] for e in a.events[1:]] == [1, 2, 3] and len(b.events) == 4
    assert b.events[-1] == ("end", 1, "length") and loop.wakeups == 2
    box.flush()  # nothing waiting: no wake-up
    assert loop.wakeups == 2
    every = Mailbox(interval=0.0)  # --stream-interval 0: each step's tokens at once
    for i in range(3):
        every.post(loop, a, ("token", 0, "w", [], i))
        every.flush()
    assert loop.wakeups == 5


class LaterLoop(RecordingLoop):
    """Stands in for an event loop that is busy: what is handed to it runs at `run()`."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def call_soon_threadsafe(self, callback, *args):
        self.wakeups += 1
        self.calls.append((callback, args))

    def run(self):
        calls, self.calls = self.calls, []
        for callback, args in calls:
            callback(*args)


def test_an_urgent_event_taken_by_a_delivery_already_coming_leaves_no_urgency_behind():
    from gpt.serve import Mailbox

    loop, a, b = LaterLoop(), Inbox(), Inbox()
    box = Mailbox(interval=3600.0)
    box.post(loop, a, ("token", 0, "x", [], 0), urgent=True)
    box.flush()  # a delivery is coming ...
    box.post(loop, b, ("token", 0, "y", [], 0), urgent=True)
    box.flush()  # ... and takes b's first token too: no second wake-up
    assert loop.wakeups == 1
    loop.run()
    assert len(a.events) == len(b.events) == 1
    box.post(loop, a, ("token", 0, "z", [], 1))  # later text: it waits for the interval
    box.flush()
    assert loop.wakeups == 1 and len(a.events) == 1


def test_a_big_stream_interval_still_frees_a_gone_clients_slot_at_once(tiny_model):
    """A whole (not streamed) answer hears of its client going away when it goes, not at the
    next hand-over of text (which --stream-interval may hold back)."""
    with small_server(tiny_model, stream_interval=3600.0) as (url, state):
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "The", "max_tokens": 50_000, "temperature": 0}),
            {"Content-Type": "application/json", **AUTH})
        assert wait_until(lambda: state.active == 1)
        before = state.sampled
        conn.close()
        assert wait_until(lambda: state.active == 0)
        assert state.sampled - before < 25_000  # not all 50,000 for nobody


def test_a_streams_first_text_goes_at_once_even_when_its_first_tokens_are_held_back(
        tiny_model, monkeypatch):
    """The first tokens' text may be held back (it could begin a stop string): the first
    piece of text that does go out is written at once, not at the next --stream-interval."""
    model, tok = tiny_model
    first = generate(model, tok, "The", 3, temperature=0)[len("The"):]  # 3 tokens held back
    monkeypatch.setattr(model, "batch_decoder", lambda slots: PacedDecoder(
        BatchDecoder(model, slots)), raising=False)
    with small_server(tiny_model, stream_interval=3600.0) as (url, state):
        conn, r = open_stream(url, {"prompt": "The", "max_tokens": 300, "temperature": 0,
                                    "stop": [first + "\x01"]})  # (open_stream reads it)
        try:  # it came while the request was still being sampled, not with its end
            assert state.active == 1 and state.sampled < 300
        finally:
            r.close()
            conn.close()
        assert wait_until(lambda: state.active == 0)


def test_stopping_the_server_ends_an_open_stream_with_an_error_event_not_a_traceback(
        tiny_model):
    """Ctrl-C (here: the end of `running`) while a stream is open: the stream gets an error
    event saying the server is shutting down and closes, and uvicorn has nothing to cancel
    (before, it waited out its grace period, cancelled the stream and logged a traceback)."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(logging.WARNING)
    with small_server(tiny_model) as (url, state):
        logging.getLogger("uvicorn.error").addHandler(keep)  # (uvicorn's config set its own)
        conn, r = open_stream(url, {"prompt": "The", "max_tokens": 50_000})
        assert wait_until(lambda: state.active == 1)
    try:
        rest = r.read().decode()  # what came before the server closed the connection
    finally:
        logging.getLogger("uvicorn.error").removeHandler(keep)
        conn.close()
    last = [line for line in rest.splitlines() if line.startswith("data: ")][-1]
    error = json.loads(last[len("data: "):])["error"]
    assert "shutting down" in error["message"] and error["code"] == "server_error"
    assert [r.getMessage() for r in records] == []
    assert state.live == set()
