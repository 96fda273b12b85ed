from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from modules.budget import topk_keep
from modules.debias import (
    debias_scores,
    fit_relative_trend,
    fit_trend_per_image,
    merge_position_sums,
    position_sums,
    relative_positions,
)
from modules.selectors.base import SELECTORS, Calibrated, ScoreSelector
from modules.vlm.base import VisionTokens

FIT_MODES = ("dataset", "sample")


@dataclass
class DebiasCore(Calibrated):
    """Shared by the stage-1 and stage-2 wrappers: Attention Debiasing (Zhao et al., 2025).

    Padding suppression: s_i = 0 for padding tokens. Positional debiasing: s_i / exp(rate * u_i), with
    u_i = i / N_i the RELATIVE position of the token among the N_i tokens of its own image and `rate` the slope of
    an exponential trend A * exp(rate * u) fitted to the mean raw score per position: on a calibration set
    (`fit="dataset"`, the default, via `calibrate`) or on each image alone (`fit="sample"`). An uncalibrated
    `fit="dataset"` wrapper falls back to per-image fits (warned once). Subclasses set the default `inner` and
    the `registry` that names it.

    Our choice of storage: the paper's per-token slope b (t(i) = A exp(b i)) only means something at the N it was
    fitted on; images of other resolutions (Qwen2.5-VL: every image its own N_i and grid) need a slope that does
    not depend on N, so the calibrated value is `rate`, a slope over u in [0, 1), which is b * N at a single
    resolution (`modules.debias.fit_relative_trend`: one rate shared by all sizes seen, each size with its own
    level A_N). Consequence: an image with 4x the tokens gets the same total correction from its first token to
    its last, spread over 4x the positions. `b` (per token, applied as exp(-b * i) with i the index among the
    image's tokens) is what plans saved before `rate` existed hold: they still load and select as before;
    calibrating replaces it with `rate`. Setting both is an error.
    """

    inner: Any = None
    padding: bool = True
    positional: bool = True
    fit: str = "dataset"
    rate: float | None = None
    b: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inner, (str, dict)):
            spec = {"name": self.inner} if isinstance(self.inner, str) else dict(self.inner)
            self.inner = self.registry.build(spec.pop("name"), **spec)
        if self.fit not in FIT_MODES:
            raise ValueError(f"Debiased fit={self.fit!r}; use one of {FIT_MODES}")
        if not hasattr(self.inner, "score"):
            raise ValueError(f"Debiased needs an attention-based inner method with score(), got {self.inner!r}")
        for field_name in ("rate", "b"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"Debiased {field_name}={value!r} must be a finite number or None")
        if self.rate is not None and self.b is not None:
            raise ValueError(f"Debiased rate={self.rate} (per relative position) and b={self.b} (the per-token "
                             "slope of older plans) are both set; keep one (rate = b * N at the N b was fitted on)")

    def _debias(self, raw: torch.Tensor, index: torch.Tensor, num_tokens: torch.Tensor | int,
                image: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """raw, index (each token's index among its image's tokens), image (-1: no image), valid: (B, M);
        num_tokens: N, or the (B, M) N_i of each column's image."""
        if not self.positional:
            return debias_scores(raw, index, valid, None, padding=self.padding)
        if self.fit == "dataset" and self.rate is not None:
            return debias_scores(raw, relative_positions(index, num_tokens), valid, self.rate, padding=self.padding)
        if self.fit == "dataset" and self.b is not None:  # an older plan's per-token slope
            return debias_scores(raw, index, valid, self.b, padding=self.padding)
        if self.fit == "dataset" and not getattr(self, "_warned", False):
            warnings.warn(f"{type(self).__name__}(fit='dataset') is not calibrated: fitting the trend per image; "
                          "run modules.calibrate.calibrate(...) on training data", stacklevel=3)
            self._warned = True
        positions = relative_positions(index, num_tokens)
        rates = fit_trend_per_image(raw, positions, image, valid)
        return debias_scores(raw, positions, valid, rates, padding=self.padding)

    # calibration: accumulate the mean raw score per position and resolution, fit one rate on them
    def fit_calibration(self, observations: list) -> None:
        self.rate = fit_relative_trend(merge_position_sums(observations))
        self.b = None


@SELECTORS.register("debiased")
@dataclass
class DebiasedSelector(DebiasCore, ScoreSelector):
    """A stage-1 attention-based selector (default: FasterVLM's CLS attention) with attention debiasing.

    inner: the wrapped ScoreSelector (name, {"name": ...} mapping or instance). Shapes: VisionTokens (B, N)
    scores -> (B, N) debiased scores; relative positions are i / N, i = 0..N-1, with the N of the call (calls
    may come with different N: a plan calibrated at one resolution serves any other). Methods whose selection
    is more than a top-k of their score (AgilePruner's diversity gate) expose `keep_from_scores(tokens, n,
    scores)`: the debiased scores then drive that selection instead of replacing it.
    """

    inner: Any = "fastervlm"
    registry = SELECTORS

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        raw = self.inner.score(tokens)
        index = self._index(tokens)
        return self._debias(raw, index, tokens.num_tokens, torch.zeros_like(index), tokens.valid)

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        scores = self.score(tokens)
        if hasattr(self.inner, "keep_from_scores"):
            return self.inner.keep_from_scores(tokens, n, scores)
        return topk_keep(scores, n, tokens.valid)

    def statistic(self, tokens: VisionTokens):
        return position_sums(self.inner.score(tokens), self._index(tokens), tokens.valid, tokens.num_tokens)

    @staticmethod
    def _index(tokens: VisionTokens) -> torch.Tensor:
        """(B, N) each token's index in its image: every call holds images of one size N (the engine groups a
        batch by geometry), so this is 0..N-1 and the relative position is index / N."""
        return torch.arange(tokens.num_tokens, device=tokens.feats.device).expand(tokens.batch_size, -1)
