"""Reference solution: MatMul's backward (docs/autograd.md, section 6, "Matrix multiplication").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check matmul_backward --dir examples/exercises
"""



def matmul_backward(dout, x, w):
    """out = x @ w: a linear layer, x (..., N, C) with any number of leading batch axes
    (none included), w (C, K), out (..., N, K). Given dout = dL/dout, return
    (dx, dw) shaped like x and w. The same w serves every batch element."""
    C, K = w.shape
    dx = dout @ w.T  # (..., N, C)
    dw = x.reshape(-1, C).T @ dout.reshape(-1, K)  # (C, K): summed over the batch and rows
    return dx, dw
