"""Reports from a soup's ``Manifest``: a text report for ``soup report`` and a PNG plot for the model card.

Both show, for any strategy, every evaluation in the order it ran (the ingredients alone, the
candidates, the soup), greedy's trajectory when there is one, and the held-out test scores.

The plot scales each panel to the scores that matter: the soup, the kept ingredients and the bulk of
the other scores. An outlier — one ingredient fine-tuned on shuffled labels at 0.1 beside good ones at
0.96-0.98 — is drawn on the panel's edge with its value written beside it, instead of squashing the
good ones into one flat line. The plot needs matplotlib (the ``plot`` extra); without it no plot is
written and nothing fails.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from soup.errors import printable
from soup.finish.card import describe_soup
from soup.io.manifest import Manifest, Scoring, Trial

__all__ = ["format_report", "format_update", "write_plot", "make_figure", "can_plot", "score_limits"]


# ---- text --------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):  # 1e308 or 1e-300 as such, not 309 digits or 0.0000
        return f"{x:.4f}" if x == 0 or 1e-4 <= abs(x) < 1e9 or not math.isfinite(x) else f"{x:.4g}"
    return printable(str(x), lines=False)  # names and sources come from files: one inert cell


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_report(manifest: Manifest | Mapping[str, Any] | Any, *, where: str | Path | None = None) -> str:
    """The soup as text: method, ingredients (weight, score, test score, kept), every evaluation in
    order, greedy's trajectory, the soup's scores.

    Args:
        manifest: a ``Manifest``, or a parsed ``soup.json`` (any JSON value: its shape is checked).
        where: the manifest's path, to name it in errors.

    Raises:
        SoupError: the manifest is not shaped like a soup's (one line naming the field).
    """
    m = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, where=where)
    ev = m.evaluation
    lines = [f"soup {m.soup_version}  method: {m.method.name}  ({m.method.reference or ''})",
             describe_soup(m)]
    if m.merge_method and m.merge_method.get("reference"):
        lines.append(f"merge method reference: {m.merge_method['reference']}")
    if m.vocabulary:  # ingredients with different vocabularies: the rows were souped by token
        v = m.vocabulary
        added = ", ".join(f"{a.get('token')} ({'/'.join(map(str, a.get('from') or []))})" for a in v.get("added") or [])
        lines.append(f"vocabulary: {v.get('mode')}, ids of {v.get('ids_from')}, {v.get('rows')} rows; added tokens: "
                     f"{added or 'none'}")
    for role, rec in (("evaluator", ev), ("test evaluator", ev.test if ev else None)):
        if rec is not None and rec.evaluator is not None:
            lines.append(f"{role}: {rec.evaluator.name} ({rec.direction}) args={rec.evaluator.args}")
    rows = [[i.name, i.weight, i.score, i.test_score, i.kept, i.source] for i in m.ingredients]
    lines += [""] + _table(["ingredient", "weight", "score", "test", "kept", "source"], rows)
    for title, rec in (("evaluations, in order", ev), ("test evaluations, in order", ev.test if ev else None)):
        if rec is not None and rec.history:
            lines += ["", f"{title}:"]
            raced = any(t.of is not None for t in rec.history)  # racing: examples used, why it stopped
            head = ["#", "kind", "candidate", "score", "cached"] + (["examples"] if raced else []) + ["weights"]
            lines += _table(head,
                            [[k, _kind(m, t), t.candidate, t.score, t.cached]
                             + ([_examples(t)] if raced else []) + [_weights(t)]
                             for k, t in enumerate(rec.history, start=1)])
    if ev is not None and ev.trajectory:
        pools = any(t.pool for t in ev.trajectory)  # greedy's pools; other strategies have none
        lines += ["", f"{m.method.name} trajectory:"]
        lines += _table(["step", "tried", "score", "kept"] + (["pool size"] if pools else []),
                        [[t.step, t.tried, t.score, t.kept] + ([len(t.pool)] if pools else [])
                         for t in ev.trajectory])
    lines.append("")
    if ev is not None and ev.soup_score is not None:
        lines.append(f"soup score: {_fmt(ev.soup_score)}")
    elif ev is not None and ev.evaluator is not None:  # never a neighbour's score in its place
        lines.append("soup score: not evaluated (the strategy did not score the soup it chose)")
    if ev is not None and ev.test is not None and ev.test.soup_score is not None:
        lines.append(f"soup test score: {_fmt(ev.test.soup_score)}")
    if ev is not None and ev.examples is not None and ev.examples["full"]:
        used, full = ev.examples["evaluated"], ev.examples["full"]
        lines.append(f"examples evaluated: {used:,} of the {full:,} a full evaluation of every candidate would use "
                     f"({used / full:.0%}); {sum(1 for t in ev.history if t.partial)} evaluation(s) stopped early")
    lines.append(f"{m.tensors} tensors, {m.total_size:,} bytes, {len(m.files)} file(s), dtype {m.dtype}")
    return printable("\n".join(lines))  # every field came from a soup.json, maybe a downloaded one


def format_update(previous: Manifest | None, current: Manifest) -> str:
    """What changed from one published soup to the next, in one line (a commit message, a watcher's log):
    ``+ acme/sft-ocr@abc1234 (0.612); greedy kept 4/7; score 0.618 (+0.004)``.

    ``+`` a new ingredient (with its score alone), ``-`` one gone, ``~`` the same repo or folder at a new
    revision; then "recipe changed" / "evaluator changed", how many ingredients the soup kept, and its
    score with the difference from the previous soup's (when both were scored by the same evaluator).
    """
    parts = []
    if previous is not None:
        old = {i.pin: i for i in previous.ingredients}
        new = {i.pin: i for i in current.ingredients}
        gone = {_identity(i): i for pin, i in old.items() if pin not in new}
        changes = []
        for pin, i in new.items():
            if pin not in old:
                changes.append(f"{'~' if gone.pop(_identity(i), None) is not None else '+'} {_short_ingredient(i)}"
                               + (f" ({_score(i.score)})" if i.score is not None else ""))
        changes += [f"- {_short_ingredient(i)}" for i in gone.values()]
        if changes:
            parts.append(", ".join(changes))
        if previous.recipe != current.recipe:
            parts.append("recipe changed")
        if _evaluator_key(previous) != _evaluator_key(current):
            parts.append("evaluator changed")
    n = len(current.ingredients)
    kept = [i for i in current.ingredients if i.kept] if any(i.kept is not None for i in current.ingredients) else None
    parts.append(f"{current.method.name} kept {len(kept)}/{n}" if kept is not None else f"{current.method.name} of {n}")
    ev = current.evaluation
    if ev is not None and ev.soup_score is not None:
        line = f"score {_score(ev.soup_score)}"
        before = previous.evaluation if previous is not None else None
        if before is not None and before.soup_score is not None and _evaluator_key(previous) == _evaluator_key(current):
            line += f" ({_delta(ev.soup_score - before.soup_score)})"
        parts.append(line)
    return printable("; ".join(parts), lines=False)


def _identity(i: Any) -> str:
    """What stays the same when an ingredient moves to a new revision: its repo, or its local path."""
    return i.repo or i.source


def _short_ingredient(i: Any) -> str:
    if i.repo:
        return f"{i.repo}@{(i.revision or '')[:7]}"
    return i.source if i.source.startswith("models:/") else i.name


def _evaluator_key(m: Manifest) -> Any:
    e = m.evaluation.evaluator if m.evaluation is not None else None
    return None if e is None else (e.key or (e.name, e.version, e.primary))


def _score(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 0.01 or x == 0 else f"{x:.3g}"


def _delta(d: float) -> str:
    return f"{d:+.3f}" if abs(d) >= 0.0005 or d == 0 else f"{d:+.1e}"


def _kind(m: Manifest, t: Trial) -> str:
    if t.ingredient is not None:
        return "ingredient (the soup)" if m.is_soup_trial(t) else "ingredient"
    return "soup" if m.is_soup_trial(t) else "candidate"


def _weights(t: Trial) -> str:
    if t.ingredient is not None:
        return t.ingredient
    return " ".join(f"{k}={w:.3g}" for k, w in t.weights.items())


# ---- plot --------------------------------------------------------------------------------------------


def can_plot(evaluation: Any) -> bool:
    """True if a plot would be written: something was evaluated and matplotlib is installed."""
    if evaluation is None or not (evaluation.history or (evaluation.test is not None and evaluation.test.history)):
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def score_limits(values: Sequence[float], keep: Sequence[float] = ()) -> tuple[float, float]:
    """Y-axis limits showing the scores that matter.

    ``keep`` (the soup, the kept ingredients) is always inside. Of the rest, a value further from the
    median than 8 median absolute deviations is an outlier and left outside; the others are inside.
    The limits stay within +-1.2e300 (matplotlib cannot put ticks on an axis reaching 1e308): a
    larger score, even a kept one, is drawn on the edge with its value written.

    Returns:
        (low, high), padded by 10 % of the span.
    """
    def clamp(v: float) -> float:  # differences of clamped values cannot overflow to inf
        return max(-AXIS_LIMIT, min(AXIS_LIMIT, v))

    vals = [clamp(v) for v in values if v is not None and math.isfinite(v)]
    must = [clamp(v) for v in keep if v is not None and math.isfinite(v)]
    if not vals and not must:
        return 0.0, 1.0
    pool = vals + must
    mid = statistics.median(pool)
    mad = statistics.median(abs(v - mid) for v in pool)
    scale = max(mad, 1e-3 * max(1.0, abs(mid)))
    inside = [v for v in vals if abs(v - mid) <= 8 * scale] + must
    lo, hi = min(inside), max(inside)
    pad = 0.1 * (hi - lo) if hi > lo else max(1e-3 * max(1.0, abs(hi)), 1e-9)
    return lo - pad, hi + pad


def _short(m: Manifest, t: Trial) -> str:
    if t.ingredient is not None:
        return t.ingredient
    if m.is_soup_trial(t):
        return "soup"
    added = re.search(r"\(\+([^)]*)\)$", t.candidate)
    name = "+" + added.group(1) if added else "+".join(t.weights)
    return name if len(name) <= 18 else name[:17] + "…"


AXIS_LIMIT = 1e300  # the largest score an axis reaches; beyond it a point sits on the edge
# point style -> (marker, colour, legend text)
STYLES = {
    "kept": ("o", "tab:green", "ingredient, in the soup"),
    "left out": ("o", "tab:gray", "ingredient, left out"),
    "ingredient": ("o", "tab:blue", "ingredient"),
    "candidate": ("s", "tab:blue", "candidate soup"),
    "soup": ("*", "tab:red", "the soup"),
    "step kept": ("o", "tab:green", "kept"),
    "step rejected": ("x", "tab:gray", "rejected"),
    "stopped early": ("o", "tab:orange", "stopped early: mean over the examples used/of"),  # drawn hollow
}


def _panel(ax: Any, title: str, points: list[tuple[str, float, str]], keep: Sequence[float],
           soup: float | None = None, xlabel: str = "") -> None:
    """Points (label, score, style) in order and the soup's score as a line, y scaled to what matters;
    an out-of-scale point sits on the panel's edge with its value written beside it."""
    from matplotlib.lines import Line2D

    lo, hi = score_limits([p[1] for p in points] + ([soup] if soup is not None else []), keep)
    ax.set_ylim(lo, hi)
    handles, styles, off_scale = [], [], False
    if soup is not None and lo <= soup <= hi:
        handles.append(ax.axhline(soup, color="tab:red", linestyle="--", linewidth=1, label=f"soup {soup:.4g}"))
    inset = 0.015 * (hi - lo)
    for x, (label, score, style) in enumerate(points):
        marker, colour, _ = STYLES[style]
        if style not in styles:
            styles.append(style)
        if not math.isfinite(score):
            continue
        if lo <= score <= hi:
            ax.plot(x, score, marker=marker, color=colour, markersize=11 if marker == "*" else 6, linestyle="",
                    markerfacecolor="none" if style == "stopped early" else colour)
            continue
        off_scale, below = True, score < lo
        edge = lo + inset if below else hi - inset
        ax.plot(x, edge, marker="v" if below else "^", color=colour, markersize=8, linestyle="")
        ax.annotate(f"{score:.3g}", (x, edge), xytext=(0, 8 if below else -14), textcoords="offset points",
                    ha="center", fontsize=7, color=colour)
    for style in styles:
        marker, colour, text = STYLES[style]
        handles.append(Line2D([], [], marker=marker, color=colour, linestyle="", label=text,
                              markerfacecolor="none" if style == "stopped early" else colour))
    if off_scale:
        handles.append(Line2D([], [], marker="v", color="black", linestyle="", label="off scale (value written)"))
    ax.set_xticks(range(len(points)), [p[0] for p in points], rotation=40, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(points) - 0.4)
    ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(handles=handles, fontsize=6, loc="best", framealpha=0.8)


def _examples(t: Trial) -> str:
    """``128/2000 separated``: the examples an evaluation used, of a full evaluation's, and why it stopped
    (a ``separated`` score is the mean over those examples only, not the candidate's score)."""
    return "" if t.of is None else f"{t.examples}/{t.of} {t.stopped or ''}".strip()


def _style(m: Manifest, label: str) -> str:
    kept = {i.name: i.kept for i in m.ingredients}.get(label)
    return "kept" if kept else ("left out" if kept is False else "ingredient")


def _history_points(m: Manifest, rec: Scoring) -> list[tuple[str, float, str]]:
    """Every evaluation in order; one a race stopped early is drawn hollow at the mean over the examples
    it used, those written in its label (``+b 256/2000``): never shown as a score."""
    pts = []
    for t in rec.history:
        if t.partial:
            pts.append((f"{t.ingredient or _short(m, t)} {t.examples}/{t.of}", t.score, "stopped early"))
        elif m.is_soup_trial(t):
            pts.append((_short(m, t), t.score, "soup"))
        elif t.ingredient is not None:
            pts.append((t.ingredient, t.score, _style(m, t.ingredient)))
        else:
            pts.append((_short(m, t), t.score, "candidate"))
    return pts


def _keep(m: Manifest, rec: Scoring) -> list[float]:
    """The scores a panel must show: the soup's and the kept ingredients'."""
    kept = {i.name for i in m.ingredients if i.kept or (i.kept is None and i.weight)}
    scores = rec.ingredient_scores()
    return [s for s in [rec.soup_score] + [scores.get(k) for k in kept] if s is not None]


def make_figure(manifest: Manifest) -> Any:
    """The plot as a matplotlib Figure (None when nothing was evaluated), one panel each: every
    validation evaluation in order, greedy's trajectory, the held-out test scores."""
    from matplotlib.figure import Figure

    m, ev = manifest, manifest.evaluation
    if ev is None:
        return None
    panels = []
    if ev.history:
        panels.append(("validation", ev))
    if ev.trajectory:
        panels.append(("trajectory", ev))
    if ev.test is not None and ev.test.history:
        panels.append(("test", ev.test))
    if not panels:
        return None
    fig = Figure(figsize=(4.8 * len(panels) + 0.6, 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, rec) in zip(axes, panels):
        who = f"{rec.evaluator.name if rec.evaluator else '?'}" + (f", {rec.direction}" if rec.direction else "")
        ax.set_ylabel(_metric_label(rec), fontsize=8)
        if kind == "validation":
            _panel(ax, f"validation: every evaluation, in order ({who})", _history_points(m, rec), _keep(m, rec),
                   rec.soup_score, "evaluation")
        elif kind == "trajectory":
            pts = [(("+" if t.kept else "x ") + t.tried + (f" {t.examples}/{t.of}" if t.partial else ""), t.score,
                    "stopped early" if t.partial else "step kept" if t.kept else "step rejected")
                   for t in rec.trajectory]
            kept = [(x, t.score) for x, t in enumerate(rec.trajectory) if t.kept and math.isfinite(t.score)]
            _panel(ax, f"{m.method.name} trajectory (candidate scores)", pts, [s for _, s in kept], None, "step")
            lo, hi = ax.get_ylim()  # an off-scale kept score: the line goes to the edge
            ax.plot([x for x, _ in kept], [max(lo, min(hi, s)) for _, s in kept], color="tab:green", linewidth=1,
                    alpha=0.5)
        else:
            scores = rec.ingredient_scores()
            pts = [(i.name, scores[i.name], _style(m, i.name)) for i in m.ingredients if i.name in scores]
            _panel(ax, f"held-out test, reported only ({who})", pts, _keep(m, rec), rec.soup_score, "ingredient")
    fig.tight_layout()
    return fig


def _metric_label(rec: Scoring) -> str:
    """The y axis: what the scores are (the evaluator's primary metric) and which way is better."""
    metric = (rec.evaluator.primary if rec.evaluator is not None else None) or "score"
    if metric == "score" and rec.evaluator is not None:
        metric = f"{rec.evaluator.name} score"
    better = {"minimize": " (lower is better)", "maximize": " (higher is better)"}.get(rec.direction or "", "")
    return metric + better


def write_plot(manifest: Manifest, path: Path, *, warn: Callable[[str], None] | None = None) -> bool:
    """Write the PNG plot to ``path``; False (nothing written) when nothing was evaluated or
    matplotlib is missing.

    With ``warn``, a failure to draw or save costs it one line and returns False (no file left),
    never the soup; without, the failure is raised."""
    if not can_plot(manifest.evaluation):
        return False
    try:
        fig = make_figure(manifest)
        if fig is None:
            return False
        fig.savefig(path, dpi=100)
    except Exception as e:
        if warn is None:
            raise
        path.unlink(missing_ok=True)  # no half-written PNG
        first = str(e).splitlines()[0] if str(e) else ""
        warn(f"plot not written ({type(e).__name__}: {first}); the soup is complete without it")
        return False
    return True
