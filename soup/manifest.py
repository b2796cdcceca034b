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

from .errors import SoupError

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
class EvaluatorInfo:
    """The evaluator's identity (what makes two scores comparable): name, version, arguments."""

    name: str
    version: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    primary: str | None = None  # the metric used for selection, for evaluators returning several
    key: str | None = None  # the identity beyond ``args`` hashed (code version, source hashes: ``identity_key``)

    @classmethod
    def from_identity(cls, identity: Mapping[str, Any]) -> EvaluatorInfo:
        """From ``Evaluator.identity()``; arguments are made JSON-safe (a function becomes its repr)."""
        version = identity.get("version")
        return cls(name=str(identity.get("name") or "?"), version=None if version is None else str(version),
                   args=jsonable(dict(identity.get("args") or {})), primary=identity.get("primary"),
                   key=identity_key(identity))


def identity_key(identity: Mapping[str, Any]) -> str:
    """sha256 of an evaluator's identity beyond its arguments: name, version, direction, primary metric and
    whatever else the plug-in adds (the python evaluator: its source file's sha256). The arguments are in
    ``args``, as resolved on the machine that ran it (absolute paths); ``soup run --if-changed`` compares
    them as the recipe wrote them, so another machine with the same recipe is not a change."""
    import hashlib

    rest = {k: v for k, v in identity.items() if k != "args"}
    text = json.dumps(rest, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Trial:
    """One evaluation, as it ran: a candidate (an ingredient alone, a candidate soup, the soup)."""

    candidate: str  # its name in progress lines: an ingredient's label, "greedy candidate 3/8 (+b)"...
    weights: dict[str, float]  # ingredient label -> weight, non-zero weights only
    score: float  # the primary metric
    metrics: dict[str, float] = field(default_factory=dict)  # every metric the evaluator returned
    cached: bool = False  # read from the score cache, not evaluated in this run

    @property
    def ingredient(self) -> str | None:
        """The ingredient's label when this trial scored one ingredient alone, else None."""
        if len(self.weights) == 1:
            (label, w), = self.weights.items()
            return label if abs(w - 1.0) < 1e-9 else None
        return None


@dataclass(frozen=True)
class Step:
    """One step of greedy's trajectory: the ingredient tried, the candidate's score, kept or not."""

    step: int  # 1 = the best ingredient alone (the seed)
    tried: str
    score: float
    kept: bool
    pool: list[str] = field(default_factory=list)  # the pool after this step


@dataclass(frozen=True)
class Scoring:
    """One evaluator's record: who scored, which way is better, every evaluation, the soup's score."""

    evaluator: EvaluatorInfo | None = None
    direction: str | None = None  # "maximize" or "minimize"
    soup_score: float | None = None  # the soup's primary metric, when it was scored
    soup_metrics: dict[str, float] | None = None
    history: list[Trial] = field(default_factory=list)  # every evaluation, in the order it ran

    def ingredient_scores(self) -> dict[str, float]:
        """Ingredient label -> its score alone, from the history (the first evaluation of each)."""
        out: dict[str, float] = {}
        for t in self.history:
            if t.ingredient is not None:
                out.setdefault(t.ingredient, t.score)
        return out


@dataclass(frozen=True)
class TestEvaluation(Scoring):
    """The held-out test evaluator's record: the soup and the ingredients, reported, never used to choose."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class Evaluation(Scoring):
    """The selection evaluator's record (validation), greedy's trajectory, and the test record."""

    trajectory: list[Step] = field(default_factory=list)  # greedy only
    test: TestEvaluation | None = None


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
            "evaluation": _evaluation_dict(ev) if ev is not None else None,
            "recipe": self.recipe,
            "plot": self.plot,
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
        except _BadShape as e:
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


def jsonable(value: Any) -> Any:
    """``value`` as JSON would give it back (anything JSON cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(value, default=str))


# ---- to JSON -----------------------------------------------------------------------------------------


def _entry_dict(i: IngredientEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"name": i.name, "source": i.source, "fingerprint": i.fingerprint, "weight": i.weight}
    if i.repo is not None:
        d["repo"], d["revision"] = i.repo, i.revision
    d.update(score=i.score, test_score=i.test_score, kept=i.kept)
    return d


def _scoring_dict(s: Scoring) -> dict[str, Any]:
    e = s.evaluator
    return {
        "evaluator": {"name": e.name, "version": e.version, "args": e.args, "primary": e.primary, "key": e.key}
        if e else None,
        "direction": s.direction,
        "soup_score": s.soup_score,
        "soup_metrics": s.soup_metrics,
        "history": [{"candidate": t.candidate, "weights": t.weights, "score": t.score, "metrics": t.metrics,
                     "cached": t.cached} for t in s.history],
    }


def _evaluation_dict(ev: Evaluation) -> dict[str, Any]:
    d = _scoring_dict(ev)
    d["trajectory"] = [{"step": t.step, "tried": t.tried, "score": t.score, "kept": t.kept, "pool": t.pool}
                       for t in ev.trajectory]
    d["test"] = _scoring_dict(ev.test) if ev.test is not None else None
    return d


# ---- from JSON: checked field by field ---------------------------------------------------------------


class _BadShape(Exception):
    """A field of the wrong type; the message names the field."""


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


class _Reader:
    """Typed access to a JSON object. A wrong type raises at once; missing required fields are
    collected and reported after the whole document was checked (so a wrong type is named first)."""

    def __init__(self) -> None:
        self.missing: list[str] = []

    def get(self, obj: Mapping[str, Any], key: str, kind: type, path: str, *, required: bool = False) -> Any:
        value = obj.get(key)
        if value is None:
            if required:
                self.missing.append(path)
            return None
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok and kind is int and isinstance(value, float):
            raise _BadShape(f"{path}: expected a whole number, got {value!r}")
        if not ok:
            raise _BadShape(f"{path}: expected {_JSON_TYPES[kind]}, got {_json_type(value)}")
        return float(value) if kind is float else value

    def numbers(self, obj: Mapping[str, Any], key: str, path: str) -> dict[str, float] | None:
        d = self.get(obj, key, dict, path)
        if d is None:
            return None
        return {str(k): self.get(d, k, float, f"{path}.{k}", required=True) for k in d}


def _parse(data: Any, prefix: str) -> Manifest:
    if not isinstance(data, dict):
        raise _BadShape(f"expected a JSON object, got {_json_type(data)}")
    r = _Reader()
    version = r.get(data, "schema_version", int, "schema_version")
    if version is None:
        data, version = _from_v0(data), 0
    elif version > SCHEMA_VERSION:
        raise SoupError(f"{prefix}written by a newer soup (schema_version {version}; this soup reads up to "
                        f"{SCHEMA_VERSION}): upgrade soup to read it")
    elif version < 0:
        raise _BadShape(f"schema_version: {version} is not a schema version")
    method = r.get(data, "method", dict, "method", required=True) or {}
    ingredients = [_ingredient(r, ing, f"ingredients[{k}]")
                   for k, ing in enumerate(r.get(data, "ingredients", list, "ingredients", required=True) or [])]
    rules = r.get(data, "rules", list, "rules", required=True) or []
    for k, rule in enumerate(rules):
        if not isinstance(rule, dict) or "pattern" not in rule or "action" not in rule:
            raise _BadShape(f"rules[{k}]: expected an object with a pattern and an action")
    dropped = r.get(data, "dropped", list, "dropped", required=True) or []
    for k, name in enumerate(dropped):
        if not isinstance(name, str):
            raise _BadShape(f"dropped[{k}]: expected a string, got {_json_type(name)}")
    files = {}
    for name, entry in (r.get(data, "files", dict, "files", required=True) or {}).items():
        if not isinstance(entry, dict):
            raise _BadShape(f"files.{name}: expected an object, got {_json_type(entry)}")
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
        evaluation=_evaluation(r, ev) if ev is not None else None,
        recipe=r.get(data, "recipe", dict, "recipe"),
        plot=r.get(data, "plot", str, "plot"),
    )
    if r.missing:
        raise _BadShape(f"{r.missing[0]}: missing")
    return manifest


def _ingredient(r: _Reader, ing: Any, path: str) -> IngredientEntry:
    if not isinstance(ing, dict) or not isinstance(ing.get("name"), str):
        raise _BadShape(f"{path}: expected an object with a name")
    return IngredientEntry(
        name=ing["name"], source=r.get(ing, "source", str, f"{path}.source", required=True),
        fingerprint=r.get(ing, "fingerprint", str, f"{path}.fingerprint", required=True),
        weight=r.get(ing, "weight", float, f"{path}.weight", required=True),
        repo=r.get(ing, "repo", str, f"{path}.repo"), revision=r.get(ing, "revision", str, f"{path}.revision"),
        score=r.get(ing, "score", float, f"{path}.score"), test_score=r.get(ing, "test_score", float, f"{path}.test_score"),
        kept=r.get(ing, "kept", bool, f"{path}.kept"))


def _scoring(r: _Reader, d: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The fields of a Scoring, checked."""
    e = r.get(d, "evaluator", dict, f"{path}evaluator")
    evaluator = None
    if e is not None:
        version = e.get("version")
        evaluator = EvaluatorInfo(name=r.get(e, "name", str, f"{path}evaluator.name", required=True),
                                  version=None if version is None else str(version),
                                  args=r.get(e, "args", dict, f"{path}evaluator.args") or {},
                                  primary=r.get(e, "primary", str, f"{path}evaluator.primary"),
                                  key=r.get(e, "key", str, f"{path}evaluator.key"))
    direction = r.get(d, "direction", str, f"{path}direction")
    if direction not in (None, "maximize", "minimize"):
        raise _BadShape(f"{path}direction: expected 'maximize' or 'minimize', got {direction!r}")
    history = []
    for k, t in enumerate(r.get(d, "history", list, f"{path}history") or []):
        where = f"{path}history[{k}]"
        if not isinstance(t, dict) or any(key not in t for key in ("candidate", "weights", "score")):
            raise _BadShape(f"{where}: expected an object with candidate, weights and score")
        history.append(Trial(candidate=r.get(t, "candidate", str, f"{where}.candidate", required=True),
                             weights=r.numbers(t, "weights", f"{where}.weights") or {},
                             score=r.get(t, "score", float, f"{where}.score", required=True),
                             metrics=r.numbers(t, "metrics", f"{where}.metrics") or {},
                             cached=bool(r.get(t, "cached", bool, f"{where}.cached"))))
    return dict(evaluator=evaluator, direction=direction, soup_score=r.get(d, "soup_score", float, f"{path}soup_score"),
                soup_metrics=r.numbers(d, "soup_metrics", f"{path}soup_metrics"), history=history)


def _evaluation(r: _Reader, ev: Mapping[str, Any]) -> Evaluation:
    trajectory = []
    for k, t in enumerate(r.get(ev, "trajectory", list, "evaluation.trajectory") or []):
        where = f"evaluation.trajectory[{k}]"
        if not isinstance(t, dict) or any(key not in t for key in ("step", "tried", "score", "kept")):
            raise _BadShape(f"{where}: expected an object with step, tried, score and kept")
        pool = r.get(t, "pool", list, f"{where}.pool") or []
        trajectory.append(Step(step=r.get(t, "step", int, f"{where}.step", required=True),
                               tried=r.get(t, "tried", str, f"{where}.tried", required=True),
                               score=r.get(t, "score", float, f"{where}.score", required=True),
                               kept=r.get(t, "kept", bool, f"{where}.kept", required=True),
                               pool=[str(p) for p in pool]))
    test = r.get(ev, "test", dict, "evaluation.test")
    return Evaluation(**_scoring(r, ev, "evaluation."), trajectory=trajectory,
                      test=TestEvaluation(**_scoring(r, test, "evaluation.test.")) if test is not None else None)


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
