"""Scheduled merging: re-soup when the ingredients change, publish once, from cron or a long-running watcher.

``soup run RECIPE --if-changed`` (``run_if_changed``; ``soup.run_recipe(path, if_changed=True)``):

1. resolve every ingredient to a pinned version (registry queries listed now, hub branches to their
   commit sha, local checkpoints to their fingerprint);
2. read the previous soup's ``soup.json`` from where the soup is published: the hub repo's head when
   ``push_to`` is set (only soup.json is downloaded), else the MLflow soup model's latest version
   (``publish: {mlflow: NAME}``), else the local output;
3. nothing changed (pinned ingredients, the recipe, the evaluators' identities) -> one line
   ``up to date: <where>``, nothing evaluated or written;
4. otherwise re-soup (the score cache means only new ingredients and new candidates are evaluated),
   replacing only a previous soup at the output, and publish one commit (or version) whose message
   says what changed: ``+ acme/sft-ocr@abc1234 (0.612); greedy kept 4/7; score 0.618 (+0.004)``.

The hub commit's parent is the head the previous soup was read at, so two runs that saw the same soup
publish once (the other fails before evaluating anything, or at the commit with the hub's 412); on one
machine the output lock already stops the second. State lives in the published soup.json and the
score cache only: any machine can take over the schedule.

``soup watch RECIPE --every 30m`` (``watch``) does the same in a loop: one log line per tick on stderr
(JSON lines with ``log_json``), a failing tick (hub down, evaluator crash) is logged and retried with
backoff while the watcher lives on, SIGINT/SIGTERM stop it with nothing half-written. With a webhook
address it also accepts Hugging Face Hub and MLflow registry webhooks (``soup.webhooks``) and ticks at
once for an event that concerns the recipe's ingredients.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import RecipeError, SoupError, redact
from .manifest import Manifest, jsonable
from .registry import Event, Pinned, Query, resolve_ingredients

__all__ = ["Update", "Previous", "run_if_changed", "read_previous", "watch", "parse_every"]


@dataclass
class Previous:
    """The soup published last, and where it was read."""

    manifest: Manifest | None  # None: there is none yet
    where: str  # acme/soup@<sha>, models:/NAME/N, or the output folder
    head: str | None = None  # hub: the branch head it was read at (the next commit's parent)


@dataclass
class Update:
    """What ``soup run --if-changed`` found and did."""

    changed: bool
    line: str  # one line: "up to date: ..." or "published ...: <what changed>"
    reasons: list[str] = field(default_factory=list)  # why a new soup was made: "+ acme/x@abc1234", ...
    previous: str | None = None  # where the previous soup was read (None: there was none)
    published: str | None = None  # acme/soup@<sha>, models:/NAME/N, or the output folder
    evaluated: int = 0  # evaluations run (not read from the score cache)
    cached: int = 0  # evaluations read from the score cache
    result: Any = None  # the SoupResult, when a soup was made


# ---- soup run --if-changed -----------------------------------------------------------------------------


def run_if_changed(recipe: Any, *, cache: Any = None, progress: Any = False,
                   output: str | Path | None = None, **options: Any) -> Update:
    """Re-soup ``recipe`` only if its ingredients, the recipe or the evaluators changed since the
    published soup; publish one new commit/version saying what changed. ``options`` go to
    ``run_recipe`` (``storage``, ``local_worker``).

    Raises:
        SoupError: a registry or the hub cannot be read, the evaluator fails, another run published first.
    """
    from .pipeline import _cook_recipe

    out = Path(output) if output is not None else recipe.output
    if out is None:
        raise RecipeError("output: required to run a recipe (or pass --output)")
    push = dict(recipe.push_to) if recipe.push_to else None
    if push and push.get("create_pr"):
        raise RecipeError("push_to.create_pr: --if-changed reads the soup from the branch head, which a pull "
                          "request never updates; push to a branch instead")
    pinned = resolve_ingredients(recipe, pin_fixed=True, output=out)  # before anything is evaluated
    infos = _evaluator_infos(recipe)
    prev = read_previous(recipe, output=out)
    reasons = _changes(recipe, pinned, infos, prev.manifest)
    if reasons and push and prev.head is None:  # a first soup: create the repo, read its head, look again
        _create_repo(push, recipe.endpoint)
        prev = read_previous(recipe, output=out)
        reasons = _changes(recipe, pinned, infos, prev.manifest)
    if not reasons:
        return Update(False, f"up to date: {prev.where}", previous=prev.where)
    if push:
        push.update(parent_commit=prev.head, previous=prev.manifest)
    result = _cook_recipe(recipe, [p.spec() for p in pinned], [p.label for p in pinned], overwrite=True,
                          cache=cache, progress=progress, output=out, push_to=push, **options)
    from .report import format_update

    message = format_update(prev.manifest, result.manifest)
    if prev.manifest is None:
        message = f"new soup: {message}"
    published = str(result.path)
    if result.push is not None:
        published = f"{push['repo']}@{result.push.commit}"
    if recipe.publish:
        version = publish_mlflow(recipe, result, message)
        published = published if result.push is not None else version
    evaluated, cached = _counts(result.manifest)
    verb = "wrote" if result.push is None and not recipe.publish else "published"
    return Update(True, f"{verb} {published}: {message}", reasons,
                  prev.where if prev.manifest is not None else None, published,
                  evaluated, cached, result)


def read_previous(recipe: Any, *, output: str | Path | None = None) -> Previous:
    """The published soup: the hub repo's head (push_to), else the MLflow soup model's latest version
    (publish.mlflow), else the local output. Reads only; writes nothing anywhere."""
    from .manifest import read

    if recipe.push_to:
        return _previous_on_hub(recipe.push_to, recipe.endpoint)
    if recipe.publish and recipe.publish.get("mlflow"):
        from .registry import tracking_uri
        from .registry.mlflow import _uri, latest_soup

        name = recipe.publish["mlflow"]
        version, manifest = latest_soup(name, _uri(tracking_uri(recipe.tracking_uri), "publish.mlflow"))
        return Previous(manifest, f"models:/{name}/{version}" if version else f"models:/{name}", version)
    out = Path(output) if output is not None else recipe.output
    try:
        return Previous(read(out), str(out))
    except SoupError:
        return Previous(None, str(out))  # none yet (anything else at the output is refused by cook)


def _previous_on_hub(push: dict[str, Any], endpoint: str | None) -> Previous:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    from .hub.errors import hub_error, retrying
    from .hub.specs import hub_endpoint
    from .manifest import MANIFEST, read

    repo, branch = push["repo"], push.get("revision") or "main"
    url = hub_endpoint(endpoint)
    api = HfApi(endpoint=url)
    try:
        refs = retrying(lambda: api.list_repo_refs(repo))
    except RepositoryNotFoundError:
        return Previous(None, repo)
    except Exception as err:
        raise hub_error(err, f"{repo}@{branch}") from None
    head = next((b.target_commit for b in refs.branches if b.name == branch), None)
    if head is None:
        return Previous(None, f"{repo}@{branch}")
    where = f"{repo}@{head}"
    with tempfile.TemporaryDirectory(prefix="soup-previous-") as tmp:
        try:  # only soup.json, at exactly that head, into a folder that is removed again
            retrying(lambda: hf_hub_download(repo, MANIFEST, revision=head, endpoint=url, local_dir=tmp))
        except RemoteEntryNotFoundError:
            return Previous(None, where, head)
        except Exception as err:
            raise hub_error(err, f"{repo}@{head[:12]}") from None
        return Previous(read(tmp), where, head)


def _create_repo(push: dict[str, Any], endpoint: str | None) -> None:
    from huggingface_hub import HfApi

    from .hub.errors import hub_error, retrying
    from .hub.specs import hub_endpoint

    api = HfApi(endpoint=hub_endpoint(endpoint))
    try:
        retrying(lambda: api.create_repo(push["repo"], private=bool(push.get("private")), exist_ok=True))
    except Exception as err:
        raise hub_error(err, push["repo"]) from None


def _evaluator_infos(recipe: Any) -> tuple[Any, Any]:
    """The identities (``EvaluatorInfo``) of the recipe's evaluator and test evaluator, or None."""
    from .evaluate import load_evaluator
    from .manifest import EvaluatorInfo

    infos = []
    for entry in (recipe.evaluator, recipe.test):
        if entry is None:
            infos.append(None)
            continue
        ev = load_evaluator(entry.name, **entry.args)
        try:
            infos.append(EvaluatorInfo.from_identity(ev.identity()))
        finally:
            ev.close()
    return infos[0], infos[1]


def _same_evaluator(a: Any, b: Any) -> bool:
    """Same evaluator code (name, version, direction, source hashes: ``identity_key``); its arguments
    are compared as the recipe writes them (``recipe changed``), not as resolved on one machine."""
    if a is None or b is None:
        return a is b
    if a.key and b.key:
        return a.key == b.key
    return (a.name, a.version, a.primary) == (b.name, b.version, b.primary)


def _changes(recipe: Any, pinned: Sequence[Pinned], infos: tuple[Any, Any], prev: Manifest | None) -> list[str]:
    """Why the soup must be made again (empty: it is up to date)."""
    if prev is None:
        return ["no previous soup"]
    reasons = []
    old = {i.pin: i for i in prev.ingredients}
    new = {p.key: p for p in pinned}
    gone = {(i.repo or i.source): i for pin, i in old.items() if pin not in new}
    for key, p in new.items():
        if key not in old:
            identity = p.source[len("hf://"):].partition("@")[0] if p.source.startswith("hf://") else p.source
            reasons.append(f"{'~' if gone.pop(identity, None) is not None else '+'} {p.display}")
    reasons += [f"- {i.repo + '@' + (i.revision or '')[:7] if i.repo else i.name}" for i in gone.values()]
    if [i.pin for i in prev.ingredients] != list(new) and not reasons:
        reasons.append("ingredients reordered")
    if prev.recipe != jsonable(dict(recipe.raw)):
        reasons.append("recipe changed")
    ev = prev.evaluation
    if not _same_evaluator(ev.evaluator if ev else None, infos[0]):
        reasons.append("evaluator changed")
    if not _same_evaluator(ev.test.evaluator if ev and ev.test else None, infos[1]):
        reasons.append("test evaluator changed")
    return reasons


def _counts(manifest: Manifest | None) -> tuple[int, int]:
    """(evaluated, cached) over both evaluators' histories."""
    ev = manifest.evaluation if manifest is not None else None
    trials = (list(ev.history) + (list(ev.test.history) if ev.test else [])) if ev is not None else []
    return sum(1 for t in trials if not t.cached), sum(1 for t in trials if t.cached)


def publish_mlflow(recipe: Any, result: Any, message: str) -> str:
    """Register the soup as a new version of ``publish.mlflow``; ``models:/NAME/N``."""
    from .registry import tracking_uri
    from .registry.mlflow import _uri, publish_version

    name = recipe.publish["mlflow"]
    version = publish_version(result.path, result.manifest, name,
                              _uri(tracking_uri(recipe.tracking_uri), "publish.mlflow"), message=message)
    result.registered = f"models:/{name}/{version}"
    return result.registered


# ---- soup watch ------------------------------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_every(text: str | float | int) -> float:
    """``30m``, ``1h30m``, ``45s``, ``500ms``, ``2d`` or plain seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", s)
        if not s or not re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d)?)+", s):
            raise RecipeError(f"--every: {text!r} is not a duration (e.g. 30m, 1h, 45s, 1h30m)")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise RecipeError(f"--every: {text!r} must be a positive duration")
    return seconds


def _fmt_seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s:g}s"


def watch(recipe: str | Path, *, every: str | float = "30m", max_ticks: int | None = None,
          webhook: str | None = None, webhook_secret: str | None = None, log_json: bool = False,
          log: Callable[[dict[str, Any]], None] | None = None, retry_after: float | None = None,
          cache: Any = None, output: str | Path | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
    """Run ``soup run RECIPE --if-changed`` every ``every``, forever (or ``max_ticks`` times).

    The recipe is read again at each tick (an edit is a change like any other). A failing tick is
    logged and retried after ``retry_after`` seconds (default: ``every``, at most 30 s), doubling up to
    ``every`` while it keeps failing. SIGINT/SIGTERM/SIGHUP stop the watcher between steps (inside a
    tick, the soup in progress unwinds: nothing half-written); ``soup.signals.Interrupted`` propagates.

    Args:
        recipe: the recipe file.
        every: the period: ``30m``, ``1h``, ``45s`` or seconds.
        max_ticks: stop after this many ticks (tests, CI); None: run until stopped.
        webhook: ``HOST:PORT`` to accept Hugging Face Hub and MLflow registry webhooks on (port 0: any
            free port; the first log entry says which); an event that concerns the recipe's
            ingredients runs a tick at once.
        webhook_secret: the webhooks' secret (required with ``webhook``); never printed.
        log_json: log JSON lines (default: one human line per tick), on stderr.
        log: called with each log entry instead of printing it.
        cache, output, endpoint: override the recipe's.

    Returns:
        The log entries (the last 1000), once ``max_ticks`` ticks have run.
    """
    from .recipe import load_recipe
    from .signals import graceful

    period = parse_every(every)
    base = min(period, 30.0) if retry_after is None else float(retry_after)
    if max_ticks is not None and (not isinstance(max_ticks, int) or isinstance(max_ticks, bool) or max_ticks < 1):
        raise RecipeError(f"--max-ticks: must be a positive integer, got {max_ticks!r}")
    if webhook and not webhook_secret:
        raise RecipeError("--webhook: a secret is required (--webhook-secret or SOUP_WEBHOOK_SECRET); "
                          "configure the same one on the hub or MLflow webhook")
    entries: deque[dict[str, Any]] = deque(maxlen=1000)
    emit = log or _printer(log_json)

    def record(entry: dict[str, Any]) -> None:
        entry = {"time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **entry}
        entries.append(entry)
        emit(entry)

    wake = threading.Event()
    pending: list[str] = []  # what woke the watcher (event names), for the next tick's log
    current: dict[str, Any] = {}  # the last recipe read, for matching events (read-only elsewhere)

    def on_event(event: Event) -> bool:
        r = current.get("recipe")
        if r is None or not event_matches(r, event):
            return False
        pending.append(event.name)
        wake.set()
        return True

    def load() -> Any:
        r = load_recipe(recipe)
        if endpoint:
            r.endpoint = endpoint
        current["recipe"] = r
        return r

    server = None
    with graceful():
        try:
            try:
                load()
            except SoupError:
                pass  # reported by the first tick
            if webhook:
                from .webhooks import WebhookServer

                server = WebhookServer(webhook, webhook_secret, on_event)
                server.start()
            record({"event": "start", "recipe": str(recipe), "every": _fmt_seconds(period),
                    "webhook": server.url if server else None,
                    "message": f"watching {recipe} every {_fmt_seconds(period)}"
                               + (f"; webhooks on {server.url}" if server else "")})
            tick, failures, trigger = 0, 0, "schedule"
            while max_ticks is None or tick < max_ticks:
                tick += 1
                started = time.monotonic()
                entry = _tick(load, tick, trigger, cache, output)
                if entry["status"] == "failed":
                    failures += 1
                    delay = min(base * 2 ** (failures - 1), max(period, base))
                    entry["retry_in"] = round(delay, 3)
                    entry["message"] += f"; retry in {_fmt_seconds(round(delay, 3))}"
                else:
                    failures, delay = 0, period
                entry["seconds"] = round(time.monotonic() - started, 3)
                record(entry)
                if max_ticks is not None and tick >= max_ticks:
                    break
                woke = wake.wait(timeout=delay)
                wake.clear()
                trigger = "schedule" if failures == 0 else "retry"
                if woke and pending:
                    names = sorted(set(pending))
                    pending.clear()
                    trigger = f"webhook {', '.join(names)}"
        finally:
            if server is not None:
                server.close()
    return list(entries)


def _tick(load: Callable[[], Any], tick: int, trigger: str, cache: Any, output: Any) -> dict[str, Any]:
    """One ``--if-changed`` run; any failure (not a stop signal) becomes a log entry."""
    entry: dict[str, Any] = {"event": "tick", "tick": tick, "trigger": trigger}
    try:
        update = run_if_changed(load(), cache=cache, output=output)
    except Exception as err:  # hub down, evaluator crash, a bug: logged; the watcher lives on
        message = str(err) if isinstance(err, (SoupError, OSError)) else f"{type(err).__name__}: {err}"
        line = redact(message.strip().splitlines()[0] if message.strip() else type(err).__name__)
        entry.update(status="failed", message=f"failed: {line}", error=line)
        return entry
    status = "up-to-date" if not update.changed else ("published" if update.line.startswith("published")
                                                      else "written")
    entry.update(status=status, message=update.line, previous=update.previous, published=update.published,
                 changes=update.reasons, evaluated=update.evaluated, cached=update.cached)
    if update.changed:
        entry["message"] += f" [{update.evaluated} evaluated, {update.cached} from cache]"
    return entry


def _printer(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def emit(entry: dict[str, Any]) -> None:
        if as_json:
            line = json.dumps(entry, default=str)
        elif entry.get("event") == "tick":
            line = f"{entry['time']} tick {entry['tick']} ({entry['trigger']}): {entry['message']}"
        else:
            line = f"{entry['time']} {entry['message']}"
        print(line, file=sys.stderr, flush=True)

    return emit


def event_matches(recipe: Any, event: Event) -> bool:
    """Whether a webhook event may change what the recipe's ingredients resolve to: a query matches
    it, or it names a hub ingredient that follows a branch. The soup's own repo never matches."""
    if event.registry == "hub" and recipe.push_to and event.name == recipe.push_to.get("repo"):
        return False
    if event.registry == "mlflow" and recipe.publish and event.name == recipe.publish.get("mlflow"):
        return False
    for item in recipe.ingredients:
        if isinstance(item, Query):
            if item.matches(event):
                return True
        elif event.registry == "hub" and str(item).startswith("hf://"):
            from .hub.specs import SHA, parse_hub_spec

            repo, revision = parse_hub_spec(str(item))
            if repo == event.name and not (revision and SHA.match(revision)):
                return True
    return False
