"""gpt.api, the web-free half of gpt.serve: request checking, the chat template, the text of a
choice as it streams (UTF-8 held back until whole, cut before a stop string), and a choice
sampled by gpt.batching's Batcher (the same tokens as gpt.sample for a seed)."""

import doctest
import json
import math
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpt.api
from gpt.api import (
    CHAT_STOP,
    Answer,
    RequestError,
    TextStream,
    chat_prompt,
    encode_prompt,
    parse_request,
)
from gpt.batching import Batcher, Sequence
from gpt.bpe import BPETokenizer
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.sample import generate
from gpt.tokenizer import CharTokenizer


def test_docstring_examples():
    assert doctest.testmod(gpt.api).failed == 0


# ---- parse_request -----------------------------------------------------------------------------
def test_defaults_and_fields():
    req = parse_request({"prompt": "Hi"}, chat=False, max_tokens_limit=100)
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, req.n) == (
        "Hi", 16, 1.0, None, None, 1)
    assert (req.seed, req.stop, req.stream, req.include_usage) == (None, (), False, False)
    req = parse_request({"prompt": "", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                         "top_k": 3, "n": 2, "seed": 9, "stop": ["a", ""], "stream": True,
                         "stream_options": {"include_usage": True}, "model": "anything",
                         "presence_penalty": 0, "echo": False, "best_of": 1, "user": "u"},
                        chat=False, max_tokens_limit=100)
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.n, req.seed) == (
        7, 0.0, 0.5, 3, 2, 9)
    assert req.stop == ("a",) and req.stream and req.include_usage
    assert parse_request({"prompt": "x", "stop": "ab"}, False, 10).stop == ("ab",)
    assert parse_request({"prompt": "x"}, False, 5).max_tokens == 5  # default capped by limit


def test_chat_request_uses_every_message_and_the_template():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": "Bye"}]
    req = parse_request({"messages": msgs}, chat=True, max_tokens_limit=300)
    assert req.prompt == ("system: Be brief.\n\nuser: Hi\n\nassistant: Hello\n\n"
                          "user: Bye\n\nassistant: ")
    assert req.prompt == chat_prompt([(m["role"], "Hello" if isinstance(m["content"], list)
                                       else m["content"]) for m in msgs])
    assert req.stop == (CHAT_STOP,) and req.max_tokens == 300 and req.chat
    req = parse_request({"messages": msgs[:1], "stop": "x", "max_completion_tokens": 4}, True, 9)
    assert req.stop == ("x", CHAT_STOP) and req.max_tokens == 4


@pytest.mark.parametrize("body, status, param, words", [
    ([1, 2], 400, None, "JSON object"),
    ({}, 400, "prompt", "required"),
    ({"prompt": 3}, 400, "prompt", "must be a string, got a number"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "must be an integer, got a string"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "got a boolean"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "must be an integer"),
    ({"prompt": "x", "max_tokens": 101}, 400, "max_tokens", "at most 100"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", ">= 0"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "must be a finite number"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k", ">= 1"),
    ({"prompt": "x", "n": 0}, 400, "n", "from 1 to"),
    ({"prompt": "x", "n": 99}, 400, "n", "from 1 to"),
    ({"prompt": "x", "seed": -3}, 400, "seed", ">= 0"),
    ({"prompt": "x", "seed": "7"}, 400, "seed", "must be an integer"),
    ({"prompt": "x", "stop": 5}, 400, "stop", "string or an array"),
    ({"prompt": "x", "stop": ["a", 1]}, 400, "stop", "string or an array"),
    ({"prompt": "x", "stop": list("abcde")}, 400, "stop", "at most 4"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "must be a boolean"),
    ({"prompt": "x", "stream_options": []}, 400, "stream_options", "object"),
    # the sampler's own limit: 1e-9 passed the type check and failed in the sampler (a 500)
    ({"prompt": "x", "temperature": 1e-9}, 400, "temperature", "too small"),
    ({"prompt": "x", "temperature": float("nan")}, 400, "temperature", "a finite number, got NaN"),
    ({"prompt": "x", "temperature": float("inf")}, 400, "temperature", "finite number, got Inf"),
    ({"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias", "not supported"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "from 0 to 5"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs", "an integer"),
])
def test_bad_completion_requests(body, status, param, words):
    with pytest.raises(RequestError) as info:
        parse_request(body, chat=False, max_tokens_limit=100)
    err = info.value
    assert (err.status, err.param) == (status, param) and words in err.message
    assert set(err.body()["error"]) >= {"message", "type", "code"}


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),  # was a 500
    ({"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
])
def test_bad_chat_requests(body, param):
    with pytest.raises(RequestError) as info:
        parse_request(body, chat=True, max_tokens_limit=100)
    assert info.value.status == 400 and info.value.param == param


def test_error_messages_quote_at_most_about_100_characters():
    for body, chat in [({"messages": [{"role": "x" * 1_000_000, "content": "hi"}]}, True),
                       ({"prompt": "x", "top_p": 2.0, "stop": "s"}, False),
                       ({"prompt": "x", "n": 10 ** 100_0}, False)]:
        with pytest.raises(RequestError) as info:
            parse_request(body, chat=chat, max_tokens_limit=100)
        assert len(info.value.message) < 250, info.value.message[:300]


def test_an_unknown_model_is_404_model_not_found():
    body = {"prompt": "x", "model": "gpt-4"}
    with pytest.raises(RequestError) as info:
        parse_request(body, chat=False, max_tokens_limit=100, model_name="tiny")
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found",
                                                                        "model")
    assert parse_request({"prompt": "x", "model": "tiny"}, False, 100, "tiny").prompt == "x"
    assert parse_request({"prompt": "x"}, False, 100, "tiny").prompt == "x"  # model may be left out


def test_logprobs_fields():
    assert parse_request({"prompt": "x"}, False, 9).logprobs is None
    assert parse_request({"prompt": "x", "logprobs": 0}, False, 9).logprobs == 0
    assert parse_request({"prompt": "x", "logprobs": 5}, False, 9).logprobs == 5
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(chat, True, 9).logprobs is None
    assert parse_request({**chat, "logprobs": True}, True, 9).logprobs == 0
    assert parse_request({**chat, "logprobs": True, "top_logprobs": 20}, True, 9).logprobs == 20
    assert parse_request({**chat, "logprobs": False}, True, 9).logprobs is None


@pytest.mark.parametrize("tok", [CharTokenizer.from_text("the cat sat on mbd"), BPETokenizer.train(
    "the cat sat on the mat and the hat " * 20, 280)])
def test_only_the_last_block_size_prompt_tokens_are_kept(tok):
    prompt = "the cat sat on the mat and the hat " * 400 + "bad cab"
    whole = tok.encode(prompt)
    ids = encode_prompt(tok, prompt, tok.vocab_size, keep=16)
    assert ids == whole[-16:]
    assert encode_prompt(tok, "cab", tok.vocab_size, keep=16) == tok.encode("cab")


@given(st.text(max_size=20), st.integers(0, 7), st.booleans())
def test_a_text_event_is_the_chunk_as_json(text, index, chat):
    answer = Answer("m\"odel", chat)
    event = answer.text_event(index, text)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:]) == answer.chunk(index, text=text)


def test_unknown_prompt_characters_are_named():
    tok = CharTokenizer.from_text("abc ")
    assert encode_prompt(tok, "ab c", tok.vocab_size) == tok.encode("ab c")
    with pytest.raises(RequestError) as info:
        encode_prompt(tok, "abZ?", tok.vocab_size)
    assert info.value.status == 400 and info.value.param == "prompt"
    assert "'Z'" in info.value.message and "'?'" in info.value.message
    with pytest.raises(RequestError, match="chat template") as info:
        encode_prompt(tok, chat_prompt([("user", "ab")]), tok.vocab_size, chat=True)
    assert info.value.param == "messages"


# ---- TextStream --------------------------------------------------------------------------------
def test_a_split_utf8_character_is_held_back_until_whole():
    tok = BPETokenizer([])  # bytes only: "é" is two tokens, "€" three
    s = TextStream(tok)
    assert [s.push(b) for b in "aé€b".encode()] == ["a", "", "é", "", "", "€", "b"]
    s = TextStream(tok)
    assert [s.push(b) for b in "x€".encode()[:-1]] == ["x", "", ""]
    assert s.finish() == "\ufffd"  # sampling ended inside a character: shown as U+FFFD


@given(st.lists(st.integers(0, 255), max_size=30))
def test_bytes_stream_to_what_decode_gives(tokens):
    tok = BPETokenizer([])
    s = TextStream(tok)
    pieces = [s.push(t) for t in tokens] + [s.finish()]
    assert "".join(pieces) == tok.decode(tokens)
    assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in tok.decode(tokens)


@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=3),
                                               max_size=3))
def test_stream_stops_before_the_first_stop_string(text, stops):
    tok = CharTokenizer.from_text("ab\n")
    s = TextStream(tok, stops)
    sent = "".join(s.push(t) for t in tok.encode(text)) + s.finish()
    # Generation stops as soon as a stop string is complete: at the first end e of text[:e]
    # that is a stop string (the earliest-starting one if several end there).
    ends = [e for e in range(1, len(text) + 1) if any(text[:e].endswith(x) for x in stops)]
    if ends:
        cut = min(ends[0] - len(x) for x in stops if text[: ends[0]].endswith(x))
        assert sent == text[:cut] and s.stopped
    else:
        assert sent == text and not s.stopped


def test_text_that_may_begin_a_stop_waits():
    tok = CharTokenizer.from_text("abc\n")
    s = TextStream(tok, ["\n\n", "cab"])
    assert [s.push(t) for t in tok.encode("a\nbca\nc")] == ["a", "", "\nb", "", "", "ca", "\n"]
    assert s.finish() == "c" and not s.stopped


# ---- one choice, sampled by the Batcher ---------------------------------------------------------
@pytest.fixture(scope="module")
def char_model():
    tok = CharTokenizer.from_text("To be, or not to be, that is the question:\n")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg, dtype=np.float64, seed=4), tok


def run_choice(model, tok, prompt, seed, **fields):
    """(the Choice, the text pieces it sent) of one request's sequence through a Batcher."""
    req = parse_request({"prompt": prompt, "seed": seed, **fields}, False, 1000)
    pieces, done = [], threading.Event()

    def emit(kind, *data):
        if kind == "token":
            pieces.append(data[1])
        elif kind == "end":
            done.set()

    seq = Sequence(req, tok.encode(prompt) or [tok.bos_id], np.random.default_rng(seed), 0, tok,
                   emit, math.inf, model.config.block_size)
    batcher = Batcher(model, max_batch=2, max_queue=0)
    batcher.submit([seq])
    assert done.wait(60)
    batcher.stop()
    return seq.choice, pieces


def test_a_choice_is_what_gpt_sample_generates(char_model):
    model, tok = char_model
    for prompt in ("To be", ""):
        choice, pieces = run_choice(model, tok, prompt, 3, max_tokens=50, temperature=0.9,
                                    top_k=8, top_p=0.95)
        expect = generate(model, tok, prompt, 50, 0.9, 8, 0.95, seed=3)
        assert prompt + choice.text == expect and "".join(pieces) == choice.text
        assert len(pieces) == choice.tokens  # one per token
        assert choice.finish_reason == ("length" if choice.tokens == 50 else "stop")


def test_a_choice_ends_at_its_stop_string(char_model):
    model, tok = char_model
    whole, _ = run_choice(model, tok, "To", 7, max_tokens=60)  # EOS is masked: never taught
    assert len(whole.text) > 10 and whole.finish_reason == "length"
    stop = whole.text[8:10]
    cut, _ = run_choice(model, tok, "To", 7, max_tokens=60, stop=[stop, "zz"])
    assert cut.text == whole.text[: whole.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.tokens <= whole.text.find(stop) + 2
    none, pieces = run_choice(model, tok, "To", 7, max_tokens=0)
    assert (none.text, none.tokens, none.finish_reason, pieces) == ("", 0, "length", [])
