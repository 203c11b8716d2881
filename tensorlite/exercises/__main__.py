"""python -m tensorlite.exercises: the graded exercises from the command line.

    list                   one line per exercise: NAME, its title, the doc section it belongs to
    start DIR              write a starter DIR/NAME.py for every exercise (DIR must not exist)
    check NAME [--dir DIR] [--examples N]
                           grade DIR/NAME.py (DIR defaults to .): exit 0 and what was checked,
                           or exit 1 and the smallest counterexample found (N random cases
                           per check, default 30)
    hint NAME [--dir DIR]  the next hint for NAME; which hints you have seen is kept in
                           DIR/.exercise-hints.json (delete it to start over)

Bad input (an unknown NAME, a missing file, an existing DIR) gets one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

from . import BY_NAME, EXERCISES, Exercise
from .grader import EXAMPLES, Failure, Stop, learner_line

HINTS_FILE = ".exercise-hints.json"
PROG = "python -m tensorlite.exercises"


class UsageError(Exception):
    """Bad input: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see `{PROG} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Graded exercises: write a piece of tensorlite or "
                     "the GPT; the grader answers with the smallest counterexample it finds.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="the exercises, in reading order")
    start = sub.add_parser("start", help="write a starter file per exercise into a new folder")
    start.add_argument("dir", metavar="DIR", type=Path)
    check = sub.add_parser("check", help="grade DIR/NAME.py")
    check.add_argument("name", metavar="NAME")
    check.add_argument("--dir", type=Path, default=Path("."), help="where NAME.py is (default .)")
    check.add_argument("--examples", type=int, default=EXAMPLES,
                       help=f"random cases hypothesis tries per check (default {EXAMPLES})")
    hint = sub.add_parser("hint", help="the next hint for NAME")
    hint.add_argument("name", metavar="NAME")
    hint.add_argument("--dir", type=Path, default=Path("."),
                      help=f"where {HINTS_FILE} keeps your progress (default .)")
    return parser


def exercise(name: str) -> Exercise:
    if name not in BY_NAME:
        raise UsageError(f"no exercise named {name!r}; `{PROG} list` shows the names")
    return BY_NAME[name]


def list_exercises() -> int:
    width = max(len(e.name) for e in EXERCISES)
    for e in EXERCISES:
        print(f"{e.name:<{width}}  {e.title}  (docs/{e.doc}: {e.section})")
    return 0


def start(folder: Path) -> int:
    if folder.exists():
        raise UsageError(f"{folder} already exists; start writes into a new folder, so that it "
                         "never overwrites your work: name one that does not exist")
    folder.mkdir(parents=True)
    for e in EXERCISES:
        shutil.copyfile(e.starter, folder / f"{e.name}.py")
    print(f"wrote {len(EXERCISES)} starters to {folder}/, in reading order:")
    for e in EXERCISES:
        print(f"  {folder / (e.name + '.py')}  {e.title}")
    first = EXERCISES[0].name
    print(f"next: fill in {folder / (first + '.py')}, then `{PROG} check {first} --dir {folder}`")
    return 0


def load(path: Path, name: str) -> ModuleType:
    """Import the learner's file; a syntax error or an exception at import is a Failure."""
    spec = importlib.util.spec_from_file_location(f"exercise_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # their files may import each other
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise Failure(f"{path.name}, line {e.lineno}: SyntaxError: {e.msg}\n  {(e.text or '').strip()}")
    except Exception as e:  # noqa: BLE001 - the learner's file raised: show their line

        raise Failure(f"importing {path.name} raised {type(e).__name__}: {e}\n"
                      f"  at {learner_line(e, module)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def check(name: str, folder: Path, examples: int) -> int:
    ex = exercise(name)
    path = folder / f"{name}.py"
    if not path.is_file():
        raise UsageError(f"no file {path}; `{PROG} start DIR` writes the starters (then pass "
                         "--dir DIR)")
    if examples < 1:
        raise UsageError(f"--examples must be at least 1, got {examples}")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # the learner's NaNs show as wrong numbers
            checked = ex.grade(load(path, name), examples)
    except (Failure, Stop) as e:
        print(f"FAILED {name} ({path})\n{e}")
        print(f"stuck? `{PROG} hint {name}{'' if folder == Path('.') else f' --dir {folder}'}`")
        return 1
    except Exception as e:  # noqa: BLE001 - never a traceback: say what stopped the check
        print(f"FAILED {name} ({path}): the check stopped with {type(e).__name__}: {e}\n"
              "(if your code is not the cause, this is a bug of the grader: please report it)")
        return 1
    print(f"passed {name} ({path}); checked:")
    for line in checked:
        print(f"  - {line}")
    return 0


def hint(name: str, folder: Path) -> int:
    ex = exercise(name)
    if not folder.is_dir():
        raise UsageError(f"no folder {folder}; pass --dir DIR, the folder of your exercises")
    state_path = folder / HINTS_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
        seen = int(state.get(name, 0)) if isinstance(state, dict) else 0
    except (ValueError, OSError):  # a corrupt progress file: start over rather than fail
        state, seen = {}, 0
    if not isinstance(state, dict):
        state = {}
    if seen >= len(ex.hints):
        print(f"{name}: all {len(ex.hints)} hints shown:")
        for i, text in enumerate(ex.hints, 1):
            print(f"  {i}. {text}")
        print(f"the reference solution is examples/exercises/{name}.py in the repository "
              f"(delete {state_path} to see the hints one by one again)")
        return 0
    print(f"{name}, hint {seen + 1} of {len(ex.hints)}: {ex.hints[seen]}")
    state[name] = seen + 1
    state_path.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            return list_exercises()
        if args.command == "start":
            return start(args.dir)
        if args.command == "check":
            return check(args.name, args.dir, args.examples)
        return hint(args.name, args.dir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
