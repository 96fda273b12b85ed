from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.selectors.base import SELECTORS, Selector
from modules.vlm.base import VisionTokens


@SELECTORS.register("divprune")
@dataclass
class DivPruneSelector(Selector):
    """DivPrune: keep a max-min diverse subset of the post-projector features.

    Paper: S. R. Alvar, G. Singh, M. Akbari, Y. Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models" (CVPR 2025). Distance d(i, j) = 1 - cos(F_i, F_j) on `VisionTokens.feats` (B, N, D),
    computed in float32. The first pick is the token whose nearest other token is farthest
    (argmax_i min_{j != i} d(i, j)); each next pick is the unpicked token farthest from the picked set
    (argmax of min distance to it). Ties go to the lower index.

    Our choices: while valid tokens remain only they are candidates, and the first pick's nearest neighbour is
    taken among valid tokens only, so padding does not shape the choice; once every valid token is kept, padding
    is picked by the same rule (distance to everything picked so far). An all-padding image is treated as all
    valid. Zero feature vectors count as cosine 0 to everything. The (B, N, N) distance matrix is built once.
    No parameters.
    """

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        feats = F.normalize(tokens.feats.float(), dim=-1)
        b, num = feats.shape[:2]
        device = feats.device
        dist = 1.0 - feats @ feats.transpose(1, 2)  # (B, N, N)
        valid = tokens.valid_or_all().to(device=device, dtype=torch.bool)
        valid = valid | ~valid.any(dim=1, keepdim=True)
        rows = torch.arange(b, device=device)
        inf = torch.tensor(float("inf"), device=device)

        # A token alone among the valid ones has no neighbour: its nearest distance is +inf, so it goes first.
        pair = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(num, dtype=torch.bool, device=device)
        nearest = dist.masked_fill(~pair, inf).amin(dim=2).masked_fill(~valid, -inf)
        first = nearest.argmax(dim=1)

        keep = torch.empty(b, n, dtype=torch.long, device=device)
        keep[:, 0] = first
        picked = torch.zeros(b, num, dtype=torch.bool, device=device)
        picked[rows, first] = True
        min_dist = dist[rows, first]  # (B, N): distance of each token to the picked set
        for t in range(1, n):
            valid_left = (valid & ~picked).any(dim=1, keepdim=True)
            allowed = ~picked & (valid | ~valid_left)
            nxt = min_dist.masked_fill(~allowed, -inf).argmax(dim=1)
            keep[:, t] = nxt
            picked[rows, nxt] = True
            min_dist = torch.minimum(min_dist, dist[rows, nxt])
        return keep
