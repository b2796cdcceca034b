"""soup: model soups for fine-tuned (vision-)language models.

Streaming weight merging (``merge``), evaluator-driven soups and hub publishing. Every soup is a
weighted mean of ingredient checkpoints; strategies decide the weights, one engine applies them.
"""

from .pipeline import SoupResult, average_soup, cook, greedy_soup, maximum_soup, search_soup
from .errors import CheckpointError, EvaluatorError, HubError, IncompatibleIngredients, RecipeError, SoupError
from .evaluate import Candidate, Evaluator, Score, load_evaluator
from .inspection import inspect
from .ingredients import Ingredient
from .manifest import Manifest
from .manifest import read as read_manifest
from .engine import MergeResult, merge, soup_version
from .adapters import AdapterResult, adapter_soup
from .strategies import Choice, SoupStrategy, make_strategy
from .workers import WorkerResult, worker
from .pipeline import run_recipe
from .schedule import Update, watch

__version__ = soup_version()

__all__ = [
    "merge", "MergeResult", "adapter_soup", "AdapterResult", "inspect", "Ingredient", "Manifest", "read_manifest",
    "maximum_soup", "average_soup", "greedy_soup", "search_soup", "cook", "SoupResult",
    "Evaluator", "Candidate", "Score", "load_evaluator",
    "SoupStrategy", "Choice", "make_strategy",
    "worker", "WorkerResult",
    "run_recipe", "watch", "Update",
    "SoupError", "RecipeError", "CheckpointError", "IncompatibleIngredients", "EvaluatorError", "HubError",
    "__version__",
]
