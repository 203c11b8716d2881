"""The command-line toolkit every `python -m gpt.<command>` is built with (train, sample, data,
plot; serve the same way): one parser base, one error class, one exit-code rule, and flags
generated from a settings dataclass so that defaults and help live in one place.

The exit-code rule:

    0    done
    2    a problem the user can fix: one line "error: ..." on stderr, no traceback (a bad flag
         or value, a missing or corrupt file, a run that cannot go on). GPT_DEBUG=1 shows the
         traceback instead.
    130  interrupted (Ctrl-C)
    1    anything else (a bug, or an input no check foresaw): still one line, "error: unexpected
         TypeError: ... (set GPT_DEBUG=1 for a traceback)", from the last-resort handler

Library code raises `UserError` (gpt/errors.py) about values and names the config field it
is about (`UserError("must be >= 0, got -1", field="temperature")`); only this layer spells
flags (`--temperature must be >= 0, got -1`).

How a new command uses it (gpt.serve, say):

    from dataclasses import dataclass
    from . import cli
    from .config import setting

    @dataclass
    class ServeConfig:                      # one field per flag: --out-dir, --port
        out_dir: str = setting("out", "the training run's folder", metavar="PATH")
        port: int = setting(8000, "TCP port to listen on (127.0.0.1)")

    def serve(cfg: ServeConfig) -> int: ...  # library code: raises UserError on bad values

    def main(argv=None) -> int:
        parser = cli.Parser("python -m gpt.serve", "Serve a checkpoint over HTTP.")
        cli.add_config_flags(parser, ServeConfig)
        return cli.run(lambda: serve(cli.parse_config(parser, ServeConfig, argv)[0]))
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence

from .config import from_flat, leaf_fields
from .errors import UserError

__all__ = [
    "EXIT_BUG",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "Parser",
    "UserError",
    "add_config_flags",
    "describe",
    "flag",
    "parse_config",
    "run",
]

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BUG = 0, 2, 130, 1


def flag(field: str) -> str:
    """The flag of a config field: out_dir -> --out-dir."""
    return "--" + field.replace("_", "-")


class _Formatter(argparse.HelpFormatter):
    """Every option's help ends with its default (unless it has none or says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default" not in text and action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with our conventions: defaults in --help, and a usage mistake is a UserError
    (one line, exit 2 through `run`) instead of argparse's usage block."""

    def __init__(self, prog: str, description: str = "", **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def add_config_flags(parser: argparse.ArgumentParser, cls: type,
                     presets: dict[str, dict] | None = None) -> None:
    """One flag per field of the dataclass `cls` (fields of a nested dataclass too, in an
    argument group named after it). The annotation decides the flag: bool -> a switch,
    int/float/str -> a value, Literal[...] -> a choice, list[X] -> one or more values.
    Defaults are not stored in the namespace (SUPPRESS), so `parse_config` can tell which
    flags were given; the help text shows them. With `presets`, --preset NAME sets several
    fields at once."""
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=argparse.SUPPRESS,
                            metavar="NAME", help="named settings, overridden by flags given: "
                            + "; ".join(f"{k}: {_show(v)}" for k, v in presets.items()))
    groups: dict[type, argparse._ActionsContainer] = {cls: parser}
    for owner, f, kind in leaf_fields(cls):
        if owner not in groups:
            about = (owner.__doc__ or "").strip().split("\n")[0].rstrip(".")
            groups[owner] = parser.add_argument_group(f"{owner.__name__} ({about})")
        _add_flag(groups[owner], f, kind)


def _add_flag(group, f, kind) -> None:
    text = f.metadata.get("help", "")
    shown = f.metadata.get("shown", f.default)
    if kind is bool:
        group.add_argument(flag(f.name), action="store_true", default=argparse.SUPPRESS,
                           help=text)
        return
    choices, many = None, {}
    if typing.get_origin(kind) is list:  # list[X]: the flag takes one or more values, and adds
        kind, many = typing.get_args(kind)[0], {"action": "extend", "nargs": "+"}
    if typing.get_origin(kind) is typing.Literal:
        choices, kind = typing.get_args(kind), str
    elif type(None) in typing.get_args(kind):  # X | None: a value of X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    metavar = f.metadata.get("metavar") or {int: "N", float: "X"}.get(kind, "NAME")
    if shown is not None:
        text += f" (default: {shown})"
    group.add_argument(flag(f.name), type=kind, choices=choices, default=argparse.SUPPRESS,
                       metavar=metavar, help=text.replace("%", "%%"), **many)


def _show(values: dict) -> str:
    return " ".join(f"{flag(k)} {v}" for k, v in values.items())


def parse_config(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None = None,
                 presets: dict[str, dict] | None = None):
    """(config, names of the fields set on the command line, by a flag or a preset)."""
    given = vars(parser.parse_args(argv))
    preset = given.pop("preset", None)
    values = dict(presets[preset]) if preset else {}
    values.update(given)
    return from_flat(cls, values), set(values)


def describe(e: BaseException) -> str:
    """The one-line message for an error: a UserError's field spelled as its flag, an
    OSError's file name added when the message lacks it."""
    if isinstance(e, UserError) and (e.field or e.mentions):
        msg = e.message
        for name in e.mentions:  # other settings the message speaks of, as flags too
            msg = re.sub(rf"\b{re.escape(name)}\b", flag(name), msg)
        msg = f"{flag(e.field)} {msg}" if e.field else msg
    else:
        msg = str(e)
    msg = " ".join(msg.split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg += f": {e.filename}"
    return msg


def run(command: Callable[[], int | None], tune_process: bool = False,
        interrupted: str = "interrupted") -> int:
    """Run a command's body and turn what it raises into the exit-code rule above.
    ValueError (UserError among them), OSError and RuntimeError (a failed worker) are things
    the user can act on; anything else is a bug, and the last-resort handler still turns it
    into one line (a RecursionError or MemoryError from a hostile input, say) with exit 1.

    tune_process: first make the process-wide settings a command that computes wants (the
    one start-up place for them): glibc's malloc thresholds (tensorlite.kernels)."""
    if tune_process:
        import tensorlite

        tensorlite.kernels.tune_allocator()
    try:
        return command() or EXIT_OK
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("GPT_DEBUG"):
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the last resort: one line, never a traceback
        if os.environ.get("GPT_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {describe(e)[:300]} (set GPT_DEBUG=1 "
              "for a traceback)", file=sys.stderr)
        return EXIT_BUG
