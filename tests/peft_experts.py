"""PEFT oracles for expert libraries (issue 12): adapter makers with a spectral gap, and PEFT's own
greedy tokens + logprobs for one adapter, a weighted mixture (`add_weighted_adapter(..., "cat")`),
Arrow routing (`create_arrow_model`) and DoRA. Everything fp32, eval mode, CPU.

A reference job is one of: None (the base model), a Path (one adapter, LoRA or DoRA, loaded
normally), `Mix(paths, weights)`, `Arrow(paths, top_k, temperature)` (PEFT's own router: experts
of one rank and one target set) or `ArrowRef(...)` (the same routing done here by hand, for
experts PEFT's router refuses: different ranks or target sets; a module an expert does not target
takes no part in routing there, as the design says). Compare with `pytest.approx(abs=2e-4)` on tiny
models and `abs=1e-3` on the default model, as tests/test_lora_engine.py does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_adapters import greedy

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class Mix:
    """PEFT `add_weighted_adapter(names, weights, "mix", combination_type="cat")`."""

    paths: tuple[Path, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Arrow:
    """PEFT `create_arrow_model(base, paths, ArrowConfig(top_k, router_temperature, rng_seed))`."""

    paths: tuple[Path, ...]
    top_k: int = 3
    temperature: float = 1.0
    rng_seed: int = 0


@dataclass(frozen=True)
class ArrowRef:
    """Arrow routing by hand over experts PEFT's router cannot take together (ranks or target sets
    differ); prototypes by exact SVD. Equals `Arrow` where PEFT's router works (test_peft_experts)."""

    paths: tuple[Path, ...]
    top_k: int = 3
    temperature: float = 1.0


Job = Path | Mix | Arrow | ArrowRef | None


# ----------------------------------------------------------------------------------------- makers

def _gapped(a: torch.Tensor, b: torch.Tensor, gap: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in], B [out, r] -> A', B' whose product has the singular vectors and values of B A
    except sigma_1 = gap * sigma_2 (so power iteration converges fast); the scale between A' and
    B' is spread by random per-component factors so neither has orthonormal rows/columns."""
    q, rb = torch.linalg.qr(b)  # q [out, m], m = min(out, r)
    u, s, vh = torch.linalg.svd(rb @ a, full_matrices=False)  # u [m, k], s [k], vh [k, in]
    k = s.numel()
    if k > 1:
        s = s.clone()
        s[0] = gap * s[1]
    d = torch.exp(0.3 * torch.randn(k, generator=gen))
    a2 = torch.zeros_like(a)
    b2 = b.clone()  # columns past k (rank above min(out, in)) stay random; their A rows are zero
    a2[:k] = (s / d)[:, None] * vh
    b2[:, :k] = (q @ u) * d
    return a2, b2


def make_expert(base_dir: Path, out_dir: Path, seed: int = 0, r: int = 8, lora_alpha: float = 16,
                target_modules=ALL_LINEAR, use_dora: bool = False, std: float = 0.05, gap: float = 4.0,
                magnitude_jitter: float = 0.4, **lora_kwargs) -> Path:
    """Save a PEFT adapter of `base_dir` in `out_dir`, deterministic from `seed`: random A and B
    (std `std`) reshaped so every module's B A has sigma_1 / sigma_2 = `gap`. With `use_dora`, the
    magnitude is ||W + s B A||_row times a random factor in [1 - jitter, 1 + jitter] per output
    row (jitter 0: DoRA's rescale is exactly 1, the adapter acts as its LoRA twin)."""
    import peft
    import transformers
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules)
                             if not isinstance(target_modules, str) else target_modules,
                             use_dora=use_dora, lora_dropout=0.0, **lora_kwargs)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for _, m in sorted(pm.named_modules(), key=lambda kv: kv[0]):
            if not isinstance(m, LoraLayer) or "default" not in m.lora_A:
                continue
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a2, b2 = _gapped(torch.randn(a.shape, generator=gen) * std, torch.randn(b.shape, generator=gen) * std,
                             gap, gen)
            a.copy_(a2)
            b.copy_(b2)
            if use_dora:
                w = m.get_base_layer().weight.float()
                norm = torch.linalg.norm(w + m.scaling["default"] * (b2 @ a2), dim=1)
                jitter = 1 + magnitude_jitter * (2 * torch.rand(norm.shape, generator=gen) - 1)
                m.lora_magnitude_vector["default"].weight.copy_(norm * jitter)
    pm.save_pretrained(out_dir)
    return out_dir


def lora_twin(dora_dir: Path, out_dir: Path) -> Path:
    """The same adapter without DoRA: use_dora false, magnitude vectors dropped."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((dora_dir / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(dora_dir / WEIGHTS_FILE)
    save_file({k: v for k, v in tensors.items() if "lora_magnitude_vector" not in k}, out_dir / WEIGHTS_FILE)
    for extra in dora_dir.iterdir():  # README etc.
        if not (out_dir / extra.name).exists() and extra.is_file():
            shutil.copy(extra, out_dir / extra.name)
    return out_dir


def module_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT module prefix (e.g. `...layers.0.self_attn.q_proj`) -> (A [r, in], B [out, r]) from the file."""
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / WEIGHTS_FILE)
    return {k[: -len(".lora_A.weight")]: (v.float(), tensors[k.replace("lora_A", "lora_B")].float())
            for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of B A (descending), without forming it."""
    q, rb = torch.linalg.qr(b)
    return torch.linalg.svdvals(rb @ a)


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[in] unit: the Arrow prototype of B A (sign arbitrary)."""
    _, rb = torch.linalg.qr(b)
    return torch.linalg.svd(rb @ a, full_matrices=False)[2][0]


# ----------------------------------------------------------------------------------------- models

def base_model(base_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def mixture_model(base_dir: Path, paths, weights):
    """PEFT's cat mixture, active as `mix`. PEFT copies the mixture's config from the first adapter
    (use_rslora, layers_to_transform) though its A already holds every expert's scaling: a first
    adapter with either would change the result, so one without them is moved first."""
    import peft

    paths, weights = [Path(p) for p in paths], list(weights)
    cfgs = [json.loads((p / "adapter_config.json").read_text()) for p in paths]
    plain = [i for i, c in enumerate(cfgs) if not (c.get("use_rslora") or c.get("layers_to_transform") is not None
                                                   or c.get("use_dora"))]
    if not plain:
        raise ValueError("PEFT's cat mixture takes its config from the first adapter: one of them must have "
                         "no use_rslora / layers_to_transform / use_dora")
    order = [plain[0], *[i for i in range(len(paths)) if i != plain[0]]]
    names = [f"e{i}" for i in order]
    model = peft.PeftModel.from_pretrained(base_model(base_dir), paths[order[0]], adapter_name=names[0])
    for i, name in zip(order[1:], names[1:]):
        model.load_adapter(paths[i], adapter_name=name)
    model.add_weighted_adapter(names, [weights[i] for i in order], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def arrow_model(base_dir: Path, paths, top_k: int = 3, temperature: float = 1.0, rng_seed: int = 0):
    import peft

    cfg = peft.ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=rng_seed)
    return peft.create_arrow_model(base_model(base_dir), [str(p) for p in paths], cfg).eval()


def _arrow_forward(module, names: list[str], protos: torch.Tensor, top_k: int, temperature: float):
    """Replacement forward of one PEFT lora.Linear: base output + Arrow over the experts it holds
    (`names`, prototypes `protos` [E, in]), as PEFT's ArrowLoraLinearLayer computes it."""
    k = min(top_k, len(names))

    def forward(x, *args, **kwargs):
        result = module.base_layer(x, *args, **kwargs)
        tok = x.reshape(-1, x.shape[-1])
        logits = (tok @ protos.T).abs()
        kept, idx = logits.topk(k, dim=1)
        coeff = torch.zeros_like(logits).scatter_(1, idx, torch.softmax(kept / temperature, dim=1))
        delta = sum(coeff[:, e:e + 1] * module.scaling[n] * (tok @ module.lora_A[n].weight.T @ module.lora_B[n].weight.T)
                    for e, n in enumerate(names))
        return result + delta.reshape(*x.shape[:-1], -1)

    return forward


def arrow_ref_model(base_dir: Path, paths, top_k: int = 3, temperature: float = 1.0):
    """Every expert loaded into one PeftModel; each LoRA linear's forward replaced by Arrow over the
    experts that target it (exact prototypes). A module no expert targets keeps the base output."""
    import peft
    from peft.tuners.lora import LoraLayer

    names = [f"task_{i}" for i in range(len(paths))]
    model = peft.PeftModel.from_pretrained(base_model(base_dir), Path(paths[0]), adapter_name=names[0])
    for name, p in zip(names[1:], paths[1:]):
        model.load_adapter(Path(p), adapter_name=name)
    for _, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        here = [n for n in names if n in m.lora_A]
        protos = torch.stack([top_right_singular_vector(m.lora_A[n].weight.float(), m.lora_B[n].weight.float())
                              for n in here])
        m.forward = _arrow_forward(m, here, protos, top_k, temperature)
    return model.eval()


def reference_model(base_dir: Path, job: Job):
    """The fp32 eval-mode model that computes `job` (see the module docstring)."""
    import peft

    if job is None:
        return base_model(base_dir)
    if isinstance(job, Mix):
        return mixture_model(base_dir, job.paths, job.weights)
    if isinstance(job, Arrow):
        return arrow_model(base_dir, job.paths, job.top_k, job.temperature, job.rng_seed)
    if isinstance(job, ArrowRef):
        return arrow_ref_model(base_dir, job.paths, job.top_k, job.temperature)
    return peft.PeftModel.from_pretrained(base_model(base_dir), Path(job)).eval()


def reference_greedy(base_dir: Path, job: Job, prompts: list[list[int]], new: int
                     ) -> list[tuple[list[int], list[float]]]:
    """PEFT's greedy `new` tokens and their logprobs for each prompt (batch 1 each, one model)."""
    model = reference_model(base_dir, job)
    with torch.no_grad():
        return [greedy(model, p, new) for p in prompts]
