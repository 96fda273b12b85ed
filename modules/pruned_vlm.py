"""Apply a two-stage pruning plan to a Hugging Face VLM, for forward passes and cached generation.

image -> vision tokens -> stage 1 (keep n1 per image) -> splice into the prompt (original positions kept)
      -> decoder layers 0..K-1 -> stage 2 at layer K (keep n2 per image by text-to-vision attention)
      -> decoder layers K..L-1 -> logits

Stage 2 is done with forward pre-hooks on the decoder layers: the model's own modeling code runs unchanged; the
hooks cut the hidden states, rotary embeddings and attention mask of layers >= K down to the surviving rows.
Layers >= K therefore cache fewer keys and values, and `generate()` decodes against that smaller cache.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from transformers import DynamicCache

from modules.budget import check_budget_spec, resolve_budget, topk_keep
from modules.config import to_config
from modules.scorers.base import SCORERS, Scorer, Stage2Context
from modules.selectors.base import SELECTORS, Selector, TrainSelection
from modules.vlm import get_adapter
from modules.vlm.base import (
    EncodedImages,
    KeptItem,
    Spliced,
    VisionTokens,
    VLMAdapter,
    gather_last,
    left_align,
)


def _resolve(spec, registry, base: type, what: str):
    if spec is None or isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return registry.build(spec)
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if name is None:
            raise ValueError(f"a {what} given as a mapping needs a 'name' key, got {spec!r}")
        return registry.build(name, **params)
    raise ValueError(f"{what} must be a registered name, a {{'name': ...}} mapping or a {base.__name__}, "
                     f"got {spec!r}")


@dataclass
class PruningPlan:
    """Which selector keeps how many tokens where.

    stage1 / stage2: a registered name ("random", "fastv", ...), a mapping {"name": ..., **params}, or an
        instance. None disables the stage; `PruningPlan()` is the unpruned model.
    n1 / n2: kept visual tokens per image, an int count or a float ratio of N. n2 <= n1.
    layer: decoder layer K at whose input stage 2 prunes (scores come from layer K-1); default L // 2.
    video: "clip" (default): a video is one item, its budget counts the whole clip's tokens and a selector ranks
        them all together (frames compete); "frame": each frame (temporal patch) is an item with its own budget.
    views: "image" (default): an AnyRes image (LLaVA-NeXT / OneVision: base view + tiles) is one item with one
        budget; "view": its base view and its tile grid are two items, each with its own budget and grid.
    """

    stage1: Any = None
    n1: int | float | None = None
    stage2: Any = None
    n2: int | float | None = None
    layer: int | None = None
    video: str = "clip"
    views: str = "image"
    selector: Selector | None = field(init=False, repr=False, default=None)
    scorer: Scorer | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self.selector = _resolve(self.stage1, SELECTORS, Selector, "stage1")
        self.scorer = _resolve(self.stage2, SCORERS, Scorer, "stage2")
        if self.selector is not None:
            if self.n1 is None:
                raise ValueError("stage1 is set but n1 is not: give the number (or ratio) of tokens to keep")
            check_budget_spec(self.n1, "n1")
        if self.scorer is not None:
            if self.n2 is None:
                raise ValueError("stage2 is set but n2 is not: give the number (or ratio) of tokens to keep")
            check_budget_spec(self.n2, "n2")
        if self.selector is None and self.n1 is not None:
            raise ValueError(f"n1={self.n1} is set but stage1 is not")
        if self.scorer is None and (self.n2 is not None or self.layer is not None):
            raise ValueError(f"n2={self.n2} / layer={self.layer} are set but stage2 is not")
        if self.video not in ("clip", "frame"):
            raise ValueError(f"video={self.video!r}: use 'clip' (one budget per video) or 'frame' (per frame)")
        if self.views not in ("image", "view"):
            raise ValueError(f"views={self.views!r}: use 'image' (one budget per image) or 'view' (per view)")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"layer must be an int, got {self.layer!r}")
        if type(self.n1) is type(self.n2) and self.n1 is not None and self.n2 > self.n1:
            raise ValueError(f"n2={self.n2} exceeds n1={self.n1}: stage 2 can only drop tokens stage 1 kept")

    @property
    def is_noop(self) -> bool:
        return self.selector is None and self.scorer is None

    def budgets(self, num_tokens: int) -> tuple[int, int | None]:
        """(n1, n2) as counts for N = num_tokens visual tokens per image."""
        n1 = num_tokens if self.selector is None else resolve_budget(self.n1, num_tokens, "n1")
        if self.scorer is None:
            return n1, None
        n2 = resolve_budget(self.n2, num_tokens, "n2")
        if n2 > n1:
            raise ValueError(f"n2={self.n2} ({n2} tokens) exceeds n1={self.n1} ({n1} tokens)")
        return n1, n2

    # ---- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (selectors as {"name": ..., **params}, calibrated values included)."""
        return {
            "stage1": None if self.selector is None else to_config(self.selector),
            "n1": self.n1,
            "stage2": None if self.scorer is None else to_config(self.scorer),
            "n2": self.n2,
            "layer": self.layer,
            "video": self.video,
            "views": self.views,
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PruningPlan:
        unknown = set(config) - {"stage1", "n1", "stage2", "n2", "layer", "video", "views"}
        if unknown:
            raise ValueError(f"unknown PruningPlan keys {sorted(unknown)}")
        return cls(**config)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (.json) or YAML (.yaml / .yml)."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        elif path.suffix in (".yaml", ".yml"):
            OmegaConf.save(OmegaConf.create(self.to_dict()), path)
        else:
            raise ValueError(f"plan file {str(path)!r} must end in .json, .yaml or .yml")

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"plan file {str(path)!r} must end in .json, .yaml or .yml")
        if not path.is_file():
            raise ValueError(f"plan file {str(path)!r} does not exist")
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
            if isinstance(raw, dict) and path.suffix != ".json":  # interpolations (${...}) as in the configs
                raw = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
        except (ValueError, UnicodeDecodeError, OmegaConfBaseException, yaml.YAMLError) as err:
            raise ValueError(f"plan file {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"plan file {str(path)!r} must hold a mapping of plan fields, got a "
                             f"{type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ValueError as err:
            raise ValueError(f"plan file {str(path)!r}: {err}") from None

    def components(self) -> list[tuple[int, Any]]:
        """(stage, component) for every selector/scorer of the plan, wrapped ones included (outer first)."""
        found = []
        for stage, top in ((1, self.selector), (2, self.scorer)):
            node = top
            while node is not None:
                found.append((stage, node))
                node = getattr(node, "inner", None)
        return found

    @contextlib.contextmanager
    def apply(self, model: nn.Module, processor=None) -> Iterator[PrunedVLM]:
        """Make `model(...)` and `model.generate(...)` prune while the context is open. Instance attributes the
        model had under those names (accelerate's dispatching `forward` of `device_map` models) come back after."""
        pruned = PrunedVLM(model, self, processor=processor)
        original_forward = model.forward
        saved = {name: vars(model)[name] for name in ("forward", "generate") if name in vars(model)}

        def forward(*args, **kwargs):
            if not pruned.adapter.has_vision(kwargs):  # text-only steps (decoding, our own calls) run unchanged
                return original_forward(*args, **kwargs)
            return pruned.forward(*args, **kwargs)

        model.forward = forward
        model.generate = pruned.generate
        try:
            yield pruned
        finally:
            for name in ("forward", "generate"):
                if name in saved:
                    setattr(model, name, saved[name])
                else:
                    delattr(model, name)


@dataclass
class PruningOutput:
    """What one pruned call decided; forward outputs carry it as `out.pruning` (generate outputs with
    `return_dict_in_generate=True` too), and `PrunedVLM.last` holds the latest one.

    kept:          {"stage1": ..., "stage2": ...} the kept tokens of every visual item (image, clip), as sorted
                   indices into that item's own N_i tokens: an (n_items, n) tensor when every item keeps the same
                   count, else a list of 1-D tensors ("stage2" only with a stage-2 scorer).
    num_tokens:    N_i of every item; budgets: {"stage1": [n1_i], "stage2": [n2_i]} the counts kept per item.
    positions:     (B, L_out) index of each output row in the unpruned sequence, -1 for filler rows (left padding
                   added when rows keep different counts) (forward only, else None).
    stage2_scores: (B, M1) the stage-2 scorer's scores of the tokens that survived stage 1, or None.
    log_prob:      (n_items,) log-probability of each sampled selection (policy training), or None.
    aux_loss:      scalar regulariser of a training selection (the soft-mask budget term), or None.
    """

    kept: dict[str, torch.Tensor | list[torch.Tensor]]
    num_tokens: list[int] = field(default_factory=list)
    budgets: dict[str, list[int]] = field(default_factory=dict)
    positions: torch.Tensor | None = None
    stage2_scores: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def stack_if_equal(parts: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """(n, k) when every part has k entries, else the list itself."""
    if parts and all(p.shape == parts[0].shape for p in parts):
        return torch.stack(parts)
    return list(parts)


def labels_at(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The label each output row predicts: row p predicts the token at p + 1 of the UNPRUNED sequence (not the
    next surviving row's token); filler rows (position -1) predict nothing (-100)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return shifted.gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -100)


@dataclass
class Stage1:
    """Stage 1's decision for every item of a call (see `TrainSelection` for the training fields)."""

    keep: list[torch.Tensor]
    scale: list[torch.Tensor | None]
    key_bias: list[torch.Tensor | None]
    log_prob: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class _Stage2State:
    spliced: Spliced
    budget: torch.Tensor  # (B, images) n2 of each item of each row
    query_end: torch.Tensor | None = None
    captured: tuple | None = None  # (hidden_states, position_embeddings) at the input of layer K-1
    keys: torch.Tensor | None = None  # layer K-1's own k_proj output on the spliced sequence
    queries: torch.Tensor | None = None  # and its q_proj output
    rows: torch.Tensor | None = None  # (B', L2) surviving rows of the spliced sequence
    filler: torch.Tensor | None = None  # (B', L2) rows that are left padding (None: every row keeps as many)
    kept: list[torch.Tensor] | None = None  # per item, stage-2 selection as indices into its N_i
    scores: torch.Tensor | None = None  # (B, M1) stage-2 scores


class PrunedVLM(nn.Module):
    """A transformers VLM that prunes visual tokens according to a `PruningPlan`.

    Takes the same inputs as the wrapped model (processor output: `pixel_values`, and for Qwen2-VL/2.5-VL/3-VL
    `image_grid_thw`, `mm_token_type_ids`, `pixel_values_videos`, `video_grid_thw`, ...), plus optional
    `image_sizes` (n_images, 2) = the original (height, width) of each image for LLaVA: with `processor` (the one
    that made `pixel_values`) the adapter derives which tokens show only padding (pad-to-square processors) and
    never keeps them while real ones remain. Every visual item (image, or video clip / frame) has its own N_i
    tokens; budgets are per item (a ratio r keeps round(r * N_i), at least 1; a count larger than an item's N_i is a
    ValueError).
    Logits are returned for the positions that survive pruning; text tokens always survive, so the last row is
    the next-token prediction. When items of different rows keep different counts, shorter rows are left-padded
    ("filler" rows, `out.pruning.positions` -1).
    Each call's decisions come back with its output (`out.pruning`, a `PruningOutput`); `last` (and `last_kept`,
    `last_positions`, ... for convenience) hold the latest call's.
    """

    def __init__(self, model: nn.Module, plan: PruningPlan, processor=None):
        super().__init__()
        self.model = model
        self.plan = plan
        self.adapter: VLMAdapter = get_adapter(model, processor)
        self.adapter.video_unit = plan.video
        self.adapter.view_unit = plan.views
        # towers without [CLS] pay a full-attention pass for the score: only when the stage-1 selector reads it
        self.adapter.needs_attention = plan.selector is None or plan.selector.needs_attention()
        self.selector = plan.selector  # registered as a submodule when it is one (learned heads)
        self.scorer = plan.scorer
        if hasattr(self.selector, "check_compatible"):
            self.selector.check_compatible(self.adapter)
        self.layer = None
        if plan.scorer is not None:
            n_layers = self.adapter.num_layers
            self.layer = plan.layer if plan.layer is not None else n_layers // 2
            if not 1 <= self.layer <= n_layers - 1:
                raise ValueError(f"layer={self.layer} is outside [1, {n_layers - 1}] for a language model with "
                                 f"{n_layers} layers (stage 2 scores with layer K-1 and prunes from layer K)")
            self.adapter.check_stage2_layer(self.layer)
            impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
            if impl == "flex_attention":
                raise ValueError("stage-2 pruning does not support attn_implementation='flex_attention'")
        self.observers: dict[int, list] = {1: [], 2: []}  # calibration: components fed every batch's inputs
        self.last: PruningOutput | None = None

    # ---- the latest call's decisions, for convenience (each call also returns them) ----------------------
    @property
    def last_kept(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        return {} if self.last is None else self.last.kept

    @property
    def last_positions(self) -> torch.Tensor | None:
        return None if self.last is None else self.last.positions

    @property
    def last_stage2_scores(self) -> torch.Tensor | None:
        return None if self.last is None else self.last.stage2_scores

    @property
    def last_log_prob(self) -> torch.Tensor | None:
        return None if self.last is None else self.last.log_prob

    @property
    def last_aux_loss(self) -> torch.Tensor | None:
        return None if self.last is None else self.last.aux_loss

    # ---- public API ------------------------------------------------------------------------------------------
    def split_vision(self, kwargs: dict) -> tuple[dict, dict]:
        """(the visual inputs the adapter consumes, the rest) of a call's keyword arguments."""
        vision = {k: kwargs[k] for k in self.adapter.vision_inputs if k in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in self.adapter.vision_inputs}
        return vision, rest

    def model_vision_inputs(self, vision: dict) -> dict:
        """The visual inputs to hand the unpruned model (without those only learnprune reads)."""
        return {k: v for k, v in vision.items() if k not in self.adapter.private_inputs}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, prompt_end=None,
                vision_tokens: EncodedImages | None = None, **kwargs):
        """`prompt_end` (B,): index of the last prompt token when the sequence also holds the answer (training),
        so stage 2 scores from the prompt alone. `vision_tokens`: the encoder's output (`encode`) for the call's
        visual inputs, when the caller already has it (training several selections of one image encodes once)."""
        vision, rest = self.split_vision(kwargs)
        if self.plan.is_noop or not self.adapter.has_vision(vision):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              labels=labels, **rest, **self.model_vision_inputs(vision))
        spliced, stage1, budgets = self.prepare(input_ids, attention_mask, position_ids, vision,
                                                for_generation=False, encoded=vision_tokens, prompt_end=prompt_end)
        mask = spliced.attention_mask
        if spliced.key_bias is not None:  # soft-mask training: visual keys weighted by the head's probabilities
            mask = additive_attention_mask(spliced.attention_mask, spliced.key_bias, spliced.inputs_embeds.dtype)
        query_end = None
        if prompt_end is not None:
            real = spliced.positions >= 0
            query_end = ((spliced.positions <= prompt_end.view(-1, 1)) & real).sum(dim=1) - 1
            query_end = query_end + (~real).sum(dim=1)
        with self._stage2(spliced, budgets, query_end) as state:
            out = self.model(inputs_embeds=spliced.inputs_embeds, attention_mask=mask,
                             position_ids=spliced.position_ids, **rest)
        positions = spliced.positions if state is None else _rows_positions(spliced.positions, state)
        out.pruning = self._record(stage1, state, budgets, positions)
        if labels is not None:
            out.loss = self.model.loss_function(logits=out.logits, labels=None,
                                                shift_labels=labels_at(labels, positions),
                                                vocab_size=self.model.config.get_text_config().vocab_size)
        return out

    def _record(self, stage1: Stage1, state: _Stage2State | None, budgets: dict[str, list[int]],
                positions: torch.Tensor | None) -> PruningOutput:
        kept = {"stage1": stack_if_equal(stage1.keep)}
        if state is not None and state.kept is not None:
            kept["stage2"] = stack_if_equal(state.kept)
        self.last = PruningOutput(kept=kept, num_tokens=budgets["num_tokens"],
                                  budgets={k: v for k, v in budgets.items() if k != "num_tokens"},
                                  positions=positions, stage2_scores=None if state is None else state.scores,
                                  log_prob=stage1.log_prob, aux_loss=stage1.aux_loss)
        return self.last

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
        """Like `model.generate`: (B, L + new) token ids with the prompt first (or a generate output whose
        `sequences` are, with `return_dict_in_generate=True`)."""
        generate = type(self.model).generate
        vision, rest = self.split_vision(kwargs)
        if self.plan.is_noop or not self.adapter.has_vision(vision):
            return generate(self.model, input_ids=input_ids, attention_mask=attention_mask, **rest,
                            **self.model_vision_inputs(vision))
        if self.scorer is not None:
            self._check_dynamic_cache(rest)
        spliced, stage1, budgets = self.prepare(input_ids, attention_mask, position_ids, vision,
                                                for_generation=True)
        with self._stage2(spliced, budgets) as state:
            out = generate(self.model, inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                           position_ids=spliced.position_ids, **rest)
        pruning = self._record(stage1, state, budgets, None)
        # generating from inputs_embeds returns only the new tokens; put the prompt back in front like HF does
        # (once per returned sequence: num_return_sequences / beams give each prompt several rows)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences.to(input_ids.device)], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        out.pruning = pruning
        return out

    def _check_dynamic_cache(self, kwargs: dict) -> None:
        """Stage 2 shrinks the cache of layers >= K after prefill; caches of a fixed size cannot follow."""
        config = kwargs.get("generation_config") or self.model.generation_config
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, DynamicCache):
            implementation = type(cache).__name__
        if implementation not in (None, "dynamic"):
            raise ValueError(
                f"stage-2 pruning needs a dynamic KV cache (layers >= K keep fewer entries than layers < K); "
                f"cache_implementation={implementation!r} is not supported: use the default dynamic cache, or a "
                "plan without stage 2"
            )

    # ---- the data path -------------------------------------------------------------------------------------
    def prepare(self, input_ids, attention_mask, position_ids, vision: dict, for_generation: bool,
                encoded: EncodedImages | None = None, prompt_end: torch.Tensor | None = None
                ) -> tuple[Spliced, Stage1, dict[str, list[int]]]:
        """Stage 1: encode the visual items, select n1_i tokens of each, splice them into the prompt; returns the
        spliced inputs, the stage-1 selection and the per-item budgets {"num_tokens", "stage1", "stage2"}.
        `prompt_end` (B,): last prompt column when the sequence also holds the answer; question-aware selectors
        read the prompt only."""
        if input_ids is None:
            raise ValueError("PrunedVLM needs input_ids (to find the image tokens); inputs_embeds is not enough")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.scorer is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the batch is right-padded; stage 2 scores from the last prompt token, so tokenize "
                             "with padding_side='left'")
        layout = self.adapter.visual_items(vision)
        self.adapter.visual_spans(input_ids, [t for t, _ in layout], [n for _, n in layout])  # fail before the tower
        if position_ids is None:
            position_ids = self.adapter.default_position_ids(input_ids, attention_mask, for_generation, vision)
        if encoded is None:
            encoded = self.encode(**vision)
        elif encoded.run_lengths != [n for _, n in layout]:
            raise ValueError(f"vision_tokens hold items of {encoded.run_lengths} tokens, the inputs describe "
                             f"{[n for _, n in layout]}")
        if getattr(self.selector, "reads_prompt", False):
            encoded = self.attach_prompt(encoded, input_ids, attention_mask, prompt_end)
        budgets = self.item_budgets(encoded.lengths)
        stage1 = self.select_stage1(encoded, budgets["stage1"])
        kept = self.kept_items(encoded, stage1)
        spliced = self.adapter.splice(input_ids, attention_mask, position_ids, kept)
        if any(b is not None for b in stage1.key_bias):
            per_token = [bias[keep] for bias, keep in zip(stage1.key_bias, stage1.keep, strict=True)]
            bias = torch.zeros(spliced.attention_mask.shape, dtype=per_token[0].dtype, device=input_ids.device)
            rows, columns = (spliced.vision_item >= 0).nonzero(as_tuple=True)
            bias[rows, spliced.vision_slots[rows, columns]] = _by_column(per_token, spliced)
            spliced.key_bias = bias
        return spliced, stage1, budgets

    def item_budgets(self, lengths: list[int]) -> dict[str, list[int]]:
        """{"num_tokens": N_i, "stage1": n1_i, "stage2": n2_i (without stage 2: absent)} per item."""
        pairs = [self.plan.budgets(n) for n in lengths]
        out = {"num_tokens": list(lengths), "stage1": [n1 for n1, _ in pairs]}
        if self.scorer is not None:
            out["stage2"] = [n2 for _, n2 in pairs]
        return out

    def encode(self, pixel_values=None, image_sizes=None, **vision) -> EncodedImages:
        """Run the vision side once: the call's visual inputs (as given to the model) -> `EncodedImages`
        (`.tokens` is the single `VisionTokens` of a batch whose items share one geometry)."""
        return self.adapter.encode_images({"pixel_values": pixel_values, "image_sizes": image_sizes, **vision})

    def attach_prompt(self, encoded: EncodedImages, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_end: torch.Tensor | None = None) -> EncodedImages:
        """Give each item the input embeddings of its prompt's text tokens (for question-aware selectors): the
        tokens up to `prompt_end` (B,) when given, so that a training sequence's answer is never read."""
        spans = self.adapter.visual_spans(input_ids, encoded.token_ids, encoded.run_lengths)
        item_rows = torch.tensor([row for row, _ in spans], device=input_ids.device)
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in set(encoded.token_ids):
            visual |= input_ids == token_id
        text = attention_mask.bool() & ~visual
        if prompt_end is not None:
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = text & (columns.unsqueeze(0) <= prompt_end.to(input_ids.device).view(-1, 1))
        embeds = self.adapter.embed_tokens(input_ids).detach()
        groups = [replace(group, prompt=embeds[item_rows[members]], prompt_mask=text[item_rows[members]])
                  for group, members in zip(encoded.groups, encoded.members, strict=True)]
        return replace(encoded, groups=groups)

    def select_stage1(self, encoded: EncodedImages, n1: list[int]) -> Stage1:
        """Each geometry group's selection, per item."""
        count = encoded.num_items
        stage1 = Stage1(keep=[None] * count, scale=[None] * count, key_bias=[None] * count)
        log_probs, aux = {}, []
        for tokens, members in zip(encoded.groups, encoded.members, strict=True):
            selection = self._select_group(tokens, n1[int(members[0])])
            for row, item in enumerate(members.tolist()):
                stage1.keep[item] = selection.keep[row]
                if selection.scale is not None:
                    stage1.scale[item] = selection.scale[row]
                if selection.key_bias is not None:
                    stage1.key_bias[item] = selection.key_bias[row]
                if selection.log_prob is not None:
                    log_probs[item] = selection.log_prob[row]
            if selection.aux_loss is not None:
                aux.append((selection.aux_loss, tokens.batch_size))
        if log_probs:
            stage1.log_prob = torch.stack([log_probs[i] for i in range(count)])
        if aux:
            stage1.aux_loss = sum(loss * size for loss, size in aux) / sum(size for _, size in aux)
        return stage1

    def _select_group(self, tokens: VisionTokens, n1: int) -> TrainSelection:
        for observer in self.observers[1]:
            observer.observe(tokens)
        if self.selector is None:
            keep = torch.arange(tokens.num_tokens, device=tokens.feats.device).expand(tokens.batch_size, -1)
            return TrainSelection(keep=keep)
        trainable = getattr(self.selector, "train_select", None)
        if trainable is not None and self.selector.training and torch.is_grad_enabled():
            return trainable(tokens, n1)
        return TrainSelection(keep=self.selector.select(tokens, n1))

    @staticmethod
    def kept_items(encoded: EncodedImages, stage1: Stage1) -> list[KeptItem]:
        """The kept tokens of every item with their features (straight-through scaled when training)."""
        items: list[KeptItem | None] = [None] * encoded.num_items
        for tokens, members in zip(encoded.groups, encoded.members, strict=True):
            valid = tokens.valid_or_all()
            grid = tokens.grid if tokens.grid is not None else (1, tokens.num_tokens)
            for row, item in enumerate(members.tolist()):
                keep = stage1.keep[item]
                feats = tokens.feats[row, keep]
                if stage1.scale[item] is not None:  # straight-through: value 1, gradient to the head
                    feats = feats * stage1.scale[item].unsqueeze(-1).to(feats.dtype)
                items[item] = KeptItem(index=keep, feats=feats, valid=valid[row, keep], num_tokens=tokens.num_tokens,
                                       grid=grid, token_id=encoded.token_ids[item],
                                       extras={k: v[row, keep] for k, v in tokens.extras.items()},
                                       pinned=encoded.pinned[item])
        return items

    # ---- stage 2 ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stage2(self, spliced: Spliced, budgets: dict[str, list[int]], query_end: torch.Tensor | None = None
                ) -> Iterator[_Stage2State | None]:
        extra = self.adapter.language_kwargs(spliced)
        handles = []
        if extra:
            handles.append(self.adapter.language_model().register_forward_pre_hook(
                _inject_prefill(extra, spliced.inputs_embeds.shape[1]), with_kwargs=True))
        if self.scorer is None:
            try:
                yield None
            finally:
                for h in handles:
                    h.remove()
            return
        n2 = torch.tensor(budgets["stage2"], dtype=torch.long)
        budget = torch.zeros(spliced.attention_mask.shape[0], int(spliced.item_image.max()) + 1, dtype=torch.long)
        budget[spliced.item_row.cpu(), spliced.item_image.cpu()] = n2
        state = _Stage2State(spliced=spliced, budget=budget.to(spliced.vision_slots.device), query_end=query_end)
        layers = self.adapter.language_layers()
        k = self.layer
        handles.append(layers[k - 1].register_forward_pre_hook(self._capture_hook(state), with_kwargs=True))
        attn = getattr(layers[k - 1], "self_attn", None)
        for name in ("k_proj", "q_proj"):  # reuse the projections the layer computes anyway: nothing is recomputed
            proj = getattr(attn, name, None)
            if proj is not None:
                handles.append(proj.register_forward_hook(self._projection_hook(state, name)))
        handles += [layers[i].register_forward_pre_hook(self._prune_hook(state, i), with_kwargs=True)
                    for i in range(k, len(layers))]
        try:
            yield state
        finally:
            for h in handles:
                h.remove()
            state.captured = state.keys = state.queries = None

    def _capture_hook(self, state: _Stage2State):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if state.rows is None and hidden.shape[1] == state.spliced.inputs_embeds.shape[1]:
                state.captured = (hidden, kwargs.get("position_embeddings"))

        return hook

    @staticmethod
    def _projection_hook(state: _Stage2State, name: str):
        field = {"k_proj": "keys", "q_proj": "queries"}[name]

        def hook(module, args, output):
            if state.rows is None and output.shape[1] == state.spliced.inputs_embeds.shape[1]:
                setattr(state, field, output)

        return hook

    def _prune_hook(self, state: _Stage2State, layer_idx: int):
        first = layer_idx == self.layer

        def hook(module, args, kwargs):
            full_len = state.spliced.inputs_embeds.shape[1]
            if first and state.rows is None:
                state.rows, state.filler = self._stage2_rows(state)
                args, kwargs = _replace_hidden(args, kwargs, lambda h: gather_last(h, state.rows))
            if state.rows is None:
                return None
            return args, self.adapter.select_layer_rows(kwargs, state.rows, full_len, state.filler, layer_idx)

        return hook

    def _stage2_rows(self, state: _Stage2State) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score the visual tokens with layer K-1's attention, keep n2_i of each item; ((B', L2) surviving rows
        of the spliced sequence, (B', L2) filler rows or None)."""
        if state.captured is None:
            raise RuntimeError("stage 2 found no layer K-1 input to score with; was the decoder run as usual?")
        hidden, cos_sin = state.captured
        keys, queries = ((t if t is not None and t.shape[0] == hidden.shape[0] else None)
                         for t in (state.keys, state.queries))
        state.captured = state.keys = state.queries = None
        sp, query_end, budget = state.spliced, state.query_end, state.budget
        copies = hidden.shape[0] // sp.attention_mask.shape[0]
        if copies > 1:  # beam search / num_return_sequences: generate() repeated each prompt after our splice
            sp = repeat_rows(sp, copies)
            query_end = None if query_end is None else query_end.repeat_interleave(copies)
            budget = budget.repeat_interleave(copies, dim=0)

        with torch.no_grad():  # scores only pick indices: no graph for the keys' rotation
            logits_fn = self.adapter.attention_logits(self.layer - 1, hidden, cos_sin, keys, queries)
        ctx = Stage2Context(logits_fn=logits_fn, attention_mask=sp.attention_mask, vision_slots=sp.vision_slots,
                            vision_index=sp.vision_index, vision_valid=sp.vision_valid,
                            vision_hidden=gather_last(hidden, sp.vision_slots), budget=budget,
                            vision_image=sp.vision_image, vision_grid=sp.vision_grid, query_end=query_end)
        with torch.no_grad():
            for observer in self.observers[2]:
                observer.observe(ctx)
            scores = self.scorer.score(ctx)
        keep = topk_per_image(scores, ctx)  # (B', M1) bool: the kept columns
        kept: list[torch.Tensor | None] = [None] * sp.item_row.shape[0]
        for item in range(len(kept)):
            row = int(sp.item_row[item]) * copies
            columns = keep[row] & (sp.vision_item[row] == item)
            kept[item] = sp.vision_index[row][columns].sort().values
        state.kept = kept
        state.scores = scores[::copies]
        survive = sp.positions >= 0  # stage 1's filler rows go; stage 2 pads anew if rows still differ
        rows, columns = (sp.vision_item >= 0).nonzero(as_tuple=True)
        survive[rows, sp.vision_slots[rows, columns]] = False
        rows, columns = keep.nonzero(as_tuple=True)
        survive[rows, sp.vision_slots[rows, columns]] = True
        source, _ = left_align(survive)
        filler = source < 0
        return source.clamp(min=0), (filler if bool(filler.any()) else None)


def _rows_positions(positions: torch.Tensor, state: _Stage2State) -> torch.Tensor:
    """Original positions of the rows after stage 2 (-1 for filler rows of either stage)."""
    out = positions.gather(1, state.rows)
    return out if state.filler is None else out.masked_fill(state.filler, -1)


def _by_column(values: list[torch.Tensor], spliced: Spliced) -> torch.Tensor:
    """Per-item per-kept-token values laid out in the spliced visual columns' order (row-major, filled only)."""
    out = []
    for row in range(spliced.vision_item.shape[0]):
        items = spliced.vision_item[row]
        for item in items[items >= 0].unique_consecutive().tolist():
            out.append(values[item])
    return torch.cat(out)


def _inject_prefill(extra: dict, full_len: int):
    """A language-model pre-hook that adds `extra` keyword inputs to the prefill call (sequence of `full_len`)."""

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[1] != full_len:
            return None
        return args, {**kwargs, **extra}

    return hook


def topk_per_image(scores: torch.Tensor, ctx: Stage2Context) -> torch.Tensor:
    """(B, M) bool: the top-`budget` columns of every item of every row (one item cannot take another's budget;
    padding only once the item's valid tokens run out; filler columns never)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for row, _, columns, n in ctx.image_columns():
        chosen = topk_keep(scores[row, columns].unsqueeze(0), n, ctx.vision_valid[row, columns].unsqueeze(0))
        keep[row, columns[chosen[0]]] = True
    return keep


def repeat_rows(spliced: Spliced, copies: int) -> Spliced:
    """Each row of a spliced batch `copies` times in a row (what generate() does for beams / return sequences)."""

    def rep(t, dim=0):
        return None if t is None else t.repeat_interleave(copies, dim=dim)

    position_dim = 1 if spliced.position_ids.dim() == 3 else 0
    return replace(spliced, inputs_embeds=rep(spliced.inputs_embeds), attention_mask=rep(spliced.attention_mask),
                   position_ids=rep(spliced.position_ids, position_dim), positions=rep(spliced.positions),
                   vision_slots=rep(spliced.vision_slots), vision_index=rep(spliced.vision_index),
                   vision_valid=rep(spliced.vision_valid), vision_image=rep(spliced.vision_image),
                   vision_item=rep(spliced.vision_item), vision_grid=rep(spliced.vision_grid),
                   vision_extras={k: rep(v) for k, v in spliced.vision_extras.items()},
                   key_bias=rep(spliced.key_bias))


def additive_attention_mask(mask: torch.Tensor, key_bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal + padding as the dtype's minimum, plus a per-key bias (B, L)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & mask.bool().unsqueeze(1)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return (additive + key_bias.to(dtype).unsqueeze(1)).unsqueeze(1)


def _replace_hidden(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs
