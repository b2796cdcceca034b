"""Per-example scores from lm-eval (racing, docs/racing.md): one task's documents, scored one by one.

lm-eval logs every document's metric values (``log_samples``) and evaluates a chosen subset of the
documents (``simple_evaluate(samples={task: [doc ids]})``), so a candidate can be scored on a batch
of documents and its per-document values cached. This is offered only where the score is the plain
mean of those values: a single task (not a group), and a primary metric that lm-eval aggregates with
``mean`` (``acc``, ``acc_norm``, ``exact_match``...); anything else (a group, several tasks,
``brier_score``, perplexities, F1 over the corpus) is scored whole.

A document's value must also depend on that document only, never on which others are evaluated with
it, so that values from different batches can be cached and mixed. Two things in lm-eval break that,
and are scored whole too: few-shot examples drawn at random (lm-eval's ``default`` sampler draws from
one generator seeded per run, so document 7's examples depend on how many documents came before it:
only ``num_fewshot: 0`` and the ``first_n`` sampler qualify), and generation with ``do_sample``
(one torch generator for the whole run).
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


def documents(tasks: Sequence[str], task_manager: Any, primary: str | None, limit: int | float | None,
              num_fewshot: int | None = None, gen_kwargs: Mapping[str, Any] | str | None = None) -> Documents | None:
    """The single task's documents (``limit`` applied as lm-eval applies it), or None when the score is
    not the mean of per-document values, each a function of its document alone (see the module
    docstring); ``num_fewshot`` and ``gen_kwargs`` as given to ``simple_evaluate``."""
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
    if task.aggregation().get(metric) is not mean or not _independent(task, num_fewshot, gen_kwargs):
        return None
    n = len(task.eval_docs)
    if limit is not None:
        n = min(n, int(math.ceil(n * limit)) if limit < 1.0 else int(limit))
    return Documents(name, n, metric, filter_name or "none") if n > 0 else None


def _independent(task: Any, num_fewshot: int | None, gen_kwargs: Mapping[str, Any] | str | None) -> bool:
    """True when each document's requests are built and run alike whatever the other documents are:
    no few-shot examples, or the ``first_n`` sampler; and no sampled generation."""
    from lm_eval.api.samplers import FirstNSampler
    from lm_eval.utils import simple_parse_args_string

    config = task.config
    shots = getattr(config, "num_fewshot", None)
    if num_fewshot is not None and shots != 0:  # simple_evaluate's rule: a task's 0 is never overridden
        shots = num_fewshot
    if shots and type(getattr(task, "sampler", None)) is not FirstNSampler:
        return False
    if getattr(config, "output_type", None) != "generate_until":
        return True
    generation = dict(getattr(config, "generation_kwargs", None) or {})
    if gen_kwargs:
        generation.update(simple_parse_args_string(gen_kwargs) if isinstance(gen_kwargs, str) else gen_kwargs)
    sampled = generation.get("do_sample", False)
    return not (sampled is True or str(sampled).lower() == "true")


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

