"""Python evaluator: score candidates with a plain function, no subclass needed.

The function is called as ``fn(candidate, **kwargs)`` and returns a float or a mapping of metrics
(then ``primary`` names the one used for selection). It can use ``candidate.state_dict(device)`` for
in-memory weights or ``candidate.path()`` for an HF-layout folder.

``fn`` is ``"module:function"``, ``"path/to/file.py:function"`` or, from Python, the callable itself.
The score-cache identity holds the function's ``module:qualname`` and the sha256 of its source file,
so editing that file invalidates cached scores.

Example (recipe)::

    evaluator: python
    args: {fn: "evals/ocr.py:accuracy", kwargs: {split: val}}

Per-example scores (racing, docs/racing.md): give ``examples: N`` and write the function with an
``indices`` parameter; it is then called as ``fn(candidate, indices=[...], **kwargs)`` and returns one
number per index (``1.0``/``0.0`` for right/wrong, a loss...), and the candidate's score is the mean
over all ``N`` (``indices`` = every example). ``example_range: [low, high]`` bounds each number
(default: unknown)::

    evaluator: python
    args: {fn: "evals/ocr.py:correct", examples: 2000, example_range: [0, 1]}
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, Evaluator, mean_score
from soup.plugins import load_attr

__all__ = ["PythonEvaluator"]


class PythonEvaluator(Evaluator):
    """Call a user function on each candidate.

    Args:
        fn: ``"module:function"``, ``"path/to/file.py:function"``, or a callable.
        kwargs: extra keyword arguments passed to every call.
        direction: ``"maximize"`` (default) or ``"minimize"``.
        primary: for mapping results, the metric used for selection.
        examples: per-example scores: how many examples ``fn(candidate, indices=[...])`` scores (the
            score is then the mean of all of them); default: none, ``fn`` returns the score.
        example_range: ``[low, high]`` bounding each per-example score, for racing (default unknown).

    Raises:
        EvaluatorError: ``fn`` cannot be imported or is not callable; ``kwargs`` is not a mapping;
            ``examples`` given for a function without an ``indices`` parameter; a bad ``example_range``.
    """

    name = "python"
    version = "1"

    def __init__(self, *, fn: str | Callable[..., Any], kwargs: Mapping[str, Any] | None = None,
                 direction: str = "maximize", primary: str | None = None, examples: int | None = None,
                 example_range: Sequence[float] | None = None) -> None:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise EvaluatorError(f"python evaluator: kwargs must be a mapping, got {type(kwargs).__name__}")
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise EvaluatorError(f"python evaluator: examples must be a whole number >= 1, got {examples!r}")
        if example_range is not None:
            ok = isinstance(example_range, (list, tuple)) and len(example_range) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in example_range)
            if not ok or example_range[0] >= example_range[1]:
                raise EvaluatorError(f"python evaluator: example_range must be [low, high] with low < high, "
                                     f"got {example_range!r}")
        if callable(fn):
            func, spec = fn, _callable_name(fn)
        elif isinstance(fn, str) and ":" in fn:
            func, spec = load_attr(fn, "python evaluator", EvaluatorError), fn
            if not callable(func):
                raise EvaluatorError(f"python evaluator: {fn!r} is a {type(func).__name__}, not callable")
        else:
            raise EvaluatorError(f"python evaluator: fn must be 'module:function', "
                                 f"'path/to/file.py:function' or a callable, got {fn!r}")
        extra = {} if examples is None else {"examples": examples}
        if example_range is not None:
            extra["example_range"] = [float(x) for x in example_range]
        super().__init__(fn=spec, kwargs=dict(kwargs or {}), direction=direction, primary=primary, **extra)
        self._fn = func
        self._source_sha256 = _source_hash(func)
        self._examples = examples
        if examples is not None:
            if not _takes_indices(func):
                raise EvaluatorError(f"python evaluator: examples is given but {spec} has no 'indices' parameter "
                                     "(per-example scores are fn(candidate, indices=[...]))")
            self.score_is_mean = True  # the score is the mean of the per-example scores
        if example_range is not None:
            self.example_range = (float(example_range[0]), float(example_range[1]))

    @classmethod
    def validate(cls, *, fn: Any, kwargs: Any = None, **_: Any) -> None:
        """``fn`` found and callable, ``kwargs`` a mapping: checked before any work (see ``Evaluator.validate``)."""
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise EvaluatorError(f"python evaluator: kwargs must be a mapping, got {type(kwargs).__name__}")
        if isinstance(fn, str) and ":" in fn:
            func = load_attr(fn, "python evaluator", EvaluatorError)
            if not callable(func):
                raise EvaluatorError(f"python evaluator: {fn!r} is a {type(func).__name__}, not callable")
        elif not callable(fn):
            raise EvaluatorError(f"python evaluator: fn must be 'module:function', "
                                 f"'path/to/file.py:function' or a callable, got {fn!r}")

    def identity(self) -> dict[str, Any]:
        """Name, version, arguments, plus the sha256 of the function's source file (if known)."""
        ident = super().identity()
        ident["source_sha256"] = self._source_sha256
        return ident

    def score(self, candidate: Candidate) -> Any:
        """Return ``fn(candidate, **kwargs)``; ``run_evaluator`` checks and normalises it.

        Args:
            candidate: the candidate to score.

        Returns:
            Whatever the function returns (a float or a mapping of metrics).
        """
        if self._examples is not None:  # the mean of every per-example score, as the scorer computes it
            values = [float(v) for v in self.score_examples(candidate, range(self._examples))]
            if len(values) != self._examples:
                raise EvaluatorError(f"python evaluator: {len(values)} per-example scores for "
                                     f"{self._examples} examples")
            return mean_score(values)
        return self._fn(candidate, **self.args["kwargs"])

    def examples(self) -> int | None:
        """``examples`` when given (per-example scores), else None."""
        return self._examples

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> Sequence[float]:
        """``fn(candidate, indices=indices, **kwargs)``: one number per index."""
        if self._examples is None:
            return super().score_examples(candidate, indices)
        bad = [i for i in indices if not 0 <= i < self._examples]
        if bad:
            raise EvaluatorError(f"python evaluator: example index {bad[0]} is outside 0..{self._examples - 1}")
        return self._fn(candidate, indices=list(indices), **self.args["kwargs"])


def _takes_indices(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # a builtin or C callable: its call will tell
    return any(p.name == "indices" or p.kind is p.VAR_KEYWORD for p in params)


def _callable_name(fn: Callable[..., Any]) -> str:
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isclass(fn) else type(fn)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    return f"{module}:{qualname}"


def _source_hash(fn: Callable[..., Any]) -> str | None:
    try:
        target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
        path = inspect.getsourcefile(inspect.unwrap(target))
        if path is None:
            return None
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (TypeError, OSError):
        return None
