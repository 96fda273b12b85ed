from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.selectors.base import SELECTORS, ScoreSelector
from modules.vlm.base import VisionTokens


@SELECTORS.register("fastervlm")
@dataclass
class FasterVLMSelector(ScoreSelector):
    """FasterVLM: keep the n tokens the vision tower's [CLS] query attends to most.

    Paper: Q. Zhang, A. Cheng, M. Lu, et al., "[CLS] Attention is All You Need for Training-Free Visual Token
    Pruning: Make VLM Inference Faster" (arXiv 2412.01818 v1, 2024; the later versions of that report became
    VisPruner). The score is `VisionTokens.cls_attn` (B, N): the [CLS] query's attention to each patch in the
    vision feature layer, mean over heads (the mean query for towers without [CLS]); the adapter computes it.
    Output: top-n of the scores, ties to the lower index, padding ranked after every valid token (`topk_keep`).
    No parameters: everything is fixed by the paper.
    """

    reads_attention = True

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        attn = tokens.cls_attn
        if attn is None:
            raise ValueError(
                "fastervlm needs VisionTokens.cls_attn (the vision tower's [CLS] attention to each patch), but it "
                "is None: the adapter must compute it in encode()"
            )
        if attn.dim() != 2:
            raise ValueError(f"fastervlm expects cls_attn of shape (B, N), got {tuple(attn.shape)}")
        # float32 so bf16 rounding cannot merge distinct scores into ties
        return attn.float()
