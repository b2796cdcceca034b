"""lm-eval-harness evaluator: any lm-eval task, group or local task YAML, run in process.

One model stays resident for the whole run: the first ``score`` builds the architecture from a
config (no weights read from disk) and wraps it in lm-eval's ``HFLM``; every call, the first
included, computes the candidate's weights straight into it (``candidate.load_into(model)``) and
runs ``lm_eval.simple_evaluate`` on it. No candidate is written to disk and no model is rebuilt.

Tasks are named as on lm-eval's command line: a task, a group or a tag (``arc_easy``, ``mmlu``), or
the path of a task YAML; ``include_path`` adds a folder of local task YAMLs (lm-eval's
``--include_path``). Only the local folder is indexed when every task named is a local task (lm-eval's
own index of thousands of YAMLs takes seconds to build).

Returns every metric of the task: ``{"acc": 0.61, "acc_norm": 0.64}`` (lm-eval's ``"acc,none"``
without the default filter's suffix; other filters keep theirs: ``"exact_match,strict-match"``;
standard errors are left out). With several top-level tasks, each metric is named ``"task/metric"``
and the unqualified ``"metric"`` is their unweighted mean. The recipe's ``metric`` is the primary.

Per-example scores (racing, docs/racing.md): with one task whose ``metric`` lm-eval averages over
documents (``acc``, ``acc_norm``, ``exact_match``...), ``examples()`` is the number of documents and
``score_examples`` each document's logged value, lm-eval run on those documents only; the score's
primary metric is then exactly their mean. Groups, several tasks, corpus-level metrics and randomly
drawn few-shot examples give none (``soup.evaluators.lm_eval_examples`` says why).

Example::

    ev = LMEvalEvaluator(tasks="arc_easy", metric="acc_norm", model="base-model/", limit=200)
    ev.score(candidate)  # {"acc": 0.58, "acc_norm": 0.55}
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, Evaluator, mean_score

from soup.evaluators.lm_eval_examples import Documents, documents, per_document
from soup.evaluators.lm_eval_tasks import task_manager, tasks_digest
from soup.evaluators.resident import DTYPES, build_model, release, resolve_device, resolve_dtype

__all__ = ["LMEvalEvaluator"]

_INSTALL = "pip install 'soup-merge[lm-eval]'"


class LMEvalEvaluator(Evaluator):
    """lm-eval-harness tasks on each candidate, with one resident model; higher is better by default.

    Args:
        tasks: a task, group or tag name, or a task YAML path; or a list of them.
        metric: the primary metric, as lm-eval names it (``"acc"``, ``"acc_norm"``,
            ``"exact_match,strict-match"``; a ``",none"`` suffix may be left out).
        include_path: a folder (or a list of folders) of local task YAMLs.
        direction: ``"maximize"`` (default) or ``"minimize"``; left out, a metric that lm-eval says
            is better lower (a loss, ``brier_score``) is an error rather than maximised.
        limit: evaluate only the first N documents of each task (or a fraction, below 1).
        num_fewshot: few-shot examples per prompt (default: the task's own).
        batch_size: requests per forward pass, or ``"auto"`` (lm-eval finds the largest that fits).
        max_length: the longest context in tokens (default: from the model's config).
        model: a folder with ``config.json`` and tokenizer files to build the resident model from;
            default: the first candidate's folder (``candidate.path()``, written once).
        tokenizer: a folder to load the tokenizer from; default: the same folder as the config.
        device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (float32 on cpu; the config's dtype, else bfloat16, on cuda),
            ``"float32"``, ``"bfloat16"``, ``"float16"``.
        apply_chat_template: render prompts with the tokenizer's chat template (lm-eval's
            ``--apply_chat_template``).
        gen_kwargs: generation settings for generative tasks (lm-eval's ``--gen_kwargs``).
        strict: refuse checkpoint tensors the model does not have.
        trust_remote_code: passed to ``transformers`` (config, model and tokenizer).

    Returns (from ``score``): ``{metric: value}`` for every metric the tasks report.

    Raises:
        EvaluatorError: lm-eval is not installed, bad arguments, an unknown task, a candidate whose
            tensors do not fit the model, a ``metric`` the tasks do not report.
    """

    name = "lm-eval"
    version = "1"

    def __init__(self, *, tasks: str | list[str], metric: str,
                 include_path: str | Path | list[str | Path] | None = None,
                 direction: str | None = None, limit: int | float | None = None,
                 num_fewshot: int | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, model: str | Path | None = None,
                 tokenizer: str | Path | None = None, device: str = "auto", dtype: str = "auto",
                 apply_chat_template: bool = False, gen_kwargs: Mapping[str, Any] | str | None = None,
                 strict: bool = True, trust_remote_code: bool = False) -> None:
        task_list = [tasks] if isinstance(tasks, (str, Path)) else tasks
        if not (isinstance(task_list, list) and task_list
                and all(isinstance(t, (str, Path)) and str(t) for t in task_list)):
            raise EvaluatorError(f"lm-eval: tasks must be a task name or YAML path, or a non-empty list "
                                 f"of them; got {tasks!r}")
        task_list = [str(t) for t in task_list]
        includes = [] if include_path is None else (
            [include_path] if isinstance(include_path, (str, Path)) else list(include_path))
        super().__init__(tasks=task_list if len(task_list) > 1 else task_list[0], metric=metric,
                         include_path=[str(p) for p in includes] or None,
                         direction=direction or "maximize", limit=limit, num_fewshot=num_fewshot,
                         batch_size=batch_size, max_length=max_length,
                         model=None if model is None else str(model),
                         tokenizer=None if tokenizer is None else str(tokenizer), device=device,
                         dtype=dtype, apply_chat_template=apply_chat_template,
                         gen_kwargs=dict(gen_kwargs) if isinstance(gen_kwargs, Mapping) else gen_kwargs,
                         strict=strict, trust_remote_code=trust_remote_code)
        self._direction_given = direction is not None
        self.primary = _metric_key(metric) if isinstance(metric, str) and metric else None
        _check_args(self.args, includes)
        try:
            import lm_eval
            import lm_eval.models.huggingface  # HFLM; it needs accelerate (lm-eval[hf])
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise EvaluatorError(f"lm-eval evaluator: the lm-eval package is not installed ({e}); "
                                 f"{_INSTALL}") from None
        self._lm_eval_version = lm_eval.__version__
        self._tasks = task_list
        self._task_manager = task_manager(TaskManager, task_list, [Path(p) for p in includes])
        self._tasks_sha256 = tasks_digest(task_list, [Path(p) for p in includes])
        self._model: Any = None  # the resident transformers model
        self._lm: Any = None  # lm-eval's HFLM around it
        self._device: str | None = None
        self._loaded: str | None = None  # the key of the candidate in the resident model
        self._docs: Documents | None | bool = False  # per-example scores (False: not looked up yet)

    # --- public ---------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The resident ``transformers`` model (None before the first ``score`` and after ``close``)."""
        return self._model

    def identity(self) -> dict[str, Any]:
        """Name, version and arguments, plus the lm-eval version and a sha256 of the local task files
        (YAMLs, their ``include:`` files, Python helpers and local ``data_files``)."""
        ident = super().identity()
        ident["lm_eval_version"] = self._lm_eval_version
        ident["tasks_sha256"] = self._tasks_sha256
        return ident

    def score(self, candidate: Candidate) -> dict[str, float]:
        """Load ``candidate`` into the resident model and run the tasks on it.

        Returns:
            ``{metric: value}`` (see the module docstring).

        Raises:
            EvaluatorError: see the class docstring.
        """
        self._load(candidate)
        docs = self._docs if self._docs else None  # per-example scores on: log every document's value
        results = self._evaluate(log=docs is not None)
        metrics, better_lower = _metrics(results)
        if docs is not None and self.primary in metrics:  # exactly mean_score of them (score_is_mean)
            values = per_document(results, docs)
            if len(values) != docs.count:
                raise EvaluatorError(f"lm-eval: {docs.task} logged {docs.metric} for {len(values)} of "
                                     f"{docs.count} documents")
            metrics[self.primary] = mean_score(list(values.values()))
        if self.primary not in metrics:
            raise EvaluatorError(f"lm-eval: metric {self.args['metric']!r} is not reported by "
                                 f"{', '.join(self._tasks)}; reported: {', '.join(metrics) or 'none'}")
        if not self._direction_given and better_lower.get(self.primary.split("/")[-1].split(",")[0]):
            raise EvaluatorError(f"lm-eval: lower {self.primary} is better (lm-eval's higher_is_better "
                                 "is false): set direction: minimize (or maximize to override)")
        return metrics

    def examples(self) -> int | None:
        """Documents of the task, for per-example scores: one task whose primary metric lm-eval averages
        with ``mean``, each document's value its own (no randomly drawn few-shot examples, no sampled
        generation: ``soup.evaluators.lm_eval_examples``). None otherwise: groups, several tasks,
        corpus-level metrics (``brier_score``, perplexities, F1) and random few-shot are scored whole.
        Found once (the task is loaded, no model is built)."""
        if self._docs is False:
            a = self.args
            self._docs = documents(self._tasks, self._task_manager, self.primary, a["limit"],
                                   a["num_fewshot"], a["gen_kwargs"])
            if self._docs is not None:
                self.score_is_mean = True  # the primary metric: the mean of the documents' values
                self.example_range = (0.0, 1.0) if self._docs.bounded else None
        return self._docs.count if self._docs else None

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> list[float]:
        """The primary metric of each document in ``indices`` (lm-eval's logged samples), evaluated on
        those documents only."""
        docs = self._docs if self._docs else None
        if docs is None:
            raise EvaluatorError("lm-eval: no per-example scores here (examples() is None: see its docstring)")
        wanted = sorted(set(int(i) for i in indices))  # lm-eval maps doc ids back only for a sorted list
        if wanted and not 0 <= wanted[0] <= wanted[-1] < docs.count:
            raise EvaluatorError(f"lm-eval: document index out of range 0..{docs.count - 1}: "
                                 f"{wanted[0] if wanted[0] < 0 else wanted[-1]}")
        self._load(candidate)
        values = per_document(self._evaluate(samples={docs.task: wanted}), docs)
        missing = [i for i in wanted if i not in values]
        if missing:
            raise EvaluatorError(f"lm-eval: {docs.task} logged no {docs.metric} for document(s) {missing[:5]}")
        return [values[int(i)] for i in indices]

    def aggregate(self, values: Sequence[float]) -> dict[str, float] | None:
        """The primary metric from every document's value: their mean, named as ``score`` names it."""
        return {self.primary: mean_score(values)} if self._docs else None

    def close(self) -> None:
        """Free the resident model and, on cuda, the cached GPU memory."""
        device, self._model, self._lm, self._loaded = self._device, None, None, None
        release(device)

    # --- building and running -------------------------------------------------------------------

    def _load(self, candidate: Candidate) -> None:
        """The candidate's weights in the resident model (built first), once per candidate."""
        from soup.errors import IncompatibleIngredients

        if self._lm is None:
            self._build(candidate)
        if self._loaded == candidate.key and not candidate.key.startswith("memory:"):
            return
        self._loaded = None  # a failed load leaves the model half-written
        try:
            candidate.load_into(self._model, strict=self.args["strict"])
        except IncompatibleIngredients as e:
            raise EvaluatorError(f"lm-eval: {candidate.name} does not fit the model: {e}") from e
        self._loaded = candidate.key

    def _build(self, candidate: Candidate) -> None:
        """Build the resident model from a config (weights left uninitialised) and wrap it in HFLM."""
        import transformers
        from lm_eval.models.huggingface import HFLM

        a = self.args
        folder = Path(a["model"]) if a["model"] else candidate.path()
        tok_folder = Path(a["tokenizer"]) if a["tokenizer"] else folder
        device = resolve_device(a["device"])
        try:
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=a["trust_remote_code"])
        except Exception as e:
            raise EvaluatorError(f"lm-eval: cannot load the config from {folder}: {type(e).__name__}: {e}") from e
        model = build_model(transformers.AutoModelForCausalLM, config, dtype=resolve_dtype(a["dtype"], config, device),
                            device=device, trust_remote_code=a["trust_remote_code"], who="lm-eval",
                            where=f"{folder}/config.json")
        try:
            # the tokenizer is loaded by HFLM itself, exactly as for `lm_eval --model hf`
            lm = HFLM(pretrained=model, tokenizer=str(tok_folder), batch_size=a["batch_size"],
                      max_length=a["max_length"], trust_remote_code=a["trust_remote_code"])
        except Exception as e:
            raise EvaluatorError(f"lm-eval: cannot set up the model or the tokenizer from {tok_folder}: "
                                 f"{type(e).__name__}: {e}") from e
        self._model, self._lm, self._device = model, lm, device

    def _evaluate(self, samples: dict[str, list[int]] | None = None, log: bool = False) -> dict[str, Any]:
        """``lm_eval.simple_evaluate`` on the resident model (``samples``: those documents only, their
        values logged; ``log``: log every document's values); the global random state is kept."""
        import lm_eval

        a = self.args
        extra = {k: a[k] for k in ("apply_chat_template", "gen_kwargs") if a[k]}  # only if set
        if samples is not None:
            extra["samples"] = samples
        with _kept_random_state():  # simple_evaluate seeds random, numpy and torch globally
            results = lm_eval.simple_evaluate(
                model=self._lm, tasks=list(self._tasks), task_manager=self._task_manager,
                limit=None if samples is not None else a["limit"], num_fewshot=a["num_fewshot"],
                bootstrap_iters=0, log_samples=log or samples is not None, **extra)
        if not results or "results" not in results:
            raise EvaluatorError("lm-eval: simple_evaluate returned no results")
        return results


# --- arguments -----------------------------------------------------------------------------------


def _check_args(a: Mapping[str, Any], includes: list[Any]) -> None:
    """Refuse bad arguments before anything is loaded."""
    if not (isinstance(a["metric"], str) and a["metric"].strip()):
        raise EvaluatorError(f"lm-eval: metric must be a metric name such as 'acc' or 'acc_norm', "
                             f"got {a['metric']!r}")
    limit = a["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or limit <= 0 or (isinstance(limit, float) and limit >= 1
                                                and not limit.is_integer())):
        raise EvaluatorError(f"lm-eval: limit must be a positive integer or a fraction below 1, got {limit!r}")
    few = a["num_fewshot"]
    if few is not None and (isinstance(few, bool) or not isinstance(few, int) or few < 0):
        raise EvaluatorError(f"lm-eval: num_fewshot must be an integer >= 0, got {few!r}")
    bs = a["batch_size"]
    if not ((isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1)
            or (isinstance(bs, str) and (bs == "auto" or bs.startswith("auto:")))):
        raise EvaluatorError(f"lm-eval: batch_size must be an integer >= 1 or 'auto', got {bs!r}")
    ml = a["max_length"]
    if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 2):
        raise EvaluatorError(f"lm-eval: max_length must be an integer >= 2, got {ml!r}")
    if a["dtype"] != "auto" and a["dtype"] not in DTYPES:
        raise EvaluatorError(f"lm-eval: unknown dtype {a['dtype']!r}; valid: auto, {', '.join(DTYPES)}")
    if not isinstance(a["device"], str) or not a["device"]:
        raise EvaluatorError(f"lm-eval: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {a['device']!r}")
    for key in ("apply_chat_template", "strict", "trust_remote_code"):
        if not isinstance(a[key], bool):
            raise EvaluatorError(f"lm-eval: {key} must be true or false, got {a[key]!r}")
    if a["gen_kwargs"] is not None and not isinstance(a["gen_kwargs"], (dict, str)):
        raise EvaluatorError(f"lm-eval: gen_kwargs must be a mapping or 'k=v,k=v', got {a['gen_kwargs']!r}")
    for p in includes:
        if not isinstance(p, (str, Path)) or not Path(p).is_dir():
            raise EvaluatorError(f"lm-eval: include_path {str(p)!r} is not a folder")
    for name in ("model", "tokenizer"):
        if a[name] is not None and not Path(a[name]).is_dir():
            raise EvaluatorError(f"lm-eval: {name} folder not found: {a[name]}")


def _metric_key(metric: str) -> str:
    """lm-eval's ``"acc,none"`` -> ``"acc"``; other filters are kept (``"exact_match,strict-match"``)."""
    metric = metric.strip()
    return metric.removesuffix(",none")


# --- tasks ---------------------------------------------------------------------------------------


# --- results -------------------------------------------------------------------------------------


def _metrics(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    """``{metric: value}`` from simple_evaluate's results (see the module docstring), and
    ``{metric: True}`` for the metrics lm-eval says are better lower."""
    table: Mapping[str, Mapping[str, Any]] = results["results"]
    subtasks: Mapping[str, list[str]] = results.get("group_subtasks") or {}
    children = {c for kids in subtasks.values() for c in kids}

    def numbers(name: str) -> dict[str, float]:
        out = {}
        for key, value in table.get(name, {}).items():
            if "," not in key or "_stderr," in key or isinstance(value, bool):
                continue  # alias, name, sample_len, standard errors
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[_metric_key(key)] = float(value)
        return out

    def roots(names: list[str]) -> Iterator[str]:
        for name in names:  # a group with no aggregate score stands for its tasks
            if numbers(name) or not subtasks.get(name):
                yield name
            else:
                yield from roots(list(subtasks[name]))

    top = list(roots([n for n in table if n not in children]))
    hib = results.get("higher_is_better") or {}
    better_lower = {m: True for n in top for m, v in (hib.get(n) or {}).items() if v is False}
    if len(top) == 1:
        return numbers(top[0]), better_lower
    metrics: dict[str, float] = {}
    per_task = {n: numbers(n) for n in top}
    for n, values in per_task.items():
        metrics.update({f"{n}/{m}": v for m, v in values.items()})
    shared = [m for m in per_task[top[0]] if all(m in v for v in per_task.values())] if top else []
    for m in shared:  # the unweighted mean over the tasks
        metrics[m] = sum(v[m] for v in per_task.values()) / len(per_task)
    return metrics, better_lower


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global random state on exit."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
