"""Rotary position embeddings (HF `rotate_half` layout), with linear and Llama-3 scaling."""

from __future__ import annotations

import math

import torch

from server.model.arch import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, scaled as the config says."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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
    return inv_freq


class RotaryEmbedding:
    """Precomputed cos / signed-sin tables; `apply` rotates q and k in place.

    With `sin_signed = cat(-sin, sin)` and `rot = cat(x2, x1)`, the HF formula
    `x*cos + rotate_half(x)*sin` becomes `x.mul_(cos).addcmul_(rot, sin_signed)`:
    three ops per layer instead of eight.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device):
        inv_freq = inv_frequencies(rope, head_dim)
        pos = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(pos, inv_freq)  # [P, D/2] fp32, as HF computes it
        cos, sin = freqs.cos(), freqs.sin()
        self.cos = torch.cat((cos, cos), dim=-1).to(dtype=dtype, device=device)
        self.sin_signed = torch.cat((-sin, sin), dim=-1).to(dtype=dtype, device=device)
        self.half = head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin_signed), each [T, 1, D]; computed once per step."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
        """x [T, heads, D] rotated in place."""
        rot = torch.cat((x[..., self.half:], x[..., : self.half]), dim=-1)
        x.mul_(cos).addcmul_(rot, sin_signed)
