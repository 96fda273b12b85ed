"""The learned stage-1 pruning head (LearnPruner-style), its differentiable top-k and its checkpoint format.

A head directory holds `pruner_config.json` (its `format_version`, and what the head was trained for: base model,
model type, feature dim, grid, budgets, stage-2 layer and scorer with its debias values), `model.safetensors` (the
weights; never pickle) and a model card `README.md`, plus `adapter/` when LoRA adapters of the language model were
trained with it. `PrunerHead` is a `huggingface_hub.PyTorchModelHubMixin`: `from_pretrained` takes a directory or a
hub repo id, `push_to_hub` uploads a head (`modules.serve.push_pruner` uploads a whole pruner directory).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modules.budget import topk_keep, topk_order
from modules.model_card import DEFAULT_TAGS, LIBRARY_NAME, pruner_model_card
from modules.selectors.base import SELECTORS, ScoreSelector, TrainSelection
from modules.vlm.base import VisionTokens, VLMAdapter

CONFIG_NAME = "pruner_config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ADAPTER_DIR = "adapter"  # LoRA adapters of the language model, peft format (adapter_config.json + safetensors)
# What a hub snapshot of a pruner downloads: never pickled weights (pytorch_model.bin, *.pt), even when present.
HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{ADAPTER_DIR}/*"]
# pruner_config.json layout this code writes; 0 = files written before the field existed (same layout).
FORMAT_VERSION = 1
# weight files a pruner directory may hold that would need unpickling: refused, never loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MODES = ("straight_through", "soft_mask", "policy")
FEATURES = ("pre", "post")


class PrunerFormatWarning(UserWarning):
    """A pruner_config.json written by a newer learnprune (a newer format_version, or fields this one lacks)."""


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
    base_model: str | None = None  # HF id or path of the VLM it was trained for, when known
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

    def to_dict(self) -> dict[str, Any]:
        """The pruner_config.json mapping: `format_version` first, then the fields."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "pruner config") -> PrunerConfig:
        """A config from a pruner_config.json mapping (or a training checkpoint's `pruner_config`), readable across
        versions: files without `format_version` (version 0) load as they are; a newer `format_version` and
        fields this version does not know (written by a later learnprune) warn with `PrunerFormatWarning`, and
        unknown fields are ignored. Malformed values are a ValueError naming `source` and the value."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source} must be a JSON object, got {type(raw).__name__}: {raw!r:.80}")
        raw = dict(raw)
        version = raw.pop("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"{source} has format_version={version!r}; expected a non-negative integer")
        if version > FORMAT_VERSION:
            warnings.warn(f"{source} has format_version {version}, newer than this learnprune reads "
                          f"({FORMAT_VERSION}): loading what it knows; upgrade learnprune if the head misbehaves",
                          PrunerFormatWarning, stacklevel=2)
        known = cls.__dataclass_fields__
        unknown = sorted(set(raw) - set(known))
        if unknown:
            warnings.warn(f"{source} has unknown keys {unknown} (written by a newer learnprune?); they are ignored",
                          PrunerFormatWarning, stacklevel=2)
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as err:  # a missing required field, or a value of the wrong type
            raise ValueError(f"{source} is not a valid pruner config: {err}") from None
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


@SELECTORS.register("learned")
class PrunerHead(nn.Module, ScoreSelector, PyTorchModelHubMixin, library_name=LIBRARY_NAME, tags=list(DEFAULT_TAGS)):
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
            trained_for = f" ({cfg.base_model})" if cfg.base_model else ""
            raise ValueError(f"pruner head was trained for model_type {cfg.model_type!r}{trained_for}, the model is "
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

    # ---- persistence (huggingface_hub.PyTorchModelHubMixin, with learnprune's file names) -----------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: pruner_config.json and model.safetensors (never pickle)."""
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt", "learnprune": "pruner_head"})

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None,
                        **push_to_hub_kwargs: Any) -> Path | str:
        """Write `pruner_config.json`, `model.safetensors` and, unless the directory already has one, a model card
        `README.md` (always rewritten when `model_card_kwargs` is given: `metrics`, `training_data`, `lora`, see
        `generate_model_card`). Returns the directory, or the commit url with `push_to_hub=True` (to `repo_id`,
        default the directory's name; further keyword arguments go to `push_to_hub`).

        The head's config is `self.config`: `config` (the mixin's argument) may only repeat it."""
        if config is not None:
            given = asdict(config) if isinstance(config, PrunerConfig) else dict(config)
            given.pop("format_version", None)
            if given != asdict(self.config):
                raise ValueError("save_pretrained(config=...) differs from the head's own config; a head is saved "
                                 "with the config it was built with (set head.config to change it)")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(directory)
        card = directory / CARD_NAME
        if model_card_kwargs is not None or not card.exists():
            self.generate_model_card(**(model_card_kwargs or {})).save(card)
        if push_to_hub:
            return self.push_to_hub(repo_id or directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return directory

    def generate_model_card(self, metrics: Mapping[str, Any] | None = None, training_data: str | None = None,
                            lora: bool = False) -> ModelCard:
        """The model card (`modules.model_card.pruner_model_card`): base model, budgets, stage-2 scorer, and the
        `training_data` description and measured `metrics` (accuracy, teacher_accuracy, kept_ratio) when given."""
        info = self._hub_mixin_info.model_card_data
        return pruner_model_card(self.config.to_dict(), metrics=metrics, training_data=training_data, lora=lora,
                                 tags=info.tags or DEFAULT_TAGS, library_name=info.library_name or LIBRARY_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        map_location: str | torch.device = "cpu", **hub_kwargs: Any) -> PrunerHead:
        """Load from a local directory, or a hub repo id (a snapshot of pruner_config.json, model.safetensors,
        README.md and adapter/ is downloaded with `huggingface_hub.snapshot_download`; the hub arguments and
        `hub_kwargs` go to it). Weights are read from safetensors only: pickled weights are refused, never
        loaded. The head's `source` is what was asked for (plans refer to heads by it), `directory` the local
        directory read (a hub id's snapshot, where `adapter/` is)."""
        head = cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, map_location=map_location,
                                    **hub_kwargs)
        head.source = str(pretrained_model_name_or_path)
        return head

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu", **hub_kwargs: Any) -> PrunerHead:
        directory = pruner_directory(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                     local_files_only=local_files_only, token=token, **hub_kwargs)
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not weights_file.is_file():
            pickled = pickled_files(directory)
            if pickled:
                raise ValueError(f"pruner checkpoint {model_id!r} has pickled weights {pickled} but no {WEIGHTS_NAME}: "
                                 "learnprune loads safetensors only and will not unpickle them (pickle can run "
                                 "arbitrary code); convert them to model.safetensors where you trust the file")
            raise ValueError(f"pruner checkpoint {model_id!r} has no {WEIGHTS_NAME} (in {str(directory)!r}; "
                             "learnprune reads safetensors weights only)")
        if not config_file.is_file():
            raise ValueError(f"pruner checkpoint {model_id!r} has no {CONFIG_NAME} (in {str(directory)!r})")
        head = cls(PrunerConfig.from_dict(read_json(config_file), source=str(config_file)))
        state = load_safetensors(weights_file, device=map_location)
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights_file} does not match the head described by {config_file}: {err}") from None
        head.to(map_location)
        head.source = model_id
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


def pruner_directory(path: str | Path, **hub_kwargs: Any) -> Path:
    """The local directory of a pruner: `path` itself when it is a directory, else a hub repo id's snapshot
    (`huggingface_hub.snapshot_download` of `HUB_PATTERNS`: config, safetensors weights, card and `adapter/*`)."""
    directory = Path(path)
    if directory.is_dir():
        return directory
    if directory.exists() or str(path).startswith((".", "/", "~")):
        raise ValueError(f"pruner checkpoint {str(path)!r} is not a directory")
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(path))
    except HFValidationError as err:
        raise ValueError(f"pruner checkpoint {str(path)!r} is neither a local directory nor a hub repo id: {err}"
                         ) from None
    # looked up at call time, so tests (and users) can stand in for the hub
    return Path(huggingface_hub.snapshot_download(repo_id=str(path), allow_patterns=list(HUB_PATTERNS),
                                                  **hub_kwargs))


def pickled_files(directory: Path) -> list[str]:
    """Names of the pickled weight files in `directory` (listed in messages, never opened)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def read_json(path: Path) -> Any:
    """A JSON file's content; invalid JSON or text is a ValueError naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"weights file {str(path)!r} is not a readable safetensors file (truncated or corrupt?): "
                         f"{err}") from None


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
