"""What every exercise's grading shares: calling the learner's functions (their exceptions
become one readable line pointing into their file), searching for the smallest failing case
with hypothesis, and the gradient checks of tensorlite.testing with the arguments named.

A failed check raises `Failure`, whose message is the whole report: the shrunk inputs, the
expected and the actual numbers. Nothing here prints.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..testing import GradcheckError, check_jvp, check_vjp

EXAMPLES = 30  # hypothesis examples per check: enough to find a wrong case, quick to run


class Failure(Exception):
    """The learner's code gave a wrong answer (or raised): the message says which and where."""


def show(a) -> str:
    """An array (or number) printed compactly, on as few lines as NumPy allows."""
    return np.array2string(np.asarray(a), precision=6, suppress_small=True, max_line_width=96)


def describe(names: Sequence[str], values: Sequence) -> str:
    """'  x (shape (2, 1)) = [[...]]' lines, one per argument (arrays); other values as repr."""
    lines = []
    for name, value in zip(names, values):
        if isinstance(value, np.ndarray):
            lines.append(f"  {name} (shape {value.shape}) = {show(value)}")
        else:
            lines.append(f"  {name} = {value!r}")
    return "\n".join(lines)


def learner_line(error: BaseException, module: ModuleType) -> str:
    """Where in the learner's file `error` was raised: 'NAME.py, line 12, in f: <code>'."""
    path = str(Path(module.__file__).resolve())
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if str(Path(f.filename).resolve()) == path]
    if not frames:
        return f"{Path(path).name}"
    f = frames[-1]
    return f"{Path(path).name}, line {f.lineno}, in {f.name}: {(f.line or '').strip()}"


def call(module: ModuleType, name: str, args: Sequence, names: Sequence[str], outputs: int = 1):
    """module.name(*args) on copies of the arrays (so an in-place change cannot spoil the
    check), its result checked to be `outputs` arrays of floats. An exception in the learner's
    code, or a result of the wrong kind, raises Failure naming the inputs."""
    fn = getattr(module, name, None)
    if not callable(fn):
        raise Failure(f"{Path(module.__file__).name} has no function {name}")
    copies = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]
    try:
        out = fn(*copies)
    except NotImplementedError as e:
        raise Failure(f"{name} is not written yet ({learner_line(e, module)})") from None
    except Exception as e:  # noqa: BLE001 - the learner's bug: shown as their line, not ours
        raise Failure(f"{name} raised {type(e).__name__}: {e}\n  at {learner_line(e, module)}\n"
                      f"  with\n{describe(names, args)}") from None
    if outputs == 0:
        return out
    results = out if outputs > 1 else (out,)
    if outputs > 1 and (not isinstance(out, (tuple, list)) or len(out) != outputs):
        raise Failure(f"{name} must return {outputs} arrays (a tuple), got {type(out).__name__}"
                      f"\n  with\n{describe(names, args)}")
    try:
        results = tuple(np.asarray(r, dtype=np.float64) for r in results)
    except (TypeError, ValueError):
        raise Failure(f"{name} must return arrays of numbers, got "
                      f"{', '.join(type(r).__name__ for r in results)}\n  with\n"
                      f"{describe(names, args)}") from None
    return results if outputs > 1 else results[0]


def compare(what: str, expected, got, names: Sequence[str], args: Sequence,
            atol: float = 1e-9, rtol: float = 1e-7) -> None:
    """Raise Failure unless got matches expected (shape and values), naming the worst element."""
    expected, got = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
    case = f"\n  with\n{describe(names, args)}"
    if got.shape != expected.shape:
        raise Failure(f"{what} has shape {got.shape}, expected {expected.shape}{case}")
    bad = np.abs(got - expected) - (atol + rtol * np.abs(expected))
    bad = np.where(np.isnan(bad), np.inf, bad)
    if np.any(bad > 0):
        e = tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))
        raise Failure(f"{what}, element {e}: expected {expected[e]:.8g}, got {got[e]:.8g}{case}\n"
                      f"  expected {what} = {show(expected)}\n  got = {show(got)}")


def search(check: Callable, examples: int = EXAMPLES) -> None:
    """Run check(draw) on what hypothesis draws until it raises Failure; the smallest failing
    case is re-raised (hypothesis shrinks it first)."""

    @settings(max_examples=examples, deadline=None, database=None, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        check(data.draw)

    _plain(run)


def vjp(f: Callable, f_vjp: Callable, shapes, names: Sequence[str],
        examples: int = EXAMPLES, **options) -> None:
    """tensorlite.testing.check_vjp, its report in the learner's names for the arguments."""
    _plain(lambda: check_vjp(f, f_vjp, shapes, max_examples=examples, **options), names)


def jvp(f: Callable, f_jvp: Callable, shapes, names: Sequence[str],
        examples: int = EXAMPLES, **options) -> None:
    """tensorlite.testing.check_jvp, its report in the learner's names for the arguments."""
    _plain(lambda: check_jvp(f, f_jvp, shapes, max_examples=examples, **options), names)


def _plain(run: Callable, names: Sequence[str] = ()) -> None:
    """Run a hypothesis search; its failure becomes one Failure (the first if several)."""
    try:
        run()
    except (Failure, GradcheckError) as e:
        raise _as_failure(e, names) from None
    except Exception as e:
        if not hasattr(e, "exceptions"):  # not an ExceptionGroup (several distinct failures)
            raise
        raise _as_failure(e, names) from None


def _as_failure(e: BaseException, names: Sequence[str]) -> BaseException:
    if getattr(e, "exceptions", None):  # an ExceptionGroup: report its first failure
        return _as_failure(e.exceptions[0], names)
    if isinstance(e, Failure):
        return Failure(str(e))
    if not isinstance(e, GradcheckError):
        return e
    text = str(e)
    if text.startswith("check_vjp: "):
        text = "wrong gradient: for " + text.removeprefix("check_vjp: ")
    elif text.startswith("check_jvp: "):
        text = "wrong JVP: along a tangent of " + text.removeprefix("check_jvp: ")
    for i, name in reversed(list(enumerate(names))):
        text = text.replace(f"argument {i}", name)
    return Failure(text)
