"""``soup watch RECIPE --every 30m``: re-soup in a loop when the ingredients change.

Each tick is one ``soup run RECIPE --if-changed`` (``soup.run.run_if_changed``): one log line per tick
on stderr (JSON lines with ``log_json``); a failing tick (hub down, evaluator crash) is logged and
retried with backoff while the watcher lives on; SIGINT/SIGTERM stop it with nothing half-written.
With a webhook address it also accepts Hugging Face Hub and MLflow registry webhooks
(``soup.schedule.webhooks``) and ticks at once for an event that concerns the recipe's ingredients.

The hub commit's parent is the head the previous soup was read at, so two runs that saw the same soup
publish once (the other fails before evaluating anything, or at the commit with the hub's 412); on one
machine the output lock already stops the second. State lives in the published soup.json and the
score cache only: any machine can take over the schedule.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from soup.errors import RecipeError, SoupError, redact
from soup.registry import Event, Query
from soup.run import run_if_changed

__all__ = ["watch", "parse_every", "event_matches"]


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
          cache: Any = None, output: str | Path | None = None, endpoint: str | None = None,
          replace_corrupt: bool = False) -> list[dict[str, Any]]:
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
        replace_corrupt: a published soup whose ``soup.json`` cannot be read counts as no soup
            (``soup.run.run_if_changed``); without it such a tick fails, naming it.

    Returns:
        The log entries (the last 1000), once ``max_ticks`` ticks have run.
    """
    from soup.recipe import load_recipe
    from soup.signals import graceful

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
                from soup.schedule.webhooks import WebhookServer

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
                entry = _tick(load, tick, trigger, cache, output, replace_corrupt)
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


def _tick(load: Callable[[], Any], tick: int, trigger: str, cache: Any, output: Any,
          replace_corrupt: bool = False) -> dict[str, Any]:
    """One ``--if-changed`` run; any failure (not a stop signal) becomes a log entry."""
    entry: dict[str, Any] = {"event": "tick", "tick": tick, "trigger": trigger}
    try:
        update = run_if_changed(load(), cache=cache, output=output, replace_corrupt=replace_corrupt)
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
            from soup.hub.specs import SHA, parse_hub_spec

            repo, revision = parse_hub_spec(str(item))
            if repo == event.name and not (revision and SHA.match(revision)):
                return True
    return False
