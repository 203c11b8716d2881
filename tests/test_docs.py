"""Every `>>>` example in docs/*.md and README.md runs as a doctest, so the docs cannot drift from the code.

New files in docs/ are picked up automatically. Examples are written inside ```python fences;
fence lines are blanked before parsing, so a closing fence right after an expected output is
not read as part of that output. Each file runs in a fresh namespace, in a temporary working
directory (examples may write files), with ELLIPSIS and NORMALIZE_WHITESPACE on.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import doctest
import fnmatch
import importlib
import inspect
import io
import pkgutil
import re
import textwrap
from functools import cache
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
    before = kernels.kernel_path()
    try:
        results, report = run_doctests(path)
    finally:
        kernels.use_kernels(before)  # an example may switch paths; don't leak it
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


# ---- names the docs use must exist in the code -------------------------------------------------
# (tests/test_doc_commands.py resolves module-qualified names such as `tl.gradcheck` and checks
# the flags of the commands in ```bash blocks; these checks cover the rest: every --flag
# anywhere in the prose, the commands in inline code and ```text blocks, bare function calls,
# and what derivations.md says each fused op saves.)

ROOT = DOCS.parent
FENCED_BLOCK = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
GPT_COMMAND = re.compile(r"python3? -m ((?:gpt|tensorlite)\.\w+)((?: +(?!&&|\||#)[^\s`]+)*)")
# Commands of other tools whose flags the docs quote (`docker --cpus 2`, `pip install -e`)
OTHER_TOOLS = re.compile(r"^\s*(?:\w+=\S+\s+)*(?:python3? -m (?:pip|pytest)|pip|pytest|docker|"
                         r"dask[ -]worker|dask[ -]scheduler|git|dot|curl|ruff|apt|brew|uvicorn)\b")


def _parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _parser_flags(sub)
    return flags


@cache
def command_flags() -> dict[str, set[str]]:
    """{module: its flags} for every module of gpt and tensorlite that builds a parser."""
    import gpt
    import tensorlite

    found = {}
    for package in (gpt, tensorlite):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)  # a __main__ guards its main() call
            if callable(getattr(module, "build_parser", None)):
                found[info.name.removesuffix(".__main__")] = _parser_flags(module.build_parser())
    return found


@cache
def script_flags() -> set[str]:
    """The flags the scripts in benchmarks/, examples/ and docs/ define."""
    scripts = [*ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("benchmarks/**/*.sh"),
               *ROOT.glob("examples/**/*.py"), *DOCS.glob("*.py")]
    return {f for path in scripts
            for f in re.findall(r"[\"'](--[a-z][a-z0-9-]*)", path.read_text(encoding="utf-8"))}


def code_contexts(text: str) -> list[str]:
    """The lines of every fenced block and every inline code span of a page, and its prose."""
    blocks = FENCED_BLOCK.findall(text)
    prose = FENCED_BLOCK.sub("", text)
    spans = [" ".join(s.split()) for s in INLINE.findall(prose)]
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()[1:-1]]
    return lines + spans + [INLINE.sub("", prose)]


def test_every_flag_the_docs_name_exists():
    modules = command_flags()
    assert {"gpt.train", "gpt.sample", "gpt.serve"} <= set(modules)
    known = set().union(*modules.values()) | script_flags()
    wrong = []
    for path in PAGES:
        for context in code_contexts(path.read_text(encoding="utf-8")):
            if OTHER_TOOLS.match(context):
                continue
            commanded = set()
            for module, args in GPT_COMMAND.findall(context):  # a command: that module's flags
                words = (w.split("=")[0] for w in args.split() if w.startswith("--"))
                wrong += [f"{path.name}: `python -m {module}` has no {w}"
                          for w in words if w not in modules.get(module, set())]
                commanded |= set(FLAG.findall(args))
            wrong += [f"{path.name}: no command has a flag {f}"
                      for f in FLAG.findall(context) if f not in known and f not in commanded]
    assert not wrong, "\n".join(sorted(set(wrong)))


@cache
def defined_names() -> set[str]:
    """Every function, class, variable and attribute our code defines (by its last part)."""
    files = [*ROOT.glob("tensorlite/**/*.py"), *ROOT.glob("gpt/**/*.py"),
             *ROOT.glob("examples/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *DOCS.glob("*.py")]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


MATH_NOTATION = {"ln", "f_jvp", "f_vjp"}  # functions of the math, not of the code
OTHER_LIBRARIES = {"dask", "joblib", "sys", "time", "os", "math", "np", "numpy", "torch",
                   "LocalCluster", "json", "struct"}


def test_every_function_called_in_inline_code_exists():
    """`name(...)` in a page's prose names something our code (or Python, or NumPy) defines."""
    import numpy

    wrong = []
    for path in PAGES:
        for span in INLINE.findall(FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))):
            m = re.match(r"([A-Za-z_][\w.]*)\(", " ".join(span.split()))
            if not m:
                continue
            parts = m.group(1).split(".")
            if parts[0] in OTHER_LIBRARIES or parts[-1] in MATH_NOTATION:
                continue
            if not (parts[-1] in defined_names() or hasattr(builtins, parts[-1])
                    or hasattr(numpy, parts[-1])):
                wrong.append(f"{path.name}: `{span}` calls {parts[-1]}, which the code does not define")
    assert not wrong, "\n".join(wrong)


def saved_attributes(cls) -> set[str]:
    """The names a Function class assigns as `self.NAME = ...` (what it keeps for backward)."""
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets
                       for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            names |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                      and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


SECTION_OPS = {"causal attention": ["ScaledDotProductAttention", "CausalSelfAttention"]}


def test_what_derivations_md_says_each_op_saves_is_what_it_saves():
    """Each "**Saved:**" paragraph's `names` are attributes its op's class sets (a renamed or
    dropped buffer fails here). A section whose heading names no class is checked against
    every fused op."""
    from tensorlite import functional
    from tensorlite.autograd import Function

    ops = {name: cls for name, cls in vars(functional).items()
           if inspect.isclass(cls) and issubclass(cls, Function) and cls.__module__ == functional.__name__}
    text = (DOCS / "derivations.md").read_text(encoding="utf-8")
    checked = 0
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading = section.splitlines()[0].strip()
        names = SECTION_OPS.get(heading.lower()) or [
            n for n in ops for part in re.split(r" and |, ", heading.lower())
            if n.lower() == part.replace("-", "").replace(" ", "")]
        allowed = set().union(*(saved_attributes(ops[n]) for n in (names or ops)))
        for paragraph in re.findall(r"^\*\*Saved:\*\*(.*?)(?:\n\n|\Z)", section, re.DOTALL | re.MULTILINE):
            for name in INLINE.findall(paragraph):
                name = name.removeprefix("self.")
                if re.fullmatch(r"[A-Za-z_]\w*", name):
                    checked += 1
                    assert name in allowed, (f"derivations.md, {heading}: says `{name}` is saved, "
                                             f"but {', '.join(names) or 'no fused op'} sets no self.{name}")
    assert checked >= 8


def _gitignored(path: str, patterns: list[str]) -> bool:
    """Whether .gitignore's `patterns` (in order; the last match wins) ignore `path`, a
    path relative to the repository root (a subset of git's rules: enough for ours)."""
    ignored = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        anchored = pattern.startswith("/") or "/" in pattern
        pattern = pattern.lstrip("/")
        candidates = prefixes if anchored else [p.rsplit("/", 1)[-1] for p in prefixes]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negate
    return ignored


WRITES = [re.compile(r"--out-dir +([\w./-]+)"), re.compile(r"--out +([\w./-]+)"),
          re.compile(r"--output +([\w./-]+)"), re.compile(r" -o +([\w./-]+)"),
          re.compile(r"open\(\"([\w./-]+)\", \"w\""),
          re.compile(r"python -m tensorlite\.exercises start +([\w./-]+)")]


def test_following_the_docs_leaves_the_clone_clean():
    """What the docs' commands and examples write (run folders, downloaded text, graph.dot)
    is ignored by git, so a reader who follows them gets no untracked files."""
    patterns = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    written = {(path.name, m) for path in PAGES for rx in WRITES
               for m in rx.findall(path.read_text(encoding="utf-8"))
               if not m.startswith("/") and m.lower() != m.upper() and not m.isupper()}
    assert len(written) >= 8
    assert _gitignored("baby/best/model.safetensors", patterns)
    assert not _gitignored("docs/img/block.png", patterns)
    wrong = [f"{page}: writes {p}, which .gitignore does not ignore" for page, p in sorted(written)
             if not _gitignored(p, patterns)]
    assert not wrong, "\n".join(wrong)



def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_link_to_a_section_finds_its_heading():
    """Links like [..](gpt.md#checkpoints) or [..](#appendix-...) land on a real heading, so
    moving a section (autograd.md's kernels to performance.md, gpt.md's checkpoint files to
    training.md) cannot leave a dead link behind."""
    anchors = {}
    for path in PAGES:
        text = FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))
        anchors[path.resolve()] = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}
    wrong, links = [], 0
    for path in PAGES:
        text = FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)#([\w-]+)\)", text):
            links += 1
            page = (path.parent / target).resolve() if target else path.resolve()
            if anchor not in anchors.get(page, set()):
                wrong.append(f"{path.name}: link to {target or path.name}#{anchor} finds no heading")
    assert links >= 10
    assert not wrong, "\n".join(wrong)


def test_start_here_names_every_graded_exercise_in_order():
    """README's "Start here" table puts each exercise of `python -m tensorlite.exercises` after
    the step it belongs to: all of them, in the order `list` gives, numbered as it numbers them."""
    from tensorlite.exercises import EXERCISES

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Start here", 1)[1].split("\n### ", 1)[0]
    names = [e.name for e in EXERCISES]
    named = [n for n in re.findall(r"`(\w+)`", table) if n in names]
    assert named == names
    numbered = re.findall(r"\| (\d+)(?:-\d+)?: `(\w+)`", table)  # "| 10-11: `hessian_...`"
    assert len(numbered) >= 4
    for number, first in numbered:
        assert names[int(number) - 1] == first, f"exercise {number} is {names[int(number) - 1]}"
