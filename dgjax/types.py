"""Type aliases shared by every layer (the bottom of the import graph: imports nothing of dgjax)."""

from typing import Any

#: A nested structure of arrays (``jax.tree`` leaves): parameters, gradients, optimizer states.
PyTree = Any
