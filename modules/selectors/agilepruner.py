from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modules.selectors.base import SELECTORS, Calibrated, Selector
from modules.vlm.base import VisionTokens


def effective_rank(feats: torch.Tensor, center: bool = True) -> float:
    """erank(F) = exp(H(p)), p = sigma / sum(sigma) over the singular values of F (M, D), computed in float32.

    A matrix with no spread at all (one token, or identical tokens once centered) has erank 1 by convention:
    it carries a single direction at most, and a zero erank would make the complexity ratio meaningless.
    """
    feats = feats.float()
    if center:
        feats = feats - feats.mean(dim=0, keepdim=True)
    if feats.shape[0] == 0:
        return 1.0
    sigma = torch.linalg.svdvals(feats)
    total = sigma.sum()
    if not bool(total > 0):
        return 1.0
    p = sigma / total
    entropy = -torch.special.xlogy(p, p).sum()
    return float(torch.exp(entropy))


@SELECTORS.register("agilepruner")
@dataclass
class AgilePruner(Selector, Calibrated):
    """AgilePruner (Baek et al., "AgilePruner: An Empirical Study of Attention and Diversity for Adaptive Visual
    Token Pruning in Large Vision-Language Models", 2026): attention order with an image-adaptive diversity gate.

    Per image, over its valid tokens: complexity c = erank(F) / erank_avg, with erank(F) = exp(H(sigma / sum
    sigma)) of the (centered when `center`) post-projector features F. The tokens are visited in descending
    `cls_attn` order (ties: lower index); a candidate is skipped when its cosine distance to some already kept
    token is below tau = min(tau_max, c * tau0 * step), where step = (number of tokens kept so far) + 1, i.e. the
    1-based index of the slot being filled. The pass stops at n kept; if it ends short, the highest-attention
    remaining valid tokens fill the budget (then padding tokens, by attention, only when n exceeds the valid ones).
    Complex images (c > 1) are gated harder and so keep more diverse tokens; simple ones stay attention-driven.

    Our choices (the paper gives no code): tau0 = 0.01 and tau_max = 0.3 follow the project page; `step` as above;
    when uncalibrated (erank_avg None) the reference erank is 1.0 * sqrt(N), N = tokens per image; an image with
    no spread has erank 1. `calibrate(...)` sets erank_avg to the mean per-image erank of the calibration set.
    Shapes: VisionTokens.feats (B, N, D) and cls_attn (B, N) (required) -> keep (B, n).
    """

    tau0: float = 0.01
    tau_max: float = 0.3
    center: bool = True
    erank_avg: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau0) and self.tau0 >= 0):
            raise ValueError(f"AgilePruner tau0={self.tau0} must be a finite number >= 0")
        if not (math.isfinite(self.tau_max) and self.tau_max >= 0):
            raise ValueError(f"AgilePruner tau_max={self.tau_max} must be a finite number >= 0")
        if self.erank_avg is not None and not (math.isfinite(self.erank_avg) and self.erank_avg > 0):
            raise ValueError(f"AgilePruner erank_avg={self.erank_avg} must be a positive number or None")

    def reference_erank(self, num_tokens: int) -> float:
        return self.erank_avg if self.erank_avg is not None else math.sqrt(num_tokens)

    def image_eranks(self, tokens: VisionTokens) -> torch.Tensor:
        """(B,) erank of each image's valid tokens, on CPU."""
        valid = tokens.valid_or_all()
        return torch.tensor([effective_rank(tokens.feats[b][valid[b]], self.center)
                             for b in range(tokens.batch_size)], dtype=torch.float64)

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        """(B, N) the attention that orders the greedy pass (float32), so attention wrappers can read it."""
        if tokens.cls_attn is None:
            raise ValueError("AgilePruner needs VisionTokens.cls_attn (the vision tower's attention to each token)")
        return tokens.cls_attn.float()

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        return self.keep_from_scores(tokens, n, self.score(tokens))

    def keep_from_scores(self, tokens: VisionTokens, n: int, scores: torch.Tensor) -> torch.Tensor:
        """The greedy pass with another (B, N) attention order, e.g. a debiased one; (B, n) kept indices."""
        device = tokens.feats.device
        valid = tokens.valid_or_all()
        eranks = self.image_eranks(tokens)
        ref = self.reference_erank(tokens.num_tokens)
        rows = []
        for b in range(tokens.batch_size):
            attn = scores[b].float()
            order = torch.sort(attn, descending=True, stable=True).indices
            is_valid = valid[b][order]
            # valid tokens first, each group in descending attention: the fill order after the greedy pass
            order = order[torch.sort((~is_valid).to(torch.uint8), stable=True).indices]
            n_valid = int(valid[b].sum())
            candidates = order[:n_valid]
            kept = self._greedy(tokens.feats[b], candidates, n, float(eranks[b]) / ref)
            taken = torch.zeros(tokens.num_tokens, dtype=torch.bool)
            taken[kept] = True
            rest = [int(i) for i in order.tolist() if not taken[i]]
            rows.append(torch.tensor(kept + rest[: n - len(kept)], dtype=torch.long))
        return torch.stack(rows).to(device)

    def _greedy(self, feats: torch.Tensor, candidates: torch.Tensor, n: int, complexity: float) -> list[int]:
        if candidates.numel() == 0:
            return []
        unit = torch.nn.functional.normalize(feats[candidates].float(), dim=-1)
        # the pass is inherently sequential; run it on CPU so each step's comparison costs no device sync
        dist = (1.0 - unit @ unit.T).clamp(min=0.0).cpu()
        nearest = torch.full((candidates.numel(),), float("inf"))
        kept: list[int] = []
        for j in range(candidates.numel()):
            if len(kept) == n:
                break
            tau = min(self.tau_max, complexity * self.tau0 * (len(kept) + 1))
            if float(nearest[j]) < tau:
                continue
            kept.append(j)
            nearest = torch.minimum(nearest, dist[j])
        return candidates[kept].tolist()

    # ---- calibration -------------------------------------------------------------------------------------------
    def statistic(self, tokens: VisionTokens) -> torch.Tensor:
        return self.image_eranks(tokens)

    def fit_calibration(self, observations: list) -> None:
        self.erank_avg = float(torch.cat([torch.as_tensor(o).flatten() for o in observations]).double().mean())
