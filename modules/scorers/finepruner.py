from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modules.config import as_tensor_or_none
from modules.scorers.base import QUERY_MODES, SCORERS, Scorer, Stage2Context
from modules.selectors.base import Calibrated
from modules.selectors.finepruner import check_cluster_params, cluster_allocate

_EPS = 1e-12


@SCORERS.register("finepruner")
@dataclass
class FinePrunerScorer(Scorer, Calibrated):
    """FinePruner stage B, attention-refined pruning (Wang et al., "FinePruner: unbiased fine-grained token
    reduction", IEEE TIP 2026): score with the attention heads least like the position-only prior.

    Per image and head h, a_h = the query rows' attention restricted to that image's visual keys
    (`ctx.head_attention(query, over="vision")`: weighted mean over query rows, renormalised over the image's columns,
    so filler columns and the row's other images do not count). The positional prior pi is indexed by ORIGINAL
    position in the image's own (h, w) grid (`ctx.vision_index`, `ctx.vision_grid`): the calibrated `prior`
    resampled to that grid (see below) when set, else, per grid size in the batch, the mean of the head-mean
    distribution over the batch's images holding each position; it is restricted to the image's current tokens
    and renormalised. Bias of head h on an image = KL(a_h || pi); the `n_heads` heads with the largest divergence
    (ties: lower head) are averaged into s (B, M), each image choosing its own heads. Filler columns score 0.

    With `cluster` (stage A combined), each image's valid tokens are clustered by `ctx.vision_hidden` (cosine
    k-means, as the stage-1 FinePruner selector) and THAT image's budget (`ctx.image_columns()`) is shared across
    clusters in proportion to their size, ranking within a cluster by s; the returned scores are
    s + 1 + (max s - min s) of the image for the allocated tokens and s for the others, so the top-budget tokens of
    every image are exactly its allocation (padding tokens are never allocated while valid ones remain).
    `combine(ctx, s)` applies this to any s (a wrapper's).

    The prior is stored resolution-free, as a function on the unit square: `prior` is a (gh, gw) grid of cell
    masses (sum 1), each cell covering 1/gh x 1/gw of the image. An image with an (h, w) token grid gets the
    prior's density averaged over each of its tokens' cells (exact area weights, `resample_prior`), so a prior
    calibrated on 24x24 images serves 16x23 or 8x10 ones, and a prior that is constant in relative position stays
    constant at every size. Tokens without a grid are a (1, N) strip. Calibration accumulates per grid size and
    stores the mean of the per-size densities, weighted by tokens seen, on the grid (max h seen, max w seen; strips
    count only when every image was one): with a single size that is the per-position mean itself. Plans saved
    with a 1-D prior of N values load as an (s, s) grid when N = s * s, else as (1, N).

    Our choices (paper text only, no code): n_heads 8 (capped at H), query "last", cluster True, and the
    clustering parameters n_clusters (None: the image's budget // 4), iters 20, seed 0 shared with stage A; the
    calibrated prior is the per-position mean of the head-mean distribution, positions never seen filled with the
    mean of the seen ones of their grid size, normalised to sum 1.
    Shapes: Stage2Context with H heads and M visual tokens -> scores (B, M); prior (gh, gw).
    """

    n_heads: int = 8
    query: str = "last"
    cluster: bool = True
    prior: torch.Tensor | None = None
    n_clusters: int | None = None
    iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_heads, bool) or not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise ValueError(f"FinePrunerScorer n_heads={self.n_heads!r} must be a positive int")
        if self.query not in QUERY_MODES:
            raise ValueError(f"FinePrunerScorer query={self.query!r}; use one of {QUERY_MODES}")
        check_cluster_params("FinePrunerScorer", self.n_clusters, self.iters, self.seed)
        self.prior = as_tensor_or_none(self.prior)
        if self.prior is not None:
            prior = self.prior.float()
            if prior.dim() == 1:  # a plan saved before priors were grids: N values in raster order
                prior = prior.view(legacy_grid(prior.numel()))
            if prior.dim() != 2 or prior.numel() == 0 or not bool(torch.isfinite(prior).all()) \
                    or bool((prior < 0).any()) or not bool(prior.sum() > 0):
                raise ValueError(f"FinePrunerScorer prior must be a non-negative (gh, gw) grid (or an older plan's "
                                 f"1-D tensor) with a positive sum, got shape {tuple(self.prior.shape)}: "
                                 f"{self.prior}")
            self.prior = prior

    def head_attention(self, ctx: Stage2Context) -> torch.Tensor:
        """(B, H, M) per-head attention over each image's visual tokens (sums to 1 per image), float32; 0 on
        filler columns."""
        heads = ctx.head_attention(self.query, over="vision")
        member = _members(ctx)
        heads = heads * member.sum(dim=-1).unsqueeze(1)  # zero the filler columns
        per_image = heads @ member  # (B, H, images)
        return heads / (per_image @ member.transpose(1, 2)).clamp(min=_EPS)

    def row_prior(self, ctx: Stage2Context, heads: torch.Tensor) -> torch.Tensor:
        """(B, M) the positional prior at each image's tokens, restricted to them and renormalised per image."""
        index, real = ctx.vision_index, ctx.vision_image >= 0
        num = ctx.num_tokens()
        outside = real & ((index < 0) | (index >= num))
        if bool(outside.any()):
            bad = outside.nonzero()[0].tolist()
            raise ValueError(f"FinePrunerScorer: vision_index {int(index[bad[0], bad[1]])} at column {bad} is not a "
                             f"position of its image's grid {ctx.vision_grid[bad[0], bad[1]].tolist()}")
        pi = torch.zeros(index.shape, dtype=torch.float32, device=heads.device)
        mean_head = heads.mean(dim=1)
        for grid in _grids(ctx):
            cols = real & (ctx.vision_grid == torch.tensor(grid, device=index.device)).all(dim=-1)
            if self.prior is not None:
                table = resample_prior(self.prior, grid).flatten().to(heads.device, torch.float32)
            else:  # uncalibrated: the batch's own mean per position, among the images of this grid size
                sums, counts = _position_sums(mean_head[cols], index[cols], grid[0] * grid[1])
                table = (sums / counts.clamp(min=1)).to(heads.device, torch.float32)
            pi[cols] = table[index[cols]]
        member = _members(ctx)
        return pi / ((pi.unsqueeze(1) @ member) @ member.transpose(1, 2)).squeeze(1).clamp(min=_EPS)

    def head_scores(self, ctx: Stage2Context) -> torch.Tensor:
        """(B, M) per image, the mean attention of its `n_heads` heads most divergent from the positional prior."""
        heads = self.head_attention(ctx)
        pi = self.row_prior(ctx, heads).unsqueeze(1)
        member = _members(ctx)
        terms = torch.special.xlogy(heads, heads) - torch.special.xlogy(heads, pi.clamp(min=_EPS))
        kl = terms @ member  # (B, H, images)
        top = min(self.n_heads, heads.shape[1])
        chosen = torch.sort(kl, dim=1, descending=True, stable=True).indices[:, :top]  # (B, top, images)
        picked = torch.zeros_like(kl).scatter_(1, chosen, 1.0)  # (B, H, images): 1 for each image's chosen heads
        return (heads * (picked @ member.transpose(1, 2))).sum(dim=1) / top

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        return self.combine(ctx, self.head_scores(ctx))

    def combine(self, ctx: Stage2Context, s: torch.Tensor) -> torch.Tensor:
        """Stage A on top of (B, M) token scores s (stage B's, or a debiased version of them), image by image."""
        if not self.cluster:
            return s
        out = s.clone()
        for row, _, columns, budget in ctx.image_columns():  # each image has its own tokens and its own budget
            valid_idx = columns[ctx.vision_valid[row, columns].bool()]
            picked = cluster_allocate(ctx.vision_hidden[row][valid_idx], budget, s[row][valid_idx],
                                      self.n_clusters, self.iters, self.seed)
            # lift the allocation above every other score of the image, whatever the range of s (a debiased
            # s is not in [0, 1])
            out[row, valid_idx[picked]] += 1.0 + (s[row, columns].max() - s[row, columns].min())
        return out

    # ---- calibration -------------------------------------------------------------------------------------------
    def statistic(self, ctx: Stage2Context) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """Per grid size (h, w) seen: ((h*w,) sum, (h*w,) count) of the head-mean attention per position, float64
        on CPU."""
        mean_head = self.head_attention(ctx).mean(dim=1)
        real = ctx.vision_image >= 0
        out = {}
        for grid in _grids(ctx):
            cols = real & (ctx.vision_grid == torch.tensor(grid, device=real.device)).all(dim=-1)
            out[grid] = _position_sums(mean_head[cols], ctx.vision_index[cols], grid[0] * grid[1])
        return out

    def fit_calibration(self, observations: list) -> None:
        merged: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for obs in observations:
            for grid, (sums, counts) in obs.items():
                old = merged.get(grid)
                merged[grid] = (sums, counts) if old is None else (old[0] + sums, old[1] + counts)
        if not merged:
            raise ValueError("FinePrunerScorer: calibration saw no visual tokens")
        # strips (h = 1: tokens without a grid) set the width only when nothing else was seen: their N is no
        # spatial resolution, and a 2-D prior as wide as the longest strip would be mostly interpolation
        shaped = [g for g in merged if g[0] > 1] or list(merged)
        target = (max(g[0] for g in shaped), max(g[1] for g in shaped))
        total = torch.zeros(target, dtype=torch.float64)
        weight = 0.0
        for grid, (total_g, count_g) in sorted(merged.items()):
            seen = count_g > 0
            mean = torch.where(seen, total_g / count_g.clamp(min=1), (total_g[seen] / count_g[seen]).mean())
            # as a density on the unit square, resampled to the common grid; sizes weighted by their tokens seen
            total += resample_prior(mean.view(grid), target) * float(count_g.sum())
            weight += float(count_g.sum())
        self.prior = (total / total.sum()).float()


def legacy_grid(n: int) -> tuple[int, int]:
    """The grid of an older plan's 1-D prior of n positions: (s, s) when n = s * s, else a (1, n) strip."""
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def area_weights(src: int, dst: int) -> torch.Tensor:
    """(dst, src) float64: the share of each destination cell of [0, 1) covered by each source cell.

    With the unit interval cut into src * dst units, source cell j is [j * dst, (j + 1) * dst) and destination
    cell i is [i * src, (i + 1) * src): integer overlaps, so the weights are exact and src == dst gives the
    identity. Each row sums to 1.
    """
    i = torch.arange(dst, dtype=torch.int64).view(-1, 1)
    j = torch.arange(src, dtype=torch.int64).view(1, -1)
    lo = torch.maximum(i * src, j * dst)
    hi = torch.minimum((i + 1) * src, (j + 1) * dst)
    return (hi - lo).clamp(min=0).double() / src


def resample_prior(prior: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (gh, gw) grid of masses over the unit square -> (h, w) masses summing to 1 over another grid.

    The prior is read as a density, constant on each of its cells; each new cell gets the mean density over its
    area (separable exact area weights, `area_weights`), then the grid is renormalised. Float64 on CPU.
    """
    prior = prior.detach().double().cpu()
    h, w = grid
    gh, gw = prior.shape
    if (gh, gw) == (h, w):
        out = prior
    else:
        out = area_weights(gh, h) @ prior @ area_weights(gw, w).T
    return out / out.sum().clamp(min=_EPS)


def _members(ctx: Stage2Context) -> torch.Tensor:
    """(B, M, images) float32 one-hot of each column's image (all zero for filler columns).

    Per-image sums are matmuls with it rather than scatter_add, whose CUDA atomics would make them
    nondeterministic."""
    image = ctx.vision_image.long()
    member = torch.nn.functional.one_hot(image.clamp(min=0), max(ctx.images, 1)).float()
    return member * (image >= 0).unsqueeze(-1).float()


def _grids(ctx: Stage2Context) -> list[tuple[int, int]]:
    """The distinct (h, w) grids of the images of the context, in ascending order."""
    grids = ctx.vision_grid[ctx.vision_image >= 0].view(-1, 2)
    return [tuple(g) for g in torch.unique(grids, dim=0).tolist()]


def _position_sums(values: torch.Tensor, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter values into bins by original position: ((n,) sums, (n,) counts), float64 on CPU.

    Summed on CPU: CUDA's index_add_ uses atomics, which would make the prior nondeterministic.
    """
    flat = index.flatten().cpu()
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, flat, values.flatten().double().cpu())
    counts = torch.bincount(flat, minlength=n).double()
    return sums, counts
