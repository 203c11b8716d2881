"""Data loading, the 90/10 split, batches, and `python -m gpt.data shakespeare` (driven with
file:// URLs: these machines have no internet)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt.cli import describe
from gpt.data import (
    SHAKESPEARE_SIZE,
    download_shakespeare,
    get_batch,
    load_text,
    split_ids,
)
from gpt.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SHARED_COPY = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gpt.data", *args], check=False,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


# ---- load_text -------------------------------------------------------------------------------
def test_load_text_reads_utf8(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo\nwörld", encoding="utf-8")
    assert load_text(p) == "héllo\nwörld"


@pytest.mark.parametrize("content, match", [
    (None, "^data file .* not found"),
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"abc\xff\xfedef", r"not UTF-8.*0xff at offset 3"),
])
def test_load_text_errors_are_one_line(tmp_path, content, match):
    p = tmp_path / "data.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        load_text(p)
    assert "\n" not in str(e.value)
    assert describe(e.value).startswith("--data file ")  # the command line names its flag


def test_load_text_refuses_a_directory(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_text(tmp_path)


# ---- split and batches ---------------------------------------------------------------------
def test_split_is_90_10_in_order():
    train, val = split_ids(list(range(100)))
    assert train.dtype == val.dtype == np.int64
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(val, np.arange(90, 100))


def test_split_too_short_names_the_sizes():
    split_ids(np.arange(100), block_size=9)  # val has 10 = block_size + 1: fine
    with pytest.raises(ValueError, match=r"100 tokens.*90 train and 10 val.*block_size \+ 1 = 11"):
        split_ids(np.arange(100), block_size=10)


def test_get_batch_windows_are_contiguous_and_shifted():
    ids = np.arange(1000, 1050)
    rng = np.random.default_rng(0)
    x, y = get_batch(ids, block_size=8, batch_size=64, rng=rng)
    assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)  # consecutive tokens
    np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one
    starts = x[:, 0] - 1000
    assert starts.min() >= 0 and starts.max() <= 50 - 9
    assert len(set(starts.tolist())) > 10  # random starts


def test_get_batch_reaches_both_ends_and_is_reproducible():
    ids = np.arange(10)
    x, y = get_batch(ids, 4, 500, np.random.default_rng(1))
    assert x[:, 0].min() == 0 and y[:, -1].max() == 9  # first and last window both drawn
    x2, y2 = get_batch(ids, 4, 500, np.random.default_rng(1))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_get_batch_too_short():
    with pytest.raises(ValueError, match=r"5 tokens.*block_size \+ 1 = 6"):
        get_batch(np.arange(5), 5, 2, np.random.default_rng(0))


# ---- the shakespeare command ------------------------------------------------------------------
def test_download_checks_size_and_sha_and_writes_atomically(tmp_path):
    src = tmp_path / "src.txt"
    data = b"To be, or not to be\n" * 50
    src.write_bytes(data)
    out = tmp_path / "sub" / "input.txt"
    sha = hashlib.sha256(data).hexdigest()
    download_shakespeare(str(out), src.as_uri(), size=len(data), sha256=sha)
    assert out.read_bytes() == data
    assert sorted(os.listdir(out.parent)) == ["input.txt"]  # no temp file left behind
    with pytest.raises(UserError, match="not Tiny Shakespeare"):
        download_shakespeare(str(out), src.as_uri(), size=len(data), sha256="0" * 64)
    with pytest.raises(UserError, match=f"got {len(data)} bytes"):
        download_shakespeare(str(tmp_path / "other.txt"), src.as_uri(), size=len(data) + 1,
                             sha256=sha)
    assert not (tmp_path / "other.txt").exists()
    assert out.read_bytes() == data  # the earlier good file is untouched


def test_cli_wrong_file_one_line_error_nothing_written(tmp_path):
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not shakespeare\n")
    out = tmp_path / "input.txt"
    r = _cli("shakespeare", "--out", str(out), "--url", wrong.as_uri(), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not Tiny Shakespeare" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["wrong.txt"]


@pytest.mark.parametrize("args, match", [
    ((), "required: command"),
    (("shakespeare",), "required: --out"),
    (("shakespeare", "--out", "x.txt", "--url", "file:///no/such/file"), "could not download"),
])
def test_cli_usage_errors_are_one_line_exit_2(tmp_path, args, match):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and match in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not SHARED_COPY.exists(), reason="needs the shared Tiny Shakespeare copy")
def test_cli_fetches_tiny_shakespeare_from_a_local_copy(tmp_path):
    out = tmp_path / "input.txt"
    r = _cli("shakespeare", "--out", str(out), "--url", SHARED_COPY.as_uri(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == SHAKESPEARE_SIZE
    assert out.read_bytes() == SHARED_COPY.read_bytes()
