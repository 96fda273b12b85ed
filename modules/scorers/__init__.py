"""Stage-2 scorers (inside the language model), one file per method, registered by name."""

from modules.scorers.base import QUERY_MODES, SCORERS, Scorer, Stage2Context, get_scorer
from modules.scorers.fastv import FastVScorer

# Every stage-2 scorer with default parameters; the generic stage-2 tests are parametrized over this list.
DEFAULT_SCORERS: list[Scorer] = [FastVScorer()]

__all__ = ["DEFAULT_SCORERS", "QUERY_MODES", "SCORERS", "FastVScorer", "Scorer", "Stage2Context", "get_scorer"]
