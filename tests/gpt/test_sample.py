"""Sampling: the temperature / top-k / top-p filter (property-tested on random distributions),
the KV-cached decoder (the same logits as the full forward pass at every position, the same
text as recomputing the whole context, also past block_size), and `python -m gpt.sample` (its output and its one-line errors)."""

import dataclasses
import re
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpt.bpe import BPETokenizer
from gpt.cli import describe
from gpt.config import GPTConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.sample import (
    filter_probs,
    filter_rows,
    generate,
    keep_after_slide,
    prompt_ids,
    sample_from,
    sample_rows,
    sample_tokens,
)
from gpt.tokenizer import CharTokenizer
from tensorlite import no_grad
from tensorlite.autograd import Function

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"

logits_st = arrays(
    np.float64,
    st.integers(1, 40),
    elements=st.floats(-20, 20, allow_nan=False, allow_infinity=False),
)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ---- filter_probs ------------------------------------------------------------------------------
@given(
    logits_st,
    st.floats(0.05, 5.0),
    st.one_of(st.none(), st.integers(1, 50)),
    st.one_of(st.none(), st.floats(0.01, 1.0)),
)
def test_filter_keeps_the_right_set_and_renormalises(logits, temperature, top_k, top_p):
    probs = filter_probs(logits, temperature, top_k, top_p)
    full = softmax(logits / temperature)
    kept = probs > 0
    assert probs.shape == logits.shape
    assert probs.sum() == pytest.approx(1.0, abs=1e-12) and (probs >= 0).all()
    # The kept tokens are the most probable ones: none outside beats one inside.
    if (~kept).any():
        assert full[kept].min() >= full[~kept].max()
    # Renormalised: proportional to the temperature-scaled softmax on the kept set.
    np.testing.assert_allclose(probs[kept], full[kept] / full[kept].sum(), rtol=1e-9, atol=1e-300)
    m = int(kept.sum())
    k = len(logits) if top_k is None else min(top_k, len(logits))
    if top_k is not None:
        assert m <= k
    # top-p: the top-k distribution's most-probable-first prefix that first reaches p.
    ranked = np.sort(full)[::-1][:k]
    ranked = ranked / ranked.sum()
    if top_p is None:
        assert m == k or (full[~kept] == 0).all()
    else:
        assert ranked[: m - 1].sum() < top_p + 1e-9  # one fewer would not reach p
        assert m == k or ranked[:m].sum() >= top_p - 1e-9  # these do reach p


def test_filter_examples():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(filter_probs(logits, 1.0, top_p=0.8), [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(
        filter_probs(logits, 1.0, top_p=0.81), np.array([0.5, 0.3, 0.15, 0]) / 0.95
    )
    np.testing.assert_allclose(filter_probs(logits, 1.0, top_k=2), [0.625, 0.375, 0, 0])
    # top-k first, then top-p on the renormalised top-k: 0.625 reaches 0.6 alone.
    np.testing.assert_allclose(filter_probs(logits, 1.0, top_k=2, top_p=0.6), [1, 0, 0, 0])
    np.testing.assert_allclose(filter_probs(logits, 1.0, top_p=1e-9), [1, 0, 0, 0])
    np.testing.assert_allclose(filter_probs(logits, 1.0, top_p=1.0), [0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(filter_probs([1.0, 3.0, 3.0], 0.0), [0, 1, 0])  # greedy: first max
    np.testing.assert_allclose(filter_probs([1.0, 3.0, 3.0], 1.0, top_k=1), [0, 1, 0])


@given(logits_st)
def test_temperature_to_zero_is_argmax(logits):
    top2 = np.sort(logits)[::-1][:2]
    assume(len(logits) == 1 or top2[0] - top2[1] > 1e-3)
    greedy = filter_probs(logits, 0.0)
    assert greedy[np.argmax(logits)] == 1.0 and greedy.sum() == 1.0
    assert filter_probs(logits, 1e-6)[np.argmax(logits)] == pytest.approx(1.0, abs=1e-12)


# ---- the same, for a batch of rows (gpt.serve) ------------------------------------------------
settings_st = st.tuples(
    st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-6, 5.0)),  # temperature (0: greedy)
    st.one_of(st.none(), st.integers(1, 50)),  # top_k
    st.one_of(st.none(), st.floats(0.01, 1.0)),  # top_p
)


def check_rows_as_alone(logits: np.ndarray, settings: list, seeds: list) -> None:
    """filter_rows + sample_rows on all rows == filter_probs + sample_from on each row,
    bitwise: the probabilities and the drawn token."""
    probs = logits.astype(np.float64)
    filter_rows(probs, *map(list, zip(*settings)))
    ids = sample_rows(probs, [np.random.default_rng(s) for s in seeds])
    for row, (t, k, p), seed, probs_b, id_b in zip(logits, settings, seeds, probs, ids):
        alone = filter_probs(row, t, k, p)
        assert np.array_equal(alone, probs_b)  # to the bit
        assert sample_from(alone, np.random.default_rng(seed)) == id_b


@given(st.data(), st.integers(1, 8), st.integers(1, 70))
def test_rows_are_filtered_and_drawn_bitwise_as_each_alone(data, B, V):
    logits = data.draw(arrays(np.float32, (B, V), elements=st.floats(
        -30, 30, allow_nan=False, allow_infinity=False, width=32)))
    if V > 1:
        logits[:, data.draw(st.integers(0, V - 1))] = -np.inf  # a masked token (EOS)
    settings = data.draw(st.lists(settings_st, min_size=B, max_size=B))
    check_rows_as_alone(logits, settings, list(range(B)))


def test_rows_as_alone_over_many_shapes():
    """A sweep wider than hypothesis' examples: sizes across SIMD widths and GPT-2's
    vocabulary, logit scales from flat to peaked, every kind of setting mixed in a batch."""
    rng = np.random.default_rng(0)
    for V in [*range(1, 70), 127, 128, 129, 255, 1000, 50257]:
        for _ in range(3 if V < 1000 else 1):
            B = int(rng.integers(1, 9))
            logits = (rng.normal(size=(B, V)) * rng.uniform(0.1, 20)).astype(np.float32)
            settings = [(float(rng.choice([0.0, 1.0, rng.uniform(1e-6, 3)])),
                         None if rng.random() < 0.5 else int(rng.integers(1, 60)),
                         None if rng.random() < 0.5 else float(rng.uniform(0.01, 1)))
                        for _ in range(B)]
            check_rows_as_alone(logits, settings, list(rng.integers(0, 2**31, B)))


class Always:
    """A stand-in generator whose uniform draw is always `u`."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def test_a_draw_that_rounds_up_to_the_total_takes_the_last_possible_token():
    probs = np.array([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])
    assert sample_rows(probs, [Always(1.0), Always(1.0)]) == [1, 1]  # (u * total == total)
    assert [sample_from(row, Always(1.0)) for row in probs] == [1, 1]
    assert sample_rows(probs, [Always(0.0), Always(0.0)]) == [0, 1]  # never a 0-prob token
    with pytest.raises(UserError, match="NaN or inf"):
        filter_rows(np.array([[0.0, 1.0], [np.nan, 0.0]]), [1.0, 1.0], [None] * 2, [None] * 2)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"top_k": 0}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
    ],
)
def test_filter_rejects_bad_settings(kwargs, flag):
    with pytest.raises(UserError, match=f"^{next(iter(kwargs))} must") as e:
        filter_probs(np.zeros(3), **kwargs)  # the library speaks of the value...
    assert describe(e.value).startswith(flag + " must")  # ...the command line of its flag


def test_sample_from_follows_the_distribution():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    rng = np.random.default_rng(0)
    draws = np.array([sample_from(probs, rng) for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[1] == 0
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert sample_from(np.array([0.0, 1.0, 0.0]), np.random.default_rng(1)) == 1


# ---- the KV cache --------------------------------------------------------------------------------
GPT2_ARCH = {"norm": "layernorm", "activation": "gelu", "bias": True, "tied_head": True}


def tiny_model(vocab_size: int, block_size: int = 16, seed: int = 0, **arch) -> GPT:
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                    **arch)
    model = GPT(cfg, dtype=np.float64, seed=seed)
    if arch.get("bias"):  # biases start at 0: give them values, so a missed one shows
        rng = np.random.default_rng(seed)
        for name, p in model.params.items():
            if name.endswith(".bias"):
                p.data[...] = rng.normal(0, 0.1, p.shape)
    return model


@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.sampled_from([{}, GPT2_ARCH]))
def test_decoder_matches_full_forward_for_chunks_of_any_size(chunks, arch):
    """A prompt fed to the decoder in chunks: after each chunk, the logits of its last
    position equal the full forward pass's at that position (our architecture and GPT-2's)."""
    model = tiny_model(20, block_size=16, seed=3, **arch)
    total = min(sum(chunks), 16)
    idx = np.random.default_rng(sum(chunks)).integers(0, 20, (1, total))
    with no_grad():
        full = model(idx)[0].data[0]  # (T, V)
    decoder, t = model.decoder(), 0
    for n in chunks:
        if t >= total:
            break
        logits = decoder(list(idx[0, t : t + n]))
        t = min(t + n, total)
        np.testing.assert_allclose(logits, full[t - 1], rtol=1e-10, atol=1e-12)
    assert decoder.length == total


@pytest.mark.parametrize("arch", [{}, GPT2_ARCH], ids=["ours", "gpt2"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-5), ("bfloat16", 2e-5)])
def test_decoder_matches_full_forward_at_every_position_across_slides(dtype, tol, arch):
    """One token at a time for three windows, the context sliding as sample_tokens slides
    it (reset, re-read the kept half in one call): at every step the decoder's logits are
    the full forward pass's on the current context, at its last position."""
    cfg = GPTConfig(vocab_size=30, block_size=12, n_layer=2, n_head=2, n_embd=16, **arch)
    model = GPT(cfg, dtype=dtype, seed=4)
    ids = list(np.random.default_rng(5).integers(0, 30, 3 * cfg.block_size))
    decoder, start, slides = model.decoder(), 0, 0
    for end in range(1, len(ids) + 1):
        if end - start > cfg.block_size:  # the rule of sample_tokens
            start, slides = end - 1 - keep_after_slide(cfg.block_size), slides + 1
            decoder.reset()
        logits = decoder(ids[start + decoder.length : end])
        assert decoder.length == end - start and logits.dtype == model.dtype
        with no_grad():
            full = model(np.array([ids[start:end]]))[0].data[0, -1]  # (V,)
        np.testing.assert_allclose(logits, full, rtol=tol, atol=tol)
    assert slides >= 4


def test_decoder_refuses_to_overflow_and_foreign_ids():
    model = tiny_model(10, block_size=4)
    decoder = model.decoder()
    decoder([0, 1, 2])
    with pytest.raises(ValueError, match="cannot add 2"):
        decoder([0, 1])
    assert decoder.length == 3  # the refused call changed nothing
    with pytest.raises(ValueError, match="token ids 3..10 outside"):
        decoder([3, 10])
    assert decoder.length == 3


def test_decoders_of_one_model_are_independent():
    """gpt.serve samples in several threads at once: each has its own decoder (own cache
    and buffers), and interleaving them changes nothing."""
    model = tiny_model(10, block_size=8)
    a, b = model.decoder(), model.decoder()
    la = [a([1, 2]).copy(), a([3]).copy()]
    b([5, 6, 7])
    alone = model.decoder()
    np.testing.assert_array_equal(la[0], alone([1, 2]))
    np.testing.assert_array_equal(la[1], alone([3]))


def test_a_decoded_token_makes_no_new_arrays_and_no_graph(monkeypatch):
    """The cached decode step works in the decoder's own buffers and records no graph: the
    memory allocated while decoding tokens does not grow with the model's width (one new
    (1, C) float64 array at C = 1024 would add 8 KB; NumPy's views and small Python objects
    stay the same size), and no tensorlite op runs."""

    def no_ops(*args, **kwargs):
        raise AssertionError("the decoder ran a tensorlite op (a graph node)")

    peaks = {}
    for width in (16, 1024):
        cfg = GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=width)
        decoder = GPT(cfg, dtype=np.float64, seed=0).decoder()
        decoder([1, 2, 3])
        with monkeypatch.context() as m:
            m.setattr(Function, "apply", no_ops)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for token in range(6):
                    decoder([token])
                peaks[width] = tracemalloc.get_traced_memory()[1] - before
            finally:
                tracemalloc.stop()
    assert peaks[1024] - peaks[16] < 4096, peaks


@pytest.fixture(scope="module")
def char_setup():
    tok = CharTokenizer.from_text(TEXT)
    return tiny_model(tok.vocab_size, block_size=16, seed=1), tok


@pytest.mark.parametrize(
    "prompt, kwargs",
    [
        (None, {"temperature": 1.0}),
        ("To be", {"temperature": 0.8, "top_k": 5}),
        ("", {"temperature": 1.3, "top_p": 0.9}),
        (TEXT[:40], {"temperature": 1.0, "top_k": 10, "top_p": 0.95}),  # prompt longer than block
        ("the", {"temperature": 0.0}),
    ],
)
def test_same_text_with_and_without_cache_past_block_size(char_setup, prompt, kwargs):
    model, tok = char_setup
    n = 3 * model.config.block_size + 5  # the window slides several times
    cached = generate(model, tok, prompt, n, seed=7, use_kv_cache=True, **kwargs)
    plain = generate(model, tok, prompt, n, seed=7, use_kv_cache=False, **kwargs)
    assert cached == plain
    assert cached.startswith(prompt or "")
    assert len(cached) <= len(prompt or "") + n


def test_fixed_seed_same_text_other_seed_other_text(char_setup):
    model, tok = char_setup
    a = generate(model, tok, "To", 40, seed=1)
    assert generate(model, tok, "To", 40, seed=1) == a
    assert generate(model, tok, "To", 40, rng=np.random.default_rng(1)) == a
    assert generate(model, tok, "To", 40, seed=2) != a
    assert generate(model, tok, "To", 0, seed=1) == "To"


def test_bpe_generation_same_with_and_without_cache():
    tok = BPETokenizer.train(TEXT * 5, 300)
    model = tiny_model(tok.vocab_size, block_size=8, seed=2)
    kwargs = {"temperature": 0.9, "top_k": 50, "seed": 3}
    assert generate(model, tok, "To be", 30, **kwargs) == generate(
        model, tok, "To be", 30, use_kv_cache=False, **kwargs
    )


def test_generate_rejects_bad_settings(char_setup):
    model, tok = char_setup
    with pytest.raises(ValueError, match="^max_new_tokens must"):
        generate(model, tok, "To", -1)
    with pytest.raises(ValueError, match="do not know|does not know"):
        generate(model, tok, "To be? Zebra!", 5)


class ScriptedModel:
    """A stand-in GPT that always predicts the next id of `script` (then EOS), and records
    how many positions each decoder call processed, to check the cache's bookkeeping."""

    def __init__(self, script, vocab_size, block_size):
        self.config = GPTConfig(vocab_size, block_size, n_layer=1, n_head=1, n_embd=4)
        self.dtype = np.float64
        self.script, self.calls, self.length = script, [], 0

    def decoder(self):  # the model is its own decoder
        return self

    def reset(self):
        self.length = 0

    def __call__(self, ids):
        self.calls.append(len(ids))
        self.length += len(ids)
        n_seen = len(self.calls) - 1
        logits = np.zeros(self.config.vocab_size)
        nxt = self.script[n_seen] if n_seen < len(self.script) else self.config.vocab_size - 1
        logits[nxt] = 50.0
        return logits


def test_generation_stops_at_eos_and_the_cache_costs_one_position_per_token():
    tok = CharTokenizer.from_text("abc")  # ids a=0 b=1 c=2 BOS=3 EOS=4
    script = [0, 1, 2, 0] * 4  # then EOS
    model = ScriptedModel(script, tok.vocab_size, block_size=8)
    text = generate(model, tok, None, 100, temperature=0.0, stop_at_eos=True)
    assert text == "abca" * 4
    # BOS, then one position per new token; when the window (8) overflows it keeps its
    # last 4 tokens, which are re-read into the reset cache (twice here).
    assert keep_after_slide(8) == 4
    assert model.calls == [1] * 8 + [4] + [1] * 4 + [4] + [1] * 3


def test_eos_is_masked_unless_the_model_was_taught_it():
    """gpt.train's data marks no document ends, so by default EOS is never drawn (a sample
    would otherwise stop at random) and the sample runs to max_new_tokens."""
    tok = CharTokenizer.from_text("abc")
    model = ScriptedModel([0, 1, 2, 0] * 4, tok.vocab_size, block_size=64)  # then EOS
    text = generate(model, tok, None, 30, temperature=0.0)
    assert len(text) == 30 and text.startswith("abca" * 4)  # the runner-up after EOS: 'a'


def test_sample_tokens_is_generate_one_token_at_a_time(char_setup):
    model, tok = char_setup
    for prompt in ("To be", None):
        ids = prompt_ids(tok, prompt)
        kwargs = {"temperature": 0.9, "top_k": 8}
        tokens = list(sample_tokens(model, ids, 40, rng=np.random.default_rng(4),
                                    eos_id=tok.eos_id, **kwargs))
        assert tok.decode(ids + tokens) == generate(model, tok, prompt, 40, seed=4, **kwargs)
        assert 0 < len(tokens) <= 40 and tok.eos_id not in tokens


def test_sample_tokens_computes_nothing_ahead():
    tok = CharTokenizer.from_text("abc")
    model = ScriptedModel([0, 1, 2, 0, 1], tok.vocab_size, block_size=8)
    tokens = sample_tokens(model, [tok.bos_id], 100, temperature=0.0, eos_id=tok.eos_id)
    assert model.calls == []  # a generator: nothing runs before the first next()
    assert [next(tokens), next(tokens)] == [0, 1] and model.calls == [1, 1]
    tokens.close()  # a caller that stops (a client that went away) stops the model calls
    assert model.calls == [1, 1]
    with pytest.raises(ValueError, match="at least one context token"):
        next(sample_tokens(model, [], 5))


# ---- python -m gpt.sample ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's folder holding a checkpoint of a random char model."""
    from gpt.checkpoint import Checkpoint, save_checkpoint

    out = tmp_path_factory.mktemp("run")
    tok = CharTokenizer.from_text(TEXT)
    model = tiny_model(tok.vocab_size, block_size=16, seed=5)
    config = {"model": dataclasses.asdict(model.config), "train": {}}
    ckpt = Checkpoint(model.state_dict(), {}, config, tok.to_dict())
    save_checkpoint(str(out), ckpt)
    return out


def sample_cli(*args, cwd=None):
    cmd = [sys.executable, "-m", "gpt.sample", *map(str, args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_prints_samples_same_with_and_without_cache(run_dir):
    args = ["--out-dir", run_dir, "--prompt", "To be", "--max-new-tokens", 40, "--seed", 3,
            "--num-samples", 2, "--top-k", 10, "--top-p", 0.95, "--temperature", 0.9]  # fmt: skip
    cached = sample_cli(*args)
    assert cached.returncode == 0, cached.stderr
    samples = cached.stdout.split("---------- sample 2 ----------")
    assert len(samples) == 2
    assert samples[0].startswith("---------- sample 1 ----------\nTo be")
    assert samples[1].startswith("\nTo be")
    plain = sample_cli(*args, "--no-kv-cache")
    assert plain.returncode == 0 and plain.stdout == cached.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "To be? Zebra!"], "does not know"),
        (["--temperature", -1], "--temperature must be >= 0"),
        (["--temperature", 1e-320], "--temperature is 9.99989e-321, too small to divide by"),
        (["--top-p", 0], "--top-p must be in"),
        (["--top-p", 1.5], "--top-p must be in"),
        (["--top-k", 0], "--top-k must be"),
        (["--max-new-tokens", -1], "--max-new-tokens must be"),
        (["--top-k", "abc"], "--top-k: invalid int value"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_cli_bad_arguments_give_one_line_errors(run_dir, args, message):
    r = sample_cli("--out-dir", run_dir, *args)
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert re.search(message, r.stderr), r.stderr


def test_cli_unknown_prompt_characters_are_named(run_dir):
    r = sample_cli("--out-dir", run_dir, "--prompt", "To be? Zebra!")
    assert r.returncode != 0 and "'?'" in r.stderr and "'Z'" in r.stderr


def test_cli_missing_or_truncated_checkpoint(run_dir, tmp_path):
    r = sample_cli("--out-dir", tmp_path / "nothing")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no checkpoint" in r.stderr

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    weights = broken / "checkpoint" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    r = sample_cli("--out-dir", broken)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "model.safetensors" in r.stderr
    assert weights.read_bytes() == data[: len(data) // 2]  # left as it was


def test_broken_logits_are_refused_and_minus_inf_means_never():
    with pytest.raises(UserError, match="NaN or inf"):
        filter_probs(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(UserError, match="NaN or inf"):
        filter_probs(np.array([0.0, np.inf]), temperature=0.0)
    probs = filter_probs(np.array([1.0, -np.inf, 1.0]))
    np.testing.assert_allclose(probs, [0.5, 0.0, 0.5])
    # a small temperature divides differences (<= 0), so it cannot overflow
    np.testing.assert_allclose(filter_probs(np.array([3.0, 1.0]), temperature=1e-6), [1, 0])


def test_cli_streams_tokens_and_ctrl_c_keeps_what_was_printed(run_dir):
    """Text comes out as it is drawn (a billion tokens would otherwise print nothing for
    hours); Ctrl-C then stops with exit 130 and what was printed stays printed."""
    import os
    import signal

    # A background job of a non-interactive shell ignores SIGINT, and that survives exec: start
    # the sampler with Python's Ctrl-C handler, as a terminal would.
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
             " sys.argv[0] = 'gpt.sample'; runpy.run_module('gpt.sample', run_name='__main__')")
    cmd = [sys.executable, "-c", start, "--out-dir", str(run_dir), "--prompt", "To be",
           "--max-new-tokens", "1000000000", "--seed", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        os.set_blocking(proc.stdout.fileno(), True)
        got = proc.stdout.read(40)  # arrives while sampling goes on
        assert got.startswith(b"To be") and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err
    assert len(err.decode().strip().splitlines()) == 1
    assert len(got + rest) > 40


def test_streaming_says_when_a_sample_shows_a_replacement_character():
    """Byte-level tokens can end half-way through a character: print_streaming prints what
    decode() would (U+FFFD for the cut bytes, also at the very end) and says it did."""
    import io

    from gpt.sample import print_streaming

    tok = BPETokenizer([])
    e_acute = list("é".encode())  # two bytes, two tokens
    out = io.StringIO()
    assert print_streaming("x", iter(e_acute + [ord("a")]), tok, out) is False
    assert out.getvalue() == "xéa\n"
    out = io.StringIO()
    assert print_streaming("x", iter(e_acute[:1]), tok, out) is True  # cut after one byte
    assert out.getvalue() == "x\ufffd\n" == tok.decode([ord("x"), e_acute[0]]) + "\n"
