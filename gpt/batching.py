"""Continuous batching for gpt.serve: every sequence being generated (each choice of each
request) advances together, one batched decoder step per token, as llama.cpp's server slots and
vLLM's scheduler do. At a small model's size a one-token step costs mostly per-call overhead
(~30 small NumPy calls per layer), so decoding 8 sequences in one step (one C call for all the
blocks: tensorlite's decode_step) costs little more than 1.

    BatchDecoder   the model's forward for S slots: a KV cache per slot, a prompt read into one
                   slot (`prefill`), then one new token for each of several slots (`step`)
    Sequence       one choice being sampled: its context, settings, random generator and text
    Batcher        the thread that owns the BatchDecoder: sequences wait in a bounded queue,
                   join at the next step when a slot is free, leave when they finish, their
                   client goes away or their time is up

A sequence samples exactly as gpt.sample's `sample_tokens` does (the same filtering, one
uniform draw per token, the same sliding window), with its own settings and generator.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from tensorlite import kernels, references

from .api import Choice, CompletionRequest, TextStream
from .config import check_sampling
from .model import by_rows
from .sample import filter_probs, filter_rows, keep_after_slide, sample_from, sample_rows

# The formulas are tensorlite's own (one home each): a step's blocks are tensorlite's
# decode_step kernel; prefill_many's norms and activation are the model's Decoder's, and its
# softmax is tensorlite's NumPy reference, the one the Decoder's causal softmax calls.


# ---- the batched forward --------------------------------------------------------------------
class BatchDecoder:
    """GPT's forward for sampling many sequences at once. Each of `slots` sequences has its KV
    cache in one (n_layer, slots, H, block_size + 1, hd) array pair; `lengths[s]` positions
    of slot s are filled.

    prefill(s, ids) reads a prompt into slot s with the model's own Decoder (its cache pointed
    at the slot's part of the arrays): the same numbers as gpt.sample's first call.
    step(slots, tokens) appends one token to each of those slots: every linear layer is then ONE
    (B, C) @ (C, N) product for all B sequences, and the attention reads each sequence's own
    keys up to its own length (the positions past it are masked), so prompts of different
    lengths batch together. Its blocks are tensorlite's `decode_step` kernel: for a float32
    model one C call (its NumPy reference, references.decode_step, is the same math and the
    fallback), which holds no GIL while it runs, so gpt.serve's event loop writes to clients
    on the other core meanwhile (docs/serving.md). That loop reads packed copies of the
    weights made at the first step: a model whose weights change afterwards (load_state_dict,
    more training) needs a new BatchDecoder (gpt.serve loads its model once).

    The batched products round differently from one sequence's (BLAS, or the C loop, sums in
    another order), so a logit can differ from the lone Decoder's in its last float32 bits; a
    sampled token differs only if its uniform draw falls within that much of a boundary
    between two tokens' cumulative probabilities (docs/serving.md).
    """

    def __init__(self, model, slots: int):
        cfg, dt = model.config, model.dtype
        self.config, self.slots = cfg, slots
        L, H, T, hd = cfg.n_layer, cfg.n_head, cfg.block_size, cfg.head_dim
        # T + 1 positions: the last is scratch, where the rows of slots outside a step write
        self.k = np.zeros((L, slots, H, T + 1, hd), dt)
        self.v = np.zeros((L, slots, H, T + 1, hd), dt)
        self.lengths = np.zeros(slots, np.int64)
        self.prefiller = model.decoder()  # reads prompts; its cache is swapped per slot
        self.wte, self.wpe = self.prefiller.wte, self.prefiller.wpe
        self.scale = dt.type(1.0 / math.sqrt(hd))
        d = self.prefiller
        # each block's 12 arrays in references.decode_step's order, and the Decoder's own
        # linear layer where the C loop should not run: a bf16 model (its operands rounded),
        # weights stored by rows (a GPT-2-sized model: row_dots reads them, with no packed copy)
        self.blocks = [tuple(a for layer in block for a in layer) for block in d.layers]
        plain = not d.bf16 and all(by_rows(w) is None for block in d.layers for w, _ in block)
        self.linear = None if plain else d.linear

    def prefill(self, slot: int, ids: list[int]) -> np.ndarray:
        """Read `ids` (at most block_size) into slot `slot` from position 0; the logits (V,)
        of the token after them (a copy)."""
        return self._alone(slot, ids, 0)

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Read prompts[b] (at most block_size ids) into slot slots[b] from position 0, for
        every b: the logits (B, V) of the token after each. One prompt goes through the
        model's Decoder (prefill); several through one forward, every linear layer ONE
        product for all their positions: the prompts are padded to the longest (the padding's
        keys land past a slot's length, where no query reads until a later token overwrites
        them), and each prompt's queries see its own keys, causally. (Sequences whose windows
        slide at the same step, as 8 requests started together do, read their last
        block_size/2 tokens again together.)"""
        if len(slots) == 1:
            return self.prefill(slots[0], prompts[0])[None]
        C, H, hd = self.config.n_embd, self.config.n_head, self.config.head_dim
        B, n = len(slots), max(map(len, prompts))
        lengths = np.array([len(p) for p in prompts])
        ids = np.zeros((B, n), np.int64)  # the padding: token 0
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        into = np.array(slots)
        x = (self.wte[ids] + self.wpe[:n]).reshape(B * n, C)  # (B*n, C)
        d = self.prefiller
        for i, (ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj) in enumerate(d.layers):
            qkv = d.linear(d.norm(x, ln_1), c_attn)  # (B*n, 3C): q | k | v
            q, k, v = qkv.reshape(B, n, 3, H, hd).transpose(2, 0, 3, 1, 4)  # (B, H, n, hd) each
            self.k[i, into, :, :n], self.v[i, into, :, :n] = k, v
            # as the model's Decoder: S^T = k q^T, keys along rows (a softmax down the columns
            # is one vectorised pass; along rows of n it would be a call per row), then P v
            att = references.causal_softmax_columns(k @ q.swapaxes(-1, -2), self.scale)
            y = (att.swapaxes(-1, -2) @ v).transpose(0, 2, 1, 3).reshape(B * n, C)  # (B*n, C)
            x += d.linear(y, attn_proj)
            x += d.linear(d.activation(d.linear(d.norm(x, ln_2), c_fc)), mlp_proj)  # (B*n, C)
        self.lengths[into] = lengths
        last = x.reshape(B, n, C)[np.arange(B), lengths - 1]  # (B, C): each prompt's last
        return d.head(d.norm(last, d.ln_f))  # (B, V)

    def _alone(self, slot: int, ids: list[int], start: int) -> np.ndarray:
        """The model's own Decoder on one slot: `ids` at positions start, start + 1, ..."""
        cache = self.prefiller.cache
        cache.k, cache.v = self.k[:, slot], self.v[:, slot]  # (L, H, T, hd) views
        cache.length = start
        logits = self.prefiller(ids).copy()
        self.lengths[slot] = cache.length
        return logits

    def step(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """Append token tokens[b] to slot slots[b] for every b; the logits (B, V) after each.

        One sequence alone goes through the model's Decoder (gpt.sample's own path). Several
        go together through every slot from 0 to the highest one used: the rows of the slots
        not in `slots` compute a token nobody reads (slots are handed out lowest first, so
        there are few), and in exchange each layer reads its keys and values as one view of
        the cache, not as a gathered copy."""
        if len(slots) == 1:
            return self._alone(slots[0], tokens, int(self.lengths[slots[0]]))[None]
        H, T = self.config.n_head, self.config.block_size
        S = max(slots) + 1
        ids, pos = np.zeros(S, np.int64), np.zeros(S, np.int64)  # idle slots: token 0 at 0
        ids[slots], pos[slots] = tokens, self.lengths[slots]  # the new tokens' positions
        if pos.max() >= T:
            raise ValueError("a slot's cache is full: its context must slide first")
        # where each row's key and value go: its position, or (a slot outside this step, which
        # may hold a prompt just read) the scratch position T, which no query reads
        put = np.full(S, T)
        put[slots] = pos[slots]
        x = self.wte[ids] + self.wpe[pos]  # (S, C)
        # every block, in one call: tensorlite's C loop (the GIL free all along) or its NumPy
        # reference, references.decode_step, which reads as the model's forward
        d = self.prefiller
        kernels.decode_step(x, put, pos, self.blocks, self.k, self.v, H, self.scale, d.layernorm,
                            d.gelu, self.linear)
        self.lengths[slots] += 1
        x = x[slots]  # (B, C): the rows someone reads
        return d.head(d.norm(x, d.ln_f))  # (B, V)


# ---- one choice being sampled ---------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log of softmax(logits), (V,) float64: what `logprobs` reports."""
    z = logits.astype(np.float64)
    z -= z.max()
    z -= np.log(np.exp(z).sum())
    return z


def most_probable(lp: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest values of lp, largest first (ties: the lower id first), without
    sorting all of a large vocabulary (GPT-2's 50,257) for each token."""
    if k == 0:
        return np.empty(0, np.int64)
    if k < lp.size:
        kth = np.partition(lp, lp.size - k)[lp.size - k]  # the k-th largest value
        above = np.flatnonzero(lp > kth)
        ids = np.concatenate([above, np.flatnonzero(lp == kth)[: k - above.size]])  # (ties)
    else:
        ids = np.arange(lp.size)
    return ids[np.lexsort((ids, -lp[ids]))]


class Sequence:
    """One choice of one request, as the Batcher samples it: its context (ids[start:], at most
    block_size tokens), its settings and generator, its text so far, and where its events go.
    `emit(kind, *data)` is called from the Batcher's thread: ("token", index, text_piece,
    logprob entries, offset) after each token (the entries of the tokens whose text goes out
    with this piece, which starts at `offset` of the choice's text), then ("end", index,
    finish_reason); finish_reason None: the client has gone."""

    def __init__(self, req: CompletionRequest, ids: list[int], rng: np.random.Generator,
                 index: int, tokenizer, emit: Callable, deadline: float, block_size: int):
        self.req, self.rng, self.emit, self.deadline = req, rng, emit, deadline
        self.ids, self.block = list(ids), block_size
        self.start = max(0, len(self.ids) - block_size)  # the context is ids[start:]
        self.choice = Choice(index)
        self.text = TextStream(tokenizer, req.stop)
        self.eos_id = tokenizer.eos_id
        self.slot: int | None = None
        self.in_cache = False  # ids[start:-1] are in the slot's cache: step with ids[-1]
        self.cancelled = False  # set from the request's side when its client goes away
        self.ended = False
        self.unsent: list = []  # logprob entries of tokens whose text is held back
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None
        check_sampling(req.temperature, req.top_k, req.top_p)  # (as filter_probs does)

    def advance(self, token: int, lp: np.ndarray | None) -> bool:
        """Take `token`, drawn for this choice (Batcher.sample); `lp`, the log-probabilities
        it was drawn from (when the request asked for logprobs). Turn it into text and
        events. True when the choice has ended."""
        r, choice = self.req, self.choice
        entry = None
        if lp is not None:
            entry = (token, float(lp[token]), [(int(t), float(lp[t]))
                                               for t in most_probable(lp, r.logprobs)])
        self.ids.append(token)
        if len(self.ids) - self.start > self.block:  # the window is full: keep its last half
            self.start = len(self.ids) - keep_after_slide(self.block)
            self.in_cache = False  # (to be read again into the slot, from position 0)
        choice.tokens += 1
        piece = self.text.push(token)
        done = self.text.stopped or choice.tokens >= r.max_tokens
        if done and not self.text.stopped:
            piece += self.text.finish()
        if entry is not None:
            self.unsent.append(entry)
        entries = []
        if piece:  # the tokens whose text goes out now (text held back keeps its tokens)
            entries, self.unsent = self.unsent, []
            choice.logprobs.extend(entries)
        self.emit("token", choice.index, piece, entries, len(choice.text))
        choice.text += piece
        if done:
            self.finish("stop" if self.text.stopped else "length")
        return done

    def finish(self, reason: str | None) -> None:
        """End the choice: ("end", index, reason) once; reason None: its client has gone."""
        if not self.ended:
            self.ended = True
            self.choice.finish_reason = reason
            self.emit("end", self.choice.index, reason)


class QueueFull(Exception):
    """The Batcher's queue has no room for a request's sequences."""


class Batcher:
    """The thread that decodes every sequence: up to `max_batch` in slots, advancing together
    one token per step, and up to `max_queue` more waiting for a slot (a request that does
    not fit gets QueueFull: HTTP 429). A waiting sequence takes a free slot at the next step
    (its prompt is read then); a sequence leaves its slot when it ends, when its client has
    gone (`cancelled`) or when its deadline passes: within one step.

    `metrics` (a ServeMetrics) hears of each step's batch size, each first token's wait and
    each token's time after the one before; `after_step()` is called after every step."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, metrics=None,
                 after_step: Callable[[], None] | None = None):
        # (a stand-in model in a test may bring its own batch decoder)
        make = getattr(model, "batch_decoder", None) or (lambda n: BatchDecoder(model, n))
        self.decoder = make(max_batch)
        self.block = model.config.block_size
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self.after_step = after_step  # called after each step (gpt.serve hands events over)
        self.queue: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.free = list(range(max_batch - 1, -1, -1))  # slots; pop() gives the lowest
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="gpt.serve batcher", daemon=True)
        self.thread.start()

    @property
    def queued(self) -> int:
        return len(self.queue)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences, all or none (QueueFull)."""
        with self.wake:
            if len(self.queue) + len(seqs) > self.max_queue + self.max_batch - len(self.active):
                raise QueueFull
            self.queue.extend(seqs)
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(10)

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.active and not self.queue and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                while self.queue and self.free:  # join: a free slot for each waiting one
                    seq = self.queue.popleft()
                    if seq.cancelled:  # its client left while it waited
                        seq.finish(None)
                        continue
                    seq.slot = self.free.pop()
                    self.active.append(seq)
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug: end every sequence, keep serving
                traceback.print_exc()
                for seq in self.active:
                    seq.emit("error", f"sampling failed: {type(e).__name__}: {e}")
                    seq.finish(None)
                self._leave(list(self.active))
            if self.after_step is not None:
                self.after_step()

    def _step(self) -> None:
        """One token for every active sequence (those whose time is up or whose client has
        gone leave first, without one)."""
        now = time.perf_counter()
        gone = [s for s in self.active if s.cancelled or now > s.deadline
                or s.req.max_tokens == 0]
        for seq in gone:
            seq.finish(None if seq.cancelled else "length")
        self._leave(gone)
        if not self.active:
            return
        reading = [s for s in self.active if not s.in_cache]  # new, or their window slid
        stepping = [s for s in self.active if s.in_cache]
        logits = []
        if reading:
            logits.extend(self.decoder.prefill_many([s.slot for s in reading],
                                                    [s.ids[s.start:] for s in reading]))
            for seq in reading:
                seq.in_cache = True
        if stepping:
            logits.extend(self.decoder.step([s.slot for s in stepping],
                                            [s.ids[-1] for s in stepping]))
        seqs = reading + stepping
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.step(len(seqs), [now - (s.last_token_at or s.submitted) for s in seqs],
                              [s.last_token_at is None for s in seqs])
        done = []
        for seq, token, lp in zip(seqs, *self.sample(seqs, logits)):
            seq.last_token_at = now
            if seq.advance(token, lp):
                done.append(seq)
        self._leave(done)

    @staticmethod
    def sample(seqs: list[Sequence], logits: list) -> tuple[list[int], list]:
        """The next token of each sequence, drawn from its row of `logits` (B rows of V) with
        its own settings and generator, as gpt.sample's sample_tokens draws it. One sequence
        alone: gpt.sample's own filter_probs and sample_from; several: all rows at once
        (filter_rows and sample_rows, bitwise the same row by row). Returns the tokens and,
        for each sequence that asked for logprobs, the log-softmax of its logits (else None)."""
        probs = np.array(logits, dtype=np.float64)  # (B, V): a copy, ours to change
        lps = [log_softmax(row) if s.req.logprobs is not None else None  # (before EOS is masked)
               for s, row in zip(seqs, probs)]
        eos = {s.eos_id for s in seqs}
        if len(eos) == 1 and None not in eos:
            probs[:, eos.pop()] = -np.inf  # never taught, never drawn (as in gpt.sample)
        else:
            for b, s in enumerate(seqs):
                if s.eos_id is not None:
                    probs[b, s.eos_id] = -np.inf
        if len(seqs) == 1:
            r = seqs[0].req
            return [sample_from(filter_probs(probs[0], r.temperature, r.top_k, r.top_p,
                                             out=probs[0]), seqs[0].rng)], lps
        filter_rows(probs, [s.req.temperature for s in seqs], [s.req.top_k for s in seqs],
                    [s.req.top_p for s in seqs])
        return sample_rows(probs, [s.rng for s in seqs]), lps

    def _leave(self, seqs: list[Sequence]) -> None:
        with self.wake:
            for seq in seqs:
                if seq in self.active:
                    self.active.remove(seq)
                    self.free.append(seq.slot)
            self.free.sort(reverse=True)


# ---- what /metrics reports ------------------------------------------------------------------
class Histogram:
    """A Prometheus histogram: counts of observations <= each bound, their sum and count."""

    def __init__(self, name: str, help: str, bounds: tuple[float, ...]):
        self.name, self.help, self.bounds = name, help, bounds
        self.counts = [0] * len(bounds)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def text(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{float(b)}"}} {c}'
                  for b, c in zip(self.bounds, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}',
                  f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """The counters behind GET /metrics (Prometheus' text format, version 0.0.4)."""

    def __init__(self, max_batch: int):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.tokens = 0
        self.batch = Histogram("gpt_serve_batch_size", "Sequences decoded together in a step.",
                               tuple(float(b) for b in range(1, max_batch + 1)))
        self.ttft = Histogram("gpt_serve_time_to_first_token_seconds",
                              "From a sequence's arrival to its first token.", LATENCY_BOUNDS)
        self.per_token = Histogram("gpt_serve_time_per_token_seconds",
                                   "From a sequence's token to its next one.", LATENCY_BOUNDS)

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def step(self, batch_size: int, waits: list[float] = (), first: list[bool] = ()) -> None:
        """A step of `batch_size` sequences; each token's wait since the one before (or,
        for a first token, since its sequence arrived)."""
        with self.lock:
            self.batch.observe(batch_size)
            self.tokens += len(waits)
            for seconds, is_first in zip(waits, first):
                (self.ttft if is_first else self.per_token).observe(seconds)

    def text(self, active: int, queued: int) -> str:
        with self.lock:
            lines = ["# HELP gpt_serve_requests_total Completion requests answered, by status.",
                     "# TYPE gpt_serve_requests_total counter"]
            lines += [f'gpt_serve_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP gpt_serve_tokens_generated_total Tokens sampled.",
                      "# TYPE gpt_serve_tokens_generated_total counter",
                      f"gpt_serve_tokens_generated_total {self.tokens}",
                      "# HELP gpt_serve_active_sequences Sequences in a slot now.",
                      "# TYPE gpt_serve_active_sequences gauge",
                      f"gpt_serve_active_sequences {active}",
                      "# HELP gpt_serve_queued_sequences Sequences waiting for a slot.",
                      "# TYPE gpt_serve_queued_sequences gauge",
                      f"gpt_serve_queued_sequences {queued}"]
            for h in (self.batch, self.ttft, self.per_token):
                lines += h.text()
        return "\n".join(lines) + "\n"
