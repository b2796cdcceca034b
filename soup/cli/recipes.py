"""``soup run``, ``watch``, ``worker``, ``validate``, ``report`` and ``demo``: recipes, schedules and results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


from soup.cli.common import _print_push, app, out, err, Quiet, Overwrite, Endpoint, Cache, NoCache, Devices, _errors


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; evaluate and write nothing.")] = False,
    cache: Cache = None,
    no_cache: NoCache = False,
    devices: Devices = None,
    storage: Annotated[Optional[str], typer.Option(help="An optuna storage URL (sqlite:///study.db, "
                                                   "postgresql://user@host/db) shared with `soup worker` processes: "
                                                   "candidates are queued there and evaluated by the workers; "
                                                   "the default score cache is then that database.")] = None,
    local_worker: Annotated[bool, typer.Option("--local-worker/--no-local-worker",
                                               help="With --storage: also evaluate queued candidates here "
                                                    "while waiting for the workers.")] = True,
    endpoint: Endpoint = None,
    overwrite: Overwrite = False,
    if_changed: Annotated[bool, typer.Option("--if-changed", help="Only if the ingredients (pinned), the recipe "
                                             "or the evaluator changed since the published soup (hub head, MLflow "
                                             "version or local output): else print 'up to date: ...' and write "
                                             "nothing. Replaces only a previous soup.")] = False,
    replace_corrupt: Annotated[bool, typer.Option("--replace-corrupt", help="With --if-changed: a published "
                                                  "soup whose soup.json cannot be read counts as no soup and is "
                                                  "replaced (a local one is moved aside, never deleted).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr; print only the "
                                        "output path (with --if-changed: the one line saying what happened).")] = False,
    racing: Annotated[Optional[bool], typer.Option("--racing/--no-racing", show_default=False,
                                                   help="Race candidates on shared examples and stop each decision "
                                                        "once it is clear (the strategy's racing option; default: "
                                                        "the recipe's, on for evaluators with per-example "
                                                        "scores).")] = None,
) -> None:
    """Cook the soup a recipe describes: evaluate, choose weights, merge, report (and push)."""
    from soup.run import describe_recipe, run_recipe
    from soup.recipe import load_recipe
    from soup.finish.report import format_report

    with _errors():
        if replace_corrupt and not if_changed:
            from soup.errors import SoupError

            raise SoupError("--replace-corrupt: applies with --if-changed only")
        r = load_recipe(recipe)
        if racing is not None:
            _set_racing(r, racing)
        if devices:
            r.devices = [d.strip() for d in devices.split(",") if d.strip()]
        if endpoint:
            r.endpoint = endpoint
        if dry_run:
            out.print(describe_recipe(r))
            return
        if no_cache:
            from soup.soups.cache import ScoreCache

            chosen = ScoreCache(None)
        else:
            chosen = cache
        if if_changed:
            update = run_recipe(r, cache=chosen, progress=not quiet, output=output, storage=storage,
                                local_worker=local_worker, if_changed=True, replace_corrupt=replace_corrupt)
            if update.result is not None and not quiet:
                _print_result(update.result, format_report)
            out.print(update.line)  # -q: this one line per run (a cron log)
            return
        result = run_recipe(r, overwrite=overwrite, cache=chosen, progress=not quiet, output=output,
                            storage=storage, local_worker=local_worker)
        if quiet:  # -q: only where the soup is (the report: soup report PATH)
            out.print(str(result.path))
        else:
            _print_result(result, format_report)


@app.command()
def watch(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (read again at each tick).")],
    every: Annotated[str, typer.Option(help="How often to look for new ingredients: 30m, 1h, 45s, 1h30m.")] = "30m",
    max_ticks: Annotated[Optional[int], typer.Option("--max-ticks", min=1, help="Stop after N ticks "
                                                     "(default: run until stopped).")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines on stderr.")] = False,
    webhook: Annotated[Optional[str], typer.Option(help="HOST:PORT to also accept Hugging Face Hub and MLflow "
                                                   "registry webhooks on: a matching event runs a tick at once.")] = None,
    webhook_secret: Annotated[Optional[str], typer.Option(envvar="SOUP_WEBHOOK_SECRET", show_default=False,
                                                          help="The webhooks' secret (never printed).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Override the recipe's output.")] = None,
    cache: Cache = None,
    no_cache: NoCache = False,
    endpoint: Endpoint = None,
    replace_corrupt: Annotated[bool, typer.Option("--replace-corrupt", help="A published soup whose soup.json "
                                                  "cannot be read counts as no soup and is replaced (a local one "
                                                  "is moved aside, never deleted).")] = False,
) -> None:
    """Re-soup whenever the ingredients change: `soup run RECIPE --if-changed` every --every, one log line
    per tick on stderr; a failing tick is retried with backoff; Ctrl-C / SIGTERM stop it cleanly."""
    from soup.schedule.watch import parse_every, watch as run_watch

    with _errors():
        parse_every(every)
        chosen = cache
        if no_cache:
            from soup.soups.cache import ScoreCache

            chosen = ScoreCache(None)
        run_watch(recipe, every=every, max_ticks=max_ticks, webhook=webhook, webhook_secret=webhook_secret,
                  log_json=log_json, cache=chosen, output=output, endpoint=endpoint,
                  replace_corrupt=replace_corrupt)


def _set_racing(recipe, racing: bool) -> None:
    """``--racing`` / ``--no-racing`` into the recipe's strategy options (checked with them when the
    strategy is built, before any work); ``--racing`` keeps the recipe's racing settings if it has some."""
    import inspect

    from soup.errors import RecipeError
    from soup.soups.strategies import load_strategy

    params = inspect.signature(load_strategy(recipe.strategy)).parameters
    if "racing" not in params:
        if racing:
            raise RecipeError(f"--racing: strategy {recipe.strategy} does not race its evaluations")
        return
    current = recipe.strategy_options.get("racing", True)
    recipe.strategy_options = dict(recipe.strategy_options,
                                   racing=(current if isinstance(current, dict) else True) if racing else False)


def _print_result(result, format_report) -> None:
    out.print(format_report(result.manifest))
    out.print(f"wrote {result.path}")
    if result.push is not None:
        _print_push(result.push)
    if result.registered:
        out.print(f"registered {result.registered}")


@app.command()
def worker(
    recipe: Annotated[Path, typer.Argument(help="The coordinator's recipe (same ingredients, evaluator, rules).")],
    storage: Annotated[str, typer.Option(help="The coordinator's optuna storage URL (soup run RECIPE --storage URL).")],
    devices: Devices = None,
    cache: Cache = None,
    no_cache: NoCache = False,
    idle_timeout: Annotated[float, typer.Option(help="Stop after this many seconds with nothing to do "
                                                "(waiting for the coordinator included).")] = 600.0,
    endpoint: Endpoint = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate a coordinator's candidates on this machine until its runs are done: start one per machine
    (or GPU), e.g. as a Slurm array or a Kubernetes Job. A worker that dies mid-candidate (preempted, OOM
    killed) loses nothing: its candidate is evaluated again by another worker."""
    from soup.workers import worker as run_worker

    if idle_timeout <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--idle-timeout")
    with _errors():
        chosen = None if no_cache else (cache or "default")
        res = run_worker(recipe, storage=storage, devices=[d.strip() for d in devices.split(",") if d.strip()]
                         if devices else None, cache=chosen, idle_timeout=idle_timeout, progress=not quiet,
                         endpoint=endpoint)
    out.print(f"{res.study}\t{res.evaluated} candidate(s) evaluated\t{res.reason}\t{res.seconds:.1f}s")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="PATH",
                                                   help="Override the recipe's output.")] = None,
    cache: Cache = None,
    no_cache: NoCache = False,
    storage: Annotated[Optional[str], typer.Option(metavar="URL", help="The optuna storage URL soup run "
                                                   "will get.")] = None,
    endpoint: Endpoint = None,
    overwrite: Overwrite = False,
) -> None:
    """Check a recipe as `soup run` does before it evaluates anything (same options): its fields, the
    plug-ins and their arguments, the files they name, the ingredients (found and compatible, from
    their headers), the cache and the output. Every problem is printed with its field path; exit 1 if any."""
    from soup.errors import RecipeError, printable, redact
    from soup.preflight import check_recipe
    from soup.recipe import load_recipe
    from soup.soups.cache import ScoreCache

    with _errors():
        try:
            r = load_recipe(recipe)
            if endpoint:
                r.endpoint = endpoint
            problems = [str(p) for p in check_recipe(r, output=output, cache=ScoreCache(None) if no_cache else cache,
                                                         storage=storage, overwrite=overwrite)]
        except RecipeError as e:
            problems = getattr(e, "errors", [str(e)])
        for line in problems:
            err.print(printable(redact(line if line.startswith(str(recipe)) else f"{recipe}: {line}")))
        if problems:
            raise typer.Exit(1)
    out.print(f"{recipe}: ok")


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A soup output folder (with soup.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a soup's report: ingredients, weights, scores, every evaluation in order, greedy trajectory, soup scores."""
    from soup.io.manifest import read
    from soup.finish.report import format_report

    with _errors():
        manifest = read(folder)
        text = json.dumps(manifest.to_dict(), indent=2) if as_json else format_report(manifest)
    out.print(text)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for ingredients, soups and the score cache.")] = Path("soup-demo"),
    seeds: Annotated[int, typer.Option(help="How many seeds (0..N-1) to run.")] = 1,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table in Markdown, as the "
                                           "documentation shows it.")] = False,
    quiet: Quiet = False,
) -> None:
    """Run the built-in example: digit classifiers fine-tuned from one start (one on noisy labels), souped
    three ways (maximum, average, greedy) on CPU in seconds; prints test accuracies."""
    try:
        from soup.demo import format_markdown, format_rows, run_demo
    except ImportError as e:  # the demo extra (scikit-learn) is missing: its message says what to install
        err.print(f"error: {e}")
        raise typer.Exit(1) from None
    with _errors():
        rows = [run_demo(output, seed=s, progress=not quiet) for s in range(seeds)]
    if markdown:  # the table alone, to paste
        out.print(format_markdown(rows))
        return
    out.print(format_rows(rows))
    out.print(f"greedy soup written to {rows[-1]['path']} (see: soup report {rows[-1]['path']})")

