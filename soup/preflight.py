"""Everything ``soup run`` checks before it evaluates anything, in one place: ``soup validate`` is this.

``check_recipe(recipe)`` returns what a run of a (shape-valid) recipe would refuse, each problem as the
``SoupError`` the run raises; ``soup.run.run_recipe`` raises the first one before any work, and
``soup validate`` prints them all, so the two cannot drift. Checked, in this order:

- the output: given, and a place soup may write (not a file's child, not an input, not someone's folder);
- the score cache and an optuna storage: their URLs parsed and their drivers found (nothing is created
  or connected to);
- the evaluator and the test evaluator: the plug-in found, its arguments known to it, their values
  and the files they name checked by the plug-in's own ``validate`` (``soup.soups.evaluate``);
- the ingredients (registry queries resolved first): every one found, and all compatible with each
  other, the method's base model and the rules, from their headers only (hub repos by HTTP range
  requests; no weights are read or downloaded).

Strategy options, merge options, rules and the method were checked when the recipe was read
(``soup.recipe.parse_recipe``); their errors come first and stop the checks here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from soup.adapters.peft_io import is_adapter
from soup.errors import RecipeError, SoupError
from soup.io.ingredients import HubOptions, Ingredient
from soup.registry import has_queries, resolve_ingredients
from soup.soups.evaluate import check_evaluator

__all__ = ["check_recipe", "protected_paths"]

FAILED = object()  # what a failed check returns


def check_recipe(recipe: Any, *, output: str | Path | None = None, cache: Any = None, storage: str | None = None,
                 overwrite: bool = False) -> list[SoupError]:
    """What ``soup run`` would refuse for ``recipe`` before evaluating, in the order it would say it.

    Args:
        recipe: a ``Recipe`` (``soup.recipe.load_recipe``); its shape is already checked.
        output / cache / storage / overwrite: as given to ``run_recipe`` (``soup run -o/--cache/--storage/--overwrite``).

    Returns:
        The problems, each the ``SoupError`` the run raises (``str()`` is its one line); empty when the
        recipe would run. Nothing is written, created, downloaded or evaluated.
    """
    problems: list[SoupError] = []

    def check(fn, *args: Any, where: str | None = None, **kwargs: Any) -> Any:
        """``fn(...)``, or FAILED with its error (prefixed with ``where``) added to the problems."""
        try:
            return fn(*args, **kwargs)
        except SoupError as e:
            problems.append(type(e)(f"{where}: {e}") if where else e)
            return FAILED

    out = output if output is not None else recipe.output
    specs, labels = list(recipe.ingredients), list(recipe.labels)
    if has_queries(recipe):  # pinned first, as run does
        pinned = check(resolve_ingredients, recipe, output=out)
        specs, labels = ([], []) if pinned is FAILED else ([p.source for p in pinned], [p.label for p in pinned])
    if out is None:
        problems.append(RecipeError("output: required to run a recipe (or pass --output)"))
    adapters = recipe.merge_into is not None or recipe.rank is not None or any(map(is_adapter, specs))
    if adapters and (recipe.push_to or recipe.publish or recipe.test is not None):
        problems.append(RecipeError("adapter recipes: push_to, publish and test are not supported"))
    chosen_cache = cache if cache is not None else recipe.cache
    if storage is not None:
        check(_check_storage, storage)
    if out is not None:
        check(_check_output, recipe, specs, out, chosen_cache, storage, overwrite)
    if not hasattr(chosen_cache, "get") and not (storage is not None and chosen_cache == "default"):
        check(_check_cache, chosen_cache)  # a location (with a storage, "default" is the storage's database)
    for where, entry in (("evaluator", recipe.evaluator), ("test", recipe.test)):
        if entry is not None and check(check_evaluator, entry.name, entry.args, where=where) is not FAILED \
                and where == "evaluator" and recipe.devices and len(recipe.devices) > 1:
            check(_check_devices, entry, recipe.devices)
    if not adapters and specs and not any(str(s).startswith("models:/") for s in specs):  # MLflow: once downloaded
        _check_ingredients(recipe, specs, labels, check)
    return problems


def protected_paths(recipe: Any, cache: Any) -> list[Path]:
    """What a recipe's output must keep clear of beside its ingredients: the recipe file, a local score cache."""
    protect = [Path(recipe.source)] if recipe.source else []
    if isinstance(cache, (str, Path)) and cache != "default" and "://" not in str(cache):
        protect.append(Path(cache))
    return protect


def _check_devices(entry: Any, devices: list[str]) -> None:
    """Several devices: one evaluator each, built with its ``device`` argument (``soup.soups.factory``)."""
    from soup.errors import EvaluatorError

    try:
        check_evaluator(entry.name, {**entry.args, "device": devices[0]})
    except EvaluatorError as e:
        raise RecipeError(f"devices: {', '.join(devices)}: one evaluator per device is built with a device "
                          f"argument, which {entry.name} refuses ({e})") from None


def _check_output(recipe: Any, specs: list[Any], out: str | Path, cache: Any, storage: str | None,
                  overwrite: bool) -> None:
    """The output as ``cook`` checks it before locking it (``soup.engine.output.OutputDir``)."""
    from soup.engine.output import OutputDir, input_paths
    from soup.pipeline import _db_files

    base = (recipe.method or {}).get("base")
    local = [s for s in specs if not str(s).startswith("models:/")]
    OutputDir(out, overwrite=overwrite, protect=input_paths([*local, *([base] if base else [])])
              + protected_paths(recipe, cache) + _db_files(storage, cache))


def _check_storage(storage: Any) -> None:
    if not isinstance(storage, str) or "://" not in storage:
        raise RecipeError(f"storage: {storage!r} must be an optuna storage URL (sqlite:///..., postgresql://...)")
    from soup.workers import QueueSettings

    QueueSettings.from_env()  # a bad SOUP_HEARTBEAT_* is refused before any work
    _check_database(storage, "storage")


def _check_cache(location: Any) -> None:
    """A score cache location that ``ScoreCache`` would open: an sqlite file in a folder that exists
    (``check_db_place``), or a database URL SQLAlchemy parses, with its driver installed. Nothing is
    created or connected to."""
    from soup.soups.cache import default_cache_path

    if location is None or (location == "default" and not os.environ.get("SOUP_CACHE")):
        return  # none, or soup's own folder (created)
    text = str(default_cache_path() if location == "default" else location)
    if "://" in text:
        _check_database(text, "score cache")
    else:
        from soup.soups.cache import check_db_place

        check_db_place(text, "score cache")


def _check_database(url: str, what: str) -> None:
    """A database URL: an sqlite file's place checked (``check_db_place``), the dialect and driver loaded
    (as ``create_engine`` would); no connection."""
    import sqlalchemy as sa

    from soup.soups.cache import check_db_place, display_url

    check_db_place(url, what)
    shown = display_url(url)
    try:
        parsed = sa.engine.make_url(url)
        parsed.get_dialect().import_dbapi()
    except ModuleNotFoundError as e:
        raise SoupError(f"{what} {shown}: the database driver is not installed ({e}); for PostgreSQL "
                        "install psycopg[binary] and write postgresql+psycopg://...") from None
    except (sa.exc.SQLAlchemyError, ValueError) as e:
        text = str(getattr(e, "orig", None) or e).strip()
        raise SoupError(f"{what} {shown}: {text.splitlines()[0] if text else type(e).__name__}") from None


def _check_ingredients(recipe: Any, specs: list[Any], labels: list[str | None], check) -> None:
    """Every ingredient found, and all compatible (with the method's base and the rules) from their headers."""
    from soup.pipeline import _check_plan, _method
    from soup.engine.rules import parse_rules
    from soup.soups.strategies import make_strategy

    hub = HubOptions(endpoint=recipe.endpoint)
    cks = [check(_headers, s, label=lab, hub=hub) for s, lab in zip(specs, labels)]
    options = recipe.merge_options()  # as run_recipe gives them to cook
    if check(_method, options, len(specs)) is FAILED:
        return
    spec = options["method"]
    if spec is not None and spec.base is not None:
        base = check(_headers, spec.base, label="base", hub=hub)
        if base is FAILED or base is None:
            return
        options["method"] = dataclasses.replace(spec, base=base)
    if any(ck is FAILED or ck is None for ck in cks):
        return  # missing (said above), or known only once downloaded (a hub repo of .bin files)
    _unique_labels(cks)
    check(_check_plan, make_strategy(recipe.strategy, **recipe.strategy_options), cks,
          parse_rules(recipe.rules), recipe.dtype, options)


def _headers(spec: Any, *, label: str | None, hub: HubOptions) -> Any:
    """A Checkpoint from headers only: a local one opened, a hub one read by range requests
    (``soup.hub.precheck``); None for a hub repo without safetensors (known only once downloaded)."""
    if hasattr(spec, "tensors"):  # already opened (an MLflow version, downloaded): a copy, relabelled below
        return dataclasses.replace(spec)
    text = str(spec)
    if text.startswith("hf://"):
        from soup.hub.precheck import header_checkpoint

        return header_checkpoint(text, label=label, hub=hub)
    from soup.io.checkpoint import open_checkpoint

    reading = {"state_dict_key": spec.key, "strip_prefix": spec.strip_prefix} if isinstance(spec, Ingredient) else {}
    return open_checkpoint(Path(text), label=label, **reading)


def _unique_labels(cks: list[Any]) -> None:
    """Labels made unique as ``soup.io.ingredients.resolve_all`` makes them (``name#i``)."""
    seen: dict[str, int] = {}
    for ck in cks:
        seen[ck.label] = seen.get(ck.label, 0) + 1
    for i, ck in enumerate(cks):
        if seen[ck.label] > 1:
            ck.label = f"{ck.label}#{i}"
