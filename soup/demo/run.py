"""``soup demo``: the digits experiment end to end with the real strategies (maximum, average, greedy).

Builds the ingredients (``train.build_ingredients``), cooks the three soups with ``DigitsAccuracy``
on the validation split for selection and the test split for the report, writes the greedy soup, and
returns one row of the comparison table. Scores go to a local sqlite cache beside the output.

The output folder follows ``merge``'s rules (``soup.engine.output``): never the working directory or
one of its ancestors, the root or a path through a missing link, and the greedy soup's folder is
checked as ``merge`` checks an output, all before anything is built. After a failure, nothing this
run created is left behind (ingredients, the score cache, the soup, the folders it made); what an
earlier run built is kept.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from soup.engine.output import OutputDir, check_place
from soup.errors import SoupError
from soup.pipeline import average_soup, greedy_soup, maximum_soup
from soup.progress import Reporter, RichReporter
from soup.demo.evaluator import DigitsAccuracy
from soup.demo.train import INGREDIENTS, build_ingredients

__all__ = ["format_rows", "format_markdown", "run_demo"]


def run_demo(out: str | Path, *, seed: int = 0, cache: Any = "local", overwrite: bool = True,
             progress: bool | Reporter = False) -> dict[str, Any]:
    """Cook the three soups for one seed; the greedy soup is written to ``out/greedy-seed<seed>``.

    Raises:
        SoupError: ``out`` or the soup's folder is refused (see the module docstring), before any work.
    """
    out = Path(out)
    check_place(out, what="demo output")
    if out.exists() and not out.is_dir():
        raise SoupError(f"demo output {out}: is a file, not a folder")
    ing_dir = out / f"ingredients-seed{seed}"
    reuse = (ing_dir / "ft-wd" / "model.safetensors").exists()  # built by an earlier run: reused
    if (ing_dir.exists() or ing_dir.is_symlink()) and not reuse:
        raise SoupError(f"demo output {out}: {ing_dir.name} exists and is not a set of demo ingredients; "
                        "move it away or choose another folder")
    soup_dir = out / f"greedy-seed{seed}"
    OutputDir(soup_dir, overwrite=overwrite, protect=[ing_dir])  # merge's checks, before anything is built
    ours = [ing_dir, soup_dir]  # removed after a failure unless an earlier run made them
    if cache == "local":
        cache = str(out / "scores.sqlite")
        ours += [out / f"scores.sqlite{suffix}" for suffix in ("", "-wal", "-shm", "-journal")]
    existed = {p for p in ours if p.exists() or p.is_symlink()}
    made_dirs = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
        reporter = progress if isinstance(progress, Reporter) else RichReporter() if progress else Reporter()
        if reuse:
            paths = [ing_dir / p.name for p in _build_order(sorted(ing_dir.iterdir()))]
        else:
            reporter.step(f"seed {seed}: pre-training one MLP and fine-tuning it six ways")
            paths = _build(ing_dir, seed)
        common = dict(evaluator=DigitsAccuracy, evaluator_args={"split": "val", "seed": seed},
                      test_evaluator=DigitsAccuracy, test_args={"split": "test", "seed": seed},
                      cache=cache, progress=reporter)
        reporter.step(f"seed {seed}: the greedy soup (written to {soup_dir})")
        # every candidate on all 350 validation examples (racing off): the table shows each ingredient's score
        greedy = greedy_soup(paths, out=soup_dir, overwrite=overwrite, racing=False, **common)
        reporter.step(f"seed {seed}: the maximum soup")
        maximum = maximum_soup(paths, racing=False, **common)
        reporter.step(f"seed {seed}: the average soup")
        average = average_soup(paths, **common)
    except BaseException:
        for p in ours:
            if p not in existed:
                _remove(p)
        for d in made_dirs:
            try:
                d.rmdir()
            except OSError:
                break
        raise
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


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The same table in Markdown, as the documentation shows it (``soup demo --seeds 5 --markdown``;
    ``tests/test_demo.py`` compares the two, so the documented numbers are the demo's)."""
    lines = ["| seed | best single (val/test) | maximum | average | greedy (val/test) | kept by greedy |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['best']} {r['best_val']:.3f}/{r['best_test']:.3f} | {r['maximum_test']:.3f} "
                     f"| {r['average_test']:.3f} | {r['greedy_val']:.3f}/**{r['greedy_test']:.3f}** "
                     f"| {', '.join(r['kept'])} |")
    return "\n".join(lines)


def _build(ing_dir: Path, seed: int) -> list[Path]:
    """Build the ingredients into a temporary folder beside ``ing_dir``, renamed into place when
    complete (a stopped build leaves no half-built set for the next run to reuse)."""
    tmp = ing_dir.parent / f".{ing_dir.name}.soup-tmp-{uuid.uuid4().hex[:8]}"
    try:
        built = build_ingredients(tmp, seed=seed)
        os.rename(tmp, ing_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [ing_dir / p.name for p in built]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _build_order(paths: list[Path]) -> list[Path]:
    names = [r.name for r in INGREDIENTS]
    return sorted(paths, key=lambda p: names.index(p.name) if p.name in names else len(names))
