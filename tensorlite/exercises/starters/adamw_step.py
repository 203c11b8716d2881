"""Exercise: one AdamW step with bias correction (docs/gpt.md, "AdamW").

Write adamw_step. Grade it with
    python -m tensorlite.exercises check adamw_step --dir DIR
"""

import numpy as np  # noqa: F401 - for your code


def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of a parameter p with gradient g, at step t (1 at the first step).

    m and v are the first and second moments before this step (zeros before step 1).
    Update them, correct their bias towards zero with t, and take the step, with the weight
    decay decoupled (it shrinks p directly by lr * weight_decay * p; it is not part of g).
    Return (new p, new m, new v).
    """
    raise NotImplementedError
