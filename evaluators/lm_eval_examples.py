"""Per-example scores from lm-eval (racing, docs/racing.md): one task's documents, scored one by one.

lm-eval logs every document's metric values (``log_samples``) and evaluates a chosen subset of the
documents (``simple_evaluate(samples={task: [doc ids]})``), so a candidate can be scored on a batch
of documents and its per-document values cached. This is offered only where the score is the plain
mean of those values: a single task (not a group), and a primary metric that lm-eval aggregates with
``mean`` (``acc``, ``acc_norm``, ``exact_match``...); anything else (a group, several tasks,
``brier_score``, perplexities, F1 over the corpus) is scored whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from soup.errors import EvaluatorError

__all__ = ["Documents", "documents", "per_document"]

BOUNDED = ("acc", "acc_norm", "exact_match", "acc_mutual_info")  # per-document values in [0, 1]


class Documents:
    """What per-example scoring needs of the task: its name, its documents and the metric to read."""

    def __init__(self, task: str, count: int, metric: str, filter_name: str) -> None:
        self.task, self.count, self.metric, self.filter = task, count, metric, filter_name

    @property
    def bounded(self) -> bool:
        return self.metric in BOUNDED


def documents(tasks: Sequence[str], task_manager: Any, primary: str | None,
              limit: int | float | None) -> Documents | None:
    """The single task's documents (``limit`` applied as lm-eval applies it), or None when the score is
    not the mean of per-document values (see the module docstring)."""
    if len(tasks) != 1 or not primary or "/" in primary:
        return None
    from lm_eval.api.metrics import mean

    try:
        found = task_manager.load(list(tasks))  # {tasks: {name: Task}, groups: {...}, group_map: {...}}
    except Exception as e:
        raise EvaluatorError(f"lm-eval: cannot load {tasks[0]}: {type(e).__name__}: {e}") from e
    if len(found["tasks"]) != 1 or found.get("groups"):
        return None
    (name, task), = found["tasks"].items()
    metric, _, filter_name = primary.partition(",")
    if task.aggregation().get(metric) is not mean:
        return None
    n = len(task.eval_docs)
    if limit is not None:
        n = min(n, int(math.ceil(n * limit)) if limit < 1.0 else int(limit))
    return Documents(name, n, metric, filter_name or "none") if n > 0 else None


def per_document(results: Mapping[str, Any], docs: Documents) -> dict[int, float]:
    """``{doc id: value}`` of the metric, from a ``simple_evaluate(..., log_samples=True)`` result."""
    out: dict[int, float] = {}
    for sample in (results.get("samples") or {}).get(docs.task, []):
        if sample.get("filter", "none") != docs.filter or docs.metric not in sample:
            continue
        value = sample[docs.metric]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvaluatorError(f"lm-eval: {docs.task} logged a non-numeric {docs.metric} ({value!r}) for "
                                 f"document {sample.get('doc_id')}")
        out[int(sample["doc_id"])] = float(value)
    return out

