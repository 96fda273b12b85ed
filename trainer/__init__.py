"""Training entry points: CLI, strategies and callbacks.

Importing the package registers learnprune's DeepSpeed presets in Lightning's StrategyRegistry
(``deepspeed_stage_2``, ``deepspeed_stage_3``, see trainer/strategies.py) and sets ``DS_ACCELERATOR`` before
anything imports deepspeed.
"""

import trainer.strategies  # noqa: F401
