"""The registry contract: ``Query`` (one subclass per registry), what a query resolves to (``Pinned``),
the run context it resolves in, webhook ``Event``s, and the field checks every registry shares.

Below ``soup.registry`` (which parses and resolves a recipe's queries) and its ``hub``, ``folder`` and
``mlflow`` modules, so they import this and never the package.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soup.io.manifest import pin_key

__all__ = ["Query", "Pinned", "Context", "Event", "tracking_uri", "check_keys", "string_list", "one_line"]


@dataclass(frozen=True)
class Pinned:
    """One ingredient, pinned: what a query (or a fixed ingredient) resolved to at run time."""

    source: str  # as soup.json records it: hf://owner/name@sha, an absolute path, models:/NAME/N
    label: str | None  # a stable label (None: the default, the folder or repo name)
    revision: str  # the pin: a commit sha, a content fingerprint, a version number ("" if not pinned)
    origin: str  # the recipe field it came from, e.g. "ingredients[2]"
    fetch: Callable[[], Any] | None = None  # makes it local (MLflow: download); default: ``source``

    def spec(self) -> Any:
        """What ``cook`` takes: the source itself, or (MLflow) a Checkpoint of the downloaded folder."""
        return self.fetch() if self.fetch is not None else self.source

    @property
    def key(self) -> str:
        """Identity for "has anything changed?" (the same rule as ``IngredientEntry.pin``)."""
        return pin_key(self.source, self.revision)

    @property
    def display(self) -> str:
        """Short, for logs and commit messages: ``acme/sft-ocr@abc1234``, ``models:/sft/3``, a label."""
        if self.source.startswith("hf://"):
            repo, _, rev = self.source[len("hf://"):].partition("@")
            return f"{repo}@{rev[:7]}" if rev else repo
        if self.source.startswith("models:/"):
            return self.source
        return self.label or Path(self.source).name


@dataclass(frozen=True)
class Context:
    """Where queries are resolved: the hub endpoint and token, the MLflow tracking URI."""

    endpoint: str | None = None
    token: str | bool | None = None
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI


@dataclass(frozen=True)
class Event:
    """A webhook event, reduced to what a query needs to tell whether it concerns it."""

    registry: str  # "hub" or "mlflow"
    name: str  # hub: owner/name; mlflow: the registered model's name
    kind: str = ""  # hub: the scope (repo.content); mlflow: entity.action (model_version.created)


class Query(ABC):
    """A registry query in a recipe. Subclasses are frozen dataclasses with a ``where`` field."""

    registry: ClassVar[str]
    where: str  # its recipe field path, e.g. "ingredients[1]"

    @classmethod
    @abstractmethod
    def parse(cls, item: Mapping[str, Any], where: str, base: Path, errors: list[str]) -> Query | None:
        """Check a recipe mapping; append field-path errors and return None when it is wrong."""

    @abstractmethod
    def resolve(self, ctx: Context) -> list[Pinned]:
        """Every matching ingredient, pinned, in a stable order (may be empty)."""

    @abstractmethod
    def describe(self) -> str:
        """The query in one line, e.g. ``hub models by acme named sft-* tagged instruct``."""

    def matches(self, event: Event) -> bool:
        """Whether a webhook event may change what this query resolves to."""
        return False


def tracking_uri(given: str | None) -> str | None:
    """The MLflow tracking URI: the recipe's ``tracking_uri``, else ``MLFLOW_TRACKING_URI``."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or None


def check_keys(item: Mapping[str, Any], allowed: set[str], where: str, errors: list[str]) -> None:
    """Unknown keys of a query mapping, named with their field path (as recipe.py does)."""
    for key in sorted(k for k in item if not isinstance(k, str) or k not in allowed):
        errors.append(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")


def string_list(value: Any, where: str, errors: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) and value:
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        errors.append(f"{where}: must be a list of strings, got {value!r}")
        return ()
    return tuple(value)


def one_line(err: BaseException) -> str:
    """An exception as one line (first line only), for registry errors that wrap foreign text."""
    from soup.errors import redact

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return redact(text)

