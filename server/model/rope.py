"""Rotary position embeddings (HF `rotate_half` layout): default, linear, Llama 3, YaRN, and
dynamic NTK / LongRoPE within the pretrained length; partial rotary dims (Phi-3 / Phi-4 style)."""

from __future__ import annotations

import math

import torch

from server.model.arch import RopeConfig, UnsupportedModelError


def inv_frequencies(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:
    """[rotary_dim/2] float32 inverse frequencies, scaled as the config says."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are stretched by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1's published recipe).
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if rope.rope_type == "yarn":
        return _yarn(rope, rotary_dim)
    if rope.rope_type == "longrope":  # the short factors: positions within the original length only
        if len(rope.short_factor) != rotary_dim // 2:
            raise UnsupportedModelError(f"longrope short_factor has {len(rope.short_factor)} entries; "
                                        f"the rotary dim needs {rotary_dim // 2}")
        shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (torch.tensor(rope.short_factor, dtype=torch.float32) * rope.theta ** shape)
    return inv_freq


def _yarn(rope: RopeConfig, dim: int) -> torch.Tensor:
    """YaRN: interpolate (divide by `factor`) the low frequencies, keep the high ones, ramp between
    the dims that rotate `beta_slow` and `beta_fast` times over the original context."""
    base = rope.theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class RotaryEmbedding:
    """Precomputed cos / signed-sin tables; `apply` rotates q and k in place.

    With `sin_signed = cat(-sin, sin)` and `rot = cat(x2, x1)`, the HF formula
    `x*cos + rotate_half(x)*sin` becomes `x.mul_(cos).addcmul_(rot, sin_signed)`:
    three ops per layer instead of eight. Only the first `rotary_dim` dims of a head rotate.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device):
        if rope.max_exact_positions is not None and max_positions > rope.max_exact_positions:
            # Past this point transformers re-derives the frequencies from each batch's length (and
            # recomputes its cache), which a paged cache of already-rotated keys cannot reproduce.
            raise UnsupportedModelError(
                f"{rope.rope_type} RoPE scaling is served up to {rope.max_exact_positions} positions only; "
                f"max_model_len {max_positions} is longer: pass --max-model-len {rope.max_exact_positions}")
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        inv_freq = inv_frequencies(rope, self.rotary_dim)
        pos = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(pos, inv_freq)  # [P, R/2] fp32, as HF computes it
        cos, sin = freqs.cos() * rope.attention_factor, freqs.sin() * rope.attention_factor
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype=dtype, device=device)
        self.sin_signed = torch.cat((-sin, sin), dim=-1).to(dtype=dtype, device=device)
        self.half = self.rotary_dim // 2
        self.partial = self.rotary_dim != head_dim

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin_signed), each [T, 1, R]; computed once per step."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
        """x [T, heads, D] rotated in place (its first R dims)."""
        if self.partial:
            x = x[..., : self.rotary_dim]
        rot = torch.cat((x[..., self.half:], x[..., : self.half]), dim=-1)
        x.mul_(cos).addcmul_(rot, sin_signed)
