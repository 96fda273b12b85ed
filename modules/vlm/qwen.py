"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: native-resolution vision towers with a 2x2 patch merger, 3-D M-RoPE.

Every image (or video clip) has its own token grid: N_i = t * (h / 2) * (w / 2) merged tokens for a grid_thw of
(t, h, w) patches. What differs from LLaVA, and how this adapter follows the model's own code:
- features: `feats` = the merger's output (what the language model receives); `pre` = what the merger reads, its
  2x2 patch groups concatenated (N_i, 4 * Dv). Qwen2.5-VL's tower runs in window order: both are put back in
  raster order with the inverse of the model's own window index.
- no [CLS]: `cls_attn` = the mean over queries of one full-attention vision block's attention to each patch
  (head mean), recomputed from that block's q/k in query chunks, per image, and pooled (mean) over the 2x2 patch
  group of each merged token. Qwen2.5-VL: the last of `fullatt_block_indexes`; Qwen2-VL / Qwen3-VL: the last block.
- positions: the model's own `get_rope_index` (with `mm_token_type_ids`, `second_per_grid_ts`) gives (3, B, L)
  M-RoPE positions; kept tokens keep theirs, and generation continues from explicit positions (`rope_deltas`
  never read).
- Qwen3-VL DeepStack: the tower's intermediate features (one per `deepstack_visual_indexes` entry) are added to the
  visual positions after the first decoder layers. They travel with each token (`VisionTokens.extras`) and are
  handed to the language model for exactly the kept tokens.
- video: a clip is one item over its t * h/2 * w/2 tokens (grid stacked frame over frame), or with
  `video="frame"` each temporal patch is an item of its own (its own budget).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from modules.vlm.base import EncodedImages, GridView, Spliced, VisionTokens, VLMAdapter, mean_query_attention

VIDEO_UNITS = ("clip", "frame")


class QwenVLAdapter(VLMAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    vision_inputs = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                     "second_per_grid_ts", "mm_token_type_ids", "image_sizes")
    private_inputs = ("image_sizes",)

    def __init__(self, model: nn.Module, processor=None):
        super().__init__(model, processor)
        self.config = model.config
        self.visual = model.model.visual
        self.merge = self.config.vision_config.spatial_merge_size
        self.family = self.config.model_type
        self.video_unit = "clip"

    # ---- identity ------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.config.video_token_id

    @property
    def feature_dims(self) -> dict[str, int]:
        vc = self.config.vision_config
        width = vc.embed_dim if self.family == "qwen2_vl" else vc.hidden_size
        return {"pre": width * self.merge**2, "post": self.config.text_config.hidden_size}

    def language_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def deepstack_layers(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or [])

    def check_stage2_layer(self, layer: int) -> None:
        if layer < self.deepstack_layers:
            raise ValueError(
                f"layer={layer}: Qwen3-VL adds DeepStack features to the visual tokens after decoder layers "
                f"0..{self.deepstack_layers - 1}, so stage 2 can prune from layer {self.deepstack_layers} on"
            )

    # ---- the visual items of a call --------------------------------------------------------------------------
    def _items(self, vision: dict) -> list[tuple[int, int, tuple[int, int, int]]]:
        """(token id, N_i, merged (t, h, w)) per item: images, then videos (clips, or frames)."""
        if self.video_unit not in VIDEO_UNITS:
            raise ValueError(f"video={self.video_unit!r}: use one of {VIDEO_UNITS}")
        items = []
        for key, token_id in (("image_grid_thw", self.image_token_id), ("video_grid_thw", self.video_token_id)):
            grids = vision.get(key)
            if grids is None:
                continue
            for t, h, w in torch.as_tensor(grids).view(-1, 3).tolist():
                h, w = h // self.merge, w // self.merge
                if token_id == self.video_token_id and self.video_unit == "frame":
                    items += [(token_id, h * w, (1, h, w))] * t
                else:
                    items.append((token_id, t * h * w, (t, h, w)))
        return items

    def visual_items(self, vision: dict) -> list[tuple[int, int]]:
        for pixels, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if vision.get(pixels) is not None and vision.get(grids) is None:
                raise ValueError(f"{pixels} were given without {grids}: pass the processor's whole output")
        return [(token_id, n) for token_id, n, _ in self._items(vision)]

    # ---- vision side -----------------------------------------------------------------------------------------
    def encode_images(self, vision: dict) -> EncodedImages:
        items, token_ids = [], []
        for pixels_key, grids_key, token_id in (("pixel_values", "image_grid_thw", self.image_token_id),
                                                ("pixel_values_videos", "video_grid_thw", self.video_token_id)):
            if vision.get(pixels_key) is None:
                continue
            grids = torch.as_tensor(vision[grids_key]).view(-1, 3)
            for tokens, (t, _, _) in zip(self._encode(vision[pixels_key], grids), grids.tolist(), strict=True):
                per_frame = token_id == self.video_token_id and self.video_unit == "frame"
                frames = self._split_frames(tokens, int(t)) if per_frame else [tokens]
                items += frames
                token_ids += [token_id] * len(frames)
        return EncodedImages.from_items(items, token_ids)

    def _encode(self, pixels: torch.Tensor, grids: torch.Tensor) -> list[VisionTokens]:
        """Run the tower on the flat patches of several images; one VisionTokens (B = 1) per image, raster order."""
        captured = {}
        block = self.visual.blocks[self._score_block()]

        def capture(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["cu_seqlens"] = kwargs["cu_seqlens"]
            captured["position_embeddings"] = kwargs["position_embeddings"]

        handle = block.register_forward_pre_hook(capture, with_kwargs=True) if self.needs_attention else None
        try:
            out = self.visual(pixels.to(self.visual.dtype), grid_thw=grids.to(pixels.device), return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        group = self.merge**2
        pre = out.last_hidden_state.view(-1, group * out.last_hidden_state.shape[-1])  # (sum N, 4 Dv)
        feats = out.pooler_output  # merged tokens, raster order
        attn = None
        if self.needs_attention:  # (sum N,): a softmax over every patch pair of each image: only when read
            attn = self._mean_query_attention(block, captured).view(-1, group).mean(dim=1)
        deepstack = [f.view(-1, f.shape[-1]) for f in (getattr(out, "deepstack_features", None) or [])]
        if self.family == "qwen2_5_vl":  # the tower's window order back to raster order
            raster = torch.argsort(self._window_index(grids).to(pre.device))
            pre, attn = pre[raster], (None if attn is None else attn[raster])
        sizes = (grids.prod(dim=-1) // group).tolist()
        merged = [(int(t), int(h) // self.merge, int(w) // self.merge) for t, h, w in grids.tolist()]
        result = []
        attns = [None] * len(sizes) if attn is None else attn.split(sizes)
        for i, (p, f, a, (t, h, w)) in enumerate(zip(pre.split(sizes), feats.split(sizes), attns, merged,
                                                     strict=True)):
            extras = {}
            if deepstack:
                extras["deepstack"] = torch.stack([d.split(sizes)[i] for d in deepstack], dim=1).unsqueeze(0)
            result.append(VisionTokens(feats=f.unsqueeze(0), pre=p.unsqueeze(0),
                                       cls_attn=None if a is None else a.unsqueeze(0),
                                       grid=(t * h, w), extras=extras))
        return result

    @staticmethod
    def _split_frames(tokens: VisionTokens, frames: int) -> list[VisionTokens]:
        """A clip's tokens (grid (t * h, w), frame after frame) as t items of grid (h, w)."""
        size = tokens.num_tokens // frames
        grid = (tokens.grid[0] // frames, tokens.grid[1])

        def cut(t, f):
            return None if t is None else t[:, f * size:(f + 1) * size]

        return [VisionTokens(feats=cut(tokens.feats, f), pre=cut(tokens.pre, f), cls_attn=cut(tokens.cls_attn, f),
                             grid=grid, extras={k: cut(v, f) for k, v in tokens.extras.items()})
                for f in range(frames)]

    def _score_block(self) -> int:
        full = getattr(self.config.vision_config, "fullatt_block_indexes", None)
        return full[-1] if full else len(self.visual.blocks) - 1

    def _window_index(self, grids: torch.Tensor) -> torch.Tensor:
        module = sys.modules[type(self.visual).__module__]
        index, _ = module.get_vision_window_index(grids, spatial_merge_size=self.merge,
                                                  window_size=self.visual.window_size,
                                                  patch_size=self.visual.patch_size, kwargs={})
        return index

    @staticmethod
    def _mean_query_attention(block: nn.Module, captured: dict) -> torch.Tensor:
        """(sum L,) the mean over queries (and heads) of `block`'s attention to each patch, per attention segment
        (image or frame), from its own norm, qkv and rotary embedding; chunked over queries, never (L, L) at once."""
        attn = block.attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        x = block.norm1(captured["hidden"])
        length = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = captured["position_embeddings"]
        q, k = rope(q, k, cos, sin)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, L, d)
        bounds = captured["cu_seqlens"].tolist()
        return torch.cat([mean_query_attention(q[:, start:end], k[:, start:end], attn.scaling)
                          for start, end in zip(bounds[:-1], bounds[1:], strict=True)])

    # ---- overlay geometry -------------------------------------------------------------------------------------
    def item_geometry(self, inputs: dict, image_sizes: list[tuple[int, int]] | None = None,
                      video_sizes: list[tuple[int, int]] | None = None, processor=None) -> list[GridView]:
        """`smart_resize` resizes the whole picture (no pad, no crop) to (h, w) patches; the (h / merge) x
        (w / merge) merged tokens (`image_grid_thw`) tile it, so an image's box is the whole picture. Video: one
        grid per temporal patch, over the whole frame, shown on the patch's first frame; with `video="frame"` each
        is an item of its own, else they stack in the clip's item (frame f's grid starts at f * rows * cols)."""
        images, videos = image_sizes or [], video_sizes or []
        merge = self.merge
        views, item = [], 0
        grids = inputs.get("image_grid_thw")
        grids = torch.as_tensor(grids).view(-1, 3).tolist() if grids is not None else []
        if len(grids) != len(images):
            raise ValueError(f"image_grid_thw has {len(grids)} images, image_sizes {len(images)}")
        for i, ((_, h, w), (ph, pw)) in enumerate(zip(grids, images, strict=True)):
            views.append(GridView(item=item, start=0, grid=(h // merge, w // merge), box=(0.0, 0.0, ph, pw),
                                  picture=("image", i), label=f"image {i}"))
            item += 1
        grids = inputs.get("video_grid_thw")
        step = getattr(self.config.vision_config, "temporal_patch_size", 2)
        for v, (t, h, w) in enumerate(torch.as_tensor(grids).view(-1, 3).tolist() if grids is not None else []):
            rows, cols = h // merge, w // merge
            fh, fw = videos[v]
            for f in range(t):
                per_frame = self.video_unit == "frame"
                views.append(GridView(item=item + (f if per_frame else 0), start=0 if per_frame else f * rows * cols,
                                      grid=(rows, cols), box=(0.0, 0.0, fh, fw), picture=("video", v, f * step),
                                      label=f"video {v} frames {f * step}-{f * step + step - 1}"))
            item += t if self.video_unit == "frame" else 1
        return views

    # ---- language side ----------------------------------------------------------------------------------------
    def default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool, vision: dict
    ) -> torch.Tensor:
        """The model's own 3-D M-RoPE positions (what its forward and generate compute for this prompt)."""
        if vision.get("mm_token_type_ids") is None:
            raise ValueError("Qwen-VL inputs need mm_token_type_ids (the processor returns them): the M-RoPE "
                             "positions of the visual tokens are computed from them")
        extra = {}
        if self.family != "qwen3_vl" and vision.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = vision["second_per_grid_ts"]
        positions, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=vision["mm_token_type_ids"], image_grid_thw=vision.get("image_grid_thw"),
            video_grid_thw=vision.get("video_grid_thw"), attention_mask=attention_mask, **extra)
        return positions

    def language_kwargs(self, spliced: Spliced) -> dict:
        """Qwen3-VL: the kept tokens' DeepStack features at the kept visual positions."""
        features = spliced.vision_extras.get("deepstack")
        if features is None:
            return {}
        rows, columns = (spliced.vision_item >= 0).nonzero(as_tuple=True)
        visual = torch.zeros(spliced.attention_mask.shape, dtype=torch.bool, device=rows.device)
        visual[rows, spliced.vision_slots[rows, columns]] = True
        kept = features[rows, columns]  # (total kept, layers, D), row-major = the order the model scatters in
        embeds_dtype = spliced.inputs_embeds.dtype
        return {"visual_pos_masks": visual,
                "deepstack_visual_embeds": [kept[:, i].to(embeds_dtype) for i in range(kept.shape[1])]}
