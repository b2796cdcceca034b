"""One candidate construction: the merge arguments of a strategy's choice, for its candidates and the soup.

``merge_arguments`` turns a choice's weights and the run's byte-changing options into ``merge``'s
arguments; the scorer builds every candidate with them and ``soup.pipeline`` merges the chosen soup
with them too, so a score is the score of the bytes written. ``byte_options`` is what of them the
candidate cache key names besides weights, rules and dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.engine.sinks import InPlaceSink
from soup.io.checkpoint import Checkpoint
from soup.merging import merge

__all__ = ["merge_arguments", "byte_options", "math_device", "first_nonzero", "write_candidate", "SUM_PLACES"]


def math_device(target: InPlaceSink) -> str:
    """Where to compute a candidate loaded into ``target``: its GPU when all of it is on one, else the CPU."""
    devices = {t.device for t in target.tensors.values()}
    only = devices.pop() if len(devices) == 1 else None
    return str(only) if only is not None and only.type == "cuda" else "cpu"


def merge_arguments(weights: Sequence[float], options: Mapping[str, Any]) -> dict[str, Any]:
    """``merge``'s weights and byte-changing options for a strategy's choice: the one construction of
    a candidate and of the final soup (``soup.pipeline`` merges the chosen soup with these too).

    With a merge method other than the mean, a soup of one ingredient among several is that ingredient
    (ingredients are scored as themselves; a run of a single ingredient applies the method to it, as
    slerp of one model with the base does), and the weights are scaled so the largest is 1: mergekit's
    convention (each member's task vector at full weight; methods that normalise are unaffected).
    """
    w = [float(x) for x in weights]
    args = {k: v for k, v in options.items() if k != "method" and v is not None}
    method = options.get("method")
    if method is None or method.is_linear:
        return dict(args, weights=w, method=method)
    if len(w) > 1 and sum(1 for x in w if x) <= 1:
        return dict(args, weights=w, method=None)
    top = max(w)
    return dict(args, weights=[x / top for x in w], method=method)


def byte_options(args: Mapping[str, Any]) -> dict[str, Any] | None:
    """What of ``merge_arguments`` goes into a candidate's cache key besides weights, rules and dtype
    (only what differs from the defaults, so keys of plain means stay as they were)."""
    extra = {}
    for k, default in (("accumulate", "auto"), ("normalize", True), ("mixed_float", False), ("vocab", "union")):
        if k in args and args[k] != default:
            extra[k] = args[k]
    method = args.get("method")
    if method is not None:
        extra["method"] = method.describe()
        extra["base"] = getattr(method.base, "fingerprint", str(method.base))
    return extra or None


def first_nonzero(weights: Sequence[float]) -> int:
    return next(i for i, w in enumerate(weights) if w)


def write_candidate(cks: Sequence[Checkpoint], folder: Path, common: dict[str, Any]) -> None:
    merge(cks, folder, overwrite=True, **common)


SUM_PLACES = ("auto", "device", "memory", "disk")  # greedy's former ``sums:`` values, still accepted


