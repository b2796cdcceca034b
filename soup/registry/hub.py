"""Hub queries: the models of an author (name glob, tags) or of a collection, each pinned to its head.

``{registry: hub, author: acme, name: "sft-*", tags: [instruct]}`` lists models through
``HfApi.list_models`` (author, a search on the glob's literal part, the tags as filters), then keeps
the names the glob matches; ``{registry: hub, collection: SLUG}`` takes the models of a collection
(``HfApi.get_collection``). Each model is pinned to its head commit sha at resolve time
(``hf://owner/name@sha``). The recipe's ``endpoint`` (or ``HF_ENDPOINT``) and huggingface_hub's usual
token are used, so private repos work with the user's token.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soup.registry.base import Context, Event, Pinned, Query, check_keys, string_list

__all__ = ["HubQuery", "pin_repo"]

OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubQuery(Query):
    """Models on a hub: by author (+ name glob, tags) or by collection."""

    registry: ClassVar[str] = "hub"
    where: str
    author: str | None = None  # the owner (user or organisation)
    name: str = "*"  # a glob on the repo name (the part after owner/)
    tags: tuple[str, ...] = ()  # every one must be on the model
    collection: str | None = None  # a collection slug (owner/title-id)

    @classmethod
    def parse(cls, item: Mapping[str, Any], where: str, base: Path, errors: list[str]) -> HubQuery | None:
        check_keys(item, {"registry", "author", "name", "tags", "collection"}, where, errors)
        n = len(errors)
        for key in ("author", "name", "collection"):
            if key in item and not (isinstance(item[key], str) and item[key]):
                errors.append(f"{where}.{key}: must be a non-empty string, got {item[key]!r}")
        tags = string_list(item.get("tags"), f"{where}.tags", errors)
        collection, author = item.get("collection"), item.get("author")
        if collection is not None and any(k in item for k in ("author", "name", "tags")):
            errors.append(f"{where}: give either collection, or author (with name and tags), not both")
        elif collection is None and author is None:
            errors.append(f"{where}.author: required (the models' owner), or give a collection")
        if isinstance(author, str) and author and not OWNER.match(author):
            errors.append(f"{where}.author: {author!r} is not a user or organisation name")
        if isinstance(collection, str) and collection and collection.count("/") != 1:
            errors.append(f"{where}.collection: {collection!r} is not a collection slug (owner/title-id)")
        if len(errors) > n:
            return None
        return cls(where=where, author=author, name=item.get("name", "*"), tags=tags, collection=collection)

    def describe(self) -> str:
        if self.collection:
            return f"hub collection {self.collection}"
        tags = f" tagged {', '.join(self.tags)}" if self.tags else ""
        return f"hub models by {self.author} named {self.name}{tags}"

    def resolve(self, ctx: Context) -> list[Pinned]:
        from huggingface_hub import HfApi

        from soup.hub.errors import hub_error, retrying
        from soup.hub.specs import hub_endpoint

        api = HfApi(endpoint=hub_endpoint(ctx.endpoint), token=ctx.token)
        try:
            if self.collection:
                coll = retrying(lambda: api.get_collection(self.collection))
                found = {item.item_id: None for item in coll.items if item.item_type == "model"}
            else:
                models = retrying(lambda: list(api.list_models(
                    author=self.author, search=_literal(self.name) or None, filter=list(self.tags) or None,
                    expand=["sha", "tags"])))
                found = {m.id: m.sha for m in models if self._keeps(m.id, m.tags)}
        except Exception as err:
            raise hub_error(err, f"{self.describe()} ({self.where})", token=ctx.token) from None
        ids = sorted(found)
        names = [i.split("/")[-1] for i in ids]
        pinned = []
        for repo_id, name in zip(ids, names):
            sha = found[repo_id] or pin_repo(repo_id, None, ctx)
            label = name if names.count(name) == 1 else repo_id  # two owners, one name: the full id
            pinned.append(Pinned(f"hf://{repo_id}@{sha}", label, sha, self.where))
        return pinned

    def _keeps(self, repo_id: str, tags: list[str] | None) -> bool:
        owner, _, name = repo_id.partition("/")
        return (owner.lower() == (self.author or "").lower() and fnmatch.fnmatchcase(name, self.name)
                and (tags is None or set(self.tags) <= set(tags)))

    def matches(self, event: Event) -> bool:
        if event.registry != "hub":
            return False
        if self.collection:
            return True  # membership is not in the event: an up-to-date tick is cheap
        owner, _, name = event.name.partition("/")
        return owner.lower() == (self.author or "").lower() and fnmatch.fnmatchcase(name, self.name)


def pin_repo(repo_id: str, revision: str | None, ctx: Context) -> str:
    """The commit sha ``revision`` (default: the default branch) of a model repo points at now."""
    from huggingface_hub import HfApi

    from soup.hub.errors import hub_error, retrying
    from soup.hub.specs import SHA, hub_endpoint

    if revision and SHA.match(revision):
        return revision
    api = HfApi(endpoint=hub_endpoint(ctx.endpoint), token=ctx.token)
    try:
        return retrying(lambda: api.model_info(repo_id, revision=revision).sha)
    except Exception as err:
        raise hub_error(err, f"{repo_id}@{revision}" if revision else repo_id, token=ctx.token) from None


def _literal(glob: str) -> str:
    """The longest run of the glob without wildcards: a server-side search narrows the listing."""
    parts = re.split(r"[*?\[\]]", glob)
    return max(parts, key=len) if parts else ""
