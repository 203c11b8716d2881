"""Reference solution: one AdamW step with bias correction (docs/gpt.md, "AdamW").

The starter with its functions written; the test suite grades it with
    python -m tensorlite.exercises check adamw_step --dir examples/exercises
"""

import numpy as np


def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of a parameter p with gradient g, at step t (1 at the first step).

    m and v are the first and second moments before this step (zeros before step 1).
    Update them, correct their bias towards zero with t, and take the step, with the weight
    decay decoupled (it shrinks p directly by lr * weight_decay * p; it is not part of g).
    Return (new p, new m, new v).
    """
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)  # bias correction: the moments started at 0
    v_hat = v / (1 - beta2**t)
    p = p - lr * weight_decay * p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v
