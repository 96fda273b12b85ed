from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.selectors.base import SELECTORS, ScoreSelector
from modules.vlm.base import VisionTokens


@SELECTORS.register("random")
@dataclass
class RandomSelector(ScoreSelector):
    """Uniformly random token subset: the floor every pruning method must beat.

    The scores are drawn once per call from `seed` and shared by every image of the batch, so a sample keeps
    the same tokens whichever batch it is in (padding still never kept while valid tokens remain).
    Shapes: VisionTokens.feats (B, N, D) -> scores (B, N).
    """

    seed: int = 0

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(tokens.num_tokens, generator=gen)
        return noise.to(tokens.feats.device).expand(tokens.batch_size, -1)
