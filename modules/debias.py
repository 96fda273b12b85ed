"""Attention debiasing (Zhao et al., "Attention Debiasing for Token Pruning in Vision Language Models").

Two biases make raw attention a poor importance score: padding tokens act as attention sinks, and attention grows
with position (recency). This module holds the geometry that tells padding from image content; the score
wrappers that use it live beside the scorers.
"""

from __future__ import annotations

import torch


def _covered_fraction(start: float, length: float, patch: float, count: int) -> torch.Tensor:
    """Fraction of each of `count` patches of size `patch` along one axis that lies inside [start, start+length)."""
    lo = torch.arange(count, dtype=torch.float64) * patch
    overlap = (torch.minimum(lo + patch, torch.tensor(start + length)) - torch.maximum(lo, torch.tensor(start)))
    return overlap.clamp(min=0) / patch


def pad_to_square_valid_mask(
    width: int, height: int, grid: int = 24, image_size: int = 336, threshold: float = 0.5
) -> torch.Tensor:
    """Which patches of a pad-to-square image show the image (True) rather than the padding (False).

    LLaVA-1.5 pads a (width, height) image to a centred square of side max(width, height), resizes it to
    `image_size` and cuts a `grid` x `grid` patch grid. A patch is padding when more than `threshold` of its area
    lies outside the original image. Returns a (grid * grid,) bool tensor in row-major order.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"pad threshold must be in [0, 1), got {threshold}")
    side = max(width, height)
    scale = image_size / side
    patch = image_size / grid
    # the processor centres the image with integer offsets, in source pixels
    top = (side - height) // 2 if width > height else 0
    left = (side - width) // 2 if height > width else 0
    fy = _covered_fraction(top * scale, height * scale, patch, grid)
    fx = _covered_fraction(left * scale, width * scale, patch, grid)
    inside = fy[:, None] * fx[None, :]
    return (1.0 - inside <= threshold).flatten()
