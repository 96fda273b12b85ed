from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modules.selectors.base import SELECTORS, Selector
from modules.vlm.base import VisionTokens


@SELECTORS.register("pool")
@dataclass
class PoolSelector(Selector):
    """Uniform spatial subsampling: the content-blind baseline that keeps n tokens spread evenly over the image.

    Not from a paper; it is the strided / pooled grid that spatial-pooling baselines use, made exact for any n.
    Inputs: `VisionTokens.grid` (h, w) and `valid` (B, N); `feats` only for its shape and device. Without a grid
    the N tokens are one row (h, w) = (1, N), so the rule below reduces to evenly spaced indices.

    Rule (our choice, per image):
      1. Take the bounding box (bh x bw tokens) of the valid tokens, so padding bands do not waste the budget.
      2. Lay a gh x gw lattice of equal cells over it, with gh / gw close to bh / bw and gh * gw >= n
         (gh = round(sqrt(n * bh / bw)) clipped to [1, bh], gw = ceil(n / gh) clipped to bw, gh raised if short).
         When gh * gw > n, keep n of the cells evenly spaced in raster order (cell floor((j + 1/2) * gh*gw / n)).
      3. Each cell's centre takes the nearest valid token not taken yet (Euclidean in grid units, cells in raster
         order, ties to the lower index). On a full rectangle this is the cell centre itself, e.g. a 24 x 24
         grid at n = 64 gives rows and columns 1, 4, ..., 22; valid regions that are not rectangles still get
         exactly n distinct valid tokens.
    When n exceeds the valid tokens, all valid ones are kept and the rest is spread over the padding by the same
    rule. Distances are exact integers, so CPU and GPU agree. No parameters.
    """

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        b, num = tokens.batch_size, tokens.num_tokens
        h, w = tokens.grid if tokens.grid is not None else (1, num)
        device = tokens.feats.device
        valid = tokens.valid_or_all().to(device=device, dtype=torch.bool)
        idx = torch.arange(num, device=device)
        rows, cols = idx // w, idx % w
        keep = torch.empty(b, n, dtype=torch.long, device=device)
        counts = valid.sum(dim=1).tolist()
        for i in range(b):
            n_valid = counts[i]
            if n <= n_valid:
                keep[i] = _spread(valid[i], n, rows, cols)
            else:
                rest = n - n_valid
                keep[i, :n_valid] = valid[i].nonzero().squeeze(1)
                keep[i, n_valid:] = _spread(~valid[i], rest, rows, cols)
        return keep


def _lattice(k: int, bh: int, bw: int) -> tuple[int, int]:
    """gh x gw cells with gh * gw >= k, aspect close to bh x bw; k <= bh * bw."""
    gh = min(bh, max(1, math.floor(math.sqrt(k * bh / bw) + 0.5)))
    gw = min(bw, -(-k // gh))
    if gh * gw < k:
        gh = min(bh, -(-k // gw))
    return gh, gw


def _spread(mask: torch.Tensor, k: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(k,) distinct indices of tokens in `mask` (N,) spread over its bounding box; needs k <= mask.sum()."""
    if k == 0:
        return rows.new_empty(0)
    member = mask.nonzero().squeeze(1)
    r0, r1 = int(rows[member].min()), int(rows[member].max())
    c0, c1 = int(cols[member].min()), int(cols[member].max())
    bh, bw = r1 - r0 + 1, c1 - c0 + 1
    gh, gw = _lattice(k, bh, bw)
    cells = gh * gw
    chosen = torch.tensor([(2 * j + 1) * cells // (2 * k) for j in range(k)], device=rows.device)
    ci, cj = chosen // gw, chosen % gw
    # Work in units of 1 / (2 gh gw) of a token so the cell centres are integers and ties are exact.
    target_r = (2 * gh * r0 + (2 * ci + 1) * bh - gh) * gw
    target_c = (2 * gw * c0 + (2 * cj + 1) * bw - gw) * gh
    dr = 2 * gh * gw * rows.unsqueeze(0) - target_r.unsqueeze(1)
    dc = 2 * gh * gw * cols.unsqueeze(0) - target_c.unsqueeze(1)
    # Exact int64 squared distances (no overflow below N ~ 39k tokens); argmin returns the first minimum,
    # which is the lower-index tie rule.
    big = torch.iinfo(torch.long).max
    key = (dr * dr + dc * dc).masked_fill(~mask.unsqueeze(0), big)
    nearest = key.argmin(dim=1)
    if nearest.unique().numel() == k:
        return nearest
    # Some centres share a nearest token (non-rectangular region): hand tokens out one cell at a time.
    taken = torch.zeros_like(mask)
    out = torch.empty(k, dtype=torch.long, device=rows.device)
    for j in range(k):
        out[j] = key[j].masked_fill(taken, big).argmin()
        taken[out[j]] = True
    return out
