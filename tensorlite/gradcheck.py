"""`tensorlite.gradcheck`, the name the docs and older code use: the checker itself (its one
finite-difference loop and one tolerance rule) lives in tensorlite/testing.py."""

from .testing import GradcheckError, gradcheck

__all__ = ["GradcheckError", "gradcheck"]
