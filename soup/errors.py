"""One exception tree for everything soup reports to a user.

Every error carries a one-line message that names the file, tensor or field at fault; the CLI prints
that line and exits 1. Anything that is not a ``SoupError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "SoupError",
    "RecipeError",
    "CheckpointError",
    "IncompatibleIngredients",
    "EvaluatorError",
    "HubError",
]


class SoupError(Exception):
    """Base class: a problem with the user's inputs or environment, reported as one line."""


class RecipeError(SoupError):
    """A recipe, rule or option is invalid (names the field path)."""


class CheckpointError(SoupError):
    """An ingredient checkpoint is missing, truncated or corrupt (names the file and tensor)."""


class IncompatibleIngredients(SoupError):
    """Ingredients disagree on tensor names, shapes or dtypes (names the tensor)."""


class EvaluatorError(SoupError):
    """An evaluator crashed, timed out or returned a non-finite score (names the candidate)."""


class HubError(SoupError):
    """A hub request failed: authentication, missing repo or revision, stale parent commit."""
