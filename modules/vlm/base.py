"""The model-family boundary: everything that differs between VLM families lives behind `VLMAdapter`.

The rest of learnprune sees only `VisionTokens` (what stage 1 selects from), `Spliced` (the language-model
inputs after stage 1) and the adapter's attention-row method (what stage 2 scores with).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
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
    prompt:    (B, T, D) input embeddings of the prompt each image belongs to, or None (question-aware selectors).
    prompt_mask: (B, T) bool, True for the prompt's text tokens (not image tokens, not padding), or None.
    extras:    {name: (B, N, ...)} per-token tensors the model needs back for the kept tokens (Qwen3-VL's DeepStack
               features), gathered with the selection and handed to the adapter; selectors ignore them.
    """

    feats: torch.Tensor
    pre: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    prompt: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feats.dim() != 3:
            raise ValueError(f"VisionTokens.feats must be (B, N, D), got shape {tuple(self.feats.shape)}")
        b, n = self.feats.shape[:2]
        named = [(name, getattr(self, name)) for name in ("pre", "cls_attn", "valid")]
        for name, t in named + [(f"extras[{k!r}]", v) for k, v in self.extras.items()]:
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

        return replace(
            self, feats=self.feats[rows], pre=pick(self.pre), cls_attn=pick(self.cls_attn), valid=pick(self.valid),
            prompt=pick(self.prompt), prompt_mask=pick(self.prompt_mask),
            extras={k: v[rows] for k, v in self.extras.items()},
        )

    @classmethod
    def cat(cls, parts: list[VisionTokens]) -> VisionTokens:
        """Images of one geometry stacked into one batch (a missing `valid` counts as all valid)."""
        first = parts[0]

        def stack(name):
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                return None
            if name == "valid":
                values = [p.valid_or_all() for p in parts]
            if any(v is None for v in values):
                raise ValueError(f"VisionTokens.{name} is set for some images of a group and not for others")
            return torch.cat(values)

        return cls(feats=torch.cat([p.feats for p in parts]), pre=stack("pre"), cls_attn=stack("cls_attn"),
                   valid=stack("valid"), grid=first.grid, prompt=stack("prompt"), prompt_mask=stack("prompt_mask"),
                   extras={k: torch.cat([p.extras[k] for p in parts]) for k in first.extras})


@dataclass
class Pinned:
    """Placeholder tokens of an item that are not visual content and always stay (LLaVA-NeXT's image_newline
    after each row of tiles): they are neither selected nor counted in budgets, and splice as fixed features.

    run_length: the item's placeholder tokens in input_ids (content + pinned).
    content_at: (N_i,) where the item's content tokens (the VisionTokens rows, in order) sit in that run.
    pinned_at:  (P,) where the pinned ones sit; feats: (P, D) their features.
    """

    run_length: int
    content_at: torch.Tensor
    pinned_at: torch.Tensor
    feats: torch.Tensor


@dataclass
class EncodedImages:
    """The vision side of one call: every visual item (image, or video clip / frame) of the batch, grouped by
    token geometry so that a stage-1 selector sees one N and one grid per call.

    groups:    VisionTokens of the items sharing one (N, grid), each group's rows in batch order.
    members:   for each group, (G_j,) long: which items (0 .. n_items-1, in the order the prompts use them)
               its rows are.
    token_ids: per item, the placeholder token id its tokens occupy in input_ids (image or video token).
    pinned:    per item, its `Pinned` tokens, or None when every placeholder token is content (the default).
    Items appear in input_ids in this order within each placeholder kind; `VLMAdapter.visual_spans` matches them.
    """

    groups: list[VisionTokens]
    members: list[torch.Tensor]
    token_ids: list[int]
    pinned: list[Pinned | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pinned:
            self.pinned = [None] * len(self.token_ids)

    @classmethod
    def from_items(cls, items: list[VisionTokens], token_ids: list[int],
                   pinned: list[Pinned | None] | None = None) -> EncodedImages:
        """Group single-item VisionTokens (B = 1 each) by (N, grid), keeping first-seen group order."""
        if len(items) != len(token_ids):
            raise ValueError(f"{len(items)} encoded items but {len(token_ids)} placeholder ids")
        keys: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            keys.setdefault((item.num_tokens, item.grid), []).append(i)
        device = items[0].feats.device if items else None
        return cls(groups=[VisionTokens.cat([items[i] for i in idx]) for idx in keys.values()],
                   members=[torch.tensor(idx, dtype=torch.long, device=device) for idx in keys.values()],
                   token_ids=list(token_ids), pinned=list(pinned) if pinned else [])

    @classmethod
    def uniform(cls, tokens: VisionTokens, token_id: int) -> EncodedImages:
        """One group: every item has the same geometry (LLaVA-1.5)."""
        members = torch.arange(tokens.batch_size, device=tokens.feats.device)
        return cls(groups=[tokens], members=[members], token_ids=[token_id] * tokens.batch_size)

    @property
    def num_items(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> list[int]:
        """N_i of every item."""
        out = [0] * self.num_items
        for group, members in zip(self.groups, self.members, strict=True):
            for i in members.tolist():
                out[i] = group.num_tokens
        return out

    @property
    def run_lengths(self) -> list[int]:
        """Placeholder tokens of every item in input_ids (N_i plus its pinned tokens)."""
        return [n if p is None else p.run_length for n, p in zip(self.lengths, self.pinned, strict=True)]

    @property
    def tokens(self) -> VisionTokens:
        """All items as one VisionTokens, when they share one geometry (e.g. LLaVA-1.5); items in order."""
        if len(self.groups) != 1:
            raise ValueError(f"the items have {len(self.groups)} different token geometries "
                             f"(N = {sorted({g.num_tokens for g in self.groups})}): use .groups")
        order = torch.argsort(self.members[0])
        return self.groups[0].index(order)

    def items(self) -> list[VisionTokens]:
        """Each item on its own (B = 1), in item order."""
        out: list[VisionTokens | None] = [None] * self.num_items
        for group, members in zip(self.groups, self.members, strict=True):
            for row, i in enumerate(members.tolist()):
                out[i] = group.index(slice(row, row + 1))
        return out

    def index(self, rows: torch.Tensor) -> EncodedImages:
        """A selection (or repetition) of items, e.g. every item of a prompt twice for sampled selections."""
        items = self.items()
        picked = [int(r) for r in rows]
        return EncodedImages.from_items([items[r] for r in picked], [self.token_ids[r] for r in picked],
                                        [self.pinned[r] for r in picked])


@dataclass
class KeptItem:
    """What stage 1 kept of one visual item (image, clip or frame), ready to splice.

    index:     (n_i,) sorted indices of the kept tokens among the item's N_i tokens.
    feats:     (n_i, D) their features (after the projector, scaled for straight-through training).
    valid:     (n_i,) bool, False for kept padding tokens.
    num_tokens: N_i; grid: (h_i, w_i) with h_i * w_i == N_i ((1, N_i) when the tokens form no grid).
    token_id:  the placeholder id the item occupies in input_ids.
    extras:    {name: (n_i, ...)} per-token tensors the adapter needs back (see `VisionTokens.extras`).
    pinned:    the item's always-kept non-content placeholder tokens, or None.
    """

    index: torch.Tensor
    feats: torch.Tensor
    valid: torch.Tensor
    num_tokens: int
    grid: tuple[int, int]
    token_id: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    pinned: Pinned | None = None

    @property
    def run_length(self) -> int:
        return self.num_tokens if self.pinned is None else self.pinned.run_length


@dataclass
class Spliced:
    """Language-model inputs after stage 1. Rows keep different numbers of tokens when their images differ; they
    are left-padded to the longest ("filler" rows: attention_mask 0, `positions` -1).

    inputs_embeds:  (B, L1, D) text embeddings with the kept visual features in place.
    attention_mask: (B, L1) 1 for real tokens, 0 for left padding and filler.
    position_ids:   original position ids of the surviving tokens: (B, L1), or (3, B, L1) for M-RoPE.
    positions:      (B, L1) index of each surviving token in the original (unpruned) sequence, -1 for filler.
    vision_slots:   (B, M1) where the kept visual tokens sit in the spliced sequence (0 for filler columns).
    vision_index:   (B, M1) index of each kept visual token among its own item's N_i tokens.
    vision_valid:   (B, M1) bool, False for padding tokens and filler columns.
    vision_image:   (B, M1) long, which item of its row (in sequence order) each column belongs to; -1 = filler.
    vision_item:    (B, M1) long, which item of the call (`EncodedImages` order) each column belongs to; -1 = filler.
    vision_grid:    (B, M1, 2) long, the (h, w) grid of the column's item.
    vision_extras:  {name: (B, M1, ...)} the kept tokens' extras (zeros in filler columns).
    item_row:       (n_items,) the row of each item; item_image: (n_items,) its place among its row's items.
    key_bias:       (B, L1) additive attention bias per key (soft-mask training), or None.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    vision_slots: torch.Tensor
    vision_index: torch.Tensor
    vision_valid: torch.Tensor
    vision_image: torch.Tensor
    vision_item: torch.Tensor
    vision_grid: torch.Tensor
    item_row: torch.Tensor
    item_image: torch.Tensor
    vision_extras: dict[str, torch.Tensor] = field(default_factory=dict)
    key_bias: torch.Tensor | None = None


def left_align(survive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the True columns of each row of a (B, L) mask to the right of a (B, W) index, W = most kept per row.

    Returns ((B, W) source column of each slot, -1 in the filler slots on the left; (B, L) slot of each source
    column, -1 where dropped). Right alignment keeps every row's last token last (left padding).
    """
    bsz, length = survive.shape
    counts = survive.sum(dim=1)
    width = int(counts.max())
    rows, cols = survive.nonzero(as_tuple=True)
    slot = survive.long().cumsum(dim=1)[rows, cols] - 1 + (width - counts)[rows]
    source = torch.full((bsz, width), -1, dtype=torch.long, device=survive.device)
    source[rows, slot] = cols
    slot_of = torch.full((bsz, length), -1, dtype=torch.long, device=survive.device)
    slot_of[rows, cols] = slot
    return source, slot_of


def _place_features(embeds: torch.Tensor, runs: list, content: list, kept: list[KeptItem]) -> torch.Tensor:
    """Input embeddings with every kept token's feature at its position and every pinned token's fixed one."""
    device = embeds.device
    rows = torch.cat([torch.full((k.index.numel(),), r, device=device) for (r, _), k in zip(content, kept)])
    cols = torch.cat([pos[k.index.to(device)] for (_, pos), k in zip(content, kept)])
    embeds = embeds.index_put((rows, cols), torch.cat([k.feats for k in kept]).to(device, embeds.dtype))
    for (row, run), item in zip(runs, kept, strict=True):
        if item.pinned is not None:
            embeds[row, run[item.pinned.pinned_at.to(device)]] = item.pinned.feats.to(device, embeds.dtype)
    return embeds


def _vision_columns(kept: list[KeptItem], content: list, slot_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-column arrays of `Spliced` (vision_slots, vision_index, ...): each row's kept visual tokens, its
    items in sequence order (so slots ascend), filler columns after them when rows keep different counts."""
    bsz, device = slot_of.shape[0], slot_of.device
    per_row: list[list[int]] = [[] for _ in range(bsz)]
    item_image = torch.zeros(len(kept), dtype=torch.long, device=device)
    for i in sorted(range(len(kept)), key=lambda i: (content[i][0], int(content[i][1][0]))):
        item_image[i] = len(per_row[content[i][0]])
        per_row[content[i][0]].append(i)
    width = max(sum(kept[i].index.numel() for i in items) for items in per_row)

    def column(values, fill, dtype=torch.long, shape=()):
        out = torch.full((bsz, width, *shape), fill, dtype=dtype, device=device)
        for row, items in enumerate(per_row):
            if items:
                part = torch.cat([values(i) for i in items])
                out[row, :part.shape[0]] = part
        return out

    def count(i):
        return kept[i].index.numel()

    return dict(
        vision_slots=column(lambda i: slot_of[content[i][0], content[i][1][kept[i].index.to(device)]], 0),
        vision_index=column(lambda i: kept[i].index.to(device), 0),
        vision_valid=column(lambda i: kept[i].valid.to(device), False, torch.bool),
        vision_image=column(lambda i: item_image[i].expand(count(i)), -1),
        vision_item=column(lambda i: torch.full((count(i),), i, device=device), -1),
        vision_grid=column(lambda i: torch.tensor(kept[i].grid, device=device).expand(count(i), 2), 1, shape=(2,)),
        vision_extras={name: column(lambda i, name=name: kept[i].extras[name].to(device), 0, value.dtype,
                                    value.shape[1:]) for name, value in kept[0].extras.items()},
        item_image=item_image,
    )


# Elements of one (queries, keys) block of a single head: ~2 MB in fp32, so the matmul's output and the softmax's
# passes over it stay in cache. Blocks of all heads at once (64 MB) measured 3.7x slower at L = 5184 on CPU.
_SCORE_BLOCK = 1 << 19


def mean_query_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """(L,) the mean over queries and heads of softmax(q k^T * scaling) for one attention segment: what a vision
    tower without [CLS] attends to. q, k: (H, L, d) after the layer's own norm, projections and rotary embedding.
    Computed per head in blocks of queries, so no (L, L) matrix is ever held whole."""
    heads, length, _ = q.shape
    q = q.float() * scaling
    keys_t = k.float().transpose(-1, -2)
    chunk = max(1, _SCORE_BLOCK // length)
    total = torch.zeros(length, dtype=torch.float32, device=q.device)
    for head in range(heads):
        for lo in range(0, length, chunk):
            total += torch.softmax(q[head, lo:lo + chunk] @ keys_t[head], dim=-1).sum(dim=0)
    return total / (length * heads)


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


@dataclass(frozen=True)
class GridView:
    """One grid of a visual item's tokens over one picture (what `VLMAdapter.item_geometry` lays out).

    A token of the grid is the `box` cut into rows x cols equal cells: the inverse of what the processor did to the
    picture, so the cell shows what the token saw.

    item:    the visual item (index into `out.pruning.kept[stage]`, `EncodedImages` order).
    start:   index of the grid's first token among the item's N_i tokens (its tokens are start .. start+rows*cols-1,
             row-major).
    grid:    (rows, cols).
    box:     (top, left, bottom, right) in the picture's pixels that the grid covers; cells are equal parts of it. It
             may reach outside the picture (padding) or stay inside it (a centre crop).
    picture: ("image", i) for the i-th image of the call, ("video", v, f) for frame f of the v-th video.
    label:   a short name ("image 0", "image 0 tiles", "video 0 frame 4", ...).
    """

    item: int
    start: int
    grid: tuple[int, int]
    box: tuple[float, float, float, float]
    picture: tuple
    label: str

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]

    def scaled(self, sy: float, sx: float) -> GridView:
        """The same grid over the picture resized by (sy, sx)."""
        t, left, b, r = self.box
        return replace(self, box=(t * sy, left * sx, b * sy, r * sx))

    def padding(self, picture_size: tuple[int, int]) -> np.ndarray:
        """(rows * cols,) bool: cells more than half outside a picture of (height, width) -- the padding tokens
        (the same rule as the adapters' `valid` mask, `box_valid_mask`)."""
        top, left, bottom, right = self.box
        h, w = picture_size
        inside = (-top, -left, h - top, w - left)  # the picture in the box's own coordinates
        valid = box_valid_mask(inside, self.grid, (bottom - top, right - left))
        return ~valid.numpy()


class VLMAdapter(ABC):
    """What learnprune needs from one VLM family. Subclasses set `model_types` and implement the abstract parts.

    Generic behaviour (splicing, row selection for stage 2) is written here for the common decoder layout:
    a `position_embeddings=(cos, sin)` kwarg of shape (B, L, d) per layer and a 2-D or 4-D attention mask.
    """

    model_types: tuple[str, ...] = ()
    video_unit: str = "clip"  # the plan's `video`: a clip is one item, or each frame is ("frame")
    view_unit: str = "image"  # the plan's `views`: an AnyRes image is one item, or each view is ("view")
    needs_attention: bool = True  # False when the plan's stage-1 selector never reads `cls_attn` (skip computing it)

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
    def num_image_tokens(self) -> int | None:
        """N when every image has the same number of visual tokens (LLaVA-1.5), None when it varies per image."""
        return None

    vision_inputs: tuple[str, ...] = ("pixel_values", "image_sizes")
    """The keyword inputs of a call that describe the visual items (consumed by the adapter, not passed on)."""
    private_inputs: tuple[str, ...] = ()
    """Those of `vision_inputs` that only learnprune reads (the unpruned model must not receive them)."""

    def has_vision(self, vision: dict) -> bool:
        return any(vision.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))

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
    def visual_items(self, vision: dict) -> list[tuple[int, int]]:
        """(placeholder token id, placeholder tokens: N_i plus any pinned ones) of every visual item of a call, in
        `EncodedImages` order, from the inputs alone (before the vision tower runs: mismatches fail fast)."""

    @abstractmethod
    def encode_images(self, vision: dict) -> EncodedImages:
        """Run the vision side once: the call's vision inputs -> every item's tokens, grouped by geometry."""

    @abstractmethod
    def default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool, vision: dict
    ) -> torch.Tensor:
        """The position ids the HF model would use for this call when the caller passes none."""

    def language_kwargs(self, spliced: Spliced) -> dict:
        """Extra keyword inputs of the language model's prefill call for the spliced sequence (Qwen3-VL's
        DeepStack features); injected by `PrunedVLM` with a pre-hook on `language_model()`."""
        return {}

    def check_stage2_layer(self, layer: int) -> None:
        """Refuse a stage-2 layer K the family cannot prune at (any K in [1, L-1] by default)."""
        return None

    def item_geometry(self, inputs: dict, image_sizes: list[tuple[int, int]] | None = None,
                      video_sizes: list[tuple[int, int]] | None = None, processor=None) -> list[GridView]:
        """Where every visual item's tokens sit in the original pictures: the `GridView`s of one call, in item order
        (`EncodedImages` order; the adapter's `view_unit` / `video_unit` decide what an item is).

        inputs: the processor's output for the call (pixel_values, image_grid_thw, image_sizes, ...).
        image_sizes: the original (height, width) of every image of the call, in batch order, as ints (empty or
            None: the call has no images). video_sizes: the (height, width) of every video's frames.
        processor: the processor that made `inputs`, for families that need its fit when the adapter was built
            without one.

        Each item's grids must lie within its N_i tokens and cover all of them but at most one (a token with no
        place in the picture, e.g. a kept [CLS]); `modules.overlay.check_views` tests that against a forward's
        counts. The default raises: a family without overlay geometry cannot be drawn.
        """
        raise ValueError(f"no overlay geometry for adapter {type(self).__name__}: it does not implement "
                         "VLMAdapter.item_geometry")

    def language_model(self) -> nn.Module:
        """The decoder stack (the module whose forward takes inputs_embeds and runs `language_layers`)."""
        return self.model.model.language_model

    def attention_logits(
        self, layer_idx: int, hidden_states: torch.Tensor, position_embeddings, keys: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Scaled pre-softmax attention logits of layer `layer_idx`, as a function of the query rows.

        hidden_states: (B, L, D) input of that decoder layer. Returns `logits(query_index)`: (B, Q) rows to score ->
        (B, H, Q, L), computed from the layer's own norm, projections (and per-head q/k norms where the family has
        them: Qwen3) and RoPE with the (cos, sin) the layer receives (M-RoPE already resolved to (B, L, d) by the
        model's rotary module); never an (L, L) matrix. The keys are rotated once, here, so that a caller scoring
        many query rows in chunks pays for them once. `keys` / `queries`: the layer's own k_proj / q_proj outputs
        (B, L, heads * d) when they were captured during the forward; then nothing is projected again.
        """
        layer = self.language_layers()[layer_idx]
        attn = layer.self_attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
        b, length, _ = hidden_states.shape
        d = attn.head_dim
        cos, sin = position_embeddings
        if keys is None:
            keys = attn.k_proj(layer.input_layernorm(hidden_states))
        k = keys.view(b, length, -1, d)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        k, _ = rope(k, k, cos, sin)
        kv_heads = k.shape[1]
        keys_t = k.transpose(-1, -2).unsqueeze(2)  # (B, kv, 1, d, L): GQA groups broadcast, never repeated

        def logits(query_index: torch.Tensor) -> torch.Tensor:
            if queries is not None:
                q = gather_last(queries, query_index)
            else:  # the norm is per row: norming the query rows alone equals gathering them from the normed input
                q = attn.q_proj(layer.input_layernorm(gather_last(hidden_states, query_index)))
            q = q.view(b, query_index.shape[1], -1, d)
            if hasattr(attn, "q_norm"):
                q = attn.q_norm(q)
            q = q.transpose(1, 2)
            q, _ = rope(q, q, gather_last(cos, query_index), gather_last(sin, query_index))
            grouped = q.view(b, kv_heads, -1, q.shape[2], d)  # heads h = kv * groups + g, as the model pairs them
            return ((grouped @ keys_t) * attn.scaling).view(b, -1, q.shape[2], length)

        return logits

    # ---- generic -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.language_layers())

    def visual_spans(self, input_ids: torch.Tensor, token_ids: list[int], lengths: list[int]
                     ) -> list[tuple[int, torch.Tensor]]:
        """(row, (N_i,) sequence positions) of every visual item, matching items to placeholder tokens in order:
        items of one placeholder kind fill that kind's tokens row by row, left to right. Validates the counts."""
        spans: list[tuple[int, torch.Tensor] | None] = [None] * len(token_ids)
        for token_id in sorted(set(token_ids)):
            items = [i for i, t in enumerate(token_ids) if t == token_id]
            rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
            needed = sum(lengths[i] for i in items)
            if rows.numel() == 0:
                raise ValueError(f"no image token (id {token_id}) in input_ids: the prompt must contain the image "
                                 "placeholder expanded by the processor")
            if rows.numel() != needed:
                raise ValueError(
                    f"input_ids hold {rows.numel()} image tokens (id {token_id}) but the {len(items)} image(s) need "
                    f"{needed} (N per image: {[lengths[i] for i in items]}): the number of images does not match "
                    "the image tokens"
                )
            start = 0
            for i in items:
                row = rows[start:start + lengths[i]]
                if bool((row != row[0]).any()):
                    raise ValueError(f"image {i}'s {lengths[i]} tokens (id {token_id}) run over two prompts: the "
                                     "images do not match the image tokens of each prompt")
                spans[i] = (int(row[0]), cols[start:start + lengths[i]])
                start += lengths[i]
        return spans

    def item_spans(self, input_ids: torch.Tensor, vision: dict) -> list[tuple[int, torch.Tensor]]:
        """`visual_spans` of a call's visual items, laid out from its inputs alone (`visual_items`)."""
        layout = self.visual_items(vision)
        return self.visual_spans(input_ids, [t for t, _ in layout], [n for _, n in layout])

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        kept: list[KeptItem],
    ) -> Spliced:
        """Drop the visual tokens stage 1 did not keep and put the kept features in place.

        Kept tokens keep their ORIGINAL position ids, so RoPE sees the geometry of the unpruned prompt. Rows that
        keep fewer tokens than others are left-padded.
        """
        device = input_ids.device
        runs = self.visual_spans(input_ids, [k.token_id for k in kept], [k.run_length for k in kept])
        content = [(row, run if k.pinned is None else run[k.pinned.content_at.to(device)])
                   for (row, run), k in zip(runs, kept, strict=True)]
        survive = torch.ones(input_ids.shape, dtype=torch.bool, device=device)
        for (row, pos), item in zip(content, kept, strict=True):
            survive[row, pos] = False
            survive[row, pos[item.index.to(device)]] = True
        source, slot_of = left_align(survive)
        src = source.clamp(min=0)
        embeds = _place_features(self.embed_tokens(input_ids), runs, content, kept)
        return Spliced(
            inputs_embeds=gather_last(embeds, src),
            attention_mask=gather_last(attention_mask, src).masked_fill(source < 0, 0),
            position_ids=gather_position_ids(position_ids, src),
            positions=source,
            item_row=torch.tensor([row for row, _ in content], dtype=torch.long, device=device),
            **_vision_columns(kept, content, slot_of),
        )

    def select_layer_rows(self, kwargs: dict, rows: torch.Tensor, full_len: int,
                          filler: torch.Tensor | None = None, layer_idx: int = 0) -> dict:
        """Adapt one decoder layer's kwargs to a sequence whose rows (of `full_len`) were cut down to `rows`.

        Called for every layer at and after stage 2, in prefill (query rows and key columns both shrink) and in
        decoding (only the key columns of the cached prefill shrink; new tokens are appended after `full_len`).
        `filler` (B, L2) marks left-padding rows of batches whose rows keep different counts: no real query ever
        attends to them (the model may have skipped its mask when nothing was padded: it is built here then).
        """
        kwargs = dict(kwargs)
        cos_sin = kwargs.get("position_embeddings")
        q_len = cos_sin[0].shape[-2] if cos_sin is not None else None
        if q_len == full_len:
            kwargs["position_embeddings"] = tuple(gather_last(t, rows) for t in cos_sin)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = gather_position_ids(kwargs["position_ids"], rows)
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(
                f"stage-2 pruning cannot adapt an attention mask of type {type(mask).__name__}; use "
                "attn_implementation='sdpa', 'eager' or a flash-attention backend"
            )
        if mask is None and filler is not None and bool(filler.any()):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            decoded = 0 if q_len == full_len or cache is None else cache.get_seq_length(layer_idx) - rows.shape[1]
            mask = self._causal_mask(rows.shape[0], q_len, full_len + decoded + (0 if q_len == full_len else q_len),
                                     cos_sin[0])
        if mask is not None:
            kwargs["attention_mask"] = _select_mask(mask, rows, full_len, filler)
        return kwargs

    def _causal_mask(self, bsz: int, q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor:
        """The plain causal mask the model skipped, in its attention implementation's form: (B, kv) ones for flash
        attention, (B, 1, q, kv) bool for SDPA, additive for eager."""
        impl = getattr(self.model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
        if "flash" in impl:
            return torch.ones(bsz, kv_len, dtype=torch.long, device=like.device)
        query_at = torch.arange(kv_len - q_len, kv_len, device=like.device)
        allowed = torch.arange(kv_len, device=like.device).view(1, -1) <= query_at.view(-1, 1)
        allowed = allowed.view(1, 1, q_len, kv_len).expand(bsz, 1, -1, -1)
        if impl == "eager":
            blocked = torch.full((), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
            return torch.where(allowed, torch.zeros_like(blocked), blocked)
        return allowed


def _select_mask(mask: torch.Tensor, rows: torch.Tensor, full_len: int, filler: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Keep the key columns (and, in prefill, query rows) of a 2-D or 4-D mask that survive stage 2; filler
    columns are masked for every query (a filler query row sees itself only, so no softmax row is empty)."""
    kv_len = mask.shape[-1]
    new = torch.arange(full_len, kv_len, device=rows.device).expand(rows.shape[0], -1)
    cols = torch.cat([rows, new], dim=1)
    blocked = None
    if filler is not None:
        blocked = torch.cat([filler, torch.zeros_like(new, dtype=torch.bool)], dim=1)
    if mask.dim() == 2:
        mask = mask.gather(1, cols)
        return mask if blocked is None else mask.masked_fill(blocked, 0)
    mask = mask.expand(rows.shape[0], -1, -1, -1)
    _, h, q, _ = mask.shape
    mask = mask.gather(3, cols[:, None, None, :].expand(-1, h, q, -1))
    if q == full_len:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, h, -1, mask.shape[-1]))
    if blocked is None:
        return mask
    off = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    on = True if mask.dtype == torch.bool else 0.0
    mask = mask.masked_fill(blocked[:, None, None, :], off)
    if q == full_len:  # prefill: filler queries attend to themselves
        eye = torch.eye(rows.shape[1], mask.shape[-1], dtype=torch.bool, device=mask.device)
        mask = mask.masked_fill(eye & filler[:, None, :, None], on)
    return mask
