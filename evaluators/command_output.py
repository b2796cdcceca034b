"""What a command evaluator reads back: numbers and JSON from stdout or a result file, key paths, and
the per-example values of racing (``examples: N``, ``{indices}``), each failure one line naming the
command and quoting the tail of its stderr (``soup.evaluators.command``)."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError

__all__ = ["check_examples", "per_example_values", "lookup_key", "quote_tail", "read_json_file",
           "parse_stdout_json", "number_from_stdout", "as_float"]

_NUMBER = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\b(?:nan|inf(?:inity)?)\b)",
                     re.IGNORECASE)


def check_examples(examples: Any, per_example: Any, example_range: Any, texts: Sequence[str]) -> int | None:
    """The per-example arguments checked before any work: ``examples`` a whole number >= 1 given with an
    ``{indices}`` placeholder the command reads; ``per_example`` and ``example_range`` only with it."""
    if examples is None:
        if per_example is not None or example_range is not None:
            raise EvaluatorError("command: per_example and example_range need examples: N")
        return None
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise EvaluatorError(f"command: examples must be a whole number >= 1, got {examples!r}")
    if not any("{indices}" in t for t in texts):
        raise EvaluatorError("command: examples: N needs the {indices} placeholder in cmd, env or cwd "
                             "(the file naming the examples to score)")
    if example_range is not None and not (isinstance(example_range, (list, tuple)) and len(example_range) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in example_range)
            and example_range[0] < example_range[1]):
        raise EvaluatorError(f"command: example_range must be [low, high] with low < high, got {example_range!r}")
    return examples


def per_example_values(got: Any, n: int, argv: list[str], tail: str,
                       bounds: tuple[float, float] | None = None) -> list[float]:
    """The command's per-example values: a list of ``n`` finite numbers (within ``bounds``, the
    ``example_range``, when given), else one line saying what came."""
    name = Path(argv[0]).name
    if not isinstance(got, list):
        raise EvaluatorError(f"command {name!r} gave {type(got).__name__} for its per-example scores, "
                             "expected a JSON list" + quote_tail(tail))
    if len(got) != n:
        raise EvaluatorError(f"command {name!r} gave {len(got)} per-example scores for {n} examples"
                             + quote_tail(tail))
    out = [as_float(v, argv, tail, f"per-example score {i}") for i, v in enumerate(got)]
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise EvaluatorError(f"command {name!r} gave a non-finite per-example score {i}: {v}" + quote_tail(tail))
        if bounds is not None and not bounds[0] <= v <= bounds[1]:
            raise EvaluatorError(f"command {name!r} gave per-example score {i} = {v}, outside example_range "
                                 f"[{bounds[0]:g}, {bounds[1]:g}]" + quote_tail(tail))
    return out


def lookup_key(data: Any, key: str | Sequence[str | int], *, where: str = "JSON") -> Any:
    """Follow a dotted key path (``a.b[0].c`` or ``a.b.0.c``, or a list of parts) into JSON data.

    Args:
        data: parsed JSON.
        key: the path; at a dict, the longest run of parts joined by ``.`` that is a key wins, so
            keys containing dots work.
        where: names the source in errors.

    Returns:
        The value at the path.

    Raises:
        EvaluatorError: a part is missing (names the available keys at that level).
    """
    if isinstance(key, str):
        parts: list[str | int] = [p for p in re.sub(r"\[(\d+)\]", r".\1", key).split(".") if p != ""]
    else:
        parts = list(key)
    node, i = data, 0
    while i < len(parts):
        if isinstance(node, Mapping):
            for j in range(len(parts), i, -1):  # the longest dotted run that is a key
                joined = ".".join(str(p) for p in parts[i:j])
                if joined in node:
                    node, i = node[joined], j
                    break
            else:
                shown = ", ".join(map(str, list(node)[:12])) + (", ..." if len(node) > 12 else "")
                raise EvaluatorError(f"key {key!r} not found in {where}: no {parts[i]!r} "
                                     f"(available: {shown})")
        elif isinstance(node, list):
            try:
                node, i = node[int(parts[i])], i + 1
            except (ValueError, IndexError):
                raise EvaluatorError(f"key {key!r} not found in {where}: {parts[i]!r} is not an "
                                     f"index of a list of {len(node)}") from None
        else:
            raise EvaluatorError(f"key {key!r} not found in {where}: {parts[i - 1]!r} is a "
                                 f"{type(node).__name__}, not an object or list")
    return node


def quote_tail(tail: str) -> str:
    return f"; stderr tail:\n{tail}" if tail else " (no stderr)"


def read_json_file(pattern: str, argv: list[str], tail: str) -> Any:
    if any(c in pattern for c in "*?["):
        matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise EvaluatorError(f"command {Path(argv[0]).name!r} wrote no file matching {pattern}"
                                 + quote_tail(tail))
        path = max(matches, key=os.path.getmtime)
    else:
        path = pattern
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluatorError(f"command {Path(argv[0]).name!r} wrote no result file {path}"
                             + quote_tail(tail)) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluatorError(f"cannot read result file {path} of command {Path(argv[0]).name!r}: {e}") from e


def parse_stdout_json(stdout: str, argv: list[str], tail: str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.splitlines()):
        if line.strip().startswith(("{", "[")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise EvaluatorError(f"command {Path(argv[0]).name!r} printed no JSON on stdout "
                         f"(stdout ends: {stdout.strip()[-200:]!r})" + quote_tail(tail))


def number_from_stdout(stdout: str, regex: re.Pattern | None, argv: list[str], tail: str) -> float:
    name = Path(argv[0]).name
    if regex is not None:
        found = regex.findall(stdout)
        if not found:
            raise EvaluatorError(f"command {name!r}: regex {regex.pattern!r} matched nothing on "
                                 f"stdout (stdout ends: {stdout.strip()[-200:]!r})" + quote_tail(tail))
        return as_float(found[-1], argv, tail, "stdout")
    found = _NUMBER.findall(stdout)
    if not found:
        raise EvaluatorError(f"command {name!r} printed no number on stdout "
                             f"(stdout ends: {stdout.strip()[-200:]!r})" + quote_tail(tail))
    return float(found[-1])


def as_float(value: Any, argv: list[str], tail: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EvaluatorError(f"command {Path(argv[0]).name!r}: {where} holds {value!r}, not a number")
    try:
        return float(value)
    except ValueError:
        raise EvaluatorError(f"command {Path(argv[0]).name!r}: {where} holds {value!r}, "
                             f"not a number") from None
