"""tensorlite: a small reverse-mode autograd engine on NumPy.

    import tensorlite as tl
    x = tl.Tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()   # x.grad == [2, 4]

Read docs/autograd.md for the tour; `tensorlite.functional` holds the fused ops,
`tensorlite.testing` the tools to verify your own.
"""

from . import functional
from .autograd import is_grad_enabled, no_grad
from .gradcheck import GradcheckError, gradcheck
from .graph import show_graph
from .kernels import get_num_threads, set_num_threads
from .tensor import Tensor, concatenate, stack, where

__version__ = "0.1.0"

__all__ = [
    "GradcheckError",
    "Tensor",
    "concatenate",
    "functional",
    "get_num_threads",
    "gradcheck",
    "is_grad_enabled",
    "no_grad",
    "set_num_threads",
    "show_graph",
    "stack",
    "where",
]
