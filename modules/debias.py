"""Attention debiasing (Zhao et al., "Attention Debiasing for Token Pruning in Vision Language Models").

Two biases make raw attention a poor importance score: padding tokens act as attention sinks, and attention grows
with position (recency). This module holds the arithmetic (trend fit, debiased scores); the wrappers that use it
live beside the methods they wrap (`modules.selectors.debiased`, `modules.scorers.debiased`, which also holds the
`Debiased(inner)` factory) and import it, never the other way round. Which tokens are padding is the model
adapter's business (`modules.vlm`: it depends on the processor) and arrives as `VisionTokens.valid`.

Positions are RELATIVE: a token's index i among the N_i tokens of its own image, divided by N_i, so u = i / N_i
lies in [0, 1) whatever the image's resolution. A trend A * exp(rate * u) fitted on images of one size then
applies to images of any other size (VLMs such as Qwen2.5-VL give every image its own N_i), and a rate is the
per-token slope b of the paper's A * exp(b * i) times N: rate = b * N at a single resolution.
"""

from __future__ import annotations

import torch


def fit_exponential_trend(scores: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Fit t(i) = A * exp(b * i) to the mean score at position i; returns b (per position index).

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


def relative_positions(index: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    """u = index / N (float32), each token's position relative to its own image's N tokens.

    index: (B, M) index of each token among its image's tokens; num_tokens: N, an int or a (B, M) tensor (a
    column's own N_i). Columns with N_i = 0 (stage 2's filler columns, which belong to no image) get u = 0, so
    nothing downstream divides by zero.
    """
    num = torch.as_tensor(num_tokens, device=index.device)
    return torch.where(num > 0, index.float() / num.clamp(min=1).float(), torch.zeros((), device=index.device))


def position_sums(scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None,
                  num_tokens: torch.Tensor | int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The calibration statistic of a positional trend: {N: ((N,) sum, (N,) count) of the valid scores at each
    index i of images with N tokens}, float64 on CPU (CPU sums: CUDA's index_add_ would be nondeterministic).

    scores, index, valid: (B, M); num_tokens: an int N or the (B, M) N_i of each column's image. Keyed by N so
    batches of different resolutions add up, and each resolution keeps its own level (see `fit_relative_trend`).
    """
    scores, index = scores.detach().double().cpu(), index.cpu()
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.detach().cpu().bool()
    num = torch.as_tensor(num_tokens).cpu().expand_as(index)
    out = {}
    for n in num[valid].unique().tolist():
        take = valid & (num == n)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, index[take], scores[take])
        out[int(n)] = (sums, torch.bincount(index[take], minlength=n).double())
    return out


def merge_position_sums(observations: list[dict]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Add up `position_sums` statistics of several batches, resolution by resolution."""
    total: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for obs in observations:
        for n, (sums, counts) in obs.items():
            if n in total:
                total[n] = (total[n][0] + sums, total[n][1] + counts)
            else:
                total[n] = (sums.clone(), counts.clone())
    return total


def fit_relative_trend(stats: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fit log(mean score at u) = log(A_N) + rate * u over every resolution N seen; returns the shared rate.

    stats: `position_sums` (merged). Each resolution has its own intercept A_N (attention over N tokens is ~1/N
    per token, so levels differ between resolutions) and all share one rate over the relative position u = i / N:
    least squares with x and y centred within each resolution. With a single resolution this is exactly N times
    `fit_exponential_trend`'s per-index slope. Positions with no valid, positive mean are left out.
    """
    sxy = sxx = 0.0
    used = 0
    for n, (sums, counts) in sorted(stats.items()):
        mean = sums.double() / counts.double().clamp(min=1)
        use = (counts > 0) & (mean > 0)
        if int(use.sum()) < 2:
            used += int(use.sum())
            continue
        u = torch.arange(n, dtype=torch.float64)[use] / n
        y = mean[use].log()
        uc, yc = u - u.mean(), y - y.mean()
        sxy += float((uc * yc).sum())
        sxx += float((uc * uc).sum())
        used += int(use.sum())
    if not sxx > 0:
        raise ValueError(f"cannot fit a positional trend: no image size has 2 positions with a valid, positive mean "
                         f"score ({used} position(s) over sizes {sorted(stats)})")
    return sxy / sxx


def fit_trend_per_image(scores: torch.Tensor, positions: torch.Tensor, image: torch.Tensor,
                        valid: torch.Tensor | None) -> torch.Tensor:
    """(B, M) rate of each column's image, fitted on that image's own scores alone (`fit="sample"`).

    scores: (B, M); positions: (B, M) relative positions u; image: (B, M) long, the image of its row each column
    belongs to (-1: none, rate 0); valid: (B, M) bool or None. Least squares of log(score) on u over the image's
    valid, positive scores; 0 (no correction) for an image with fewer than two of them, where no trend can be seen.
    """
    scores, positions = scores.detach().double(), positions.double()
    usable = scores > 0
    if valid is not None:
        usable &= valid.bool()
    rates = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    for row in range(scores.shape[0]):
        for img in image[row][image[row] >= 0].unique().tolist():
            cols = image[row] == img
            take = cols & usable[row]
            if int(take.sum()) < 2:
                continue
            u, y = positions[row, take], scores[row, take].log()
            uc = u - u.mean()
            if not bool((uc * uc).sum() > 0):
                continue
            rates[row, cols] = float((uc * (y - y.mean())).sum() / (uc * uc).sum())
    return rates


def debias_scores(
    scores: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    b: float | torch.Tensor | None,
    padding: bool = True,
) -> torch.Tensor:
    """Divide out the positional trend exp(b * position) and zero the padding tokens.

    scores, positions, valid: (B, M); positions in the unit `b` is a slope over (relative positions u for a rate,
    token indices for a per-token slope). b: a float, a (B,) tensor (one per row), a (B, M) tensor (one per
    column, e.g. per image) or None (no positional correction). Invalid entries come out as exactly 0.
    """
    out = scores.float()
    if b is not None:
        b = torch.as_tensor(b, dtype=torch.float32, device=out.device)
        b = b.view(-1, 1) if b.dim() == 1 else b
        # subtracting the row's max exponent keeps exp() finite without changing any ranking within the row
        exponent = b * positions.float()
        out = out * torch.exp(-(exponent - exponent.amax(dim=-1, keepdim=True)))
    if padding and valid is not None:
        # where, not a product: a non-finite score on a filler column must not leak through as NaN
        out = torch.where(valid.bool(), out, torch.zeros((), device=out.device))
    return out
