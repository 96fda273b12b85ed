"""A FLOPs model of one prefill of a (pruned) LLaVA-style VLM, for the efficiency benchmark.

Counted: the multiply-adds of every matrix product, as 2 FLOPs each (what `torch.utils.flop_counter` counts;
norms, activations, softmax and RoPE are left out, a few percent at these shapes). For a prompt of `text` text
tokens and one image of N visual tokens (per sample; everything scales with the batch):

    vision tower   patch embedding 2 N C p^2 d_v, then per layer (T = N + [CLS] tokens, f_v = MLP width)
                   2 T (4 d_v^2 + 2 d_v f_v) + 4 T^2 d_v                  (q, k, v, o; MLP; QK^T and AV)
    projector      2 N (d_in D + D D)                                      (two linears, all N tokens)
    LM layer       2 L (D q + 2 D kv + q D + 3 D f) + 4 L^2 q             (q = heads * head_dim,
                                                                           kv = kv_heads * head_dim, gated MLP)
                   with L = text + n1 for layers 0..K-1 and L = text + n2 for layers K..L-1
    LM head        2 D V per sample (one row: the next-token prediction)
    pruner         [CLS] attention recompute of the feature layer: 2 T d_v^2 + 2 d_v^2 + 2 T d_v
                   stage-2 scoring at layer K-1: Q query rows of the layer's own queries against its own keys
                   (both captured as the layer computes them, not recomputed), Q x L1 logits: 2 Q L1 q

The FLOPs-ideal speed-up of a plan is FLOPs(unpruned) / FLOPs(plan) for the same configuration. The attention
term counts the full L x L products (what SDPA and eager kernels compute, causal mask or not).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """Shapes that decide the FLOPs: vision (hidden, layers, heads, MLP width, image side, patch side, feature
    layers concatenated, [CLS] tokens), projector, language model (hidden, layers, heads, kv heads, head dim, MLP
    width, vocabulary)."""

    v_hidden: int
    v_layers: int
    v_ffn: int
    image: int
    patch: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    cls_tokens: int = 1
    feature_layers: int = 1
    channels: int = 3

    @property
    def num_tokens(self) -> int:
        return (self.image // self.patch) ** 2

    @classmethod
    def from_llava_config(cls, config) -> Geometry:
        vc, tc = config.vision_config, config.get_text_config()
        layers = config.vision_feature_layer
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return cls(v_hidden=vc.hidden_size, v_layers=vc.num_hidden_layers, v_ffn=vc.intermediate_size,
                   image=vc.image_size, patch=vc.patch_size, hidden=tc.hidden_size, layers=tc.num_hidden_layers,
                   heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads, head_dim=head_dim,
                   ffn=tc.intermediate_size, vocab=tc.vocab_size,
                   feature_layers=1 if isinstance(layers, int) else len(layers))


def vision_flops(g: Geometry) -> int:
    n = g.num_tokens
    t = n + g.cls_tokens
    embed = 2 * n * g.channels * g.patch * g.patch * g.v_hidden
    layer = 2 * t * (4 * g.v_hidden**2 + 2 * g.v_hidden * g.v_ffn) + 4 * t * t * g.v_hidden
    return embed + g.v_layers * layer


def projector_flops(g: Geometry) -> int:
    return 2 * g.num_tokens * (g.v_hidden * g.feature_layers * g.hidden + g.hidden * g.hidden)


def lm_layer_flops(g: Geometry, length: int) -> int:
    q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
    return 2 * length * (g.hidden * q + 2 * g.hidden * kv + q * g.hidden + 3 * g.hidden * g.ffn) + 4 * length**2 * q


def pruner_flops(g: Geometry, stage1: bool, stage2_rows: int | None, length1: int, queries: int = 1) -> int:
    """The pruner's own products: the [CLS] attention recompute (stage 1) and the stage-2 query rows' logits
    against layer K-1's own keys (its q and k projections are reused, not recomputed)."""
    total = 0
    if stage1:
        t = g.num_tokens + g.cls_tokens
        total += 2 * t * g.v_hidden**2 + 2 * g.v_hidden**2 + 2 * t * g.v_hidden
    if stage2_rows is not None:
        q = g.heads * g.head_dim
        total += 2 * queries * length1 * q
    return total


def prefill_flops(g: Geometry, text: int, n1: int | None = None, n2: int | None = None, layer: int | None = None,
                  batch: int = 1, layers: int | None = None) -> dict[str, int]:
    """FLOPs of one prefill by part. n1 None: unpruned; n2 None: no stage 2; `layers` overrides the depth (full-depth
    reference of a reduced-depth model)."""
    depth = layers or g.layers
    pruned = n1 is not None
    length1 = text + (n1 if pruned else g.num_tokens)
    k = depth if n2 is None else (layer if layer is not None else depth // 2)
    parts = {
        "vision": vision_flops(g),
        "projector": projector_flops(g),
        "lm_before_k": k * lm_layer_flops(g, length1),
        "lm_after_k": 0 if n2 is None else (depth - k) * lm_layer_flops(g, text + n2),
        "lm_head": 2 * g.hidden * g.vocab,
        "pruner": pruner_flops(g, pruned, n2, length1) if pruned else 0,
    }
    parts = {name: value * batch for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def qwen25_vl_prefill_flops(config, grid: tuple[int, int], text: int, n1: int | None = None, n2: int | None = None,
                            layer: int | None = None, batch: int = 1, layers: int | None = None,
                            score: bool = True) -> dict[str, int]:
    """FLOPs of one Qwen2.5-VL prefill with one image of (h, w) patches (N = h w / 4 merged tokens), by part.

    vision tower  Conv3d patch embedding 2 P (C T p^2) d_v over P = h w patches, then per block 2 P (3 d_v^2 + d_v^2)
                  (qkv, proj) + 2 P 3 d_v f_v (gated MLP) + 4 S d_v, where S = P^2 for full-attention blocks and
                  S = sum of squared window sizes (the model's own window partition) for windowed ones
    merger        2 N ((4 d_v)^2 + 4 d_v D)
    LM, LM head   as `prefill_flops` (Qwen2 layers: the biases are additions, not counted)
    pruner        the mean-query attention recompute of the last full-attention block (2 P d_v 3 d_v + 2 P^2 d_v;
                  only with `score`, i.e. when the stage-1 selector reads attention) and stage 2's query rows
    """
    import torch
    from transformers.vision_utils import get_vision_window_index

    vc, tc = config.vision_config, config.get_text_config()
    h, w = grid
    patches = h * w
    n = patches // vc.spatial_merge_size**2
    dv, fv = vc.hidden_size, vc.intermediate_size
    _, cu = get_vision_window_index(torch.tensor([[1, h, w]]), spatial_merge_size=vc.spatial_merge_size,
                                    window_size=vc.window_size, patch_size=vc.patch_size)
    windows = (cu[1:] - cu[:-1]).tolist()
    full = set(vc.fullatt_block_indexes)
    embed = 2 * patches * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * dv
    blocks = sum(2 * patches * 4 * dv * dv + 2 * patches * 3 * dv * fv
                 + 4 * (patches**2 if i in full else sum(x * x for x in windows)) * dv for i in range(vc.depth))
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    g = Geometry(v_hidden=dv, v_layers=0, v_ffn=fv, image=1, patch=1, hidden=tc.hidden_size,
                 layers=tc.num_hidden_layers, heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads,
                 head_dim=head_dim, ffn=tc.intermediate_size, vocab=tc.vocab_size, cls_tokens=0)
    depth = layers or g.layers
    pruned = n1 is not None
    length1 = text + (n1 if pruned else n)
    k = depth if n2 is None else (layer if layer is not None else depth // 2)
    merge_dim = dv * vc.spatial_merge_size**2
    parts = {
        "vision": embed + blocks,
        "projector": 2 * n * (merge_dim * merge_dim + merge_dim * tc.hidden_size),
        "lm_before_k": k * lm_layer_flops(g, length1),
        "lm_after_k": 0 if n2 is None else (depth - k) * lm_layer_flops(g, text + n2),
        "lm_head": 2 * tc.hidden_size * tc.vocab_size,
        "pruner": ((2 * patches * dv * 3 * dv + 2 * patches**2 * dv if score else 0)
                   + pruner_flops(g, False, n2, length1)) if pruned else 0,
    }
    parts = {name: value * batch for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts
