"""Table evaluator: scores read from a file computed elsewhere (dry runs, offline benchmarks).

The file is one of:

- CSV with a header: the first column holds the candidate, the others metrics
  (``candidate,score[,metric2...]``); empty cells are left out;
- JSON or YAML mapping ``{candidate: score}`` or ``{candidate: {metric: value, ...}}``.

Lookup order for a candidate (the first hit wins):

1. ``candidate.name``;
2. the ingredient label, when the candidate is one ingredient at weight 1 (all other weights 0);
3. for a uniform soup of two or more ingredients, their labels sorted and joined with ``+``
   (``a+b``; a file key ``b+a`` is found too, since file keys with ``+`` are sorted the same way);
4. ``candidate.key``.

A row with one metric scores as that number; with several, as a mapping whose ``primary`` defaults to
the first metric column of a CSV, or to ``score`` when every row of a JSON/YAML file has one.

Per-example scores (racing, docs/racing.md), JSON/YAML only: a row ``{score: 0.75, examples: [1, 0, 1,
1]}`` also gives one value per example of its primary metric (``primary``, default ``score``;
``examples`` is not a metric). When every row has such a list, all of one length, the evaluator offers
them (``examples()`` = that length, ``example_range`` the range of the values in the file) and a
row's primary metric is exactly their mean (``mean_score``): left out, it is filled in; given, it must
agree with the mean to within rounding (relative 1e-9), else it is an error naming the row. A row
without a list among rows with one, lists of different lengths, a value that is not a finite number:
each one line naming the row. CSV tables give no per-example scores::

    {"ft-a": {"score": 0.75, "examples": [1, 0, 1, 1]},
     "ft-b": {"examples": [0, 0, 1, 1]},           # score: 0.5, filled in
     "ft-a+ft-b": {"score": 1.0, "examples": [1, 1, 1, 1]}}

Example::

    TableEvaluator(path="scores.csv")  # candidate,score / ft-ocr,0.71 / ft-chat,0.64 / ...
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, Evaluator, mean_score

__all__ = ["TableEvaluator", "load_table", "load_examples", "soup_label"]


def soup_label(labels: list[str] | tuple[str, ...]) -> str:
    """The table key of a uniform soup: ingredient labels sorted and joined with ``+``."""
    return "+".join(sorted(labels))


def load_table(path: str | Path) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Read a score table.

    Args:
        path: a ``.csv``, ``.json``, ``.yaml`` or ``.yml`` file.

    Returns:
        ``({candidate: {metric: value}}, metric names in file order)``.

    Raises:
        EvaluatorError: the file is missing, malformed, has a duplicate row or a non-number.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluatorError(f"score table not found: {path}")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluatorError(f"cannot read score table {path}: {e}") from e
    table: dict[str, dict[str, float]] = {}
    metrics: list[str] = []
    if suffix == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
        if not rows or len(rows[0]) < 2:
            raise EvaluatorError(f"{path}: a CSV score table needs a header 'candidate,score[,...]'")
        header = [h.strip() for h in rows[0]]
        metrics = header[1:]
        for lineno, row in enumerate(rows[1:], 2):
            name = row[0].strip()
            if name in table:
                raise EvaluatorError(f"{path}: candidate {name!r} appears twice")
            table[name] = {m: _number(v, f"{path}:{lineno} ({m})") for m, v in zip(metrics, row[1:])
                           if v.strip() != ""}
        return table, metrics
    if suffix in (".json", ".yaml", ".yml"):
        try:
            if suffix == ".json":
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except Exception as e:
            raise EvaluatorError(f"{path}: invalid {suffix[1:].upper()}: {e}") from e
        if not isinstance(data, Mapping):
            raise EvaluatorError(f"{path}: expected a mapping {{candidate: score or {{metric: value}}}}")
        for name, value in data.items():
            if isinstance(value, Mapping):
                table[str(name)] = {str(m): _number(v, f"{path}: {name}.{m}") for m, v in value.items()
                                    if m != "examples"}
            else:
                table[str(name)] = {"score": _number(value, f"{path}: {name}")}
            metrics += [m for m in table[str(name)] if m not in metrics]
        return table, metrics
    raise EvaluatorError(f"{path}: a score table must be .csv, .json, .yaml or .yml")


def load_examples(path: str | Path, table: dict[str, dict[str, float]],
                  metric: str = "score") -> dict[str, list[float]] | None:
    """``{candidate: per-example values}`` when every row of a JSON/YAML table has an ``examples`` list of
    one length (see the module docstring); None when no row has one. Each row's ``metric`` in ``table``
    is set to the exact mean of its values.

    Raises:
        EvaluatorError: some rows have one and others not, lengths differ, a value is not a finite
            number, or a row's ``metric`` is not the mean of its examples (each naming the row).
    """
    path = Path(path)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        return None
    import yaml

    data = json.loads(path.read_text(encoding="utf-8")) if path.suffix.lower() == ".json" else \
        yaml.safe_load(path.read_text(encoding="utf-8"))
    rows = {str(k): v.get("examples") for k, v in data.items() if isinstance(v, Mapping)}
    given = {k: v for k, v in rows.items() if v is not None}
    if not given:
        return None
    lacking = sorted(set(map(str, data)) - set(given))
    if lacking:
        raise EvaluatorError(f"{path}: {lacking[0]} has no examples list while other rows have one")
    out: dict[str, list[float]] = {}
    for name, values in given.items():
        if not isinstance(values, list) or not values:
            raise EvaluatorError(f"{path}: {name}.examples must be a non-empty list of numbers")
        out[name] = [_number(v, f"{path}: {name}.examples[{i}]") for i, v in enumerate(values)]
        if not all(math.isfinite(v) for v in out[name]):
            raise EvaluatorError(f"{path}: {name}.examples holds a non-finite value "
                                 f"(index {next(i for i, v in enumerate(out[name]) if not math.isfinite(v))})")
        mean, row = mean_score(out[name]), table[name]
        if metric in row and not math.isclose(row[metric], mean, rel_tol=1e-9, abs_tol=1e-12):
            raise EvaluatorError(f"{path}: {name}: {metric} {row[metric]} is not the mean of its examples ({mean})")
        row[metric] = mean  # exactly what the scorer builds from them
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        first = next(iter(out))
        other = next(k for k, v in out.items() if len(v) != len(out[first]))
        raise EvaluatorError(f"{path}: {other} has {len(out[other])} examples, {first} has {len(out[first])}")
    return out


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise EvaluatorError(f"{where}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EvaluatorError(f"{where}: {value!r} is not a number") from None


class TableEvaluator(Evaluator):
    """Look each candidate's score up in a table file (see the module docstring for the order).

    Args:
        path: the CSV / JSON / YAML file, read once at construction.
        direction: ``"maximize"`` (default) or ``"minimize"``.
        primary: with several metrics per row, the one used for selection.

    Raises:
        EvaluatorError: the file cannot be read (at construction); a candidate has no row (from
            ``score``, naming the candidate, the keys tried and the file).
    """

    name = "table"
    version = "1"

    def __init__(self, *, path: str | Path, direction: str = "maximize",
                 primary: str | None = None) -> None:
        table, metrics = load_table(path)
        examples = load_examples(path, table, primary or "score")  # fills each row's primary metric in
        if examples is not None and (primary or "score") not in metrics:
            metrics.append(primary or "score")
        if primary is None and len(metrics) > 1:
            if Path(path).suffix.lower() == ".csv":
                primary = metrics[0]
            elif all("score" in row for row in table.values()):
                primary = "score"
        super().__init__(path=str(path), direction=direction, primary=primary)
        self._table = table
        # file keys of soups ("b+a") are also found under their sorted form ("a+b")
        for name, row in list(table.items()):
            if "+" in name:
                self._table.setdefault(soup_label([p.strip() for p in name.split("+")]), row)
        self._sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self._examples = examples
        if self._examples is not None:
            for name, values in list(self._examples.items()):
                if "+" in name:
                    self._examples.setdefault(soup_label([p.strip() for p in name.split("+")]), values)
            seen = [v for values in self._examples.values() for v in values]
            self.score_is_mean = True
            self.example_range = (min(seen), max(seen)) if min(seen) < max(seen) else None

    @classmethod
    def validate(cls, *, path: str | Path, **_: Any) -> None:
        """The table file is there, checked before any work (see ``Evaluator.validate``)."""
        if not Path(path).is_file():
            raise EvaluatorError(f"score table not found: {path}")

    def identity(self) -> dict[str, Any]:
        """Name, version, arguments, plus the table file's sha256."""
        ident = super().identity()
        ident["table_sha256"] = self._sha256
        return ident

    def lookup_keys(self, candidate: Candidate) -> list[str]:
        """The keys tried for ``candidate``, in order.

        Args:
            candidate: the candidate.

        Returns:
            Distinct keys: name, single-ingredient label, uniform-soup label, content key.
        """
        keys = [candidate.name]
        used = {label: w for label, w in candidate.weights.items() if w != 0}
        values = list(used.values())
        if len(used) == 1 and abs(values[0] - 1) <= 1e-9:
            keys.append(next(iter(used)))
        elif len(used) > 1 and max(values) - min(values) <= 1e-9 * max(map(abs, values)):
            keys.append(soup_label(list(used)))
        keys.append(candidate.key)
        return list(dict.fromkeys(keys))

    def score(self, candidate: Candidate) -> float | dict[str, float]:
        """The row of ``candidate``: a float for one metric, else ``{metric: value}``.

        Args:
            candidate: the candidate to look up.

        Returns:
            The score, or the row's metrics.

        Raises:
            EvaluatorError: no row matches.
        """
        keys = self.lookup_keys(candidate)
        for key in keys:
            if key in self._table:
                row = self._table[key]
                if len(row) == 1 and self.primary is None:
                    return next(iter(row.values()))
                return dict(row)
        raise EvaluatorError(f"no score for {candidate.name} in {self.args['path']} "
                             f"(tried {', '.join(repr(k) for k in keys)})")

    def examples(self) -> int | None:
        """The length of the rows' ``examples`` lists (None: the table has none)."""
        return len(next(iter(self._examples.values()))) if self._examples else None

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> list[float]:
        """The candidate's row's ``examples`` values at ``indices`` (looked up as ``score`` does)."""
        keys, n = self.lookup_keys(candidate), self.examples() or 0
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise EvaluatorError(f"table: example index out of range 0..{n - 1}: {bad[0]}")
        for key in keys:
            if self._examples and key in self._examples:
                return [self._examples[key][i] for i in indices]
        raise EvaluatorError(f"no examples for {candidate.name} in {self.args['path']} "
                             f"(tried {', '.join(repr(k) for k in keys)})")

    def aggregate(self, values: Sequence[float]) -> float | dict[str, float] | None:
        """The row's score from its examples: their mean (with the row's other metrics left out)."""
        if not self._examples:
            return None
        value = mean_score(values)
        return {self.primary: value} if self.primary else value
