"""triton.jit for kernels launched with arguments that change from step to step.

Triton compiles one variant per specialisation of a launch's arguments: an int equal to 1 becomes
a constant, an int divisible by 16 or a pointer aligned to 16 bytes gets a hint. An argument that
follows the batch (a token count, a table's width, a view's offset into a step's upload buffer)
would thus compile new variants, seconds each, while serving. `jit` switches that off for the
named arguments, with whichever of Triton's options this version has (pyproject: triton >= 3.0).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import triton

_OPTIONS = inspect.signature(triton.jit).parameters


def jit(fn: Callable, ints: Sequence[str] = (), pointers: Sequence[str] = ()):
    """triton.jit(fn), no specialisation on the int arguments `ints` nor on the alignment of the
    pointer arguments `pointers` (on a Triton without the alignment option: none on them at all)."""
    if "do_not_specialize_on_alignment" in _OPTIONS:
        return triton.jit(fn, do_not_specialize=tuple(ints), do_not_specialize_on_alignment=tuple(pointers))
    return triton.jit(fn, do_not_specialize=tuple(ints) + tuple(pointers))
