"""The OpenAI completion API, without the web: what a request may hold (checked into a
`CompletionRequest`), the chat template, the text of one choice as it is sampled (whole UTF-8
characters only, cut before the first stop string), and the JSON shapes of the answers
(logprobs included). gpt/serve.py puts this on HTTP and gpt/batching.py samples the choices;
everything here is plain Python and testable on its own.
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from .config import check_sampling
from .errors import UserError

MAX_N = 8  # choices per request
MAX_STOPS = 4  # stop strings per request (OpenAI's limit too)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
QUOTE_CHARS = 100  # an error message quotes at most this much of the input

# ---- the chat template -------------------------------------------------------------------------
# A plain language model continues text, so a conversation becomes a transcript: one paragraph
# per message, "role: content", paragraphs separated by a blank line; the prompt ends with
# "assistant: " and the answer is the continuation up to the next blank line (the end of its
# paragraph). The role names are lower case because a small corpus may lack some capitals
# (train.txt has no "U"), and a character the tokenizer does not know cannot be in a prompt.
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
CHAT_STOP = "\n\n"


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The prompt for a conversation of (role, content) pairs.

    >>> print(chat_prompt([("system", "Be brief."), ("user", "Who goes there?")]) + "|")
    system: Be brief.
    <BLANKLINE>
    user: Who goes there?
    <BLANKLINE>
    assistant: |
    """
    turns = "".join(f"{CHAT_ROLES[role]}: {content}{CHAT_STOP}" for role, content in messages)
    return turns + f"{CHAT_ROLES['assistant']}: "


# ---- checking a request ------------------------------------------------------------------------
class RequestError(UserError):
    """A request the server refuses (the HTTP face of a UserError): an HTTP status, a one-line
    message, an OpenAI error code and the request field at fault (if any)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_value", type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = (
            message, param, status, code, type)

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class CompletionRequest:
    """One checked request to /v1/completions or /v1/chat/completions."""

    prompt: str  # for chat: the conversation through the template
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None  # None: not given (the same as gpt.sample without --top-p)
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    chat: bool = False
    logprobs: int | None = None  # None: no logprobs; k: each token's and its k top alternatives


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "an object", type(None): "null"}
_WANT = {"int": "an integer", "number": "a finite number", "bool": "a boolean",
         "string": "a string"}


def quote(value) -> str:
    """repr(value), cut to about QUOTE_CHARS characters: an error message never repeats a
    huge input back (a 1 MB field would make a 1 MB error)."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + f"... ({len(text)} chars)"


def _got(value) -> str:
    """What a value of the wrong kind is, in JSON's words ("a string"; "Infinity" for inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _field(body: dict, name: str, kind: str, default=None):
    """body[name] checked to be of `kind` (int, number, bool, string); `default` when absent
    or null. A wrong type is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": number and (abs(value) < 1e300 if isinstance(value, int)  # (no overflow)
                              else math.isfinite(value)),
        "bool": isinstance(value, bool),
        "string": isinstance(value, str),
    }[kind]
    if not ok:
        raise RequestError(f"'{name}' must be {_WANT[kind]}, got {_got(value)}", name,
                           code="invalid_type")
    return value


def _check(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise RequestError(f"'{name}' must be {rule}, got {quote(value)}", name)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("'stop' must be a string or an array of strings", "stop",
                           code="invalid_type")
    _check(len(stops) <= MAX_STOPS, "stop", f"at most {MAX_STOPS} strings", stops)
    return tuple(s for s in stops if s)


def _messages(body: dict) -> list[tuple[str, str]]:
    """[(role, content)] from OpenAI's `messages`: content a string or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array of {role, content} objects",
                           "messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{where}' must be an object", where, code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # (a list is not hashable)
            raise RequestError(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, "
                               f"got {quote(role)}", f"{where}.role")
        if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"'{where}.content' parts must all be "
                                   '{"type": "text", "text": ...}: this model reads text only',
                                   f"{where}.content", code="invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"'{where}.content' must be a string", f"{where}.content",
                               code="invalid_type")
        out.append((role, content))
    return out


# Fields OpenAI defines that this server does not do: a request that asks for one gets a 400
# rather than an answer that silently ignores it. (name, is it asked for?, why not)
UNSUPPORTED = (
    ("echo", lambda v: v is not False, "the answer never repeats the prompt"),
    ("best_of", lambda v: v != 1, "each choice is one sample; ask for n choices instead"),
    ("suffix", lambda v: v != "", "this model only continues text"),
    ("logit_bias", lambda v: v != {}, "logits are sampled as the model gives them"),
    ("presence_penalty", lambda v: v != 0, "no penalties are applied"),
    ("frequency_penalty", lambda v: v != 0, "no penalties are applied"),
    ("tools", lambda v: v != [], "this model cannot call tools"),
    ("functions", lambda v: v != [], "this model cannot call functions"),
)
MAX_LOGPROBS = 5  # /v1/completions' logprobs: at most 5 alternatives (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs: at most 20


def parse_request(body, chat: bool, max_tokens_limit: int,
                  model_name: str | None = None) -> CompletionRequest:
    """Check a decoded JSON body; RequestError (status 400, naming the field) when it is wrong.

    Fields: prompt (completions) or messages (chat), max_tokens (chat: also
    max_completion_tokens), temperature, top_p, top_k, n, seed, stop, stream,
    stream_options.include_usage, logprobs (completions: how many alternatives, 0-5; chat: a
    boolean, with top_logprobs 0-20), model (404 model_not_found unless it is `model_name`,
    when that is given). Fields in UNSUPPORTED asking for what this server does not do: 400.
    Others (user, metadata, ...) are ignored.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if model_name is not None and model is not None and model != model_name:
        raise RequestError(f"the model {quote(model)} does not exist: this server serves "
                           f"{model_name!r} (GET /v1/models)", "model", status=404,
                           code="model_not_found")
    for name, asked, why in UNSUPPORTED:
        if body.get(name) is not None and asked(body[name]):
            raise RequestError(f"'{name}' is not supported here ({why}); leave it out",
                               name, code="unsupported_parameter")
    if chat:
        prompt = chat_prompt(_messages(body))
        max_tokens = _field(body, "max_tokens", "int", _field(
            body, "max_completion_tokens", "int", max_tokens_limit))
        logprobs = _field(body, "top_logprobs", "int", 0) if _field(
            body, "logprobs", "bool", False) else None
        _check(logprobs is None or 0 <= logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
               f"an integer from 0 to {MAX_TOP_LOGPROBS}", logprobs)
        if logprobs is None and body.get("top_logprobs") is not None:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        prompt = _field(body, "prompt", "string")
        if prompt is None:
            raise RequestError("'prompt' is required (a string; \"\" starts from nothing)",
                               "prompt", code="missing_required_parameter")
        max_tokens = _field(body, "max_tokens", "int", min(DEFAULT_COMPLETION_TOKENS,
                                                           max_tokens_limit))
        logprobs = _field(body, "logprobs", "int")
        _check(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs",
               f"an integer from 0 to {MAX_LOGPROBS}", logprobs)
    _check(max_tokens >= 0, "max_tokens", "an integer >= 0", max_tokens)
    if max_tokens > max_tokens_limit:
        raise RequestError(f"'max_tokens' is {max_tokens} but this server allows at most "
                           f"{max_tokens_limit} (its --max-tokens)", "max_tokens")
    temperature = _field(body, "temperature", "number", 1.0)
    top_p = _field(body, "top_p", "number")
    top_k = _field(body, "top_k", "int")
    try:  # the sampler's own rules (temperature 1e-9 cannot be divided by, say)
        check_sampling(temperature, top_k, top_p)
    except UserError as e:  # its message is short: it quotes a number
        raise RequestError(f"'{e.field}' {e.message}", e.field) from None
    n = _field(body, "n", "int", 1)
    _check(1 <= n <= MAX_N, "n", f"an integer from 1 to {MAX_N}", n)
    seed = _field(body, "seed", "int")
    _check(seed is None or seed >= 0, "seed", "an integer >= 0", seed)
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options",
                           code="invalid_type")
    return CompletionRequest(
        prompt=prompt, max_tokens=max_tokens, temperature=float(temperature), top_p=top_p,
        top_k=top_k, n=n, seed=seed, stop=_stops(body) + ((CHAT_STOP,) if chat else ()),
        stream=_field(body, "stream", "bool", False),
        include_usage=_field(options, "include_usage", "bool", False), chat=chat,
        logprobs=logprobs)


def encode_prompt(tokenizer, prompt: str, vocab_size: int, chat: bool = False,
                  keep: int | None = None) -> list[int]:
    """The prompt's token ids, only the last `keep` of them when given (the model reads at most
    block_size tokens: a 1 MB prompt need not become a million ids); a RequestError naming the
    characters the tokenizer lacks (in the part that is read).

    Only the end of a long prompt is encoded: its last keep * (the longest token's length) * 2
    characters hold at least 2 * keep tokens, and a token cut in two where that tail begins
    falls among the ones dropped."""
    if keep is not None:
        longest = max(map(len, getattr(tokenizer, "token_bytes", [b"x"])))
        prompt = prompt[-keep * longest * 2:]
    try:
        ids = list(tokenizer.encode(prompt)) if prompt else []
    except ValueError as e:  # the tokenizer's message names the unknown characters
        where = "messages (in the chat template)" if chat else "prompt"
        raise RequestError(f"{where}: {e}", where.split()[0], code="unknown_characters") from None
    if keep is not None:
        ids = ids[-keep:]
    if ids and max(ids) >= vocab_size:
        raise RequestError(f"the prompt encodes to token id {max(ids)} but the model has only "
                           f"{vocab_size}; the checkpoint's tokenizer and model disagree",
                           status=500, code="server_error", type="server_error")
    return ids


# ---- the text of one choice, token by token ----------------------------------------------------
class TextStream:
    """Token ids in, text out, ready to send: a byte-level token that ends inside a UTF-8
    character is held back until the character is whole, and so is any text that might be the
    beginning of a stop string; the text ends before the first stop string.

    >>> from gpt.tokenizer import CharTokenizer
    >>> tok = CharTokenizer.from_text("ab\\n")
    >>> s = TextStream(tok, ["\\n\\n"])
    >>> [s.push(i) for i in tok.encode("ab\\nb\\n\\na")], s.stopped
    (['a', 'b', '', '\\nb', '', '', ''], True)
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        byte_level = hasattr(tokenizer, "decode_bytes")
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if byte_level else None
        self.pending = ""  # decoded text not sent yet: it may be the start of a stop string
        self.stopped = False

    def push(self, token: int | None, final: bool = False) -> str:
        """The text that token `token` lets us send now (maybe ""); `final` flushes the rest."""
        if self.stopped:
            return ""
        if self.utf8 is not None:
            raw = self.tokenizer.decode_bytes([token]) if token is not None else b""
            self.pending += self.utf8.decode(raw, final=final)
        elif token is not None:
            self.pending += self.tokenizer.decode([token])
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: send what comes before it, and nothing more
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0 if final else self._stop_prefix()
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[
            len(self.pending) - hold :]
        return out

    def finish(self) -> str:
        """The held-back text once sampling has ended (a partial character becomes U+FFFD)."""
        return self.push(None, final=True)

    def _stop_prefix(self) -> int:
        """Length of the longest end of `pending` that could begin a stop string."""
        text = self.pending
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0


@dataclass
class Choice:
    """One answer as it is being sampled: the text so far, its token count and why it ended
    ("length": max_tokens reached; "stop": a stop string came up). EOS is never drawn, as in
    gpt.sample: gpt.train's data never marks where a text ends, so a model has not learnt it."""

    index: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    # (token, its log-probability, [(alternative, log-probability)] most probable first) for
    # each token whose text has been sent, when the request asked for logprobs
    logprobs: list = field(default_factory=list)


# ---- the answers' JSON -------------------------------------------------------------------------
@dataclass
class Answer:
    """What every piece of one response shares: its id, time, model name and kind."""

    model: str
    chat: bool
    tokenizer: object = None  # to spell out the tokens of logprobs
    logprobs: bool = False  # whether the request asked for them
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self._event_head: str | None = None  # text_event's template, made on first use

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, choices: list[Choice], prompt_tokens: int) -> dict:
        """The non-streamed response."""
        if self.chat:
            rows = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": self.logprobs_body(c.logprobs),
                     "finish_reason": c.finish_reason} for c in choices]
        else:
            rows = [{"index": c.index, "text": c.text, "logprobs": self.logprobs_body(c.logprobs),
                     "finish_reason": c.finish_reason} for c in choices]
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": rows, "usage": usage(prompt_tokens, choices)}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False, logprobs: list | None = None, offset: int = 0) -> dict:
        """One server-sent event's data: a piece of text (with the logprobs of its tokens;
        `offset`: where it starts in the choice's text), or a choice's end (text None)."""
        lp = self.logprobs_body(logprobs or [], offset) if text is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            row = {"index": index, "delta": delta, "logprobs": None if role else lp,
                   "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [row]}
        row = {"index": index, "text": text or "", "logprobs": lp,
               "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [row]}

    def text_event(self, index: int, text: str) -> str:
        """The server-sent event of a piece of text without logprobs: what
        `"data: " + json.dumps(self.chunk(index, text)) + "\n\n"` gives, written from a
        template (a stream sends one per token; json.dumps of the whole dict costs more)."""
        if self._event_head is None:
            head = json.dumps(self._head("chat.completion.chunk" if self.chat
                                         else "text_completion"), separators=(",", ":"))
            self._event_head = 'data: ' + head[:-1] + ',"choices":[{"index":'
        piece = json.dumps(text)
        body = f'"delta":{{"content":{piece}}}' if self.chat else f'"text":{piece}'
        return (f'{self._event_head}{index},{body},"logprobs":null,"finish_reason":null}}]}}'
                "\n\n")

    def logprobs_body(self, entries: list, offset: int = 0) -> dict | None:
        """OpenAI's logprobs object for (token, logprob, top alternatives) entries: chat's
        {"content": [{token, logprob, bytes, top_logprobs}]}, or the completions API's
        {tokens, token_logprobs, top_logprobs, text_offset}; None when not asked for."""
        if not self.logprobs:
            return None

        def spelled(t: int) -> tuple[str, list[int]]:
            tok = self.tokenizer
            raw = tok.decode_bytes([t]) if hasattr(tok, "decode_bytes") else \
                tok.decode([t]).encode("utf-8")
            return raw.decode("utf-8", errors="replace"), list(raw)

        if self.chat:
            def item(t: int, lp: float) -> dict:
                text, raw = spelled(t)
                return {"token": text, "logprob": lp, "bytes": raw}

            return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]}
                                for t, lp, top in entries]}
        tokens = [spelled(t)[0] for t, _, _ in entries]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{spelled(a)[0]: b for a, b in top} for _, _, top in entries],
                "text_offset": offsets if tokens else []}

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, choices)}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    done = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done,
            "total_tokens": prompt_tokens + done}
