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
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, Evaluator
from soup.plugins import load_attr

__all__ = ["PythonEvaluator"]


class PythonEvaluator(Evaluator):
    """Call a user function on each candidate.

    Args:
        fn: ``"module:function"``, ``"path/to/file.py:function"``, or a callable.
        kwargs: extra keyword arguments passed to every call.
        direction: ``"maximize"`` (default) or ``"minimize"``.
        primary: for mapping results, the metric used for selection.

    Raises:
        EvaluatorError: ``fn`` cannot be imported or is not callable; ``kwargs`` is not a mapping.
    """

    name = "python"
    version = "1"

    def __init__(self, *, fn: str | Callable[..., Any], kwargs: Mapping[str, Any] | None = None,
                 direction: str = "maximize", primary: str | None = None) -> None:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise EvaluatorError(f"python evaluator: kwargs must be a mapping, got {type(kwargs).__name__}")
        if callable(fn):
            func, spec = fn, _callable_name(fn)
        elif isinstance(fn, str) and ":" in fn:
            func, spec = load_attr(fn, "python evaluator", EvaluatorError), fn
            if not callable(func):
                raise EvaluatorError(f"python evaluator: {fn!r} is a {type(func).__name__}, not callable")
        else:
            raise EvaluatorError(f"python evaluator: fn must be 'module:function', "
                                 f"'path/to/file.py:function' or a callable, got {fn!r}")
        super().__init__(fn=spec, kwargs=dict(kwargs or {}), direction=direction, primary=primary)
        self._fn = func
        self._source_sha256 = _source_hash(func)

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
        return self._fn(candidate, **self.args["kwargs"])


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
