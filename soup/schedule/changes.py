"""What changed since the published soup: the decision behind ``soup run RECIPE --if-changed``.

1. every ingredient is resolved to a pinned version (registry queries listed now, hub branches to their
   commit sha, local checkpoints to their fingerprint) by the caller (``soup.run``);
2. ``read_previous`` reads the previous soup's ``soup.json`` from where the soup is published: the hub
   repo's head when ``push_to`` is set (only soup.json is downloaded), else the MLflow soup model's
   latest version (``publish: {mlflow: NAME}``), else the local output. A published ``soup.json`` that
   cannot be read is one error naming where it is published (``acme/soup@<sha>``, ``models:/NAME/N``
   or the output folder); with ``replace_corrupt`` it counts as no previous soup (``Previous.unreadable``
   says why), so the run publishes a new one over it;
3. ``changes`` lists why a new soup is needed (pinned ingredients, the recipe, the evaluators'
   identities); empty: up to date.

Reads only; nothing here cooks or publishes (``soup.run`` does, on top of this and ``soup.pipeline``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soup.errors import SoupError
from soup.io.manifest import MANIFEST, SCHEMA_VERSION, Manifest, jsonable, read
from soup.registry import Pinned

__all__ = ["Previous", "Update", "read_previous", "create_repo", "evaluator_infos", "changes", "counts"]


@dataclass
class Previous:
    """The soup published last, and where it was read."""

    manifest: Manifest | None  # None: there is none yet (or it is unreadable and is being replaced)
    where: str  # acme/soup@<sha>, models:/NAME/N, or the output folder
    head: str | None = None  # hub: the branch head it was read at (the next commit's parent)
    unreadable: str | None = None  # why its soup.json could not be read (read with replace_corrupt)


@dataclass
class Update:
    """What ``soup run --if-changed`` found and did."""

    changed: bool
    line: str  # one line: "up to date: ..." or "published ...: <what changed>"
    reasons: list[str] = field(default_factory=list)  # why a new soup was made: "+ acme/x@abc1234", ...
    previous: str | None = None  # where the previous soup was read (None: there was none)
    published: str | None = None  # acme/soup@<sha>, models:/NAME/N, or the output folder
    evaluated: int = 0  # evaluations run (not read from the score cache)
    cached: int = 0  # evaluations read from the score cache
    result: Any = None  # the SoupResult, when a soup was made


def read_previous(recipe: Any, *, output: str | Path | None = None, replace_corrupt: bool = False) -> Previous:
    """The published soup: the hub repo's head (push_to), else the MLflow soup model's latest version
    (publish.mlflow), else the local output. Reads only; writes nothing anywhere.

    Raises:
        SoupError: the published ``soup.json`` cannot be read (named by where it is published), unless
            ``replace_corrupt``: then ``Previous.manifest`` is None and ``Previous.unreadable`` says why.
    """
    if recipe.push_to:
        return _previous_on_hub(recipe.push_to, recipe.endpoint, replace_corrupt)
    if recipe.publish and recipe.publish.get("mlflow"):
        from soup.registry import tracking_uri
        from soup.registry.mlflow import _uri, latest_soup

        name = recipe.publish["mlflow"]
        found: dict[str, str] = {}

        def unreadable(folder: Path, version: str) -> None:
            found["why"] = _unreadable(folder, f"models:/{name}/{version}", replace_corrupt)

        version, manifest = latest_soup(name, _uri(tracking_uri(recipe.tracking_uri), "publish.mlflow"),
                                        on_unreadable=unreadable)
        return Previous(manifest, f"models:/{name}/{version}" if version else f"models:/{name}", version,
                        unreadable=found.get("why"))
    out = Path(output) if output is not None else recipe.output
    if not (out / MANIFEST).is_file():
        return Previous(None, str(out))  # none yet (anything else at the output is refused by cook)
    try:
        return Previous(read(out), str(out))
    except SoupError:
        return Previous(None, str(out), unreadable=_unreadable(
            out, f"output {out}", replace_corrupt, fix="to move that soup aside and write a new one"))


def _unreadable(folder: Path, where: str, replace_corrupt: bool,
                fix: str = "to publish a new soup over it") -> str:
    """Why ``folder/soup.json`` (published at ``where``) cannot be read; raises unless ``replace_corrupt``.
    A manifest from a newer soup is never replaced: it is readable, by that soup."""
    try:
        read(folder)
    except SoupError as e:
        reason = str(e).replace(f"{Path(folder) / MANIFEST}: ", "")
    else:
        raise AssertionError(f"{folder}: soup.json is readable")
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        newer = isinstance(data, dict) and isinstance(data.get("schema_version"), int) \
            and data["schema_version"] > SCHEMA_VERSION
    except (OSError, ValueError):
        newer = False
    if newer:
        raise SoupError(f"{where}: the published soup.json was written by a newer soup: upgrade soup to read it")
    if not replace_corrupt:
        raise SoupError(f"{where}: the published soup.json cannot be read ({reason}); pass --replace-corrupt "
                        f"{fix}")
    return reason


def _previous_on_hub(push: dict[str, Any], endpoint: str | None, replace_corrupt: bool = False) -> Previous:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    from soup.hub.errors import hub_error, retrying
    from soup.hub.specs import hub_endpoint

    repo, branch = push["repo"], push.get("revision") or "main"
    url = hub_endpoint(endpoint)
    api = HfApi(endpoint=url)
    try:
        refs = retrying(lambda: api.list_repo_refs(repo))
    except RepositoryNotFoundError:
        return Previous(None, repo)
    except Exception as err:
        raise hub_error(err, f"{repo}@{branch}") from None
    head = next((b.target_commit for b in refs.branches if b.name == branch), None)
    if head is None:
        return Previous(None, f"{repo}@{branch}")
    where = f"{repo}@{head}"
    with tempfile.TemporaryDirectory(prefix="soup-previous-") as tmp:
        try:  # only soup.json, at exactly that head, into a folder that is removed again
            retrying(lambda: hf_hub_download(repo, MANIFEST, revision=head, endpoint=url, local_dir=tmp))
        except RemoteEntryNotFoundError:
            return Previous(None, where, head)
        except Exception as err:
            raise hub_error(err, f"{repo}@{head[:12]}") from None
        try:
            return Previous(read(tmp), where, head)
        except SoupError:
            return Previous(None, where, head, unreadable=_unreadable(Path(tmp), where, replace_corrupt))


def create_repo(push: dict[str, Any], endpoint: str | None) -> None:
    from huggingface_hub import HfApi

    from soup.hub.errors import hub_error, retrying
    from soup.hub.specs import hub_endpoint

    api = HfApi(endpoint=hub_endpoint(endpoint))
    try:
        retrying(lambda: api.create_repo(push["repo"], private=bool(push.get("private")), exist_ok=True))
    except Exception as err:
        raise hub_error(err, push["repo"]) from None


def evaluator_infos(recipe: Any) -> tuple[Any, Any]:
    """The identities (``EvaluatorInfo``) of the recipe's evaluator and test evaluator, or None."""
    from soup.soups.evaluate import load_evaluator
    from soup.io.manifest import EvaluatorInfo

    infos = []
    for entry in (recipe.evaluator, recipe.test):
        if entry is None:
            infos.append(None)
            continue
        ev = load_evaluator(entry.name, **entry.args)
        try:
            infos.append(EvaluatorInfo.from_identity(ev.identity()))
        finally:
            ev.close()
    return infos[0], infos[1]


def _same_evaluator(a: Any, b: Any) -> bool:
    """Same evaluator code (name, version, direction, source hashes: ``identity_key``); its arguments
    are compared as the recipe writes them (``recipe changed``), not as resolved on one machine."""
    if a is None or b is None:
        return a is b
    if a.key and b.key:
        return a.key == b.key
    return (a.name, a.version, a.primary) == (b.name, b.version, b.primary)


def changes(recipe: Any, pinned: Sequence[Pinned], infos: tuple[Any, Any], prev: Manifest | None) -> list[str]:
    """Why the soup must be made again (empty: it is up to date)."""
    if prev is None:
        return ["no previous soup"]
    reasons = []
    old = {i.pin: i for i in prev.ingredients}
    new = {p.key: p for p in pinned}
    gone = {(i.repo or i.source): i for pin, i in old.items() if pin not in new}
    for key, p in new.items():
        if key not in old:
            identity = p.source[len("hf://"):].partition("@")[0] if p.source.startswith("hf://") else p.source
            reasons.append(f"{'~' if gone.pop(identity, None) is not None else '+'} {p.display}")
    reasons += [f"- {i.repo + '@' + (i.revision or '')[:7] if i.repo else i.name}" for i in gone.values()]
    if [i.pin for i in prev.ingredients] != list(new) and not reasons:
        reasons.append("ingredients reordered")
    if prev.recipe != jsonable(dict(recipe.raw)):
        reasons.append("recipe changed")
    ev = prev.evaluation
    if not _same_evaluator(ev.evaluator if ev else None, infos[0]):
        reasons.append("evaluator changed")
    if not _same_evaluator(ev.test.evaluator if ev and ev.test else None, infos[1]):
        reasons.append("test evaluator changed")
    return reasons


def counts(manifest: Manifest | None) -> tuple[int, int]:
    """(evaluated, cached) over both evaluators' histories."""
    ev = manifest.evaluation if manifest is not None else None
    trials = (list(ev.history) + (list(ev.test.history) if ev.test else [])) if ev is not None else []
    return sum(1 for t in trials if not t.cached), sum(1 for t in trials if t.cached)

