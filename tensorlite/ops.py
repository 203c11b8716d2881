"""The primitive ops. Each is one small class: the first docstring line is the math
(forward, then each input's gradient), `forward` takes and returns plain ndarrays and
saves what `backward` needs, `backward(dout)` returns one gradient per input.
Binary ops reduce broadcast gradients with the shared `unbroadcast`.

Below backward, two more rules (docs/higher-order.md): `backward_graph(dout)`, the same
gradient written with Tensor ops on `self.parents` so it can be differentiated again, and
`jvp(*tangents)`, the forward-mode derivative: d(out) for the inputs' tangents d(x), d(y).
"""

from __future__ import annotations

import itertools

import numpy as np

from . import kernels
from .autograd import Function, unbroadcast


def _shape_error(op: str, *shapes) -> ValueError:
    return ValueError(f"{op}: shapes {' and '.join(str(s) for s in shapes)} do not broadcast")


def _broadcast_check(op: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.shape == y.shape:  # the common case (np.broadcast_shapes is Python, ~3 us a call)
        return
    try:
        np.broadcast_shapes(x.shape, y.shape)
    except ValueError:
        raise _shape_error(op, x.shape, y.shape) from None


# ---- arithmetic ------------------------------------------------------------------------------
class Add(Function):
    """out = x + y.  dx = dout,  dy = dout  (each summed back to its own shape)"""

    def forward(self, x, y):
        _broadcast_check("add", x, y)
        self.x_shape, self.y_shape = x.shape, y.shape
        return x + y

    def backward(self, dout):
        return unbroadcast(dout, self.x_shape), unbroadcast(dout, self.y_shape)

    backward_graph = backward  # unbroadcast works on Tensors too

    def jvp(self, dx, dy):
        return dx + dy


class Sub(Function):
    """out = x - y.  dx = dout,  dy = -dout"""

    def forward(self, x, y):
        _broadcast_check("sub", x, y)
        self.x_shape, self.y_shape = x.shape, y.shape
        return x - y

    def backward(self, dout):
        return unbroadcast(dout, self.x_shape), unbroadcast(-dout, self.y_shape)

    backward_graph = backward

    def jvp(self, dx, dy):
        return dx - dy


class Mul(Function):
    """out = x * y.  dx = dout * y,  dy = dout * x"""

    def forward(self, x, y):
        _broadcast_check("mul", x, y)
        self.x, self.y = x, y
        return x * y

    def backward(self, dout):
        x, y = self.x, self.y
        dx = unbroadcast(dout * y, x.shape) if self.needs(0) else None
        dy = unbroadcast(dout * x, y.shape) if self.needs(1) else None
        return dx, dy

    def backward_graph(self, dout):
        x, y = self.parents
        return unbroadcast(dout * y, x.shape), unbroadcast(dout * x, y.shape)

    def jvp(self, dx, dy):
        return dx * self.y + self.x * dy


class Div(Function):
    """out = x / y.  dx = dout / y,  dy = -dout * x / y**2"""

    def forward(self, x, y):
        _broadcast_check("div", x, y)
        self.x, self.y = x, y
        return x / y

    def backward(self, dout):
        x, y = self.x, self.y
        dx = dout / y
        dy = unbroadcast(-dx * x / y, y.shape) if self.needs(1) else None
        return unbroadcast(dx, x.shape), dy

    def backward_graph(self, dout):
        x, y = self.parents
        dx = dout / y
        return unbroadcast(dx, x.shape), unbroadcast(-dx * x / y, y.shape)

    def jvp(self, dx, dy):
        return (dx - self.x / self.y * dy) / self.y


class Neg(Function):
    """out = -x.  dx = -dout"""

    def forward(self, x):
        return -x

    def backward(self, dout):
        return -dout

    backward_graph = backward

    def jvp(self, dx):
        return -dx


class Pow(Function):
    """out = x ** p (p a number).  dx = dout * p * x**(p-1)"""

    def forward(self, x, exponent: float):
        self.x, self.p = x, exponent
        if exponent == 2:
            return x * x
        return x ** x.dtype.type(exponent)

    def backward(self, dout):
        x, p = self.x, self.p
        if p == 0:  # x**0 is constant; p * x**-1 would give 0 * inf = nan at x = 0
            return np.zeros_like(dout)
        if p == 2:
            return dout * (x + x)
        return dout * (x.dtype.type(p) * x ** x.dtype.type(p - 1))

    def backward_graph(self, dout):
        (x,), p = self.parents, self.p
        return dout * 0.0 if p == 0 else dout * (x ** (p - 1) * p)

    def jvp(self, dx):
        return self.backward(dx)  # elementwise: the JVP is the same product


class MatMul(Function):
    """out = x @ y (np.matmul: 2-D, batched, broadcast batch dims).
    dx = dout @ y^T,  dy = x^T @ dout  (batch dims summed back to each input's shape)"""

    product = staticmethod(np.matmul)  # the one product every formula below uses (bf16: precision.py)

    def forward(self, x, y):
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError(f"matmul: scalars are not allowed (shapes {x.shape} and {y.shape})")
        if x.shape[-1] != y.shape[-2 if y.ndim > 1 else 0]:
            raise ValueError(
                f"matmul: shapes {x.shape} and {y.shape} do not match "
                f"({x.shape[-1]} != {y.shape[-2 if y.ndim > 1 else 0]})"
            )
        self.x, self.y = x, y
        try:
            return self.product(x, y)
        except ValueError:  # NumPy's message says "remapped shapes"; name the user's shapes
            raise ValueError(
                f"matmul: shapes {x.shape} and {y.shape} do not match "
                f"(batch dims {x.shape[:-2]} and {y.shape[:-2]} do not broadcast)"
            ) from None

    def backward(self, dout):
        x, y = self.x, self.y
        # 1-D operands are treated as a row (x) or a column (y), as np.matmul does.
        x2 = x[None, :] if x.ndim == 1 else x
        y2 = y[:, None] if y.ndim == 1 else y
        if y.ndim == 1:
            dout = dout[..., None]
        if x.ndim == 1:
            dout = np.expand_dims(dout, -2)
        dx = dy = None
        if self.needs(0):
            dx = unbroadcast(self.product(dout, y2.swapaxes(-1, -2)), x2.shape).reshape(x.shape)
        if self.needs(1):
            if y2.ndim == 2 and x2.ndim > 2:
                # A weight shared across the batch: fold the batch into rows, one big GEMM.
                k, n = x2.shape[-1], dout.shape[-1]
                dy = self.product(x2.reshape(-1, k).T, dout.reshape(-1, n))  # (k, n)
            else:
                dy = unbroadcast(self.product(x2.swapaxes(-1, -2), dout), y2.shape)
            dy = dy.reshape(y.shape)
        return dx, dy

    def backward_graph(self, dout):
        x, y = self.parents
        x2 = x.reshape(1, -1) if x.ndim == 1 else x  # (1, k) row
        y2 = y.reshape(-1, 1) if y.ndim == 1 else y  # (k, 1) column
        if y.ndim == 1:
            dout = dout.reshape(dout.shape + (1,))
        if x.ndim == 1:
            dout = dout.reshape(dout.shape[:-1] + (1,) + dout.shape[-1:])
        op = type(self)  # the gradient's products are this same op (MatMul, or MatMulBF16)
        dx = unbroadcast(op.apply(dout, y2.swapaxes(-1, -2)), x2.shape).reshape(x.shape)
        dy = unbroadcast(op.apply(x2.swapaxes(-1, -2), dout), y2.shape).reshape(y.shape)
        return dx, dy

    def jvp(self, dx, dy):
        return self.product(dx, self.y) + self.product(self.x, dy)


# ---- elementwise functions ------------------------------------------------------------------
class Exp(Function):
    """out = exp(x).  dx = dout * out"""

    def forward(self, x):
        self.out = kernels.exp(x)
        return self.out

    def backward(self, dout):
        return dout * self.out

    def backward_graph(self, dout):
        return dout * self.parents[0].exp()

    jvp = backward  # elementwise: d(out) = dx * out as well


class Log(Function):
    """out = log(x).  dx = dout / x"""

    def forward(self, x):
        self.x = x
        return np.log(x)

    def backward(self, dout):
        return dout / self.x

    def backward_graph(self, dout):
        return dout / self.parents[0]

    jvp = backward


class Sqrt(Function):
    """out = sqrt(x).  dx = dout / (2 * out)"""

    def forward(self, x):
        self.out = np.sqrt(x)
        return self.out

    def backward(self, dout):
        return dout / (self.out + self.out)

    def backward_graph(self, dout):
        return dout / (self.parents[0].sqrt() * 2.0)

    jvp = backward


class Tanh(Function):
    """out = tanh(x).  dx = dout * (1 - out**2)"""

    def forward(self, x):
        self.out = kernels.tanh(x)
        return self.out

    def backward(self, dout):
        return kernels.tanh_backward(dout, self.out)

    def backward_graph(self, dout):
        out = self.parents[0].tanh()
        return dout * (1.0 - out * out)

    def jvp(self, dx):
        return dx * (1 - self.out * self.out)


class Sigmoid(Function):
    """out = 1 / (1 + exp(-x)).  dx = dout * out * (1 - out)"""

    def forward(self, x):
        self.out = kernels.sigmoid(x)
        return self.out

    def backward(self, dout):
        return kernels.sigmoid_backward(dout, self.out)

    def backward_graph(self, dout):
        out = self.parents[0].sigmoid()
        return dout * out * (1.0 - out)

    def jvp(self, dx):
        return dx * self.out * (1 - self.out)


class Relu(Function):
    """out = max(x, 0).  dx = dout where x > 0, else 0"""

    def forward(self, x):
        self.x = x
        return np.maximum(x, 0)

    def backward(self, dout):
        return dout * (self.x > 0)

    def backward_graph(self, dout):
        return dout * (self.parents[0].data > 0)  # the mask is a constant: relu'' = 0

    jvp = backward


# ---- reductions ------------------------------------------------------------------------------
def _normalize_axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dims")
        if ndim:  # axis 0 of a 0-d tensor reduces nothing
            out.append(a % ndim)
    return tuple(sorted(set(out)))


def _expand_to(dout: np.ndarray, axes: tuple, keepdims: bool, shape: tuple) -> np.ndarray:
    """Undo a reduction's shape change: put the reduced axes back, then broadcast (a view)."""
    if not keepdims and shape:
        dout = np.expand_dims(dout, axes)
    return np.broadcast_to(dout, shape)


def _expand_graph(dout, axes: tuple, keepdims: bool, shape: tuple):
    """`_expand_to` with Tensor ops (Reshape, then BroadcastTo), for backward_graph."""
    if not keepdims and shape:
        dout = dout.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return dout.broadcast_to(shape)


class Sum(Function):
    """out = sum of x over axes.  dx = dout copied back along the summed axes"""

    def forward(self, x, axis=None, keepdims=False):
        self.axes = _normalize_axes(axis, x.ndim)
        self.keepdims, self.x_shape = keepdims, x.shape
        return np.sum(x, axis=self.axes, keepdims=keepdims)

    def backward(self, dout):
        return _expand_to(dout, self.axes, self.keepdims, self.x_shape)

    def backward_graph(self, dout):
        return _expand_graph(dout, self.axes, self.keepdims, self.x_shape)

    def jvp(self, dx):
        return np.sum(dx, axis=self.axes, keepdims=self.keepdims)


class Mean(Function):
    """out = mean of x over axes (n elements each).  dx = dout / n along the averaged axes"""

    def forward(self, x, axis=None, keepdims=False):
        self.axes = _normalize_axes(axis, x.ndim)
        self.keepdims, self.x_shape = keepdims, x.shape
        self.n = int(np.prod([x.shape[a] for a in self.axes])) if x.ndim else 1
        return np.mean(x, axis=self.axes, keepdims=keepdims)

    def backward(self, dout):
        return _expand_to(dout / dout.dtype.type(self.n), self.axes, self.keepdims, self.x_shape)

    def backward_graph(self, dout):
        return _expand_graph(dout / self.n, self.axes, self.keepdims, self.x_shape)

    def jvp(self, dx):
        return np.mean(dx, axis=self.axes, keepdims=self.keepdims)


class Max(Function):
    """out = max of x over axes.  dx = dout at the maxima (split evenly among ties), else 0"""

    def forward(self, x, axis=None, keepdims=False):
        self.axes = _normalize_axes(axis, x.ndim)
        self.keepdims, self.x = keepdims, x
        if x.size == 0:
            raise ValueError(f"max of an empty tensor of shape {x.shape}")
        self.out = np.max(x, axis=self.axes, keepdims=True)
        return self.out if keepdims else np.squeeze(self.out, axis=self.axes)

    def backward(self, dout):
        is_max = self.x == self.out
        count = is_max.sum(axis=self.axes, keepdims=True)
        share = _expand_to(dout, self.axes, self.keepdims, self.out.shape) / count
        return (is_max * share).astype(dout.dtype, copy=False)

    def _weights(self) -> np.ndarray:
        """1/count at the maxima, 0 elsewhere (a constant: the derivative of max picks)."""
        is_max = self.x == self.out
        return (is_max / is_max.sum(axis=self.axes, keepdims=True)).astype(self.x.dtype)

    def backward_graph(self, dout):
        return dout.reshape(self.out.shape) * self._weights()

    def jvp(self, dx):
        return (dx * self._weights()).sum(axis=self.axes, keepdims=self.keepdims)


# ---- shape and indexing ----------------------------------------------------------------------
class Reshape(Function):
    """out = x viewed with a new shape.  dx = dout viewed with x's shape"""

    def forward(self, x, shape):
        self.x_shape, self.shape = x.shape, shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {x.shape} into {tuple(shape)}") from None

    def backward(self, dout):
        return dout.reshape(self.x_shape)

    backward_graph = backward

    def jvp(self, dx):
        return dx.reshape(self.shape)


class Transpose(Function):
    """out = x with axes permuted.  dx = dout with the inverse permutation"""

    def forward(self, x, axes=None):
        self.axes = tuple(range(x.ndim))[::-1] if axes is None else tuple(axes)
        if sorted(a % max(x.ndim, 1) for a in self.axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {self.axes} are not a permutation for {x.shape}")
        return np.transpose(x, self.axes)

    def backward(self, dout):
        return np.transpose(dout, np.argsort([a % dout.ndim for a in self.axes]))

    def backward_graph(self, dout):
        return dout.transpose(tuple(np.argsort([a % dout.ndim for a in self.axes])))

    def jvp(self, dx):
        return np.transpose(dx, self.axes)


class BroadcastTo(Function):
    """out = x copied along new leading axes and along its size-1 axes, up to `shape`.
    dx = unbroadcast(dout, x.shape)"""

    def forward(self, x, shape):
        self.x_shape, self.shape = x.shape, shape
        try:
            return np.broadcast_to(x, shape)
        except ValueError:
            raise _shape_error("broadcast_to", x.shape, shape) from None

    def backward(self, dout):
        return unbroadcast(dout, self.x_shape)

    backward_graph = backward

    def jvp(self, dx):
        return np.broadcast_to(dx, self.shape)


def _is_basic_index(index) -> bool:
    """Slices, ints, None and ... only: each element of x is picked at most once."""
    items = index if isinstance(index, tuple) else (index,)
    return all(
        isinstance(i, (slice, int, np.integer, type(None))) or i is Ellipsis for i in items
    )


class GetItem(Function):
    """out = x[index].  dx = zeros like x, with dout added at the picked positions
    (np.add.at: an index picked twice gets both gradients)"""

    def forward(self, x, index):
        if isinstance(index, list):
            index = np.asarray(index)
        if isinstance(index, tuple):
            index = tuple(np.asarray(i) if isinstance(i, list) else i for i in index)
        self.index, self.x_shape, self.dtype = index, x.shape, x.dtype
        try:
            return x[index]
        except IndexError as e:
            raise IndexError(f"index into a tensor of shape {x.shape}: {e}") from None

    def backward(self, dout):
        return _scatter_add(dout, self.index, self.x_shape)

    def backward_graph(self, dout):
        return ScatterAdd.apply(dout, index=self.index, shape=self.x_shape)

    def jvp(self, dx):
        return dx[self.index]


def _scatter_add(x: np.ndarray, index, shape: tuple) -> np.ndarray:
    out = np.zeros(shape, dtype=x.dtype)
    if _is_basic_index(index):
        out[index] = x
    else:
        np.add.at(out, index, x)
    return out


class ScatterAdd(Function):
    """out = zeros(shape), then out[index] += x (an index picked twice gets both).
    dx = dout[index]   (GetItem and ScatterAdd are each other's gradient)"""

    def forward(self, x, index, shape):
        self.index, self.shape = index, shape
        return _scatter_add(x, index, shape)

    def backward(self, dout):
        return dout[self.index]

    backward_graph = backward  # dout[index] on a Tensor is GetItem

    def jvp(self, dx):
        return _scatter_add(dx, self.index, self.shape)


class Concatenate(Function):
    """out = [x0, x1, ...] joined along axis.  dxi = the slice of dout that came from xi"""

    def forward(self, *xs, axis=0):
        try:
            out = np.concatenate(xs, axis=axis)
        except ValueError as e:
            shapes = ", ".join(str(x.shape) for x in xs)
            raise ValueError(f"concatenate along axis {axis}: shapes {shapes}: {e}") from None
        self.axis = axis % out.ndim
        self.splits = np.cumsum([x.shape[self.axis] for x in xs])[:-1]
        return out

    def backward(self, dout):
        return tuple(np.split(dout, self.splits, axis=self.axis))

    def backward_graph(self, dout):
        bounds = [0, *self.splits, dout.shape[self.axis]]
        lead = (slice(None),) * self.axis
        return tuple(dout[lead + (slice(a, b),)] for a, b in itertools.pairwise(bounds))

    def jvp(self, *dxs):
        return np.concatenate(dxs, axis=self.axis)


class Stack(Function):
    """out = [x0, x1, ...] stacked on a new axis.  dxi = dout taken at position i of it"""

    def forward(self, *xs, axis=0):
        try:
            out = np.stack(xs, axis=axis)
        except ValueError as e:
            shapes = ", ".join(str(x.shape) for x in xs)
            raise ValueError(f"stack: shapes {shapes}: {e}") from None
        self.axis = axis % out.ndim
        return out

    def backward(self, dout):
        return tuple(np.moveaxis(dout, self.axis, 0))

    def backward_graph(self, dout):
        lead = (slice(None),) * self.axis
        return tuple(dout[lead + (i,)] for i in range(dout.shape[self.axis]))

    def jvp(self, *dxs):
        return np.stack(dxs, axis=self.axis)


class Where(Function):
    """out = a where cond else b.  da = dout where cond (else 0),  db = dout where not cond"""

    def forward(self, a, b, cond):
        try:
            shape = np.broadcast_shapes(cond.shape, a.shape, b.shape)
        except ValueError:
            raise _shape_error("where", cond.shape, a.shape, b.shape) from None
        self.cond, self.a_shape, self.b_shape, self.shape = cond, a.shape, b.shape, shape
        return np.where(cond, a, b)

    def backward(self, dout):
        zero = dout.dtype.type(0)
        da = unbroadcast(np.where(self.cond, dout, zero), self.a_shape) if self.needs(0) else None
        db = unbroadcast(np.where(self.cond, zero, dout), self.b_shape) if self.needs(1) else None
        return da, db

    def backward_graph(self, dout):
        da = unbroadcast(Where.apply(dout, 0.0, cond=self.cond), self.a_shape)
        db = unbroadcast(Where.apply(0.0, dout, cond=self.cond), self.b_shape)
        return da, db

    def jvp(self, da, db):
        return np.where(self.cond, da, db)
