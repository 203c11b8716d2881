"""Training data: read a UTF-8 text file, split its token ids 90/10 into train and
validation, and draw random batches of contiguous windows. Also a small command to fetch
Tiny Shakespeare, checked by size and sha256:

    python -m gpt.data shakespeare --out input.txt [--url URL]
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np

from . import cli
from .checkpoint import atomic_write
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
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"file {path!r} not found; give the path of a UTF-8 text file (or get "
                        f"Tiny Shakespeare: {GET_DATA_HINT})", field="data")
    if not os.path.isfile(path):
        raise UserError(f"path {path!r} is not a file; give the path of a text file",
                        field="data")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise UserError(f"file {path!r} is empty; give it some text to train on", field="data")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"file {path!r} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); convert it, e.g. iconv -t UTF-8 FILE > FILE.utf8", field="data"
        ) from None


def split_ids(ids: Sequence[int] | np.ndarray, val_fraction: float = 0.1,
              block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first 90% of the ids and the last 10% (int64 arrays).

    With `block_size`, both parts must hold at least block_size + 1 tokens (one window),
    else UserError naming the sizes."""
    ids = np.asarray(ids, dtype=np.int64)
    n_train = int(len(ids) * (1.0 - val_fraction))
    train, val = ids[:n_train], ids[n_train:]
    if block_size is not None and min(len(train), len(val)) < block_size + 1:
        raise UserError(
            f"the data is too short: {len(ids)} tokens split into {len(train)} train and "
            f"{len(val)} val, and each needs at least block_size + 1 = {block_size + 1}; "
            "use more text or a smaller block_size"
        )
    return train, val


def get_batch(ids: np.ndarray, block_size: int, batch_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` random windows of block_size + 1 consecutive tokens: x is each window's
    first block_size tokens, y the same shifted by one (the next token to predict).
    Returns x, y, both int64 (B, T)."""
    n = len(ids)
    if n < block_size + 1:
        raise UserError(
            f"{n} tokens are too few for one window of block_size + 1 = {block_size + 1}; "
            "use more text or a smaller block_size"
        )
    starts = rng.integers(0, n - block_size, size=batch_size)  # (B,): window starts
    windows = np.asarray(ids)[starts[:, None] + np.arange(block_size + 1)]  # (B, T+1)
    x = np.ascontiguousarray(windows[:, :-1], dtype=np.int64)  # (B, T)
    y = np.ascontiguousarray(windows[:, 1:], dtype=np.int64)  # (B, T)
    return x, y


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def command() -> int:
        args = build_parser().parse_args(argv)
        try:
            path = download_shakespeare(args.out, args.url)
        except OSError as e:
            raise UserError(f"could not write {args.out!r}: {e.strerror or e}") from None
        print(f"wrote {path} ({SHAKESPEARE_SIZE} bytes, sha256 checked)")
        return 0

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
