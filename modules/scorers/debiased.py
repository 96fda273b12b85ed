from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modules.debias import position_sums
from modules.scorers.base import SCORERS, Scorer, Stage2Context
from modules.selectors.base import Selector
from modules.selectors.debiased import DebiasCore, DebiasedSelector


@SCORERS.register("debiased")
@dataclass
class DebiasedScorer(DebiasCore, Scorer):
    """A stage-2 text-to-vision attention scorer (default: FastV) with attention debiasing (Zhao et al., 2025).

    inner: the wrapped Scorer (name, {"name": ...} mapping or instance). Shapes: Stage2Context with M visual
    tokens -> (B, M) debiased scores; a token's relative position is its index among the N_i tokens of its own
    image over that N_i (ctx.vision_index / ctx.num_tokens()), so the trend lives in the geometry of the full
    image whatever stage 1 kept, and images of different sizes in one row each get their own positions (and,
    with fit="sample", their own fitted rate). Filler columns score 0 (with padding suppression, the default).
    Scorers that post-process an attention score (FinePruner's cluster allocation) expose `head_scores(ctx)` and
    `combine(ctx, scores)`: the attention part is debiased, then combined as the method would.
    """

    inner: Any = "fastv"
    registry = SCORERS

    def _raw(self, ctx: Stage2Context) -> torch.Tensor:
        return self.inner.head_scores(ctx) if hasattr(self.inner, "head_scores") else self.inner.score(ctx)

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        scores = self._debias(self._raw(ctx), ctx.vision_index, ctx.num_tokens(), ctx.vision_image, _real(ctx))
        return self.inner.combine(ctx, scores) if hasattr(self.inner, "combine") else scores

    def statistic(self, ctx: Stage2Context):
        return position_sums(self._raw(ctx), ctx.vision_index, _real(ctx), ctx.num_tokens())


def _real(ctx: Stage2Context) -> torch.Tensor:
    """(B, M) valid tokens of an image: filler columns are never valid, even if a context forgot to say so."""
    return ctx.vision_valid.bool() & (ctx.vision_image >= 0)


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
