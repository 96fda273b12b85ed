"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP-style vision tower, MLP projector, Llama-family LM."""

from __future__ import annotations

import sys

import torch
from torch import nn

from modules.debias import pad_to_square_valid_mask
from modules.vlm.base import VisionTokens, VLMAdapter, gather_last


class LlavaAdapter(VLMAdapter):
    model_types = ("llava",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
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
    def _feature_layers(self) -> list[int]:
        layer = self.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def encode(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisionTokens:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        layers = self._feature_layers()
        pre = torch.cat([hidden[i][:, self._drop_cls:] for i in layers], dim=-1)
        feats = self.projector(pre)
        cls_attn = self._cls_attention(hidden, layers[-1])
        n_img = pixel_values.shape[0]
        valid = None
        if image_sizes is not None:
            valid = self._pad_valid(image_sizes, n_img, pixel_values.device)
        grid = (self.patch_grid, self.patch_grid) if self._drop_cls else None
        return VisionTokens(feats=feats, pre=pre, cls_attn=cls_attn, valid=valid, grid=grid)

    def _cls_attention(self, hidden: tuple[torch.Tensor, ...], feature_layer: int) -> torch.Tensor:
        """[CLS]-to-patch attention of the layer that produces hidden[feature_layer], mean over heads.

        Recomputed from that layer's input with its own layer norm and q/k projections: one query row, so the
        tower keeps running with SDPA/flash attention.
        """
        n_layers = len(hidden) - 1
        layer_idx = (feature_layer % (n_layers + 1)) - 1
        if layer_idx < 0:
            raise ValueError(f"vision_feature_layer {feature_layer} selects the embeddings: no attention to read")
        layer = self._vision_layers()[layer_idx]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden[layer_idx])
        b, length, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # (B, H, 1, L)
        return probs.mean(dim=1)[:, 0, self._drop_cls:]

    def _vision_layers(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # older layouts nest it
        return tower.encoder.layers

    def _pad_valid(self, image_sizes: torch.Tensor, n_img: int, device) -> torch.Tensor:
        sizes = torch.as_tensor(image_sizes).view(-1, 2).tolist()
        if len(sizes) != n_img:
            raise ValueError(f"image_sizes has {len(sizes)} entries for {n_img} images")
        image_size = self.config.vision_config.image_size
        masks = [pad_to_square_valid_mask(int(w), int(h), grid=self.patch_grid, image_size=image_size)
                 for h, w in sizes]
        valid = torch.stack(masks).to(device)
        if not self._drop_cls:
            valid = torch.cat([torch.ones(n_img, 1, dtype=torch.bool, device=device), valid], dim=1)
        return valid

    # ---- language side ----------------------------------------------------------------------------------------
    def default_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, for_generation: bool
    ) -> torch.Tensor:
        if for_generation:  # what GenerationMixin derives from the mask
            pos = attention_mask.long().cumsum(-1) - 1
            return pos.masked_fill(attention_mask == 0, 0)
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)

    def attention_logits(
        self, layer_idx: int, hidden_states: torch.Tensor, position_embeddings, query_index: torch.Tensor
    ) -> torch.Tensor:
        layer = self.language_layers()[layer_idx]
        attn = layer.self_attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
        x = layer.input_layernorm(hidden_states)
        b, length, _ = x.shape
        d = attn.head_dim
        cos, sin = position_embeddings
        xq = gather_last(x, query_index)
        q = attn.q_proj(xq).view(b, xq.shape[1], -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, -1, d).transpose(1, 2)
        q, _ = rope(q, q, gather_last(cos, query_index), gather_last(sin, query_index))
        k, _ = rope(k, k, cos, sin)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        return (q @ k.transpose(-1, -2)) * attn.scaling
