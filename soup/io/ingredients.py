"""Ingredients: turn what the user names into indexed checkpoints.

An ingredient is a local folder or weight file, a hub repo (``hf://owner/name@revision``, pinned to
a commit sha before anything else happens), an in-memory state dict, or an already opened
``Checkpoint``; an ``Ingredient`` adds how to read a training framework's file (the key its
weights are under, a prefix to strip). Labels (used by ``take:`` rules, reports and score tables) are the folder or repo
name, made unique by a ``#N`` suffix when two ingredients share one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from soup.io.checkpoint import Checkpoint, memory_checkpoint, open_checkpoint

__all__ = ["Ingredient", "IngredientSpec", "HubOptions", "resolve", "resolve_all", "describe", "with_reading"]


@dataclass(frozen=True)
class Ingredient(os.PathLike):
    """A path (or ``hf://`` spec) with how to read it; usable wherever a path is.

    ``soup.Ingredient("runs/xtuner/iter_500.pth", key="state_dict", strip_prefix="module.")``
    """

    path: str  # a folder, a weight file or hf://owner/name@revision
    key: str | None = None  # torch files: the top-level key the weights are under (default: found)
    strip_prefix: str | None = None  # removed from the start of every tensor name that has it

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


IngredientSpec = Union[str, Path, Ingredient, Checkpoint, Mapping[str, torch.Tensor]]


def with_reading(specs: Sequence[IngredientSpec], *, key: str | None = None,
                 strip_prefix: str | None = None) -> list[IngredientSpec]:
    """``specs`` with paths turned into ``Ingredient``s read with ``key`` / ``strip_prefix`` (the CLI's
    ``--state-dict-key`` / ``--strip-prefix``, applied to every ingredient); others unchanged."""
    if key is None and strip_prefix is None:
        return list(specs)
    return [Ingredient(str(s), key=key, strip_prefix=strip_prefix) if isinstance(s, (str, Path)) else s
            for s in specs]


@dataclass(frozen=True)
class HubOptions:
    """How to reach a hub for ``hf://`` ingredients (defaults: huggingface_hub's own)."""

    endpoint: str | None = None
    token: str | bool | None = None
    cache_dir: str | None = None


def resolve(spec: IngredientSpec, *, label: str | None = None, hub: HubOptions | None = None) -> Checkpoint:
    """Resolve one ingredient to an indexed checkpoint (downloading hub repos at a pinned sha)."""
    if isinstance(spec, Checkpoint):
        return spec
    if isinstance(spec, Mapping):
        return memory_checkpoint(dict(spec), label=label or "memory")
    reading = {"state_dict_key": spec.key, "strip_prefix": spec.strip_prefix} if isinstance(spec, Ingredient) else {}
    text = str(spec)
    if text.startswith("hf://"):
        from soup.hub.download import pull  # imported lazily: local merges never touch the network code
        from soup.hub.specs import parse_hub_spec

        repo_id, revision = parse_hub_spec(text)
        opts = hub or HubOptions()
        pulled = pull(repo_id, revision=revision, endpoint=opts.endpoint, token=opts.token,
                              cache_dir=opts.cache_dir)
        ck = open_checkpoint(pulled.path, label=label or repo_id.split("/")[-1], **reading)
        ck.source = f"hf://{repo_id}@{pulled.commit}"
        ck.extra.update(repo=repo_id, revision=pulled.commit, requested_revision=revision)
        if getattr(pulled, "file_oids", None):
            ck.fingerprint = _oid_fingerprint(pulled.file_oids, reading)
        return ck
    return open_checkpoint(Path(text), label=label, **reading)


def _oid_fingerprint(oids: Mapping[str, str], reading: Mapping[str, str | None]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(oids):
        digest.update(f"{name}\0{oids[name]}\0".encode())
    for what, value in sorted(reading.items()):  # the same files read another way are another model
        if value:
            digest.update(f"{what}\0{value}\0".encode())
    return "oids-" + digest.hexdigest()


def resolve_all(specs: Sequence[IngredientSpec], *, labels: Sequence[str | None] | None = None,
                hub: HubOptions | None = None) -> list[Checkpoint]:
    """Resolve every ingredient and give each a unique label."""
    labels = list(labels) if labels is not None else [None] * len(specs)
    cks = [resolve(s, label=lab if lab else (f"ingredient{i}" if isinstance(s, Mapping) else None), hub=hub)
           for i, (s, lab) in enumerate(zip(specs, labels))]
    seen: dict[str, int] = {}
    for ck in cks:
        seen[ck.label] = seen.get(ck.label, 0) + 1
    for i, ck in enumerate(cks):
        if seen[ck.label] > 1:
            ck.label = f"{ck.label}#{i}"
    return cks


def describe(ck: Checkpoint) -> dict[str, Any]:
    """The manifest entry of an ingredient: label, source, fingerprint, hub provenance."""
    d: dict[str, Any] = {"name": ck.label, "source": ck.source, "fingerprint": ck.fingerprint}
    if ck.extra.get("repo"):
        d["repo"], d["revision"] = ck.extra["repo"], ck.extra["revision"]
    return d
