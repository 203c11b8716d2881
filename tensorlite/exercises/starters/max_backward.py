"""Exercise: Max's backward, ties included (docs/autograd.md, section 6, "Reductions").

Write max_backward. Grade it with
    python -m tensorlite.exercises check max_backward --dir DIR
"""

import numpy as np  # noqa: F401 - for your code


def max_backward(dout, x, axis):
    """out = x.max(axis=axis) (an int axis, maybe negative; the axis is dropped). Given
    dout = dL/dout, shaped like out, return dx shaped like x: dout goes to the elements that
    are the maximum along the axis, 0 elsewhere; when several elements tie for the maximum,
    they share it evenly (each gets dout / the number of ties), as tensorlite's Max does."""
    raise NotImplementedError
