from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.scorers.base import QUERY_MODES, SCORERS, Scorer, Stage2Context


@SCORERS.register("fastv")
@dataclass
class FastVScorer(Scorer):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", 2024): text-to-vision attention.

    The attention that the query rows of layer K-1 pay to each visual key, mean over heads (GQA keys expanded).
    query="last" (default) uses the prompt's last token; "text" averages every text token after the image.
    Shapes: Stage2Context with M visual tokens -> scores (B, M).
    """

    query: str = "last"

    def __post_init__(self) -> None:
        if self.query not in QUERY_MODES:
            raise ValueError(f"FastVScorer query={self.query!r}; use one of {QUERY_MODES}")

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        return ctx.text_to_vision(self.query)
