"""Training data: read a UTF-8 text file, split its token ids 90/10 into train and
validation, and draw random batches of contiguous windows. Two commands:

    python -m gpt.data shakespeare --out input.txt [--url URL]    fetch Tiny Shakespeare
    python -m gpt.data prepare TEXT --out DIR [--tokenizer char|bpe] [--vocab-size N]

`prepare` tokenizes TEXT once, streaming it, into token files (nanoGPT's convention): DIR/train.bin
and DIR/val.bin hold the ids as flat uint16 (uint32 for vocabularies above 65,536), beside
DIR/tokenizer.json and DIR/meta.json. `load_token_dir(DIR)` maps them with np.memmap, so
`python -m gpt.train --data DIR` starts at once and holds only the batches it draws, however
large the corpus.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from . import cli
from .checkpoint import _fsync_dir, atomic_write
from .errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SIZE = 1115394  # bytes
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
GET_DATA_HINT = "python -m gpt.data shakespeare --out data.txt"


def load_text(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file; UserError (one line, with what to do) if the file
    is missing, is not a file, is empty, or is not UTF-8."""
    path = check_text_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise _empty(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw[e.start], e.start) from None


def check_text_file(path: str | os.PathLike, field: str | None = "data") -> str:
    """`path` as a str, after checking that it names an existing regular file (UserError,
    one line, otherwise)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"file {path!r} not found; give the path of a UTF-8 text file (or get "
                        f"Tiny Shakespeare: {GET_DATA_HINT})", field=field)
    if not os.path.isfile(path):
        raise UserError(f"path {path!r} is not a file; give the path of a text file",
                        field=field)
    return path


def _empty(path: str, field: str | None = "data") -> UserError:
    return UserError(f"file {path!r} is empty; give it some text to train on", field=field)


def _not_utf8(path: str, byte: int, offset: int, field: str | None = "data") -> UserError:
    return UserError(f"file {path!r} is not UTF-8 text (bad byte 0x{byte:02x} at offset "
                     f"{offset}); convert it, e.g. iconv -t UTF-8 FILE > FILE.utf8", field=field)


def split_ids(ids: Sequence[int] | np.ndarray, val_fraction: float = 0.1,
              block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first 90% of the ids and the last 10% (int64 arrays).

    With `block_size`, both parts must hold at least block_size + 1 tokens (one window),
    else UserError naming the sizes."""
    ids = np.asarray(ids, dtype=np.int64)
    n_train = int(len(ids) * (1.0 - val_fraction))
    train, val = ids[:n_train], ids[n_train:]
    if block_size is not None:
        check_windows(len(train), len(val), block_size)
    return train, val


def check_windows(n_train: int, n_val: int, block_size: int) -> None:
    """UserError naming the sizes unless both splits hold one window (block_size + 1 tokens)."""
    if min(n_train, n_val) < block_size + 1:
        raise UserError(
            f"the data is too short: {n_train + n_val} tokens split into {n_train} train and "
            f"{n_val} val, and each needs at least block_size + 1 = {block_size + 1}; "
            "use more text or a smaller block_size"
        )


def get_batch(ids: np.ndarray, block_size: int, batch_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` random windows of block_size + 1 consecutive tokens: x is each window's
    first block_size tokens, y the same shifted by one (the next token to predict).
    Returns x, y, both int64 (B, T)."""
    return windows(ids, batch_starts(len(ids), block_size, batch_size, rng), block_size)


def batch_starts(n: int, block_size: int, batch_size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Where get_batch's windows start in ids of length n: (batch_size,) int64, uniform over
    every start that leaves room for block_size + 1 tokens."""
    if n < block_size + 1:
        raise UserError(
            f"{n} tokens are too few for one window of block_size + 1 = {block_size + 1}; "
            "use more text or a smaller block_size"
        )
    return rng.integers(0, n - block_size, size=batch_size)  # (B,): window starts


def windows(ids: np.ndarray, starts: np.ndarray,
            block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y of the windows of block_size + 1 tokens of `ids` (an array or a memmap) that
    begin at `starts`: both int64 (B, T), y shifted by one."""
    rows = np.asarray(ids)[np.asarray(starts)[:, None] + np.arange(block_size + 1)]  # (B, T+1)
    forget_pages(ids)  # token files: unmap what reading the rows mapped
    x = np.ascontiguousarray(rows[:, :-1], dtype=np.int64)  # (B, T)
    y = np.ascontiguousarray(rows[:, 1:], dtype=np.int64)  # (B, T)
    return x, y


# ---- token files: python -m gpt.data prepare ---------------------------------------------------
TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"
TOKENIZER_FILE, META_FILE = "tokenizer.json", "meta.json"
TOKEN_FORMAT = "gpt-token-ids/1"  # meta.json's "format": what load_token_dir reads
VAL_FRACTION = 0.1  # the last 10% of the ids are the validation split, as split_ids does
PIECE_BYTES = 4 << 20  # bytes of text read (and tokenized) at a time
PROGRESS_BYTES = 32 << 20  # inputs at least this large get a progress line
UNICODE_SIZE = 0x110000  # code points 0..U+10FFFF


def token_dtype(vocab_size: int) -> np.dtype:
    """How token ids are stored: uint16 where every id fits (vocab_size <= 65,536), else
    uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def read_pieces(path: str, piece_bytes: int | None = None,
                field: str | None = None) -> Iterator[tuple[str, int]]:
    """The text of the UTF-8 file `path`, in pieces of about piece_bytes (default PIECE_BYTES)
    bytes, each with the number of bytes read so far. A character split between two reads
    comes whole in the next piece. UserError (one line) for bad UTF-8 (naming the byte offset) or a file without text
    (checked at its end, after the pieces it had)."""
    piece_bytes = piece_bytes or PIECE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    done, has_text = 0, False
    with open(path, "rb") as f:
        while True:
            raw = f.read(piece_bytes)
            pending = decoder.getstate()[0]  # the start of a character the last read split
            try:
                piece = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                data = pending + raw
                raise _not_utf8(path, data[e.start], done - len(pending) + e.start,
                                field) from None
            done += len(raw)
            has_text = has_text or bool(raw.strip())
            if piece:
                yield piece, done
            if not raw:
                break
    if not has_text:
        raise _empty(path, field)


def text_chunks(pieces: Iterator[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    """The BPE chunks (gpt.bpe.CHUNK_PATTERN) of the text that `pieces` spell, exactly as
    one findall over the whole text finds them, a list per piece. Only a piece's last chunk
    can reach its end (a run of letters or spaces that the next piece may go on with), so it
    is held back and split again at the front of the next piece."""
    from .bpe import CHUNK_PATTERN

    chunk_re = re.compile(CHUNK_PATTERN)
    carry, done = "", 0
    for piece, done in pieces:
        chunks = chunk_re.findall(carry + piece)
        carry = chunks.pop() if chunks else ""
        yield chunks, done
    if carry:
        yield [carry], done


def _codepoints(piece: str) -> np.ndarray:
    """The code point of each character of `piece`, (len(piece),) uint32."""
    return np.frombuffer(piece.encode("utf-32-le"), dtype="<u4")


class _Progress:
    """A progress line on `stream` for inputs of PROGRESS_BYTES or more: rewritten in place
    (\\r) once a second on a terminal; elsewhere (a log file) one line each 10 seconds."""

    def __init__(self, total: int, stream: TextIO | None):
        self.total, self.stream = total, stream
        self.on = stream is not None and total >= PROGRESS_BYTES
        self.tty = self.on and stream.isatty()
        self.shown = 0.0

    def __call__(self, what: str, done: int) -> None:
        now = time.monotonic()
        if not self.on or (now - self.shown < (1.0 if self.tty else 10.0) and done < self.total):
            return
        self.shown = now
        line = (f"{what}: {done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB "
                f"({100 * done / max(self.total, 1):.0f}%)")
        if self.tty:
            print(line.ljust(60), end="\r", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def end(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def _learn_tokenizer(path: str, kind: str, vocab_size: int, progress: _Progress):
    """Pass 1 over the text: its set of characters (char), or its chunk counts (bpe), and the
    tokenizer they make: the same one gpt.train makes from the whole text."""
    what = "pass 1 of 2, vocabulary"
    if kind == "char":
        from .tokenizer import CharTokenizer

        seen = np.zeros(UNICODE_SIZE, dtype=bool)  # seen[code point]
        for piece, done in read_pieces(path):
            seen[_codepoints(piece)] = True
            progress(what, done)
        return CharTokenizer(chr(c) for c in np.flatnonzero(seen))  # sorted, as from_text
    from .bpe import BPETokenizer

    counts: Counter = Counter()
    for chunks, done in text_chunks(read_pieces(path)):
        counts.update(chunks)
        progress(what, done)
    return BPETokenizer.train_on_chunks(counts, vocab_size)


def _encoded_pieces(path: str, tokenizer) -> Iterator[tuple[np.ndarray, int]]:
    """Pass 2 over the text: its token ids, piece by piece (int64 arrays), with the bytes read
    so far."""
    if tokenizer.to_dict()["kind"] == "char":
        table = np.full(UNICODE_SIZE, -1, dtype=np.int64)  # code point -> id (-1: unknown)
        table[[ord(c) for c in tokenizer.chars]] = np.arange(len(tokenizer.chars))
        for piece, done in read_pieces(path):
            ids = table[_codepoints(piece)]
            if ids.min() < 0:
                raise UserError(f"{path!r} changed while it was read (it has characters the "
                                "first pass did not see); prepare it again once it is written")
            yield ids, done
    else:
        for chunks, done in text_chunks(read_pieces(path)):
            yield np.asarray(tokenizer.encode_chunks(chunks), dtype=np.int64), done


def prepare(text: str | os.PathLike, out: str | os.PathLike, tokenizer: str = "char",
            vocab_size: int | None = None, progress: TextIO | None = sys.stderr) -> dict:
    """Tokenize the UTF-8 file `text` into the token files of the new folder `out`:
    train.bin (the first 90% of the ids) and val.bin (the rest), flat token_dtype(vocab)
    arrays; tokenizer.json (the tokenizer's to_dict()); meta.json (what load_token_dir
    checks). The text is read twice, a piece at a time (vocabulary, then ids), so its size
    is bounded by the disk, not the memory. Everything is written into a temporary folder
    beside `out`, which becomes `out` by one rename at the end: a failure or Ctrl-C leaves
    nothing behind. `out` must not exist yet, or be an empty folder. Returns meta.json's dict.

    tokenizer "char": one id per character of the text (gpt.tokenizer.CharTokenizer);
    "bpe": byte-level BPE trained on the text with vocab_size (default 512) ids."""
    text, out = check_text_file(text, None), os.fspath(out)
    vocab_size = _check_prepare_settings(out, tokenizer, vocab_size)
    size = os.path.getsize(text)
    if size == 0:
        raise _empty(text, None)
    progress_line = _Progress(size, progress)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent,
                             suffix=".tmp")
    try:
        tok = _learn_tokenizer(text, tokenizer, vocab_size, progress_line)
        dtype = token_dtype(tok.vocab_size)
        ids_path = os.path.join(stage, TRAIN_FILE)  # all ids first; the tail moves to val.bin
        n = 0
        with open(ids_path, "wb") as f:
            for ids, done in _encoded_pieces(text, tok):
                f.write(ids.astype(dtype).tobytes())
                n += len(ids)
                progress_line("pass 2 of 2, token ids", done)
            progress_line.end()
            f.flush()  # the copy below reads what is written so far
            n_train = int(n * (1.0 - VAL_FRACTION))  # the split split_ids makes
            if n_train < 1 or n - n_train < 1:
                raise UserError(f"{text!r} has {n} token(s): too few to split 90/10 into "
                                "train and val; give it more text")
            with open(os.path.join(stage, VAL_FILE), "wb") as val, open(ids_path, "rb") as src:
                src.seek(n_train * dtype.itemsize)
                shutil.copyfileobj(src, val, 1 << 22)
                val.flush()
                os.fsync(val.fileno())
            f.truncate(n_train * dtype.itemsize)
            f.flush()
            os.fsync(f.fileno())
        meta = {"format": TOKEN_FORMAT, "source": text, "source_bytes": size,
                "tokenizer": tok.to_dict()["kind"], "vocab_size": tok.vocab_size,
                "dtype": dtype.name, "val_fraction": VAL_FRACTION,
                "train_tokens": n_train, "val_tokens": n - n_train,
                # (file_fingerprint takes these in: a dask worker's copy must match them)
                "train_sha256": _sha256(ids_path),
                "val_sha256": _sha256(os.path.join(stage, VAL_FILE))}
        for name, obj in ((TOKENIZER_FILE, tok.to_dict()), (META_FILE, meta)):
            atomic_write(os.path.join(stage, name), (json.dumps(obj, indent=1) + "\n").encode())
        os.chmod(stage, 0o755)  # mkdtemp made it private
        os.rename(stage, out)  # atomic; replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return meta


def _check_prepare_settings(out: str, tokenizer: str, vocab_size: int | None) -> int:
    """The vocab_size to train (bpe) after checking the settings and that `out` is free."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out!r} is a file; give the path of a new folder", field="out")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out!r} is not empty; give a new folder (prepare never writes over "
                        "one)", field="out")
    if tokenizer not in ("char", "bpe"):
        raise UserError(f"must be char or bpe, got {tokenizer!r}", field="tokenizer")
    if tokenizer == "char":
        if vocab_size is not None:
            raise UserError("is for --tokenizer bpe; the char tokenizer takes one id per "
                            "character of the text", field="vocab_size")
        return 0
    from .config import LIMITS

    vocab_size = 512 if vocab_size is None else vocab_size
    if not 258 <= vocab_size <= LIMITS["vocab_size"]:
        raise UserError(f"must be in [258, {LIMITS['vocab_size']:,}] for BPE (256 bytes + BOS "
                        f"+ EOS at least), got {vocab_size}", field="vocab_size")
    return vocab_size


@dataclass
class TokenData:
    """A prepared data folder (load_token_dir): the train and val ids as read-only memmaps
    (flat, token_dtype), the tokenizer they were made with, and meta.json."""

    path: str
    train: np.ndarray
    val: np.ndarray
    tokenizer: Any
    meta: dict


def is_token_dir(path: str | os.PathLike) -> bool:
    """Does `path` name a folder (so gpt.train reads it as token files, not as text)?"""
    return os.path.isdir(path)


def load_token_dir(path: str | os.PathLike, check_ids: bool = True) -> TokenData:
    """Map the token files of a folder made by `prepare`, after checking them against
    meta.json: the format, the tokenizer's vocabulary size, each file's size (a truncated or
    grown file is refused) and, with check_ids, every id (< vocab_size; one pass in pieces,
    through read(), so the check leaves nothing of the files in memory). UserError (one line,
    field "data") on any disagreement."""
    path = os.fspath(path)
    redo = f"make it again with `python -m gpt.data prepare TEXT --out {path}`"

    def refuse(why: str) -> UserError:
        return UserError(f"folder {path!r} {why}; {redo}", field="data")

    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise UserError(f"folder {path!r} holds no {META_FILE}: give a UTF-8 text file, or a "
                        f"folder made by `python -m gpt.data prepare TEXT --out {path}`",
                        field="data")
    docs = {}
    for name in (META_FILE, TOKENIZER_FILE):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                docs[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise refuse(f"has an unreadable {name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    meta = docs[META_FILE]
    counts = _check_meta(meta, refuse)
    dtype, vocab = np.dtype(meta["dtype"]), meta["vocab_size"]
    try:
        from .tokenizer import tokenizer_from_dict

        tokenizer = tokenizer_from_dict(docs[TOKENIZER_FILE])
    except (ValueError, TypeError, AttributeError) as e:
        raise refuse(f"has an invalid {TOKENIZER_FILE} ({e})") from None
    if tokenizer.vocab_size != vocab:
        raise refuse(f"disagrees with itself: {TOKENIZER_FILE} has {tokenizer.vocab_size} ids, "
                     f"{META_FILE} says vocab_size {vocab}")
    splits = {}
    for split, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
        file, n = os.path.join(path, name), counts[split]
        if not os.path.isfile(file):
            raise refuse(f"has no {name}")
        size, want = os.path.getsize(file), n * dtype.itemsize
        if size != want:
            what = "truncated" if size < want else "longer than written"
            raise refuse(f"has a {name} of {size:,} bytes where {META_FILE} says {n:,} "
                         f"{dtype.name} tokens ({want:,} bytes): it is {what}")
        if check_ids:
            bad = _first_id_at_least(file, dtype, vocab)
            if bad is not None:
                raise refuse(f"has token id {bad[1]} at position {bad[0]:,} of {name}, outside "
                             f"the vocabulary of {vocab} ids")
        splits[split] = np.memmap(file, dtype=dtype, mode="r", shape=(n,))
    return TokenData(path, splits["train"], splits["val"], tokenizer, meta)


def forget_pages(ids: np.ndarray) -> None:
    """Drop the pages of a token file that reads have mapped into this process (madvise
    MADV_DONTNEED on its np.memmap; a no-op for an array in memory, or where there is no
    madvise). Reading one window maps much more of the file than its few hundred bytes: the
    kernel maps the pages around a fault, and with large page-cache folios (Linux 6.x) a
    whole 2 MB folio per window. So windows() calls this after every batch: else a run's
    resident memory would grow by tens of MB a step toward the size of the file. The pages
    stay in the system's file cache, so reading them again is a memory read; the call costs
    about 0.2 ms (benchmarks/token_files.py's machine)."""
    mapping = getattr(ids, "_mmap", None)  # np.memmap's mmap.mmap
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


# Batches of at least this many tokens go to worker processes by reference (TokenWindows);
# smaller ones are cheaper to send as rows than for each worker to cut from its own map of the
# file (benchmarks/token_files.py, 2 loky workers: 12 x 64 tokens 2.8 ms a step as rows, 3.3 ms
# as starts; 32 x 256 4.5 and 3.5 ms; 64 x 1024 9.3 and 4.3 ms).
BY_REFERENCE_TOKENS = 4096
# The same for the workers of a dask cluster that read the same files (gpt.parallel.DaskCluster
# asks each one). benchmarks/token_files.py --parts dask, 2 workers on loopback, ms a step as
# rows / as starts: 768 tokens 19.7 / 19.8; 2,048 23.2 / 19.0 (another run: 19.9 / 18.8);
# 4,096 21.3 / 19.9; 8,192 24.2 / 20.5; 65,536 21.6 / 14.6. Below 4,096 tokens the two are
# within the noise of each other, so those batches keep the rows (and need no asking).
BY_REFERENCE_TOKENS_DASK = 4096


class TokenFileUnreadable(Exception):
    """This process cannot read the token file a TokenWindows names, or reads another one (its
    size or fingerprint differs): its rows must come from elsewhere."""


@dataclass(frozen=True)
class TokenWindows:
    """Windows of a token file by reference: the file (path, dtype, length), the windows'
    starts and block_size. It pickles in a few bytes, so a worker process can be sent this
    instead of a batch's rows and read them itself: batch() maps the file (once per process)
    and cuts the same x, y that windows() cuts in the parent. With a `fingerprint`
    (file_fingerprint of the parent's file; for workers that may be on other machines) the
    worker's file must have it too, else batch() raises TokenFileUnreadable."""

    path: str
    dtype: str
    length: int
    starts: np.ndarray  # (B,) int64
    block_size: int
    fingerprint: str | None = None

    @classmethod
    def of(cls, ids: np.ndarray, starts: np.ndarray, block_size: int) -> TokenWindows | None:
        """The windows `starts` of a token file's memmap (load_token_dir's); None for ids
        held in memory (nothing to read elsewhere)."""
        if not isinstance(ids, np.memmap) or not ids.filename or ids.offset or ids.ndim != 1:
            return None
        return cls(os.path.abspath(ids.filename), ids.dtype.name, len(ids),
                   np.asarray(starts, dtype=np.int64), block_size)

    def rows(self, r: slice) -> TokenWindows:
        """The windows of rows r of the batch."""
        return dataclasses.replace(self, starts=self.starts[r])

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y of these windows (int64 (B, T)), read from this process's map of the file."""
        return windows(mapped_token_file(self), self.starts, self.block_size)


def file_fingerprint(path: str, samples: int = 64, chunk: int = 4096) -> str:
    """A short hash that tells two copies of a token file apart without reading all of it:
    sha256 of its size, of the whole file's sha256 that `prepare` recorded in the meta.json
    beside it (if there is one that names it), and of `samples` chunks of `chunk` bytes
    spread evenly over the file (the first and the last included). So another corpus of the
    same length differs (its recorded sha256), and so does a file changed since (its
    samples; only a change that falls between them all would pass). A millisecond or two
    for any size."""
    size = os.path.getsize(path)
    h = hashlib.sha256(f"{size} {_recorded_sha256(path)}".encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, size - chunk) * i // max(1, samples - 1))
            h.update(f.read(chunk))
    return h.hexdigest()[:32]


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or written: device, inode, size, mtime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def mapped_token_file(w: TokenWindows) -> np.memmap:
    """This process's read-only map of the token file `w` names, made once and kept while the
    file stays the same one (its device, inode, size and mtime; a file replaced or rewritten
    is mapped and checked again). Raises TokenFileUnreadable (one line) when the file cannot
    be opened here, has another length, or (with w.fingerprint) another fingerprint."""
    key = (w.path, w.dtype, w.length, w.fingerprint)
    try:
        now = file_identity(os.stat(w.path))
        held = _mapped.get(key)
        if held is not None and held[0] == now:
            return held[1]
        want = w.length * np.dtype(w.dtype).itemsize
        if now[2] != want:
            raise TokenFileUnreadable(f"{w.path} has {now[2]:,} bytes here, not {want:,}")
        if w.fingerprint is not None and file_fingerprint(w.path) != w.fingerprint:
            raise TokenFileUnreadable(f"{w.path} here is another file (its fingerprint differs)")
        ids = np.memmap(w.path, dtype=w.dtype, mode="r", shape=(w.length,))
    except OSError as e:
        raise TokenFileUnreadable(f"cannot read {w.path} here ({e.strerror or e})") from None
    _mapped[key] = (now, ids)
    return ids


def _recorded_sha256(path: str) -> str:
    """The sha256 that meta.json beside `path` records for it ("" where there is none)."""
    split = {TRAIN_FILE: "train", VAL_FILE: "val"}.get(os.path.basename(path))
    try:
        with open(os.path.join(os.path.dirname(path), META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        return str(meta.get(f"{split}_sha256", "")) if split and isinstance(meta, dict) else ""
    except (OSError, ValueError):
        return ""


def _sha256(path: str) -> str:
    """The sha256 of a file's bytes, read a piece at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(PIECE_BYTES):
            h.update(piece)
    return h.hexdigest()


_mapped: dict[tuple, tuple[tuple, np.memmap]] = {}  # key -> (file identity, this process's map)


def _check_meta(meta: Any, refuse: Callable[[str], UserError]) -> dict[str, int]:
    """{"train": tokens, "val": tokens} from a meta.json, after checking its fields."""
    if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise refuse(f"has a {META_FILE} of format {got!r}, not {TOKEN_FORMAT!r}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise refuse(f"has a {META_FILE} whose dtype is {meta.get('dtype')!r}, not uint16 or "
                     "uint32")
    vocab = meta.get("vocab_size")
    if type(vocab) is not int or not 1 <= vocab <= np.iinfo(meta["dtype"]).max + 1:
        raise refuse(f"has a {META_FILE} whose vocab_size {vocab!r} does not fit its dtype "
                     f"{meta['dtype']}")
    counts = {split: meta.get(f"{split}_tokens") for split in ("train", "val")}
    if not all(type(n) is int and n >= 1 for n in counts.values()):
        raise refuse(f"has a {META_FILE} without positive train_tokens and val_tokens")
    return counts


def _first_id_at_least(file: str, dtype: np.dtype, limit: int,
                       piece: int = 1 << 20) -> tuple[int, int] | None:
    """(position, id) of the first id >= limit in the flat `dtype` file, or None. Reads it a
    piece at a time into one buffer (no memory map, so no page of it stays in this process)."""
    buf = np.empty(piece, dtype=dtype)
    view = memoryview(buf).cast("B")
    start = 0
    with open(file, "rb") as f:
        while True:
            got = f.readinto(view) // dtype.itemsize
            if got == 0:
                return None
            part = buf[:got]
            if part.max() >= limit:
                i = int(np.argmax(part >= limit))
                return start + i, int(part[i])
            start += got


# ---- python -m gpt.data shakespeare ------------------------------------------------------------
def download_shakespeare(out: str, url: str = SHAKESPEARE_URL,
                         size: int = SHAKESPEARE_SIZE, sha256: str = SHAKESPEARE_SHA256) -> str:
    """Fetch `url`, check its size and sha256, and write it to `out` atomically (a temp file
    in the same folder, then a rename): a failed or wrong download writes nothing."""
    if os.path.isdir(out):
        raise UserError(f"{out!r} is a directory; give a file path like {out}/input.txt",
                        field="out")
    local = urllib.parse.urlsplit(url)
    if local.scheme == "file":  # open() of a FIFO would wait forever: regular files only
        file = urllib.request.url2pathname(local.path)
        if os.path.exists(file) and not os.path.isfile(file):
            raise UserError(f"{url} is not a regular file; give the file:// URL of a copy of "
                            "Tiny Shakespeare", field="url")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(size + 1)  # one byte more than expected: enough to tell
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download {url}: {reason}; check the connection or give the "
            "file:// URL of a local copy"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha256:
        shown = f"more than {size}" if len(data) > size else str(len(data))
        raise UserError(
            f"{url} is not Tiny Shakespeare: got {shown} bytes (sha256 {digest[:12]}...), "
            f"expected {size} bytes (sha256 {sha256[:12]}...); nothing written"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, data)  # temp file, fsync, rename: never a half-written corpus
    return out


def build_parser() -> cli.Parser:
    parser = cli.Parser("python -m gpt.data", "Fetch training data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    shakespeare = sub.add_parser(
        "shakespeare", help="download Tiny Shakespeare (1.1 MB) and check size and sha256"
    )
    shakespeare.add_argument("--out", required=True, metavar="PATH",
                             help="where to write the text file")
    shakespeare.add_argument("--url", default=SHAKESPEARE_URL,
                             help="where to fetch it from (file:// URLs work)")
    prep = sub.add_parser(
        "prepare", help="tokenize a text file once into token files for gpt.train --data DIR"
    )
    prep.add_argument("text", metavar="TEXT", help="the UTF-8 text file to tokenize")
    prep.add_argument("--out", required=True, metavar="DIR",
                      help="the new folder for train.bin, val.bin, tokenizer.json, meta.json")
    prep.add_argument("--tokenizer", choices=("char", "bpe"), default="char",
                      help="char: one id per character; bpe: byte-level BPE trained on TEXT")
    prep.add_argument("--vocab-size", type=int, default=None, metavar="N",
                      help="BPE vocabulary size (with --tokenizer bpe; default 512)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        if args.command == "prepare":
            return prepare_command(args.text, args.out, args.tokenizer, args.vocab_size)
        try:
            path = download_shakespeare(args.out, args.url)
        except OSError as e:
            raise UserError(f"could not write {args.out!r}: {e.strerror or e}") from None
        print(f"wrote {path} ({SHAKESPEARE_SIZE} bytes, sha256 checked)")
        return 0

    return cli.run(command)


def prepare_command(text: str, out: str, tokenizer: str, vocab_size: int | None) -> int:
    """`python -m gpt.data prepare`: prepare(), then one line saying what was written."""
    t0 = time.perf_counter()
    try:
        meta = prepare(text, out, tokenizer, vocab_size)
    except OSError as e:
        raise UserError(f"could not prepare {out!r}: {e.strerror or e}; nothing was written") \
            from None
    seconds = time.perf_counter() - t0
    mb = meta["source_bytes"] / 1e6
    print(f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, {meta['tokenizer']} vocabulary of {meta['vocab_size']}) from "
          f"{mb:,.1f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-9):,.1f} MB/s); train on "
          f"it with python -m gpt.train --data {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
