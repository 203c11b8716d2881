"""tensorlite: a small reverse-mode autograd engine on NumPy.

    import tensorlite as tl
    x = tl.Tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()   # x.grad == [2, 4]
    (g,) = tl.grad((x ** 3).sum(), [x], create_graph=True)   # g = 3x^2, differentiable again

Read docs/autograd.md for the tour, docs/higher-order.md for grad, jvp and hvp; `tensorlite.functional` holds the fused ops,
`tensorlite.testing` the tools to verify your own.
"""

from . import functional
from .autograd import is_grad_enabled, no_grad
from .gradcheck import GradcheckError, gradcheck
from .graph import show_graph, trace_backward
from .higher_order import grad, hvp, jvp
from .kernels import get_num_threads, set_num_threads
from .precision import autocast
from .tensor import Tensor, concatenate, stack, where

__version__ = "0.1.0"

__all__ = [
    "GradcheckError",
    "Tensor",
    "autocast",
    "concatenate",
    "functional",
    "get_num_threads",
    "grad",
    "gradcheck",
    "hvp",
    "is_grad_enabled",
    "jvp",
    "no_grad",
    "set_num_threads",
    "show_graph",
    "stack",
    "trace_backward",
    "where",
]
