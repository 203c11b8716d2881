"""A byte-level BPE tokenizer, trained on our own text (no external vocabulary files); and
GPT-2's, read from its vocab.json and merges.txt (`GPT2Tokenizer`, at the end).

Every text is first turned into UTF-8 bytes, so the 256 byte values are tokens 0..255 and any
string at all can be encoded, even characters never seen in training. Training then repeats one
step: find the most frequent adjacent pair of tokens and give it a new id (a "merge"). Encoding
replays the merges in the order they were learned; decoding joins each token's bytes.

Speed comes from two ideas: the text is split into chunks ("words", each with its leading space)
and merges never cross a chunk boundary, so each distinct chunk is processed once however often it
occurs; and pair counts are updated incrementally, touching only the chunks that contain the pair
being merged, with a heap to find the next most frequent pair.

Token ids: 0..255 bytes, 256..256+M-1 the M merges, then BOS and EOS.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise

import regex  # GPT-2's pre-tokenization needs Unicode classes (\p{L}, \p{N})

# A chunk is a run of letters, of digits or of other symbols (each with at most one leading
# space), or a run of whitespace. The alternatives cover every character, so the chunks
# concatenate back to the text exactly. The trailing-space rule (`\s+(?!\S)`) leaves the last
# space of a run to the next word, so " the" is the same chunk after one space or after many.
CHUNK_PATTERN = r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
_CHUNK_RE = re.compile(CHUNK_PATTERN)
# The encoders remember each chunk's ids (encoding is pure), within bounds: a server encodes
# whatever its users send, and a prompt of a million distinct long "words" must not grow the
# process without end. Words longer than CACHE_CHUNK_CHARS are encoded anew each time (they
# are rare); and the cache holds at most CACHE_ENTRIES chunks and CACHE_IDS ids in all: by
# entries alone, chunks of 47 emoji (188 ids, ~1.9 KB of cache each) filled ~490 MB.
CACHE_ENTRIES, CACHE_CHUNK_CHARS, CACHE_IDS = 1 << 18, 48, 1 << 20

Pair = tuple[int, int]


class _ChunkCache(dict):
    """chunk -> its token ids, within the bounds above (`ids`: how many it holds in all)."""

    ids = 0

    def add(self, chunk: str, tokens: list[int]) -> None:
        if (len(chunk) <= CACHE_CHUNK_CHARS and len(self) < CACHE_ENTRIES
                and self.ids + len(tokens) <= CACHE_IDS):
            self[chunk] = tokens
            self.ids += len(tokens)

    def clear(self) -> None:
        super().clear()
        self.ids = 0


def _pairs(word: list[int]) -> Counter:
    """How often each adjacent pair occurs in one chunk ("aaa" holds (a, a) twice)."""
    return Counter(pairwise(word))


def _merge(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair` in `word` (left to right) by new_id."""
    a, b = pair
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _learn_merges(chunk_counts: Counter, num_merges: int) -> list[Pair]:
    """The merges, most frequent pair first, learned from {chunk bytes: occurrences}.

    Pair counts are kept up to date incrementally: merging (a, b) only changes the chunks that
    contain (a, b), so only those are re-counted. The heap holds (-count, pair) entries; an
    entry whose count is out of date is skipped when popped (lazy deletion). Ties go to the
    smallest pair, so training is deterministic.
    """
    words = [list(chunk) for chunk in chunk_counts]  # token ids of each distinct chunk
    freqs = list(chunk_counts.values())  # how often each chunk occurs in the text
    counts: dict[Pair, int] = defaultdict(int)  # pair -> occurrences in the whole text
    where: dict[Pair, set[int]] = defaultdict(set)  # pair -> chunks that contain it
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair, n in _pairs(word).items():
            counts[pair] += n * freq
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale entry: this pair's count changed since it was pushed
        if -neg < 2:
            break  # every remaining pair occurs once: nothing worth merging
        new_id = 256 + len(merges)
        merges.append(pair)
        changed: set[Pair] = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            before = _pairs(word)
            merged = _merge(word, pair, new_id)
            after = _pairs(merged)
            words[w] = merged
            for p, n in before.items():
                counts[p] -= n * freq
                changed.add(p)
                if p not in after:
                    where[p].discard(w)
            for p, n in after.items():
                counts[p] += n * freq
                changed.add(p)
                where[p].add(w)
        counts.pop(pair, None)
        for p in changed:
            n = counts.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                counts.pop(p, None)
                where.pop(p, None)
    return merges


MAX_TOKEN_BYTES = 64 << 20  # the bytes all tokens spell out together (see check_merges)


def check_merges(merges: Iterable[Iterable[int]]) -> list[Pair]:
    """The merges as pairs, after checking their structure: each is two earlier token ids
    (plain ints), and the tokens they make spell out at most MAX_TOKEN_BYTES bytes together.
    The lengths are added up before any token is built, so a saved tokenizer whose merges
    double a token again and again (2**61 bytes after 61 merges) is refused at once."""
    pairs: list[Pair] = []
    lengths = [1] * 256  # bytes behind each token id so far
    total = 256
    for i, m in enumerate(merges):
        m = list(m) if isinstance(m, (list, tuple)) else [m]
        if len(m) != 2 or not all(type(t) is int and 0 <= t < 256 + i for t in m):
            raise ValueError(f"BPE merge {i} is {m!r:.60}: each merge must be two earlier "
                             "token ids")
        lengths.append(lengths[m[0]] + lengths[m[1]])
        total += lengths[-1]
        if total > MAX_TOKEN_BYTES:
            raise ValueError(f"BPE merges 0..{i} spell out more than {MAX_TOKEN_BYTES:,} bytes "
                             "of tokens; this tokenizer is corrupt")
        pairs.append((m[0], m[1]))
    return pairs


REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for bytes that are not whole UTF-8
REPLACEMENT_NOTE = (
    "note: \ufffd marks bytes that do not form a whole UTF-8 character: BPE tokens stand for "
    "bytes, and a model early in training (or a sample cut after max_new_tokens) can emit "
    "half of a multi-byte character; a trained model pairs them (docs/gpt.md, the BPE tokenizer)")


class BPETokenizer:
    """Byte-level BPE with the same interface as CharTokenizer (encode, decode, vocab_size,
    bos_id, eos_id, to_dict/from_dict) plus `BPETokenizer.train(text, vocab_size)`."""

    kind = "bpe"

    def __init__(self, merges: Iterable[Iterable[int]]):
        self.merges: list[Pair] = check_merges(merges)
        self.ranks: dict[Pair, int] = {m: 256 + i for i, m in enumerate(self.merges)}
        # The bytes each token stands for: a byte itself, or its merge's two halves joined.
        self.token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.bos_id = 256 + len(self.merges)
        self.eos_id = self.bos_id + 1
        self.vocab_size = self.eos_id + 1
        self._cache = _ChunkCache()  # chunk -> its token ids (encoding is pure)

    # ---- training --------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn up to vocab_size - 258 merges from `text` (256 bytes + merges + BOS + EOS).

        Training stops early when no pair occurs twice, so the vocabulary can come out smaller
        than asked for on a tiny text; `.vocab_size` is always the real size.
        """
        return cls.train_on_chunks(Counter(_CHUNK_RE.findall(text)), vocab_size)

    @classmethod
    def train_on_chunks(cls, chunk_counts: Counter, vocab_size: int) -> BPETokenizer:
        """The same as train(text, vocab_size), from {chunk: occurrences} of the text's chunks
        (CHUNK_PATTERN): what gpt.data prepare counts while it streams a large file."""
        if vocab_size < 258:
            raise ValueError(
                f"BPE vocab_size must be at least 258 (256 bytes + BOS + EOS), got {vocab_size}"
            )
        byte_counts = Counter({c.encode("utf-8"): n for c, n in chunk_counts.items()})
        return cls(_learn_merges(byte_counts, vocab_size - 258))

    # ---- encoding and decoding -------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> list[int]:
        """Apply the merges to one chunk, earliest-learned pair first, until none applies."""
        word = list(chunk.encode("utf-8"))
        ranks = self.ranks
        while len(word) > 1:
            pair = min(pairwise(word), key=lambda p: ranks.get(p, 1 << 62))
            new_id = ranks.get(pair)
            if new_id is None:
                break
            word = _merge(word, pair, new_id)
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added). Any str that UTF-8 can encode works."""
        return self.encode_chunks(_CHUNK_RE.findall(text))

    def encode_chunks(self, chunks: Iterable[str]) -> list[int]:
        """Token ids of a text already split into its chunks (CHUNK_PATTERN), in order."""
        ids: list[int] = []
        cache = self._cache
        for chunk in chunks:
            tokens = cache.get(chunk)
            if tokens is None:
                tokens = self._encode_chunk(chunk)
                cache.add(chunk, tokens)
            ids.extend(tokens)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes behind `ids`, skipping BOS and EOS."""
        table, n = self.token_bytes, len(self.token_bytes)
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                out.append(table[i])
            elif i not in (self.bos_id, self.eos_id):
                raise ValueError(f"token id {i} is outside this BPE vocabulary (0..{n + 1})")
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (BOS/EOS skipped). A model can emit byte sequences that are not valid
        UTF-8 (half a character); those bytes are shown as U+FFFD instead of failing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- saving --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-able description: the merges, in the order they were learned."""
        return {"kind": self.kind, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        if d.get("kind") != cls.kind or not isinstance(d.get("merges"), list):
            raise ValueError("not a BPE tokenizer description: expected kind 'bpe' and merges")
        return cls(d["merges"])

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


# ---- GPT-2's tokenizer: a byte-level BPE read from vocab.json + merges.txt --------------------
# GPT-2's pre-tokenization: English contractions, then runs of letters, of digits, or of other
# symbols (each with at most one leading space), then whitespace as in CHUNK_PATTERN above.
# \p{L} and \p{N} are Unicode letter and number classes: the `regex` package has them, `re` not.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The printable character that stands for each byte value in GPT-2's vocab.json.

    Bytes that are printable, non-space Latin-1 characters stand for themselves ('!'..'~',
    '¡'..'¬', '®'..'ÿ'); the other 68 (controls, space, soft hyphen...) are given the
    characters from U+0100 upwards, in byte order. So every token is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [""] * 256, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: the same ids as transformers' GPT2TokenizerFast made from the
    same vocab.json and merges.txt (tests/gpt/test_gpt2.py checks it on a varied corpus).

    vocab: {token string: id}, a token string being its bytes written with byte_symbols();
    merges: [(left, right)] in rank order. `<|endoftext|>` (a vocab entry) is its own token
    wherever it appears in the text, and serves as BOS and EOS; decode skips it, as the other
    tokenizers skip their BOS and EOS."""

    kind = "gpt2"

    def __init__(self, vocab: dict[str, int], merges: Iterable[Iterable[str]]):
        if not isinstance(vocab, dict) or not vocab:
            raise ValueError("GPT-2 vocab must be a non-empty {token: id} mapping")
        if any(not isinstance(t, str) or type(i) is not int for t, i in vocab.items()):
            raise ValueError("GPT-2 vocab maps token strings to integer ids")
        ids = sorted(vocab.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"GPT-2 vocab ids must be 0..{len(ids) - 1}, each once")
        if ENDOFTEXT not in vocab:
            raise ValueError(f"GPT-2 vocab has no {ENDOFTEXT} token")
        pairs = []
        for m in merges:
            m = tuple(m)
            if len(m) != 2 or not all(isinstance(s, str) and s for s in m):
                raise ValueError(f"GPT-2 merge {m!r} is not two non-empty token strings")
            pairs.append(m)
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in vocab.items()}
        self.merges: list[tuple[str, str]] = pairs
        self.ranks = {m: r for r, m in reversed(list(enumerate(pairs)))}  # first rank wins
        self.symbols = byte_symbols()
        self.byte_of = {s: b for b, s in enumerate(self.symbols)}
        self.bos_id = self.eos_id = vocab[ENDOFTEXT]
        self.vocab_size = len(vocab)
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache = _ChunkCache()

    @classmethod
    def from_files(cls, vocab_json: str, merges_txt: str) -> GPT2Tokenizer:
        """From the contents of vocab.json and merges.txt (its "#version" line skipped)."""
        import json

        merges = [line.split(" ") for line in merges_txt.splitlines()
                  if line.strip() and not line.startswith("#version")]
        return cls(json.loads(vocab_json), merges)

    def to_files(self) -> tuple[str, str]:
        """(vocab.json, merges.txt) contents, as transformers writes them."""
        import json

        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        return json.dumps(self.encoder, ensure_ascii=False), "#version: 0.2\n" + merges

    def _bpe(self, chunk: str) -> list[int]:
        """The ids of one pre-tokenized chunk: its bytes as symbols, then the lowest-ranked
        adjacent pair merged (every occurrence, left to right) until no pair has a rank."""
        word = [self.symbols[b] for b in chunk.encode("utf-8")]
        ranks = self.ranks
        while len(word) > 1:
            pair = min(pairwise(word), key=lambda p: ranks.get(p, 1 << 62))
            if pair not in ranks:
                break
            a, b = pair
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        try:
            return [self.encoder[t] for t in word]
        except KeyError as e:
            raise ValueError(f"GPT-2 vocab lacks the token {e.args[0]!r} that its merges make; "
                             "vocab.json and merges.txt do not belong together") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; each `<|endoftext|>` in it becomes that one token."""
        ids: list[int] = []
        for n, part in enumerate(text.split(ENDOFTEXT)):
            if n:
                ids.append(self.eos_id)
            for chunk in self._pattern.findall(part):
                tokens = self._cache.get(chunk)
                if tokens is None:
                    tokens = self._bpe(chunk)
                    self._cache.add(chunk, tokens)
                ids.extend(tokens)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes behind `ids`, skipping `<|endoftext|>`."""
        out = bytearray()
        for i in ids:
            i = int(i)
            token = self.decoder.get(i)
            if token is None:
                raise ValueError(f"token id {i} is outside this GPT-2 vocabulary "
                                 f"(0..{self.vocab_size - 1})")
            if i != self.eos_id:
                try:
                    out += bytes(self.byte_of[c] for c in token)
                except KeyError:  # a special token of the vocab: its text as it stands
                    out += token.encode("utf-8")
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (`<|endoftext|>` skipped); half a UTF-8 character shows as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """A JSON-able description: the vocab and the merges, as in the two files."""
        return {"kind": self.kind, "vocab": self.encoder, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Tokenizer:
        if d.get("kind") != cls.kind or not isinstance(d.get("merges"), list):
            raise ValueError("not a GPT-2 tokenizer description: expected kind 'gpt2', a vocab "
                             "and merges")
        return cls(d.get("vocab"), d["merges"])

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"
