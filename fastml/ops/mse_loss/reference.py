"""Pure-PyTorch squared error: the oracle. input and target are contiguous, equally shaped."""

from __future__ import annotations


def forward(input, target, reduction, keep_diff):
    """→ (loss, diff): loss 0-dim ("mean" / "sum") or input-shaped ("none"); diff = input - target
    when ``keep_diff``, else None."""
    diff = input - target
    sq = diff.square()
    loss = sq if reduction == "none" else (sq.mean() if reduction == "mean" else sq.sum())
    return loss, (diff if keep_diff else None)


def backward(diff, grad, scale):
    """d loss / d input = scale * diff * grad, grad 0-dim or diff-shaped."""
    return diff * (grad * scale)
