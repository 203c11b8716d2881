"""The byte-level BPE tokenizer: exact round trips on any text, merges learned from the data,
serialisation, and the incremental trainer checked against a slow from-scratch trainer."""

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt.bpe import _CHUNK_RE, BPETokenizer

TRAIN_TEXT = (
    "the cat sat on the mat. the dog sat on the log.\n"
    "Is this the thing? That is the thing!  Then, then 1234 5678 1234.\n"
) * 20


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXT, 280)


def _slow_merges(text: str, num_merges: int) -> list:
    """The textbook trainer: re-count every pair from scratch before each merge."""
    words = Counter(tuple(c.encode("utf-8")) for c in _CHUNK_RE.findall(text))
    merges = []
    for new_id in range(256, 256 + num_merges):
        counts = Counter()
        for word, freq in words.items():
            for pair in pairwise(word):
                counts[pair] += freq
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        merges.append(best)
        merged = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def test_ids_layout(tok):
    assert tok.vocab_size == 280
    assert len(tok.merges) == 280 - 258
    assert (tok.bos_id, tok.eos_id) == (278, 279)
    # The most frequent pair in the text is learned first and is a real byte pair of it.
    assert tok.token_bytes[256] in TRAIN_TEXT.encode()


def test_encoding_compresses_training_text(tok):
    ids = tok.encode(TRAIN_TEXT)
    assert len(ids) < 0.5 * len(TRAIN_TEXT.encode())
    assert max(ids) < tok.bos_id


def test_incremental_trainer_matches_from_scratch_trainer():
    text = TRAIN_TEXT + "aaaa aaa aa abab ababab ééé 日本語日本語 \n\n\n  x"
    assert BPETokenizer.train(text, 258 + 60).merges == _slow_merges(text, 60)


@given(st.text(max_size=200))
def test_round_trip_any_text(tok, text):
    # Includes characters never seen in training: they fall back to their UTF-8 bytes.
    assert tok.decode(tok.encode(text)) == text


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=120))
def test_round_trip_with_a_tokenizer_trained_on_the_text_itself(text):
    t = BPETokenizer.train(text * 3, 400)
    assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode(text * 3)) == text * 3


def test_unseen_characters_and_emoji(tok):
    text = "Grüße, 世界! 🙂🚀 \t\r\n é\u0301 \u200b_x__y"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.bos_id for i in ids)


def test_decode_skips_bos_eos_and_replaces_broken_utf8(tok):
    ids = tok.encode("hi")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "hi"
    assert tok.decode([0xE6]) == "\ufffd"  # half of a 3-byte character
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_to_dict_from_dict_round_trip(tok):
    d = json.loads(json.dumps(tok.to_dict()))
    assert d["kind"] == "bpe"
    again = BPETokenizer.from_dict(d)
    assert again.merges == tok.merges and again.vocab_size == tok.vocab_size
    assert again.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)


@pytest.mark.parametrize(
    "d", [{"kind": "char"}, {"kind": "bpe"}, {"kind": "bpe", "merges": [[1, 999]]}]
)
def test_from_dict_rejects_bad_descriptions(d):
    with pytest.raises(ValueError):
        BPETokenizer.from_dict(d)


def test_tiny_text_stops_early_and_small_vocab_rejected():
    t = BPETokenizer.train("abc", 1000)  # no pair occurs twice: no merges
    assert t.merges == [] and t.vocab_size == 258
    assert t.decode(t.encode("abc")) == "abc"
    with pytest.raises(ValueError, match="at least 258"):
        BPETokenizer.train("abc", 257)


def test_training_is_deterministic():
    assert BPETokenizer.train(TRAIN_TEXT, 320).merges == BPETokenizer.train(TRAIN_TEXT, 320).merges


# ---- encoding replays the merges in the order they were learned -------------------------------
def replay_merges(tok: BPETokenizer, chunk: str) -> list[int]:
    """The definition, slowly: apply merge 0 everywhere, then merge 1, and so on."""
    word = list(chunk.encode("utf-8"))
    for new_id, (a, b) in enumerate(tok.merges, start=256):
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                out.append(new_id)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def test_the_earliest_learned_merge_wins_not_the_leftmost_pair():
    b, c = ord("b"), ord("c")
    tok = BPETokenizer([(b, c), (ord("a"), b)])  # "bc" learned before "ab"
    assert tok.encode("abc") == [ord("a"), 256]  # not [257, c]: "ab" is leftmost but later
    assert tok.decode(tok.encode("abc")) == "abc"


def test_encoding_equals_replaying_the_merges_in_order():
    """On real text with a few hundred merges (leftmost-first would give ~10% more tokens)."""
    text = (Path(__file__).resolve().parents[2] / "train.txt").read_text(encoding="utf-8")[:30_000]
    tok = BPETokenizer.train(text, 400)
    chunks = _CHUNK_RE.findall(text[:5000])
    assert tok.encode(text[:5000]) == [t for ch in chunks for t in replay_merges(tok, ch)]


def test_the_chunk_cache_stays_bounded_under_hostile_text(tok, monkeypatch):
    """A server encodes what users send: many distinct words, or one enormous word, must not
    grow the cache past its bounds, and encoding stays right past them."""
    import gpt.bpe

    monkeypatch.setattr(gpt.bpe, "CACHE_ENTRIES", 50)
    tok._cache.clear()
    words = " ".join(f"w{i:05d}x" for i in range(200))
    huge = "a" * 10_000
    ids = tok.encode(words + " " + huge)
    assert len(tok._cache) <= 50 and all(len(k) <= gpt.bpe.CACHE_CHUNK_CHARS for k in tok._cache)
    assert tok.decode(ids) == words + " " + huge
    assert tok.encode(words + " " + huge) == ids  # the same ids from the cache and without it


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_the_chunk_cache_holds_a_bounded_number_of_ids_under_hostile_text(tok, kind, monkeypatch):
    """Distinct chunks of 47 emoji (4 UTF-8 bytes each: up to 188 ids a chunk, ~1.9 KB of
    cache) within the chunk-length bound: capped at CACHE_ENTRIES alone, a server's cache grew
    to ~490 MB from about 90 hostile requests under the 1 MiB body limit. The ids the cache
    holds are bounded too (CACHE_IDS), and a cleared cache fills again."""
    import random

    import gpt.bpe
    from gpt.bpe import ENDOFTEXT, GPT2Tokenizer, byte_symbols

    monkeypatch.setattr(gpt.bpe, "CACHE_IDS", 2_000)
    if kind == "gpt2":  # every byte its own token, no merges
        vocab = {s: i for i, s in enumerate(byte_symbols())} | {ENDOFTEXT: 256}
        enc = GPT2Tokenizer(vocab, [])
    else:
        enc = BPETokenizer(tok.merges)
    rng = random.Random(0)
    emoji = [chr(c) for c in range(0x1F300, 0x1F5FF)]
    text = "".join(" " + "".join(rng.choice(emoji) for _ in range(47)) for _ in range(300))
    ids = enc.encode(text)
    assert 0 < sum(map(len, enc._cache.values())) <= 2_000
    assert enc.encode(text) == ids and enc.decode(ids) == text
    enc._cache.clear()
    assert enc.encode("a few words") and len(enc._cache) == 3  # the budget starts again
