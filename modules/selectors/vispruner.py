from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.budget import topk_keep
from modules.selectors.base import SELECTORS, Selector
from modules.vlm.base import VisionTokens


@SELECTORS.register("vispruner")
@dataclass
class VisPrunerSelector(Selector):
    """VisPruner: the most attended tokens plus a de-duplicated, diverse remainder.

    Paper: Q. Zhang, A. Cheng, M. Lu, Z. Zhuo, M. Wang, J. Cao, S. Guo, Q. She, S. Zhang, "Beyond Text-Visual
    Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (arXiv 2412.01818, ICCV 2025).
    Inputs: s = `VisionTokens.cls_attn` (B, N) and F = `VisionTokens.pre` (B, N, Dv), the pre-projector features
    of the vision feature layer; when `pre` is None we fall back to `feats` (B, N, D) (our choice, so towers
    without exposed pre-projector features still run). Cosines are computed in float32.

    Algorithm (METHODS.md): n_imp = floor(n * important_ratio), n_div = n - n_imp; important = the n_imp
    highest s (ties to the lower index); rest = the others in descending-s order. While |rest| > n_div:
    k = min(8, |rest| - n_div); a = rest[0::2], b = rest[1::2] (odd |rest| puts the extra token in a);
    m = each a token's max cosine to b; drop the k tokens of a with the largest m; rest = remaining a in
    descending-m order, then b. keep = important + rest.

    Our choices: `important_ratio` defaults to 0.5. When k exceeds |a| (small budgets) all of a is dropped, as
    the official slicing does; an empty b gives m = -inf. Ties in m keep the current order of rest (stable
    sort). n * ratio is floored with a 1e-9 slack so that e.g. 0.29 * 100 gives 29, not 28. Padding: the
    algorithm runs on the valid tokens only; if n >= #valid all valid tokens are kept and the rest is filled
    with the highest-s padding tokens.
    """

    reads_attention = True

    important_ratio: float = 0.5

    def __post_init__(self) -> None:
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be a number in [0, 1], got {r!r}")

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        if tokens.cls_attn is None:
            raise ValueError(
                "vispruner needs VisionTokens.cls_attn (the vision tower's [CLS] attention to each patch) for its "
                "important tokens, but it is None: the adapter must compute it in encode()"
            )
        device = tokens.feats.device
        scores = tokens.cls_attn.float().to(device)
        feats = tokens.pre if tokens.pre is not None else tokens.feats
        feats = F.normalize(feats.float().to(device), dim=-1)
        valid = tokens.valid_or_all().to(device=device, dtype=torch.bool)
        b = tokens.batch_size
        keep = torch.empty(b, n, dtype=torch.long, device=device)

        # Images with the same number of valid tokens run as one batch; without padding that is the whole batch.
        counts = valid.sum(dim=1)
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero().squeeze(1)
            if n >= count:
                keep[rows] = topk_keep(scores[rows], n, valid[rows])
                continue
            # (R, count) indices of the valid tokens, ascending, so the stable sorts below tie to the lower index
            local = valid[rows].nonzero()[:, 1].view(len(rows), count)
            chosen = self._keep_all_valid(scores[rows].gather(1, local), _gather_rows(feats[rows], local), n)
            keep[rows] = local.gather(1, chosen)
        return keep

    def _keep_all_valid(self, scores: torch.Tensor, feats: torch.Tensor, n: int) -> torch.Tensor:
        """(R, n) indices into the M tokens of scores (R, M) / unit feats (R, M, D), for n < M."""
        n_imp = math.floor(n * self.important_ratio + 1e-9)
        n_div = n - n_imp
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        important, rest = order[:, :n_imp], order[:, n_imp:]
        if rest.shape[1] <= n_div:
            return torch.cat([important, rest], dim=1)
        # One (R, M', M') cosine matrix over the candidates instead of a matmul per round: the rounds only
        # re-read entries of it, while a matmul per round would cost about |rest| / 96 times more.
        cand = _gather_rows(feats, rest)
        sim = cand @ cand.transpose(1, 2)
        rest_all, rest = rest, torch.arange(rest.shape[1], device=rest.device).expand(rest.shape[0], -1)
        rows = torch.arange(rest.shape[0], device=rest.device).view(-1, 1, 1)
        while rest.shape[1] > n_div:
            a, b = rest[:, 0::2], rest[:, 1::2]
            k = min(8, rest.shape[1] - n_div, a.shape[1])
            if b.shape[1] == 0:
                m = torch.full(a.shape, float("-inf"), device=a.device)
            else:
                m = sim[rows, a.unsqueeze(2), b.unsqueeze(1)].amax(dim=2)
            by_m = torch.sort(m, dim=1, descending=True, stable=True).indices
            rest = torch.cat([a.gather(1, by_m[:, k:]), b], dim=1)
        return torch.cat([important, rest_all.gather(1, rest)], dim=1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (R, M, D), index (R, K) -> (R, K, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
