"""Reports from a soup's manifest: a text table for ``soup report`` and a PNG plot for the model card.

The plot (ingredient scores as bars, the greedy trajectory as a line) needs matplotlib (the
``plot`` extra); without it no plot is written and nothing fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SoupError

__all__ = ["format_report", "write_plot"]


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_report(manifest: Any, *, where: str | Path | None = None) -> str:
    """The soup as text: method, ingredients (weight, score, test score, kept), trajectory, soup score.

    Args:
        manifest: a soup's ``soup.json`` as read (any JSON value: its shape is checked here).
        where: the manifest's path, to name it in errors.

    Raises:
        SoupError: the manifest is not shaped like a soup's (one line naming the field).
    """
    prefix = f"{where}: " if where is not None else ""
    try:
        _check_shape(manifest)
        return _format(manifest)
    except _BadShape as e:
        raise SoupError(f"{prefix}not a soup manifest ({e})") from None
    except (TypeError, KeyError, AttributeError, ValueError) as e:  # a shape _check_shape let through
        raise SoupError(f"{prefix}not a soup manifest ({type(e).__name__}: {e})") from None


class _BadShape(Exception):
    """A manifest field of the wrong type; the message names the field."""


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _field(obj: dict[str, Any], key: str, kind: type, path: str) -> Any:
    """``obj[key]`` when absent, null or a ``kind``; else _BadShape naming ``path``."""
    value = obj.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise _BadShape(f"{path}: expected {_JSON_TYPES[kind]}, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_shape(manifest: Any) -> None:
    """The fields ``_format`` reads have the types soup writes (missing ones are shown as ``-``)."""
    if not isinstance(manifest, dict):
        raise _BadShape(f"expected a JSON object, got {_json_type(manifest)}")
    _field(manifest, "method", dict, "method")
    _field(manifest, "files", dict, "files")
    _field(manifest, "total_size", int, "total_size")
    for k, ing in enumerate(_field(manifest, "ingredients", list, "ingredients") or []):
        if not isinstance(ing, dict) or "name" not in ing:
            raise _BadShape(f"ingredients[{k}]: expected an object with a name")
    ev = _field(manifest, "evaluation", dict, "evaluation") or {}
    _field(ev, "evaluator", dict, "evaluation.evaluator")
    _field(ev, "test", dict, "evaluation.test")
    for k, step in enumerate(_field(ev, "trajectory", list, "evaluation.trajectory") or []):
        where = f"evaluation.trajectory[{k}]"
        if not isinstance(step, dict) or any(key not in step for key in ("step", "tried", "score", "kept")):
            raise _BadShape(f"{where}: expected an object with step, tried, score and kept")
        _field(step, "pool", list, f"{where}.pool")


def _format(manifest: dict[str, Any]) -> str:
    method = manifest.get("method") or {}
    ev = manifest.get("evaluation") or {}
    lines = [f"soup {manifest.get('soup_version', '?')}  method: {method.get('name', '?')}  "
             f"({method.get('reference', '')})"]
    if ev.get("evaluator"):
        e = ev["evaluator"]
        lines.append(f"evaluator: {e.get('name')} ({ev.get('direction')}) args={e.get('args')}")
    rows = [[i["name"], i.get("weight"), i.get("score"), i.get("test_score"), i.get("kept"), i.get("source")]
            for i in manifest.get("ingredients") or []]
    lines += [""] + _table(["ingredient", "weight", "score", "test", "kept", "source"], rows)
    if ev.get("trajectory"):
        lines += ["", "greedy trajectory:"]
        lines += _table(["step", "tried", "score", "kept", "pool size"],
                        [[t["step"], t["tried"], t["score"], t["kept"], len(t.get("pool") or [])]
                         for t in ev["trajectory"]])
    lines.append("")
    if ev.get("soup_score") is not None:
        lines.append(f"soup score: {_fmt(ev['soup_score'])}")
    if (ev.get("test") or {}).get("soup_score") is not None:
        lines.append(f"soup test score: {_fmt(ev['test']['soup_score'])}")
    lines.append(f"{manifest.get('tensors', '?')} tensors, {manifest.get('total_size') or 0:,} bytes, "
                 f"{len(manifest.get('files') or {})} file(s), dtype {manifest.get('dtype')}")
    return "\n".join(lines)


def write_plot(manifest: dict[str, Any], path: Path) -> bool:
    """Write the PNG plot; False (and nothing written) when matplotlib is missing or nothing was scored."""
    ev = manifest.get("evaluation") or {}
    scores = ev.get("ingredient_scores") or {}
    if not scores:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    traj = ev.get("trajectory") or []
    fig, axes = plt.subplots(1, 2 if traj else 1, figsize=(11 if traj else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = list(scores)
    kept = {i["name"]: i.get("kept") for i in manifest.get("ingredients", [])}
    ax.bar(range(len(names)), [scores[n] for n in names],
           color=["tab:green" if kept.get(n) else "tab:gray" for n in names])
    if ev.get("soup_score") is not None:
        ax.axhline(ev["soup_score"], color="tab:red", linestyle="--", label="soup")
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title(f"ingredient scores ({ev.get('direction', '')})")
    if traj:
        ax2 = axes[0][1]
        ax2.plot([t["step"] for t in traj], [t["score"] for t in traj], "o-", color="tab:blue")
        for t in traj:
            ax2.annotate(("+" if t["kept"] else "x") + t["tried"], (t["step"], t["score"]), fontsize=7,
                         textcoords="offset points", xytext=(0, 6), ha="center")
        ax2.set_xlabel("greedy step")
        ax2.set_title("greedy trajectory (candidate score)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
