"""Distributed strategies: DeepSpeed ZeRO presets and a DeepSpeed strategy that also runs on CPU.

Lightning's stock ``DeepSpeedStrategy`` refuses anything but CUDA. :class:`DeepSpeedStrategy` here runs the
real DeepSpeed engine on CPU (gloo, ``DS_ACCELERATOR=cpu``) so that CI exercises ZeRO-2/3 end to end; on GPUs
every override defers to the stock behaviour. It saves only the parameters that train
(``exclude_frozen_parameters=True`` by default): a checkpoint of a head trained on a frozen 7B VLM is
megabytes.

Importing this module (``import trainer`` does) registers ``deepspeed_stage_2`` and ``deepspeed_stage_3`` in
Lightning's ``StrategyRegistry``, replacing Lightning's own entries of those names:
``Trainer(strategy="deepspeed_stage_3")``, a YAML ``strategy: deepspeed_stage_3`` line and
``--trainer.strategy deepspeed_stage_3`` all build :class:`DeepSpeedStrategy` with the preset in
``configs/deepspeed/`` (``ddp`` stays Lightning's).
Any other configuration goes through ``class_path``::

    trainer:
      accelerator: cpu          # or gpu
      devices: 2
      strategy:
        class_path: trainer.strategies.DeepSpeedStrategy
        init_args:
          config: configs/deepspeed/zero3.json

Notes:

- ``DS_ACCELERATOR`` is read once, the first time DeepSpeed picks its accelerator (on ``import deepspeed``).
  This module sets it to ``cpu`` at import time when CUDA is not available, so import it before anything
  imports deepspeed; when that is not possible (CUDA machine, ``accelerator="cpu"``) ``setup_environment``
  swaps the already chosen accelerator for DeepSpeed's CPU one.
- Use a torch optimizer from ``configure_optimizers`` (e.g. ``torch.optim.AdamW``). DeepSpeed's own (CPU) Adam
  JIT-compiles a C++ extension (~41 s); the presets therefore carry no ``"optimizer"`` block.
- On CPU the ranks meet at a ``barrier()`` and destroy the process group (gloo may otherwise SIGABRT at exit).
  By default this happens at teardown, i.e. when ``fit`` returns: checkpoint with a ``ModelCheckpoint``
  callback, and do not call ``trainer.save_checkpoint``/``validate``/``test`` on the same strategy afterwards
  (the engine keeps the destroyed group). For ``fit`` followed by ``test`` pass
  ``destroy_process_group="exit"`` (at interpreter exit instead) or ``"never"``.
- Lightning calls ``on_fit_end`` after the strategy's teardown (on GPUs the model is on the CPU by then):
  work that needs the ranks together after training (a ZeRO-3 forward pass, gathering weights for export)
  belongs in ``on_train_end`` (see trainer/callbacks.py ``ReportAccuracy``).
- The presets leave ``train_micro_batch_size_per_gpu``, ``gradient_clipping`` and the ``fp16``/``bf16`` blocks
  to Lightning (dataloader batch size, ``Trainer(gradient_clip_val=..., precision=...)``); Lightning refuses a
  preset that sets ``gradient_accumulation_steps`` (use ``Trainer(accumulate_grad_batches=...)``) and does not
  resolve HF-style ``"auto"`` values.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import importlib
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

if not torch.cuda.is_available():
    # DeepSpeed auto-detects the CPU too, but only after a warning and only if nothing set it otherwise;
    # setdefault keeps an explicit user choice.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
PRESETS = {"deepspeed_stage_2": PRESET_DIR / "zero2.json", "deepspeed_stage_3": PRESET_DIR / "zero3.json"}
STRATEGY_NAMES = ("ddp", *PRESETS)


def _no_shm_op() -> None:
    return None


def _use_deepspeed_cpu_accelerator() -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def _skip_shm_op_build() -> None:
    # The shm op only accelerates DeepSpeed's inference all-reduce (which falls back to the process group
    # without it) but costs a ~28 s C++ JIT build on the first init_distributed. `import deepspeed.comm.torch
    # as m` would bind the real `torch` package: `from .comm import *` in deepspeed/comm/__init__.py exports
    # the `torch` that comm.py imports, shadowing the submodule attribute. Hence import_module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = _no_shm_op


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, extended to run on CPU with gloo.

    Accepts every argument of the stock strategy; ``config`` may be a dict or a path to a JSON preset (see
    ``configs/deepspeed/``). With a CUDA accelerator it behaves like the stock strategy, except for the
    default of ``exclude_frozen_parameters``.

    Args:
        exclude_frozen_parameters: leave parameters with ``requires_grad=False`` out of checkpoints (default
            True, the stock default is False): Lightning's DeepSpeed save does not go through the module's
            ``state_dict``/``on_save_checkpoint``, so this is the only way to keep a frozen VLM out. Such a
            checkpoint is loaded with ``load_module_strict=False`` (see :meth:`load_checkpoint`): the frozen
            weights come from the model's own ``from_pretrained``.
        destroy_process_group: on CPU, when to ``barrier()`` and destroy the process group: ``"teardown"``
            (end of each ``fit``/``validate``/...), ``"exit"`` (interpreter exit) or ``"never"``.
    """

    def __init__(
        self,
        *args: Any,
        exclude_frozen_parameters: bool = True,
        destroy_process_group: Literal["teardown", "exit", "never"] = "teardown",
        **kwargs: Any,
    ) -> None:
        if destroy_process_group not in ("teardown", "exit", "never"):
            raise ValueError(
                f"destroy_process_group must be 'teardown', 'exit' or 'never', got {destroy_process_group!r}"
            )
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        # Lightning writes batch size, accumulation and precision into the config; a dict shared with another
        # Trainer would then be rejected ("Do not set gradient_accumulation_steps").
        self.config = copy.deepcopy(self.config)
        self._destroy_process_group = destroy_process_group
        self._failed = False
        self._exit_hook_registered = False

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu:
            super().setup_environment()
            return
        _use_deepspeed_cpu_accelerator()
        self._failed = False
        # Skip the stock CUDA-only check, keep DDPStrategy's device setup + setup_distributed().
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            super().setup_distributed()
            return
        # The stock version validates CUDA device indices against local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        _skip_shm_op_build()
        self._init_deepspeed_distributed()
        if self._destroy_process_group == "exit" and not self._exit_hook_registered:
            atexit.register(self._shutdown_process_group)
            self._exit_hook_registered = True

    def _get_process_group_backend(self) -> str:
        # Lightning already picks gloo for CPU devices; spelled out so that DeepSpeed's CPU preference (oneCCL
        # when installed) can never apply.
        if self._on_cpu and self._process_group_backend is None:
            return "gloo"
        return super()._get_process_group_backend()

    def _format_config(self) -> None:
        if self._on_cpu:
            assert isinstance(self.config, dict)
            precision = self.precision_plugin.precision
            if precision in ("16-mixed", "16-true"):
                raise MisconfigurationException(
                    f"DeepSpeed on CPU does not support fp16 (Trainer precision={precision!r});"
                    " use precision='32-true' or 'bf16-mixed'."
                )
            # A preset written for GPUs may enable half precision; on CPU the Trainer's precision decides and
            # Lightning re-adds the matching block below.
            self.config.pop("fp16", None)
            if precision not in ("bf16-mixed", "bf16-true"):
                self.config.pop("bf16", None)
        super()._format_config()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # The stock call passes root_device.index, which is None on CPU; DeepSpeed compares it with 0 to pick
        # the device and fails. Its CPU accelerator ignores the index, it only has to be a rank.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        if not self._on_cpu:
            super()._initialize_deepspeed_inference(model)
            return
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        # Same as the stock method except for device_rank (see _setup_model_and_optimizer).
        assert isinstance(self.config, dict)
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            inference_config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=inference_config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )
        self.model = engine

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        module = self.lightning_module
        if not self.exclude_frozen_parameters or module is None:
            return super().load_checkpoint(checkpoint_path, weights_only)
        # The stock method passes load_module_strict=module.strict_loading to DeepSpeed, which would then
        # refuse the frozen parameters this strategy left out of the checkpoint. The trained ones are restored
        # from the ZeRO optimizer partitions (fit) or the consolidated fp32 weights (validate/test) either
        # way.
        saved = module._strict_loading
        module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module._strict_loading = saved

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        super().on_exception(exception)

    def _shutdown_process_group(self) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        # After an exception a peer may never reach the barrier; do not wait for it then.
        if not self._failed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    def teardown(self) -> None:
        on_cpu = self._on_cpu
        super().teardown()
        if on_cpu and self._destroy_process_group == "teardown":
            self._shutdown_process_group()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        # Lightning's registry is filled when lightning.pytorch.strategies is imported (above), so these
        # entries replace its own "deepspeed_stage_2"/"deepspeed_stage_3".
        for name, preset in PRESETS.items():
            stage = name.rsplit("_", 1)[-1]
            strategy_registry.register(
                name,
                cls,
                description=f"DeepSpeed ZeRO stage {stage}, learnprune preset {preset.name} (CPU-capable,"
                " saves only the trained parameters)",
                override=True,
                config=str(preset),
            )


DeepSpeedStrategy.register_strategies(StrategyRegistry)


def resolve_strategy(name: str, **kwargs: Any) -> Strategy:
    """The strategy object ``Trainer(strategy=name)`` builds for ``"ddp" | "deepspeed_stage_2" |
    "deepspeed_stage_3"``, with ``kwargs`` added to (or replacing) the registered constructor arguments."""
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGY_NAMES)}")
    entry = StrategyRegistry[name]
    return entry["strategy"](**{**entry["init_params"], **kwargs})


__all__ = ["PRESETS", "STRATEGY_NAMES", "DeepSpeedStrategy", "resolve_strategy"]
