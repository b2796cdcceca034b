"""Cooking a soup: ingredients -> evaluate -> strategy weights -> merge -> report.

``cook`` is the one pipeline behind ``soup run RECIPE`` and the Python API
(``maximum_soup``, ``average_soup``, ``greedy_soup``), e.g. at the end of a training script::

    import soup
    result = soup.greedy_soup(["runs/ft-a", "runs/ft-b", "runs/ft-c"], evaluator=my_eval, out="runs/soup")
    print(result.weights, result.soup_score)
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soup.soups.scorer import Scorer, merge_arguments
from soup.soups.cache import ScoreCache
from soup.soups.evaluate import Evaluator, Score
from soup.soups.factory import EvaluatorSpec, make_evaluators
from soup.io.ingredients import HubOptions, IngredientSpec, resolve_all
from soup.errors import RecipeError
from soup.io.manifest import Evaluation, EvaluatorInfo, Manifest, Method, Selection, Step, TestEvaluation, Trial, jsonable
from soup.merging import merge
from soup.cook_options import EvaluationOptions, OutputOptions, PublishOptions, keywords, split_options
from soup.options import MergeOptions, check_device, check_option_names
from soup.engine.plan import build_plan, normalise_weights
from soup.io.vocab import plan_vocab
from soup.engine.output import OutputDir, checkpoint_paths, input_paths
from soup.progress import Reporter, RichReporter
from soup.engine.rules import Rule, parse_rules
from soup.methods.spec import method_spec
from soup.signals import graceful
from soup.soups.strategies import AverageSoup, Choice, GreedySoup, MaximumSoup, SoupStrategy

__all__ = ["SoupResult", "cook", "maximum_soup", "average_soup", "greedy_soup", "search_soup"]



@dataclass
class SoupResult:
    """A finished soup: weights, the evidence, and where it is (folder or state dict)."""

    weights: dict[str, float]  # ingredient label -> weight
    scores: dict[str, float | None]  # ingredient label -> selection score
    trajectory: list[dict[str, Any]]
    soup_score: Score | None
    test_score: Score | None = None
    test_scores: dict[str, float] = field(default_factory=dict)  # ingredient label -> test score
    path: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    manifest: Manifest | None = None  # what soup.json records (also for an in-memory soup)
    push: Any = None  # the hub PushResult, when pushed
    registered: str | None = None  # models:/NAME/N, when registered in MLflow (recipe ``publish``)


def cook(
    strategy: SoupStrategy,
    ingredients: Sequence[IngredientSpec],
    *,
    evaluation: EvaluationOptions | None = None,
    output: OutputOptions | str | Path | None = None,
    publishing: PublishOptions | None = None,
    labels: Sequence[str | None] | None = None,
    rules: Sequence[Any] = (),
    dtype: str | None = None,
    progress: bool | Reporter = False,
    **options: Any,
) -> SoupResult:
    """Evaluate, choose weights with ``strategy``, and merge.

    Args:
        strategy: a SoupStrategy (MaximumSoup, AverageSoup, GreedySoup, SearchSoup or a plug-in).
        ingredients: folders, files, ``hf://`` repos or state dicts.
        evaluation: who scores candidates and where (``soup.cook_options.EvaluationOptions``: ``evaluator`` —
            an entry-point name, ``module:Class``, ``file.py:Class``, an Evaluator, or a function
            ``fn(candidate) -> float`` — with ``evaluator_args``; ``test_evaluator``/``test_args``, for
            the report only; the score ``cache``; ``devices``; an optuna ``storage`` shared with
            ``soup worker`` processes, and ``local_worker``).
        output: a folder path or an ``OutputOptions`` (``path``, ``overwrite``, ``return_state_dict``,
            ``protect``); no path: the soup is returned in memory (``result.state_dict``).
        publishing: a ``PublishOptions`` (``push_to``: ``"owner/name"`` or ``{repo, revision, private,
            create_pr, commit_message}``, uploaded while the soup is written, then one commit;
            ``hub``: HubOptions; ``recipe``: recorded in ``soup.json``).
        options: those objects' fields one by one, as the Python soups pass them (``evaluator=``,
            ``cache=``, ``overwrite=``, ``push_to=``...; ``out=`` is ``output``'s older name), and the
            merge options passed to ``merge`` (shard_size, accumulate, config_from, method, ...).

    With a ``storage``, the default ``cache`` is the storage's own database (shared scores); without
    one, strategies that keep a study (search) use an sqlite file beside the output
    (``.NAME.soup-study.sqlite``), so a killed run resumes.

    Raises:
        SoupError: bad inputs, a failing evaluator (scores computed so far stay in the cache).
    """
    from soup.adapters.peft_io import is_adapter

    merge_options = dict(options)
    ev, out_opts, pub = split_options(merge_options, evaluation=evaluation, output=output, publishing=publishing)
    out = out_opts.path
    if any(map(is_adapter, ingredients)):  # PEFT adapters: candidates are adapters (soup.adapters.candidates)
        unsupported = dict(test_evaluator=ev.test_evaluator, push_to=pub.push_to, storage=ev.storage,
                           devices=ev.devices, rules=rules or None, return_state_dict=out_opts.return_state_dict or None)
        given = sorted(k for k, v in unsupported.items() if v is not None)
        if given:
            raise RecipeError(f"adapter soups: {', '.join(given)} not supported")
        return _adapter_cook(strategy, ingredients, evaluator=ev.evaluator, evaluator_args=ev.evaluator_args,
                             out=out, labels=labels, dtype=dtype, cache=ev.cache, progress=progress, hub=pub.hub,
                             overwrite=out_opts.overwrite, **merge_options)
    evaluator, evaluator_args, test_evaluator, test_args = ev.evaluator, ev.evaluator_args, ev.test_evaluator, ev.test_args
    cache, devices, storage, local_worker = ev.cache, ev.devices, ev.storage, ev.local_worker
    push_to, hub, recipe, protect, return_state_dict = pub.push_to, pub.hub, pub.recipe, out_opts.protect, \
        out_opts.return_state_dict
    _method(merge_options, len(ingredients))  # a merge method and its parameters, checked now
    _check_options(strategy, dtype, devices, merge_options)  # before anything is opened or read
    if storage is not None:
        from soup.workers import QueueSettings

        QueueSettings.from_env()  # a bad SOUP_HEARTBEAT_* is refused before any work
    # the output is checked and locked before anything is opened (the cache too); candidates live beside it
    spec = merge_options["method"]
    bases = [spec.base] if spec is not None and spec.base is not None else []
    output = OutputDir(out, overwrite=out_opts.overwrite,
                       protect=input_paths([*ingredients, *bases]) + [Path(p) for p in protect]
                       + _db_files(storage, cache)) \
        if out is not None else None
    reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
    from soup.workers import shared_cache

    cache = shared_cache(cache, storage)  # with a shared storage, "default" is the storage's own database
    store = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
    rule_list = parse_rules(rules)
    evs, tests = make_evaluators(evaluator, evaluator_args or {}, devices), make_evaluators(test_evaluator, test_args or {}, None)
    if strategy.needs_evaluator and not evs:
        raise RecipeError(f"strategy {strategy.name} needs an evaluator")
    from soup.hub.publisher import Publisher

    publisher = Publisher({"repo": push_to} if isinstance(push_to, str) else push_to,
                          endpoint=hub.endpoint if hub else None)
    with graceful():
        try:
            if output is not None:
                output.lock(warn=reporter.warn)
            return _cook(strategy, ingredients, output, publisher, evs, tests, store, rule_list, reporter,
                         labels=labels, dtype=dtype, devices=devices, hub=hub, recipe=recipe,
                         return_state_dict=return_state_dict, merge_options=merge_options, storage=storage,
                         local_worker=local_worker)
        finally:
            publisher.close()
            for ev in evs + tests:
                ev.close()
            if not isinstance(cache, ScoreCache):
                store.close()
            if output is not None:
                output.release()


def _cook(strategy: SoupStrategy, ingredients: Sequence[IngredientSpec], output: OutputDir | None,
          publisher: Any, evs: list[Evaluator], tests: list[Evaluator], store: ScoreCache, rule_list: list[Any],
          reporter: Reporter, *, labels, dtype, devices, hub, recipe, return_state_dict,
          merge_options: Mapping[str, Any], storage: str | None = None, local_worker: bool = True) -> SoupResult:
    """The body of ``cook`` once the output (if any) is checked and locked."""
    out = output.dest if output is not None else None
    publisher.start()  # fail fast on a bad token, before any evaluation
    from soup.hub.precheck import precheck

    # hub ingredients are checked from their headers before anything is downloaded (as in merge)
    specs = precheck(ingredients, labels=labels, hub=hub,
                     allow_float_mix=dtype is not None or bool(merge_options.get("mixed_float")))
    cks = resolve_all(specs, labels=labels, hub=hub)
    spec = merge_options.get("method")
    if spec is not None and spec.base is not None:  # read once; every candidate uses this checkpoint
        spec = dataclasses.replace(spec, base=resolve_all([spec.base], labels=["base"], hub=hub)[0])
        merge_options = dict(merge_options, method=spec)
    _check_plan(strategy, cks, rule_list, dtype, merge_options)  # plan errors before the first evaluation
    if output is not None:
        output.protect(checkpoint_paths(cks + ([spec.base] if spec is not None and spec.base is not None else [])))
    scratch = output.work_dir() if output is not None else None
    options = {k: merge_options[k] for k in BYTES if k in merge_options}
    common = dict(cache=store, rules=rule_list, dtype=dtype, reporter=reporter, options=options)
    study = storage or (_study_storage(output) if output is not None else None)
    make_queue = None
    if storage is not None:  # evaluations go through a queue that `soup worker` processes share
        from soup.workers import EvaluationQueue

        def make_queue(s: Scorer) -> EvaluationQueue:
            return EvaluationQueue(storage, s, local_worker=local_worker)
    scorer = Scorer(cks, evs, devices=devices or ["cpu"], scratch=scratch, storage=study, queue=make_queue,
                    **common) if evs else None
    try:
        choice = strategy.choose(scorer, len(cks))
    finally:
        if scorer is not None:
            scorer.close()  # a shared queue is marked done: its workers stop once idle
    # the run's rules, then the strategy's per-group weights (as the scorer built its candidates)
    final_rules = list(rule_list) + [Rule(p, "weights", weights=tuple(w)) for p, w in choice.groups.items()]
    test_scorer = Scorer(cks, tests, scratch=scratch, **common) if tests else None
    test_score, test_scores = None, {}
    if test_scorer is not None:
        test_scores = {ck.label: s.value for ck, s in zip(cks, test_scorer.score_ingredients("testing ingredient"))}
        reporter.step("testing the soup")
        test_score = test_scorer.score(choice.weights, f"{strategy.name} soup", groups=choice.groups,
                                       method=choice.method)
    evaluation = _evaluation(choice, scorer, test_scorer, test_score)
    shown = choice.weights  # as the merge applies them: normalised unless normalize=False
    if merge_options.get("normalize", True) and sum(choice.weights) > 0 and min(choice.weights) >= 0:
        shown = list(normalise_weights(choice.weights, len(cks)))
    result = SoupResult({c.label: w for c, w in zip(cks, shown)},
                        {c.label: s for c, s in zip(cks, choice.scores)}, choice.trajectory,
                        choice.soup_score, test_score, test_scores)

    rest = {k: v for k, v in merge_options.items() if k not in BYTES}
    if choice.method is not None:  # the strategy chose the method too (search): the soup is made with it
        options = (scorer or test_scorer).options_for(choice.method)
    # what soup.json records beside the engine's part; merge builds the manifest from it (plot, card too)
    selection = Selection(Method(strategy.name, getattr(strategy, "reference", None) or None, jsonable(strategy.options())),
                          evaluation, choice.kept, jsonable(dict(recipe)) if recipe else None)
    for ck in cks:  # before the final merge: an ingredient rewritten during the evaluations stops the run
        ck.verify("the soup was not written")
    if out is not None:
        reporter.step(f"merging {sum(1 for w in choice.weights if w)} ingredient(s) into {out}")
        m = merge(cks, output, rules=final_rules, dtype=dtype, progress=reporter, selection=selection,
                  on_shard=publisher.on_shard, **rest, **merge_arguments(choice.weights, options))
        result.path, result.manifest = m.path, m.manifest
        if publisher.target:
            reporter.step(f"pushing to {publisher.target['repo']}")
            result.push = publisher.finish(m.path)
    if return_state_dict or out is None:
        m = merge(cks, None, rules=final_rules, dtype=dtype, selection=selection,
                  device=merge_options.get("device", "cpu"), **merge_arguments(choice.weights, options))
        result.state_dict = m.state_dict
        result.manifest = result.manifest or m.manifest
    return result


MERGE_THROUGH = ("accumulate", "shard_size", "device", "strict", "config_from", "normalize", "mixed_float",
                 "method", "base", "seed", "vocab")  # merge options that cook passes on to ``merge``
BYTES = ("accumulate", "normalize", "mixed_float", "strict", "method", "vocab")  # those every candidate gets too


def _check_options(strategy: SoupStrategy, dtype: str | None, devices: Sequence[str] | None,
                   merge_options: Mapping[str, Any]) -> MergeOptions:
    """Unknown option names and bad values are RecipeErrors, raised before any work."""
    import inspect

    own = [p.name for p in inspect.signature(cook).parameters.values() if p.kind is p.KEYWORD_ONLY]
    check_option_names(merge_options, [*own, *MERGE_THROUGH, *keywords()], where=f"{strategy.name}_soup")
    for i, d in enumerate(devices or ()):
        check_device(d, where=f"devices[{i}]")
    return MergeOptions(dtype=dtype, **{k: v for k, v in merge_options.items()
                                        if k not in ("overwrite", "method", "base", "seed")})


def _method(merge_options: dict[str, Any], n: int) -> None:
    """``method``/``base``/``seed`` checked before any work and replaced by one ``MethodSpec`` (or None)."""
    spec = method_spec(merge_options.pop("method", None), n=n, base=merge_options.pop("base", None),
                       seed=merge_options.pop("seed", None))
    merge_options["method"] = spec


def _check_plan(strategy: SoupStrategy, cks: Sequence[Any], rules: Sequence[Any], dtype: str | None,
                merge_options: Mapping[str, Any]) -> None:
    """What needs the tensor tables (rules, compatibility, p, config_from), checked before evaluating."""
    opts = _check_options(strategy, dtype, None, merge_options)
    strategy.check(len(cks))
    spec = merge_options.get("method")
    with_base = spec is not None and spec.base is not None
    opts.check_config_from([c.label for c in cks], base=with_base)
    every = cks + ([spec.base] if with_base else [])
    build_plan(every, rules=rules, dtype=opts.torch_dtype, normalize=opts.normalize, mixed_float=opts.mixed_float,
               method=spec, base=with_base, vocab=plan_vocab(every, opts.vocab, n=len(cks)))


def _db_files(storage: str | None, cache: Any) -> list[Path]:
    """The sqlite files of a storage URL and a cache URL: the output keeps clear of them too."""
    from soup.soups.cache import db_file

    return [p for p in (db_file(storage), db_file(cache) if isinstance(cache, str) and "://" in cache else None)
            if p is not None]


def _study_storage(output: OutputDir) -> str:
    """The embedded default study storage: an sqlite file beside the output (kept between runs)."""
    return f"sqlite:///{output.dest.parent / f'.{output.dest.name}.soup-study.sqlite'}"


def _evaluation(choice: Choice, scorer: Scorer | None, test: Scorer | None,
                test_score: Score | None) -> Evaluation | None:
    """The evaluation record for soup.json: every evaluation of both scorers in order, greedy's trajectory,
    the soup's validation and test scores (per-ingredient scores are read from the histories)."""
    if scorer is None and test is None:
        return None
    test_record = None
    if test is not None:
        test_record = TestEvaluation(EvaluatorInfo.from_identity(test.identity), test.direction,
                                     test_score.value if test_score else None,
                                     dict(test_score.metrics) if test_score else None, _history(test))
    if scorer is None:
        return Evaluation(test=test_record)
    soup = choice.soup_score
    raced = any(r.get("of") is not None for r in scorer.records)  # per-example scores: the run's accounting
    examples = {"evaluated": scorer.examples_evaluated, "full": scorer.examples_full} if raced else None
    return Evaluation(EvaluatorInfo.from_identity(scorer.identity), scorer.direction,
                      soup.value if soup else None, dict(soup.metrics) if soup else None, _history(scorer),
                      trajectory=[_step(k, t) for k, t in enumerate(choice.trajectory)], test=test_record,
                      examples=examples)


def _history(scorer: Scorer) -> list[Trial]:
    return [Trial(r["candidate"], dict(r["weights"]), r["score"], dict(r.get("metrics") or {}), bool(r["cached"]),
                  examples=r.get("examples"), of=r.get("of"), stopped=r.get("stopped"))
            for r in scorer.records]


def _step(k: int, t: Mapping[str, Any]) -> Step:
    """A trajectory step from a strategy's dict (a plug-in's missing keys get neutral values)."""
    raced = {key: t.get(key) for key in ("examples", "of", "stopped") if t.get(key) is not None}
    return Step(int(t.get("step", k + 1)), str(t.get("tried", "?")), float(t.get("score", float("nan"))),
                bool(t.get("kept", False)), [str(p) for p in t.get("pool") or []], **raced)


def maximum_soup(ingredients: Sequence[IngredientSpec], evaluator: EvaluatorSpec, *, p: int = 1,
                 racing: bool | Mapping[str, Any] = True, **options: Any) -> SoupResult:
    """Maximum soup (POINTS Eq. 4): the uniform average of the top-``p`` ingredients by score; ``racing``:
    the ranking raced on shared examples when the evaluator gives per-example scores (see ``greedy_soup``)."""
    return cook(MaximumSoup(p=p, racing=racing), ingredients, evaluator=evaluator, **options)


def average_soup(ingredients: Sequence[IngredientSpec], evaluator: EvaluatorSpec | None = None, *,
                 weights: Sequence[float] | None = None, **options: Any) -> SoupResult:
    """Average soup (POINTS Eq. 5): uniform (or weighted) average of all ingredients."""
    return cook(AverageSoup(weights=list(weights) if weights is not None else None), ingredients,
                evaluator=evaluator, **options)


def greedy_soup(ingredients: Sequence[IngredientSpec], evaluator: EvaluatorSpec, *, tie: str = ">=",
                tolerance: float = 0.0, sums: str = "auto", racing: bool | Mapping[str, Any] = True,
                **options: Any) -> SoupResult:
    """Greedy soup (POINTS Algorithm 1): add ingredients best-first while the held-out score improves.
    ``racing``: each keep decision raced on shared examples when the evaluator gives per-example scores
    (True: ``{delta: 0.05, batch: 64, min_examples: 128}``; a mapping overrides some; False: off; see
    ``soup.soups.racing``)."""
    return cook(GreedySoup(tie=tie, tolerance=tolerance, sums=sums, racing=racing), ingredients,
                evaluator=evaluator, **options)


def search_soup(ingredients: Sequence[IngredientSpec], evaluator: EvaluatorSpec, *, n_trials: int = 50,
                sampler: str = "tpe", groups: Mapping[str, str] | None = None, timeout: float | None = None,
                seed: int | None = 0, methods: Sequence[str] | None = None,
                params: Mapping[str, Sequence[float]] | None = None, racing: bool | Mapping[str, Any] = True,
                **options: Any) -> SoupResult:
    """Weight search (optuna): the mixing weights of the best of ``n_trials`` trials, seeded with the best
    single ingredient and the uniform soup; ``groups`` ({name: glob pattern}) get their own weights;
    ``racing``: each trial raced against the best so far on shared examples and pruned once surely worse
    (evaluators with per-example scores; see ``greedy_soup``);
    ``methods`` (merge methods compared) and ``params`` ({method parameter: [low, high]}) are searched
    with the weights (the run's ``method=``/``base=`` give the default method and the base; ``seed`` here
    is the sampler's). The study resumes from ``storage`` (default: an sqlite file beside ``out``).
    See ``soup.soups.search``."""
    from soup.soups.search import SearchSoup

    return cook(SearchSoup(n_trials=n_trials, sampler=sampler, groups=dict(groups) if isinstance(groups, Mapping) else groups,
                           timeout=timeout, seed=seed, methods=list(methods) if methods is not None else None,
                           params={k: list(v) for k, v in params.items()} if params is not None else None,
                           racing=racing),
                ingredients, evaluator=evaluator, **options)


def _adapter_cook(strategy: SoupStrategy, adapters: Sequence[Any], *, evaluator, evaluator_args, out, labels,
                  dtype, cache, progress, hub, **options: Any) -> SoupResult:
    """``cook`` over PEFT adapters: the strategy chooses weights over adapter candidates
    (``soup.adapters.candidates``), then ``adapter_soup`` writes the soup with them."""
    from soup.adapters.candidates import choose_adapters
    from soup.adapters.merging import adapter_soup

    check_option_names(options, ("overwrite", "accumulate", "device", "shard_size", "merge_into", "rank"),
                       where=f"{strategy.name}_soup (adapters)")
    opts = MergeOptions(dtype=dtype, **{k: v for k, v in options.items() if k in ("accumulate", "device")})
    evs = make_evaluators(evaluator, evaluator_args or {}, None)
    if strategy.needs_evaluator and not evs:
        raise RecipeError(f"strategy {strategy.name} needs an evaluator")
    reporter = progress if isinstance(progress, Reporter) else (RichReporter() if progress else Reporter())
    # the output is checked and locked before anything is evaluated, as for checkpoints
    protect = input_paths([*adapters, *([options["merge_into"]] if options.get("merge_into") else [])])
    output = OutputDir(out, overwrite=bool(options.pop("overwrite", False)), protect=protect) \
        if out is not None else None
    store = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
    with graceful():
        try:
            if output is not None:
                output.lock(warn=reporter.warn)
            try:
                choice, scorer = choose_adapters(strategy, adapters, evs, labels=labels, cache=store,
                                                 reporter=reporter, opts=opts)
            finally:
                for ev in evs:
                    ev.close()
                if not isinstance(cache, ScoreCache):
                    store.close()
            selection = Selection(Method(strategy.name, getattr(strategy, "reference", None) or None,
                                         jsonable(strategy.options())),
                                  _evaluation(choice, scorer, None, None), choice.kept)
            result = adapter_soup(adapters, output, weights=choice.weights, labels=labels, progress=reporter,
                                  hub=hub, dtype=dtype, selection=selection, **options)
        finally:
            if output is not None:
                output.release()
    names = [i.name for i in result.manifest.ingredients]
    return SoupResult(dict(zip(names, choice.weights)), dict(zip(names, choice.scores)), choice.trajectory,
                      choice.soup_score, path=result.path, state_dict=result.state_dict, manifest=result.manifest)

