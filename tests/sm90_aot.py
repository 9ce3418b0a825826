"""Triton launches as an H100/H200 (sm_90) would compile them, on a machine without a GPU.

`Launches` stands in for a module's jitted kernel: the real launch wrapper (kernels/triton_*.py)
runs over meta tensors (real model shapes, no memory) and each launch is recorded. `key` turns a
recorded launch into the specialisation Triton's own binder computes at a real launch (which
arguments become constants, which carry a divisibility-by-16 hint): one distinct key = one compile
at run time, seconds each. `compile_sm90` lowers it to a cubin with the ptxas that ships with
triton, so errors the interpreter cannot see, and shared memory past what one block may have on
sm_90, show up on CPU-only CI.

Use in a process where TRITON_INTERPRET is unset (the tests run these checks in a child).
"""

from __future__ import annotations

import contextlib
import importlib

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

SM90 = GPUTarget("cuda", 90, 32)
# shared memory one block may opt into on sm_90 (227 KiB of the SM's 228): a kernel asking for
# more fails to launch ("out of resource: shared memory")
MAX_SMEM = 232448


class Launches:
    """Records `kernel[grid](*args, **kwargs)` calls instead of running them."""

    def __init__(self, jit):
        self.jit = jit
        self.calls: list[tuple[tuple, tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def recording(module_name: str, *attrs: str):
    """Swap the module's jitted kernels `attrs` for recorders: yields {attr: Launches}."""
    mod = importlib.import_module(module_name)
    saved = {a: getattr(mod, a) for a in attrs}
    recs = {a: Launches(saved[a]) for a in attrs}
    for a in attrs:
        setattr(mod, a, recs[a])
    try:
        yield recs
    finally:
        for a in attrs:
            setattr(mod, a, saved[a])


def _pack(jit, args, kwargs):
    backend = make_backend(SM90)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
    return spec, opts, options, signature, constexprs, attrs


def key(jit, args, kwargs) -> str:
    """What Triton's launch cache is keyed on (specialisation + launch options)."""
    spec, opts, *_ = _pack(jit, args, kwargs)
    return repr((spec, sorted(opts.items())))


def compile_sm90(jit, args, kwargs):
    """The sm_90 cubin of this launch (triton.compiler.CompiledKernel; .metadata.shared in bytes)."""
    _, _, options, signature, constexprs, attrs = _pack(jit, args, kwargs)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=SM90, options=options.__dict__)


def distinct(launches: Launches) -> dict[str, tuple]:
    """Recorded launches by specialisation key (first launch of each)."""
    out: dict[str, tuple] = {}
    for _, args, kwargs in launches.calls:
        out.setdefault(key(launches.jit, args, kwargs), (args, kwargs))
    return out


def compile_within_shared_memory(recorded: dict[str, Launches]) -> int:
    """Compile every distinct launch of `recorded` for sm_90, asserting each fits an SM's shared
    memory and needs no global scratch memory (Triton allocates that per launch through
    `triton.set_allocator`, which this project never sets: such a kernel would fail at its first
    launch on the GPU, and an allocation per launch could not sit in a CUDA graph anyway); the
    number of variants compiled."""
    n = 0
    for r in recorded.values():
        for args, kwargs in distinct(r).values():
            meta = compile_sm90(r.jit, args, kwargs).metadata
            assert meta.shared <= MAX_SMEM, f"{meta.shared} B of shared memory: {kwargs}"
            scratch = getattr(meta, "global_scratch_size", 0)  # absent on Tritons without the feature
            assert not scratch, f"{scratch} B of global scratch per launch: {kwargs}"
            n += 1
    return n
