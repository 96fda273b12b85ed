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
    # singular values from the eigenvalues of the smaller Gram matrix: ~15x faster than an SVD on CPU
    gram = feats @ feats.T if feats.shape[0] <= feats.shape[1] else feats.T @ feats
    sigma = torch.linalg.eigvalsh(gram.double()).clamp(min=0).sqrt()
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

    Per image, over its valid tokens: complexity c = erank(F) / (the reference erank, below), with
    erank(F) = exp(H(sigma / sum sigma)) of the (centered when `center`) post-projector features F. The tokens are
    visited in descending `cls_attn` order (ties: lower index); a candidate is skipped when its cosine distance to
    some already kept token is below tau = min(tau_max, c * tau0 * step), where step = (number of tokens kept so
    far) + 1, i.e. the 1-based index of the slot being filled. The pass stops at n kept; if it ends short, the
    highest-attention remaining valid tokens fill the budget (then padding tokens, by attention, only when n
    exceeds the valid ones).
    Complex images (c > 1) are gated harder and so keep more diverse tokens; simple ones stay attention-driven.

    Our choices (the paper gives no code): tau0 = 0.01 and tau_max = 0.3 follow the project page; `step` as above;
    an image with no spread has erank 1. The reference erank of an image of N tokens is erank_scale * sqrt(N)
    (uncalibrated: erank_scale None, i.e. 1.0 * sqrt(N), METHODS.md's default). Storage is resolution-free
    because the erank of N tokens grows with N (it is at most N): a dataset mean fitted at one resolution would
    call every image of a smaller one simple. So `calibrate(...)` fits erank_scale = the mean over calibration
    images of erank_i / sqrt(N_i), each image with its own N_i (batches of different N mix freely), and the
    reference follows each image's N; at a single resolution c is exactly erank / (dataset mean erank). That the
    reference grows as sqrt(N) between resolutions is an assumption (the form of METHODS.md's default), not a
    measured law.
    `erank_avg`, when set, is a fixed reference erank used at every N instead (what plans saved before
    erank_scale hold; they still load and select as before): calibrating replaces it by erank_scale.
    Shapes: VisionTokens.feats (B, N, D) and cls_attn (B, N) (required) -> keep (B, n).
    """

    reads_attention = True

    tau0: float = 0.01
    tau_max: float = 0.3
    center: bool = True
    erank_avg: float | None = None
    erank_scale: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau0) and self.tau0 >= 0):
            raise ValueError(f"AgilePruner tau0={self.tau0} must be a finite number >= 0")
        if not (math.isfinite(self.tau_max) and self.tau_max >= 0):
            raise ValueError(f"AgilePruner tau_max={self.tau_max} must be a finite number >= 0")
        if self.erank_avg is not None and not (math.isfinite(self.erank_avg) and self.erank_avg > 0):
            raise ValueError(f"AgilePruner erank_avg={self.erank_avg} must be a positive number or None")
        if self.erank_scale is not None and not (math.isfinite(self.erank_scale) and self.erank_scale > 0):
            raise ValueError(f"AgilePruner erank_scale={self.erank_scale} must be a positive number or None")

    def reference_erank(self, num_tokens: int) -> float:
        """The erank an image of `num_tokens` tokens is compared with (complexity 1)."""
        if self.erank_avg is not None:
            return self.erank_avg
        return (self.erank_scale if self.erank_scale is not None else 1.0) * math.sqrt(num_tokens)

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
        """The greedy pass with another (B, N) attention order, e.g. a debiased one; (B, n) kept indices.

        The pass is sequential over candidates but runs for the whole batch at once: one (B, N) update per step.
        """
        valid = tokens.valid_or_all()
        device = tokens.feats.device
        complexity = (self.image_eranks(tokens) / self.reference_erank(tokens.num_tokens)).float().to(device)
        order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
        # valid tokens first, each group in descending attention: the candidate order and the fill order
        order = order.gather(1, torch.sort((~valid).gather(1, order).to(torch.uint8), dim=-1, stable=True).indices)
        candidate_valid = valid.gather(1, order)
        unit = torch.nn.functional.normalize(tokens.feats.float(), dim=-1)
        unit = unit.gather(1, order.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        dist = (1.0 - unit @ unit.transpose(1, 2)).clamp(min=0.0)  # (B, N, N) in candidate order
        nearest = torch.full(order.shape, float("inf"), device=device)
        kept = torch.zeros(order.shape[0], device=device)
        accepted = torch.zeros(order.shape, dtype=torch.bool, device=device)
        for j in range(order.shape[1]):
            tau = (complexity * self.tau0 * (kept + 1)).clamp(max=self.tau_max)
            take = candidate_valid[:, j] & (kept < n) & (nearest[:, j] >= tau)
            accepted[:, j] = take
            kept += take
            nearest = torch.where(take.unsqueeze(1), torch.minimum(nearest, dist[:, j]), nearest)
            if bool((kept >= n).all()):
                break
        # the pass's picks first, then the remaining candidates in order fill the budget
        fill = torch.sort((~accepted).to(torch.uint8), dim=-1, stable=True).indices
        return order.gather(1, fill)[:, :n]

    # ---- calibration -------------------------------------------------------------------------------------------
    def statistic(self, tokens: VisionTokens) -> torch.Tensor:
        """(B,) erank_i / sqrt(N) of each image of the call (one N per call)."""
        return self.image_eranks(tokens) / math.sqrt(tokens.num_tokens)

    def fit_calibration(self, observations: list) -> None:
        self.erank_scale = float(torch.cat([torch.as_tensor(o).flatten() for o in observations]).double().mean())
        self.erank_avg = None
