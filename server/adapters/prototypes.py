"""Arrow routing prototypes: the top right singular vector of each module's delta B @ A.

PEFT (ArrowLoraLinearLayer.top_right_singular_vec_from_BA) approximates it by 15 power
iterations from a random start; here it is exact and costs O(r^2 (out + in)) per module,
never forming the [out, in] delta: with B = Q_B R_B (reduced QR, Q_B orthonormal columns),
B @ A = Q_B (R_B @ A), so B @ A and the [r, in] matrix R_B @ A share their right singular
vectors. Computed in float64 (small matrices), returned in float32.
"""

from __future__ import annotations

import torch


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[in] float32 unit vector v maximizing ||b @ a @ v|| for a [r, in], b [out, r].

    The sign of a singular vector is arbitrary (routing uses |x . v|); it is fixed here so
    that the largest-magnitude component is positive, for reproducible pools. A zero delta
    has no direction: the zero vector is returned, as PEFT's power iteration gives (its
    logit is then 0 for every token)."""
    _, r_b = torch.linalg.qr(b.to(torch.float64), mode="reduced")
    small = r_b @ a.to(torch.float64)  # [r, in]: the same right singular vectors as b @ a
    _, s, vh = torch.linalg.svd(small, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros(a.shape[1], dtype=torch.float32)
    v = vh[0]
    if v[v.abs().argmax()] < 0:
        v = -v
    return v.to(torch.float32).contiguous()
