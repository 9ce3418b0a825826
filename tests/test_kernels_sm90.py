"""The Triton SGMV kernels compiled for sm_90 (H100/H200) on a machine without a GPU: how many
variants a model's steps compile (one per tile config, never one per step shape) and that each
fits an SM's shared memory. The launch wrappers run over meta tensors at Llama-3.1-8B shapes (the
engine's paged pool as per-layer views, its segment tables as uploaded); each launch is
specialised as a real one and lowered to an sm_90 cubin (tests/sm90_aot.py), in a child process
with the interpreter off. The attention kernel's counterpart: tests/test_triton_paged_attention.py.
"""

from __future__ import annotations

from itertools import accumulate

from triton_mode import CHILD, kernel_module, rerun_in_child  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import LoraSegments  # noqa: E402

triton_sgmv = kernel_module("triton_sgmv")
HAVE_TRITON = triton_sgmv is not None
INTERP = HAVE_TRITON and triton_sgmv.INTERPRETED

COMPILED = HAVE_TRITON and not INTERP
needs_compiler = pytest.mark.skipif(not COMPILED, reason="kernels interpreted here (test_sm90_in_subprocess)")

LLAMA_8B = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
            "down": (14336, [4096])}
# decode batches of 1..64 adapters of mixed ranks, long prefills, prefills next to decodes
SGMV_STEPS = [([1] * n, [16 - i % 9 for i in range(n)]) for n in (1, 2, 3, 5, 8, 13, 16, 31, 48, 64)] + [
    ([2048], [16]), ([300] + [1] * 16, [8] + [16] * 16), ([37, 5, 900], [4, 16, 16]), ([4096, 4096], [16, 16]),
    ([128] * 8, [16] * 8), ([20] * 10, [16] * 10)]


def _sgmv_step(lens, ranks, in_dim, widths, r_pad, u, wdt=torch.bfloat16, xdt=torch.bfloat16, n_slots=64):
    """One layer's shrink + expand over meta tensors: pool views of layer 5 of 32, u=0: unpaged."""
    dev, n_s, out = "meta", len(widths), sum(widths)
    seg = LoraSegments.build(lens, list(range(len(lens))), [min(r, r_pad) for r in ranks], n_slots, dev,
                             layouts=("triton",))
    x = torch.empty(seg.num_tokens + 3, in_dim, dtype=xdt, device=dev)
    y = torch.empty(seg.num_tokens + 3, out, dtype=xdt, device=dev)
    pages, rows = None, r_pad
    if u:
        pages, rows, n_slots = torch.empty(n_slots, r_pad // u, dtype=torch.int32, device=dev), u, 200
    a = torch.empty(32, n_slots, n_s * rows, in_dim, dtype=wdt, device=dev)[5]
    b = torch.empty(32, n_slots, out, rows, dtype=wdt, device=dev)[5]
    h = triton_sgmv.sgmv_shrink(x, a, seg, n_s, pages=pages)
    triton_sgmv.sgmv_expand(y, h, b, seg, list(accumulate(widths, initial=0)), pages=pages)


@needs_compiler
@pytest.mark.parametrize("r_pad,u", [(16, 16), (64, 16), (16, 0)])
def test_sm90_sgmv_variants_do_not_follow_the_step(r_pad, u):
    import sm90_aot as aot

    for group, (in_dim, widths) in LLAMA_8B.items():
        with aot.recording(triton_sgmv.__name__, "_shrink_jit", "_expand_jit") as rec:
            for lens, ranks in SGMV_STEPS:
                _sgmv_step(lens, ranks, in_dim, widths, r_pad, u)
        shrink, expand = aot.distinct(rec["_shrink_jit"]), aot.distinct(rec["_expand_jit"])
        # the tuned tile heights (and split-K for the shrink) only: not the step's segment count or ranks
        assert len(shrink) <= 3 and len(expand) <= 3, (group, len(shrink), len(expand))


@needs_compiler
def test_sm90_sgmv_compiles_within_shared_memory():
    import sm90_aot as aot

    with aot.recording(triton_sgmv.__name__, "_shrink_jit", "_expand_jit") as rec:
        for lens, ranks in SGMV_STEPS[::3]:
            _sgmv_step(lens, ranks, *LLAMA_8B["gate_up"], 64, 16)  # the widest shrink tiles
            _sgmv_step(lens, ranks, 11008, [4096], 16, 8)  # K not a multiple of the K tiles; 8-rank pages
            _sgmv_step(lens, ranks, *LLAMA_8B["o"], 4, 4)  # a rank-4 pool: every tile dim padded to 16
        # fp32 weights (exact products) and fp32 activations over bf16 weights
        _sgmv_step([1] * 8, [16] * 8, *LLAMA_8B["qkv"], 16, 0, wdt=torch.float32, xdt=torch.float32)
        _sgmv_step([300, 2], [16, 4], *LLAMA_8B["qkv"], 16, 16, xdt=torch.float32)
    assert aot.compile_within_shared_memory(rec) >= 10


@pytest.mark.skipif(COMPILED or not HAVE_TRITON or CHILD, reason="sm_90 tests already ran in-process (or no triton)")
def test_sm90_in_subprocess():
    pytest.importorskip("triton.backends.nvidia")
    rerun_in_child(__file__, "sm90", interpret=False)
