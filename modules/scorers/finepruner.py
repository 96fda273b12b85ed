from __future__ import annotations

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

    Per head h, a_h = the query rows' attention restricted to the M visual keys (`ctx.attention(query,
    over="vision")`, weighted mean over query rows). The positional prior pi is indexed by ORIGINAL visual
    position (`ctx.vision_index`): the calibrated `prior` (N,) when set, else the mean of the head-mean
    distribution over the batch rows holding each position; it is restricted to the row's current tokens and
    renormalised. Bias of head h = KL(a_h || pi); the `n_heads` heads with the largest divergence (ties: lower
    head) are averaged into s (B, M) in [0, 1].

    With `cluster` (stage A combined), the row's valid tokens are clustered by `ctx.vision_hidden` (cosine
    k-means, as the stage-1 FinePruner selector) and `ctx.budget` is shared across clusters in proportion to
    their size, ranking within a cluster by s; the returned scores are s + 1 + (max s - min s) of the row for the
    allocated tokens and s for the others, so the top-`ctx.budget` tokens are exactly that allocation (padding
    tokens are never allocated while valid ones remain). `combine(ctx, s)` applies this to any s (a wrapper's).

    Our choices (paper text only, no code): n_heads 8 (capped at H), query "last", cluster True, and the
    clustering parameters n_clusters (None: budget // 4), iters 20, seed 0 shared with stage A; the prior from
    calibration is the per-position mean of the head-mean distribution, N taken as the largest vision_index seen
    + 1, positions never seen filled with the mean of the seen ones, normalised to sum 1.
    Shapes: Stage2Context with H heads and M visual tokens -> scores (B, M).
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
            self.prior = self.prior.float()
            if self.prior.dim() != 1 or not bool(torch.isfinite(self.prior).all()) \
                    or bool((self.prior < 0).any()) or not bool(self.prior.sum() > 0):
                raise ValueError(f"FinePrunerScorer prior must be a 1-D non-negative tensor with a positive sum, "
                                 f"got shape {tuple(self.prior.shape)}: {self.prior}")

    def head_attention(self, ctx: Stage2Context) -> torch.Tensor:
        """(B, H, M) per-head attention over the visual tokens, float32."""
        probs, weight = ctx.attention(self.query, over="vision")
        return (probs.float() * weight.float()[:, None, :, None]).sum(dim=2)

    def row_prior(self, ctx: Stage2Context, heads: torch.Tensor) -> torch.Tensor:
        """(B, M) the positional prior restricted to each row's tokens and renormalised."""
        index = ctx.vision_index
        if self.prior is not None:
            if int(index.max()) >= self.prior.numel():
                raise ValueError(f"FinePrunerScorer prior covers {self.prior.numel()} visual positions but the "
                                 f"context has vision_index up to {int(index.max())}; recalibrate for this model")
            pi = self.prior.to(heads.device)[index]
        else:
            sums, counts = _position_sums(heads.mean(dim=1), index)
            pi = (sums / counts.clamp(min=1))[index]
        return pi / pi.sum(dim=-1, keepdim=True).clamp(min=_EPS)

    def head_scores(self, ctx: Stage2Context) -> torch.Tensor:
        """(B, M) mean attention of the `n_heads` heads most divergent from the positional prior."""
        heads = self.head_attention(ctx)
        pi = self.row_prior(ctx, heads).unsqueeze(1)
        kl = (torch.special.xlogy(heads, heads) - torch.special.xlogy(heads, pi.clamp(min=_EPS))).sum(dim=-1)
        top = min(self.n_heads, heads.shape[1])
        chosen = torch.sort(kl, dim=-1, descending=True, stable=True).indices[:, :top]
        return heads.gather(1, chosen.unsqueeze(-1).expand(-1, -1, heads.shape[-1])).mean(dim=1)

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        return self.combine(ctx, self.head_scores(ctx))

    def combine(self, ctx: Stage2Context, s: torch.Tensor) -> torch.Tensor:
        """Stage A on top of (B, M) token scores s in [0, 1] (stage B's, or a debiased version of them)."""
        if not self.cluster:
            return s
        out = s.clone()
        for b in range(s.shape[0]):
            for block in ctx.image_blocks():  # the budget is per image: cluster each image's tokens apart
                valid_idx = ctx.vision_valid[b, block].nonzero().flatten() + block.start
                picked = cluster_allocate(ctx.vision_hidden[b][valid_idx], ctx.budget, s[b][valid_idx],
                                          self.n_clusters, self.iters, self.seed)
                # lift the allocation above every other score of the image, whatever the range of s (a debiased
                # s is not in [0, 1])
                out[b, valid_idx[picked]] += 1.0 + (s[b, block].max() - s[b, block].min())
        return out

    # ---- calibration -------------------------------------------------------------------------------------------
    def statistic(self, ctx: Stage2Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Per original position: (sum, count) of the head-mean attention, float64 on CPU."""
        sums, counts = _position_sums(self.head_attention(ctx).mean(dim=1), ctx.vision_index)
        return sums.double().cpu(), counts.double().cpu()

    def fit_calibration(self, observations: list) -> None:
        n = max(int(sums.numel()) for sums, _ in observations)
        total = torch.zeros(n, dtype=torch.float64)
        count = torch.zeros(n, dtype=torch.float64)
        for sums, counts in observations:
            total[: sums.numel()] += sums
            count[: counts.numel()] += counts
        seen = count > 0
        mean = torch.where(seen, total / count.clamp(min=1), (total[seen] / count[seen]).mean())
        self.prior = (mean / mean.sum()).float()


def _position_sums(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter (B, M) values into bins by original position: ((N,) sums, (N,) counts), N = index.max() + 1.

    Summed in float64 on CPU: CUDA's index_add_ uses atomics, which would make the prior nondeterministic.
    """
    n = int(index.max()) + 1
    flat = index.flatten().cpu()
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, flat, values.flatten().double().cpu())
    counts = torch.bincount(flat, minlength=n).double()
    return sums.to(values.device, values.dtype), counts.to(values.device, values.dtype)
