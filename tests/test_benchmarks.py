"""The benchmark scripts refuse a corpus or a count they cannot use in one line, as the CLIs
do, and profile_step reports per step whatever the number of steps."""

from __future__ import annotations

import os
import re
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


def profile_step(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), *flags],
                          capture_output=True, text=True, timeout=300, check=False)


def test_profile_step_counts_per_step_whatever_the_number_of_steps(tmp_path):
    # Profiled and plain steps take turns: --steps N profiles N steps and runs N plain ones.
    # The op table's calls per step are those of one step for any N, and the per-shard
    # median is taken over the plain steps' shards alone (N steps x 2 threads).
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(chr(97 + (i * 7) % 26) for i in range(5000)))
    tables = {}
    for steps in (1, 3):
        out = profile_step("--data", str(corpus), "--steps", str(steps), "--threads", "2")
        assert out.returncode == 0, out.stderr
        table = out.stdout.split("\nop ", 1)[1].split("\nops total", 1)[0].splitlines()[1:]
        tables[steps] = sorted(tuple(row.split()[:3]) for row in table)  # op, phase, calls
        assert f"median of the plain steps' {2 * steps} shards" in out.stdout
    assert tables[1] == tables[3] and tables[1]


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--steps", "-1"], ["--threads", "0"]])
def test_profile_step_refuses_counts_below_one_in_one_line(tmp_path, flags):
    corpus = tmp_path / "text.txt"
    corpus.write_text("abc " * 500)
    out = profile_step("--data", str(corpus), *flags)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and flags[0] in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--iters", "0"], ["--threads", "0"],
                                   ["--warmup", "-1"], ["--engines", "tensorlite,nope"]])
def test_train_benchmark_refuses_counts_and_engines_it_cannot_run_in_one_line(tmp_path, flags):
    corpus = tmp_path / "text.txt"
    corpus.write_text("abc " * 500)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), "--data",
                          str(corpus), *flags], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and flags[0] in out.stderr
    assert "Traceback" not in out.stderr


def test_ops_compares_every_training_kernel_on_each_path():
    """benchmarks/ops.py is where the kernel paths are compared (issue 10): one row per kernel
    of a training step, one column per path, NumPy the baseline. (Timings are not checked.)"""
    from tensorlite import kernels

    paths = ["numpy", "c", "numexpr"] if kernels.kernel_path() == "c" else ["numpy", "numexpr"]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ops.py"), "--baby",
                          "--rounds", "1", "--sample-ms", "0.2", "--threads", "1",
                          "--paths", *paths], capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert f"| kernel | size | threads | {' | '.join(paths)} |" in out.stdout
    rows = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[3:]
            for line in out.stdout.splitlines() if " | baby | " in line}
    for kernel in ("attention", "rms_norm", "relu_squared", "cross_entropy"):
        for way in ("forward", "backward"):
            assert f"{kernel} {way}" in rows, sorted(rows)
    assert "embedding backward" in rows and any(k.startswith("adamw_update") for k in rows)
    for cells in rows.values():
        assert len(cells) == len(paths) and cells[0].endswith("(1.00)")  # NumPy / NumPy


def test_targets_script_names_scripts_and_flags_that_exist():
    """benchmarks/targets.sh runs every measurement the speed targets name: each command it
    would run is a script (or module) of this repository, and each flag it passes is one that
    the command's --help lists (so a renamed flag fails here, not an hour into a run)."""
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "targets.sh")], cwd=ROOT,
                         env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    commands = [line.split() for line in out.stderr.splitlines() if line.startswith("python ")]
    assert len(commands) == 15  # 2 train.py runs, 8 profile_step.py, ops, 2 start-ups, train, sample
    helps = {}
    for words in commands:
        target = tuple(words[1:3]) if words[1] == "-m" else (words[1],)
        if target not in helps:
            helps[target] = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=120,
                                           check=True).stdout
        for flag in (w for w in words if w.startswith("--")):
            assert flag in helps[target], f"{' '.join(target)} has no {flag}"


@pytest.mark.parametrize("flags", [["--rounds", "0"], ["--steps", "0"], ["--mb", "0"],
                                   ["--parts", "prepare,nope"], ["--source", "missing.txt"]])
def test_token_files_benchmark_refuses_what_it_cannot_run_in_one_line(tmp_path, flags):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "token_files.py"), *flags],
                         capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and flags[0] in out.stderr
    assert "Traceback" not in out.stderr


def test_token_files_benchmark_prints_prepare_figures(tmp_path):
    source = tmp_path / "s.txt"
    source.write_text("the cat sat on the mat; the dog sat on the log.\n" * 400)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "token_files.py"), "--mb",
                          "0.1", "--rounds", "1", "--parts", "prepare", "--bpe-vocab", "300",
                          "--source", str(source), "--tmp", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    for kind in ("char", "bpe"):
        assert re.search(rf"^  {kind} +[\d.]+ \[[\d.]+-[\d.]+\] s +[\d.]+ \[.*\] MB/s +\d+ \[.*\] MB$",
                         out.stdout, re.MULTILINE), out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.txt"]  # its temp folder is gone


def test_gemv_benchmark_prints_every_way_for_every_shape():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gemv.py"), "--rounds", "1",
                          "--megabytes", "8"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "GB/s" in line and "x" in line]
    assert len(lines) == 5 and all(line.count(" GB/s") == 1 and "row_dots 4K pages" in line
                                   for line in lines)
