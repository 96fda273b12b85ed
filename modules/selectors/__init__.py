"""Stage-1 selectors (after the vision encoder), one file per method, registered by name."""

from modules.selectors.base import SELECTORS, ScoreSelector, Selector, get_selector
from modules.selectors.random import RandomSelector

# Every stage-1 selector with default parameters; the generic selector tests are parametrized over this list.
DEFAULT_SELECTORS: list[Selector] = [RandomSelector()]

__all__ = ["DEFAULT_SELECTORS", "SELECTORS", "RandomSelector", "ScoreSelector", "Selector", "get_selector"]
