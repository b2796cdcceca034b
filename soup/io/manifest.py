"""``soup.json``: the manifest of a soup — what it is made of, how it was chosen, and the evidence.

What it is: one JSON object in every soup folder. It names the ingredients (pinned sources, content
fingerprints, weights, validation and test scores, kept or not), the method (name, reference,
options), the engine's settings (rules, dtype, accumulation, config source), every shard with its
sha256 and size and, for cooked soups, the evaluation: the evaluator, every evaluation in the order
it ran (``history``: ingredients, candidates, the soup), greedy's trajectory, the soup's validation
score and the held-out test evaluator's record. This module owns that shape: ``Manifest`` and its
parts are the only way the rest of soup sees it.

Who writes it: the merge engine only (``soup.merge``), once per soup, with ``write``: the last file
of the folder, written atomically (a temp file renamed into place), so its presence means the soup is
complete. ``cook`` hands the engine what it knows as typed objects (a ``Selection``: the method, the
``Evaluation``, the kept flags, the recipe); nothing edits a manifest after it is built. Everything
that reads one — the model card, ``soup report``, the plot, the hub commit message, ``soup push`` and
the "is this a previous soup?" check — goes through ``read`` / ``Manifest.from_dict``.

Schema versions: ``schema_version`` is an integer. It is bumped when a field is renamed, removed or
changes meaning; adding an optional field does not bump it, and readers ignore keys they do not know.
``read`` maps every older version it knows to the current types (version 0 is soup 0.1's manifest,
which had no ``schema_version``: its ``evaluation.evaluations`` is today's ``history``). A manifest
from a newer soup is a one-line error asking for a newer soup, never a guess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soup.errors import SoupError
from soup.io.evidence import (Evaluation, EvaluatorInfo, Scoring, Step, TestEvaluation, Trial, evaluation_dict,
                              identity_key, read_evaluation, scoring_dict)  # noqa: F401 (re-exported)
from soup.io.jsonshape import BadShape, Reader, json_type, jsonable

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Manifest", "Method", "IngredientEntry", "FileEntry", "EvaluatorInfo",
           "Trial", "Step", "Scoring", "Evaluation", "TestEvaluation", "Selection", "read", "write", "jsonable",
           "pin_key", "identity_key"]

MANIFEST = "soup.json"
SCHEMA_VERSION = 1  # 1: soup 0.2 (typed; evaluation.history); 0: soup 0.1 (no schema_version)


# ---- the types ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """How the weights were chosen: a strategy name (``maximum``, ``greedy``, ``average``, a plug-in's
    name, or ``average``/``weighted`` for a plain merge), its reference URL and its options."""

    name: str
    reference: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {"p": 2} for a maximum soup


@dataclass(frozen=True)
class IngredientEntry:
    """One ingredient: where it came from (pinned), its weight in the soup and its scores."""

    name: str  # the ingredient's unique label
    source: str  # what the user gave: a path, hf://owner/name@sha, memory:label
    fingerprint: str  # content fingerprint (the score cache's key)
    weight: float  # its weight in the soup (weights sum to 1 unless not normalised)
    repo: str | None = None  # hub ingredients: owner/name ...
    revision: str | None = None  # ... pinned to this commit sha
    score: float | None = None  # validation score alone (used for selection), when evaluated
    test_score: float | None = None  # held-out test score alone (reported only)
    kept: bool | None = None  # in the soup (greedy pool / maximum top-p); None when not a selection

    @property
    def pin(self) -> str:
        """What identifies this exact ingredient across runs (``soup run --if-changed``): a pinned
        remote source (``hf://owner/name@sha``, ``models:/NAME/N``) alone, a local one with its fingerprint."""
        return pin_key(self.source, self.fingerprint)


@dataclass(frozen=True)
class FileEntry:
    """A shard the engine wrote."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A soup's ``soup.json``. Build one with ``soup.merge`` (the only producer); read one with ``read``."""

    soup_version: str  # the soup release that wrote it
    created: str  # UTC, ISO 8601
    method: Method
    ingredients: list[IngredientEntry]
    rules: list[dict[str, Any]]  # as ``Rule.to_dict()``: {pattern, action[, ingredient | weights]}
    dropped: list[str]  # tensors dropped by rules
    dtype: str  # output dtype(s) of float tensors, e.g. "bfloat16"
    accumulate: str  # "float32" / "float64" as asked; auto: "auto (float32)", "auto (float64)" or both by input width
    config_from: str | None  # the ingredient whose config/tokenizer files were copied
    tensors: int
    files: dict[str, FileEntry]  # shard name -> sha256, size (empty for an in-memory soup)
    total_size: int  # bytes of tensor data
    evaluation: Evaluation | None = None  # None when nothing was evaluated
    recipe: dict[str, Any] | None = None  # the recipe as given, when cooked from one
    plot: str | None = None  # the plot's file name in the soup folder, when one was written
    # the merge method when not the weighted mean: {name, reference, description, parameters,
    # model_parameters, seed, base} (base: the base model's ingredient name; it has weight 0)
    merge_method: dict[str, Any] | None = None
    # ingredients with different vocabularies: {mode, ids_from, rows, added: [{token, id, from: [labels]}]}
    vocabulary: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def weights(self) -> dict[str, float]:
        """Ingredient label -> weight."""
        return {i.name: i.weight for i in self.ingredients}

    def is_soup_trial(self, trial: Trial) -> bool:
        """True if ``trial`` evaluated this soup's weights (the final soup, or the same mean)."""
        own = {i.name: i.weight for i in self.ingredients if i.weight}
        return set(own) == set(trial.weights) and all(abs(own[k] - w) < 1e-9 for k, w in trial.weights.items())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``soup.json`` (null optional fields of ingredients left out)."""
        ev = self.evaluation
        return {
            "schema_version": self.schema_version,
            "soup_version": self.soup_version,
            "created": self.created,
            "method": {"name": self.method.name, "reference": self.method.reference, "options": self.method.options},
            "ingredients": [_entry_dict(i) for i in self.ingredients],
            "rules": list(self.rules),
            "dropped": list(self.dropped),
            "dtype": self.dtype,
            "accumulate": self.accumulate,
            "config_from": self.config_from,
            "tensors": self.tensors,
            "files": {k: {"sha256": f.sha256, "size": f.size} for k, f in self.files.items()},
            "total_size": self.total_size,
            "evaluation": evaluation_dict(ev) if ev is not None else None,
            "recipe": self.recipe,
            "plot": self.plot,
            "merge_method": self.merge_method,
            **({"vocabulary": self.vocabulary} if self.vocabulary is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str | Path | None = None) -> Manifest:
        """Parse and check a manifest (any JSON value); older schema versions are mapped to this one.

        Raises:
            SoupError: one line, ``"<where>: not a soup manifest (<field>: expected ..., got ...)"``, or a
                manifest written by a newer soup.
        """
        prefix = f"{where}: " if where is not None else ""
        try:
            return _parse(data, prefix)
        except BadShape as e:
            raise SoupError(f"{prefix}not a soup manifest ({e})") from None


@dataclass(frozen=True)
class Selection:
    """What ``cook`` hands the engine to go into the manifest beside the engine's own part."""

    method: Method
    evaluation: Evaluation | None = None  # per-ingredient scores come from its history
    kept: Sequence[bool] | None = None  # one per ingredient, in order
    recipe: Mapping[str, Any] | None = None


# ---- read / write ------------------------------------------------------------------------------------


def read(folder: str | Path) -> Manifest:
    """Read and check ``folder/soup.json``.

    Raises:
        SoupError: missing (not a finished soup), not JSON, the wrong shape, or from a newer soup.
    """
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SoupError(f"{path}: not found: {folder} is not a finished soup") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SoupError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SoupError(f"{path}: corrupt manifest ({e})") from None
    return Manifest.from_dict(data, where=path)


def write(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``folder/soup.json`` atomically (temp file, fsync, rename): the last file of a soup."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest.to_dict(), indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


REMOTE_PINNED = ("hf://", "models:/")  # sources that carry their pin (a commit sha, a version number)


def pin_key(source: str, fingerprint: str | None) -> str:
    """An ingredient's identity across runs: a pinned remote source alone (its fingerprint may depend
    on how it was downloaded), a local path with its content fingerprint."""
    return source if source.startswith(REMOTE_PINNED) else f"{source}#{fingerprint or ''}"


# ---- to JSON -----------------------------------------------------------------------------------------


def _entry_dict(i: IngredientEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"name": i.name, "source": i.source, "fingerprint": i.fingerprint, "weight": i.weight}
    if i.repo is not None:
        d["repo"], d["revision"] = i.repo, i.revision
    d.update(score=i.score, test_score=i.test_score, kept=i.kept)
    return d


# ---- from JSON: checked field by field ---------------------------------------------------------------


def _parse(data: Any, prefix: str) -> Manifest:
    if not isinstance(data, dict):
        raise BadShape(f"expected a JSON object, got {json_type(data)}")
    r = Reader()
    version = r.get(data, "schema_version", int, "schema_version")
    if version is None:
        data, version = _from_v0(data), 0
    elif version > SCHEMA_VERSION:
        raise SoupError(f"{prefix}written by a newer soup (schema_version {version}; this soup reads up to "
                        f"{SCHEMA_VERSION}): upgrade soup to read it")
    elif version < 0:
        raise BadShape(f"schema_version: {version} is not a schema version")
    method = r.get(data, "method", dict, "method", required=True) or {}
    ingredients = [_ingredient(r, ing, f"ingredients[{k}]")
                   for k, ing in enumerate(r.get(data, "ingredients", list, "ingredients", required=True) or [])]
    rules = r.get(data, "rules", list, "rules", required=True) or []
    for k, rule in enumerate(rules):
        if not isinstance(rule, dict) or "pattern" not in rule or "action" not in rule:
            raise BadShape(f"rules[{k}]: expected an object with a pattern and an action")
    dropped = r.get(data, "dropped", list, "dropped", required=True) or []
    for k, name in enumerate(dropped):
        if not isinstance(name, str):
            raise BadShape(f"dropped[{k}]: expected a string, got {json_type(name)}")
    files = {}
    for name, entry in (r.get(data, "files", dict, "files", required=True) or {}).items():
        if not isinstance(entry, dict):
            raise BadShape(f"files.{name}: expected an object, got {json_type(entry)}")
        files[name] = FileEntry(r.get(entry, "sha256", str, f"files.{name}.sha256", required=True),
                                r.get(entry, "size", int, f"files.{name}.size", required=True))
    ev = r.get(data, "evaluation", dict, "evaluation")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        soup_version=r.get(data, "soup_version", str, "soup_version", required=True),
        created=r.get(data, "created", str, "created", required=True),
        method=Method(r.get(method, "name", str, "method.name", required=True),
                      r.get(method, "reference", str, "method.reference"),
                      r.get(method, "options", dict, "method.options") or {}),
        ingredients=ingredients, rules=rules, dropped=dropped,
        dtype=r.get(data, "dtype", str, "dtype", required=True),
        accumulate=r.get(data, "accumulate", str, "accumulate", required=True),
        config_from=r.get(data, "config_from", str, "config_from"),
        tensors=r.get(data, "tensors", int, "tensors", required=True),
        files=files,
        total_size=r.get(data, "total_size", int, "total_size", required=True),
        evaluation=read_evaluation(r, ev) if ev is not None else None,
        recipe=r.get(data, "recipe", dict, "recipe"),
        plot=r.get(data, "plot", str, "plot"),
        merge_method=r.get(data, "merge_method", dict, "merge_method"),
        vocabulary=r.get(data, "vocabulary", dict, "vocabulary"),
    )
    if r.missing:
        raise BadShape(f"{r.missing[0]}: missing")
    return manifest


def _ingredient(r: Reader, ing: Any, path: str) -> IngredientEntry:
    if not isinstance(ing, dict) or not isinstance(ing.get("name"), str):
        raise BadShape(f"{path}: expected an object with a name")
    return IngredientEntry(
        name=ing["name"], source=r.get(ing, "source", str, f"{path}.source", required=True),
        fingerprint=r.get(ing, "fingerprint", str, f"{path}.fingerprint", required=True),
        weight=r.get(ing, "weight", float, f"{path}.weight", required=True),
        repo=r.get(ing, "repo", str, f"{path}.repo"), revision=r.get(ing, "revision", str, f"{path}.revision"),
        score=r.get(ing, "score", float, f"{path}.score"), test_score=r.get(ing, "test_score", float, f"{path}.test_score"),
        kept=r.get(ing, "kept", bool, f"{path}.kept"))


def _from_v0(data: dict[str, Any]) -> dict[str, Any]:
    """soup 0.1's manifest (no schema_version) in version 1's keys. Its evaluation had ``evaluations``
    (now ``history``) and ``ingredient_scores`` maps (the scores are also on its ingredients); its test
    record had no history. Wrong types are left for the checks to name."""
    ev = data.get("evaluation")
    if not isinstance(ev, dict):
        return data
    ev = {k: v for k, v in ev.items() if k not in ("evaluations", "ingredient_scores", "strategy")}
    if "evaluations" in data["evaluation"]:
        ev["history"] = data["evaluation"]["evaluations"]
    ings = data.get("ingredients")
    for key, scores_of in (("score", data["evaluation"]), ("test_score", ev.get("test"))):
        scores = scores_of.get("ingredient_scores") if isinstance(scores_of, dict) else None
        if isinstance(scores, dict) and isinstance(ings, list):
            ings = [dict(i, **{key: scores.get(i.get("name"))}) if isinstance(i, dict) and i.get(key) is None
                    and isinstance(scores.get(i.get("name")), (int, float)) else i for i in ings]
    if isinstance(ev.get("test"), dict):
        ev["test"] = {k: v for k, v in ev["test"].items() if k != "ingredient_scores"}
    out = dict(data, evaluation=ev)
    if ings is not None:
        out["ingredients"] = ings
    return out
