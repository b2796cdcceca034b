"""Greedy soup on W local workers against sequential greedy: wall time of each phase, evaluations.

Eight tiny real ingredients; an evaluator that builds each candidate's weights, sleeps a fixed time
(the cost of a real benchmark run) and returns a deterministic score from the candidate's weights
(some ingredients help, two hurt, so greedy keeps some and rejects some). Greedy runs on W = 1, 2, 3,
4 workers (``devices=["cpu"] * W``: one evaluator each), without a score cache, one after the other
in one process; every run must give the same weights, trajectory and soup bytes as W = 1.

    python benchmarks/bench_parallel.py --sleep 1
    python benchmarks/bench_parallel.py --sleep 0.2 --workers 1,3,7   # quick; 7 workers: 3 steps/round

Ingredient phase: from the first ingredient evaluation's start to the last one's end; greedy phase:
from then until the last greedy candidate's score; total: the whole ``greedy_soup`` call (resolving
the ingredients and the final merge included). An untimed warm-up run comes first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from soup.soups.evaluate import Evaluator
from soup.pipeline import greedy_soup
from soup.soups.strategies import GreedySoup

QUALITY = [0.70, 0.69, 0.685, 0.68, 0.675, 0.67, 0.66, 0.65]  # each ingredient's score alone
HURTS = {2, 5}  # fine-tunes that drag any soup they join down (e.g. trained on noisy labels)


class SleepyEvaluator(Evaluator):
    """Costs ``sleep`` seconds per candidate; the score is a fixed function of the candidate's weights:
    the weighted mean quality, plus a bonus for averaging more ingredients, minus a penalty for each
    ingredient in HURTS (a single ingredient scores its QUALITY)."""

    name = "sleepy"
    log: ClassVar[list[tuple[str, float, float]]] = []  # (candidate name, start, end), every evaluation
    lock = threading.Lock()

    def score(self, candidate):
        start = time.perf_counter()
        candidate.state_dict("cpu")  # build the real candidate (tiny: milliseconds)
        time.sleep(float(self.args.get("sleep", 1.0)))
        idx = {int(label[3:]): w for label, w in candidate.weights.items()}  # labels ing0..ing7
        value = sum(QUALITY[i] * w for i, w in idx.items()) + 0.05 * (1 - 1 / len(idx)) \
            - (0.1 * sum(i in HURTS for i in idx) if len(idx) > 1 else 0.0)
        with SleepyEvaluator.lock:
            SleepyEvaluator.log.append((candidate.name, start, time.perf_counter()))
        return round(value, 6)


def make_ingredients(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = {f"layer{k}.weight": torch.randn(64, 64, generator=g) for k in range(4)}
        path = folder / f"ing{i}"
        path.mkdir(parents=True)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
        paths.append(path)
    return paths


def run(paths: list[Path], workers: int, sleep: float, out: Path) -> dict:
    SleepyEvaluator.log = []
    t0 = time.perf_counter()
    res = greedy_soup(paths, SleepyEvaluator, evaluator_args={"sleep": sleep}, devices=["cpu"] * workers,
                      out=out, cache=None)
    total = time.perf_counter() - t0
    log = SleepyEvaluator.log
    greedy = [e for e in log if e[0].startswith("greedy candidate")]
    ingredients = [e for e in log if not e[0].startswith("greedy candidate")]
    first, ing_end = min(e[1] for e in ingredients), max(e[2] for e in ingredients)
    greedy_end = max((e[2] for e in greedy), default=ing_end)
    return {"workers": workers, "steps_per_round": GreedySoup.lookahead(workers),
            "ingredient_s": ing_end - first, "greedy_s": greedy_end - ing_end, "total_s": total,
            "ingredient_evals": len(ingredients), "greedy_evals": len(greedy),
            "weights": res.weights, "trajectory": res.trajectory, "soup_score": res.soup_score.value,
            "soup_bytes": (out / "model.safetensors").read_bytes()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds per evaluation (default 1)")
    ap.add_argument("--workers", default="1,2,3,4", help="comma-separated worker counts; the first is the "
                    "reference (default 1,2,3,4)")
    ap.add_argument("--ingredients", type=int, default=8, help="how many ingredients (at most 8)")
    ap.add_argument("--json", type=Path, help="also write the measurements to this file")
    a = ap.parse_args()
    counts = [int(w) for w in a.workers.split(",")]
    if not 2 <= a.ingredients <= len(QUALITY) or min(counts) < 1 or a.sleep < 0:
        ap.error("--ingredients must be 2..8, --workers >= 1, --sleep >= 0")
    with tempfile.TemporaryDirectory(prefix="soup-bench-parallel-") as tmp:
        paths = make_ingredients(Path(tmp) / "ingredients", a.ingredients)
        run(paths, 1, 0.0, Path(tmp) / "warm-up")  # imports, kernel build: not in the first measurement
        rows = []
        for w in counts:
            print(f"greedy on {w} worker(s)...", file=sys.stderr)
            rows.append(run(paths, w, a.sleep, Path(tmp) / f"out-{w}"))
    ref = rows[0]
    kept = [t["tried"] for t in ref["trajectory"] if t["kept"]]
    rejected = [t["tried"] for t in ref["trajectory"] if not t["kept"]]
    print(f"greedy soup of {a.ingredients} ingredients, {a.sleep:g} s per evaluation, no score cache; "
          f"kept {', '.join(kept)}; rejected {', '.join(rejected) or 'none'}")
    print()
    head = (f"{'workers':>7} {'steps/round':>11} {'ingredients s':>13} {'x ref':>6} {'greedy s':>9} {'x ref':>6} "
            f"{'total s':>8} {'x ref':>6} {'evaluations':>16}  same result")
    print(head)
    print("-" * len(head))
    same_all = True
    for r in rows:
        same = all(r[k] == ref[k] for k in ("weights", "trajectory", "soup_score", "soup_bytes"))
        same_all &= same
        evals = f"{r['ingredient_evals']} + {r['greedy_evals']}"
        print(f"{r['workers']:>7} {r['steps_per_round']:>11} {r['ingredient_s']:>13.2f} "
              f"{r['ingredient_s'] / ref['ingredient_s']:>6.2f} {r['greedy_s']:>9.2f} "
              f"{r['greedy_s'] / ref['greedy_s']:>6.2f} {r['total_s']:>8.2f} {r['total_s'] / ref['total_s']:>6.2f} "
              f"{evals:>16}  {'yes' if same else 'NO'}")
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "soup_bytes"} for r in rows], indent=1))
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
