"""The learned stage-1 pruning head (LearnPruner-style), its differentiable top-k and its checkpoint format.

A head directory holds `pruner_config.json` (what the head was trained for: model type, feature dim, grid,
budgets, stage-2 layer and scorer with its debias values) and `model.safetensors` (the weights; never pickle),
plus `adapter/` when LoRA adapters of the language model were trained with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from modules.budget import topk_keep, topk_order
from modules.selectors.base import SELECTORS, ScoreSelector, TrainSelection
from modules.vlm.base import VisionTokens, VLMAdapter

CONFIG_NAME = "pruner_config.json"
WEIGHTS_NAME = "model.safetensors"
MODES = ("straight_through", "soft_mask", "policy")
FEATURES = ("pre", "post")


@dataclass
class PrunerConfig:
    """Architecture of the head and what it was trained for (checked against the model at load time)."""

    in_dim: int
    features: str = "pre"
    d_model: int = 256
    depth: int = 2
    heads: int = 4
    mode: str = "straight_through"
    tau: float = 1.0
    question: bool = False
    prompt_dim: int | None = None
    model_type: str | None = None
    num_tokens: int | None = None
    grid: list[int] | None = None
    n1: int | float | None = None
    n2: int | float | None = None
    layer: int | None = None
    stage2: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"features={self.features!r}; use one of {FEATURES}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; use one of {MODES}")
        for name in ("in_dim", "d_model", "depth", "heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.question and not self.prompt_dim:
            raise ValueError("question=True needs prompt_dim (the language model's embedding size); build the head "
                             "with PrunerHead.for_model(adapter, question=True)")


@SELECTORS.register("learned")
class PrunerHead(nn.Module, ScoreSelector):
    """Learned token scorer: LayerNorm -> Linear(in_dim, d) -> `depth` pre-norm transformer blocks (d, `heads`,
    SDPA) -> Linear(d, 1) logits, over pre- or post-projector features (B, N, in_dim) -> (B, N).

    LearnPruner (2025) trains such a module after the vision encoder by distillation; its exact architecture is
    not public, this one is ours. Inference: top-n of the logits. Training (`train_select`):
    - "straight_through" (default): hard top-n of Gumbel-perturbed logits (noise scale `tau`, annealed by the
      trainer); kept features are multiplied by p / p.detach() with p = sigmoid(logits), so the forward pass is
      the pruned one (cost falls with n) and gradients reach the head.
    - "soft_mask": keeps every token and adds log(p) to the attention bias of the visual keys (DynamicViT-style),
      with the budget term (mean(p) - n/N)^2.
    - "policy" (our addition): the head is a Plackett-Luce policy over ordered selections; training samples n
      tokens (Gumbel top-n at temperature `tau`), runs the hard-pruned student, and `DistillPruner` weights the
      sample's log-probability by how much lower its KL to the teacher is than that of the other samples of the
      same input (REINFORCE with a leave-one-out baseline). Unlike the other two modes it optimises exactly what
      inference does, a hard top-n, including the value of tokens it did *not* keep. On ToyWorld at 4 of 64
      tokens, soft masks reach ~100% in their soft training view but 84% once the top-4 is taken hard.

    `question=True` (our extension) makes the head question-aware: the prompt's text-token input embeddings
    (B, T, prompt_dim), projected to d and given sinusoidal positions in text order, join the visual tokens in the
    encoder blocks, and only the visual outputs are scored. A question-blind head must keep every object the
    question *might* ask about; at a few tokens per image it cannot (ToyWorld at 4 of 64 tokens: count of a
    colour falls to 70%), while the tokens a given question needs fit easily.
    """

    needs_weights = True  # no meaningful default instance: not part of DEFAULT_SELECTORS

    def __init__(self, config: PrunerConfig | None = None, **params: Any):
        super().__init__()
        self.config = config if config is not None else PrunerConfig(**params)
        cfg = self.config
        self.source: str | None = None  # the path or hub id it was loaded from (plans refer to heads by it)
        self.directory: Path | None = None  # the local directory it was read from (a hub id's snapshot)
        self.norm_in = nn.LayerNorm(cfg.in_dim)
        self.proj_in = nn.Linear(cfg.in_dim, cfg.d_model)
        if cfg.question:
            self.norm_prompt = nn.LayerNorm(cfg.prompt_dim)
            self.proj_prompt = nn.Linear(cfg.prompt_dim, cfg.d_model)
        block = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, dim_feedforward=4 * cfg.d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, cfg.depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(cfg.d_model)
        self.proj_out = nn.Linear(cfg.d_model, 1)
        self.tau = cfg.tau
        # set per step by the trainer so the Gumbel noise depends on (seed, step) only: resumed runs match
        self.noise_seed: int | None = None

    # ---- scoring -----------------------------------------------------------------------------------------
    def features(self, tokens: VisionTokens) -> torch.Tensor:
        x = tokens.pre if self.config.features == "pre" else tokens.feats
        if x is None:
            raise ValueError("this head reads pre-projector features but VisionTokens.pre is None")
        if x.shape[-1] != self.config.in_dim:
            raise ValueError(f"pruner head expects {self.config.features}-projector features of dim "
                             f"{self.config.in_dim}, got dim {x.shape[-1]}")
        return x

    @property
    def reads_prompt(self) -> bool:
        """PrunedVLM attaches the prompt embeddings to VisionTokens for selectors that read them."""
        return self.config.question

    def logits(self, tokens: VisionTokens) -> torch.Tensor:
        x = self.features(tokens).to(self.proj_in.weight.dtype)
        h = self.proj_in(self.norm_in(x))
        pad = ~tokens.valid_or_all()
        if self.config.question:
            prompt, prompt_pad = self.prompt_tokens(tokens)
            h, pad = torch.cat([h, prompt], dim=1), torch.cat([pad, prompt_pad], dim=1)
        if bool(pad.all(dim=1).any()):
            pad = None  # an all-padding row would make attention undefined; its ranking is moot anyway
        h = self.blocks(h, src_key_padding_mask=pad)[:, :tokens.num_tokens]
        return self.proj_out(self.norm_out(h)).squeeze(-1).float()

    def prompt_tokens(self, tokens: VisionTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) projected prompt embeddings with positions in text order, and (B, T) True where not text."""
        if tokens.prompt is None:
            raise ValueError("this head is question-aware (question=True) but VisionTokens.prompt is None: select "
                             "through PrunedVLM, which attaches the prompt")
        if tokens.prompt.shape[-1] != self.config.prompt_dim:
            raise ValueError(f"question-aware head expects prompt embeddings of dim {self.config.prompt_dim}, got "
                             f"{tokens.prompt.shape[-1]}")
        text = tokens.prompt_mask
        h = self.proj_prompt(self.norm_prompt(tokens.prompt.to(self.proj_prompt.weight.dtype)))
        order = (text.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding and image tokens do not shift words
        return h + sinusoidal(order, h.shape[-1]).to(h.dtype), ~text

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        return self.logits(tokens)

    def forward(self, tokens: VisionTokens) -> torch.Tensor:
        return self.logits(tokens)

    def train_select(self, tokens: VisionTokens, n: int) -> TrainSelection:
        """Differentiable selection for training (see the class docstring)."""
        logits = self.logits(tokens)
        if self.config.mode == "policy":
            return self.sample_selection(logits, n, tokens.valid)
        p = torch.sigmoid(logits)
        if self.config.mode == "soft_mask":
            keep = torch.arange(tokens.num_tokens, device=logits.device).expand(tokens.batch_size, -1)
            bias = torch.log(p.clamp(min=1e-6))
            if tokens.valid is not None:
                bias = bias.masked_fill(~tokens.valid, math.log(1e-6))
            budget = (p.mean(dim=1) - n / tokens.num_tokens).pow(2).mean()
            return TrainSelection(keep=keep, key_bias=bias, aux_loss=budget)
        perturbed = logits.detach() + self.tau * self.gumbel_noise(logits)
        keep = topk_keep(perturbed, n, tokens.valid)
        kept_p = p.gather(1, keep)
        return TrainSelection(keep=keep, scale=kept_p / kept_p.detach())

    def gumbel_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """Standard Gumbel noise shaped like `logits`, seeded by `noise_seed` (set per step and rank by the
        trainer, so a resumed run draws the same noise)."""
        gen = None
        if self.noise_seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(self.noise_seed)
        uniform = torch.rand(logits.shape, generator=gen, device=logits.device).clamp(1e-9, 1 - 1e-9)
        return -torch.log(-torch.log(uniform))

    def sample_selection(self, logits: torch.Tensor, n: int, valid: torch.Tensor | None) -> TrainSelection:
        """An ordered Plackett-Luce sample of n tokens from softmax(logits / tau) (Gumbel top-n) and its
        log-probability: the sum over picks of log softmax over the tokens not picked yet. Padding is drawn only
        after every valid token; such forced picks are not a choice and add nothing to the log-probability."""
        scaled = logits / self.tau
        order = topk_order(scaled.detach() + self.gumbel_noise(scaled), n, valid)
        return TrainSelection(keep=order.sort(dim=1).values, log_prob=plackett_luce_log_prob(scaled, order, valid))

    # ---- compatibility ---------------------------------------------------------------------------------------
    def check_compatible(self, adapter: VLMAdapter) -> None:
        """Fail clearly when this head was trained for another model."""
        cfg = self.config
        model_type = adapter.model.config.model_type
        if cfg.model_type is not None and cfg.model_type != model_type:
            raise ValueError(f"pruner head was trained for model_type {cfg.model_type!r}, the model is "
                             f"{model_type!r}")
        dim = adapter.feature_dims[cfg.features]
        if dim != cfg.in_dim:
            raise ValueError(f"pruner head expects {cfg.features}-projector features of dim {cfg.in_dim}, but this "
                             f"model's {cfg.features}-projector features have dim {dim}")
        if cfg.question and adapter.feature_dims["post"] != cfg.prompt_dim:
            raise ValueError(f"question-aware pruner head reads prompt embeddings of dim {cfg.prompt_dim}, this "
                             f"model's language model has dim {adapter.feature_dims['post']}")

    @classmethod
    def for_model(cls, adapter: VLMAdapter, features: str = "pre", question: bool = False,
                  **params: Any) -> PrunerHead:
        """A fresh head sized for the model behind `adapter`, recording what it is trained for."""
        return cls(PrunerConfig(in_dim=adapter.feature_dims[features], features=features,
                                model_type=adapter.model.config.model_type, num_tokens=adapter.num_image_tokens,
                                question=question, prompt_dim=adapter.feature_dims["post"] if question else None,
                                **params))

    # ---- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "learnprune": "pruner_head"})
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, **hub_kwargs: Any) -> PrunerHead:
        """Load from a local directory, or a hub repo id (downloaded with huggingface_hub)."""
        directory = Path(path)
        if not directory.is_dir():
            if directory.exists() or str(path).startswith((".", "/")):
                raise ValueError(f"pruner checkpoint {str(path)!r} is not a directory")
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "adapter/*"],
                                               **hub_kwargs))
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise ValueError(f"pruner checkpoint {str(directory)!r} has no {f.name}")
        raw = json.loads(config_file.read_text())
        known = PrunerConfig.__dataclass_fields__
        unknown = set(raw) - set(known)
        if unknown:
            raise ValueError(f"{config_file} has unknown keys {sorted(unknown)}")
        head = cls(PrunerConfig(**raw))
        state = load_file(str(weights_file))
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights_file} does not match the head described by {config_file}: {err}") from None
        head.source = str(path)
        head.directory = directory
        return head.eval()

    @classmethod
    def from_config(cls, path: str | None = None, **params: Any) -> PrunerHead:
        """Registry entry point: `{"name": "learned", "path": DIR}` loads a checkpoint, else builds a fresh head."""
        return cls.from_pretrained(path) if path is not None else cls(**params)

    def to_config(self) -> dict[str, Any]:
        if self.source is None:
            raise ValueError("save this head with save_pretrained(dir) and load it from there before saving a plan "
                             "that uses it (plans refer to heads by path)")
        return {"name": "learned", "path": self.source}


def plackett_luce_log_prob(scores: torch.Tensor, order: torch.Tensor, valid: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """log P(order) of drawing the tokens `order` (B, n) one after another, each from softmax(scores) (B, N)
    restricted to the tokens not drawn yet. Padding tokens (valid False) are outside the softmax; they are drawn
    only once no valid token is left, a forced pick that adds 0."""
    if valid is not None:
        scores = scores.masked_fill(~valid, -1e4)  # finite: a forced pick must not turn the sum into nan
    picked = F.one_hot(order, scores.shape[1]).to(torch.bool)  # (B, n, N)
    before = picked.cumsum(dim=1).bool() & ~picked  # tokens drawn at earlier steps
    remaining = scores.unsqueeze(1).masked_fill(before, float("-inf"))
    step = scores.gather(1, order) - torch.logsumexp(remaining, dim=-1)
    if valid is not None:
        step = step * valid.gather(1, order)
    return step.sum(dim=1)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sine/cosine encodings of integer positions (...,) -> (..., dim): no table, any length."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float().unsqueeze(-1) * freqs
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))
