"""The merge plan: check that ingredients fit together, then decide what happens to every tensor.

Nothing is read or written here: the plan is built from the tensor tables alone, so every
incompatibility (a missing tensor, a shape or dtype mismatch, a rule naming an unknown ingredient)
is reported before any output exists. Each output tensor becomes one ``Job``:

- ``mean``: weighted mean over ingredients (weights normalised to sum to 1 unless told otherwise);
- ``take``: copied from one ingredient (a ``take`` rule, or a one-hot weight vector: no math at all);
- ``copy``: a non-float tensor (integer/bool buffer) copied from the first ingredient with a non-zero
  weight after checking it is equal in every ingredient;
- ``method``: a merge method other than the weighted mean (``soup.methods``: TIES, DARE, SLERP...)
  over the ingredients with a non-zero weight, and the base model when the method uses one, with its
  parameters resolved for this tensor (filters, layer gradients).

Vocabulary-indexed tensors (embeddings, output head) of ingredients whose vocabularies differ carry
the soup's vocabulary (``Job.rows``, a ``soup.io.vocab.VocabPlan``): their rows are gathered by token
(``soup.engine.vocab``), a take becoming the one-hot mean; their row counts may differ.

With a method the base model is the last checkpoint (``base``); it takes no weight.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from soup.io.checkpoint import Checkpoint
from soup.io.vocab import VocabPlan
from soup.errors import IncompatibleIngredients, RecipeError
from soup.options import check_weights
from soup.engine.rules import Rule, match_rule
from soup.methods.spec import MethodSpec, count_layers

__all__ = ["Job", "Plan", "build_plan", "normalise_weights"]


@dataclass(frozen=True)
class Job:
    name: str
    shape: tuple[int, ...]
    kind: str  # "mean", "take", "copy" or "method"
    out_dtype: torch.dtype
    weights: tuple[float, ...] = ()  # mean, method: one per checkpoint (zeros are skipped)
    source: int = 0  # take/copy: the ingredient read
    method: Any = None  # method: the MergeMethod
    params: Any = None  # method: its TensorParams for this tensor
    base: int | None = None  # method: the base model's checkpoint index, when the method reads it
    rows: VocabPlan | None = None  # vocabulary-indexed: the soup's vocabulary; rows gathered by token
    also: tuple[int, ...] = ()  # rows: zero-weight ingredients read for rows no source holds

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize

    def sources(self) -> list[int]:
        """Indices of the ingredients this job's output comes from."""
        if self.kind in ("mean", "method"):
            return [i for i, w in enumerate(self.weights) if w != 0.0]
        return [self.source]

    def reads(self, n: int) -> Sequence[int]:
        """Indices of the checkpoints (of ``n``) whose tensor is read: the sources (and a method's base),
        and for a copy (integer buffers) every checkpoint, to check they agree."""
        if self.kind == "copy":
            return range(n)
        return self.sources() + list(self.also) + ([self.base] if self.kind == "method" and self.base is not None
                                                   else [])


@dataclass
class Plan:
    jobs: list[Job]
    dropped: list[str]
    weights: tuple[float, ...]  # the global weights, as applied
    input_bytes: int  # bytes read from the ingredients
    unused_rules: list[str]  # rules that matched no tensor (likely typos)


def normalise_weights(weights: Sequence[float] | None, n: int, *, normalize: bool = True,
                      where: str = "weights") -> tuple[float, ...]:
    """Uniform weights when None; else checked (finite, one per ingredient, >= 0) and scaled to sum to 1."""
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    w = check_weights(weights, where=where)
    if len(w) != n:
        raise RecipeError(f"{where}: {len(w)} weights given for {n} ingredients")
    if not normalize:
        return w
    if any(x < 0 for x in w):
        raise RecipeError(f"{where}: weights must be >= 0 to be normalised, got {list(w)}")
    total = sum(w)
    if total <= 0:
        raise RecipeError(f"{where}: weights sum to {total}; at least one must be positive")
    return tuple(x / total for x in w)


def build_plan(checkpoints: Sequence[Checkpoint], *, weights: Sequence[float] | None = None,
               rules: Sequence[Rule] = (), dtype: torch.dtype | None = None,
               normalize: bool = True, mixed_float: bool = False, method: MethodSpec | None = None,
               base: bool = False, vocab: VocabPlan | None = None) -> Plan:
    """Check compatibility and plan every tensor.

    Raises:
        IncompatibleIngredients: names, shapes or dtypes differ (names the tensor and ingredients).
        RecipeError: bad weights or a rule naming an unknown ingredient.

    With ``mixed_float``, float dtypes may differ between ingredients; the output takes the first's.
    With ``method`` (a merge method other than the plain weighted mean) the weights are the method's
    per-model ``weight`` (default 1 each, used as given: the method's own ``normalize`` decides) and
    ``base`` says the last checkpoint is the base model. ``vocab`` (``soup.io.vocab.plan_vocab``): the
    soup's vocabulary, when the ingredients' differ.
    """
    if not checkpoints:
        raise RecipeError("no ingredients given")
    check_compatible(checkpoints, allow_float_mix=dtype is not None or mixed_float,
                     rows=vocab.names if vocab is not None else ())
    n = len(checkpoints)
    n_ing = n - 1 if base else n  # the base model, last, takes no weight
    with_method = method is not None and not method.is_linear
    if with_method and weights is None:
        weights = [1.0] * n_ing  # mergekit's convention: each model's task vector at full weight
    if method is not None and method.is_linear:
        normalize = bool(method.params.get("normalize", True))
    pad = (0.0,) * (n - n_ing)
    glob_w = normalise_weights(weights, n_ing, normalize=normalize and not with_method) + pad
    labels = {c.label: i for i, c in enumerate(checkpoints)}
    rule_w = {r: normalise_weights(r.weights, n_ing, normalize=normalize and not with_method, where=f"rule {r}") + pad
              for r in rules if r.action == "weights"}
    takes = {r: _index(r, labels, n) for r in rules if r.action == "take"}  # checked even if unused
    n_layers = count_layers(list(checkpoints[0].tensors)) if method is not None else 0
    used: set[Rule] = set()
    first = checkpoints[0]
    jobs, dropped, input_bytes = [], [], 0
    for name, info in first.tensors.items():
        rule = match_rule(rules, name)
        if rule is not None:
            used.add(rule)
        if rule is not None and rule.action == "drop":
            dropped.append(name)
            continue
        floating = info.dtype.is_floating_point
        out = dtype if (dtype is not None and floating) else info.dtype
        if not floating:  # from the first ingredient in the soup (after checking the others agree)
            job = Job(name, info.shape, "copy", out, source=next((i for i, x in enumerate(glob_w) if x), 0))
        elif rule is not None and rule.action == "take":
            job = Job(name, info.shape, "take", out, source=takes[rule])
        else:
            w = rule_w.get(rule, glob_w)  # a pair rule's tensors are planned here, paired by soup.adapters.pairs
            if method is not None and rule is None:
                w = _method_weights(method, name, w, n_ing, n_layers, normalize) + pad
            nonzero = [i for i, x in enumerate(w) if x != 0.0]
            if not nonzero:
                raise RecipeError(f"tensor {name}: every weight is zero")
            if with_method:
                params = method.resolve(name, nonzero, w, n_layers)
                job = Job(name, info.shape, "method", out, weights=w, method=method.method, params=params,
                          base=n - 1 if base else None)
            elif len(nonzero) == 1 and w[nonzero[0]] == 1.0:
                job = Job(name, info.shape, "take", out, source=nonzero[0])
            else:
                job = Job(name, info.shape, "mean", out, weights=w)
        if vocab is not None and name in vocab.names and floating:
            job = _by_token(job, vocab, n, n_ing)
        jobs.append(job)
        input_bytes += sum(checkpoints[i].tensors[name].nbytes for i in job.reads(n))
    if dropped and not jobs:
        droppers = ", ".join(str(r) for r in rules if r in used and r.action == "drop")
        raise RecipeError(f"rules: every tensor is dropped by rule(s) {droppers}; the soup would be empty")
    unused = [str(r) for r in rules if r not in used]
    return Plan(jobs, dropped, glob_w, input_bytes, unused)


def _method_weights(method: MethodSpec, name: str, w: tuple[float, ...], n_ing: int, n_layers: int,
                    normalize: bool) -> tuple[float, ...]:
    """A tensor's ingredient weights under a method: the per-model ``weight`` parameter resolved for
    this tensor (filters, gradients; the soup's weight where none is given), normalised for ``linear``."""
    given = "weight" in method.params or any("weight" in m for m in method.model_params)
    if "weight" not in method.method.parameters or not given:
        return tuple(w[:n_ing])
    got = method.resolve(name, range(n_ing), w, n_layers).per_model["weight"]
    got = tuple(x if w[i] != 0.0 else 0.0 for i, x in enumerate(got))  # a strategy's exclusions hold
    if method.is_linear and normalize:
        total = sum(got)
        if total <= 0:
            raise RecipeError(f"tensor {name}: linear weights sum to {total}; at least one must be positive")
        got = tuple(x / total for x in got)
    return got


def _by_token(job: Job, vocab: VocabPlan, n: int, n_ing: int) -> Job:
    """A vocabulary-indexed tensor's job: the soup's rows, gathered by token (a take is the one-hot mean)."""
    w = job.weights if job.kind in ("mean", "method") else tuple(float(i == job.source) for i in range(n))
    return replace(job, kind="method" if job.kind == "method" else "mean", weights=w, rows=vocab,
                   shape=(vocab.rows, *job.shape[1:]), also=vocab.also(w, n_ing, job.base))


def _index(rule: Rule, labels: dict[str, int], n: int) -> int:
    ing = rule.ingredient
    if isinstance(ing, int):
        if 0 <= ing < n:
            return ing
        raise RecipeError(f"rule {rule}: ingredient index {ing} out of range (0..{n - 1})")
    if ing in labels:
        return labels[ing]
    raise RecipeError(f"rule {rule}: no ingredient named {ing!r} (have: {', '.join(labels)})")


def check_compatible(checkpoints: Sequence[Checkpoint], *, allow_float_mix: bool = False,
                     rows: Container[str] = ()) -> None:
    """Same tensor names, shapes and dtypes in every ingredient, or IncompatibleIngredients; the
    tensors named in ``rows`` (vocabulary-indexed) may differ in their first dimension."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        missing = [k for k in first.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in first.tensors]
        if missing or extra:
            name, (has, lacks) = (missing[0], (first, other)) if missing else (extra[0], (other, first))
            count = len(missing) + len(extra)
            raise IncompatibleIngredients(f"tensor {name} is in {has.label} but not in {lacks.label} "
                                          f"({count} tensor name(s) differ)")
        for name, a in first.tensors.items():
            b = other.tensors[name]
            if a.shape != b.shape and not (name in rows and a.shape[1:] == b.shape[1:]):
                raise IncompatibleIngredients(f"tensor {name}: shape {list(a.shape)} in {first.label} but "
                                              f"{list(b.shape)} in {other.label}")
            if a.dtype != b.dtype:
                mixable = allow_float_mix and a.dtype.is_floating_point and b.dtype.is_floating_point
                if not mixable:
                    raise IncompatibleIngredients(
                        f"tensor {name}: dtype {a.dtype} in {first.label} but {b.dtype} in {other.label}"
                        + (" (pass --dtype to merge mixed float dtypes)" if a.dtype.is_floating_point
                           and b.dtype.is_floating_point else ""))
