from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.selectors.base import SELECTORS, Selector
from modules.vlm.base import VisionTokens


def check_cluster_params(owner: str, n_clusters: int | None, iters: int, seed: int) -> None:
    if n_clusters is not None and (isinstance(n_clusters, bool) or not isinstance(n_clusters, int)
                                   or n_clusters < 1):
        raise ValueError(f"{owner} n_clusters={n_clusters!r} must be a positive int or None (budget // 4)")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{owner} iters={iters!r} must be a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{owner} seed={seed!r} must be an int")


def default_clusters(budget: int) -> int:
    return max(1, budget // 4)


def cosine_kmeans(unit: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of unit rows (M, D): ((M,) cluster of each row, (k', D) unit centroids), k' <= k.

    k-means++ seeding with weights 1 - cos to the nearest chosen centre (the squared Euclidean distance on the unit
    sphere, up to a factor 2), drawn from a CPU generator seeded with `seed` so the result does not depend on the
    device. Seeding stops early when every row already coincides with a centre (duplicates). Lloyd steps assign
    each row to its most similar centroid (ties: lower cluster) and stop when assignments no longer change; an
    emptied cluster keeps its previous centroid.
    """
    m = unit.shape[0]
    k = max(1, min(k, m))
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(m, (1,), generator=gen))
    chosen = [first]
    nearest = (1.0 - unit @ unit[first]).clamp(min=0.0).cpu().double()
    while len(chosen) < k:
        if not bool(nearest.sum() > 0):
            break
        pick = int(torch.multinomial(nearest, 1, generator=gen))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (1.0 - unit @ unit[pick]).clamp(min=0.0).cpu().double())
    centroids = unit[chosen]
    assign = None
    for _ in range(iters):
        new_assign = torch.argmax(unit @ centroids.T, dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        # a one-hot matmul rather than index_add_, whose CUDA atomics would make the sums nondeterministic
        members = torch.nn.functional.one_hot(assign, centroids.shape[0]).T.to(unit.dtype)
        sums = members @ unit
        counts = members.sum(dim=1)
        norms = sums.norm(dim=-1, keepdim=True)
        # an emptied cluster (or one whose members cancel out) keeps its centroid rather than becoming NaN
        ok = (counts > 0).unsqueeze(-1) & (norms > 0)
        centroids = torch.where(ok, sums / norms.clamp(min=1e-12), centroids)
    # one final assignment so the returned labels match the returned centroids
    assign = torch.argmax(unit @ centroids.T, dim=1)
    return assign, centroids


def allocate(sizes: list[int], budget: int) -> list[int]:
    """Share `budget` across clusters of the given sizes in proportion to size, at least one per non-empty cluster.

    When the budget is below the number of non-empty clusters, the largest clusters get one each (ties: lower
    cluster). Otherwise every non-empty cluster gets one and the rest follows the quotas budget * size / total by
    largest remainder, so a cluster ends as close to its exact share as the minimum of one allows (ties: lower
    cluster; never more than its size).
    """
    total = sum(sizes)
    budget = min(budget, total)
    alloc = [0] * len(sizes)
    nonempty = [c for c, s in enumerate(sizes) if s > 0]
    if budget < len(nonempty):
        for c in sorted(nonempty, key=lambda c: (-sizes[c], c))[:budget]:
            alloc[c] = 1
        return alloc
    for c in nonempty:
        alloc[c] = 1
    left = budget - len(nonempty)
    need = [max(0.0, budget * s / total - 1.0) for s in sizes]
    need_total = sum(need)
    if left > 0 and need_total > 0:
        shares = [left * e / need_total for e in need]
        for c, share in enumerate(shares):
            alloc[c] += min(int(share), sizes[c] - alloc[c])
        remainders = sorted(range(len(sizes)), key=lambda c: (-(shares[c] - int(shares[c])), c))
        left = budget - sum(alloc)
        for c in remainders:
            if left == 0:
                break
            if alloc[c] < sizes[c]:
                alloc[c] += 1
                left -= 1
    # anything still unplaced (capacity caps) goes to the clusters with room, largest first
    left = budget - sum(alloc)
    for c in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        extra = min(left, sizes[c] - alloc[c])
        alloc[c] += extra
        left -= extra
    return alloc


def cluster_allocate(feats: torch.Tensor, budget: int, rank_scores: torch.Tensor | None = None,
                     n_clusters: int | None = None, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """FinePruner's clustered budget: (M,) ascending indices of the `min(budget, M)` kept rows of feats (M, D).

    Cosine k-means (`cosine_kmeans`) into `n_clusters` clusters (None: budget // 4, at least 1; capped at M), the
    budget shared by `allocate`, and within each cluster the rows with the highest `rank_scores` (M,) kept, or,
    without scores, the rows closest to the centroid (ties: lower index). Computed in float32 on feats' device.
    """
    m = feats.shape[0]
    device = feats.device
    budget = min(budget, m)
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if budget == m:
        return torch.arange(m, device=device)
    k = n_clusters if n_clusters is not None else default_clusters(budget)
    unit = torch.nn.functional.normalize(feats.float(), dim=-1)
    assign, centroids = cosine_kmeans(unit, k, iters, seed)
    if rank_scores is None:
        rank = (unit * centroids[assign]).sum(dim=-1)  # cosine to own centroid: closest first
    else:
        rank = rank_scores.float().to(device)
    sizes = torch.bincount(assign, minlength=centroids.shape[0]).tolist()
    alloc = allocate(sizes, budget)
    # rank every row within its cluster: sort by score (stable, so ties keep the lower index), then by cluster
    order = torch.sort(rank, descending=True, stable=True).indices
    order = order[torch.sort(assign[order], stable=True).indices]
    starts = torch.cumsum(torch.tensor([0] + sizes[:-1]), dim=0).tolist()
    picked = [order[start:start + a] for start, a in zip(starts, alloc) if a > 0]
    return torch.cat(picked).sort().values


@SELECTORS.register("finepruner")
@dataclass
class FinePrunerSelector(Selector):
    """FinePruner stage A, instruction-agnostic clustering (Wang et al., "FinePruner: unbiased fine-grained token
    reduction", IEEE TIP 2026): cluster the visual tokens by embedding, keep a size-proportional share of each.

    Per image, over its valid tokens: cosine k-means (k-means++ seeding from a CPU generator seeded with `seed`,
    at most `iters` Lloyd iterations) of the post-projector features into `n_clusters` clusters; the budget n is
    shared across clusters in proportion to their size (largest remainder, at least one per non-empty cluster
    while the budget lasts), and each cluster keeps its tokens closest to its centroid. If n covers every valid
    token, all valid tokens are kept, then padding tokens by lower index.

    Our choices (paper text only, no code): n_clusters default n // 4 (at least 1), iters 20, seed 0; the seed is
    re-applied for every image, so an image's selection does not depend on its batch. The clustering and
    allocation live in `cluster_allocate`, reused by the stage-2 FinePruner scorer with its head scores as ranking.
    Shapes: VisionTokens.feats (B, N, D) -> keep (B, n).
    """

    n_clusters: int | None = None
    iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        check_cluster_params("FinePrunerSelector", self.n_clusters, self.iters, self.seed)

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        device = tokens.feats.device
        valid = tokens.valid_or_all()
        rows = []
        for b in range(tokens.batch_size):
            valid_idx = valid[b].nonzero().flatten()
            kept = valid_idx[cluster_allocate(tokens.feats[b][valid_idx], n, None, self.n_clusters, self.iters,
                                              self.seed)]
            padding = (~valid[b]).nonzero().flatten()
            rows.append(torch.cat([kept, padding[: n - kept.numel()]]))
        return torch.stack(rows).to(device)
