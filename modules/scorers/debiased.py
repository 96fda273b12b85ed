from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modules.scorers.base import SCORERS, Scorer, Stage2Context
from modules.selectors.base import Selector
from modules.selectors.debiased import DebiasCore, DebiasedSelector


@SCORERS.register("debiased")
@dataclass
class DebiasedScorer(DebiasCore, Scorer):
    """A stage-2 text-to-vision attention scorer (default: FastV) with attention debiasing (Zhao et al., 2025).

    inner: the wrapped Scorer (name, {"name": ...} mapping or instance). Shapes: Stage2Context with M visual
    tokens -> (B, M) debiased scores; positions are the tokens' indices among the N visual tokens
    (ctx.vision_index), so the trend is fitted in the geometry of the full image whatever stage 1 kept.
    Scorers that post-process an attention score (FinePruner's cluster allocation) expose `head_scores(ctx)` and
    `combine(ctx, scores)`: the attention part is debiased, then combined as the method would.
    """

    inner: Any = "fastv"
    registry = SCORERS

    def _raw(self, ctx: Stage2Context) -> torch.Tensor:
        return self.inner.head_scores(ctx) if hasattr(self.inner, "head_scores") else self.inner.score(ctx)

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        scores = self._debias(self._raw(ctx), ctx.vision_index, ctx.vision_valid)
        return self.inner.combine(ctx, scores) if hasattr(self.inner, "combine") else scores

    def statistic(self, ctx: Stage2Context):
        n_positions = int(ctx.vision_index.max()) + 1
        return self._statistic(self._raw(ctx), ctx.vision_index, ctx.vision_valid, n_positions)


def Debiased(inner, padding: bool = True, positional: bool = True, **params):  # noqa: N802 - reads as a type
    """Wrap an attention-based stage-1 selector or stage-2 scorer with padding and positional debiasing.

    Returns a `DebiasedSelector` for a stage-1 selector with a `score` method, a `DebiasedScorer` for a stage-2
    `Scorer`.
    """
    # any stage-1 method with an attention score qualifies (AgilePruner keeps its own selection through it)
    if isinstance(inner, Selector) and hasattr(inner, "score"):
        return DebiasedSelector(inner=inner, padding=padding, positional=positional, **params)
    if isinstance(inner, Scorer):
        return DebiasedScorer(inner=inner, padding=padding, positional=positional, **params)
    raise ValueError(f"Debiased wraps a stage-1 selector with an attention score or a stage-2 Scorer, got {inner!r}")
