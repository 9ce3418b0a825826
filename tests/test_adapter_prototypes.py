"""Arrow routing prototypes (the top right singular vector of each module's B @ A), computed
exactly at parse time, against PEFT's power iteration (ArrowLoraLinearLayer.top_right_singular_vec_from_BA,
fixed rng_seed) and against the SVD of the dense delta.

PEFT's 15 power iterations converge only with a spectral gap, so the adapters here are made by
PEFT with A and B set to a chosen SVD: B @ A = U diag(SIGMA) V^T, SIGMA[0] / SIGMA[1] = 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer
from peft.tuners.lora.config import ArrowConfig

from server.adapters import parse_peft_adapter
from server.adapters.prototypes import top_right_singular_vectors
from server.model.arch import ModelArch

SIGMA = (8.0, 2.0, 1.0, 0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, cols] with orthonormal columns (rows >= cols)."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def make_gapped_adapter(base_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT adapter whose every module's delta B @ A has singular values SIGMA (times a random
    split of the scale between A and B, so neither factor is orthonormal)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=len(SIGMA), lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(SIGMA, dtype=torch.float64)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                u, v = orthonormal(b.shape[0], len(SIGMA), gen), orthonormal(a.shape[1], len(SIGMA), gen)
                mix = torch.linalg.qr(torch.randn(len(SIGMA), len(SIGMA), generator=gen, dtype=torch.float64))[0]
                mix = mix * (0.5 + torch.rand(len(SIGMA), generator=gen, dtype=torch.float64))  # invertible
                b.copy_(u @ torch.diag(sigma) @ mix)  # B @ A = U diag(sigma) V^T whatever `mix` is
                a.copy_(torch.linalg.inv(mix) @ v.T)
    peft_model.save_pretrained(str(out))
    return out


def peft_prototype(a: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    config = ArrowConfig(top_k=1, rng_seed=seed)
    config.task_adapter_names = ["task_0"]  # set by create_arrow_model in PEFT; unused here
    return ArrowLoraLinearLayer(a.shape[1], config).top_right_singular_vec_from_BA(a, b)


def abs_cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float((u @ v).abs() / (u.norm() * v.norm()))


@pytest.mark.parametrize("seed", [0, 1])
def test_parsed_prototypes_equal_peft_and_dense_svd(tiny_llama_dir, tmp_path, seed):
    path = make_gapped_adapter(tiny_llama_dir, tmp_path / "gap", seed=seed, lora_alpha=8,
                               target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    ours = parse_peft_adapter(path, ModelArch.from_dir(tiny_llama_dir), name="g", max_rank=8)[1]
    assert len(ours.modules) == 3 * 5
    for key, w in ours.modules.items():
        p = w.prototype
        assert p.dtype == torch.float32 and p.shape == (w.a.shape[1],) and p.is_contiguous()
        assert abs(float(p.norm()) - 1) < 1e-6
        svd = torch.linalg.svd((w.b.double() @ w.a.double()), full_matrices=False)
        torch.testing.assert_close(svd.S[:4], torch.tensor(SIGMA, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert abs_cosine(p, svd.Vh[0]) > 1 - 1e-9, key
        assert abs_cosine(p, peft_prototype(w.a, w.b, seed=7 + seed)) > 1 - 1e-5, key
        assert p[p.abs().argmax()] > 0  # the sign is fixed: reproducible pools


def test_prototype_of_a_tall_and_a_wide_delta():
    gen = torch.Generator().manual_seed(3)
    shapes = ((200, 30, 6), (30, 200, 6), (50, 50, 1), (200, 30, 6), (4, 40, 8))  # one batch of two
    pairs = [(torch.randn(r, in_, generator=gen), torch.randn(out, r, generator=gen)) for out, in_, r in shapes]
    for (a, b), p in zip(pairs, top_right_singular_vectors(pairs)):
        v = torch.linalg.svd((b.double() @ a.double()))[2][0]
        assert p.shape == (a.shape[1],) and abs_cosine(p, v) > 1 - 1e-9


def test_zero_delta_has_a_zero_prototype_like_peft():
    """PEFT's initial adapter (B = 0): no direction. PEFT's power iteration gives 0 (logit 0 for
    every token); an SVD would give an arbitrary unit vector."""
    a = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    b = torch.zeros(32, 4)
    zero, other = top_right_singular_vectors([(a, b), (a, torch.ones(32, 4))])  # one batch
    assert torch.equal(zero, torch.zeros(64)) and abs(float(other.norm()) - 1) < 1e-6
    assert float(peft_prototype(a, b, seed=0).norm()) < 1e-6
