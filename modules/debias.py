"""Attention debiasing (Zhao et al., "Attention Debiasing for Token Pruning in Vision Language Models").

Two biases make raw attention a poor importance score: padding tokens act as attention sinks, and attention grows
with position (recency). This module holds the arithmetic (trend fit, debiased scores); the wrappers that use it
live beside the methods they wrap (`modules.selectors.debiased`, `modules.scorers.debiased`, which also holds the
`Debiased(inner)` factory) and import it, never the other way round. Which tokens are padding is the model
adapter's business (`modules.vlm`: it depends on the processor) and arrives as `VisionTokens.valid`.
"""

from __future__ import annotations

import torch


def fit_exponential_trend(scores: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Fit t(i) = A * exp(b * i) to the mean score at position i; returns b.

    scores: (B, N) or (N,) non-negative scores (attention); valid: same shape, bool, False entries are ignored.
    Least squares on log(mean score) over positions with at least one valid, positive observation.
    """
    scores = scores.detach().float()
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    valid = valid.to(scores.device).view_as(scores).bool()
    counts = valid.sum(dim=0)
    mean = (scores * valid).sum(dim=0) / counts.clamp(min=1)
    use = (counts > 0) & (mean > 0)
    if int(use.sum()) < 2:
        raise ValueError(f"cannot fit a positional trend: only {int(use.sum())} position(s) have a valid, positive "
                         "mean score (need at least 2)")
    i = torch.arange(scores.shape[1], dtype=torch.float64, device=scores.device)[use]
    y = mean[use].double().log()
    ic, yc = i - i.mean(), y - y.mean()
    return float((ic * yc).sum() / (ic * ic).sum())


def debias_scores(
    scores: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    b: float | torch.Tensor | None,
    padding: bool = True,
) -> torch.Tensor:
    """Divide out the positional trend exp(b * i) and zero the padding tokens.

    scores, positions (index of each token among the visual tokens), valid: (B, M). b: a float, a (B,) tensor
    (per-sample fits) or None (no positional correction).
    """
    out = scores.float()
    if b is not None:
        b = torch.as_tensor(b, dtype=torch.float32, device=out.device)
        b = b.view(-1, 1) if b.dim() == 1 else b
        # subtracting the max exponent keeps exp() finite for long sequences without changing the ranking
        exponent = b * positions.float()
        out = out * torch.exp(-(exponent - exponent.amax(dim=-1, keepdim=True)))
    if padding and valid is not None:
        out = out * valid.to(out.dtype)
    return out


def fit_trend_per_sample(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B,) slopes, each fitted on one row's own scores (`fit="sample"`); 0 (no correction) for a row with fewer
    than two valid positive scores, where no trend can be seen."""
    slopes = []
    for row in range(scores.shape[0]):
        n = int(positions[row].max()) + 1
        dense = torch.zeros(n, device=scores.device)
        mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
        dense[positions[row]] = scores[row].float()
        mask[positions[row]] = True if valid is None else valid[row]
        try:
            slopes.append(fit_exponential_trend(dense, mask))
        except ValueError:
            slopes.append(0.0)
    return torch.tensor(slopes, device=scores.device)
