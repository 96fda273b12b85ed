"""python -m trainer fit|validate|test|predict --config CONFIG  |  python -m trainer export --ckpt X --out DIR"""

import trainer.strategies  # noqa: F401  - must come before anything imports deepspeed (sets DS_ACCELERATOR)
from trainer.cli import main

if __name__ == "__main__":
    main()
