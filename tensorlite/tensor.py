"""`Tensor`: an ndarray plus the bookkeeping autograd needs (`grad`, `requires_grad`, and
`_ctx`, the Function that produced it). Every operator is one explicit line that calls
its op in ops.py, so "go to definition" lands on the math.

`_version` counts assignments to `.data` (`t.data = a`, `t.data += d`, `t[i] = v`): an op
records its inputs' versions, and backward refuses to use arrays that changed since then.
"""

from __future__ import annotations

import numpy as np

from . import autograd, graph, ops, precision

_FLOAT_KINDS = ("f",)


def _to_array(data, dtype=None) -> np.ndarray:
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.ndarray) and data.dtype.kind in _FLOAT_KINDS and dtype is None:
        return data  # float arrays keep their dtype (and are not copied)
    if isinstance(data, np.generic) and data.dtype.kind in _FLOAT_KINDS and dtype is None:
        return np.asarray(data)
    return np.asarray(data, dtype=dtype or np.float32)


class Tensor:
    """A NumPy array that remembers how it was computed, so gradients can flow back.

    >>> x = Tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> y = (x * x).sum()
    >>> y.backward()
    >>> x.grad
    array([2., 4., 6.], dtype=float32)
    """

    __slots__ = ("_ctx", "_data", "_retain_grad", "_version", "grad", "name", "requires_grad")
    __array_priority__ = 100  # ndarray <op> Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad: bool = False, dtype=None, name: str | None = None):
        if requires_grad and dtype is None:
            given = np.asarray(data.data if isinstance(data, Tensor) else data).dtype
            if given.kind not in _FLOAT_KINDS:  # casting 2**24 + 1 to float32 would lose it
                raise TypeError(f"only float tensors can require grad, got {given} data: pass "
                                "floats, or dtype=np.float64 to convert on purpose")
        self._data = _to_array(data, dtype)
        self._version = 0  # bumped by every assignment to .data (see the module docstring)
        if requires_grad and self._data.dtype.kind not in _FLOAT_KINDS:
            raise TypeError(f"only float tensors can require grad, got dtype {self._data.dtype}")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None  # the Function that made this tensor (None for leaves)
        self._retain_grad = False
        self.name = name

    # ---- the array, and its version ------------------------------------------------------
    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value) -> None:  # also runs for `t.data += d` (Python assigns the result)
        self._data = value
        self._version += 1

    def __setitem__(self, index, value) -> None:
        """In-place write `t[index] = value` (no gradient flows through it; bumps the version)."""
        self._data[index] = _raw(value)
        self._version += 1

    # ---- plain attributes -------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ", requires_grad=True" if self.requires_grad else ""
        if self._ctx is not None:
            extra += f", op={type(self._ctx).__name__}"
        return f"Tensor({np.array2string(self.data, precision=4, threshold=20)}{extra})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        """The same data, cut from the graph (shares memory, like PyTorch)."""
        return Tensor(self.data)

    def retain_grad(self) -> Tensor:
        """Keep this non-leaf tensor's gradient in `.grad` after backward (for inspection)."""
        self._retain_grad = True
        return self

    # ---- autograd ------------------------------------------------------------------------
    def backward(self, grad=None, create_graph: bool = False) -> None:
        """Compute d(self)/d(leaf) for every leaf that requires grad; add it to leaf.grad.

        create_graph=True records the backward pass itself as a graph (and keeps this one);
        leaf.grad is still an ndarray. `tensorlite.grad` returns those gradients as Tensors.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: create the inputs with "
                "requires_grad=True (and not inside no_grad())"
            )
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() on a non-scalar tensor of shape {self.shape} needs a gradient "
                    "argument of the same shape (or reduce it first, e.g. .sum())"
                )
            grad = np.ones_like(self.data)
        else:
            seed = grad
            grad = _to_array(grad)
            if grad.shape != self.shape:
                raise ValueError(
                    f"backward(grad): grad has shape {grad.shape}, tensor has shape {self.shape}"
                )
            grad = grad.astype(self.dtype, copy=False)
            if create_graph and isinstance(seed, Tensor):
                grad = seed  # the gradient flows on into a seed that requires grad
        if create_graph and not isinstance(grad, Tensor):
            grad = Tensor(grad)
        autograd.backward(self, grad, create_graph)

    # ---- arithmetic: one line per operator --------------------------------------------
    def __add__(self, other):
        return ops.Add.apply(self, _lift(other, self))

    def __radd__(self, other):
        return ops.Add.apply(_lift(other, self), self)

    def __sub__(self, other):
        return ops.Sub.apply(self, _lift(other, self))

    def __rsub__(self, other):
        return ops.Sub.apply(_lift(other, self), self)

    def __mul__(self, other):
        return ops.Mul.apply(self, _lift(other, self))

    def __rmul__(self, other):
        return ops.Mul.apply(_lift(other, self), self)

    def __truediv__(self, other):
        return ops.Div.apply(self, _lift(other, self))

    def __rtruediv__(self, other):
        return ops.Div.apply(_lift(other, self), self)

    def __neg__(self):
        return ops.Neg.apply(self)

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor) or np.ndim(exponent) != 0:
            raise TypeError("** supports a scalar exponent only (use exp(log(x) * y) for tensors)")
        return ops.Pow.apply(self, exponent=float(exponent))

    def __matmul__(self, other):
        return _matmul(self, _lift(other, self))

    def __rmatmul__(self, other):
        return _matmul(_lift(other, self), self)

    def __getitem__(self, index):
        return ops.GetItem.apply(self, index=index)

    # ---- comparisons: plain bool arrays (no gradient), e.g. for tensorlite.where ----------
    def __lt__(self, other):
        return self.data < _raw(other)

    def __le__(self, other):
        return self.data <= _raw(other)

    def __gt__(self, other):
        return self.data > _raw(other)

    def __ge__(self, other):
        return self.data >= _raw(other)

    # ---- elementwise functions -------------------------------------------------------------
    def exp(self):
        return ops.Exp.apply(self)

    def log(self):
        return ops.Log.apply(self)

    def sqrt(self):
        return ops.Sqrt.apply(self)

    def tanh(self):
        return ops.Tanh.apply(self)

    def sigmoid(self):
        return ops.Sigmoid.apply(self)

    def relu(self):
        return ops.Relu.apply(self)

    # ---- reductions --------------------------------------------------------------------------
    def sum(self, axis=None, keepdims: bool = False):
        return ops.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return ops.Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return ops.Max.apply(self, axis=axis, keepdims=keepdims)

    # ---- shape -------------------------------------------------------------------------------
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return ops.Reshape.apply(self, shape=shape)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return ops.Transpose.apply(self, axes=axes or None)

    def swapaxes(self, axis1: int, axis2: int):
        axes = list(range(self.ndim))
        axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
        return ops.Transpose.apply(self, axes=tuple(axes))

    def broadcast_to(self, shape):
        return ops.BroadcastTo.apply(self, shape=tuple(shape))

    @property
    def T(self):
        return self.transpose()

    # ---- pictures (graph.py) --------------------------------------------------------------
    def to_dot(self) -> str:
        """Graphviz DOT text of the graph that produced this tensor."""
        return graph.to_dot(self)


autograd.use_tensor_class(Tensor)  # every op's output is a Tensor (autograd cannot import us)


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _lift(other, like: Tensor) -> Tensor:
    """Python numbers next to a tensor take the tensor's dtype (2.0 * float64 stays float64)."""
    if isinstance(other, Tensor):
        return other
    if isinstance(other, np.ndarray) and other.dtype.kind in _FLOAT_KINDS:
        return Tensor(other)
    return Tensor(np.asarray(other, dtype=like.dtype))


def _matmul(x: Tensor, y: Tensor) -> Tensor:
    """x @ y: in bf16 inside tl.autocast("bfloat16") (tensorlite/precision.py), else float."""
    if precision.use_bf16(x.data, y.data):
        return precision.MatMulBF16.apply(x, y)
    return ops.MatMul.apply(x, y)


# ---- module functions ------------------------------------------------------------------------
def concatenate(tensors, axis: int = 0) -> Tensor:
    """Join tensors along an existing axis (np.concatenate)."""
    if not tensors:
        raise ValueError("concatenate: need at least one tensor")
    return ops.Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis: int = 0) -> Tensor:
    """Join same-shaped tensors along a new axis (np.stack)."""
    if not tensors:
        raise ValueError("stack: need at least one tensor")
    return ops.Stack.apply(*tensors, axis=axis)


def where(cond, a, b) -> Tensor:
    """Elementwise `a if cond else b`; `cond` is a bool array (no gradient flows to it)."""
    cond = np.asarray(cond.data if isinstance(cond, Tensor) else cond, dtype=bool)
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else Tensor(0.0)
    return ops.Where.apply(_lift(a, like), _lift(b, like), cond=cond)
