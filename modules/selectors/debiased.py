from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from modules.budget import topk_keep
from modules.debias import debias_scores, fit_exponential_trend, fit_trend_per_sample
from modules.selectors.base import SELECTORS, Calibrated, ScoreSelector
from modules.vlm.base import VisionTokens

FIT_MODES = ("dataset", "sample")


@dataclass
class DebiasCore(Calibrated):
    """Shared by the stage-1 and stage-2 wrappers: Attention Debiasing (Zhao et al., 2025).

    Padding suppression: s_i = 0 for padding tokens. Positional debiasing: s_i / exp(b * i), with i the index of
    the token among the visual tokens and b the slope of an exponential trend A * exp(b * i) fitted to the mean
    raw score per position: on a calibration set (`fit="dataset"`, the default, via `calibrate`) or on each
    sample (`fit="sample"`). An uncalibrated `fit="dataset"` wrapper falls back to per-sample fits (warned once).
    Subclasses set the default `inner` and the `registry` that names it.
    """

    inner: Any = None
    padding: bool = True
    positional: bool = True
    fit: str = "dataset"
    b: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inner, (str, dict)):
            spec = {"name": self.inner} if isinstance(self.inner, str) else dict(self.inner)
            self.inner = self.registry.build(spec.pop("name"), **spec)
        if self.fit not in FIT_MODES:
            raise ValueError(f"Debiased fit={self.fit!r}; use one of {FIT_MODES}")
        if not hasattr(self.inner, "score"):
            raise ValueError(f"Debiased needs an attention-based inner method with score(), got {self.inner!r}")

    def _slope(self, raw: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None):
        if not self.positional:
            return None
        if self.fit == "dataset" and self.b is not None:
            return self.b
        if self.fit == "dataset" and not getattr(self, "_warned", False):
            warnings.warn(f"{type(self).__name__}(fit='dataset') is not calibrated: fitting the trend per sample; "
                          "run modules.calibrate.calibrate(...) on training data", stacklevel=3)
            self._warned = True
        return fit_trend_per_sample(raw, positions, valid)

    def _debias(self, raw, positions, valid) -> torch.Tensor:
        return debias_scores(raw, positions, valid, self._slope(raw, positions, valid), padding=self.padding)

    # calibration: accumulate the mean raw score per visual position, fit b on it
    def _statistic(self, raw, positions, valid, n_positions: int):
        raw, positions = raw.detach().float().cpu(), positions.cpu()
        valid = torch.ones_like(raw, dtype=torch.bool) if valid is None else valid.cpu().bool()
        sums = torch.zeros(n_positions).index_add_(0, positions[valid], raw[valid])
        counts = torch.zeros(n_positions).index_add_(0, positions[valid], torch.ones(int(valid.sum())))
        return sums, counts

    def fit_calibration(self, observations: list) -> None:
        n = max(s.shape[0] for s, _ in observations)
        sums, counts = torch.zeros(n), torch.zeros(n)
        for s, c in observations:
            sums[: s.shape[0]] += s
            counts[: c.shape[0]] += c
        mean = sums / counts.clamp(min=1)
        self.b = fit_exponential_trend(mean, counts > 0)


@SELECTORS.register("debiased")
@dataclass
class DebiasedSelector(DebiasCore, ScoreSelector):
    """A stage-1 attention-based selector (default: FasterVLM's CLS attention) with attention debiasing.

    inner: the wrapped ScoreSelector (name, {"name": ...} mapping or instance). Shapes: VisionTokens (B, N)
    scores -> (B, N) debiased scores; positions are the token indices 0..N-1. Methods whose selection is more
    than a top-k of their score (AgilePruner's diversity gate) expose `keep_from_scores(tokens, n, scores)`:
    the debiased scores then drive that selection instead of replacing it.
    """

    inner: Any = "fastervlm"
    registry = SELECTORS

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        raw = self.inner.score(tokens)
        return self._debias(raw, self._positions(tokens), tokens.valid)

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        scores = self.score(tokens)
        if hasattr(self.inner, "keep_from_scores"):
            return self.inner.keep_from_scores(tokens, n, scores)
        return topk_keep(scores, n, tokens.valid)

    def statistic(self, tokens: VisionTokens):
        return self._statistic(self.inner.score(tokens), self._positions(tokens), tokens.valid, tokens.num_tokens)

    @staticmethod
    def _positions(tokens: VisionTokens) -> torch.Tensor:
        return torch.arange(tokens.num_tokens, device=tokens.feats.device).expand(tokens.batch_size, -1)
