"""Weight search (strategy ``search``): an optuna study over the ingredients' mixing weights.

Each trial suggests one weight in [0, 1] per ingredient for the ``global`` vector and, per entry of
``groups`` (``{name: glob pattern}``), one more vector for the tensors matching that pattern; each
vector is normalised to sum to 1 (all zero: uniform). With merge methods (``soup.methods``) a trial
also chooses the method among ``methods`` (``[linear, ties, dare_ties]``: the recipe compares them)
and the values of the method parameters named in ``params`` (``{density: [0.2, 1.0], lambda: [0.5,
1.5]}``: each in its range, for the methods that have it), so weights, methods and their parameters
are searched together; the run's ``method:`` (its base and seed) is the default and the base for all. Candidates are scored by the evaluator in its
declared direction, ``scorer.parallelism`` at a time through optuna's ask/tell interface: the study
lives here, the scorer spreads the evaluations over devices (or workers). The soup is the best
trial's weights, written by the engine like any other soup.

Seeds are enqueued before the sampler proposes anything, so the search never ends worse than them on
the selection evaluator: the best single ingredient, the uniform soup and, when every greedy
candidate's score is already in the score cache, the greedy soup's pool. They run even when
``n_trials`` is smaller or ``timeout`` has passed.

Racing (``racing``, on by default for evaluators with per-example scores, one evaluator here): each
trial is raced against the best COMPLETE trial on shared examples and told PRUNED once it is surely
worse (``soup.soups.pruning``); ``n_trials`` counts COMPLETE and PRUNED trials.

Resume: the study lives in ``scorer.storage`` (``cook`` sets an sqlite file beside the output, or
the ``--storage`` URL) under a name derived from the run (ingredients, evaluator, rules, dtype and
the options other than the budget), so re-running a killed run continues it: ``n_trials`` counts
COMPLETE trials, interrupted trials are re-enqueued with their weights, and the score cache returns
what had finished. Samplers: ``tpe`` (default), ``cmaes`` (needs ``cmaes``), ``gp`` (needs
``scipy`` and ``torch``), ``random``. Reference: Akiba et al. 2019, arXiv:1907.10902.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from soup.soups.cache import evaluator_key
from soup.errors import RecipeError, SoupError
from soup.soups.evaluate import Score
from soup.soups.pruning import Best, race_trial
from soup.soups.racing import Racing, parse_racing
from soup.engine.rules import match_rule
from soup.soups.scorer import Scorer
from soup.soups.strategies import Choice, SoupStrategy

__all__ = ["SearchSoup"]

SAMPLERS = {"tpe": (), "cmaes": ("cmaes",), "gp": ("scipy", "torch"), "random": ()}  # name -> packages needed
GLOBAL = "global"  # the vector for the tensors no group matches
HEARTBEAT_S = 30  # shared storages: a trial without a heartbeat for 3x this long is retried by the next run


@dataclass
class SearchSoup(SoupStrategy):
    n_trials: int = 50  # COMPLETE trials to reach (a resumed study's count; the seeds always run)
    timeout: float | None = None  # seconds: then the sampler proposes no more trials (the seeds still run)
    sampler: str = "tpe"  # tpe | cmaes | gp | random
    groups: dict[str, str] | None = None  # group name -> glob pattern: those tensors get their own weights
    seed: int | None = 0  # the sampler's seed (None: not reproducible)
    methods: list[str] | None = None  # merge methods to compare (default: the run's method)
    params: dict[str, list[float]] | None = None  # method parameter -> [low, high] searched with the weights
    racing: Any = True  # race each trial against the best on shared examples, pruned once surely worse

    name: ClassVar[str] = "search"
    reference: ClassVar[str] = "https://arxiv.org/abs/1907.10902"

    def __post_init__(self) -> None:
        n, t, seed = self.n_trials, self.timeout, self.seed
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecipeError(f"strategy.n_trials: {n!r} must be a whole number >= 1")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise RecipeError(f"strategy.timeout: {t!r} must be a number of seconds > 0 (or null)")
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise RecipeError(f"strategy.sampler: {self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        missing = [p for p in SAMPLERS[self.sampler] if importlib.util.find_spec(p) is None]
        if missing:
            raise RecipeError(f"strategy.sampler: {self.sampler} needs the {' and '.join(missing)} package "
                              f"(pip install {' '.join(missing)})")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RecipeError(f"strategy.seed: {seed!r} must be a whole number (or null)")
        if self.groups is not None:
            if not isinstance(self.groups, dict) or not self.groups:
                raise RecipeError(f"strategy.groups: {self.groups!r} must be a mapping {{name: glob pattern}}")
            for k, v in self.groups.items():
                if not isinstance(k, str) or not k or "." in k or k == GLOBAL:
                    raise RecipeError(f"strategy.groups: {k!r} must be a name without dots, other than {GLOBAL!r}")
                if not isinstance(v, str) or not v:
                    raise RecipeError(f"strategy.groups.{k}: {v!r} must be a glob pattern")
            if len(set(self.groups.values())) < len(self.groups):
                raise RecipeError("strategy.groups: two groups have the same pattern")
        self._check_methods()
        self._racing: Racing | None = parse_racing(self.racing)
        self.racing = self._racing.to_dict() if self._racing is not None else False  # as the manifest records it

    def _check_methods(self) -> None:
        from soup.methods.registry import load_method

        if self.methods is not None:
            if not isinstance(self.methods, list) or not self.methods or not all(isinstance(m, str) for m in self.methods):
                raise RecipeError(f"strategy.methods: {self.methods!r} must be a list of merge method names")
            if len(set(self.methods)) < len(self.methods):
                raise RecipeError("strategy.methods: a method is listed twice")
            for m in self.methods:
                try:
                    load_method(m)
                except RecipeError as e:
                    raise RecipeError(f"strategy.methods: {e}") from None
        if self.params is not None:
            if not isinstance(self.params, dict) or not self.params:
                raise RecipeError(f"strategy.params: {self.params!r} must be a mapping {{parameter: [low, high]}}")
            for k, v in self.params.items():
                ok = isinstance(v, list) and len(v) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                if not ok or v[0] >= v[1]:
                    raise RecipeError(f"strategy.params.{k}: {v!r} must be [low, high] with low < high")

    def _method_names(self, scorer: Scorer) -> list[str] | None:
        """The methods a trial chooses from, checked against the run before anything is evaluated."""
        from soup.methods.registry import load_method

        run = scorer.options.get("method") if isinstance(scorer, Scorer) else None
        names = list(self.methods) if self.methods else ([run.name] if run is not None else None)
        if self.params and not names:
            raise RecipeError("strategy.params: method parameters are searched for a merge method: give the "
                              "recipe a method: or the strategy methods: [...]")
        for name in names or []:
            m = load_method(name)
            if m.needs_base and (run is None or run.base is None):
                raise RecipeError(f"strategy.methods: {name} needs a base model (method: {{name: ..., base: PATH}})")
        for p in self.params or {}:
            if not any(p in load_method(n).parameters for n in names):
                raise RecipeError(f"strategy.params.{p}: none of {', '.join(names)} has this parameter")
        return names

    def _method(self, params: Mapping[str, Any], names: list[str] | None) -> dict[str, Any] | None:
        """A trial's merge method: its name and the searched parameter values it has."""
        if not names:
            return None
        name = params.get("method", names[0])
        chosen = {k.removeprefix("param."): v for k, v in params.items() if k.startswith("param.")}
        return {"name": name, **chosen}

    def check(self, n: int) -> None:
        if self.sampler == "cmaes" and n * (1 + len(self.groups or {})) < 2:
            raise RecipeError("strategy.sampler: cmaes needs at least 2 weights to search (1 ingredient, no groups)")

    def choose(self, scorer: Scorer | None, n: int) -> Choice:
        import optuna

        self.check(n)
        self._check_groups(scorer)
        names = self._method_names(scorer)  # before anything is evaluated
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
                study, storage = self._open(scorer, optuna)  # a bad storage fails before any evaluation
                try:
                    if self._racing is not None and scorer.example_count() is not None:
                        ranking = scorer.race_ingredients(self._racing, top=1)  # the best one alone is needed
                        values = [x.value if x is not None else None for x in ranking.scores]
                        self._seed(study, scorer, ranking.order[0], None)
                    else:
                        scores = scorer.score_ingredients()
                        values = [x.value for x in scores]
                        self._seed(study, scorer, scorer.rank(scores)[0], scores)
                    self._run(study, storage, scorer, optuna.trial.TrialState, names)
                    if scorer.example_count() is not None:
                        scorer.reporter.step(scorer.examples_line())
                    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                finally:
                    if storage is not None:
                        storage.remove_session()
        finally:
            optuna.logging.set_verbosity(verbosity)
        trials = sorted(trials, key=lambda t: t.number)
        best = trials[scorer.rank([t.value for t in trials])[0]]
        weights, groups = self._weights(best.params, scorer.labels)
        trajectory, top = [], None
        for t in trials:
            kept = top is None or scorer.better(t.value, top)  # the best so far
            top = t.value if kept else top
            trajectory.append({"step": t.number + 1, "tried": _name(t.number), "score": t.value, "kept": kept})
        soup = Score(best.value, dict(best.user_attrs.get("metrics") or {"score": best.value}),
                     best.user_attrs.get("primary", "score"))
        kept = [weights[i] > 0 or any(g[i] > 0 for g in groups.values()) for i in range(n)]
        return Choice(weights, values, trajectory, soup, kept, groups,
                      method=self._method(best.params, names))

    def _check_groups(self, scorer: Scorer) -> None:
        """Each group must weigh some tensor that the run's rules and the earlier groups leave to it."""
        free = [t for t in scorer.checkpoints[0].tensors if match_rule(scorer.rules, t) is None]
        for name, pattern in (self.groups or {}).items():
            mine = {t for t in free if fnmatchcase(t, pattern)}
            if not mine:
                raise RecipeError(f"strategy.groups.{name}: {pattern!r} matches no tensor left to it "
                                  "(by the rules and the groups before it)")
            free = [t for t in free if t not in mine]

    # ---- the study -------------------------------------------------------------------------------

    def _open(self, scorer: Scorer, optuna: Any) -> tuple[Any, Any]:
        """The run's study (created, or loaded to resume) and its RDB storage (None: in memory).
        Trials a killed run left RUNNING are failed and re-enqueued with their weights."""
        storage, shared = None, bool(scorer.storage) and scorer.shared
        if scorer.storage:
            beats = dict(heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                         heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
            try:
                storage = optuna.storages.RDBStorage(scorer.storage, **(beats if shared else {}))
            except Exception as e:  # the URL may hold a password: not repeated
                raise SoupError(f"storage: cannot open the optuna storage ({type(e).__name__})") from None
        study = optuna.create_study(storage=storage, study_name=self._study_name(scorer), direction=scorer.direction,
                                    sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
        # a resumed study's sampler must not replay the first run's proposals: its seed moves on
        study.sampler = self._sampler(optuna, None if self.seed is None else self.seed + len(study.trials))
        if shared:  # other coordinators may be running: only heartbeat-stale trials are theirs no more
            optuna.storages.fail_stale_trials(study)
        else:  # the output's lock makes this run the study's only user: every RUNNING trial is orphaned
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                if t.params:
                    study.enqueue_trial(dict(t.params))
        return study, storage

    def _study_name(self, scorer: Scorer) -> str:
        """Deterministic from the run, so a re-run finds its study; the budget is left out (it may grow)."""
        run = {"ingredients": [c.fingerprint for c in scorer.checkpoints], "labels": list(scorer.labels),
               "evaluator": scorer.identity, "rules": [r.to_dict() for r in scorer.rules], "dtype": scorer.dtype,
               "options": {k: v for k, v in self.options().items() if k not in ("n_trials", "timeout", "racing")}}
        return "soup-search-" + hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _sampler(self, optuna: Any, seed: int | None) -> Any:
        s = optuna.samplers  # tpe: multivariate, as the weights interact (they are normalised together)
        return {"tpe": lambda: s.TPESampler(seed=seed, multivariate=True, constant_liar=True),
                "cmaes": lambda: s.CmaEsSampler(seed=seed), "gp": lambda: s.GPSampler(seed=seed),
                "random": lambda: s.RandomSampler(seed=seed)}[self.sampler]()

    def _seed(self, study: Any, scorer: Scorer, best: int, scores: Sequence[Score] | None) -> None:
        """Enqueue the best single ingredient, the uniform soup and the cached greedy pool (once per study;
        the pool needs every ingredient's full score: not when their ranking was raced)."""
        labels = scorer.labels
        greedy = _greedy_pool(scorer, scores) if scores is not None else None
        for pool in ([best], list(range(len(labels))), greedy):
            if pool:
                params = {f"{v}.{lab}": float(i in pool) for v in self._vectors() for i, lab in enumerate(labels)}
                study.enqueue_trial(params, skip_if_exists=True)

    def _vectors(self) -> list[str]:
        return [GLOBAL, *(self.groups or {})]

    def _run(self, study: Any, storage: Any, scorer: Scorer, TrialState: Any, names: list[str] | None = None) -> None:
        """Ask, score and tell, ``scorer.parallelism`` trials at a time, until ``n_trials`` are COMPLETE
        and every enqueued trial has run (after ``timeout``: only the enqueued ones). A resumed study's
        finished trials join this run's history first when their scores are cached (free)."""
        start, labels, vectors = time.monotonic(), scorer.labels, self._vectors()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            weights, groups = self._weights(t.params, labels)
            method = self._method(t.params, names)
            if _cached(scorer, weights, groups, method) is not None:
                scorer.score(weights, _name(t.number), groups=groups or None, method=method)
        racing = self._racing if self._racing is not None and scorer.example_count() is not None else None
        while True:  # pruned trials count as finished: they spent (part of) an evaluation
            complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            timed_out = self.timeout is not None and time.monotonic() - start >= self.timeout
            remaining = waiting if timed_out else max(self.n_trials - complete, waiting)  # seeds always run
            if remaining <= 0:
                return
            batch: list[Any] = []
            try:
                for _ in range(min(max(1, scorer.parallelism), remaining)):  # 0 live workers: still one
                    trial = study.ask()
                    batch.append(trial)
                    for v in vectors:
                        for lab in labels:
                            trial.suggest_float(f"{v}.{lab}", 0.0, 1.0)
                    self._suggest_method(trial, names)
                candidates = [(*self._weights(t.params, labels), _name(t.number), self._method(t.params, names))
                              for t in batch]
                steps = [f"{name} ({complete + k + 1}/{self.n_trials})" for k, (_, _, name, _) in enumerate(candidates)]
                best = self._best(study, TrialState, labels, names) if racing is not None else None
                with _heartbeat(storage, study.study_name, [t.number for t in batch]):
                    if best is None:
                        results = scorer.score_many([(w, name, g or None, m) for w, g, name, m in candidates],
                                                    steps=steps)
                    else:  # one evaluator here (racing needs it): one trial at a time, raced against the best
                        results = []
                        for t, (w, g, name, m), step in zip(batch, candidates, steps):
                            scorer.reporter.step(step)
                            results.append(race_trial(scorer, t, (w, g, m), name, best, racing))
            except BaseException:  # the batch is retried first by the next run (finished scores are cached)
                for t in batch:
                    try:
                        study.tell(t, state=TrialState.FAIL)
                        study.enqueue_trial(dict(t.params))
                    except Exception:
                        pass
                raise
            for t, s in zip(batch, results):
                if s is None:  # surely worse than the best: pruned (its intermediate value was reported)
                    study.tell(t, state=TrialState.PRUNED)
                    continue
                t.set_user_attr("metrics", dict(s.metrics))
                t.set_user_attr("primary", s.primary)
                study.tell(t, s.value)

    def _best(self, study: Any, TrialState: Any, labels: Sequence[str], names: list[str] | None) -> Best | None:
        """The best COMPLETE trial so far (None: none yet, the first trials run whole)."""
        done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        if not done:
            return None
        sign = 1.0 if study.direction.name == "MAXIMIZE" else -1.0
        top = max(done, key=lambda t: (sign * t.value, -t.number))  # ties: the earliest, as ``choose`` ranks
        weights, groups = self._weights(top.params, labels)
        score = Score(top.value, dict(top.user_attrs.get("metrics") or {"score": top.value}),
                      top.user_attrs.get("primary", "score"))
        return Best(weights, groups, self._method(top.params, names), score, _name(top.number))

    def _suggest_method(self, trial: Any, names: list[str] | None) -> None:
        """The trial's method (when several are compared) and the searched parameters it has."""
        from soup.methods.registry import load_method

        if not names:
            return
        name = trial.suggest_categorical("method", names) if len(names) > 1 else names[0]
        known = load_method(name).parameters
        for p, (low, high) in (self.params or {}).items():
            if p in known:
                trial.suggest_float(f"param.{p}", float(low), float(high))

    def _weights(self, params: Mapping[str, float], labels: Sequence[str]) -> tuple[list[float], dict[str, list]]:
        """A trial's normalised global weights and per-pattern group weights (a group with the global
        weights is left out: it changes nothing, and the soup then shares the plain soup's cache key)."""
        weights = _normalise([params[f"{GLOBAL}.{lab}"] for lab in labels])
        groups = {}
        for name, pattern in (self.groups or {}).items():
            w = _normalise([params[f"{name}.{lab}"] for lab in labels])
            if w != weights:
                groups[pattern] = w
        return weights, groups


def _normalise(x: Sequence[float]) -> list[float]:
    total = sum(x)
    return [v / total for v in x] if total > 0 else [1.0 / len(x)] * len(x)


def _name(number: int) -> str:
    return f"search trial {number + 1}"


def _cached(scorer: Scorer, weights: Sequence[float], groups: Mapping[str, list] | None = None,
            method: Mapping[str, Any] | None = None) -> Score | None:
    """The score cache's entry for a soup: a peek, nothing is evaluated or recorded."""
    return scorer.cache.get(evaluator_key(scorer.identity), scorer.key(weights, groups or None, method))


def _greedy_pool(scorer: Scorer, scores: Sequence[Score]) -> list[int] | None:
    """The greedy soup's pool (tie ">=") when every greedy candidate's score is cached, else None."""
    order, n = scorer.rank(scores), len(scores)
    pool, best = [order[0]], scores[order[0]].value
    for i in order[1:]:
        hit = _cached(scorer, [1.0 / (len(pool) + 1) if j in pool or j == i else 0.0 for j in range(n)])
        if hit is None:
            return None
        if not scorer.better(best, hit.value):
            pool, best = pool + [i], hit.value
    return pool if len(pool) > 1 else None


@contextmanager
def _heartbeat(storage: Any, study_name: str, numbers: Sequence[int]) -> Iterator[None]:
    """While a batch is evaluated, mark its trials alive (storages with heartbeats: shared ones)."""
    if storage is None or storage.get_heartbeat_interval() is None:
        yield
        return
    sid = storage.get_study_id_from_name(study_name)
    ids = [storage.get_trial_id_from_study_id_trial_number(sid, k) for k in numbers]
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                for i in ids:
                    storage.record_heartbeat(i)
            except Exception:  # a storage hiccup: try again next time
                pass
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="soup-search-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
