"""The worker's side: ``worker()`` (``soup worker``) builds its own Scorer from the recipe, joins the
coordinator's queue study (saying what differs when it finds one for another identity) and evaluates
queued candidates until every run it has seen is done or it has been idle for ``idle_timeout``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soup.soups.cache import ScoreCache, display_url
from soup.errors import SoupError
from soup.progress import Reporter, RichReporter
from soup.workers.queue import _Claims, _open_storage, _Queue, _retrying
from soup.workers.runner import _Runner
from soup.workers.scratch import _Scratch
from soup.workers.settings import POLL_MAX, POLL_MIN, QUEUE_PREFIX, QueueSettings, queue_identity, queue_name, shared_cache

if TYPE_CHECKING:
    from soup.recipe import Recipe
    from soup.soups.scorer import Scorer


@dataclass
class WorkerResult:
    """What a worker did."""

    study: str  # the queue study's name
    evaluated: int  # candidates evaluated (and completed) by this worker
    reason: str  # why it stopped: "done" (every run it saw is done) or "idle" (idle_timeout passed)
    seconds: float


def worker(recipe: str | Path | Recipe | Mapping[str, Any], *, storage: str, devices: Sequence[str] | None = None,
           cache: ScoreCache | str | Path | None = "default", idle_timeout: float = 600.0,
           progress: bool | Reporter = False, endpoint: str | None = None) -> WorkerResult:
    """Join a coordinator's evaluation queue and evaluate candidates until its runs are done.

    Start one on each machine (or GPU) with the recipe the coordinator (``soup run RECIPE --storage
    URL``, or ``cook(..., storage=URL)``) was given: the same ingredients (the same files), evaluator
    and rules name the same queue. Example::

        import soup
        soup.worker("recipe.yaml", storage="postgresql+psycopg://soup@db-host/soup", devices=["cuda:0"])

    Args:
        recipe: a recipe file, a ``Recipe``, or a recipe mapping (its strategy and output are not used).
        storage: the coordinator's optuna storage URL.
        devices: evaluate on these devices concurrently, one evaluator each (default: the recipe's).
        cache: the score cache: "default" (the recipe's; when that is the default, the storage's own
            database, shared by every machine), a path or URL, a ScoreCache, or None for none.
        idle_timeout: stop after this many seconds with nothing to do (also while waiting for the
            coordinator to create the queue).
        progress: progress lines on stderr.
        endpoint: hub endpoint for ``hf://`` ingredients (default: the recipe's).

    Returns:
        WorkerResult: the study, how many candidates this worker evaluated, why it stopped.

    Raises:
        SoupError: a bad recipe, unreachable storage, no queue after ``idle_timeout``; SIGTERM or
            Ctrl-C (``KeyboardInterrupt``) stop it after handing its candidate back.
    """
    from soup.signals import graceful

    if not isinstance(idle_timeout, (int, float)) or isinstance(idle_timeout, bool) or not idle_timeout > 0:
        raise SoupError(f"idle_timeout: {idle_timeout!r} must be a number of seconds > 0")
    if not isinstance(storage, str) or "://" not in storage:
        raise SoupError(f"storage: {storage!r} must be an optuna storage URL (sqlite:///..., postgresql://...)")
    started = time.monotonic()
    reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
    r = _recipe(recipe)
    if r.evaluator is None:
        raise SoupError("evaluator: a worker needs the recipe's evaluator")
    chosen = shared_cache(r.cache if isinstance(cache, str) and cache == "default" else cache, storage)
    with graceful():
        scorer, evs, store = _local_scorer(r, devices, chosen, reporter, endpoint)
        try:
            with _Scratch(reporter) as scratch:
                scorer.scratch = scratch
                queue = _join(storage, scorer, idle_timeout, reporter)
                evaluated, reason = _drain(queue, scorer, idle_timeout, reporter)
        finally:
            for ev in evs:
                ev.close()
            if not isinstance(chosen, ScoreCache):
                store.close()
    return WorkerResult(queue.name, evaluated, reason, time.monotonic() - started)


def _recipe(recipe: Any) -> Recipe:
    from soup.recipe import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe))
    return load_recipe(recipe)


def _local_scorer(r: Recipe, devices: Sequence[str] | None, cache: Any, reporter: Reporter,
                  endpoint: str | None) -> tuple[Scorer, list[Any], ScoreCache]:
    """The worker's own Scorer: the recipe's ingredients, evaluator (one per device), rules, dtype."""
    from soup.hub.precheck import precheck
    from soup.io.ingredients import HubOptions, resolve_all
    from soup.options import check_device
    from soup.soups.factory import make_evaluators
    from soup.engine.rules import parse_rules
    from soup.methods.spec import method_spec
    from soup.soups.scorer import Scorer

    devs = list(devices) if devices else list(r.devices or [])
    for i, d in enumerate(devs):
        check_device(d, where=f"devices[{i}]")
    from soup.registry import has_queries, resolve_ingredients

    if has_queries(r):  # as the coordinator does; a different answer here names another queue (and says so)

        pinned = resolve_ingredients(r)
        r = dataclasses.replace(r, ingredients=[p.spec() for p in pinned], labels=[p.label for p in pinned])
    hub = HubOptions(endpoint=endpoint or r.endpoint)
    specs = precheck(r.ingredients, labels=r.labels, hub=hub, allow_float_mix=r.dtype is not None)
    cks = resolve_all(specs, labels=r.labels, hub=hub)
    store = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
    try:
        evs = make_evaluators(r.evaluator.name, r.evaluator.args, devs or None)
    except BaseException:
        store.close()
        raise
    spec = method_spec(r.method, n=len(cks))  # the coordinator's candidates, byte for byte (soup.pipeline)
    if spec is not None and spec.base is not None:
        spec = dataclasses.replace(spec, base=resolve_all([spec.base], labels=["base"], hub=hub)[0])
    options = {"accumulate": r.accumulate, "strict": r.strict, "method": spec, "normalize": r.normalize,
               "mixed_float": r.mixed_float}
    scorer = Scorer(cks, evs, devices=devs or ["cpu"], cache=store, rules=parse_rules(r.rules), dtype=r.dtype,
                    reporter=reporter, options=options)
    return scorer, evs, store


def _join(url: str, scorer: Scorer, wait: float, reporter: Reporter) -> _Queue:
    """Open the queue study the coordinator created (waiting up to ``wait`` seconds for it)."""
    import optuna

    name = queue_name(scorer)
    plain = _retrying("opening the storage", url, lambda: _open_storage(url))
    deadline = time.monotonic() + wait
    told: set[str] = set()
    while True:
        try:
            study = _retrying(f"loading study {name}", url, lambda: optuna.load_study(study_name=name, storage=plain))
            break
        except KeyError:  # not created yet
            pass
        if not told:
            reporter.step(f"waiting for a coordinator to create study {name} in {display_url(url)}")
            told.add("")
        for line in _mismatches(plain, scorer, told):
            reporter.warn(line)
        if time.monotonic() > deadline:
            raise SoupError(f"no study {name} in {display_url(url)} after {wait:g}s: start `soup run RECIPE "
                            "--storage URL` with the same recipe (same ingredient files, evaluator and rules)")
        time.sleep(POLL_MAX)
    settings = QueueSettings.from_attrs((study.user_attrs.get("soup") or {}).get("settings"))
    plain.remove_session()
    claims = _retrying("creating table soup_claims", url, lambda: _Claims(url))
    storage = _retrying("opening the storage", url, lambda: _open_storage(url, settings, claims))
    study = _retrying(f"loading study {name}", url, lambda: optuna.load_study(study_name=name, storage=storage))
    reporter.step(f"joined study {name} in {display_url(url)} (heartbeat {settings.heartbeat}s, "
                  f"grace {settings.grace}s)")
    return _Queue(url, storage, study, settings, claims)


def _mismatches(storage: Any, scorer: Scorer, told: set[str]) -> list[str]:
    """Why an active queue study of this storage is not ours: what differs (once per study)."""
    ours = queue_identity(scorer)
    lines = []
    try:
        studies = storage.get_all_studies()
    except Exception:
        return []
    for s in studies:
        theirs = (s.user_attrs.get("soup") or {}).get("identity")
        if not s.study_name.startswith(QUEUE_PREFIX) or s.study_name in told or not isinstance(theirs, dict):
            continue
        if not any(isinstance(v, dict) and not v.get("done") for k, v in s.user_attrs.items() if k.startswith("run:")):
            continue
        told.add(s.study_name)
        diffs = _differences(ours, theirs)
        if diffs:
            lines.append(f"study {s.study_name} (a coordinator is running) is for another identity: "
                         + "; ".join(diffs))
    return lines


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    out = []
    a, b = ours.get("ingredients", []), theirs.get("ingredients", [])
    if len(a) != len(b):
        out.append(f"{len(a)} ingredients here, {len(b)} there")
    for x, y in zip(a, b):
        if x.get("fingerprint") != y.get("fingerprint"):
            out.append(f"ingredient {x.get('label')} differs from the coordinator's {y.get('label')} (fingerprint "
                       f"{str(x.get('fingerprint'))[:12]} here, {str(y.get('fingerprint'))[:12]} there: the same "
                       "files are needed, e.g. a shared filesystem or copies keeping their times, rsync -a)")
    for field in ("evaluator", "rules", "dtype"):
        if ours.get(field) != theirs.get(field):
            out.append(f"{field}: {json.dumps(ours.get(field), sort_keys=True)} here, "
                       f"{json.dumps(theirs.get(field), sort_keys=True)} there")
    return out


def _drain(queue: _Queue, scorer: Scorer, idle_timeout: float, reporter: Reporter) -> tuple[int, str]:
    """Evaluate queued candidates until every run seen is done, or ``idle_timeout`` passes idle."""
    runner = _Runner(queue, scorer, reporter)
    seen: set[str] = set()
    last = time.monotonic()
    pause = POLL_MIN
    last_stale = 0.0
    try:
        while True:
            if time.monotonic() - last_stale >= queue.settings.heartbeat:
                queue.fail_stale()
                last_stale = time.monotonic()
            if runner.step():
                last, pause = time.monotonic(), POLL_MIN
                continue
            if runner.busy:  # evaluations in other threads
                time.sleep(POLL_MIN)
                continue
            runs = queue.runs()
            active = {rid for rid, run in runs.items() if not run.get("done")}
            if active:
                seen |= active
            elif seen and not queue.waiting():
                reporter.step(f"every run of study {queue.name} is done; {runner.evaluated} candidate(s) "
                              "evaluated here")
                return runner.evaluated, "done"
            if time.monotonic() - last > idle_timeout:
                reporter.step(f"nothing to do for {idle_timeout:g}s; {runner.evaluated} candidate(s) evaluated here")
                return runner.evaluated, "idle"
            time.sleep(pause)
            pause = min(POLL_MAX, pause * 1.5)
    finally:
        runner.close()
        queue.close()
