"""The lmms-eval model `learnprune`: evaluate a pruned VLM of any supported family with lmms-eval.

    lmms-eval --model learnprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pruner=pruners/llava15-7b \\
        --tasks mme --batch_size 8
    lmms-eval --model learnprune --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,pruner=plan.yaml --tasks ...
    lmms-eval --model learnprune --model_args pretrained=...  --tasks ...      # no pruner: the unpruned model

Model args (`--model_args key=value,...`). lmms-eval's own `--batch_size` (always, default 1) and `--device` (when
given) flags arrive as keyword arguments too, so give those two as flags, not in `--model_args` (twice is a
TypeError raised by lmms-eval's `create_from_arg_string`):

- `pretrained`: the VLM, a hub id or local directory, loaded with `AutoModelForImageTextToText` (the family's own
  class) and its processor with `data.processors.load_processor` (AutoProcessor, or the images-only processor for
  Qwen-VL / OneVision processors that would need torchvision). `processor`: load the processor from elsewhere.
- `pruner`: a pruner directory or hub id (`modules.serve.load_pruned`: the head, the plan it was trained for and
  its LoRA adapters), or a plan file ending in .yaml / .yml / .json (`PruningPlan.load`); absent: unpruned.
- `device` (default cuda when available, else cpu; under `accelerate launch` each rank takes cuda:LOCAL_RANK),
  `dtype` (float16, bfloat16, float32 or auto; default: the model's default), `attn_implementation` (sdpa,
  eager, ...; stage 2 refuses flex_attention), `batch_size` (requests per forward / generate call; an int,
  not 'auto'), `max_new_tokens` (when a task does not set it),
  `use_chat_template` (default True: render each request with the processor's chat template), `loglikelihood`
  (`logprob`, the default: what `loglikelihood` returns is log P; `nll`: -log P, see below).

Requests are rendered as one user turn: the request's images (`doc_to_visual`) first, then its context, with the
generation prompt, through the processor's chat template (a context that already holds the processor's image
token once per image keeps its own placement). Batches are left padded (stage 2 scores from each row's last
prompt token).

- `generate_until`: batched `PrunedVLM.generate`; gen_kwargs `until` (str or list: the text is cut at the first
  of them, and a row stops generating once its text holds one), `max_new_tokens`, `temperature` (> 0 samples
  unless `do_sample: false`; 0 is greedy), `do_sample`, `top_p`, `top_k`, `num_beams`, ... (see
  `GENERATE_KWARGS`; others are refused). Requests are batched only with requests of identical gen_kwargs.
- `loglikelihood`: (sum of the log-probabilities of the continuation's tokens, whether greedy decoding would
  produce them), from one pruned forward pass of the prompt + continuation. Continuation tokens are text, so they
  survive pruning; `out.pruning.positions` maps every output row back to its column of the unpruned sequence.
  The selection is made from the prompt alone (`prompt_end`): stage 2 scores from the last prompt token and a
  question-aware head reads only the prompt, so the continuation never influences which tokens are kept.
  lmms-eval 0.7's `multiple_choice` scoring takes the `argmin` of these values (its own HF models return a
  loss): for such tasks pass `loglikelihood=nll` (the negated sum), or the least likely choice is the prediction.
  (lmms-eval 0.7.3's evaluator also turns loglikelihood results into strings before scoring them, which makes
  multiple_choice tasks fail for every model; generate_until tasks are unaffected.)
- `generate_until_multi_round`: one request at a time, each round a `generate_until` of what the task's
  `doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)` returns.

Registered through the entry-point group `lmms_eval.models` (pyproject.toml): lmms-eval 0.7 loads
`lmms_eval_manifest`, a `ModelManifest` naming `LearnPrune` as the simple (context-string) model `learnprune`.
Nothing here is model-specific: families differ only in the adapters of `modules/vlm/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

try:
    from lmms_eval.api.model import lmms
except ImportError as err:
    raise ImportError(
        "modules.eval_plugin is learnprune's lmms-eval model and needs lmms-eval (0.7.x): "
        "pip install 'learnprune[eval]'  (or: pip install 'lmms-eval>=0.7,<0.8')"
    ) from err

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

MODEL_ID = "learnprune"
CLASS_PATH = "modules.eval_plugin.LearnPrune"
PLAN_SUFFIXES = (".yaml", ".yml", ".json")
# the gen_kwargs a task may set besides `until` (passed to generate; anything else is refused, not ignored)
GENERATE_KWARGS = ("max_new_tokens", "min_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                   "repetition_penalty", "length_penalty", "no_repeat_ngram_size")
DTYPES = ("float16", "bfloat16", "float32", "float64")
LOGLIKELIHOOD = ("logprob", "nll")


def lmms_eval_manifest():
    """The entry point lmms-eval 0.7 loads from the `lmms_eval.models` group: model id `learnprune`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def load_plan_or_pruner(model, pruner: str | Path | None, processor=None):
    """A `PrunedVLM` of `model`: `pruner` is a plan file (.yaml / .yml / .json), a pruner directory or hub id, or
    None (the unpruned model, `PruningPlan()`)."""
    from modules.pruned_vlm import PrunedVLM, PruningPlan
    from modules.serve import load_pruned

    if pruner is None or str(pruner).strip() == "":
        return PrunedVLM(model, PruningPlan(), processor=processor)
    path = Path(str(pruner))
    if path.suffix.lower() in PLAN_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"pruner={str(pruner)!r} names a plan file that does not exist")
        return PrunedVLM(model, PruningPlan.load(path), processor=processor)
    return load_pruned(model, str(pruner), processor=processor)


def cut_at_until(text: str, until: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `until`."""
    end = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at >= 0:
                end = min(end, at)
    return text[:end]


class _UntilCriteria(StoppingCriteria):
    """Stops a row once its decoded new text holds one of the `until` strings (the same test `cut_at_until`
    applies afterwards, so stopping never changes the returned text). The sequences generate() shows may or may
    not start with the prompt (PrunedVLM generates from embeddings); the first call, made after the first new
    token, tells where the new tokens start."""

    def __init__(self, tokenizer, until: list[str]):
        self.tokenizer = tokenizer
        self.until = [s for s in until if s]
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.until) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str | float) or not str(value).strip().isdigit():
        raise ValueError(f"{name}={value!r}: give a positive int" + (" ('auto' is not supported)"
                                                                     if str(value).startswith("auto") else ""))
    out = int(str(value).strip())
    if out <= 0:
        raise ValueError(f"{name}={value!r}: give a positive int")
    return out


class LearnPrune(lmms):
    """lmms-eval model: a transformers VLM served through `PrunedVLM` (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, pruner: str | None = None, processor: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | str = 256, attn_implementation: str | None = None,
                 use_chat_template: bool = True, loglikelihood: str = "logprob",
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if loglikelihood not in LOGLIKELIHOOD:
            raise ValueError(f"loglikelihood={loglikelihood!r}: use 'logprob' (log P of the continuation) or 'nll' "
                             "(-log P, for lmms-eval 0.7's multiple_choice tasks, which take the argmin)")
        self.loglikelihood_as = loglikelihood
        from transformers import AutoModelForImageTextToText

        from data.processors import load_processor

        self.batch_size_per_gpu = _as_int(batch_size, "batch_size")
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        self.use_chat_template = bool(use_chat_template)
        self.chat_template = None  # lmms-eval reads it when run with --apply_chat_template
        self._device = self._resolve_device(device)
        torch_dtype = self._resolve_dtype(dtype)

        self.processor = load_processor(processor or pretrained)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"the processor of {processor or pretrained!r} ({type(self.processor).__name__}) has no "
                             "tokenizer: is it a VLM processor?")
        tokenizer.padding_side = "left"  # stage 2 scores from each row's last prompt token
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._tokenizer = tokenizer
        load_kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            load_kwargs["dtype"] = torch_dtype
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).to(self._device).eval()
        self.pruned = load_plan_or_pruner(model, pruner, processor=self.processor).to(self._device).eval()
        self.pretrained, self.pruner = pretrained, pruner
        image_processor = getattr(self.processor, "image_processor", None)
        # LLaVA-OneVision tells a lone (tiled) image from several (one view each) by nesting images per prompt
        self._nest_images = "batch_num_images" in getattr(image_processor, "model_input_names", ())
        self._image_token = getattr(self.processor, "image_token", None)

    # ---- lmms-eval's expected properties ---------------------------------------------------------------------
    @property
    def model(self):
        return self.pruned.model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def plan(self):
        return self.pruned.plan

    @staticmethod
    def _resolve_device(device: str | None) -> torch.device:
        if device is None or str(device) == "":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        # accelerate launch / torchrun: one process per GPU, each evaluating its share of the requests
        if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    @staticmethod
    def _resolve_dtype(dtype: str | None):
        if dtype is None or str(dtype) == "":
            return None
        if isinstance(dtype, torch.dtype) or dtype == "auto":
            return dtype
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {DTYPES} or 'auto'")
        return getattr(torch, str(dtype))

    # ---- prompts and inputs ----------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        """The request's images as RGB PIL images (an empty list for text-only requests)."""
        if doc_to_visual is None:
            return []
        return self._check_visuals(doc_to_visual(self._doc(task, split, doc_id)))

    @staticmethod
    def _check_visuals(visuals) -> list:
        if visuals is None:
            return []
        if not isinstance(visuals, list | tuple):
            visuals = [visuals]
        out = []
        for v in visuals:
            if isinstance(v, list | tuple):  # some tasks nest one list per image group
                out.extend(LearnPrune._check_visuals(list(v)))
            elif isinstance(v, Image.Image):
                out.append(v.convert("RGB"))
            else:
                raise ValueError(f"learnprune's lmms-eval model takes images only; got a {type(v).__name__} visual "
                                 f"({str(v)[:80]!r}): video and audio requests are not supported")
        return out

    def render(self, context: str, n_images: int) -> str:
        """The prompt text of one request: a user turn showing `n_images` images then `context`, with the
        generation prompt (the processor's chat template), or the bare context when `use_chat_template` is off."""
        placed = context.count(self._image_token) if self._image_token else 0
        if placed and placed != n_images:
            raise ValueError(f"the context places {placed} {self._image_token!r} tokens but the request has "
                             f"{n_images} images")
        if not self.use_chat_template or getattr(self.processor, "chat_template", None) is None:
            if placed or not n_images:
                return context
            if not self._image_token:
                raise ValueError("the processor names no image_token and has no chat template: cannot place images")
            return "".join(f"{self._image_token}\n" for _ in range(n_images)) + context
        content = [] if placed else [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": context})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def inputs(self, texts: list[str], images: list[list]) -> dict[str, Any]:
        """One processor call for the batch (left padded), on the model's device; `image_sizes` (original height,
        width) added when the processor does not return them and the adapter reads them (padding validity)."""
        kwargs: dict[str, Any] = {"text": list(texts), "return_tensors": "pt", "padding": True,
                                  "padding_side": "left"}
        flat = [im for ims in images for im in ims]
        if flat:
            kwargs["images"] = [list(ims) for ims in images] if self._nest_images else flat
        batch = dict(self.processor(**kwargs))
        if flat and batch.get("image_sizes") is None and "image_sizes" in self.pruned.adapter.vision_inputs:
            batch["image_sizes"] = torch.tensor([[im.height, im.width] for im in flat], dtype=torch.long)
        dtype = self.model.dtype
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self._device)
                if value.is_floating_point():
                    value = value.to(dtype)
            out[key] = value
        return out

    # ---- generation --------------------------------------------------------------------------------------------
    def generation_kwargs(self, gen_kwargs: dict | None) -> tuple[dict[str, Any], list[str]]:
        """(the generate() keyword arguments, the `until` strings) of a task's gen_kwargs."""
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, list | tuple) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        unknown = sorted(set(gen) - set(GENERATE_KWARGS))
        if unknown:
            raise ValueError(f"gen_kwargs {unknown} are not supported by learnprune's lmms-eval model; it takes "
                             f"'until' and {list(GENERATE_KWARGS)}")
        temperature = gen.pop("temperature", None)
        do_sample = gen.pop("do_sample", None)
        if do_sample is None:
            do_sample = temperature is not None and float(temperature) > 0
        if temperature is not None and float(temperature) <= 0:
            do_sample = False
        out: dict[str, Any] = {"max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens)),
                               "do_sample": bool(do_sample)}
        if out["do_sample"]:
            if temperature is not None:
                out["temperature"] = float(temperature)
            for key in ("top_p", "top_k"):
                if gen.get(key) is not None:
                    out[key] = gen[key]
        gen.pop("top_p", None)
        gen.pop("top_k", None)
        out.update({k: v for k, v in gen.items() if v is not None})
        out["pad_token_id"] = self.tokenizer.pad_token_id
        return out, list(until)

    def generate_ids(self, contexts: list[str], images: list[list], gen_kwargs: dict | None
                     ) -> tuple[dict[str, Any], torch.Tensor, list[str]]:
        """(model inputs, generated token ids (B, new) without the prompt, until strings) for one batch."""
        kwargs, until = self.generation_kwargs(gen_kwargs)
        texts = [self.render(c, len(ims)) for c, ims in zip(contexts, images, strict=True)]
        inputs = self.inputs(texts, images)
        if until:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_UntilCriteria(self.tokenizer, until)])
        with torch.no_grad():
            sequences = self.pruned.generate(**inputs, **kwargs)
        return inputs, sequences[:, inputs["input_ids"].shape[1]:], until

    def generate_texts(self, contexts: list[str], images: list[list], gen_kwargs: dict | None) -> list[str]:
        _, new, until = self.generate_ids(contexts, images, gen_kwargs)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_until(t, until) for t in texts]

    def _batches(self, requests: list, key) -> list[list[int]]:
        """Request indices in batches of `batch_size`: grouped by `key(args)`, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(key(req.args), []).append(i)
        out = []
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            out.extend(indices[k:k + self.batch_size] for k in range(0, len(indices), self.batch_size))
        return out

    def _progress(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, disable=(self.rank != 0), desc=desc)

    def generate_until(self, requests) -> list[str]:
        """One string per request: args (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        results: list[str | None] = [None] * len(requests)

        def gen_key(args) -> str:
            return json.dumps(args[1] or {}, sort_keys=True, default=str)

        pbar = self._progress(len(requests), "learnprune generate_until")
        for batch in self._batches(requests, gen_key):
            args = [requests[i].args for i in batch]
            contexts = [a[0] for a in args]
            images = [self._visuals(a[2], a[4], a[5], a[3]) for a in args]
            texts = self.generate_texts(contexts, images, args[0][1])
            for i, a, text in zip(batch, args, texts, strict=True):
                results[i] = text
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), text)
            pbar.update(len(batch))
        pbar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """One list of round outputs per request: args (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id,
        task, split). Round 0 answers the context; each later round answers what `doc_to_text(doc,
        previous_output=..., round_idx=..., previous_round_info=...)` returns (visuals, context, terminal,
        outputs so far, round info), until it signals the end."""
        results = []
        pbar = self._progress(len(requests), "learnprune generate_until_multi_round")
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            images = self._visuals(doc_to_visual, task, split, doc_id)
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info)
                    outputs = list(outputs)
                    if terminal:
                        break
                    images = self._check_visuals(visuals)
                outputs.append(self.generate_texts([context], [images], gen_kwargs)[0])
                round_idx += 1
            results.append(outputs)
            pbar.update(1)
        pbar.close()
        return results

    # ---- scoring -------------------------------------------------------------------------------------------------
    def _continuation(self, target, task: str, split: str, doc_id: int) -> str:
        if isinstance(target, str):
            return target
        value = target(self._doc(task, split, doc_id))
        return value if isinstance(value, str) else str(value)

    def score(self, contexts: list[str], continuations: list[str], images: list[list]
              ) -> list[tuple[float, bool]]:
        """(log P(continuation | prompt), greedy?) per row, from one pruned forward pass of prompt + continuation.

        The continuation's tokens are those the prompt + continuation tokenization has beyond the prompt's (the
        usual lm-eval convention). Row p of the logits predicts column p + 1 of the unpruned sequence;
        `out.pruning.positions` gives p for every surviving row."""
        prompts = [self.render(c, len(ims)) for c, ims in zip(contexts, images, strict=True)]
        fulls = [p + c for p, c in zip(prompts, continuations, strict=True)]
        n_cont = [max(0, len(self.tokenizer(f)["input_ids"]) - len(self.tokenizer(p)["input_ids"]))
                  for p, f in zip(prompts, fulls, strict=True)]
        inputs = self.inputs(fulls, images)
        input_ids = inputs["input_ids"]
        length = input_ids.shape[1]
        # the last prompt column of each row (left padding: the continuation ends every row)
        prompt_end = torch.tensor([length - n - 1 for n in n_cont], dtype=torch.long, device=input_ids.device)
        keep = max(n_cont) + 1
        with torch.no_grad():
            out = self.pruned(**inputs, prompt_end=prompt_end, logits_to_keep=keep, use_cache=False)
        logits = out.logits[:, -keep:].float()
        pruning = getattr(out, "pruning", None)
        positions = None if pruning is None else pruning.positions
        if positions is None:  # the unpruned model ran: row p is column p
            positions = torch.arange(length, device=input_ids.device).expand(input_ids.shape[0], -1)
        positions = positions[:, -logits.shape[1]:].to(input_ids.device)
        logprobs = torch.log_softmax(logits, dim=-1)
        results = []
        for row, n in enumerate(n_cont):
            if n == 0:
                results.append((0.0, True))
                continue
            targets = torch.arange(length - n, length, device=input_ids.device)
            match = positions[row].unsqueeze(0) == (targets - 1).unsqueeze(1)  # (n, keep)
            if not bool(match.any(dim=1).all()):
                raise RuntimeError("a continuation token's predecessor did not survive pruning; continuation "
                                   "tokens are text and must all survive")
            rows = match.float().argmax(dim=1)
            tokens = input_ids[row, targets]
            picked = logprobs[row, rows]  # (n, V)
            logprob = picked.gather(1, tokens.unsqueeze(1)).sum().item()
            greedy = bool((picked.argmax(dim=-1) == tokens).all())
            results.append((float(logprob), greedy))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) per request (with `loglikelihood=nll`: (-log-probability, is greedy)):
        args (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)."""
        sign = -1.0 if self.loglikelihood_as == "nll" else 1.0
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = self._progress(len(requests), "learnprune loglikelihood")
        for batch in self._batches(requests, lambda args: ""):
            contexts, continuations, images = [], [], []
            for i in batch:
                # (context, target, doc_to_visual, doc_id, task, split); acc_mutual_info's unconditional requests
                # are (context, continuation) alone
                context, target, *where = requests[i].args
                doc_to_visual, doc_id, task, split = where[:4] if len(where) >= 4 else (None, None, None, None)
                contexts.append(context)
                continuations.append(self._continuation(target, task, split, doc_id))
                images.append(self._visuals(doc_to_visual, task, split, doc_id))
            scores = [(sign * value + 0.0, greedy) for value, greedy in self.score(contexts, continuations, images)]
            for i, context, cont, s in zip(batch, contexts, continuations, scores, strict=True):
                results[i] = s
                self.cache_hook.add_partial("loglikelihood", (context, cont), s)
            pbar.update(len(batch))
        pbar.close()
        return results
