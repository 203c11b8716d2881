"""`python -m gpt.serve`: a trained model behind an OpenAI-compatible HTTP API (completions and
chat, whole or streamed as server-sent events), with an API key, CORS, a health check and a
page to try it in a browser. The only importer of the web stack (Starlette on uvicorn: the
`serve` extra); the API's rules and shapes live in gpt/api.py.

    python -m gpt.serve --out-dir out --port 8000 --api-key KEY

The model runs in one thread, the Batcher (gpt/batching.py): the sequences of all requests
advance together, one batched decoder step per token, each with its own KV cache slot,
settings and random generator; the event loop goes on serving other clients meanwhile, and a
client that disconnects leaves its slot within a step. --max-batch, --max-queue and
--time-limit bound the work; GET /metrics reports it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import cli
from .api import (
    Answer,
    CompletionRequest,
    RequestError,
    encode_prompt,
    parse_request,
    quote,
)
from .batching import Batcher, QueueFull, Sequence, ServeMetrics
from .config import SampleDtype, check_choice, setting
from .errors import UserError
from .sample import SAMPLING_THREADS  # BLAS threads while serving (why: see gpt/sample.py)

MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB gets 413
BODY_TIMEOUT_S = 30.0  # a request body still arriving after this long gets 408
HEADER_TIMEOUT_S = 10.0  # ... and request headers: 408, and the connection is closed
STREAM_INTERVAL_S = 0.005  # a stream's text is written at most this often (see Mailbox)
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")  # no API key needed (they hold no secrets)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # the Host names a loopback bind accepts
log = logging.getLogger("gpt.serve")


@dataclass
class ServeConfig:
    """The settings of `python -m gpt.serve`, one field per flag."""

    out_dir: str = setting("out", "the training run's folder", metavar="PATH")
    host: str = setting("127.0.0.1", "address to listen on (127.0.0.1: this machine only)",
                        metavar="ADDRESS")
    port: int = setting(8000, "TCP port, 0 = any free one")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY'",
                                  shown="$GPT_API_KEY, else none", metavar="KEY")
    cors_origin: list[str] = setting(None, "let pages from these origins call the API (e.g. "
                                     "http://localhost:3000)", shown="none", metavar="ORIGIN",
                                     default_factory=list)
    max_tokens: int = setting(1024, "the most tokens one choice may ask for")
    model_name: str | None = setting(None, "the model's id in the API",
                                     shown="the run folder's name", metavar="NAME")
    latest: bool = setting(False, "serve the latest checkpoint (OUT/checkpoint) instead of the "
                           "one with the lowest val loss (OUT/best, when it exists)")
    dtype: SampleDtype = setting("checkpoint", "compute in float32, float64 or bfloat16 (bf16 "
                                 "matmul operands); checkpoint: as the run trained")
    max_batch: int = setting(8, "sequences decoded together, one batched step per token (a "
                             "request's n choices count n)")
    max_queue: int = setting(64, "sequences that may wait for a free slot; past that a request "
                             "gets 429 with Retry-After")
    time_limit: float = setting(300.0, "seconds a request may take, waiting included; then its "
                                "choices end with finish_reason 'length' (0: no limit)",
                                metavar="SECONDS")
    max_connections: int = setting(256, "connections served at once; past that uvicorn answers "
                                   "503")
    stream_interval: float = setting(STREAM_INTERVAL_S, "seconds between two writes of a "
                                     "stream's text: the tokens sampled in between go out "
                                     "together (a first text and the end go at once); 0: "
                                     "every token as soon as it is sampled", metavar="SECONDS")

    def validate(self) -> ServeConfig:
        """Raise UserError (one line) for values that cannot work; return self."""
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("is empty; give a key, or leave the flag out", field="api_key")
        if not 0 <= self.port <= 65535:
            raise UserError(f"must be in 0..65535, got {self.port}", field="port")
        if self.max_tokens < 1:
            raise UserError(f"must be >= 1, got {self.max_tokens}", field="max_tokens")
        check_choice(self, "dtype")
        for origin in self.cors_origin:
            scheme, sep, rest = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not sep or not rest
                                  or "/" in rest):
                raise UserError(f"{origin!r} is not an origin: write scheme://host[:port] with "
                                "no path, e.g. http://localhost:3000", field="cors_origin")
        if self.model_name is not None and not self.model_name.strip():
            raise UserError("is empty", field="model_name")
        for name in ("max_batch", "max_connections"):
            if getattr(self, name) < 1:
                raise UserError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.max_queue < 0:
            raise UserError(f"must be >= 0, got {self.max_queue}", field="max_queue")
        if not 0 <= self.stream_interval <= 1:
            raise UserError(f"must be a number of seconds from 0 to 1, got "
                            f"{self.stream_interval}", field="stream_interval")
        if not self.time_limit >= 0 or self.time_limit == math.inf:
            raise UserError(f"must be a number of seconds >= 0 (0: no limit), got "
                            f"{self.time_limit}", field="time_limit")
        return self


# ---- one request's sampling, in the batcher's thread ------------------------------------------
def choice_rngs(seed: int | None, n: int, max_tokens: int) -> list[np.random.Generator]:
    """A random generator per choice. With a seed, choice j's generator is gpt.sample's (one
    generator for all n, in order) as it stands after choices 0..j-1 drew max_tokens numbers
    each (one per token): the n choices can then be sampled side by side and still give
    `python -m gpt.sample --num-samples n`'s texts. (A choice cut short by a stop string draws
    fewer; the next choice starts where it would have after all max_tokens.)"""
    if seed is None:
        return [np.random.default_rng() for _ in range(n)]
    return [np.random.Generator(np.random.PCG64(seed).advance(j * max_tokens)) for j in range(n)]


class Mailbox:
    """Events from the batcher's thread to the event loop. The loop is woken (a write to its
    self-pipe, then a turn of the GIL) at most once for all the events that wait, and only
    if it has taken the earlier ones already; for text, at most every `interval` seconds
    (`--stream-interval`): the tokens sampled in between go out together, one write per
    stream. A choice's first text and its end (or an error) wake it at once.

    Why: every write to a client is a system call that lets go of the GIL, and the event
    loop's thread and the batcher's then hand it back and forth, each waiting for the other
    to be scheduled. Eight streams written at every step cost that eight times a step; a few
    milliseconds of tokens written together cost it once (docs/serving.md, How fast)."""

    def __init__(self, interval: float = 0.0):
        self.interval = interval
        self.lock = threading.Lock()
        self.pending: dict = {}  # loop -> {Generation: [event, ...]} not delivered yet
        self.urgent: set = set()  # the loops with a first text, an end or an error waiting
        self.woken: dict = {}  # loop -> when its last delivery was asked for
        self.coming: set = set()  # the loops that have a delivery coming

    def post(self, loop: asyncio.AbstractEventLoop, gen: Generation, event: tuple,
             urgent: bool = False) -> None:
        with self.lock:
            self.pending.setdefault(loop, {}).setdefault(gen, []).append(event)
            if urgent:
                self.urgent.add(loop)

    def flush(self) -> None:  # the Batcher's after_step
        now = time.perf_counter()
        with self.lock:
            loops = [loop for loop in self.pending if loop not in self.coming and (
                loop in self.urgent or now - self.woken.get(loop, -math.inf) >= self.interval)]
            for loop in loops:
                self.coming.add(loop)
                self.urgent.discard(loop)
                self.woken[loop] = now
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self.deliver, loop)
            except RuntimeError:  # a closed loop: the server is stopping
                with self.lock:
                    self.pending.pop(loop, None)
                    self.coming.discard(loop)

    def deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """In the loop: the events waiting for it, each request's in one hand-over."""
        with self.lock:
            by_request = self.pending.pop(loop, {})
            self.coming.discard(loop)
            self.urgent.discard(loop)  # (an urgent event that came meanwhile goes now too)
        for gen, events in by_request.items():
            gen.receive(events)


class Generation:
    """The choices of one request, decoded by the server's Batcher among everyone else's. The
    batcher's thread sends events back (through the Mailbox, to `receive`):
    ("token", index, piece, logprob entries, offset), ("end", index, finish_reason),
    ("error", message); event_batches() stops when every choice has ended. `cancel()` makes
    the batcher drop them within a step."""

    def __init__(self, app_state: ModelState, ids: list[int], req: CompletionRequest):
        self.state, self.req = app_state, req
        self.inbox: list[tuple] = []  # events received, not yet taken by event_batches
        self.arrived: asyncio.Future | None = None  # what event_batches waits on
        self._loop = asyncio.get_running_loop()
        tokenizer, block = app_state.tokenizer, app_state.model.config.block_size
        deadline = time.perf_counter() + (app_state.time_limit or math.inf)
        self.seqs = [Sequence(req, ids or [tokenizer.bos_id], rng, j, tokenizer, self._emit,
                              deadline, block)
                     for j, rng in enumerate(choice_rngs(req.seed, req.n, req.max_tokens))]
        self.choices = [seq.choice for seq in self.seqs]
        self.unfinished = req.n

    def start(self) -> None:
        """Queue the choices; a RequestError (429, Retry-After) when the queue is full."""
        batcher = self.state.batcher
        if len(self.seqs) > batcher.max_batch + batcher.max_queue:  # could never fit
            raise RequestError(f"'n' is {len(self.seqs)} but this server decodes at most "
                               f"{batcher.max_batch} sequences with {batcher.max_queue} "
                               "waiting (its --max-batch and --max-queue)", "n")
        try:
            self.state.batcher.submit(self.seqs)
        except QueueFull:
            raise RequestError("the server is busy: its queue of requests waiting for a slot "
                               "is full; try again in a moment", status=429,
                               code="rate_limit_exceeded", type="rate_limit_error") from None
        self.state.count(active=+1)
        self.state.live.add(self)

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancelled = True
        self.state.live.discard(self)

    def _emit(self, kind: str, *data) -> None:  # in the batcher's thread
        if kind == "token":
            self.state.count(sampled=1)
        elif kind == "end":
            self.unfinished -= 1
            if self.unfinished == 0:
                self.state.count(active=-1)
        # a choice's first text (offset 0; the first tokens' text may have been held back)
        urgent = kind != "token" or (data[1] != "" and data[3] == 0)
        self.state.mailbox.post(self._loop, self, (kind, *data), urgent)

    def receive(self, events: list[tuple]) -> None:  # in the event loop (Mailbox.deliver)
        self.inbox.extend(events)
        if self.arrived is not None and not self.arrived.done():
            self.arrived.set_result(None)

    async def event_batches(self) -> AsyncIterator[list[tuple]]:
        """The events as they come, a list of all that are waiting at a time, until every
        choice has ended (or an error)."""
        ended = 0
        while ended < len(self.seqs):
            if not self.inbox:
                self.arrived = self._loop.create_future()
                await self.arrived
            batch, self.inbox = self.inbox, []
            for i, event in enumerate(batch):
                ended += event[0] == "end"
                if event[0] == "error":
                    yield batch[: i + 1]
                    return
            yield batch


@dataclass
class ModelState:
    """What the requests share: the model (read only), its name and limits, the batcher that
    decodes them, and counters."""

    model: object
    tokenizer: object
    name: str
    max_tokens: int
    batcher: Batcher | None = None
    metrics: ServeMetrics | None = None
    mailbox: Mailbox | None = None
    time_limit: float | None = None  # seconds a request may take, queue included
    active: int = 0  # requests being generated now
    sampled: int = 0  # tokens sampled since the start
    live: set = field(default_factory=set, repr=False)  # Generations under way (event loop's)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stop_all(self, message: str) -> None:
        """End every request under way with an error event carrying `message` (a stream
        writes it and closes; a whole answer becomes that error), and stop its sampling. In
        the event loop: uvicorn calls this as it starts to shut down, so that it does not
        have to cancel the open streams (a traceback each) once its grace period is over."""
        for gen in list(self.live):
            gen.receive([("error", message)])
            gen.cancel()

    def count(self, active: int = 0, sampled: int = 0) -> None:
        with self._lock:
            self.active += active
            self.sampled += sampled


# ---- the HTTP side ------------------------------------------------------------------------------
def error_response(err: RequestError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def sse(obj) -> str:
    """One server-sent event."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


async def read_json(request: Request, timeout: float = BODY_TIMEOUT_S):
    """The request's JSON body; 415 unless it says it is JSON, 413 past MAX_BODY_BYTES, 408
    when it has not all come within `timeout` seconds, 400 if it is not JSON.

    Requiring `Content-Type: application/json` keeps other web pages out: a page may POST
    text/plain anywhere without asking first, but application/json needs a CORS preflight."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(f"the request body must be JSON, sent with 'Content-Type: "
                           f"application/json' (got {quote(kind or 'none')})", status=415,
                           code="unsupported_media_type")
    too_big = RequestError(f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                           status=413, code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            if len(body) + len(chunk) > MAX_BODY_BYTES:
                raise too_big
            body.extend(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout:g} s",
                           status=408, code="request_timeout") from None
    except ClientDisconnect:  # nobody to answer: one line in the log, no traceback
        log.warning("gpt.serve: a client went away while sending its request (%s %s)",
                    request.method, request.url.path)
        raise
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON; too deep; a huge int
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise RequestError(f"the request body is not valid JSON ({quote(why)[1:-1]})",
                           code="invalid_json") from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class App:
    """The routes, bound to one ModelState."""

    def __init__(self, state: ModelState, body_timeout: float = BODY_TIMEOUT_S):
        self.state, self.body_timeout = state, body_timeout
        self.page = resources.files("gpt").joinpath("serve.html").read_text(encoding="utf-8")
        self.page_headers = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY",
                             "Content-Security-Policy": page_policy(self.page)}

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def page_html(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers=self.page_headers)

    async def metrics(self, request: Request) -> Response:
        """Prometheus' text format: requests, tokens, sequences active and queued, and the
        histograms of batch size, time to first token and time per token."""
        batcher = self.state.batcher
        text = self.state.metrics.text(len(batcher.active), batcher.queued)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def favicon(self, request: Request) -> Response:
        return Response(status_code=204)  # no icon (browsers ask for one on every page)

    async def models(self, request: Request) -> Response:
        card = {"id": self.state.name, "object": "model", "created": 0, "owned_by": "gpt.serve"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.complete(request, chat=True)

    async def complete(self, request: Request, chat: bool) -> Response:
        endpoint = "chat/completions" if chat else "completions"
        try:
            response = await self.answer(request, chat)
        except RequestError as e:
            self.state.metrics.request(endpoint, e.status)
            if e.status == 429:
                return error_response(e, {"Retry-After": "1"})
            raise
        self.state.metrics.request(endpoint, response.status_code)
        return response

    async def answer(self, request: Request, chat: bool) -> Response:
        state = self.state
        req = parse_request(await read_json(request, self.body_timeout), chat, state.max_tokens, state.name)
        # encoding a long prompt (BPE) takes a while: not on the event loop either. Only the
        # last block_size tokens are kept: the model never reads further back.
        cfg = state.model.config
        ids = await asyncio.to_thread(encode_prompt, state.tokenizer, req.prompt,
                                      cfg.vocab_size, chat, cfg.block_size)
        gen = Generation(state, ids, req)
        answer = Answer(state.name, chat, state.tokenizer, req.logprobs is not None)
        gen.start()  # 429 when the queue is full
        if req.stream:
            # (the background task cancels too: a client gone before the stream starts)
            return StreamingResponse(self.stream(gen, answer, len(ids)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.cancel))
        try:
            waiting = asyncio.ensure_future(until_disconnected(request))
            # the client gone: stop at once (its next events may wait for --stream-interval)
            waiting.add_done_callback(lambda _: gen.cancel())
            try:
                async for batch in gen.event_batches():
                    if batch[-1][0] == "error":
                        raise RequestError(batch[-1][1], status=500, code="server_error",
                                           type="server_error")
                    if waiting.done():  # the client has gone: stop sampling for nobody
                        return Response(status_code=499)
            finally:
                waiting.cancel()
        finally:
            gen.cancel()
        return JSONResponse(answer.whole(gen.choices, len(ids)))

    async def stream(self, gen: Generation, answer: Answer, prompt_tokens: int
                     ) -> AsyncIterator[str]:
        """The server-sent events of one streamed request: a chunk per piece of text, a last
        chunk per choice with its finish_reason, then [DONE]. If the client disconnects,
        Starlette cancels this generator and the `finally` stops the sampling."""
        try:
            if answer.chat:
                for c in gen.choices:
                    yield sse(answer.chunk(c.index, role=True))
            async for batch in gen.event_batches():  # one write for all that have come
                out = []
                for event in batch:
                    if event[0] == "token":
                        if event[2] and not answer.logprobs:  # (text held back: nothing)
                            out.append(answer.text_event(event[1], event[2]))
                        elif event[2]:
                            out.append(sse(answer.chunk(event[1], text=event[2],
                                                        logprobs=event[3], offset=event[4])))
                    elif event[0] == "end":
                        out.append(sse(answer.chunk(event[1], finish_reason=event[2])))
                    else:  # "error": the status line has gone out already
                        out.append(sse(RequestError(event[1], status=500, code="server_error",
                                                    type="server_error").body()))
                        yield "".join(out)
                        return
                if out:
                    yield "".join(out)
            if gen.req.include_usage:
                yield sse(answer.usage_chunk(gen.choices, prompt_tokens))
            yield sse("[DONE]")
        finally:
            gen.cancel()


def page_policy(page: str) -> str:
    """The page's Content-Security-Policy: nothing from elsewhere, no frames around it, and only
    its own inline script and style (named by their SHA-256), talking to this server."""
    def digest(tag: str) -> str:
        body = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


class Guard:
    """ASGI middleware, outermost: refuses what must never reach the routes, and marks every
    answer `X-Content-Type-Options: nosniff`.
    - both Transfer-Encoding and Content-Length (behind a proxy that reads the other one, the
      rest of the body would be taken as a second request: request smuggling): 400;
    - with `loopback_only`, a Host that is not a loopback name (a web page on a DNS name that
      now points at 127.0.0.1, "DNS rebinding", would send its own name): 421."""

    def __init__(self, app, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        err = None
        if "transfer-encoding" in headers and "content-length" in headers:
            err = RequestError("a request may not have both Transfer-Encoding and "
                               "Content-Length", code="bad_request")
        elif self.loopback_only and not loopback_host(headers.get("host", "")):
            err = RequestError(f"this server answers only to {', '.join(LOOPBACK_HOSTS)} "
                               f"(got Host {quote(headers.get('host', ''))}); to serve other "
                               "names, listen on another --host", status=421,
                               code="misdirected_request")

        async def send_nosniff(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options",
                                                             b"nosniff")]
            await send(message)

        if err is not None:
            await error_response(err, {"Connection": "close"})(scope, receive, send_nosniff)
            return
        await self.app(scope, receive, send_nosniff)


def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine by a loopback name (any port)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOOPBACK_HOSTS


class KeyCheck:
    """ASGI middleware: every request but the public paths and CORS preflights (OPTIONS) needs
    `Authorization: Bearer KEY`, compared in constant time; otherwise 401."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and \
                scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer"
                    and hmac.compare_digest(token.strip().encode("utf-8"), self.key)):
                err = RequestError("missing or wrong API key: send the header "
                                   "'Authorization: Bearer KEY'", status=401,
                                   code="invalid_api_key", type="authentication_error")
                await error_response(err, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def on_request_error(request: Request, exc: RequestError) -> Response:
    return error_response(exc)


async def on_client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=499)  # never sent: the client has gone (read_json logged it)


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        msg = f"no route {request.url.path}; the routes are /v1/completions, " \
              "/v1/chat/completions, /v1/models, /health and /"
        err = RequestError(msg, status=404, code="not_found")
    else:
        err = RequestError(f"{request.method} {request.url.path}: {exc.detail}",
                           status=exc.status_code, code="http_error")
    return error_response(err, exc.headers)


async def on_server_error(request: Request, exc: Exception) -> Response:
    return error_response(RequestError(f"internal error: {type(exc).__name__}", status=500,
                                       code="server_error", type="server_error"))


def create_app(model, tokenizer, model_name: str, max_tokens: int = 1024,
               api_key: str | None = None, cors_origins: list[str] | tuple = (),
               loopback_only: bool = True, body_timeout: float = BODY_TIMEOUT_S,
               max_batch: int = 8, max_queue: int = 64,
               time_limit: float | None = None,
               stream_interval: float = STREAM_INTERVAL_S) -> Starlette:
    """The ASGI application serving `model`. `app.state.model` is its ModelState.
    `loopback_only`: answer only requests whose Host is a loopback name (for a server that
    listens on a loopback address: see Guard). `max_batch` sequences are decoded together,
    `max_queue` more may wait (then 429); `time_limit` seconds per request (None: none);
    a stream's text is written at most every `stream_interval` seconds (Mailbox)."""
    metrics, mailbox = ServeMetrics(max_batch), Mailbox(stream_interval)
    state = ModelState(model, tokenizer, model_name, max_tokens,
                       Batcher(model, max_batch, max_queue, metrics, mailbox.flush), metrics,
                       mailbox, time_limit)
    routes = App(state, body_timeout)
    middleware = [Middleware(Guard, loopback_only=loopback_only)]
    if cors_origins:  # before the key check, so preflights and 401s carry the CORS headers
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"], max_age=600))
    if api_key:
        middleware.append(Middleware(KeyCheck, api_key=api_key))
    app = Starlette(
        routes=[
            Route("/", routes.page_html, methods=["GET"]),
            Route("/favicon.ico", routes.favicon, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
        ],
        middleware=middleware,
        lifespan=stops_with_the_server(state.batcher),
        exception_handlers={RequestError: on_request_error, HTTPException: on_http_error,
                            ClientDisconnect: on_client_gone, Exception: on_server_error},
    )
    app.state.model = state
    return app


def stops_with_the_server(batcher: Batcher):
    """A Starlette lifespan that stops the batcher's thread when the server shuts down."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.stop()

    return lifespan


# ---- listening ----------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_warning(host: str, api_key: str | None) -> str | None:
    """The warning for listening beyond this machine without a key (None when all is well)."""
    if is_loopback(host) or api_key:
        return None
    return (f"gpt.serve: warning: listening on {host} without an API key: anyone who can "
            "reach this machine can use the model (set --api-key or GPT_API_KEY)")


def make_server(app, max_connections: int = 256, header_timeout: float = HEADER_TIMEOUT_S,
                **options):
    """A uvicorn server for `app`. Past `max_connections` open connections and requests,
    uvicorn answers 503 at once (uvicorn's limit_concurrency); a connection whose request
    headers have not all come `header_timeout` seconds after it opened (or after its last
    answer) gets 408 and is closed."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3,
                            server_header=False, limit_concurrency=max_connections,
                            http=with_header_timeout(header_timeout), **options)
    state = getattr(getattr(app, "state", None), "model", None)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Ctrl-C with streams open: end them (an error event, then the stream closes),
            # then uvicorn's own shutdown, which now has nothing left to cancel
            if isinstance(state, ModelState):
                state.stop_all("the server is shutting down; the answer stops here")
            await super().shutdown(sockets=sockets)

    return Server(config)


def with_header_timeout(seconds: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for each request's line and headers (uvicorn has
    none: a client that connects and sends a byte now and then would hold its connection
    forever). When it passes with no request under way, the client gets 408 and is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()  # the next request on this connection gets the same time

        def connection_lost(self, exc) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def arm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(seconds, self.too_slow)

        def too_slow(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request yet
            if waiting and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()

    return HeaderTimeout


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, **server_options) -> Iterator[str]:
    """Serve `app` from a background thread during a with-block; yields its URL. For tests,
    benchmarks and notebooks (port 0: a free port); `server_options` go to make_server."""
    sock = bind(host, port)
    server = make_server(app, **server_options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(1000):  # 10 s at most
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("the server did not start within 10 s")
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# ---- the command line ---------------------------------------------------------------------------
def build_parser() -> cli.Parser:
    p = cli.Parser("python -m gpt.serve", "Serve a gpt.train checkpoint over an "
                   "OpenAI-compatible HTTP API, with a page to try it at /.")
    cli.add_config_flags(p, ServeConfig)
    return p


def parse_config(argv: list[str] | None = None) -> ServeConfig:
    """The flags as a checked ServeConfig (the API key from $GPT_API_KEY if not given)."""
    cfg, given = cli.parse_config(build_parser(), ServeConfig, argv)
    if "api_key" not in given:
        cfg.api_key = os.environ.get("GPT_API_KEY") or None
    return cfg.validate()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C while loading: nothing to clean up (serving handles its own Ctrl-C)
    return cli.run(lambda: serve(parse_config(argv)), tune_process=True)


def serve(cfg: ServeConfig) -> int:
    """Load the run's checkpoint (its best unless cfg.latest, as gpt.sample), listen, and
    serve until Ctrl-C (or SIGTERM); 0 when stopped cleanly."""
    import tensorlite

    from .checkpoint import checkpoint_path, load_model, uses_best

    tensorlite.set_num_threads(SAMPLING_THREADS)
    source = checkpoint_path(cfg.out_dir, uses_best(cfg.out_dir, cfg.latest))
    model, tokenizer = load_model(cfg.out_dir, cfg.dtype, latest=cfg.latest)
    name = cfg.model_name or os.path.basename(os.path.abspath(cfg.out_dir))
    app = create_app(model, tokenizer, name, cfg.max_tokens, cfg.api_key, cfg.cors_origin,
                     loopback_only=is_loopback(cfg.host), max_batch=cfg.max_batch,
                     max_queue=cfg.max_queue, time_limit=cfg.time_limit or None,
                     stream_interval=cfg.stream_interval)
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as e:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}; "
                      "choose another --port (0 picks a free one)") from None
    warning = open_warning(cfg.host, cfg.api_key)
    if warning:
        print(warning, file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the same way on SIGTERM
    try:  # a Ctrl-C that comes right after the URL line is a clean stop too
        print(f"gpt.serve: serving {name} ({source}) at {url_of(sock)} (Ctrl-C to stop)",
              flush=True)
        make_server(app, cfg.max_connections).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled after shutting down
        pass
    finally:
        sock.close()
    print("gpt.serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
