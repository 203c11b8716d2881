"""What README.md and docs/ name must exist: every `python -m gpt.<module> ...` command uses
flags that module really has (the commands themselves are run end to end by the CLI tests),
every `python path/to/script.py` and every repository path names a file that is there, and
every API name in inline code (`tensorlite.autograd.backward`, `tl.gradcheck`,
`F.softmax`, `model.forward_cached(...)`, ...) resolves to a real attribute."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", flags=re.DOTALL)
COMMAND = re.compile(r"python3? -m (gpt\.\w+)((?: +(?!&&|\||#)[^\s]+)*)")


def shown_commands() -> list[tuple[str, str, str]]:
    """(page, module, arguments) for each gpt command in a ```bash block."""
    found = []
    for page in PAGES:
        for block in BASH_BLOCK.findall(page.read_text(encoding="utf-8")):
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                line = line.split("#", 1)[0]
                for module, args in COMMAND.findall(line):
                    found.append((page.name, module, args))
    return found


@cache
def help_text(module: str, subcommand: str | None) -> str:
    cmd = [sys.executable, "-m", module] + ([subcommand] if subcommand else []) + ["--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(cmd[1:])} failed: {out.stderr}"
    return out.stdout


def test_the_docs_show_commands():
    modules = {m for _, m, _ in shown_commands()}
    assert {"gpt.train", "gpt.sample", "gpt.plot", "gpt.data"} <= modules


@pytest.mark.parametrize("page,module,args", shown_commands())
def test_shown_flags_exist(page, module, args):
    words = args.split()
    subcommand = words[0] if module == "gpt.data" and words and not words[0].startswith("-") else None
    text = help_text(module, subcommand)
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}(?=[\s,=\]]|$)", text, re.MULTILINE), (
            f"{page}: `python -m {module}` has no flag {flag}"
        )


# ---- scripts, paths and API names --------------------------------------------------------------
SCRIPT = re.compile(r"python3? ((?:examples|docs|benchmarks)/[\w/.-]+\.py)")
REPO_PATH = re.compile(r"\b((?:tensorlite|gpt|tests|benchmarks|examples|docs)/[\w/.-]*\w\.(?:py|md))\b")
WRITTEN_BY_THE_READER = {"tests/test_softplus.py"}  # "in a test file (say tests/test_softplus.py)"
FENCED = re.compile(r"^```.*?^```", flags=re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`([^`]+)`")  # may wrap onto the next line
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "txt", "py", "md", "png", "old", "tmp"}
API_NAME = re.compile(r"^([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$")
PREFIXES = {  # how the docs write a name -> where it lives
    "tensorlite": "tensorlite", "tl": "tensorlite", "F": "tensorlite.functional",
    "kernels": "tensorlite.kernels", "ops": "tensorlite.ops", "gpt": "gpt",
    "Function": "tensorlite.autograd:Function", "Tensor": "tensorlite:Tensor",
    "model": "gpt.model:GPT",
}


def page_texts() -> list[tuple[str, str]]:
    return [(p.name, p.read_text(encoding="utf-8")) for p in PAGES]


def shown_paths() -> list[tuple[str, str]]:
    """(page, path) for every script run and every repository file a page names."""
    found = set()
    for page, text in page_texts():
        for path in SCRIPT.findall(text) + REPO_PATH.findall(text):
            if "NAME" not in path and path not in WRITTEN_BY_THE_READER:
                found.add((page, path))
    return sorted(found)


def shown_api_names() -> list[tuple[str, str]]:
    """(page, dotted name) for inline code that names an attribute of our packages."""
    found = set()
    for page, text in page_texts():
        for code in INLINE_CODE.findall(FENCED.sub("", text)):
            m = API_NAME.match(" ".join(code.split()))
            if m and m.group(1) in PREFIXES and m.group(2).rsplit(".", 1)[1] not in FILE_SUFFIXES:
                found.add((page, m.group(1) + m.group(2)))
    return sorted(found)


def resolve(dotted: str):
    """The object `dotted` names, importing submodules on the way; AttributeError if none."""
    head, *rest = dotted.split(".")
    module_name, _, attr = PREFIXES[head].partition(":")
    obj = importlib.import_module(module_name)
    if attr:
        obj = getattr(obj, attr)
    for name in rest:
        if inspect.ismodule(obj) and not hasattr(obj, name):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{name}")
                continue
            except ModuleNotFoundError:
                raise AttributeError(f"{obj.__name__} has no {name}") from None
        if (inspect.isclass(obj) and not hasattr(obj, name)
                and re.search(rf"self\.{name}\b", inspect.getsource(obj))):
            return None  # an instance attribute, set in __init__
        obj = getattr(obj, name)
    return obj


def test_the_docs_name_paths_and_apis():
    assert len(shown_paths()) > 20 and len(shown_api_names()) > 20


@pytest.mark.parametrize("page,path", shown_paths())
def test_shown_path_exists(page, path):
    assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"


@pytest.mark.parametrize("page,name", shown_api_names())
def test_shown_api_name_exists(page, name):
    try:
        resolve(name)
    except AttributeError as e:
        pytest.fail(f"{page} names `{name}`, which does not exist ({e})")
