"""Generating text from a trained GPT: temperature, top-k and top-p (nucleus) filtering, and a
KV-cached decoder (`model.decoder()`, gpt/model.py) so that each new token costs one position
of work per layer.

    python -m gpt.sample --out-dir out --prompt "ROMEO:" --max-new-tokens 200 --top-k 40

The library entry point is `generate(model, tokenizer, prompt, max_new_tokens, ...)`; its loop,
one token at a time, is `sample_tokens(model, ids, ...)` (what gpt.serve streams from); the
filtering is the function `filter_probs(logits, temperature, top_k, top_p)`, which (like
`sample_from`) may write into a buffer the loop reuses, so a token makes no new arrays.

The context window. The model learned one position embedding per position 0..block_size-1, so
a context can hold at most block_size tokens and the keys/values in a cache belong to the
positions they were computed at. When the window is full, we keep its last half
(`keep_after_slide(block_size)` tokens), re-read them into a reset cache at positions 0.., and
go on. Both paths (with and without the cache) follow this same rule, so they compute the same
logits and, with the same seed, produce the same text. The re-read costs block_size/2 positions
once every block_size/2 tokens: about one extra position per token, instead of block_size per
token for a window that slides by one (which would shift every position at every step).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np

import tensorlite
from tensorlite import no_grad

from . import cli
from .bpe import REPLACEMENT_CHAR, REPLACEMENT_NOTE
from .config import SampleConfig, check_sampling
from .errors import UserError
from .model import GPT

# BLAS threads while sampling (gpt.sample and gpt.serve): a one-token step's matmuls ((1, C) @
# (C, 4C)) are far too small to split, and a second thread that waits for a core only slows them
# down. On the 2-core machine 1 thread served about as many tokens/s as 2 when idle and 4-10x
# more when busy (benchmarks/serve.py, docs/serving.md); through gpt.sample, with training
# running beside it, 2 threads made a token 2-25x slower (docs/performance.md).
SAMPLING_THREADS = 1


# ---- the distribution to sample from --------------------------------------------------------
BROKEN_LOGITS = ("the model's logits hold NaN or inf: its weights are broken (was the checkpoint "
                 "saved after training diverged?); train it again")


def filter_probs(
    logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities (V,) float64 to sample the next token from, given its logits (V,).

    1. temperature: softmax(logits / temperature); temperature 0 means greedy: all the mass
       on the argmax (the first one on a tie).
    2. top_k: keep the k most probable tokens (ties broken towards the lower id).
    3. top_p: of those, keep the smallest most-probable-first set whose probability reaches
       top_p (at least one token).
    The kept probabilities are renormalised to sum to 1; the rest are 0. A logit of -inf
    means "never" (a masked token); NaN or +inf means broken weights: UserError.
    `out`, a float64 (V,) array, receives the result (a sampling loop reuses one).

    gpt.serve filters the rows of all the sequences it decodes together at once
    (`filter_rows`): each row comes out bitwise as it does here.
    """
    check_sampling(temperature, top_k, top_p)
    probs = np.empty(np.size(logits)) if out is None else out  # (V,) float64
    np.copyto(probs, np.reshape(logits, -1))
    top = probs.max()
    if not top < np.inf:  # a NaN or +inf logit (the max of an array with a NaN is NaN)
        raise UserError(BROKEN_LOGITS)
    if temperature == 0:
        best = np.argmax(probs)
        probs[:] = 0.0
        probs[best] = 1.0
        return probs
    probs -= top  # <= 0: no overflow in exp, even for a small temperature
    probs /= temperature
    np.exp(probs, out=probs)
    probs /= probs.sum()
    if top_k is not None or top_p is not None:
        keep_most_probable(probs, top_k, top_p)
    return probs


def filter_rows(probs: np.ndarray, temperature: list[float], top_k: list, top_p: list
                ) -> np.ndarray:
    """In place on probs (B, V) float64, a row of logits per sequence: row b becomes
    filter_probs(row, temperature[b], top_k[b], top_p[b]), bitwise (the settings already
    checked). The softmax runs on all rows at once, a handful of NumPy calls for the batch
    instead of a handful per sequence; NumPy works out each row's elements and sums on their
    own, which tests/gpt/test_sample.py checks. Returns probs."""
    top = probs.max(axis=1, keepdims=True)  # (B, 1)
    if not top.max() < np.inf:  # a NaN or +inf logit (the max of a row with a NaN is NaN)
        raise UserError(BROKEN_LOGITS)
    greedy = [b for b, t in enumerate(temperature) if t == 0]
    best = probs[greedy].argmax(axis=1) if greedy else ()  # (the first one on a tie)
    probs -= top  # <= 0: no overflow in exp, even for a small temperature
    probs /= np.array([t or 1.0 for t in temperature])[:, None]  # (B, 1); greedy rows: 1
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=1, keepdims=True)
    for b, i in zip(greedy, best):  # temperature 0: all the mass on the argmax
        probs[b] = 0.0
        probs[b, i] = 1.0
    for b, (k, p) in enumerate(zip(top_k, top_p)):
        if (k is not None or p is not None) and temperature[b] != 0:
            keep_most_probable(probs[b], k, p)
    return probs


def keep_most_probable(probs: np.ndarray, top_k: int | None, top_p: float | None) -> None:
    """In place on probabilities (V,): zero all but the top_k most probable, then all but the
    smallest most-probable-first set that reaches top_p of what is left; renormalise."""
    V = probs.size
    order = np.argsort(-probs, kind="stable")  # most probable first; ties: lower id first
    keep = V if top_k is None else min(top_k, V)
    if top_p is not None:
        top = probs[order[:keep]]
        cum = np.cumsum(top / top.sum())  # top-p looks at the top-k distribution, renormalised
        # The first prefix whose sum reaches p; 1e-12 of slack so that rounding cannot make
        # 0.5 + 0.3 miss 0.8 and take one token more.
        keep = min(int(np.searchsorted(cum, top_p - 1e-12, side="left")) + 1, keep)
    probs[order[keep:]] = 0.0
    probs /= probs.sum()


def sample_from(probs: np.ndarray, rng: np.random.Generator, cdf: np.ndarray | None = None) -> int:
    """One token id drawn from `probs` with ONE uniform number (inverse CDF), so that two
    runs with the same generator draw the same ids from the same probabilities. `cdf`, an
    array like probs, is where the cumulative sums go (a sampling loop reuses one)."""
    cdf = np.cumsum(probs, out=cdf)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if i == len(cdf):  # u * total rounded up to the total: take the last possible token
        i = int(np.flatnonzero(probs)[-1])
    return i


def sample_rows(probs: np.ndarray, rngs: list, cdf: np.ndarray | None = None) -> list[int]:
    """A token id for each row of probs (B, V): row b drawn with ONE uniform number from its
    own generator rngs[b], bitwise as sample_from draws it. `cdf`, like probs, receives the
    cumulative sums."""
    cdf = np.cumsum(probs, axis=1, out=cdf)  # (B, V), each row on its own
    targets = np.array([rng.random() for rng in rngs]) * cdf[:, -1]  # (B,)
    # searchsorted(row, target, side="right") is the count of a row's entries <= target
    # (a cumulative sum of numbers >= 0 never decreases): all rows in one call
    ids = (cdf <= targets[:, None]).sum(axis=1).tolist()
    for b, i in enumerate(ids):
        if i == cdf.shape[1]:  # u * total rounded up to the total: the last possible token
            ids[b] = int(np.flatnonzero(probs[b])[-1])
    return ids


# ---- the generation loop --------------------------------------------------------------------
def keep_after_slide(block_size: int) -> int:
    """How many of the latest tokens stay in the context when the window is full."""
    return max(1, block_size // 2)


def sample_tokens(
    model: GPT,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
    eos_id: int | None = None,
    use_kv_cache: bool = True,
    stop_at_eos: bool = False,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids sampled after the context `ids` (non-empty), one
    at a time, as soon as each is drawn.

    EOS: a model learns where documents end only from training data that marks them, and
    gpt.train's data has no such marks, so by default `eos_id` is masked (never drawn) and
    every sample runs to max_new_tokens. stop_at_eos=True (for a model taught EOS) lets it
    be drawn and stops there, without yielding it.

    A caller that stops iterating stops the sampling: nothing is computed ahead. With
    use_kv_cache=False every step runs the whole context through the model; the tokens are
    the same (see the module docstring for the context window both paths share).
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if not ids:
        raise ValueError("sample_tokens needs at least one context token (BOS for an empty prompt)")
    rng = rng if rng is not None else np.random.default_rng()
    ids = list(ids)
    block = model.config.block_size
    start = max(0, len(ids) - block)  # the context is ids[start:], at positions 0, 1, ...
    decoder = model.decoder() if use_kv_cache else None  # its KV cache and buffers
    probs, cdf = np.empty(model.config.vocab_size), np.empty(model.config.vocab_size)
    for _ in range(max_new_tokens):
        if decoder is not None:  # only the tokens the cache has not seen yet (usually one)
            logits = decoder(ids[start + decoder.length :])  # (V,), the decoder's buffer
        else:  # the whole context through the model
            with no_grad():
                logits = model(np.array([ids[start:]]))[0].data[0, -1]  # (V,)
        if eos_id is not None and not stop_at_eos:
            logits[eos_id] = -np.inf  # never taught: never drawn (the array is ours to change)
        token = sample_from(filter_probs(logits, temperature, top_k, top_p, out=probs), rng, cdf)
        if token == eos_id:
            return
        ids.append(token)
        yield token
        if len(ids) - start > block:  # the window is full: keep its last half, from 0 again
            start = len(ids) - keep_after_slide(block)
            if decoder is not None:
                decoder.reset()


def prompt_ids(tokenizer, prompt: str | None) -> list[int]:
    """The context a generation starts from: the prompt's ids, or [BOS] for an empty prompt."""
    ids = list(tokenizer.encode(prompt)) if prompt else []
    return ids or [tokenizer.bos_id]


def generate(
    model: GPT,
    tokenizer,
    prompt: str | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_kv_cache: bool = True,
    rng: np.random.Generator | None = None,
    stop_at_eos: bool = False,
) -> str:
    """The prompt followed by up to `max_new_tokens` sampled tokens, as text.

    An empty or None prompt starts from BOS. EOS is never drawn unless stop_at_eos (see
    sample_tokens), then generation stops there. `rng` (if given) is used instead of `seed`.
    With use_kv_cache=False every step runs the whole context through the model; the result
    is the same text. `sample_tokens` is the same loop, one token at a time.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    rng = rng if rng is not None else np.random.default_rng(seed)
    ids = prompt_ids(tokenizer, prompt)
    new = sample_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rng,
                        tokenizer.eos_id, use_kv_cache, stop_at_eos)
    return tokenizer.decode(ids + list(new))


def print_streaming(text_start: str, tokens: Iterator[int], tokenizer, out=None) -> bool:
    """Write `text_start`, then each token's text as soon as it is drawn (flushed), so long
    samples show progress and Ctrl-C keeps what was printed. Byte-level tokens (BPE) go
    through an incremental UTF-8 decoder, so a character split over two tokens prints whole.
    Returns whether the text shows U+FFFD (bytes that are not whole UTF-8 characters)."""
    import codecs

    out = out or sys.stdout
    out.write(text_start)
    out.flush()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    by_bytes = hasattr(tokenizer, "decode_bytes")
    replaced = REPLACEMENT_CHAR in text_start
    try:
        for t in tokens:
            piece = utf8.decode(tokenizer.decode_bytes([t])) if by_bytes else tokenizer.decode([t])
            replaced = replaced or REPLACEMENT_CHAR in piece
            out.write(piece)
            out.flush()
        tail = utf8.decode(b"", final=True) if by_bytes else ""  # a character cut at the end
        replaced = replaced or REPLACEMENT_CHAR in tail
        out.write(tail)
    finally:
        out.write("\n")
        out.flush()
    return replaced


# ---- the command line -------------------------------------------------------------------------
def build_parser() -> cli.Parser:
    p = cli.Parser("python -m gpt.sample", "Generate text from a gpt.train checkpoint.")
    cli.add_config_flags(p, SampleConfig)
    return p


def sample(cfg: SampleConfig) -> int:
    """Print cfg.num_samples samples from the checkpoint in cfg.out_dir."""
    from .checkpoint import load_model

    cfg.validate()
    tensorlite.set_num_threads(SAMPLING_THREADS)
    model, tokenizer = load_model(cfg.out_dir, cfg.dtype, latest=cfg.latest)
    if cfg.prompt:
        ids = tokenizer.encode(cfg.prompt)  # unknown characters: ValueError naming them
        if ids and max(ids) >= model.config.vocab_size:
            raise UserError(
                f"the prompt encodes to token id {max(ids)} but the model has only "
                f"{model.config.vocab_size}; the checkpoint's tokenizer and model disagree"
            )
    rng = np.random.default_rng(cfg.seed)
    replaced = False
    for n in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"{chr(10) if n else ''}---------- sample {n + 1} ----------", flush=True)
        ids = prompt_ids(tokenizer, cfg.prompt)
        tokens = sample_tokens(model, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                               cfg.top_p, rng, tokenizer.eos_id, not cfg.no_kv_cache)
        replaced = print_streaming(tokenizer.decode(ids), tokens, tokenizer) or replaced
    if replaced:  # on stderr: stdout keeps only the samples
        print(REPLACEMENT_NOTE, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: sample(cli.parse_config(build_parser(), SampleConfig, argv)[0]))


if __name__ == "__main__":
    sys.exit(main())
