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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.errors import SoupError
from soup.registry.base import Context, Event, Pinned, Query, tracking_uri

__all__ = ["Query", "Pinned", "Context", "Event", "REGISTRIES", "parse_query", "resolve_ingredients",
           "has_queries", "context_of", "describe_pinned", "tracking_uri", "resolve_query"]


def _registries() -> dict[str, type[Query]]:
    from soup.registry.folder import FolderQuery
    from soup.registry.hub import HubQuery
    from soup.registry.mlflow import MlflowQuery

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
        from soup.registry.hub import pin_repo
        from soup.hub.specs import parse_hub_spec

        repo_id, revision = parse_hub_spec(source)
        sha = pin_repo(repo_id, revision, ctx)
        return Pinned(f"hf://{repo_id}@{sha}", label, sha, where)
    from soup.io.checkpoint import open_checkpoint

    return Pinned(source, label, open_checkpoint(Path(source), label=label).fingerprint, where)


def describe_pinned(pinned: Sequence[Pinned]) -> list[str]:
    """Lines for ``soup run --dry-run``: each pinned ingredient with its label and pin."""
    return [f"  {p.label or p.display}: {p.source}" + (f"  (pinned {p.revision[:12]})" if p.revision and
                                                        p.revision not in p.source else "")
            for p in pinned]


