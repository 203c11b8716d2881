"""The benchmark scripts refuse a corpus they cannot use in one line, as the CLIs do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["train.py", "profile_step.py"])
@pytest.mark.parametrize("corpus", ["missing", "empty", "binary"])
def test_a_corpus_that_cannot_be_read_is_one_line(tmp_path, script, corpus):
    path = tmp_path / "text.txt"
    if corpus == "empty":
        path.write_text("")
    elif corpus == "binary":
        path.write_bytes(b"\xff\xfe\x00" * 500)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--data", str(path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "--data" in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr
