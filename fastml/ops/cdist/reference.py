"""Pure-PyTorch pairwise distances: the oracle, torch.cdist without its matrix-product shortcut
(coordinate differences, exact to rounding). x1 (B, P, M), x2 (B, R, M) contiguous → (B, P, R)."""

from __future__ import annotations

import torch


def forward(x1, x2, p):
    return torch.cdist(x1, x2, p, compute_mode="donot_use_mm_for_euclid_dist")
