"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP-style vision tower, MLP projector, Llama-family LM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modules.vlm.base import EncodedImages, GridView, VisionTokens, VLMAdapter, box_valid_mask


@dataclass(frozen=True)
class ImageFit:
    """How a LLaVA image processor fits an original image into the encoder's input frame, in its own order:
    optional pad to a centred square (`do_pad`, the original LLaVA-1.5 recipe), resize (`size`: shortest edge
    or exact height/width), optional centre crop (`crop_size`; llava-hf's CLIP image processor: the default).

    pad_to_square: bool; shortest_edge: int or None; size: (height, width) or None (when shortest_edge is set);
    crop: (height, width) or None.
    """

    pad_to_square: bool
    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None

    @classmethod
    def from_processor(cls, processor) -> ImageFit:
        ip = getattr(processor, "image_processor", processor)
        size = _as_dict(getattr(ip, "size", None)) if getattr(ip, "do_resize", True) else {}
        shortest = size.get("shortest_edge")
        exact = (size["height"], size["width"]) if size.get("height") and size.get("width") else None
        if shortest is None and exact is None and getattr(ip, "do_resize", True):
            raise ValueError(f"cannot read the resize of image processor {type(ip).__name__}: size={size!r}")
        crop = None
        if getattr(ip, "do_center_crop", False):
            crop_size = _as_dict(getattr(ip, "crop_size", None))
            crop = (crop_size["height"], crop_size["width"])
        return cls(pad_to_square=bool(getattr(ip, "do_pad", False)), shortest_edge=shortest, size=exact, crop=crop)

    def content_box(self, height: int, width: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
        """((top, left, bottom, right) of the original image's pixels, (frame height, width)) after processing."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got height={height}, width={width}")
        box = (0.0, 0.0, float(height), float(width))
        frame_h, frame_w = height, width
        if self.pad_to_square:
            side = max(height, width)
            top = (side - height) // 2 if width > height else 0  # the processor's integer centring
            left = (side - width) // 2 if height > width else 0
            box = (top, left, top + height, left + width)
            frame_h = frame_w = side
        if self.shortest_edge is not None:
            short, long = min(frame_h, frame_w), max(frame_h, frame_w)
            new_long = int(self.shortest_edge * long / short)
            new_h, new_w = (self.shortest_edge, new_long) if frame_h <= frame_w else (new_long, self.shortest_edge)
        elif self.size is not None:
            new_h, new_w = self.size
        else:
            new_h, new_w = frame_h, frame_w
        sy, sx = new_h / frame_h, new_w / frame_w
        box = (box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx)
        frame_h, frame_w = new_h, new_w
        if self.crop is not None:
            crop_h, crop_w = self.crop
            dy, dx = int((frame_h - crop_h) / 2.0), int((frame_w - crop_w) / 2.0)
            box = (box[0] - dy, box[1] - dx, box[2] - dy, box[3] - dx)
            frame_h, frame_w = crop_h, crop_w
        return box, (frame_h, frame_w)


def pad_to_square_valid_mask(
    width: int, height: int, grid: int = 24, image_size: int = 336, threshold: float = 0.5
) -> torch.Tensor:
    """Which patches of a pad-to-square image show the image (True) rather than the padding (False).

    The original LLaVA-1.5 preprocessing (and `LlavaImageProcessor(do_pad=True)`): a (width, height) image padded
    to a centred square of side max(width, height), resized to `image_size`, cut into a `grid` x `grid` patch grid.
    A patch is padding when more than `threshold` of its area lies outside the original image. Returns a
    (grid * grid,) bool tensor in row-major order. The adapter derives the mask from the processor actually used
    (`ImageFit.from_processor`); this is the same geometry for the pad-to-square processor, without one.
    """
    fit = ImageFit(pad_to_square=True, shortest_edge=None, size=(image_size, image_size), crop=None)
    box, frame = fit.content_box(height, width)
    return box_valid_mask(box, (grid, grid), frame, threshold)


def cls_attention(layers: nn.ModuleList, hidden: tuple[torch.Tensor, ...], feature_layer: int,
                  drop_cls: int) -> torch.Tensor:
    """(B, N) [CLS]-to-patch attention of the CLIP layer that produces hidden[feature_layer], mean over heads.

    Recomputed from that layer's input with its own layer norm and q/k projections: one query row, so the tower
    keeps running with SDPA/flash attention.
    """
    n_layers = len(hidden) - 1
    layer_idx = (feature_layer % (n_layers + 1)) - 1
    if layer_idx < 0:
        raise ValueError(f"vision_feature_layer {feature_layer} selects the embeddings: no attention to read")
    layer = layers[layer_idx]
    attn = layer.self_attn
    x = layer.layer_norm1(hidden[layer_idx])
    b, length, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # (B, H, 1, L)
    return probs.mean(dim=1)[:, 0, drop_cls:]


def text_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool) -> torch.Tensor:
    """1-D RoPE positions as the HF model derives them: from the mask in generate(), 0..L-1 in a forward."""
    if for_generation:  # what GenerationMixin derives from the mask
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


def _as_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k, None) for k in ("shortest_edge", "height", "width")}


class LlavaAdapter(VLMAdapter):
    model_types = ("llava",)
    private_inputs = ("image_sizes",)  # the original sizes, for validity; LLaVA's forward reads no such input

    def __init__(self, model: nn.Module, processor=None):
        super().__init__(model, processor)
        self.image_fit = None if processor is None else ImageFit.from_processor(processor)
        cfg = model.config
        self.config = cfg
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.language_model = model.model.language_model
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
        vc = cfg.vision_config
        self.patch_grid = vc.image_size // vc.patch_size
        self._drop_cls = 1 if cfg.vision_feature_select_strategy == "default" else 0

    # ---- identity ------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        return self.patch_grid**2 + 1 - self._drop_cls

    @property
    def feature_dims(self) -> dict[str, int]:
        return {"pre": self.config.vision_config.hidden_size * len(self._feature_layers()),
                "post": self.config.text_config.hidden_size}

    def language_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    # ---- vision side -----------------------------------------------------------------------------------------
    def visual_items(self, vision: dict) -> list[tuple[int, int]]:
        return [(self.image_token_id, self.num_image_tokens)] * vision["pixel_values"].shape[0]

    def encode_images(self, vision: dict) -> EncodedImages:
        return EncodedImages.uniform(self.encode(vision["pixel_values"], vision.get("image_sizes")),
                                     self.image_token_id)

    def _feature_layers(self) -> list[int]:
        layer = self.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionTokens:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        layers = self._feature_layers()
        pre = torch.cat([hidden[i][:, self._drop_cls:] for i in layers], dim=-1)
        feats = self.projector(pre)
        cls_attn = cls_attention(self._vision_layers(), hidden, layers[-1], self._drop_cls)
        n_img = pixel_values.shape[0]
        valid = None
        if image_sizes is not None:
            valid = self._pad_valid(image_sizes, n_img, pixel_values.device)
        grid = (self.patch_grid, self.patch_grid) if self._drop_cls else None
        return VisionTokens(feats=feats, pre=pre, cls_attn=cls_attn, valid=valid, grid=grid)

    def _vision_layers(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # older layouts nest it
        return tower.encoder.layers

    def _pad_valid(self, image_sizes: torch.Tensor, n_img: int, device) -> torch.Tensor | None:
        """(n_img, N) validity of each token from the images' original sizes and the processor's fit; None when
        every token shows image content (centre crop, plain resize: nothing to mark)."""
        if self.image_fit is None:
            raise ValueError(
                "image_sizes were given, but not the processor that made pixel_values: whether a token shows padding "
                "depends on it (llava-hf processors centre-crop: no padding; do_pad=True pads to square). Pass "
                "PrunedVLM(model, plan, processor=processor), or leave image_sizes out"
            )
        sizes = torch.as_tensor(image_sizes).view(-1, 2).tolist()
        if len(sizes) != n_img:
            raise ValueError(f"image_sizes has {len(sizes)} entries for {n_img} images")
        grid = (self.patch_grid, self.patch_grid)
        image_size = self.config.vision_config.image_size
        masks = []
        for h, w in sizes:
            box, frame = self.image_fit.content_box(int(h), int(w))
            if frame != (image_size, image_size):
                raise ValueError(f"the processor turns a {int(h)}x{int(w)} image into {frame[0]}x{frame[1]} pixels, the "
                                 f"vision tower takes {image_size}x{image_size}: processor and model do not match")
            masks.append(box_valid_mask(box, grid, frame))
        valid = torch.stack(masks).to(device)
        if bool(valid.all()):
            return None
        if not self._drop_cls:
            valid = torch.cat([torch.ones(n_img, 1, dtype=torch.bool, device=device), valid], dim=1)
        return valid

    # ---- overlay geometry -------------------------------------------------------------------------------------
    def item_geometry(self, inputs: dict, image_sizes: list[tuple[int, int]] | None = None,
                      video_sizes: list[tuple[int, int]] | None = None, processor=None) -> list[GridView]:
        """One (g x g) grid per image: the processor's fit (`ImageFit`: pad to square / resize / centre crop) gives
        the frame the patch grid tiles; that frame mapped back onto the picture is the box (beyond the picture
        where the processor padded, inside it where it cropped). With the "full" strategy token 0 is [CLS], which
        has no place in the picture: the grid starts at token 1. `processor` is needed when the adapter was built
        without one (the fit decides which part of the picture each token shows)."""
        fit = self.image_fit
        if fit is None:
            if processor is None:
                raise ValueError("the LLaVA overlay needs the processor that made pixel_values (its resize, crop or "
                                 "pad decides which part of the picture each token shows): pass processor=")
            fit = ImageFit.from_processor(processor)
        g = self.patch_grid
        start = 1 - self._drop_cls  # the "full" strategy keeps [CLS] as token 0: no place in the picture
        views = []
        for i, (h, w) in enumerate(image_sizes or []):
            (t, left, b, r), (fh, fw) = fit.content_box(h, w)
            sy, sx = h / (b - t), w / (r - left)  # frame pixels -> picture pixels
            box = (-t * sy, -left * sx, (fh - t) * sy, (fw - left) * sx)
            views.append(GridView(item=i, start=start, grid=(g, g), box=box, picture=("image", i),
                                  label=f"image {i}"))
        return views

    # ---- language side ----------------------------------------------------------------------------------------
    def default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool, vision: dict
    ) -> torch.Tensor:
        return text_position_ids(input_ids, attention_mask, for_generation)
