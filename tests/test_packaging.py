"""What pip installs: a wheel built from this tree carries the files the packages read from
their own folders (tensorlite/kernels.c, compiled on the first run; gpt/serve.html; the
exercises' starters), and an install from it compiles and runs the C kernels as an editable
checkout does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("import numpy as np, tensorlite.functional as F\n"
        "from tensorlite import kernels, kernels_c\n"
        "print(kernels.kernel_path(), kernels_c.SOURCE.parent.parent.name)\n"
        "print(F.relu_squared(np.array([-1.0, 2.0], dtype=np.float32)).data)")


def test_a_wheel_carries_kernels_c_and_its_install_compiles_it_on_the_first_run(tmp_path):
    src = tmp_path / "src"
    for package in ("tensorlite", "gpt"):
        shutil.copytree(REPO / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation",
                                  "-w", str(tmp_path / "wheel")],
                           capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tensorlite/kernels.c" in names and "gpt/serve.html" in names
    starters = {n for n in names if n.startswith("tensorlite/exercises/starters/")}
    assert len(starters) >= 13 and "tensorlite/exercises/starters/top_p.py" in starters
    assert not [n for n in names if n.endswith(".so")]  # compiled on the user's machine

    site = tmp_path / "site"
    installed = subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300, check=False)
    assert installed.returncode == 0, installed.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TENSORLITE_KERNELS", "CC")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    said = run.stderr.splitlines()
    if shutil.which("cc") is None:  # CI installs one; without it, the one-line fallback
        assert run.stdout.split() == ["numpy", "site", "[0.", "4.]"]
        assert len(said) == 1 and "CompilerError: no C compiler" in said[0], said
        return
    assert run.stdout.split() == ["c", "site", "[0.", "4.]"], run.stderr
    assert len(said) == 2 and said[0].startswith("tensorlite: compiling C kernels"), said
