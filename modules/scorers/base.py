"""Stage-2 scorers: rank the surviving visual tokens inside the language model, at decoder layer K.

A scorer receives a `Stage2Context` and returns one score per visual token (higher = keep). The context gives
text-to-vision attention rows recomputed from layer K-1's own q/k projections and RoPE, so the model can run
with SDPA or flash attention and no (L, L) attention matrix is ever built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from modules.registry import Registry

SCORERS = Registry("stage-2 scorer")

QUERY_MODES = ("last", "text")
# (query, key) pairs per head scored at once: 1 MB of fp32 logits per head (32 MB at 32 heads)
_QUERY_BLOCK = 1 << 18


@dataclass
class Stage2Context:
    """What a stage-2 scorer can read.

    logits_fn:      (B, Q) query rows -> (B, H, Q, L1) scaled attention logits of layer K-1.
    attention_mask: (B, L1) 1 for real tokens (left padding only).
    vision_slots:   (B, M) positions of the surviving visual tokens in the sequence (M: the widest row's count;
                    narrower rows end in filler columns, see `vision_image`).
    vision_index:   (B, M) each token's index among the N_i tokens of ITS image (row-major over its grid).
    vision_valid:   (B, M) bool, False for padding tokens and filler columns.
    vision_hidden:  (B, M, D) hidden states of the visual tokens at the input of layer K-1.
    budget:         how many tokens of each image will be kept, (B, images) long (0 where a row has fewer images).
    vision_image:   (B, M) long, which image of its row each column belongs to (0 .. images-1; the images of a row
                    are consecutive), -1 for filler columns (never kept, whatever their score).
    vision_grid:    (B, M, 2) long, the (h, w) token grid of the column's image ((1, N_i) when it has none);
                    h * w = N_i, so `vision_index / (h * w)` is a resolution-free position.
    query_end:      (B,) position of the last prompt token (default: the last position), so that training on
                    prompt + answer scores from the prompt alone.
    """

    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    attention_mask: torch.Tensor
    vision_slots: torch.Tensor
    vision_index: torch.Tensor
    vision_valid: torch.Tensor
    vision_hidden: torch.Tensor
    budget: torch.Tensor
    vision_image: torch.Tensor
    vision_grid: torch.Tensor
    query_end: torch.Tensor | None = None

    @property
    def images(self) -> int:
        """Most images in a row."""
        return self.budget.shape[1]

    def image_columns(self) -> Iterator[tuple[int, int, torch.Tensor, int]]:
        """(row, image, its columns among the M, its budget) for every image of the batch, in batch order."""
        for row in range(self.vision_image.shape[0]):
            for image in range(self.images):
                columns = (self.vision_image[row] == image).nonzero().flatten()
                if columns.numel():
                    yield row, image, columns, int(self.budget[row, image])

    def num_tokens(self) -> torch.Tensor:
        """(B, M) N_i of each column's image (h_i * w_i)."""
        return self.vision_grid.prod(dim=-1)

    def query_rows(self, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q) query positions and (B, Q) weights that sum to 1 per row.

        "last": the last token of the prompt. "text": every real token after the (last) image.
        """
        bsz, length = self.attention_mask.shape
        device = self.attention_mask.device
        end = self.query_end if self.query_end is not None else torch.full((bsz,), length - 1, device=device)
        if query == "last":
            return end.view(bsz, 1), torch.ones(bsz, 1, device=device)
        if query != "text":
            raise ValueError(f"unknown stage-2 query mode {query!r}; use one of {QUERY_MODES}")
        image_end = self.vision_slots.max(dim=1).values
        width = int((end - image_end).max().clamp(min=1))  # text tokens after the image, at most
        index = (end.view(bsz, 1) - width + 1 + torch.arange(width, device=device)).clamp(min=0)
        weight = (index > image_end.view(bsz, 1)).float()
        weight = weight * self.attention_mask.gather(1, index).float()
        if bool((weight.sum(dim=1) == 0).any()):
            weight = torch.zeros_like(weight)
            weight[:, -1] = 1.0  # the image ends the prompt: fall back to its last token
        return index, weight / weight.sum(dim=1, keepdim=True)

    def head_attention(self, query: str = "last", over: str = "all") -> torch.Tensor:
        """(B, H, M) per-head attention of the query rows to the visual tokens, weighted mean over the rows, float32.

        over="all": the model's own softmax over every key the query sees (the row the eager attention returns).
        over="vision": softmax restricted to the visual keys (a distribution over the M visual tokens).
        Query rows are scored in chunks of at most _QUERY_BLOCK (query, key) pairs per head, so memory stays linear
        in the sequence even when every text token is a query (query="text" with a long prompt).
        """
        if over not in ("all", "vision"):
            raise ValueError(f"unknown attention normalisation {over!r}; use 'all' or 'vision'")
        index, weight = self.query_rows(query)
        bsz, length = self.attention_mask.shape
        keys = torch.arange(length, device=index.device)
        real = self.attention_mask.bool().unsqueeze(1)  # (B, 1, L)
        chunk = max(1, _QUERY_BLOCK // (bsz * length))
        total = None
        for lo in range(0, index.shape[1], chunk):
            rows = index[:, lo:lo + chunk]
            logits = self.logits_fn(rows).float()  # (B, H, Qc, L)
            allowed = (keys.view(1, 1, -1) <= rows.unsqueeze(-1)) & real
            logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
            slots = self.vision_slots[:, None, None, :].expand(-1, logits.shape[1], logits.shape[2], -1)
            if over == "vision":
                probs = torch.softmax(logits.gather(-1, slots), dim=-1)
            else:
                probs = torch.softmax(logits, dim=-1).gather(-1, slots)
            rows_weight = weight[:, None, lo:lo + rows.shape[1], None]
            # a row with less text than the widest scores query rows that see no key (its left padding; text
            # before its image, over="vision"): their softmax is NaN, and NaN * 0 would poison the row
            probs = torch.where(rows_weight > 0, probs, 0.0)
            part = (probs * rows_weight).sum(dim=2)
            total = part if total is None else total + part
        return total

    def text_to_vision(self, query: str = "last") -> torch.Tensor:
        """(B, M) attention to each visual token, mean over heads and (weighted) over query rows."""
        return self.head_attention(query).mean(dim=1)


class Scorer(ABC):
    """Scores the visual tokens at stage 2. Subclasses implement `score`."""

    name: str = "scorer"

    @abstractmethod
    def score(self, ctx: Stage2Context) -> torch.Tensor:
        """(B, M) scores for the visual tokens in `ctx`, higher is kept first."""


def get_scorer(name: str, **params) -> Scorer:
    """A registered stage-2 scorer by name, e.g. `get_scorer("fastv", query="text")`."""
    return SCORERS.build(name, **params)
