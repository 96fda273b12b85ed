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
from omegaconf import OmegaConf
from torch import nn
from transformers import DynamicCache

from modules.budget import check_budget_spec, resolve_budget, topk_keep
from modules.config import to_config
from modules.scorers.base import SCORERS, Scorer, Stage2Context
from modules.selectors.base import SELECTORS, Selector, TrainSelection
from modules.vlm import get_adapter
from modules.vlm.base import Spliced, VisionTokens, VLMAdapter, gather_last


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
    """

    stage1: Any = None
    n1: int | float | None = None
    stage2: Any = None
    n2: int | float | None = None
    layer: int | None = None
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
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PruningPlan:
        unknown = set(config) - {"stage1", "n1", "stage2", "n2", "layer"}
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
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        if path.suffix in (".yaml", ".yml"):
            return cls.from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
        raise ValueError(f"plan file {str(path)!r} must end in .json, .yaml or .yml")

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
            if kwargs.get("pixel_values") is None:  # text-only steps (decoding, our own calls) run unchanged
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

    kept:          {"stage1": (n_images, n1), "stage2": (n_images, n2)} sorted indices into each image's N tokens
                   ("stage2" only with a stage-2 scorer).
    positions:     (B, L_out) index of each output row in the unpruned sequence (forward only, else None).
    stage2_scores: (B, M1) the stage-2 scorer's scores of the tokens that survived stage 1, or None.
    log_prob:      (n_images,) log-probability of each sampled selection (policy training), or None.
    aux_loss:      scalar regulariser of a training selection (the soft-mask budget term), or None.
    """

    kept: dict[str, torch.Tensor]
    positions: torch.Tensor | None = None
    stage2_scores: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class _Stage2State:
    spliced: Spliced
    n2: int
    per_row: int  # images per prompt
    query_end: torch.Tensor | None = None
    captured: tuple | None = None  # (hidden_states, position_embeddings) at the input of layer K-1
    rows: torch.Tensor | None = None  # (B', L2) surviving rows of the spliced sequence
    kept: torch.Tensor | None = None  # (n_images, n2) stage-2 selection, indices into each image's N
    scores: torch.Tensor | None = None  # (B, M1) stage-2 scores


class PrunedVLM(nn.Module):
    """A transformers VLM that prunes visual tokens according to a `PruningPlan`.

    Takes the same inputs as the wrapped model (processor output), plus optional `image_sizes` (n_images, 2) =
    the original (height, width) of each image: with `processor` (the one that made `pixel_values`) the adapter
    derives which tokens show only padding (pad-to-square processors) and never keeps them while real ones
    remain; centre-cropping processors (llava-hf's default) have none. Logits are returned for the positions that
    survive pruning; text tokens always survive, so the last row is the next-token prediction.
    Each call's decisions come back with its output (`out.pruning`, a `PruningOutput`: kept indices per stage,
    output-row positions, stage-2 scores, a training selection's log-probability); `last` (and `last_kept`,
    `last_positions`, ... for convenience) hold the latest call's.
    """

    def __init__(self, model: nn.Module, plan: PruningPlan, processor=None):
        super().__init__()
        self.model = model
        self.plan = plan
        self.adapter: VLMAdapter = get_adapter(model, processor)
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
            impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
            if impl == "flex_attention":
                raise ValueError("stage-2 pruning does not support attn_implementation='flex_attention'")
        self.observers: dict[int, list] = {1: [], 2: []}  # calibration: components fed every batch's inputs
        self.last: PruningOutput | None = None

    # ---- the latest call's decisions, for convenience (each call also returns them) ----------------------
    @property
    def last_kept(self) -> dict[str, torch.Tensor]:
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
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                image_sizes=None, labels=None, prompt_end=None, vision_tokens: VisionTokens | None = None, **kwargs):
        """`prompt_end` (B,): index of the last prompt token when the sequence also holds the answer (training),
        so stage 2 scores from the prompt alone. `vision_tokens`: the encoder's output for `pixel_values`, when
        the caller already has it (training several selections of one image encodes it once)."""
        if self.plan.is_noop or pixel_values is None:
            return self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                              position_ids=position_ids, labels=labels, **kwargs)
        spliced, n2, per_row, selection = self.prepare(input_ids, pixel_values, attention_mask, position_ids,
                                                       image_sizes, for_generation=False,
                                                       vision_tokens=vision_tokens, prompt_end=prompt_end)
        mask = spliced.attention_mask
        if spliced.key_bias is not None:  # soft-mask training: visual keys weighted by the head's probabilities
            mask = additive_attention_mask(spliced.attention_mask, spliced.key_bias, spliced.inputs_embeds.dtype)
        query_end = None
        if prompt_end is not None:
            query_end = (spliced.positions <= prompt_end.view(-1, 1)).sum(dim=1) - 1
        with self._stage2(spliced, n2, per_row, query_end) as state:
            out = self.model(inputs_embeds=spliced.inputs_embeds, attention_mask=mask,
                             position_ids=spliced.position_ids, **kwargs)
        rows = state.rows if state is not None else None
        positions = spliced.positions if rows is None else spliced.positions.gather(1, rows)
        out.pruning = self._record(selection, state, positions)
        if labels is not None:
            # row p predicts the token at p + 1 of the UNPRUNED sequence, not the next surviving row's token
            next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).gather(1, positions)
            out.loss = self.model.loss_function(logits=out.logits, labels=None, shift_labels=next_labels,
                                                vocab_size=self.model.config.get_text_config().vocab_size)
        return out

    def _record(self, selection: TrainSelection, state: _Stage2State | None, positions: torch.Tensor | None
                ) -> PruningOutput:
        kept = {"stage1": selection.keep}
        if state is not None and state.kept is not None:
            kept["stage2"] = state.kept
        self.last = PruningOutput(kept=kept, positions=positions,
                                  stage2_scores=None if state is None else state.scores,
                                  log_prob=selection.log_prob, aux_loss=selection.aux_loss)
        return self.last

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                 image_sizes=None, **kwargs) -> torch.Tensor:
        """Like `model.generate`: (B, L + new) token ids with the prompt first (or a generate output whose
        `sequences` are, with `return_dict_in_generate=True`)."""
        generate = type(self.model).generate
        if self.plan.is_noop or pixel_values is None:
            return generate(self.model, input_ids=input_ids, pixel_values=pixel_values,
                            attention_mask=attention_mask, **kwargs)
        if self.scorer is not None:
            self._check_dynamic_cache(kwargs)
        spliced, n2, per_row, selection = self.prepare(input_ids, pixel_values, attention_mask, position_ids,
                                                       image_sizes, for_generation=True)
        with self._stage2(spliced, n2, per_row) as state:
            out = generate(self.model, inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                           position_ids=spliced.position_ids, **kwargs)
        pruning = self._record(selection, state, None)
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
    def prepare(self, input_ids, pixel_values, attention_mask, position_ids, image_sizes, for_generation: bool,
                vision_tokens: VisionTokens | None = None, prompt_end: torch.Tensor | None = None
                ) -> tuple[Spliced, int | None, int, TrainSelection]:
        """Stage 1: encode the images, select n1 tokens per image, splice them into the prompt; returns the
        spliced inputs, the stage-2 budget, the images per prompt and the stage-1 selection.
        `prompt_end` (B,): last prompt column when the sequence also holds the answer; question-aware selectors
        read the prompt only."""
        if input_ids is None:
            raise ValueError("PrunedVLM needs input_ids (to find the image tokens); inputs_embeds is not enough")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.scorer is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the batch is right-padded; stage 2 scores from the last prompt token, so tokenize "
                             "with padding_side='left'")
        n_images = pixel_values.shape[0]
        self.adapter.image_positions(input_ids, n_images)  # count checks before the vision tower runs
        if position_ids is None:
            position_ids = self.adapter.default_position_ids(input_ids, attention_mask, for_generation)
        if vision_tokens is None:
            tokens = self.encode(pixel_values, image_sizes)
        elif vision_tokens.batch_size != n_images:
            raise ValueError(f"vision_tokens hold {vision_tokens.batch_size} images, pixel_values {n_images}")
        else:
            tokens = vision_tokens
        if getattr(self.selector, "reads_prompt", False):
            tokens = self.attach_prompt(tokens, input_ids, attention_mask, prompt_end)
        n1, n2 = self.plan.budgets(tokens.num_tokens)
        selection = self.select_stage1(tokens, n1)
        keep1 = selection.keep
        if selection.scale is not None:  # straight-through: value 1, gradient to the head
            scale = torch.ones(tokens.feats.shape[:2], dtype=selection.scale.dtype, device=keep1.device)
            tokens = replace(tokens, feats=tokens.feats * scale.scatter(1, keep1, selection.scale).unsqueeze(-1)
                             .to(tokens.feats.dtype))
        spliced = self.adapter.splice(input_ids, attention_mask, position_ids, tokens, keep1)
        if selection.key_bias is not None:
            bias = torch.zeros(spliced.attention_mask.shape, dtype=selection.key_bias.dtype, device=keep1.device)
            per_row_bias = selection.key_bias.gather(1, keep1).reshape(bias.shape[0], -1)
            spliced.key_bias = bias.scatter(1, spliced.vision_slots, per_row_bias)
        return spliced, n2, n_images // input_ids.shape[0], selection

    def encode(self, pixel_values: torch.Tensor, image_sizes=None) -> VisionTokens:
        return self.adapter.encode(pixel_values, image_sizes)

    def attach_prompt(self, tokens: VisionTokens, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_end: torch.Tensor | None = None) -> VisionTokens:
        """Give each image the input embeddings of its prompt's text tokens (for question-aware selectors): the
        tokens up to `prompt_end` (B,) when given, so that a training sequence's answer is never read."""
        per_row = tokens.batch_size // input_ids.shape[0]
        text = attention_mask.bool() & (input_ids != self.adapter.image_token_id)
        if prompt_end is not None:
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = text & (columns.unsqueeze(0) <= prompt_end.to(input_ids.device).view(-1, 1))
        embeds = self.adapter.embed_tokens(input_ids).detach()
        return replace(tokens, prompt=embeds.repeat_interleave(per_row, dim=0),
                       prompt_mask=text.repeat_interleave(per_row, dim=0))

    def select_stage1(self, tokens: VisionTokens, n1: int) -> TrainSelection:
        for observer in self.observers[1]:
            observer.observe(tokens)
        if self.selector is None:
            keep = torch.arange(tokens.num_tokens, device=tokens.feats.device).expand(tokens.batch_size, -1)
            return TrainSelection(keep=keep)
        trainable = getattr(self.selector, "train_select", None)
        if trainable is not None and self.selector.training and torch.is_grad_enabled():
            return trainable(tokens, n1)
        return TrainSelection(keep=self.selector.select(tokens, n1))

    # ---- stage 2 ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stage2(self, spliced: Spliced, n2: int | None, per_row: int, query_end: torch.Tensor | None = None
                ) -> Iterator[_Stage2State | None]:
        if self.scorer is None:
            yield None
            return
        state = _Stage2State(spliced=spliced, n2=n2, per_row=per_row, query_end=query_end)
        layers = self.adapter.language_layers()
        k = self.layer
        handles = [layers[k - 1].register_forward_pre_hook(self._capture_hook(state), with_kwargs=True)]
        handles += [layers[i].register_forward_pre_hook(self._prune_hook(state, i == k), with_kwargs=True)
                    for i in range(k, len(layers))]
        try:
            yield state
        finally:
            for h in handles:
                h.remove()
            state.captured = None

    def _capture_hook(self, state: _Stage2State):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if state.rows is None and hidden.shape[1] == state.spliced.inputs_embeds.shape[1]:
                state.captured = (hidden, kwargs.get("position_embeddings"))

        return hook

    def _prune_hook(self, state: _Stage2State, first: bool):
        def hook(module, args, kwargs):
            full_len = state.spliced.inputs_embeds.shape[1]
            if first and state.rows is None:
                state.rows = self._stage2_rows(state)
                args, kwargs = _replace_hidden(args, kwargs, lambda h: gather_last(h, state.rows))
            if state.rows is None:
                return None
            return args, self.adapter.select_layer_rows(kwargs, state.rows, full_len)

        return hook

    def _stage2_rows(self, state: _Stage2State) -> torch.Tensor:
        """Score the visual tokens with layer K-1's attention, keep n2 per image; (B', L2) surviving rows."""
        if state.captured is None:
            raise RuntimeError("stage 2 found no layer K-1 input to score with; was the decoder run as usual?")
        hidden, cos_sin = state.captured
        state.captured = None
        sp, query_end = state.spliced, state.query_end
        copies = hidden.shape[0] // sp.attention_mask.shape[0]
        if copies > 1:  # beam search / num_return_sequences: generate() repeated each prompt after our splice
            sp = repeat_rows(sp, copies)
            query_end = None if query_end is None else query_end.repeat_interleave(copies)

        def logits_fn(query_index: torch.Tensor) -> torch.Tensor:
            return self.adapter.attention_logits(self.layer - 1, hidden, cos_sin, query_index)

        ctx = Stage2Context(logits_fn=logits_fn, attention_mask=sp.attention_mask, vision_slots=sp.vision_slots,
                            vision_index=sp.vision_index, vision_valid=sp.vision_valid,
                            vision_hidden=gather_last(hidden, sp.vision_slots), budget=state.n2,
                            images=state.per_row, query_end=query_end)
        with torch.no_grad():
            for observer in self.observers[2]:
                observer.observe(ctx)
            scores = self.scorer.score(ctx)
        keep = topk_per_image(scores, state.n2, sp.vision_valid, state.per_row)  # (B', images * n2) into M1
        kept = sp.vision_index.gather(1, keep) % self.adapter.num_image_tokens
        state.kept = kept[::copies].reshape(-1, state.n2)  # (n_images, n2) into each image's N
        state.scores = scores[::copies]
        drop = torch.zeros(sp.attention_mask.shape, dtype=torch.bool, device=keep.device)
        drop.scatter_(1, sp.vision_slots, True)
        drop.scatter_(1, sp.vision_slots.gather(1, keep), False)
        return (~drop).nonzero()[:, 1].view(drop.shape[0], -1)


def topk_per_image(scores: torch.Tensor, n: int, valid: torch.Tensor, images: int) -> torch.Tensor:
    """Top-n per image of (B, M) scores whose M columns are `images` equal consecutive blocks, one per image:
    (B, images * n) column indices, ascending (one image cannot take another's budget)."""
    bsz, m = scores.shape
    block = m // images
    keep = topk_keep(scores.reshape(bsz * images, block), n, valid.reshape(bsz * images, block))
    offsets = (torch.arange(images, device=keep.device) * block).repeat_interleave(n)
    return keep.reshape(bsz, images * n) + offsets


def repeat_rows(spliced: Spliced, copies: int) -> Spliced:
    """Each row of a spliced batch `copies` times in a row (what generate() does for beams / return sequences)."""

    def rep(t, dim=0):
        return None if t is None else t.repeat_interleave(copies, dim=dim)

    position_dim = 1 if spliced.position_ids.dim() == 3 else 0
    return Spliced(inputs_embeds=rep(spliced.inputs_embeds), attention_mask=rep(spliced.attention_mask),
                   position_ids=rep(spliced.position_ids, position_dim), positions=rep(spliced.positions),
                   vision_slots=rep(spliced.vision_slots), vision_index=rep(spliced.vision_index),
                   vision_valid=rep(spliced.vision_valid), key_bias=rep(spliced.key_bias))


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
