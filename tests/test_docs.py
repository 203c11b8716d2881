"""Every `>>>` example in docs/*.md and README.md runs as a doctest, so the docs cannot drift from the code.

New files in docs/ are picked up automatically. Examples are written inside ```python fences;
fence lines are blanked before parsing, so a closing fence right after an expected output is
not read as part of that output. Each file runs in a fresh namespace, in a temporary working
directory (examples may write files), with ELLIPSIS and NORMALIZE_WHITESPACE on.
"""

from __future__ import annotations

import doctest
import io
import re
from pathlib import Path

import numpy as np
import pytest

from tensorlite import kernels

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [DOCS.parent / "README.md"]
MUST_HAVE_EXAMPLES = {"autograd.md", "verifying-gradients.md", "derivations.md", "gpt.md"}
FENCE = re.compile(r"^[ \t]*```.*$", flags=re.MULTILINE)


def run_doctests(path: Path) -> tuple[doctest.TestResults, str]:
    """(failed, attempted) for the examples in one markdown file, and the failure report."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    test = doctest.DocTestParser().get_doctest(
        text, {"__name__": f"docs.{path.stem}"}, path.name, str(path), 0
    )
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report = io.StringIO()
    with np.printoptions(legacy=False):
        runner.run(test, out=report.write)
    return doctest.TestResults(runner.failures, runner.tries), report.getvalue()


def test_the_docs_folder_is_found():
    assert MUST_HAVE_EXAMPLES <= {p.name for p in PAGES}


@pytest.mark.parametrize("path", PAGES, ids=[p.name for p in PAGES])
def test_doc_examples_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        results, report = run_doctests(path)
    finally:
        kernels.force_numexpr(None)  # an example may force a path; don't leak it
    assert results.failed == 0, f"{path.name}: {results.failed} example(s) failed\n{report}"
    if path.name in MUST_HAVE_EXAMPLES:
        assert results.attempted > 0, f"{path.name} has no >>> examples"


def test_each_op_docstring_opens_with_its_math():
    """autograd.md: an op's docstring opens with the math, the forward then each gradient."""
    import inspect

    from tensorlite import functional, ops
    from tensorlite.autograd import Function

    for module in (ops, functional):
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and issubclass(cls, Function) and cls.__module__ == module.__name__):
                continue
            opening = (cls.__doc__ or "").split("\n\n")[0]
            assert re.match(r"(out|y|loss) = ", opening), f"{name}: docstring does not open with the forward"
            assert re.search(r"\bd\w+ = ", opening), f"{name}: no gradient in the docstring's opening"
