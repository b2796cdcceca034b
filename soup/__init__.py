"""soup: model soups for fine-tuned (vision-)language models.

Streaming weight merging (``merge``), evaluator-driven soups and hub publishing. Every soup is a
weighted mean of ingredient checkpoints; strategies decide the weights, one engine applies them.

The public names below are imported on first use (PEP 562), so ``soup merge`` does not pay for the
search, worker and registry machinery (optuna, SQLAlchemy) it never touches.
"""

from __future__ import annotations

import importlib
from typing import Any

from soup.errors import CheckpointError, EvaluatorError, HubError, IncompatibleIngredients, RecipeError, SoupError

# public name -> the module that defines it
_LAZY = {
    "merge": "merging", "MergeResult": "merging", "soup_version": "merging",
    "adapter_soup": "adapters.merging", "AdapterResult": "adapters.merging",
    "inspect": "io.inspection", "Ingredient": "io.ingredients", "Manifest": "io.manifest",
    "maximum_soup": "pipeline", "average_soup": "pipeline", "greedy_soup": "pipeline", "search_soup": "pipeline",
    "cook": "pipeline", "SoupResult": "pipeline", "run_recipe": "run",
    "EvaluationOptions": "cook_options", "OutputOptions": "cook_options", "PublishOptions": "cook_options",
    "Evaluator": "soups.evaluate", "Candidate": "soups.evaluate", "Score": "soups.evaluate", "load_evaluator": "soups.evaluate",
    "SoupStrategy": "soups.strategies", "Choice": "soups.strategies", "make_strategy": "soups.strategies",
    "worker": "workers", "WorkerResult": "workers",
    "watch": "schedule.watch", "Update": "schedule.changes",
    "push": "hub", "HubOptions": "hub",  # `soup push` in Python: a finished soup folder to a hub repo, one commit
}

__all__ = [
    "merge", "MergeResult", "adapter_soup", "AdapterResult", "inspect", "Ingredient", "Manifest", "read_manifest",
    "maximum_soup", "average_soup", "greedy_soup", "search_soup", "cook", "SoupResult",
    "EvaluationOptions", "OutputOptions", "PublishOptions",
    "Evaluator", "Candidate", "Score", "load_evaluator",
    "SoupStrategy", "Choice", "make_strategy",
    "worker", "WorkerResult",
    "run_recipe", "watch", "Update", "push", "HubOptions",
    "SoupError", "RecipeError", "CheckpointError", "IncompatibleIngredients", "EvaluatorError", "HubError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "read_manifest":
        from soup.io.manifest import read

        return read
    if name == "__version__":
        from soup.merging import soup_version

        return soup_version()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'soup' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
