"""What every exercise's grading shares: calling the learner's functions (their exceptions
become one readable line pointing into their file), searching for the smallest failing case
with hypothesis, and the gradient checks of tensorlite.testing with the arguments named.

A failed check raises `Failure`, whose message is the whole report: the shrunk inputs, the
expected and the actual numbers. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter

from ..testing import GradcheckError, check_jvp, check_vjp

EXAMPLES = 30  # hypothesis examples per check: enough to find a wrong case, quick to run
TIME_LIMIT = 20.0  # seconds one call of the learner's function may take (an endless loop?)


class Failure(Exception):
    """The learner's code gave a wrong answer (or raised): the message says which and where."""


class Stop(BaseException):
    """A report that no smaller example would improve (a function not written yet, an endless
    loop): a BaseException, so hypothesis ends the search at once instead of shrinking, and
    the learner's own `except Exception` cannot swallow it. The CLI reports it as a Failure."""


class _TimedOut(BaseException):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _TimedOut in the learner's code after `seconds` (where a timer signal exists)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _TimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def show(a, indent: int = 0) -> str:
    """An array (or number) printed compactly; rows after the first indented by `indent`."""
    return np.array2string(np.asarray(a), precision=6, suppress_small=True, max_line_width=96,
                           prefix=" " * indent)


def describe(names: Sequence[str], values: Sequence) -> str:
    """'  x (shape (2, 1)) = [[...]]' lines, one per argument (arrays); other values as repr."""
    lines = []
    for name, value in zip(names, values):
        if isinstance(value, np.ndarray):
            prefix = f"  {name} (shape {value.shape}) = "
            text = np.array2string(value, precision=6, suppress_small=True, max_line_width=96,
                                   prefix=prefix)
            lines.append(prefix + text)
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
        with _time_limit(TIME_LIMIT):
            out = fn(*copies)
    except _TimedOut as e:
        raise Stop(f"{name} did not return within {TIME_LIMIT:g} s (an endless loop?); it was "
                   f"at {learner_line(e, module)}\n  with\n{describe(names, args)}") from None
    except NotImplementedError as e:
        raise Stop(f"{name} is not written yet ({learner_line(e, module)})") from None
    except (Failure, Stop):  # a grader's guard inside their call (tl.hvp refused, say)
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the learner's bug: their line
        raise Failure(f"{name} raised {type(e).__name__}: {e}\n  at {learner_line(e, module)}\n"
                      f"  with\n{describe(names, args)}") from None
    if outputs == 0:
        return out
    results = out if outputs > 1 else (out,)
    if out is None or (outputs > 1 and isinstance(out, (tuple, list))
                       and any(r is None for r in out)):
        raise Failure(f"{name} returned None (a missing return?)\n  with\n{describe(names, args)}")
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
                      f"  expected = {show(expected, 13)}\n  got = {show(got, 8)}")


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
        with with_reporter(lambda text: None):  # the report is ours to write
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
    if text.startswith("check_vjp: f_vjp's gradient for "):  # a wrong shape
        text = "wrong shape: your gradient for " + text.removeprefix(
            "check_vjp: f_vjp's gradient for ").replace(", the argument ", ", the input ", 1)
    elif text.startswith("check_vjp: "):
        text = "wrong gradient: for " + text.removeprefix("check_vjp: ")
    elif text.startswith("check_jvp: "):
        text = "wrong JVP: along a tangent of " + text.removeprefix("check_jvp: ")
    for i, name in reversed(list(enumerate(names))):
        text = text.replace(f"argument {i}", name)
    text = re.sub(r"np\.\w+\((-?\d+)\)", r"\1", text)  # (np.int64(0),) -> (0,)
    text = text.replace("\n  tangents = ", "\n  the tangents = ")
    return Failure(re.sub(r"\n (?=\[)", "\n" + " " * 8, text))  # an array's next rows, indented
