"""The betting confidence sequence (soup.soups.confidence.BettingSequence).

- it holds its error rate over many random orders (and a CS with a too-low threshold does not: the
  check can fail);
- its endpoints enclose the exact CS (found by bisection with a separate scalar implementation), even on
  a coarse grid, and are close to it on the default grid;
- at t = n it is the exact mean; all-zero values and huge n work; it agrees with racing's CS in direction;
- bad arguments raise ValueError.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from soup.soups.confidence import TRUNCATE, BettingSequence
from soup.soups.confidence import BernsteinSequence


def ternary(n, nonzero, mean):
    nz, total = round(nonzero * n), round(mean * n)
    nz += (nz + total) % 2
    plus = (nz + total) // 2
    v = np.zeros(n)
    v[:plus], v[plus:nz] = 1.0, -1.0
    return v


def misses(v, delta, orders, scale=1.0, threshold=None):
    truth, out = math.fsum(v) / v.size, 0
    for seed in range(orders):
        order = np.random.default_rng(seed).permutation(v)
        cs = BettingSequence(v.size, delta, scale)
        if threshold is not None:
            cs.log_threshold = threshold
        for a in range(0, v.size, 25):
            cs.update(order[a:a + 25])
            lo, hi = cs.interval
            if not lo <= truth <= hi:
                out += 1
                break
    return out


def test_coverage_over_many_orders():
    v = ternary(300, 0.3, 0.05)
    assert misses(v, 0.2, 250) <= 0.2 * 250
    w = np.clip(0.02 + 0.3 * np.random.default_rng(1).standard_t(3, 300), -2, 2)
    assert misses(w, 0.2, 150, scale=2.0) <= 0.2 * 150
    # the same check on a CS that stops far too early (capital 1.5 instead of 2/delta) fails it
    assert misses(v, 0.2, 100, threshold=math.log(1.5)) > 0.2 * 100


def reference_capitals(x, m, n, delta):
    """log K+_t(m), log K-_t(m) after all of ``x`` (in [0, 1]), one value at a time (inf: m impossible)."""
    log_thr = math.log(2 / delta)
    mean_hat, var_hat, total, sq, kp, km = 0.5, 0.25, 0.0, 0.0, 0.0, 0.0
    for i, xi in enumerate(x, start=1):
        lam = math.sqrt(2 * log_thr / (var_hat * i * math.log(1 + i)))
        mu = (n * m - total) / (n - i + 1)
        if mu < 0 or mu > 1:
            return (math.inf, 0.0) if mu < 0 else (0.0, math.inf)
        up = min(lam, TRUNCATE / mu) if mu > 0 else lam
        down = min(lam, TRUNCATE / (1 - mu)) if mu < 1 else lam
        kp += math.log1p(up * (xi - mu))
        km += math.log1p(-down * (xi - mu))
        total += xi
        mean_hat = (0.5 + total) / (i + 1)
        sq += (xi - mean_hat) ** 2
        var_hat = (0.25 + sq) / (i + 1)
    return kp, km


def exact_ends(x, n, delta):
    """The CS's ends in [0, 1] by bisection (K+ falls with m, K- rises)."""
    thr = math.log(2 / delta)
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reference_capitals(x, mid, n, delta)[0] >= thr else (lo, mid)
    low = lo
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reference_capitals(x, mid, n, delta)[1] >= thr else (mid, hi)
    return low, hi


@pytest.mark.parametrize("grid", [16, 1024])
def test_endpoints_enclose_the_exact_cs(grid):
    n, delta = 400, 0.05
    v = np.random.default_rng(3).permutation(ternary(n, 0.2, 0.08))
    cs = BettingSequence(n, delta, 1.0, grid=grid)
    run_low, run_high = -math.inf, math.inf
    for a in range(0, 320, 40):
        cs.update(v[a:a + 40])
        x = (v[:a + 40] + 1) / 2
        lo, hi = exact_ends(x, n, delta)
        run_low, run_high = max(run_low, 2 * lo - 1), min(run_high, 2 * hi - 1)
        low, high = cs.interval
        assert low <= run_low + 1e-9 and high >= run_high - 1e-9
        if grid == 1024:  # and not much wider: a small fraction of the width, on the default grid
            assert run_low - low <= 0.02 * (run_high - run_low) + 1e-9
            assert high - run_high <= 0.02 * (run_high - run_low) + 1e-9
    assert run_low > 0  # the population's mean (0.08) was separated from 0


@pytest.mark.parametrize("scale", [1.0, None])
def test_collapses_to_the_exact_mean_at_n(scale):
    v = np.random.default_rng(0).permutation(ternary(500, 0.11, 0.02))
    cs = BettingSequence(500, 0.05, scale)
    for a in range(0, 500, 64):
        cs.update(v[a:a + 64].tolist())
        lo, hi = cs.interval
        assert lo <= 0.02 <= hi
    assert cs.interval == (pytest.approx(0.02, abs=1e-15), pytest.approx(0.02, abs=1e-15))
    w = np.random.default_rng(1).normal(0.1, 0.5, 333)
    cs = BettingSequence(333, 0.05)
    cs.update(w[:100])
    cs.update(w[100:])
    assert cs.interval[0] == cs.interval[1] == pytest.approx(math.fsum(w) / 333, abs=1e-14)


def test_all_zero_values():
    cs = BettingSequence(1000, 0.05)  # nothing bounds them: no information until the end
    for _ in range(9):
        cs.update([0.0] * 100)
        assert cs.interval == (-math.inf, math.inf)
    cs.update([0.0] * 100)
    assert cs.interval == (0.0, 0.0)
    cs = BettingSequence(1000, 0.05, 1.0)  # bounded by 1: the interval closes in on 0
    widths = []
    for _ in range(9):
        cs.update(np.zeros(100))
        lo, hi = cs.interval
        assert lo <= 0.0 <= hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.05


def test_huge_n_without_n_times_grid_memory():
    n = 10 ** 6
    v = np.random.default_rng(0).choice([-1.0, 0.0, 1.0], size=4000, p=[0.04, 0.9, 0.06])
    cs = BettingSequence(n, 0.05, 1.0)
    start = time.perf_counter()
    for a in range(0, v.size, 500):
        cs.update(v[a:a + 500])
    assert time.perf_counter() - start < 5
    lo, hi = cs.interval
    assert -0.1 < lo < 0.02 < hi < 0.1  # the population mean is about 0.02
    state = [a for a in vars(cs).values() if isinstance(a, np.ndarray)]
    assert max(a.shape[-1] for a in state) <= 8192  # grid-sized and the values seen, never n * grid


def test_agrees_with_racing_cs_in_direction():
    for mean in (0.06, -0.06):
        v = ternary(2000, 0.11, mean)
        for seed in range(4):
            order = np.random.default_rng(seed).permutation(v)
            old, new = BernsteinSequence(2000, 0.05, 1.0), BettingSequence(2000, 0.05, 1.0)
            first = {}
            for a in range(0, 2000, 64):
                for name, cs in (("old", old), ("new", new)):
                    cs.update(order[a:a + 64].tolist())
                    lo, hi = cs.interval
                    if name not in first and (lo > 0 or hi < 0):
                        first[name] = (a, 1 if lo > 0 else -1)
            assert first["old"][1] == first["new"][1] == (1 if mean > 0 else -1)
            assert first["new"][0] <= first["old"][0]  # and the betting CS is there no later


@pytest.mark.parametrize("args", [dict(n=0, delta=0.05), dict(n=10, delta=0.0), dict(n=10, delta=1.0),
                                  dict(n=10, delta=0.05, scale=-1.0), dict(n=10, delta=0.05, scale=math.inf),
                                  dict(n=2.5, delta=0.05), dict(n=10, delta=0.05, grid=4)])
def test_bad_arguments(args):
    with pytest.raises(ValueError, match="BettingSequence"):
        BettingSequence(**args)


def test_bad_values():
    cs = BettingSequence(3, 0.05, 1.0)
    with pytest.raises(ValueError, match="more than n=3"):
        cs.update([0.0] * 4)
    with pytest.raises(ValueError, match="outside"):
        cs.update([2.0])
    with pytest.raises(ValueError, match="finite"):
        cs.update([math.nan])
