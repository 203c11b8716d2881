"""Every `python -m gpt.<module> ...` command shown in README.md and docs/ uses flags that
module really has (the commands themselves are run end to end by the CLI tests)."""

from __future__ import annotations

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
