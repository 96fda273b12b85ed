"""The model-family boundary: everything that differs between VLM families lives behind `VLMAdapter`.

The rest of learnprune sees only `VisionTokens` (what stage 1 selects from), `Spliced` (the language-model
inputs after stage 1) and the adapter's attention-row method (what stage 2 scores with).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass
class VisionTokens:
    """The visual tokens of a batch of images, as stage-1 selectors see them.

    feats:     (B, N, D) features after the projector (what the language model receives).
    pre:       (B, N, Dv) vision-tower features before the projector, or None.
    cls_attn:  (B, N) attention of the vision feature layer's [CLS] query (or mean query for towers without
               CLS) to each token, mean over heads, or None.
    valid:     (B, N) bool, False for tokens that cover only padding (pad-to-square, anyres), or None (all valid).
    grid:      (h, w) patch grid with h * w == N, or None when tokens do not form one grid.
    positions: original position ids of the tokens in the prompt: (B, N), or (3, B, N) for M-RoPE, or None.
    prompt:    (B, T, D) input embeddings of the prompt each image belongs to, or None (question-aware selectors).
    prompt_mask: (B, T) bool, True for the prompt's text tokens (not image tokens, not padding), or None.
    """

    feats: torch.Tensor
    pre: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    positions: torch.Tensor | None = None
    prompt: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.feats.dim() != 3:
            raise ValueError(f"VisionTokens.feats must be (B, N, D), got shape {tuple(self.feats.shape)}")
        b, n = self.feats.shape[:2]
        for name in ("pre", "cls_attn", "valid"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape[:2]) != (b, n):
                raise ValueError(f"VisionTokens.{name} has shape {tuple(t.shape)}, expected ({b}, {n}, ...)")
        if self.grid is not None and self.grid[0] * self.grid[1] != n:
            raise ValueError(f"VisionTokens.grid {self.grid} does not cover N={n} tokens")
        if (self.prompt is None) != (self.prompt_mask is None):
            raise ValueError("VisionTokens.prompt and prompt_mask come together")
        if self.prompt is not None and (self.prompt.shape[0] != b or self.prompt_mask.shape != self.prompt.shape[:2]):
            raise ValueError(f"VisionTokens.prompt {tuple(self.prompt.shape)} / prompt_mask "
                             f"{tuple(self.prompt_mask.shape)} do not match B={b} images")

    @property
    def batch_size(self) -> int:
        return self.feats.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.feats.shape[1]

    def valid_or_all(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones(self.feats.shape[:2], dtype=torch.bool, device=self.feats.device)

    def index(self, rows: torch.Tensor | slice) -> VisionTokens:
        """The tokens of a subset of images (rows of the batch)."""

        def pick(t):
            return None if t is None else t[rows]

        positions = self.positions
        if positions is not None:
            positions = positions[:, rows] if positions.dim() == 3 else positions[rows]
        return replace(
            self, feats=self.feats[rows], pre=pick(self.pre), cls_attn=pick(self.cls_attn),
            valid=pick(self.valid), positions=positions, prompt=pick(self.prompt), prompt_mask=pick(self.prompt_mask),
        )


@dataclass
class Spliced:
    """Language-model inputs after stage 1.

    inputs_embeds:  (B, L1, D) text embeddings with the kept visual features in place.
    attention_mask: (B, L1) 1 for real tokens, 0 for left padding.
    position_ids:   original position ids of the surviving tokens: (B, L1), or (3, B, L1) for M-RoPE.
    positions:      (B, L1) index of each surviving token in the original (unpruned) sequence.
    vision_slots:   (B, M1) where the kept visual tokens sit in the spliced sequence.
    vision_index:   (B, M1) index of each kept visual token among the row's M visual tokens (all its images).
    vision_valid:   (B, M1) bool, False for padding tokens.
    key_bias:       (B, L1) additive attention bias per key (soft-mask training), or None.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    vision_slots: torch.Tensor
    vision_index: torch.Tensor
    vision_valid: torch.Tensor
    key_bias: torch.Tensor | None = None


def gather_last(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence dim of batch-first (B, L) or (B, L, D) tensors with a (B, L') index."""
    if t.dim() == 2:
        return t.gather(1, index)
    if t.dim() == 3:
        return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    raise ValueError(f"gather_last takes (B, L) or (B, L, D) tensors, got shape {tuple(t.shape)}")


def gather_position_ids(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids, (B, L) or multi-axis (A, B, L) (M-RoPE), along L with a (B, L') index.

    Separate from `gather_last` because a (3, B, L) tensor and a (B, L, D) tensor cannot be told apart by shape
    when B == 3.
    """
    if position_ids.dim() == 2:
        return position_ids.gather(1, index)
    if position_ids.dim() == 3:
        return position_ids.gather(2, index.unsqueeze(0).expand(position_ids.shape[0], -1, -1))
    raise ValueError(f"position ids must be (B, L) or (axes, B, L), got shape {tuple(position_ids.shape)}")


def box_valid_mask(box: tuple[float, float, float, float], grid: tuple[int, int], frame: tuple[int, int],
                   threshold: float = 0.5) -> torch.Tensor:
    """Which patches of a (grid_h x grid_w) patch grid over a (frame_h x frame_w) pixel frame show image content.

    box: (top, left, bottom, right) of the content in the frame's pixels (what the processor's padding, resize
    and crop made of the original image). A patch is padding when more than `threshold` of its area lies outside
    the box. Returns (grid_h * grid_w,) bool, row-major.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"pad threshold must be in [0, 1), got {threshold}")
    top, left, bottom, right = box
    fy = _covered_fraction(top, bottom - top, frame[0] / grid[0], grid[0])
    fx = _covered_fraction(left, right - left, frame[1] / grid[1], grid[1])
    inside = fy[:, None] * fx[None, :]
    return (1.0 - inside <= threshold).flatten()


def _covered_fraction(start: float, length: float, patch: float, count: int) -> torch.Tensor:
    """Fraction of each of `count` patches of size `patch` along one axis that lies inside [start, start+length)."""
    lo = torch.arange(count, dtype=torch.float64) * patch
    overlap = (torch.minimum(lo + patch, torch.tensor(start + length, dtype=torch.float64))
               - torch.maximum(lo, torch.tensor(start, dtype=torch.float64)))
    return overlap.clamp(min=0) / patch


class VLMAdapter(ABC):
    """What learnprune needs from one VLM family. Subclasses set `model_types` and implement the abstract parts.

    Generic behaviour (splicing, row selection for stage 2) is written here for the common decoder layout:
    a `position_embeddings=(cos, sin)` kwarg of shape (B, L, d) per layer and a 2-D or 4-D attention mask.
    """

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, processor=None):
        """`processor`: the processor (or image processor) the inputs are made with, or None. Adapters read from it
        how images were fitted to the encoder (padding, crop), which decides the `valid` mask of the tokens."""
        self.model = model
        self.processor = processor

    # ---- family-specific -------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """The placeholder token id the processor expands into N image tokens."""

    @property
    @abstractmethod
    def num_image_tokens(self) -> int:
        """N: visual tokens per image."""

    @property
    @abstractmethod
    def feature_dims(self) -> dict[str, int]:
        """{"pre": vision feature dim before the projector, "post": dim after it (the LM width)}."""

    @abstractmethod
    def language_layers(self) -> nn.ModuleList:
        """The decoder layers of the language model, in order."""

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    @abstractmethod
    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionTokens:
        """Run the vision side once: (n_images, ...) pixels -> VisionTokens with B = n_images."""

    @abstractmethod
    def default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool
    ) -> torch.Tensor:
        """The position ids the HF model would use for this call when the caller passes none."""

    @abstractmethod
    def attention_logits(
        self, layer_idx: int, hidden_states: torch.Tensor, position_embeddings, query_index: torch.Tensor
    ) -> torch.Tensor:
        """Scaled pre-softmax attention logits of layer `layer_idx` for a few query rows.

        hidden_states: (B, L, D) input of that decoder layer; query_index: (B, Q) rows to score.
        Returns (B, H, Q, L), computed from the layer's own projections and RoPE (never an (L, L) matrix).
        """

    # ---- generic -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.language_layers())

    def image_positions(self, input_ids: torch.Tensor, n_images: int) -> torch.Tensor:
        """(B, M) sequence positions of the image tokens, M = images per row * N; validates the counts."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        total, n = int(counts.sum()), self.num_image_tokens
        if total == 0:
            raise ValueError(
                f"no image token (id {self.image_token_id}) in input_ids: the prompt must contain the image "
                "placeholder expanded by the processor"
            )
        if total != n_images * n:
            raise ValueError(
                f"input_ids hold {total} image tokens but {n_images} image(s) x {n} tokens = {n_images * n} were "
                "expected: the number of images does not match the image tokens"
            )
        if not bool((counts == counts[0]).all()):
            raise ValueError(
                f"every row of a batch must carry the same number of images; image tokens per row: {counts.tolist()}"
            )
        return is_image.nonzero()[:, 1].view(input_ids.shape[0], -1)

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        tokens: VisionTokens,
        keep: torch.Tensor,
    ) -> Spliced:
        """Drop the visual tokens not in `keep` ((n_images, n1) indices into N) and put the kept features in place.

        Kept tokens keep their ORIGINAL position ids, so RoPE sees the geometry of the unpruned prompt.
        """
        bsz, seq_len = input_ids.shape
        n = self.num_image_tokens
        image_pos = self.image_positions(input_ids, tokens.batch_size)  # (B, M)
        per_row = image_pos.shape[1] // n
        n1 = keep.shape[1]
        # index of each kept token among the row's M visual tokens (images of a row are consecutive in the batch)
        offsets = (torch.arange(per_row, device=keep.device) * n).repeat_interleave(n1)
        vision_index = keep.reshape(bsz, per_row * n1) + offsets
        kept_pos = image_pos.gather(1, vision_index)

        drop = torch.zeros(bsz, seq_len, dtype=torch.bool, device=input_ids.device)
        drop.scatter_(1, image_pos, True)
        drop.scatter_(1, kept_pos, False)
        positions = (~drop).nonzero()[:, 1].view(bsz, -1)  # ascending: original order is preserved

        embeds = self.embed_tokens(input_ids)
        feats = tokens.feats[torch.arange(tokens.batch_size, device=keep.device).unsqueeze(1), keep]
        embeds = embeds.index_put((torch.arange(bsz).unsqueeze(1).expand_as(kept_pos), kept_pos),
                                  feats.reshape(bsz, -1, feats.shape[-1]).to(embeds.dtype))

        slot_of = torch.full((bsz, seq_len), -1, dtype=torch.long, device=input_ids.device)
        slot_of.scatter_(1, positions, torch.arange(positions.shape[1], device=input_ids.device).expand(bsz, -1))
        valid = tokens.valid_or_all().gather(1, keep).reshape(bsz, -1)
        return Spliced(
            inputs_embeds=gather_last(embeds, positions),
            attention_mask=gather_last(attention_mask, positions),
            position_ids=gather_position_ids(position_ids, positions),
            positions=positions,
            vision_slots=slot_of.gather(1, kept_pos),
            vision_index=vision_index,
            vision_valid=valid,
        )

    def select_layer_rows(self, kwargs: dict, rows: torch.Tensor, full_len: int) -> dict:
        """Adapt one decoder layer's kwargs to a sequence whose rows (of `full_len`) were cut down to `rows`.

        Called for every layer at and after stage 2, in prefill (query rows and key columns both shrink) and in
        decoding (only the key columns of the cached prefill shrink; new tokens are appended after `full_len`).
        """
        kwargs = dict(kwargs)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None and cos_sin[0].shape[-2] == full_len:
            kwargs["position_embeddings"] = tuple(gather_last(t, rows) for t in cos_sin)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = gather_position_ids(kwargs["position_ids"], rows)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = _select_mask(mask, rows, full_len)
        elif mask is not None:
            raise ValueError(
                f"stage-2 pruning cannot adapt an attention mask of type {type(mask).__name__}; use "
                "attn_implementation='sdpa', 'eager' or a flash-attention backend"
            )
        return kwargs


def _select_mask(mask: torch.Tensor, rows: torch.Tensor, full_len: int) -> torch.Tensor:
    """Keep the key columns (and, in prefill, query rows) of a 2-D or 4-D mask that survive stage 2."""
    kv_len = mask.shape[-1]
    new = torch.arange(full_len, kv_len, device=rows.device).expand(rows.shape[0], -1)
    cols = torch.cat([rows, new], dim=1)
    if mask.dim() == 2:
        return mask.gather(1, cols)
    mask = mask.expand(rows.shape[0], -1, -1, -1)
    _, h, q, _ = mask.shape
    mask = mask.gather(3, cols[:, None, None, :].expand(-1, h, q, -1))
    if q == full_len:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, h, -1, mask.shape[-1]))
    return mask
