"""The evaluators of a run, built in one place: ``make_evaluators`` serves ``cook`` and ``soup worker``.

A spec is an entry-point name, ``module:Class``, ``file.py:Class``, an Evaluator instance or class, or a
plain Python function (wrapped in the ``python`` evaluator); with several devices, one evaluator is
built per device (its ``device`` argument), so candidates are evaluated concurrently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from soup.soups.evaluate import Evaluator, load_evaluator

__all__ = ["make_evaluators", "EvaluatorSpec"]

EvaluatorSpec = str | type | Evaluator | Callable[..., Any]


def make_evaluators(spec: EvaluatorSpec | None, args: Mapping[str, Any], devices: Sequence[str] | None) -> list[Evaluator]:
    if spec is None:
        return []
    if callable(spec) and not isinstance(spec, (type, Evaluator)):
        from soup.evaluators.python import PythonEvaluator

        return [PythonEvaluator(fn=spec, **args)]
    if isinstance(spec, Evaluator) or not devices or len(devices) < 2:
        return [load_evaluator(spec, **args)]
    return [load_evaluator(spec, **{**args, "device": d}) for d in devices]

