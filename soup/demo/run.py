"""``soup demo``: the digits experiment end to end with the real strategies (maximum, average, greedy).

Builds the ingredients (``train.build_ingredients``), cooks the three soups with ``DigitsAccuracy``
on the validation split for selection and the test split for the report, writes the greedy soup, and
returns one row of the comparison table. Scores go to a local sqlite cache beside the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soup.pipeline import average_soup, greedy_soup, maximum_soup
from soup.progress import Reporter
from soup.demo.evaluator import DigitsAccuracy
from soup.demo.train import INGREDIENTS, build_ingredients

__all__ = ["format_rows", "run_demo"]


def run_demo(out: str | Path, *, seed: int = 0, cache: Any = "local", overwrite: bool = True,
             progress: bool | Reporter = False) -> dict[str, Any]:
    """Cook the three soups for one seed; the greedy soup is written to ``out/greedy-seed<seed>``."""
    out = Path(out)
    ing_dir = out / f"ingredients-seed{seed}"
    if (ing_dir / "ft-wd" / "model.safetensors").exists():  # built by an earlier run: reused
        paths = [ing_dir / p.name for p in _build_order(sorted(ing_dir.iterdir()))]
    else:
        paths = build_ingredients(ing_dir, seed=seed)
    if cache == "local":
        cache = str(out / "scores.sqlite")
    common = dict(evaluator=DigitsAccuracy, evaluator_args={"split": "val", "seed": seed},
                  test_evaluator=DigitsAccuracy, test_args={"split": "test", "seed": seed},
                  cache=cache, progress=progress)
    greedy = greedy_soup(paths, out=out / f"greedy-seed{seed}", overwrite=overwrite, **common)
    maximum = maximum_soup(paths, **common)
    average = average_soup(paths, **common)
    best = max(greedy.scores, key=greedy.scores.get)
    return {"seed": seed, "best": best, "best_val": greedy.scores[best], "best_test": greedy.test_scores[best],
            "maximum_test": maximum.test_score.value, "average_test": average.test_score.value,
            "greedy_val": greedy.soup_score.value, "greedy_test": greedy.test_score.value,
            "kept": [k for k, w in greedy.weights.items() if w > 0], "path": greedy.path}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The comparison table (test accuracy), one row per seed."""
    head = "seed  best single (val/test)    maximum  average  greedy (val/test)  kept by greedy"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['seed']:>4}  {r['best']:<10} {r['best_val']:.3f}/{r['best_test']:.3f}  "
                     f"{r['maximum_test']:.3f}    {r['average_test']:.3f}    {r['greedy_val']:.3f}/{r['greedy_test']:.3f}"
                     f"        {', '.join(r['kept'])}")
    return "\n".join(lines)


def _build_order(paths: list[Path]) -> list[Path]:
    names = [r.name for r in INGREDIENTS]
    return sorted(paths, key=lambda p: names.index(p.name) if p.name in names else len(names))
