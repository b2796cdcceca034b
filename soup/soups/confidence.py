"""Confidence sequences for a mean, sampling without replacement: the ones racing can use.

``BettingSequence`` (racing's) and ``BernsteinSequence`` (the closed-form empirical-Bernstein CS it
used before, kept as the reference the benchmark compares with) share one interface: a constructor
``(n, delta, scale)``, ``update(values, scale=)`` and ``interval``. ``BettingSequence`` is an
anytime-valid two-sided confidence sequence (CS) for the mean of ``n`` numbers in ``[-scale, scale]``
seen one at a time in a uniformly random order. It is the *hedged capital* CS of Waudby-Smith &
Ramdas, "Estimating means of bounded random variables by betting" (JRSSB 2023; its hedged capital
process, in the form for sampling without replacement that the paper gives), with the without-replacement mean of the unseen values from Waudby-Smith & Ramdas,
"Confidence sequences for sampling without replacement" (NeurIPS 2020). In ``[0, 1]``
(``x = (value + scale) / (2 scale)``), for each candidate mean ``m`` of all ``n`` values:

    mu_i(m) = (n m - sum_{j<i} x_j) / (n - i + 1)               the mean of the values not yet seen
    K+_t(m) = prod_{i<=t} (1 + min(lam_i, c / mu_i(m)) (x_i - mu_i(m)))
    K-_t(m) = prod_{i<=t} (1 - min(lam_i, c / (1 - mu_i(m))) (x_i - mu_i(m)))

Under the true mean both are nonnegative martingales started at 1 (the bets are predictable and
``mu_i`` is then the mean of what is left), so by Ville's inequality the hedged capital
``max(theta K+, (1-theta) K-)`` stays below ``1/delta`` at every ``t`` with probability ``>= 1 - delta``: the CS
is ``{m : K+_t(m) < 1/(theta delta), K-_t(m) < 1/((1-theta) delta)}`` (the paper's max form; a candidate
``m`` whose ``mu_i`` left ``[0, 1]`` is impossible and excluded); ``theta = 1/2``: each against ``2/delta``.
``lam_i`` is the predictable plug-in bet (a function of ``x_1..x_{i-1}`` only):
``sqrt(2 log(2/delta) / (var_{i-1} i log(1 + i)))``, ``var`` the running variance with a prior ``1/4``;
``c = 1/2`` truncates it so a factor never falls below ``1 - c``.

Why: a bet compounds each example's evidence instead of bounding it by a quadratic (the
empirical-Bernstein CS), so the interval is tighter for the same data, most of all when the
differences are mostly 0 (paired accuracy) and the bet is large; a race separates after fewer examples.
The price is a grid: the capitals are kept on ``grid`` candidate means spanning the running interval
(``O(grid)`` memory, ``O(batch * grid)`` work per update) and recomputed from the stored values on a
finer grid when the interval has shrunk to under a quarter of it. ``K+`` falls and ``K-`` rises with
``m`` (every factor does), so the CS is an interval and its endpoints are bracketed by grid points: the
lower end reported is the largest grid point ``K+`` excludes, the upper the smallest ``K-`` excludes
(both *outside* the CS, so a coarse grid only widens the interval). The deterministic bounds
(the unseen values are in ``[0, 1]``) are intersected in, so at ``t = n`` the interval is the exact mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["BettingSequence", "BernsteinSequence"]

CAP = 0.75  # BernsteinSequence's largest bet lambda_i (Waudby-Smith & Ramdas use 1/2 or 3/4)
TRUNCATE = 0.5  # c: a bet never risks more than this fraction of the capital (the paper's default 1/2)
GRID = 1024  # candidate means kept between the running interval's ends
ROWS = 64  # factors multiplied before one log: each in [1 - c, 1 + lam], lam <= sqrt(12 log(2/delta)): no overflow


class BettingSequence:
    """Anytime-valid two-sided CS for the mean of ``n`` numbers in ``[-scale, scale]``, observed in a
    uniformly random order without replacement (see the module docstring).

    Args:
        n: the population size (every example).
        delta: 1 - coverage, over all looks together.
        scale: the bound on ``|value|``; None: the largest ``|value|`` or ``scale`` passed to ``update``
            so far (a plug-in; when it grows, the capitals are recomputed from the stored values).
        grid: candidate means kept (the endpoints are within 4 x the interval's width / ``grid`` of
            the exact CS's, and outside it).

    Raises:
        ValueError: ``n < 1``, ``delta`` outside (0, 1), ``scale <= 0`` or ``grid < 8``.
    """

    def __init__(self, n: int, delta: float, scale: float | None = None, *, grid: int = GRID) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"BettingSequence: n={n!r} must be a whole number >= 1")
        if not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"BettingSequence: delta={delta!r} must be between 0 and 1 (exclusive)")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"BettingSequence: scale={scale!r} must be a finite number > 0 (or None)")
        if grid < 8:
            raise ValueError(f"BettingSequence: grid={grid!r} must be >= 8")
        self.n, self.delta, self.scale, self.grid = int(n), float(delta), scale, int(grid)
        self.log_threshold = math.log(2 / self.delta)  # theta = 1/2: each capital against 2/delta
        self._store = np.empty((3, min(self.n, 4096)))  # per value: raw value, bet, sum of x before (grown)
        self.t = 0
        self._seen_scale = 0.0
        self._low, self._high = -math.inf, math.inf  # the running intersection, in value units
        self._used_scale: float | None = None  # the scale the state below was computed for
        self._restart(0.0)

    @property
    def values(self) -> np.ndarray:
        """The values observed so far, in order."""
        return self._store[0, :self.t]

    def update(self, values: Sequence[float], scale: float | None = None) -> None:
        """Observe more values (in sampling order); ``scale``: the plug-in range seen so far."""
        new = np.asarray(values, dtype=np.float64).ravel()
        if new.size and not np.isfinite(new).all():
            raise ValueError("BettingSequence: values must be finite numbers")
        if self.t + new.size > self.n:
            raise ValueError(f"BettingSequence: more than n={self.n} values")
        if self.scale is not None and new.size and np.abs(new).max() > self.scale * (1 + 1e-12):
            raise ValueError(f"BettingSequence: a value of size {np.abs(new).max():g} is outside "
                             f"[-scale, scale] (scale={self.scale:g})")
        if self.t + new.size > self._store.shape[1]:  # doubling: O(1) amortised per value
            grown = np.empty((3, min(self.n, max(2 * self._store.shape[1], self.t + new.size))))
            grown[:, :self.t] = self._store[:, :self.t]
            self._store = grown
        self._store[0, self.t:self.t + new.size] = new
        self.t += new.size
        if scale is not None:
            self._seen_scale = max(self._seen_scale, float(scale))
        if new.size:
            self._seen_scale = max(self._seen_scale, float(np.abs(new).max()))
        self._look()

    @property
    def interval(self) -> tuple[float, float]:
        """``(low, high)``: the mean of all ``n`` values lies inside, at every look, w.p. >= 1 - delta."""
        return self._low, self._high

    # -- internals: everything below works on x = (value + s) / (2 s) in [0, 1] ----------------------

    def _restart(self, s: float) -> None:
        """Start the capitals again for scale ``s`` (from the stored values: they are re-fed by _look)."""
        self._used_scale = s
        self._fed = 0  # values folded into the bets and capitals
        self._sum = 0.0  # sum of x so far
        self._sq = 0.0  # sum of (x_j - mean_j)^2 so far (mean_j: the prior-1/2 running mean after j)
        self._m = np.linspace(0.0, 1.0, self.grid)  # (grid,) candidate means of x
        self._log_plus = np.zeros(self.grid)  # log K+_t(m)
        self._log_minus = np.zeros(self.grid)  # log K-_t(m)

    def _look(self) -> None:
        s = self.scale if self.scale is not None else self._seen_scale
        if self.t == 0:
            return
        if self.t == self.n:  # every value seen: the exact mean (fsum: the same whatever the order)
            mean = math.fsum(self._store[0, :self.n].tolist()) / self.n
            self._low, self._high = max(self._low, mean), min(self._high, mean)
            return
        if s <= 0:  # every value so far is 0 and nothing bounds them: no information yet
            return
        if s != self._used_scale:  # a new plug-in scale: every x changes, start from the first value
            self._restart(s)
        x = (self._store[0, self._fed:self.t] + s) / (2 * s)
        np.clip(x, 0.0, 1.0, out=x)
        fresh = self._fed == 0
        lams, prev = self._bets(x)
        self._store[1, self._fed:self.t], self._store[2, self._fed:self.t] = lams, prev  # for a new grid
        first = self._fed + 1
        self._fed = self.t
        if fresh:  # the first grid spans what is still possible
            self._m = self._span(self._grid_bounds(s))
        self._accumulate(self._m, self._log_plus, self._log_minus, x, lams, prev, first)
        lo, hi = self._endpoints()
        self._low, self._high = max(self._low, float(2 * s * lo - s)), min(self._high, float(2 * s * hi - s))
        lo, hi = self._grid_bounds(s)
        keep = (self._m >= lo) & (self._m <= hi)  # candidates still inside: the rest is excluded for good
        if keep.sum() < self.grid // 4 and hi > lo:  # shrunk: recompute on a grid over what is left
            self._m = self._span((lo, hi))
            self._log_plus, self._log_minus = np.zeros(self.grid), np.zeros(self.grid)
            xs = (self._store[0, :self.t] + s) / (2 * s)
            np.clip(xs, 0.0, 1.0, out=xs)
            self._accumulate(self._m, self._log_plus, self._log_minus, xs, self._store[1, :self.t],
                             self._store[2, :self.t], 1)
        elif not keep.all():
            self._m, self._log_plus, self._log_minus = self._m[keep], self._log_plus[keep], self._log_minus[keep]

    def _grid_bounds(self, s: float) -> tuple[float, float]:
        """The running interval in x, intersected with what the values allow (the unseen are in [0, 1])."""
        total = self._sum
        lo, hi = total / self.n, (total + self.n - self.t) / self.n
        if math.isfinite(self._low):
            lo = max(lo, (self._low + s) / (2 * s))
        if math.isfinite(self._high):
            hi = min(hi, (self._high + s) / (2 * s))
        return max(0.0, lo), min(1.0, hi)

    def _span(self, bounds: tuple[float, float]) -> np.ndarray:
        lo, hi = bounds
        return np.linspace(lo, hi, self.grid) if hi > lo else np.full(self.grid, lo)

    def _bets(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The predictable bets for new values ``x`` (each from the values before it) and the sums of x
        before each; advances the running sums."""
        i = self._fed + np.arange(1, x.size + 1)  # the values' positions, 1-based
        csum = self._sum + np.cumsum(x)
        prev = np.concatenate([[self._sum], csum[:-1]])
        mean = (0.5 + csum) / (i + 1)  # the running mean after each value (prior 1/2)
        dev = np.cumsum((x - mean) ** 2) + self._sq
        var_before = (0.25 + np.concatenate([[self._sq], dev[:-1]])) / i  # prior variance 1/4
        lams = np.sqrt(2 * self.log_threshold / (var_before * i * np.log1p(i)))
        self._sum, self._sq = float(csum[-1]), float(dev[-1])
        return lams, prev

    def _accumulate(self, m: np.ndarray, log_plus: np.ndarray, log_minus: np.ndarray, x: np.ndarray,
                    lams: np.ndarray, prev: np.ndarray, first: int) -> None:
        """Fold values ``x`` (positions ``first``..) into the log-capitals at candidate means ``m``."""
        for a in range(0, x.size, ROWS):  # a product of ROWS factors stays in float range (see ROWS)
            rows = slice(a, a + ROWS)
            remaining = self.n - (first + a + np.arange(x[rows].size)) + 1.0  # n - i + 1
            mu = np.multiply.outer(self.n / remaining, m)  # (values, grid): the unseen values' mean
            mu -= (prev[rows] / remaining)[:, None]
            np.clip(mu, 0.0, 1.0, out=mu)  # outside [0, 1]: m is impossible, excluded by _grid_bounds
            gap = x[rows, None] - mu
            lam = lams[rows, None]
            with np.errstate(divide="ignore"):
                bet = np.divide(TRUNCATE, mu)
                np.minimum(bet, lam, out=bet)
                bet *= gap
                bet += 1.0
                log_plus += np.log(bet.prod(axis=0))
                np.subtract(1.0, mu, out=mu)
                np.divide(TRUNCATE, mu, out=mu)
                np.minimum(mu, lam, out=mu)
                mu *= gap
                np.subtract(1.0, mu, out=mu)
                log_minus += np.log(mu.prod(axis=0))

    def _endpoints(self) -> tuple[float, float]:
        """The CS's ends in x: the largest grid point K+ excludes, the smallest K- excludes (none:
        0 or 1), intersected with what the values allow."""
        m = self._m
        out_low = np.flatnonzero(self._log_plus >= self.log_threshold)
        out_high = np.flatnonzero(self._log_minus >= self.log_threshold)
        lo = m[out_low[-1]] if out_low.size else 0.0  # none excluded: no news (the running ends stay)
        hi = m[out_high[0]] if out_high.size else 1.0
        total = self._sum
        return max(lo, total / self.n), min(hi, (total + self.n - self.t) / self.n)


class BernsteinSequence:
    """The predictable plug-in empirical-Bernstein CS (Waudby-Smith & Ramdas, JRSSB 2023; the
    empirical-Bernstein supermartingale of Howard et al., Ann. Stat. 2021) for the mean of ``n`` numbers
    in ``[-scale, scale]`` observed in a uniformly random order without replacement: closed form, O(1)
    per value, wider than ``BettingSequence`` (racing used it before; kept as the reference).

    Args:
        n: the population size (every example).
        delta: 1 - coverage, over all looks together.
        scale: the bound on ``|value|``; None: the largest ``scale`` passed to ``update`` so far (a plug-in).
    """

    def __init__(self, n: int, delta: float, scale: float | None = None) -> None:
        if n < 1 or not 0 < delta < 1:
            raise ValueError("BernsteinSequence needs n >= 1 and 0 < delta < 1")
        self.n, self.delta, self.scale = n, delta, scale
        self.values: list[float] = []
        self._seen_scale = 0.0
        self._low, self._high = -math.inf, math.inf  # the running intersection over looks
        self._state: list[float] | None = None  # the sums of _interval, up to the values seen

    def update(self, values: Sequence[float], scale: float | None = None) -> None:
        """Observe more values (in sampling order); ``scale``: the plug-in range seen so far."""
        self.values.extend(float(v) for v in values)
        if len(self.values) > self.n:
            raise ValueError(f"BernsteinSequence: more than n={self.n} values")
        if scale is not None:
            self._seen_scale = max(self._seen_scale, float(scale))
        self._seen_scale = max([self._seen_scale] + [abs(v) for v in values])
        low, high = self._interval()
        self._low, self._high = max(self._low, low), min(self._high, high)

    @property
    def interval(self) -> tuple[float, float]:
        """``(low, high)``: the mean of all ``n`` values lies inside, at every look, w.p. >= 1 - delta."""
        return self._low, self._high

    def _interval(self) -> tuple[float, float]:
        scale = self.scale if self.scale is not None else self._seen_scale
        t = len(self.values)
        if t == 0:
            return -math.inf, math.inf
        if scale <= 0:  # every value so far is 0 and nothing bounds them: no information
            return (-math.inf, math.inf) if t < self.n else (0.0, 0.0)
        if self._state is None or self._state[0] != scale:  # a new plug-in scale: from the start again
            # scale, i, mean_hat, var_hat (predictable: before observation i), sum x, sum sq, num, den, penalty
            self._state = [scale, 0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]
        _, i, mean_hat, var_hat, total, sq, num, den, pen = self._state
        n, log_term = self.n, math.log(2 / self.delta)
        for v in self.values[i:]:
            i += 1
            x = min(1.0, max(0.0, (v + scale) / (2 * scale)))  # in [0, 1]
            lam = min(CAP, math.sqrt(2 * log_term / (var_hat * i * math.log(1 + i))))
            remaining = n - i + 1
            num += lam * (x + total / remaining)  # the centre, for the mean of the *remaining* values
            den += lam * n / remaining
            pen += (x - mean_hat) ** 2 * (-math.log1p(-lam) - lam)  # empirical-Bernstein variance term
            total += x
            mean_hat = (0.5 + total) / (i + 1)
            sq += (x - mean_hat) ** 2
            var_hat = (0.25 + sq) / (i + 1)
        self._state = [scale, i, mean_hat, var_hat, total, sq, num, den, pen]
        low_x, high_x = max(0.0, (num - log_term - pen) / den), min(1.0, (num + log_term + pen) / den)
        return 2 * scale * low_x - scale, 2 * scale * high_x - scale
