"""Racing's confidence sequences compared (issue 21): the empirical-Bernstein CS racing used before
(``soup.soups.confidence.BernsteinSequence``) against the hedged-capital betting CS
(``soup.soups.confidence.BettingSequence``), both for sampling without replacement.

On synthetic finite populations of paired differences (``{-1, 0, 1}`` with a given fraction of
nonzeros and a given mean, as paired accuracy gives; and continuous loss differences, as perplexity
gives, with the plug-in scale), each seen in many uniformly random orders:

1. coverage: the fraction of orders in which the population mean ever leaves the interval, looking
   after every ``--batch`` values up to ``n`` (must be <= delta);
2. examples to separation: the number of values seen when the interval first excludes 0 (looking every
   ``--batch`` after a first look at 128, as a race does; ``n`` when it never does before the end):
   median and quartiles, at delta 0.05 and 0.05/28 (the union bound of a ranking of 8);
3. cost: seconds for ``n = 5000`` values in batches of 64.

    python benchmarks/bench_confidence.py                       # the stored table (~15 min, 2 cores)
    python benchmarks/bench_confidence.py --orders 200 --races 50 --workers 1   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from multiprocessing import Pool

import numpy as np

from soup.soups.confidence import BettingSequence
from soup.soups.confidence import BernsteinSequence

CLASSES = {"old EB": BernsteinSequence, "betting": BettingSequence}


def ternary(n: int, nonzero: float, mean: float) -> np.ndarray | None:
    """``n`` values in {-1, 0, 1}: ``round(nonzero n)`` nonzeros summing to ``round(mean n)`` (None: impossible)."""
    nz, total = round(nonzero * n), round(mean * n)
    nz += (nz + total) % 2  # +1 and -1 counts are whole
    if abs(total) > nz:
        return None
    plus = (nz + total) // 2
    v = np.zeros(n)
    v[:plus], v[plus:nz] = 1.0, -1.0
    return v


def continuous(n: int, mean: float, seed: int = 0) -> np.ndarray:
    """Per-example loss differences: heavy-tailed (Student t, 3 dof) around ``mean``, clipped at +-3."""
    rng = np.random.default_rng(seed)
    return np.clip(mean + 0.2 * rng.standard_t(3, n), -3.0, 3.0)


def population(spec: tuple) -> np.ndarray | None:
    kind, n, a, b = spec
    return ternary(n, a, b) if kind == "ternary" else continuous(n, b)


def covered(job: tuple) -> int:
    """Orders (of ``seeds``) in which the mean ever left the interval."""
    name, spec, delta, batch, seeds = job
    v = population(spec)
    n, truth = v.size, float(v.mean())
    scale = 1.0 if spec[0] == "ternary" else None  # paired accuracy: known range; losses: plug-in
    misses = 0
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(v)
        cs = CLASSES[name](n, delta, scale)
        for a in range(0, n, batch):
            cs.update(order[a:a + batch].tolist())
            lo, hi = cs.interval
            if not lo - 1e-9 <= truth <= hi + 1e-9:
                misses += 1
                break
    return misses


def separation(job: tuple) -> list[int]:
    """Values seen when the interval first excludes 0, per order (``n``: never before the end)."""
    name, spec, delta, batch, seeds = job
    v = population(spec)
    n, out = v.size, []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(v)
        cs, used, stop = CLASSES[name](n, delta, 1.0), 0, n
        while used < n:
            step = max(128, batch) if used == 0 else batch
            cs.update(order[used:used + step].tolist())
            used = min(n, used + step)
            lo, hi = cs.interval
            if used < n and (lo > 0 or hi < 0):
                stop = used
                break
        out.append(stop)
    return out


def split(seeds: int, parts: int) -> list[range]:
    step = -(-seeds // parts)
    return [range(a, min(seeds, a + step)) for a in range(0, seeds, step)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=2000, help="random orders per population (coverage)")
    ap.add_argument("--races", type=int, default=300, help="random orders per population (separation)")
    ap.add_argument("--batch", type=int, default=64, help="values per look")
    ap.add_argument("--workers", type=int, default=2, help="processes")
    args = ap.parse_args(argv)
    chunks = max(1, 4 * args.workers)
    with Pool(args.workers) as pool:
        print(f"1. coverage: runs where the mean ever left the interval, delta 0.05, a look every {args.batch}, "
              f"{args.orders} orders each")
        print(f"{'population':<42}{'old EB':>10}{'betting':>10}")
        specs = [("ternary", n, p, m) for n in (5000, 500) for p, m in
                 ((0.03, 0.0), (0.11, 0.0), (0.11, 0.05), (0.3, -0.1))] + \
                [("continuous", n, 0.0, 0.01) for n in (5000, 500)]
        for spec in specs:
            row = []
            for name in CLASSES:
                jobs = [(name, spec, 0.05, args.batch, s) for s in split(args.orders, chunks)]
                row.append(sum(pool.map(covered, jobs)) / args.orders)
            label = (f"n={spec[1]} {{-1,0,1}} P(nonzero)={spec[2]} mean={spec[3]}" if spec[0] == "ternary"
                     else f"n={spec[1]} continuous (t3 losses) mean={spec[3]}")
            print(f"{label:<42}{row[0]:>10.4f}{row[1]:>10.4f}", flush=True)

        print(f"\n2. examples to separation (n=5000, first look at 128, then every {args.batch}; "
              f"{args.races} orders): median [quartiles]")
        print(f"{'P(nonzero)':>10}{'gap':>7}{'delta':>9}{'old EB':>22}{'betting':>22}{'ratio':>7}")
        for delta in (0.05, 0.05 / 28):
            for p in (0.03, 0.11):
                for gap in (0.005, 0.01, 0.02, 0.05):
                    spec = ("ternary", 5000, p, gap)
                    if population(spec) is None:
                        print(f"{p:>10}{gap:>7}{delta:>9.5f}{'n/a (gap > P(nonzero))':>44}")
                        continue
                    cells, medians = [], []
                    for name in CLASSES:
                        jobs = [(name, spec, delta, args.batch, s) for s in split(args.races, chunks)]
                        got = sorted(x for part in pool.map(separation, jobs) for x in part)
                        q1, med, q3 = np.percentile(got, [25, 50, 75])
                        medians.append(med)
                        cells.append(f"{med:.0f} [{q1:.0f}, {q3:.0f}]")
                    print(f"{p:>10}{gap:>7}{delta:>9.5f}{cells[0]:>22}{cells[1]:>22}"
                          f"{medians[1] / medians[0]:>7.2f}", flush=True)

    print("\n3. cost: seconds for 5000 values in batches of 64 (median of 5)")
    v = np.random.default_rng(0).permutation(ternary(5000, 0.11, 0.02))
    for name, cls in CLASSES.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            cs = cls(v.size, 0.05, 1.0)
            for a in range(0, v.size, 64):
                cs.update(v[a:a + 64].tolist())
            times.append(time.perf_counter() - start)
        print(f"{name:<10}{statistics.median(times):>9.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
