"""Running a recipe: once, or only if something changed, then publishing — ``soup run`` and ``soup watch``.

The one owner of "run a recipe": registry queries among the ingredients are pinned first, then the
soup is cooked (``soup.pipeline.cook``; PEFT adapters through ``soup.adapters``), pushed to the hub
by ``cook`` when the recipe says so, and registered in MLflow here (``publish: {mlflow: NAME}``).
``run_if_changed`` asks ``soup.schedule.changes`` whether the published soup is still current first.
Imports go down only: this module uses ``pipeline`` and ``schedule.changes``; ``schedule.watch`` and
the CLI use this one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.adapters.peft_io import is_adapter
from soup.cook_options import EvaluationOptions, OutputOptions, PublishOptions
from soup.errors import RecipeError
from soup.io.ingredients import HubOptions
from soup.pipeline import SoupResult, _adapter_cook, cook
from soup.preflight import check_recipe, protected_paths
from soup.progress import Reporter
from soup.registry import has_queries, resolve_ingredients
from soup.schedule.changes import Update, changes, counts, create_repo, evaluator_infos, read_previous
from soup.soups.strategies import make_strategy

__all__ = ["run_recipe", "run_if_changed", "describe_recipe", "publish_mlflow"]


def run_recipe(recipe: Any, *, overwrite: bool = False, cache: Any = None, progress: bool | Reporter = False,
               output: str | Path | None = None, storage: str | None = None, local_worker: bool = True,
               if_changed: bool = False, replace_corrupt: bool = False) -> SoupResult | Update:
    """Cook a validated Recipe or a recipe file (``soup run``); ``cache``/``output`` override the recipe's;
    ``storage``: an optuna storage URL shared with ``soup worker`` processes (see ``cook``).

    Registry queries among the ingredients are resolved first, before anything is evaluated. With
    ``if_changed`` the soup is made (and published) only if its ingredients, the recipe or the
    evaluators changed since the published one: returns a ``soup.schedule.changes.Update`` saying what changed
    (``replace_corrupt``: see ``run_if_changed``).
    """
    if isinstance(recipe, (str, Path)):
        from soup.recipe import load_recipe

        recipe = load_recipe(recipe)
    if if_changed:
        return run_if_changed(recipe, cache=cache, progress=progress, output=output, storage=storage,
                              local_worker=local_worker, replace_corrupt=replace_corrupt)
    if has_queries(recipe):  # pinned now: what is evaluated is what soup.json records
        import dataclasses

        pinned = resolve_ingredients(recipe, output=output)
        recipe = dataclasses.replace(recipe, ingredients=[p.spec() for p in pinned], labels=[p.label for p in pinned])

    problems = check_recipe(recipe, output=output, cache=cache, storage=storage, overwrite=overwrite)
    if problems:  # what `soup validate` lists, the first one raised before any work
        raise problems[0]
    out = output if output is not None else recipe.output
    if recipe.merge_into is not None or recipe.rank is not None or any(map(is_adapter, recipe.ingredients)):
        return _adapter_recipe(recipe, out, overwrite=overwrite, progress=progress,
                               cache=cache if cache is not None else recipe.cache)
    chosen_cache = cache if cache is not None else recipe.cache
    protect = protected_paths(recipe, chosen_cache)
    # the recipe (with the command line's overrides) as the three objects cook takes, checked on construction
    evaluation = EvaluationOptions(
        evaluator=recipe.evaluator.name if recipe.evaluator else None,
        evaluator_args=recipe.evaluator.args if recipe.evaluator else None,
        test_evaluator=recipe.test.name if recipe.test else None, test_args=recipe.test.args if recipe.test else None,
        cache=chosen_cache, devices=recipe.devices, storage=storage, local_worker=local_worker)
    result = cook(make_strategy(recipe.strategy, **recipe.strategy_options), recipe.ingredients,
                  evaluation=evaluation, output=OutputOptions(out, overwrite=overwrite, protect=protect),
                  publishing=PublishOptions(recipe.push_to, HubOptions(endpoint=recipe.endpoint), recipe.raw),
                  labels=recipe.labels, rules=recipe.rules, dtype=recipe.dtype, progress=progress,
                  **recipe.merge_options())
    if recipe.publish:  # registered in MLflow once the soup is complete at the output
        from soup.finish.report import format_update

        publish_mlflow(recipe, result, format_update(None, result.manifest))
    return result


def _run_pinned(recipe: Any, ingredients: Sequence[Any], labels: Sequence[str | None], *,
                 push_to: Mapping[str, Any] | None, **options: Any) -> SoupResult:
    """``run_recipe`` with these (pinned) ingredients and this push target, publishing nowhere else
    (``run_if_changed`` publishes to MLflow itself, with what changed)."""
    import dataclasses

    pinned = dataclasses.replace(recipe, ingredients=list(ingredients), labels=list(labels),
                                 push_to=dict(push_to) if push_to else None, publish=None)
    return run_recipe(pinned, **options)


def describe_recipe(recipe: Any) -> str:
    """The plan of a recipe, for ``soup run --dry-run``: nothing is evaluated or written."""
    from soup.io.checkpoint import open_checkpoint

    lines = [f"recipe: {recipe.source or '-'}", f"strategy: {recipe.strategy} {recipe.strategy_options or ''}"]
    for role, ev in (("evaluator", recipe.evaluator), ("test", recipe.test)):
        if ev is not None:
            lines.append(f"{role}: {ev.name} {ev.args}")
    lines.append(f"ingredients ({len(recipe.ingredients)}):")
    for src, lab in zip(recipe.ingredients, recipe.labels):
        if not isinstance(src, str):  # a registry query: what it resolves to now (nothing is downloaded)
            from soup.registry import describe_pinned, resolve_query

            found = resolve_query(recipe, src)
            lines.append(f"  {src.where}: {src.describe()} -> {len(found)} match(es)" + ("" if found else
                         " (an empty query is an error at run time)"))
            lines.extend("  " + line for line in describe_pinned(found))
            continue
        if src.startswith("hf://"):
            lines.append(f"  {lab or src}: {src} (pulled at run time, pinned to a commit)")
            continue
        ck = open_checkpoint(src, label=lab)
        lines.append(f"  {ck.label}: {src}  {len(ck.tensors)} tensors, {ck.total_bytes:,} bytes, "
                     f"fingerprint {ck.fingerprint[:12]}")
    for r in recipe.rules:
        lines.append(f"rule: {r}")
    lines.append(f"dtype: {recipe.dtype or 'as ingredients'}, accumulate {recipe.accumulate}, "
                 f"shard size {recipe.shard_size}, device {recipe.device}"
                 + (f", devices {recipe.devices}" if recipe.devices else ""))
    lines.append(f"cache: {recipe.cache}")
    lines.append(f"output: {recipe.output}" + (f" -> push to {recipe.push_to['repo']}" if recipe.push_to else "")
                 + (f" -> register as mlflow model {recipe.publish['mlflow']}" if recipe.publish else ""))
    return "\n".join(lines)


def _adapter_recipe(recipe: Any, out: str | Path, *, overwrite: bool, progress: bool | Reporter,
                    cache: Any = "default") -> SoupResult:
    """A recipe over PEFT adapters (``soup.adapters.merging``): an average (or weighted) soup, or a strategy with an
    evaluator over adapter candidates (``soup.adapters.candidates``)."""
    from soup.adapters.merging import adapter_soup
    if recipe.push_to or recipe.publish or recipe.test is not None:
        raise RecipeError("adapter recipes: push_to, publish and test are not supported")
    if recipe.strategy != "average" or recipe.evaluator is not None:
        return _adapter_cook(make_strategy(recipe.strategy, **recipe.strategy_options), recipe.ingredients,
                             evaluator=recipe.evaluator.name if recipe.evaluator else None,
                             evaluator_args=recipe.evaluator.args if recipe.evaluator else None, out=out,
                             labels=recipe.labels, dtype=recipe.dtype, cache=cache, progress=progress,
                             hub=HubOptions(endpoint=recipe.endpoint), overwrite=overwrite,
                             merge_into=recipe.merge_into, rank=recipe.rank, accumulate=recipe.accumulate,
                             shard_size=recipe.shard_size, device=recipe.device)
    weights = recipe.strategy_options.get("weights")
    result = adapter_soup(recipe.ingredients, out, weights=weights, merge_into=recipe.merge_into, rank=recipe.rank,
                          labels=recipe.labels, overwrite=overwrite, progress=progress,
                          hub=HubOptions(endpoint=recipe.endpoint), dtype=recipe.dtype,
                          accumulate=recipe.accumulate, shard_size=recipe.shard_size, device=recipe.device)
    m = result.manifest
    return SoupResult({i.name: i.weight for i in m.ingredients}, {i.name: None for i in m.ingredients}, [], None,
                      path=result.path, manifest=m)


def run_if_changed(recipe: Any, *, cache: Any = None, progress: Any = False,
                   output: str | Path | None = None, replace_corrupt: bool = False, **options: Any) -> Update:
    """Re-soup ``recipe`` only if its ingredients, the recipe or the evaluators changed since the
    published soup; publish one new commit/version saying what changed. ``options`` go to
    ``run_recipe`` (``storage``, ``local_worker``).

    ``replace_corrupt``: a published soup whose ``soup.json`` cannot be read (on the hub, in MLflow or at
    the output) is replaced by a new soup instead of stopping the run; a local one is first moved aside
    (renamed ``<output>.unreadable-<time>``, nothing deleted).

    Raises:
        SoupError: a registry or the hub cannot be read, the evaluator fails, another run published first,
            or the published soup.json cannot be read (without ``replace_corrupt``).
    """
    out = Path(output) if output is not None else recipe.output
    if out is None:
        raise RecipeError("output: required to run a recipe (or pass --output)")
    push = dict(recipe.push_to) if recipe.push_to else None
    if push and push.get("create_pr"):
        raise RecipeError("push_to.create_pr: --if-changed reads the soup from the branch head, which a pull "
                          "request never updates; push to a branch instead")
    pinned = resolve_ingredients(recipe, pin_fixed=True, output=out)  # before anything is evaluated
    infos = evaluator_infos(recipe)
    prev = read_previous(recipe, output=out, replace_corrupt=replace_corrupt)
    reasons = changes(recipe, pinned, infos, prev.manifest)
    if reasons and push and prev.head is None:  # a first soup: create the repo, read its head, look again
        create_repo(push, recipe.endpoint)
        prev = read_previous(recipe, output=out, replace_corrupt=replace_corrupt)
        reasons = changes(recipe, pinned, infos, prev.manifest)
    if prev.unreadable is not None:
        reasons = [f"unreadable soup.json at {prev.where} ({prev.unreadable})"]
        if not push and not recipe.publish:  # the local soup: kept aside, never deleted
            import time

            aside = out.with_name(f"{out.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            out.rename(aside)
            reasons.append(f"moved it to {aside}")
    if not reasons:
        return Update(False, f"up to date: {prev.where}", previous=prev.where)
    if push:
        push.update(parent_commit=prev.head, previous=prev.manifest)
    result = _run_pinned(recipe, [p.spec() for p in pinned], [p.label for p in pinned], overwrite=True,
                          cache=cache, progress=progress, output=out, push_to=push, **options)
    from soup.finish.report import format_update

    message = format_update(prev.manifest, result.manifest)
    if prev.manifest is None:
        message = f"new soup: {message}"
    published = str(result.path)
    if result.push is not None:
        published = f"{push['repo']}@{result.push.commit}"
    if recipe.publish:
        version = publish_mlflow(recipe, result, message)
        published = published if result.push is not None else version
    evaluated, cached = counts(result.manifest)
    verb = "wrote" if result.push is None and not recipe.publish else "published"
    return Update(True, f"{verb} {published}: {message}", reasons,
                  prev.where if prev.manifest is not None else None, published,
                  evaluated, cached, result)


def publish_mlflow(recipe: Any, result: Any, message: str) -> str:
    """Register the soup as a new version of ``publish.mlflow``; ``models:/NAME/N``."""
    from soup.registry import tracking_uri
    from soup.registry.mlflow import _uri, publish_version

    name = recipe.publish["mlflow"]
    version = publish_version(result.path, result.manifest, name,
                              _uri(tracking_uri(recipe.tracking_uri), "publish.mlflow"), message=message)
    result.registered = f"models:/{name}/{version}"
    return result.registered

