"""LLaVA-NeXT (`llava_next`) and LLaVA-OneVision (`llava_onevision`): AnyRes tiles, image-newline tokens, unpadding.

One image becomes a base view (the whole image resized to the tower's input) plus high-resolution tiles of the
best grid pinpoint (the image resized into that canvas keeping its aspect ratio, padded, cut into tiles). The
model unpads the tiles' token grid to the image's aspect ratio, appends an `image_newline` after each row, and
(OneVision, `anyres_max_K`) shrinks the grid bilinearly when it holds more than ~K tiles' worth of tokens.
OneVision prompts with several images get one pad-to-square view per image (no tiles).

This adapter never re-derives that layout: every per-token quantity (features, pre-projector features, [CLS] or
mean-query attention, padding validity, "is content") is packed by the model's own `pack_image_features`, so the
token order, the unpadding and the bilinear shrink are exactly the model's.

- Image-newline tokens are not visual content: they are `Pinned` (modules/vlm/base.py): always kept, never
  selected, not counted in budgets; a budget ratio r keeps round(r * N_i) of image i's N_i content tokens.
- One item per image over base + tiles (one budget); the tokens form no single grid, so grid-based selectors see
  them as one row (1, N_i).
- Attention scores: the CLIP [CLS] attention of each view (LLaVA-NeXT), or the mean over queries of the feature
  layer's attention (SigLIP, LLaVA-OneVision), recomputed from the layer's q/k per view.
- Validity: from the processor's own geometry (`select_best_resolution`, `get_patch_output_size`, the centred
  padding of the tile canvas; OneVision's pad-to-square for multi-image prompts); the base view is squashed, not
  padded, so it has no padding.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import nn
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from modules.vlm.base import (
    EncodedImages,
    GridView,
    Pinned,
    VisionTokens,
    VLMAdapter,
    box_valid_mask,
    mean_query_attention,
)
from modules.vlm.llava import cls_attention, text_position_ids


class AnyResAdapter(VLMAdapter):
    model_types = ("llava_next", "llava_onevision")
    vision_inputs = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos")

    def __init__(self, model: nn.Module, processor=None):
        super().__init__(model, processor)
        self.config = cfg = model.config
        self.family = cfg.model_type
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        vc = cfg.vision_config
        self.tile = vc.image_size
        self.side = vc.image_size // vc.patch_size
        strategy = cfg.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        self._drop_cls = 1 if strategy == "default" else 0
        self._module = sys.modules[type(model.model).__module__]

    # ---- identity ------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def feature_dims(self) -> dict[str, int]:
        return {"pre": self.config.vision_config.hidden_size * len(self._feature_layers()),
                "post": self.config.text_config.hidden_size}

    def language_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def _feature_layers(self) -> list[int]:
        layer = self.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    # ---- layout -----------------------------------------------------------------------------------------------
    def _views(self, vision: dict) -> list[int]:
        """Views (base + tiles) of every image, as the model counts them."""
        sizes = torch.as_tensor(vision["image_sizes"]).view(-1, 2)
        per_prompt = vision.get("batch_num_images")
        single = [True] * sizes.shape[0]
        if self.family == "llava_onevision" and per_prompt is not None:
            single = [int(n) == 1 for n in per_prompt for _ in range(int(n))]  # several images: no tiles
        return [self._module.image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                                       patch_size=self.tile) if one else 1
                for s, one in zip(sizes, single, strict=True)]

    def _pack(self, per_image: list[torch.Tensor], sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        """The model's own packing of per-view token tensors (views, L, C) of each image -> (T_i, C)."""
        pack = self.model.model.pack_image_features
        if self.family == "llava_onevision":
            packed, _ = pack(per_image, sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio)
        else:
            packed, _ = pack(per_image, sizes, vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                             image_newline=newline)
        return packed

    def _content(self, views: list[int], sizes: torch.Tensor) -> list[torch.Tensor]:
        """(T_i,) bool per image: which packed tokens are content (False: image_newline)."""
        length = self.side * self.side
        ones = [torch.ones(v, length, 1, dtype=torch.float64) for v in views]
        return [p[:, 0] > 0.5 for p in self._pack(ones, sizes, torch.zeros(1, dtype=torch.float64))]

    def _segments(self, views: list[int], sizes: torch.Tensor) -> list[tuple[int, torch.Tensor, tuple | None]]:
        """Per item: (image index, (run,) content mask over its placeholder run, grid or None). One item per image,
        or with `views="view"` its base view and its tile grid apart (each with its own grid)."""
        out = []
        for i, (content, v) in enumerate(zip(self._content(views, sizes), views, strict=True)):
            length = self.side * self.side
            if v == 1:  # one view: a full grid, then one newline
                out.append((i, content, (self.side, self.side)))
            elif self.view_unit == "view":
                tiles = content[length:]
                rows = int((~tiles).sum())
                out.append((i, content[:length], (self.side, self.side)))
                out.append((i, tiles, (rows, int(tiles.sum()) // rows)))
            else:
                out.append((i, content, None))
        return out

    def _video_items(self, vision: dict) -> list[tuple[int, int, torch.Tensor]]:
        """Per video item: (video index, first frame, (run,) content mask): the model pools each frame to
        ceil(side/2)^2 tokens and appends one newline after the clip."""
        videos = vision.get("pixel_values_videos")
        if videos is None:
            return []
        frames = videos.shape[1]
        per_frame = math.ceil(self.side / 2) ** 2
        out = []
        for b in range(videos.shape[0]):
            if self.video_unit == "frame":
                for f in range(frames):
                    mask = torch.ones(per_frame + (f == frames - 1), dtype=torch.bool)
                    mask[per_frame:] = False
                    out.append((b, f, mask))
            else:
                mask = torch.ones(frames * per_frame + 1, dtype=torch.bool)
                mask[-1] = False
                out.append((b, 0, mask))
        return out

    def visual_items(self, vision: dict) -> list[tuple[int, int]]:
        items = []
        if vision.get("pixel_values") is not None:
            sizes = torch.as_tensor(vision["image_sizes"]).view(-1, 2)
            items += [(self.image_token_id, int(c.numel())) for _, c, _ in self._segments(self._views(vision), sizes)]
        items += [(self.video_token_id, int(c.numel())) for _, _, c in self._video_items(vision)]
        return items

    @property
    def video_token_id(self) -> int | None:
        return getattr(self.config, "video_token_id", None)

    # ---- vision side -----------------------------------------------------------------------------------------
    def encode_images(self, vision: dict) -> EncodedImages:
        items, pinned, token_ids = [], [], []
        if vision.get("pixel_values") is not None:
            for tokens, pins in self._encode_images(vision):
                items.append(tokens)
                pinned.append(pins)
                token_ids.append(self.image_token_id)
        if vision.get("pixel_values_videos") is not None:
            for tokens, pins in self._encode_videos(vision):
                items.append(tokens)
                pinned.append(pins)
                token_ids.append(self.video_token_id)
        return EncodedImages.from_items(items, token_ids, pinned)

    def _tower(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre (views, L, Dv), feats (views, L, D), attention (views, L)) of a stack of views."""
        out = self.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layers = self._feature_layers()
        pre = torch.cat([out.hidden_states[i][:, self._drop_cls:] for i in layers], dim=-1)
        attn = self._attention(out.hidden_states, layers[-1]) if self.needs_attention else None
        return pre, self.projector(pre), attn

    def _encode_images(self, vision: dict) -> list[tuple[VisionTokens, Pinned]]:
        pixels, sizes = vision["pixel_values"], torch.as_tensor(vision["image_sizes"]).view(-1, 2)
        views = self._views(vision)
        if pixels.dim() == 5:  # (images, most views, C, H, W), padded on the view axis
            pixels = torch.cat([p[:v] for p, v in zip(pixels, views, strict=True)])
        pre, feats, attn = self._tower(pixels)
        valid = torch.cat([self._tile_validity(s, v) for s, v in zip(sizes.tolist(), views, strict=True)])

        def pack(t: torch.Tensor, newline: torch.Tensor | None = None) -> list[torch.Tensor]:
            newline = torch.zeros(t.shape[-1], dtype=t.dtype, device=t.device) if newline is None else newline
            return self._pack(list(t.split(views)), sizes, newline)

        packed = pack(feats, self.model.model.image_newline)
        packed_pre = pack(pre)
        packed_attn = None if attn is None else pack(attn.unsqueeze(-1))
        packed_valid = pack(valid.unsqueeze(-1).to(pre.device, pre.dtype))
        out, start = [], {}
        for i, content, grid in self._segments(views, sizes):
            lo = start.get(i, 0)
            start[i] = lo + content.numel()
            span = slice(lo, lo + content.numel())
            content = content.to(pre.device)
            at, newline = content.nonzero().flatten(), (~content).nonzero().flatten()
            pick = lambda t, span=span, at=at: t[span][at]  # noqa: E731
            tokens = VisionTokens(feats=pick(packed[i]).unsqueeze(0), pre=pick(packed_pre[i]).unsqueeze(0),
                                  cls_attn=None if attn is None else pick(packed_attn[i])[:, 0].unsqueeze(0),
                                  valid=(pick(packed_valid[i])[:, 0] > 0.5).unsqueeze(0), grid=grid)
            out.append((tokens, Pinned(run_length=int(content.numel()), content_at=at, pinned_at=newline,
                                       feats=packed[i][span][newline])))
        return out

    def _encode_videos(self, vision: dict) -> list[tuple[VisionTokens, Pinned]]:
        """OneVision video: every frame through the tower, pooled by the model's own `apply_pooling`."""
        videos = vision["pixel_values_videos"]
        count, frames = videos.shape[:2]
        pre, feats, attn = self._tower(videos.flatten(0, 1))
        pool = self.model.model.apply_pooling
        pre, feats = pool(pre), pool(feats)  # (videos * frames, P, .)
        attn = None if attn is None else pool(attn.unsqueeze(-1))[..., 0]
        side = math.ceil(self.side / 2)
        per_frame = side * side
        newline = self.model.model.image_newline
        out = []
        for b, first, content in self._video_items(vision):
            n_frames = int(content.sum()) // per_frame
            rows = slice(b * frames + first, b * frames + first + n_frames)
            at = torch.arange(n_frames * per_frame, device=pre.device)
            ends = (~content).nonzero().flatten().to(pre.device)
            tokens = VisionTokens(feats=feats[rows].reshape(1, -1, feats.shape[-1]),
                                  pre=pre[rows].reshape(1, -1, pre.shape[-1]),
                                  cls_attn=None if attn is None else attn[rows].reshape(1, -1),
                                  grid=(n_frames * side, side))
            out.append((tokens, Pinned(run_length=int(content.numel()), content_at=at, pinned_at=ends,
                                       feats=newline.expand(ends.numel(), -1))))
        return out

    def _attention(self, hidden: tuple[torch.Tensor, ...], feature_layer: int) -> torch.Tensor:
        """(views, L) attention of each view to its tokens: [CLS] (CLIP) or the mean over queries (SigLIP)."""
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # older layouts nest it
        layers = tower.encoder.layers
        if self._drop_cls:
            return cls_attention(layers, hidden, feature_layer, self._drop_cls)
        layer_idx = (feature_layer % len(hidden)) - 1
        layer = layers[layer_idx]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden[layer_idx])
        views, length, _ = x.shape
        q = attn.q_proj(x).view(views, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(views, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        return torch.stack([mean_query_attention(q[v], k[v], attn.scale) for v in range(views)])

    def _canvas(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The processor's tile canvas for a (height, width) image: ((canvas height, width) of the best grid
        pinpoint, (height, width) of the image resized into it keeping its aspect ratio, (top, left) where it is
        centred)."""
        canvas_h, canvas_w = select_best_resolution((height, width), self.config.image_grid_pinpoints)
        image = np.broadcast_to(np.zeros(1, dtype=np.uint8), (1, height, width))
        new_h, new_w = get_patch_output_size(image, (canvas_h, canvas_w), input_data_format=ChannelDimension.FIRST)
        return (canvas_h, canvas_w), (new_h, new_w), ((canvas_h - new_h) // 2, (canvas_w - new_w) // 2)

    def _tile_validity(self, size: list[int], views: int) -> torch.Tensor:
        """(views, L) float: 1 where a token shows the image, 0 where it shows padding, from the processor's fit:
        the base view is the whole image squashed (no padding); tiles cut a canvas of the best grid pinpoint in
        which the image is resized keeping its aspect ratio and centred; a single pad-to-square view (OneVision,
        several images per prompt) centres the image in a square."""
        height, width = int(size[0]), int(size[1])
        length = self.side * self.side
        if views == 1:
            if self.family != "llava_onevision":
                return torch.ones(1, length)
            side = max(height, width)
            box = ((side - height) // 2, (side - width) // 2, (side - height) // 2 + height,
                   (side - width) // 2 + width)
            return box_valid_mask(box, (self.side, self.side), (side, side)).float().view(1, length)
        (canvas_h, canvas_w), (new_h, new_w), (top, left) = self._canvas(height, width)
        rows, cols = canvas_h // self.tile, canvas_w // self.tile
        grid = (rows * self.side, cols * self.side)
        mask = box_valid_mask((top, left, top + new_h, left + new_w), grid, (canvas_h, canvas_w)).float()
        # canvas token grid -> per tile (row-major tiles), each tile's tokens row-major: the model's view order
        tiles = mask.view(rows, self.side, cols, self.side).permute(0, 2, 1, 3).reshape(rows * cols, length)
        if math.prod(tiles.shape) != (views - 1) * length:
            raise ValueError(f"image of {height}x{width}: the processor's grid gives {rows * cols} tiles, the model "
                             f"expects {views - 1}: processor and model do not match")
        return torch.cat([torch.ones(1, length), tiles])

    # ---- overlay geometry -------------------------------------------------------------------------------------
    def item_geometry(self, inputs: dict, image_sizes: list[tuple[int, int]] | None = None,
                      video_sizes: list[tuple[int, int]] | None = None, processor=None) -> list[GridView]:
        """Per image: the base view is the whole picture squashed (box = the picture); the tiles are the picture
        resized into the best pinpoint canvas keeping its aspect ratio and centred, cut into tiles. The model
        unpads the tiles' token grid and OneVision may shrink it bilinearly (anyres_max): the final grid's shape is
        read from the model's own packing (`_content`: one newline per row), its box is the unpadded canvas region
        mapped back onto the picture (`_tile_box`). Base and tiles are one item (the tiles' grid starts after the
        base's side x side tokens), or two with `views="view"`. A lone OneVision view of a multi-image prompt is the
        picture padded to a centred square. Video: one pooled ceil(side/2)^2 grid per frame over the whole frame,
        stacked in its item (`_video_items`: a clip, or one frame with `video="frame"`)."""
        images, videos = image_sizes or [], video_sizes or []
        views, item = [], 0
        side = self.side
        if images:
            sizes = torch.as_tensor(inputs["image_sizes"]).view(-1, 2)
            counts = self._views(inputs)
            contents = self._content(counts, sizes)
            for i, ((h, w), v, content) in enumerate(zip(images, counts, contents, strict=True)):
                base = (0.0, 0.0, float(h), float(w))  # the base view squashes the whole picture
                if v == 1:
                    if self.family == "llava_onevision":  # a lone view of a multi-image prompt: centred square
                        s = max(h, w)
                        t, left = (s - h) // 2, (s - w) // 2
                        base = (-t, -left, s - t, s - left)
                    views.append(GridView(item, 0, (side, side), base, ("image", i), f"image {i}"))
                    item += 1
                    continue
                tiles = content[side * side:]
                rows = int((~tiles).sum())  # one newline per row of the (unpadded, possibly shrunk) tile grid
                cols = int(tiles.sum()) // rows
                tile_box = self._tile_box(h, w)
                apart = self.view_unit == "view"
                views.append(GridView(item, 0, (side, side), base, ("image", i), f"image {i} base"))
                views.append(GridView(item + apart, 0 if apart else side * side, (rows, cols), tile_box, ("image", i),
                                      f"image {i} tiles"))
                item += 1 + apart
        for b, first, content in self._video_items(inputs):
            per = math.ceil(side / 2)
            frames = int(content.sum()) // (per * per)
            fh, fw = videos[b]
            for f in range(frames):
                views.append(GridView(item, f * per * per, (per, per), (0.0, 0.0, fh, fw), ("video", b, first + f),
                                      f"video {b} frame {first + f}"))
            item += 1
        return views

    def _tile_box(self, h: int, w: int) -> tuple[float, float, float, float]:
        """The picture box the unpadded tile grid of an (h, w) image covers (before any anyres_max shrink, which
        resamples the same region): the processor's canvas (`_canvas`), the model's own `unpad_image` run on a grid
        of token coordinates, mapped back to picture pixels."""
        (canvas_h, canvas_w), (new_h, new_w), (top, left) = self._canvas(h, w)
        rows, cols = canvas_h // self.tile * self.side, canvas_w // self.tile * self.side
        coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).float()
        kept = self._module.unpad_image(coords, [h, w])
        r0, c0 = int(kept[0, 0, 0]), int(kept[1, 0, 0])
        r1, c1 = int(kept[0, -1, 0]) + 1, int(kept[1, 0, -1]) + 1
        patch = self.tile / self.side  # canvas pixels per token
        sy, sx = h / new_h, w / new_w
        return ((r0 * patch - top) * sy, (c0 * patch - left) * sx, (r1 * patch - top) * sy, (c1 * patch - left) * sx)

    # ---- language side ----------------------------------------------------------------------------------------
    def default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool, vision: dict
    ) -> torch.Tensor:
        return text_position_ids(input_ids, attention_mask, for_generation)
