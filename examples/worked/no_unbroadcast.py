"""Exercise 3 of docs/verifying-gradients.md: delete an unbroadcast and watch the check fail.

MulSquare (out = x * y**2) from the checklist, once with its `unbroadcast` calls and once
without. Without them, backward hands a gradient shaped like the OUTPUT to an input that was
broadcast, and the property test finds a shape pair where that breaks (backward stops with
"gradient of shape ... for a tensor of shape ..."). Same shapes never show the bug: that is
why the test draws pairs with `broadcastable_shapes()`.

    python examples/worked/no_unbroadcast.py
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tensorlite.autograd import Function, unbroadcast
from tensorlite.testing import arrays, assert_gradients_match, broadcastable_shapes


class MulSquare(Function):
    """out = x * y**2.  dx = dout * y**2,  dy = dout * 2 x y"""

    def forward(self, x, y):
        self.x, self.y = x, y
        return x * y * y

    def backward(self, dout):
        dx = unbroadcast(dout * self.y * self.y, self.x.shape)
        dy = unbroadcast(dout * 2 * self.x * self.y, self.y.shape)
        return dx, dy


class MulSquareNoUnbroadcast(MulSquare):
    """The same op with both unbroadcast calls deleted."""

    def backward(self, dout):
        return dout * self.y * self.y, dout * 2 * self.x * self.y


def property_test(op, same_shapes: bool = False):
    @settings(max_examples=50, deadline=None, derandomize=True, database=None)
    @given(st.data())
    def test(data):
        shape_x, shape_y = data.draw(broadcastable_shapes(2))
        if same_shapes:
            shape_y = shape_x
        assert_gradients_match(op.apply, data.draw(arrays(shape=shape_x)),
                               data.draw(arrays(shape=shape_y)))
    return test


def failure(op, same_shapes: bool = False) -> str | None:
    """The error the property test ends with, or None if every example passed."""
    try:
        property_test(op, same_shapes)()
    except Exception as e:  # noqa: BLE001  (any failure is the answer)
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def main() -> None:
    with_it, without_it = failure(MulSquare), failure(MulSquareNoUnbroadcast)
    same_shapes_only = failure(MulSquareNoUnbroadcast, same_shapes=True)
    print("with unbroadcast:   ", with_it or "passes")
    print("without unbroadcast:", without_it)
    print("without, same shapes only:", same_shapes_only or "passes (the bug hides)")
    assert with_it is None and same_shapes_only is None
    assert without_it is not None and "gradient of shape" in without_it
    print("ok")


if __name__ == "__main__":
    main()
