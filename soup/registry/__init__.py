"""Registry queries: ingredients named by a query, resolved at run time to pinned versions.

Beside fixed ingredients, a recipe may list mappings with a ``registry`` key::

    ingredients:
      - runs/base-sft                                            # fixed, as before
      - {registry: hub, author: acme, name: "sft-*", tags: [instruct]}   # HfApi.list_models
      - {registry: hub, collection: acme/sfts-64f9a55bb3115b4f513ec026}    # a hub collection
      - {registry: folder, glob: "runs/*/final"}                 # relative to the recipe
      - {registry: mlflow, model: sft, aliases: [candidate], tags: {stage: done}}   # MLflow registry

A query is checked when the recipe is read (errors name the field path, as for every recipe field)
and resolved at run time, before any evaluation, into ``Pinned`` ingredients: a hub model at its
head commit (``hf://owner/name@sha``), a folder with its content fingerprint, an MLflow model version
by number (``models:/NAME/N``). Labels are stable — the repo name, the glob's wildcard parts,
``NAME-vN`` — so a new match never renames the others. A query that matches nothing is an error.

One module per registry (``hub``, ``folder``, ``mlflow``), each a ``Query`` with ``parse``,
``resolve``, ``describe`` and ``matches`` (does a webhook event concern it?).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import SoupError
from ..manifest import pin_key

__all__ = ["Query", "Pinned", "Context", "Event", "REGISTRIES", "parse_query", "resolve_ingredients",
           "has_queries", "context_of", "describe_pinned", "tracking_uri", "resolve_query"]


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


def _registries() -> dict[str, type[Query]]:
    from .folder import FolderQuery
    from .hub import HubQuery
    from .mlflow import MlflowQuery

    return {q.registry: q for q in (HubQuery, FolderQuery, MlflowQuery)}


REGISTRIES = ("hub", "folder", "mlflow")


def parse_query(item: Mapping[str, Any], where: str, base: Path, errors: list[str]) -> Query | None:
    """A recipe mapping with a ``registry`` key -> its Query (None, with errors appended, if wrong)."""
    name = item.get("registry")
    kinds = _registries()
    if not isinstance(name, str) or name not in kinds:
        errors.append(f"{where}.registry: {name!r} is not a registry (one of: {', '.join(REGISTRIES)})")
        return None
    return kinds[name].parse(item, where, base, errors)


def has_queries(recipe: Any) -> bool:
    return any(isinstance(s, Query) for s in recipe.ingredients)


def context_of(recipe: Any) -> Context:
    return Context(endpoint=recipe.endpoint, tracking_uri=getattr(recipe, "tracking_uri", None))


def resolve_ingredients(recipe: Any, *, pin_fixed: bool = False, output: str | Path | None = None) -> list[Pinned]:
    """Every ingredient of a recipe, queries resolved (and, with ``pin_fixed``, fixed ones pinned too:
    a hub branch to its commit sha, a local checkpoint to its fingerprint).

    The same source named twice (by two queries, or a query and a fixed entry) is kept once. A query
    never returns the soup itself: its ``push_to`` repo, its ``publish`` model, its output folder
    (``output``, default the recipe's) are left out (``acme/sft-*`` would otherwise find ``acme/sft-soup``).

    Raises:
        SoupError: a query matched nothing, a registry cannot be reached, a fixed ingredient is missing.
    """
    ctx = context_of(recipe)
    pinned: list[Pinned] = []
    seen: set[str] = set()
    for i, (item, label) in enumerate(zip(recipe.ingredients, recipe.labels)):
        where = f"ingredients[{i}]"
        if isinstance(item, Query):
            found = resolve_query(recipe, item, output=output, ctx=ctx)
            if not found:
                raise SoupError(f"{where}: {item.describe()}: no match (an empty query is an error: "
                                "nothing to soup)")
            found = [p for p in found if p.key not in seen]  # named already (fixed, or by another query)
        elif pin_fixed:
            found = [_pin_fixed(str(item), label, where, ctx)]
        else:
            found = [Pinned(str(item), label, "", where)]
        seen.update(p.key for p in found)
        pinned.extend(found)
    return pinned


def resolve_query(recipe: Any, query: Query, *, output: str | Path | None = None,
                  ctx: Context | None = None) -> list[Pinned]:
    """What one of a recipe's queries resolves to now, the soup itself left out (see ``resolve_ingredients``)."""
    return [p for p in query.resolve(ctx or context_of(recipe)) if not _is_own(p, recipe, output)]


def _is_own(p: Pinned, recipe: Any, output: str | Path | None) -> bool:
    """Whether a query's match is the soup this recipe makes (where it is pushed, registered or written)."""
    push = (recipe.push_to or {}).get("repo")
    if push and p.source.startswith(f"hf://{push}@"):
        return True
    publish = (getattr(recipe, "publish", None) or {}).get("mlflow")
    if publish and p.source.startswith(f"models:/{publish}/"):
        return True
    out = output if output is not None else recipe.output
    if out is not None and not p.source.startswith(("hf://", "models:/")):
        here, dest = Path(os.path.realpath(p.source)), Path(os.path.realpath(out))
        return here == dest or here.is_relative_to(dest)
    return False


def _pin_fixed(source: str, label: str | None, where: str, ctx: Context) -> Pinned:
    if source.startswith("hf://"):
        from .hub import pin_repo
        from ..hub.specs import parse_hub_spec

        repo_id, revision = parse_hub_spec(source)
        sha = pin_repo(repo_id, revision, ctx)
        return Pinned(f"hf://{repo_id}@{sha}", label, sha, where)
    from ..checkpoint import open_checkpoint

    return Pinned(source, label, open_checkpoint(Path(source), label=label).fingerprint, where)


def describe_pinned(pinned: Sequence[Pinned]) -> list[str]:
    """Lines for ``soup run --dry-run``: each pinned ingredient with its label and pin."""
    return [f"  {p.label or p.display}: {p.source}" + (f"  (pinned {p.revision[:12]})" if p.revision and
                                                        p.revision not in p.source else "")
            for p in pinned]


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
    from ..errors import redact

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return redact(text)

