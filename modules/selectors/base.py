"""Stage-1 selectors: keep n of the N visual tokens of each image, right after the vision encoder.

Write a selector by subclassing `ScoreSelector` and implementing `score` (higher = keep), or `Selector` and
implementing `keep` when the choice is not a top-k of independent scores (diversity, clustering). Register it
with `@SELECTORS.register("name")` so plans and YAML configs can name it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from modules.budget import resolve_budget, topk_keep
from modules.registry import Registry
from modules.vlm.base import VisionTokens

SELECTORS = Registry("stage-1 selector")


class Selector(ABC):
    """Picks which visual tokens survive stage 1. Subclasses implement `keep`."""

    name: str = "selector"
    reads_attention: bool = False  # reads VisionTokens.cls_attn (the adapter computes it only when some selector does)

    def needs_attention(self) -> bool:
        """Whether this selector (or the one it wraps) reads `VisionTokens.cls_attn`."""
        inner = getattr(self, "inner", None)
        return self.reads_attention or (isinstance(inner, Selector) and inner.needs_attention())

    def select(self, tokens: VisionTokens, n: int | float) -> torch.Tensor:
        """(B, n) indices into the N tokens, sorted ascending, never a padding token while valid ones remain."""
        n = resolve_budget(n, tokens.num_tokens, "n")
        keep = self.keep(tokens, n)
        if keep.shape != (tokens.batch_size, n):
            raise RuntimeError(f"{type(self).__name__}.keep returned shape {tuple(keep.shape)}, expected "
                               f"({tokens.batch_size}, {n})")
        return keep.sort(dim=-1).values

    @abstractmethod
    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        """(B, n) distinct indices of the kept tokens, for an already validated 1 <= n <= N."""


class ScoreSelector(Selector):
    """A selector that scores every token independently and keeps the top n. Subclasses implement `score`."""

    @abstractmethod
    def score(self, tokens: VisionTokens) -> torch.Tensor:
        """(B, N) importance scores, higher is kept first."""

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        return topk_keep(self.score(tokens), n, tokens.valid)


class Calibrated(ABC):
    """Mixin for components with values fitted on data (a trend, a dataset mean, a prior).

    `calibrate(...)` in `modules.calibrate` calls `start_calibration()`, then `observe(x)` on every batch (x is the
    `VisionTokens` of stage 1 or the `Stage2Context` of stage 2) and finally `finish_calibration()`, which
    (through `fit_calibration`) stores the fitted values in dataclass fields so they are saved with the plan.
    """

    def start_calibration(self) -> None:
        self._observations: list = []

    def observe(self, inputs) -> None:
        self._observations.append(self.statistic(inputs))

    @abstractmethod
    def statistic(self, inputs):
        """What to keep from one batch (detached, on CPU)."""

    def finish_calibration(self) -> None:
        observations, self._observations = self._observations, []
        if not observations:
            raise ValueError(f"{type(self).__name__}: calibration saw no batches")
        self.fit_calibration(observations)

    @abstractmethod
    def fit_calibration(self, observations: list) -> None:
        """Set the calibrated fields from the per-batch statistics."""


@dataclass
class TrainSelection:
    """What a trainable selector contributes to a training forward pass.

    keep:      (B, n) kept indices (all N in soft-mask mode).
    scale:     (B, n) multipliers for the kept features (value 1, gradient to the head), or None.
    key_bias:  (B, n) additive attention bias for the kept visual keys (log-probabilities), or None.
    aux_loss:  scalar regulariser (the budget term of soft masks), or None.
    log_prob:  (B,) log-probability of the sampled selection under the head's policy ("policy" mode), or None.
    """

    keep: torch.Tensor
    scale: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None


def get_selector(name: str, **params) -> Selector:
    """A registered stage-1 selector by name, e.g. `get_selector("vispruner", important_ratio=0.5)`."""
    return SELECTORS.build(name, **params)
