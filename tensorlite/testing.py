"""Tools to verify an op's gradient the way tensorlite verifies its own: hypothesis
strategies for float arrays, Tensors and broadcastable shape pairs;
`assert_gradients_match`, a float64 finite-difference check on a random cotangent;
`check_grads`, the same for second derivatives and forward mode; and `check_vjp` /
`check_jvp`, which verify the hand-written gradient of a plain NumPy function (no
tensorlite needed) by letting hypothesis search shapes and values for a counterexample.
Every check here takes its finite differences with one loop (`central_differences`) and
judges them with one tolerance rule (`_excess`); `tl.gradcheck` is the first of them.

    from hypothesis import given
    from tensorlite.testing import tensors, assert_gradients_match

    @given(tensors(shape=(3, 4)))
    def test_my_op(x):
        assert_gradients_match(my_op, x)

See docs/verifying-gradients.md and docs/higher-order.md for worked examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .autograd import no_grad
from .higher_order import grad, jvp
from .tensor import Tensor, concatenate

# hypothesis is imported inside the functions that use it: `import tensorlite` loads this
# module (for tl.gradcheck), and hypothesis takes about a second to import.

__all__ = [
    "GradcheckError",
    "arrays",
    "assert_gradients_match",
    "broadcastable_shapes",
    "check_grads",
    "check_jvp",
    "check_vjp",
    "gradcheck",
    "shapes",
    "tensors",
]


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with finite differences (names where and by how much)."""


# ---- the one finite-difference loop and the one tolerance rule --------------------------------
def central_difference(value_at: Callable, eps: float):
    """(value_at(eps) - value_at(-eps)) / (2 eps), where value_at(s) is f at x + s v: the
    derivative of f along v. The one finite-difference formula of every check here."""
    return (value_at(eps) - value_at(-eps)) / (2 * eps)


def central_differences(value: Callable[[], float], x: np.ndarray, eps: float) -> np.ndarray:
    """d value() / dx for every element of x, each by `central_difference` along that
    element's axis, nudging x in place (restored before the next element)."""
    numeric = np.empty(x.shape)
    for where in np.ndindex(x.shape):
        orig = x[where]

        def value_at(step, where=where, orig=orig):
            x[where] = orig + step
            return value()

        numeric[where] = central_difference(value_at, eps)
        x[where] = orig
    return numeric


def _excess(got, expected, atol: float, rtol: float) -> np.ndarray:
    """How far each element of `got` lies past the tolerance around `expected`: positive
    where |got - expected| > atol + rtol * |expected|, and inf where either side is NaN."""
    bad = np.abs(np.asarray(got, dtype=np.float64) - expected) - (atol + rtol * np.abs(expected))
    return np.where(np.isnan(bad), np.inf, bad)


def _first_mismatch(got, expected, atol: float, rtol: float):
    """The first element (in index order) past the tolerance, or None."""
    bad = np.argwhere(_excess(got, expected, atol, rtol) > 0)
    return None if len(bad) == 0 else tuple(int(i) for i in bad[0])


def _worst_mismatch(got: np.ndarray, expected: np.ndarray, atol: float, rtol: float):
    """The index of the element furthest past the tolerance, or None when all are within it."""
    bad = _excess(got, expected, atol, rtol)
    if not np.any(bad > 0):
        return None
    return np.unravel_index(np.argmax(bad), bad.shape) if bad.ndim else ()


def _close(got, expected, atol: float, rtol: float) -> bool:
    return _worst_mismatch(np.asarray(got), expected, atol, rtol) is None


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
) -> bool:
    """Check d(fn)/d(input) for every input that requires grad. True, or GradcheckError.

    The analytic gradient (backward) is compared with central finite differences, element
    by element, projected on a random cotangent u:

        d<u, f(x)>/dx_i  ~  (<u, f(x + eps e_i)> - <u, f(x - eps e_i)>) / (2 eps)

    A random u (not a `.sum()`) catches bugs that are symmetric across output elements.
    `fn(*inputs)` must return a Tensor. Each input that should be checked must have
    requires_grad=True (float64 recommended: the check runs in the inputs' dtype, and
    float32 differences are too noisy to tell a bug from rounding). The inputs' `.grad` is
    reset to None before and after the check.
    """
    inputs = list(inputs)
    for t in inputs:
        if not isinstance(t, Tensor):
            raise TypeError(f"gradcheck: inputs must be Tensors, got {type(t).__name__}")
    checked = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, nothing to check")
    for t in inputs:
        t.grad = None
    out = _output_of(fn(*inputs), "gradcheck")
    u = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    if not out.requires_grad:
        raise GradcheckError("gradcheck: the output does not depend on any input that requires grad")
    out.backward(u)
    analytic = {i: (inputs[i].grad if inputs[i].grad is not None else np.zeros_like(inputs[i].data))
                for i in checked}
    for t in inputs:
        t.grad = None

    def projected() -> float:  # <u, fn(inputs)>
        with no_grad():
            return float(np.sum(u * _output_of(fn(*inputs), "gradcheck").data, dtype=np.float64))

    for i in checked:
        x = inputs[i].data  # nudged in place by central_differences, then restored
        numeric = central_differences(projected, x, eps)
        where = _first_mismatch(analytic[i], numeric, atol, rtol)
        if where is not None:
            a, n = float(analytic[i][where]), float(numeric[where])
            raise GradcheckError(
                f"gradcheck: input {i} (shape {x.shape}), element {where}: "
                f"analytic {a:.8g} vs numeric {n:.8g} "
                f"(|diff| {abs(a - n):.3g} > atol {atol} + rtol {rtol} * |numeric|)"
            )
    return True


def _output_of(out, who: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{who}: fn must return a Tensor, got {type(out).__name__}")
    return out


# ---- strategies --------------------------------------------------------------------------------
def shapes(min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 4):
    """Array shapes, e.g. (), (3,), (1, 4, 2)."""
    from hypothesis.extra import numpy as hnp

    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def arrays(
    dtype=np.float64,
    shape=None,
    min_value: float = -2.0,
    max_value: float = 2.0,
    away_from: float | None = None,
    margin: float = 1e-2,
):
    """Float arrays of `dtype` with finite values in [min_value, max_value].

    `shape` is a tuple or a strategy of tuples (default: `shapes()`). `away_from=0` keeps
    values at least `margin` away from a kink (relu at 0, say), so finite differences are
    taken on one side of it.
    """
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    shape = shapes() if shape is None else shape
    elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=64)
    if away_from is not None:
        elements = elements.filter(lambda v: abs(v - away_from) >= margin)
    return hnp.arrays(dtype=dtype, shape=shape, elements=elements)


def tensors(dtype=np.float64, shape=None, requires_grad: bool = True, **kwargs):
    """Tensors wrapping `arrays(dtype, shape, **kwargs)`."""
    return arrays(dtype, shape, **kwargs).map(lambda a: Tensor(a, requires_grad=requires_grad))


def broadcastable_shapes(num_shapes: int = 2, min_dims: int = 0, max_dims: int = 3, max_side: int = 4):
    """Tuples of `num_shapes` shapes that broadcast together (size-1 axes included)."""
    from hypothesis.extra import numpy as hnp

    return hnp.mutually_broadcastable_shapes(
        num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims, max_side=max_side
    ).map(lambda r: r.input_shapes)


def assert_gradients_match(
    fn: Callable[..., Tensor],
    *inputs,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    seed: int = 0,
) -> None:
    """Raise GradcheckError unless fn's gradients match central finite differences.

    `inputs` are Tensors or arrays (arrays become float64 Tensors with requires_grad=True).
    The check runs in float64, element by element, projected on a random cotangent.
    """
    ts = _float64_copies(inputs)
    before = [t.data.copy() for t in ts]
    gradcheck(fn, ts, eps=eps, atol=atol, rtol=rtol, seed=seed)
    _check_unchanged(ts, before)


def _float64_copies(inputs) -> list:
    """Private float64 copies of the inputs (the checks nudge them); arrays become Tensors
    with requires_grad=True, Tensors keep theirs (False: held constant, not checked)."""
    ts = []
    for x in inputs:
        if isinstance(x, Tensor):
            ts.append(Tensor(np.array(x.data, dtype=np.float64), requires_grad=x.requires_grad))
        else:
            ts.append(Tensor(np.array(x, dtype=np.float64), requires_grad=True))
    return ts


def _check_unchanged(ts: list, before: list) -> None:
    for i, (t, b) in enumerate(zip(ts, before)):
        if not np.array_equal(t.data, b):
            raise GradcheckError(f"input {i} was modified in place by fn")


# ---- second order and forward mode, on tensorlite functions ------------------------------------
def check_grads(
    fn: Callable[..., Tensor],
    *inputs,
    order: int = 2,
    modes: Sequence[str] = ("rev", "fwd"),
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    seed: int = 0,
) -> None:
    """Raise GradcheckError unless fn's derivatives match central finite differences, up to
    `order`, in reverse mode ("rev": tensorlite.grad) and forward mode ("fwd": tensorlite.jvp).

    For each input that requires grad, along a random direction v (float64, seeded):
      rev, order 1: <grad of <u, fn>, v>  vs  the central difference of <u, fn> along v
      fwd, order 1: jvp(fn, v), every element  vs  the central difference of fn along v
    and for order 2 the same two checks run on the gradient function
    x -> grad(<u, fn(x)>, x, create_graph=True): reverse over reverse (second derivatives)
    and forward over reverse (the JVPs of every op in the backward graph). Order 3 checks
    the gradient of that, and so on. Inputs as in `assert_gradients_match`.
    """
    unknown = set(modes) - {"rev", "fwd"}
    if unknown or not modes:
        raise ValueError(f"check_grads: modes must be some of ('rev', 'fwd'), got {modes}")
    ts = _float64_copies(inputs)
    if not any(t.requires_grad for t in ts):
        raise ValueError("check_grads: no input has requires_grad=True, nothing to check")
    before = [t.data.copy() for t in ts]
    rng = np.random.default_rng(seed)
    for level in range(1, order + 1):
        _check_one_order(fn, ts, level, modes, eps, atol, rtol, rng)
        fn = _gradient_function(fn, ts, rng)
    _check_unchanged(ts, before)


def _gradient_function(fn, ts: list, rng) -> Callable[..., Tensor]:
    """x -> the gradient of <u, fn(x)> w.r.t. the inputs that require grad, flattened into one
    Tensor, with the graph kept (create_graph=True) so it can be differentiated again."""
    u = rng.standard_normal(_as_tensor_output(fn(*ts)).shape)

    def gradient(*xs, create_graph=True):
        out = _as_tensor_output(fn(*xs))
        gs = grad(out, [x for x in xs if x.requires_grad], grad_outputs=u, create_graph=create_graph)
        return concatenate([g.reshape(-1) for g in gs])

    # Its values must be the plain backward's; the derivatives are checked by the next order.
    recorded, plain = gradient(*ts).data, gradient(*ts, create_graph=False).data
    if not _close(recorded, plain, 1e-12, 1e-9):
        e = int(np.argmax(np.abs(recorded - plain)))
        raise GradcheckError(
            f"check_grads: the gradient with create_graph=True (backward_graph) differs from "
            f"the plain backward: flattened element {e}: {recorded[e]:.8g} vs {plain[e]:.8g}"
        )
    return gradient


def _as_tensor_output(out) -> Tensor:
    return _output_of(out, "check_grads")


def _moved(fn, ts: list, i: int, step: np.ndarray) -> np.ndarray:
    """fn's value with input i moved by `step`."""
    moved = [Tensor(t.data + step, requires_grad=True) if j == i else t for j, t in enumerate(ts)]
    return _as_tensor_output(fn(*moved)).data


def _check_one_order(fn, ts, level, modes, eps, atol, rtol, rng) -> None:
    what = "fn" if level == 1 else f"derivative {level - 1} of fn (its gradient, differentiated)"
    out = _as_tensor_output(fn(*ts))
    u = rng.standard_normal(out.shape)
    for i, x in enumerate(ts):
        if not x.requires_grad:
            continue
        v = rng.standard_normal(x.shape)
        numeric = central_difference(lambda s, i=i, v=v: _moved(fn, ts, i, s * v), eps)  # along v
        where = f"order {level} ({what}), input {i} (shape {x.shape}), along a random direction"
        if "rev" in modes:
            (g,) = grad(_as_tensor_output(fn(*ts)), [x], grad_outputs=u)
            got, expected = float(np.sum(g.data * v)), float(np.sum(u * numeric))
            if not _close(got, expected, atol, rtol):
                raise GradcheckError(
                    f"check_grads: reverse mode, {where}: grad gives {got:.8g}, finite "
                    f"differences {expected:.8g} (|diff| {abs(got - expected):.3g})"
                )
        if "fwd" in modes:
            tangents = [v if j == i else np.zeros(t.shape) for j, t in enumerate(ts)]
            _, tangent = jvp(fn, ts, tangents)
            got = np.broadcast_to(tangent.data, numeric.shape)
            e = _worst_mismatch(got, numeric, atol, rtol)
            if e is not None:
                raise GradcheckError(
                    f"check_grads: forward mode, {where}: output element {e}: jvp gives "
                    f"{got[e]:.8g}, finite differences {numeric[e]:.8g}"
                )


# ---- hand-written gradients of plain NumPy functions, searched by hypothesis -----------------
def check_vjp(
    f: Callable[..., np.ndarray],
    f_vjp: Callable[..., tuple],
    shapes: Sequence,
    *,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    **search,
) -> None:
    """Verify a hand-written backward of a plain NumPy function; no tensorlite needed.

    f(*xs) -> array.  f_vjp(dout, *xs) -> the gradient of <dout, f(*xs)> with respect to
    each x (a tuple, one per input; a bare array for one input).  `shapes` gives one shape
    per input, as ints and names: `[("N", "C"), ("C", "K")]` lets hypothesis choose N, C, K
    (1 to max_side), the same size wherever a name repeats; or pass a strategy of tuples of
    shapes. hypothesis searches sizes, inputs and `dout` (float64) for an element where f_vjp
    disagrees with central differences, shrinks it to a minimal case and raises
    GradcheckError naming the argument, the element, the expected and the got value, with
    the failing inputs. Call it from a plain test, not from inside @given.

    `search` options: max_examples (default: the hypothesis profile's), max_side (4),
    min_value and max_value of the inputs (-2.0, 2.0).
    """

    def check(xs, draw):
        out = np.asarray(f(*xs), dtype=np.float64)
        dout = draw(arrays(shape=out.shape), label="dout")
        got = f_vjp(dout, *xs)
        got = (got,) if len(xs) == 1 and not isinstance(got, (tuple, list)) else tuple(got)
        if len(got) != len(xs):
            raise GradcheckError(f"check_vjp: f_vjp returned {len(got)} gradients for {len(xs)} inputs")
        for i, (x, g) in enumerate(zip(xs, got)):
            g = np.asarray(g, dtype=np.float64)
            if g.shape != x.shape:
                raise GradcheckError(
                    f"check_vjp: f_vjp's gradient for argument {i} has shape {g.shape}, "
                    f"the argument {x.shape}" + _case(xs, dout))
            numeric = central_differences(  # d<dout, f(xs)>/dx, x nudged in place
                lambda: float(np.sum(dout * np.asarray(f(*xs), dtype=np.float64))), x, eps)
            where = _first_mismatch(g, numeric, atol, rtol)
            if where is not None:
                raise GradcheckError(
                    f"check_vjp: argument {i} (shape {x.shape}), element {where}: expected "
                    f"{numeric[where]:.8g} (finite differences), got {g[where]:.8g}"
                    + _case(xs, dout))

    _search(check, shapes, **search)


def check_jvp(
    f: Callable[..., np.ndarray],
    f_jvp: Callable[..., np.ndarray],
    shapes: Sequence,
    *,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-4,
    **search,
) -> None:
    """Verify a hand-written forward-mode derivative of a plain NumPy function.

    f(*xs) -> array.  f_jvp(tangents, *xs) -> d f for the input tangents (a tuple, one per
    input, shaped like it). Each argument is checked alone (the other tangents zero), so a
    failure names the argument and the output element. Shapes and `search` options as in
    `check_vjp`.
    """

    def check(xs, draw):
        tangents = [draw(arrays(shape=x.shape), label=f"tangent {i}") for i, x in enumerate(xs)]
        for i, x in enumerate(xs):
            only = tuple(t if j == i else np.zeros_like(t) for j, t in enumerate(tangents))
            expected = central_difference(lambda s, i=i, d=only[i]: _call(f, xs, i, s * d), eps)
            got = np.broadcast_to(np.asarray(f_jvp(only, *xs), dtype=np.float64), expected.shape)
            e = _worst_mismatch(got, expected, atol, rtol)
            if e is not None:
                raise GradcheckError(
                    f"check_jvp: argument {i} (shape {x.shape}), output element {e}: expected "
                    f"{expected[e]:.8g} (finite differences), got {got[e]:.8g}"
                    + _case(xs, tangents, "tangents"))

    _search(check, shapes, **search)


def _call(f, xs, i: int, step) -> np.ndarray:
    """f with argument i moved by `step`, as float64."""
    return np.asarray(f(*(x + step if j == i else x for j, x in enumerate(xs))), dtype=np.float64)


def _case(xs, extra, name: str = "dout") -> str:
    shown = [f"  argument {i} = {np.array2string(x, precision=6)}" for i, x in enumerate(xs)]
    return "\n" + "\n".join(shown) + f"\n  {name} = {np.array2string(np.asarray(extra), precision=6)}"


def _shape_strategy(shapes, max_side: int):
    """Tuples of concrete shapes: names in `shapes` become sizes hypothesis chooses."""
    from hypothesis import strategies as st

    if isinstance(shapes, st.SearchStrategy):
        return shapes
    names = sorted({d for s in shapes for d in s if isinstance(d, str)})
    sizes = st.fixed_dictionaries({n: st.integers(1, max_side) for n in names})
    return sizes.map(
        lambda size: tuple(tuple(size[d] if isinstance(d, str) else d for d in s) for s in shapes)
    )


def _search(check, shapes, max_examples: int | None = None, max_side: int = 4,
            min_value: float = -2.0, max_value: float = 2.0) -> None:
    """Run check(inputs, draw) on inputs hypothesis draws, until it fails or the examples run out."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    extra = {} if max_examples is None else {"max_examples": max_examples}

    @settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), **extra)
    @given(st.data())
    def search(data):
        drawn = data.draw(_shape_strategy(shapes, max_side), label="shapes")
        xs = [data.draw(arrays(shape=s, min_value=min_value, max_value=max_value),
                        label=f"argument {i}") for i, s in enumerate(drawn)]
        check(xs, data.draw)

    search()
