"""The ToyWorld teacher: a tiny LLaVA (CLIP-style vision + Llama LM) built in stages, the way real VLMs are.

End-to-end training from scratch does not ground on a CPU budget (see shared TOYWORLD notes): the LM never learns
to find the asked-about object among the visual tokens. So each ability is taught where it is cheap to learn:

  vision    the vision tower learns per-patch labels (colour, shape, row, column, object centre, quadrant) and a
            [CLS] summary (which colours and shapes are present): the analogue of a pretrained CLIP.
  symbolic  the LM learns the QA task on *symbolic* image tokens: per-patch embeddings of the ground-truth labels
            (colour + shape + row + column + centre flag). No vision pass, so thousands of steps are cheap. A
            grounding loss asks the LM, at the word that names an object ("circle" in "the red circle"), where
            that object is; a question-type curriculum shows left_of more often (and a second "relations" run
            of this stage mostly left_of), because that type is learnt last.
  align     the projector learns to map vision features onto those symbolic embeddings (MSE), vision frozen.
  qa        projector + LM are tuned on QA end to end through the real vision path, vision frozen.

Each stage is a `python -m trainer fit --config configs/toyworld/<stage>.yaml` run that starts from the previous
stage's directory and writes a normal `from_pretrained` directory (+ `symbolic.safetensors`: the symbolic
embedder and the grounding probe, training-only extras that the final model does not need).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics import MeanMetric

from data.tiny import tiny_llava_config
from modules.optim import adamw_warmup_cosine

STAGES = ("vision", "symbolic", "align", "qa")
SYMBOLIC_FILE = "symbolic.safetensors"
ORDINAL_WEIGHT = 4.0  # positions in [0, 1]: their MSE is ~10x smaller than the classification losses


class SymbolicEmbedder(nn.Module):
    """Ground-truth patch labels -> LM-space embeddings: colour + shape + row + column + centre-flag tables."""

    def __init__(self, dim: int, grid: int, n_colors: int, n_shapes: int):
        super().__init__()
        self.color = nn.Embedding(n_colors, dim)
        self.shape = nn.Embedding(n_shapes + 1, dim)  # last index: not an object
        self.row = nn.Embedding(grid, dim)
        self.col = nn.Embedding(grid, dim)
        self.center = nn.Embedding(2, dim)
        for table in (self.color, self.shape, self.row, self.col, self.center):
            nn.init.normal_(table.weight, std=0.5 / math.sqrt(5))
        self.none_shape = n_shapes

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = batch["patch_shape"].masked_fill(batch["patch_shape"] < 0, self.none_shape)
        return (self.color(batch["patch_color"]) + self.shape(shape) + self.row(batch["patch_row"])
                + self.col(batch["patch_col"]) + self.center(batch["patch_center"]))


class VisionHeads(nn.Module):
    """Linear probes that the vision stage trains through: per patch and on [CLS]."""

    def __init__(self, dim: int, grid: int, n_colors: int, n_shapes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.color = nn.Linear(dim, n_colors)
        self.shape = nn.Linear(dim, n_shapes)
        self.row = nn.Linear(dim, grid)
        self.col = nn.Linear(dim, grid)
        self.center = nn.Linear(dim, 2)
        self.quadrant = nn.Linear(dim, 4)
        self.present = nn.Linear(dim, n_colors - 2 + n_shapes)  # [CLS]: which colours / shapes are in the image


class GroundingProbe(nn.Module):
    """Reads the patch (row, col) of a named object from the LM's hidden state at the word that names it: as
    classes, and as numbers along one direction each (`ordinal`), so that the LM stores position as a magnitude
    and "is A left of B" becomes a subtraction that a later layer can read."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.row = nn.Linear(dim, grid)
        self.col = nn.Linear(dim, grid)
        self.ordinal = nn.Linear(dim, 2)
        self.pair = nn.Linear(dim, 2)  # at the answer position: the columns of both objects a question compares


class ToyWorldTeacher(L.LightningModule):
    """One LightningModule, four training stages (see the module docstring); `stage` picks what trains.

    Args:
        stage: "vision" | "symbolic" | "align" | "qa".
        init_from: directory written by the previous stage (None only for "vision": builds a fresh model).
        out_dir: where this stage writes its result at the end of `fit`.
        vision_hidden, vision_layers, text_hidden, text_layers, heads: architecture of a fresh model.
        lr, weight_decay, warmup_steps: AdamW with warm-up and cosine decay.
        shape_weight, center_weight: up-weighting of the rare per-patch classes in the vision stage.
        ground_weight, ground_layer: weight of the grounding loss (symbolic and qa stages) and the decoder layer
            whose output it reads. Without it the LM never learns left_of (measured: exactly chance after 3500
            symbolic steps): a yes/no answer is too weak a signal to discover that it must first find two named
            objects; the grounding loss asks the hidden state at "circle" in "the red circle" for that object's
            patch, i.e. it supervises the find step directly (like the grounding data of real VLM training).
        relation_weight, relation_layer: weight of the relation loss and the decoder layer it reads (default: the
            one before last). Grounding alone still left left_of at chance in a mixed-question run: the words
            know where their objects are, but the answer position never gathers both positions. The relation
            loss asks the hidden state that predicts the answer for the columns of *both* compared objects, so
            the last layer only has to subtract them.
    """

    def __init__(self, stage: str, init_from: str | None = None, out_dir: str | None = None,
                 vision_hidden: int = 128, vision_layers: int = 3, text_hidden: int = 128, text_layers: int = 4,
                 heads: int = 4, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 100,
                 shape_weight: float = 3.0, center_weight: float = 5.0, ground_weight: float = 0.0,
                 ground_layer: int | None = None, relation_weight: float = 0.0, relation_layer: int | None = None):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}; use one of {STAGES}")
        if init_from is None and stage != "vision":
            raise ValueError(f"stage {stage!r} continues a previous stage: set init_from to its directory")
        self.save_hyperparameters()
        from transformers import LlavaForConditionalGeneration

        from data import toyworld as tw

        self.processor = tw.toyworld_processor()
        tokenizer = self.processor.tokenizer
        if init_from is None:
            cfg = tiny_llava_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
                                    pad_token_id=tokenizer.pad_token_id, image_size=tw.IMAGE_SIZE,
                                    patch_size=tw.PATCH, vision_hidden=vision_hidden, vision_layers=vision_layers,
                                    text_hidden=text_hidden, text_layers=text_layers, heads=heads, kv_heads=heads,
                                    vision_feature_layer=-1)
            self.vlm = LlavaForConditionalGeneration(cfg)
            self.vlm.generation_config.pad_token_id = tokenizer.pad_token_id
            self.vlm.generation_config.eos_token_id = tokenizer.eos_token_id
        else:
            self.vlm = LlavaForConditionalGeneration.from_pretrained(init_from)
        cfg = self.vlm.config
        n_colors, n_shapes = len(tw.COLOR_CLASSES), len(tw.SHAPES)
        self.symbolic = SymbolicEmbedder(cfg.text_config.hidden_size, tw.GRID, n_colors, n_shapes)
        self.heads = VisionHeads(cfg.vision_config.hidden_size, tw.GRID, n_colors, n_shapes)
        self.probe = GroundingProbe(cfg.text_config.hidden_size, tw.GRID)
        n_layers = cfg.text_config.num_hidden_layers
        self.ground_layer = n_layers // 2 if ground_layer is None else ground_layer
        if not 1 <= self.ground_layer <= n_layers:
            raise ValueError(f"ground_layer={ground_layer} must be in 1..{n_layers}")
        self.relation_layer = n_layers - 1 if relation_layer is None else relation_layer
        if not 1 <= self.relation_layer <= n_layers:
            raise ValueError(f"relation_layer={relation_layer} must be in 1..{n_layers}")
        if init_from is not None and (Path(init_from) / SYMBOLIC_FILE).is_file():
            self._load_extras(load_file(str(Path(init_from) / SYMBOLIC_FILE)))
        self.qtypes = tw.QUESTION_TYPES
        self._freeze_for_stage()
        self.val_acc = nn.ModuleList(MeanMetric() for _ in self.qtypes)

    # ---- which parameters train --------------------------------------------------------------------------
    def _freeze_for_stage(self) -> None:
        self.requires_grad_(False)
        inner = self.vlm.model
        trainable = {
            "vision": [inner.vision_tower, self.heads],
            "symbolic": [inner.language_model, self.vlm.lm_head, self.symbolic, self.probe],
            "align": [inner.multi_modal_projector],
            "qa": [inner.multi_modal_projector, inner.language_model, self.vlm.lm_head, self.probe],
        }[self.hparams.stage]
        for module in trainable:
            module.requires_grad_(True)

    # ---- losses ----------------------------------------------------------------------------------------------
    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vlm.model.vision_tower(pixel_values, output_hidden_states=True)
        return out.hidden_states[self.vlm.config.vision_feature_layer]  # (B, 1 + N, Dv)

    def vision_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.heads.norm(self._vision_features(batch["pixel_values"]))
        cls, patches = hidden[:, 0], hidden[:, 1:]
        h, hp = self.heads, self.hparams
        losses = {
            "color": F.cross_entropy(h.color(patches).flatten(0, 1), batch["patch_color"].flatten()),
            # shape is learnt from few object patches: without the up-weighting it stalls near chance
            "shape": hp.shape_weight * F.cross_entropy(h.shape(patches).flatten(0, 1), batch["patch_shape"].flatten(),
                                                       ignore_index=-100),
            "row": F.cross_entropy(h.row(patches).flatten(0, 1), batch["patch_row"].flatten()),
            "col": F.cross_entropy(h.col(patches).flatten(0, 1), batch["patch_col"].flatten()),
            "center": F.cross_entropy(h.center(patches).flatten(0, 1), batch["patch_center"].flatten(),
                                      weight=torch.tensor([1.0, hp.center_weight], device=patches.device)),
            "quadrant": F.cross_entropy(h.quadrant(patches).flatten(0, 1), batch["patch_quadrant"].flatten(),
                                        ignore_index=-100),
            "present": F.binary_cross_entropy_with_logits(h.present(cls), self._present_targets(batch)),
        }
        with torch.no_grad():
            obj = batch["patch_shape"] >= 0
            stats = {
                "color_acc": (h.color(patches).argmax(-1) == batch["patch_color"]).float().mean(),
                "shape_acc": (h.shape(patches).argmax(-1)[obj] == batch["patch_shape"][obj]).float().mean(),
                "center_acc": (h.center(patches).argmax(-1)[batch["patch_center"] == 1] == 1).float().mean(),
            }
        return sum(losses.values()), stats

    def _present_targets(self, batch) -> torch.Tensor:
        n_colors = len(self.heads.color.bias) - 2
        n_shapes = len(self.heads.shape.bias)
        obj = batch["patch_shape"] >= 0
        colors = F.one_hot(batch["patch_color"].clamp(max=n_colors), n_colors + 1)[..., :n_colors]
        shapes = F.one_hot(batch["patch_shape"].clamp(min=0), n_shapes) * obj.unsqueeze(-1)
        return torch.cat([(colors * obj.unsqueeze(-1)).amax(1), shapes.amax(1)], dim=-1).float()

    def symbolic_inputs(self, batch) -> torch.Tensor:
        """Token embeddings with the image tokens replaced by the symbolic patch embeddings."""
        embeds = self.vlm.get_input_embeddings()(batch["input_ids"])
        image = batch["input_ids"] == self.vlm.config.image_token_id
        symbols = self.symbolic(batch).to(embeds.dtype)
        return embeds.masked_scatter(image.unsqueeze(-1), symbols)

    def qa_forward(self, batch, hidden: bool = False):
        if self.hparams.stage == "symbolic":
            return self.vlm(inputs_embeds=self.symbolic_inputs(batch), attention_mask=batch["attention_mask"],
                            output_hidden_states=hidden)
        return self.vlm(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=batch["attention_mask"], output_hidden_states=hidden)

    def qa_logits(self, batch) -> torch.Tensor:
        return self.qa_forward(batch).logits

    def qa_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        grounded = hp.ground_weight > 0 and "ground_pos" in batch
        related = hp.relation_weight > 0 and "ground_pos" in batch
        out = self.qa_forward(batch, hidden=grounded or related)
        logits = out.logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        stats = {"answer_acc": self._first_answer_correct(logits, labels).float().mean()}
        if grounded:
            ground, ground_acc = self.grounding_loss(out.hidden_states[self.ground_layer], batch)
            loss = loss + hp.ground_weight * ground
            stats["ground_acc"] = ground_acc
        if related:
            relation, relation_acc = self.relation_loss(out.hidden_states[self.relation_layer], labels, batch)
            loss = loss + hp.relation_weight * relation
            stats["relation_acc"] = relation_acc
        return loss, stats

    def grounding_loss(self, hidden: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of the probe's (row, col) at each naming word; and how often both are right."""
        named = batch["ground_pos"] >= 0
        if not bool(named.any()):
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(named)
        states = hidden[rows[named], batch["ground_pos"][named]].float()
        row_logits, col_logits = self.probe.row(states), self.probe.col(states)
        row, col = batch["ground_row"][named], batch["ground_col"][named]
        where = torch.stack([row, col], dim=-1).float() / (self.probe.row.out_features - 1)
        loss = (F.cross_entropy(row_logits, row) + F.cross_entropy(col_logits, col)
                + ORDINAL_WEIGHT * F.mse_loss(self.probe.ordinal(states), where))
        acc = ((row_logits.argmax(-1) == row) & (col_logits.argmax(-1) == col)).float().mean()
        return loss, acc.detach()

    def relation_loss(self, hidden: torch.Tensor, labels: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE of the probe's two columns at the answer position of questions that name two objects (left_of);
        and how often the sign of their difference is right."""
        paired = (batch["ground_pos"] >= 0).all(dim=1)
        if not bool(paired.any()):
            zero = hidden.sum() * 0.0
            return zero, zero.detach()
        states = hidden[self._first_answer(labels)][paired].float()  # labels are already shifted to hidden's rows
        cols = batch["ground_col"][paired].float() / (self.probe.col.out_features - 1)
        pred = self.probe.pair(states)
        apart = cols[:, 0] != cols[:, 1]  # objects in one patch column have no order to get right
        right = ((pred[:, 0] < pred[:, 1]) == (cols[:, 0] < cols[:, 1]))[apart]
        acc = right.float().mean() if bool(apart.any()) else pred.new_tensor(1.0)
        return ORDINAL_WEIGHT * F.mse_loss(pred, cols), acc.detach()

    @staticmethod
    def _first_answer(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, positions) indexing each row's first answer label."""
        return torch.arange(labels.shape[0], device=labels.device), (labels != -100).float().argmax(dim=1)

    @classmethod
    def _first_answer_correct(cls, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        first = cls._first_answer(labels)
        return logits[first].argmax(-1) == labels[first]

    def align_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            feats = self._vision_features(batch["pixel_values"])[:, 1:]
            target = self.symbolic(batch)
        projected = self.vlm.model.multi_modal_projector(feats)
        loss = F.mse_loss(projected, target)
        cos = F.cosine_similarity(projected, target, dim=-1).mean()
        return loss, {"cosine": cos.detach()}

    def step_loss(self, batch):
        stage = self.hparams.stage
        if stage == "vision":
            return self.vision_loss(batch)
        if stage == "align":
            return self.align_loss(batch)
        return self.qa_loss(batch)

    # ---- Lightning hooks ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss, stats = self.step_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, stats = self.step_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=size)
        if self.hparams.stage in ("symbolic", "qa"):
            correct = self._first_answer_correct(self.qa_logits(batch)[:, :-1], batch["labels"][:, 1:]).float()
            for i, metric in enumerate(self.val_acc):
                mask = batch["qtype"] == i
                if bool(mask.any()):
                    metric.update(correct[mask])

    def on_validation_epoch_end(self) -> None:
        if self.hparams.stage not in ("symbolic", "qa"):
            return
        for name, metric in zip(self.qtypes, self.val_acc):
            if metric.update_count:
                self.log(f"val/acc_{name}", metric.compute())
            metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return adamw_warmup_cosine(params, hp.lr, hp.weight_decay, hp.warmup_steps,
                                   self.trainer.estimated_stepping_batches)

    def on_train_end(self) -> None:
        if self.hparams.out_dir is not None and self.trainer.is_global_zero:
            self.save_stage(self.hparams.out_dir)

    def save_stage(self, directory: str | Path) -> Path:
        """A `from_pretrained` directory (model + tokenizer + processor) plus the training-only extras (symbolic
        embedder, grounding probe) that the next stage continues from."""
        directory = Path(directory)
        self.vlm.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        state = {f"{name}.{k}": v.detach().cpu().contiguous()
                 for name, module in self._extras().items() for k, v in module.state_dict().items()}
        save_file(state, str(directory / SYMBOLIC_FILE))
        return directory

    def _extras(self) -> dict[str, nn.Module]:
        return {"symbolic": self.symbolic, "probe": self.probe}

    def _load_extras(self, state: dict[str, torch.Tensor]) -> None:
        # a module absent from the file (an earlier stage never trained it) keeps its fresh initialisation
        for name, module in self._extras().items():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if part:
                missing, unexpected = module.load_state_dict(part, strict=False)
                if unexpected:
                    raise ValueError(f"{SYMBOLIC_FILE}: unexpected {name} weights {unexpected}")
