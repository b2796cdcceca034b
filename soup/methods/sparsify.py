"""Shared math of the task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE).

Every method of the family works on task vectors ``delta_i = x_i - base`` and combines them as
mergekit 0.1.5's "generalized task arithmetic" does: sparsify each delta (optionally rescaling it
to keep its L1 norm), weight it, optionally keep only the entries that agree with the elected sign,
sum, optionally divide by the sum of the weights that took part, scale by ``lambda`` and add the
base back. This module holds the pieces, written once:

- ``deltas``: the task vectors of a block, in the work dtype.
- ``magnitude_bounds`` / ``outlier_bounds``: which magnitude ranks TIES and breadcrumbs keep.
- ``dare_keep`` and ``della_keep``: the random masks, drawn from the counter-based ``uniform``.
- ``l1_factor``: mergekit's ``rescale`` (match the L1 norm of the delta before masking).
- ``consensus``: TIES sign election ("sum" method: the sign of the summed weighted deltas).
- ``combine``: weight, elect, sum, normalise, scale, add the base.
- ``TaskVectorMerge``: the generic method the per-name classes configure.

Magnitude thresholds (``kth_largest``) and L1 norms (``ExactSums``) come exact and independent of the
block split from ``soup.methods.select``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams, uniform, uniform_below
from soup.methods.select import ExactSums, kth_largest

__all__ = [
    "deltas", "magnitude_bounds", "outlier_bounds", "dare_keep", "della_keep", "l1_factor", "consensus",
    "combine", "row_sum", "TaskVectorMerge", "task_vector_parameters", "L1_EPS",
]

L1_EPS = 1e-7
"""mergekit's tolerance: no L1 rescale when the norm before or after masking is below it."""


# --- task vectors ---------------------------------------------------------------------------

def deltas(xs: torch.Tensor, base: torch.Tensor | None, method: str = "this method") -> torch.Tensor:
    """The task vectors ``xs - base`` (n, block) in the work dtype."""
    if base is None:
        raise RecipeError(f"{method}: needs a base model (base_model) to compute task vectors")
    return xs - base


def row_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis, row by row in order (elementwise, so independent of the block split)."""
    acc = rows[0].clone()
    for r in rows[1:]:
        acc += r
    return acc


# --- L1 rescale ---------------------------------------------------------------------------------

def l1_factor(before: float, after: float) -> float:
    """mergekit's L1 rescale of a masked delta: ``before / after`` unless either is below 1e-7."""
    if before < L1_EPS or after < L1_EPS:
        return 1.0
    return before / after


# --- which entries each sparsification keeps -------------------------------------------------------

def magnitude_bounds(density: float, numel: int) -> tuple[int, int] | None:
    """TIES: keep the k = max(1, int(density * numel)) largest |delta| (descending ranks [0, k)).

    None: keep everything (density >= 1); (0, 0): keep nothing (density <= 0).
    """
    if density >= 1:
        return None
    if density <= 0 or numel == 0:
        return (0, 0)
    return (0, max(1, int(density * numel)))


def outlier_bounds(density: float, gamma: float, numel: int) -> tuple[int, int] | None:
    """Breadcrumbs: drop the top ``int(gamma * numel)`` |delta| (fewer when needed to keep the target)
    and keep the next ``int(density * numel)``: descending ranks ``[drop, drop + keep)``.
    """
    if density >= 1:
        return None
    keep = max(0, int(density * numel))
    top = max(0, int(gamma * numel))
    bottom = max(0, numel - keep - top)
    drop = numel - keep - bottom
    return (drop, drop + keep)


def rank_targets(bounds: Sequence[tuple[int, int] | None]) -> list[tuple[int, int]]:
    """The k-th largest values that rank ranges [lo, hi) need: the (lo+1)-th (if lo > 0) and the hi-th."""
    out = []
    for row, b in enumerate(bounds):
        if b is None or b[1] <= b[0]:
            continue
        if b[0] > 0:
            out.append((row, b[0] + 1))
        out.append((row, b[1]))
    return out


def thresholds(bounds: Sequence[tuple[int, int] | None], values: list[float]
               ) -> list[tuple[float, float] | None | bool]:
    """Turn the k-th largest values back into per-row magnitude intervals ``(low, high)``, inclusive.

    None: keep all; False: keep none. The values equal to a bound are all kept (ties at a threshold).
    """
    out: list[tuple[float, float] | None | bool] = []
    it = iter(values)
    for b in bounds:
        if b is None:
            out.append(None)
        elif b[1] <= b[0]:
            out.append(False)
        else:
            high = next(it) if b[0] > 0 else float("inf")
            out.append((next(it), high))
    return out


def interval_keep(magnitude: torch.Tensor, bound: tuple[float, float]) -> torch.Tensor:
    low, high = bound
    keep = magnitude >= low
    if high != float("inf"):
        keep &= magnitude <= high
    return keep


def dare_keep(seed: int, at: At, stream: int, density: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's mask: keep element j with probability ``density`` (``u_j < density``, u from ``uniform``)."""
    return uniform_below(density, seed, at.name, at.start, at.stop, stream=stream, device=device)


def della_probabilities(magnitude: torch.Tensor, shape: tuple[int, ...], density: float,
                        epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities for one ingredient's whole tensor (flat, float64).

    Ranks by |delta| within each row (axis 1 of the tensor; a 1-D tensor is one row), ascending,
    ties in index order; normalised to [0, 1] within the row and mapped linearly to
    ``[density - epsilon, density + epsilon]``: the largest magnitudes are the likeliest kept.
    """
    view = magnitude.reshape((1, -1) if len(shape) < 2 else shape)
    length = view.shape[1]
    order = torch.argsort(view, dim=1, stable=True)
    ranks = torch.empty_like(order)
    pos = torch.arange(length, dtype=order.dtype, device=order.device).view([1, length] + [1] * (view.dim() - 2))
    ranks.scatter_(1, order, pos.expand_as(order))
    if length > 1:
        norm = ranks.to(torch.float64) / (length - 1)
    else:  # mergekit divides 0 by 0 here; a lone element gets the middle probability
        norm = torch.full(ranks.shape, 0.5, dtype=torch.float64, device=ranks.device)
    return ((density - epsilon) + norm * (2 * epsilon)).reshape(-1)


def della_keep(seed: int, at: At, stream: int, probabilities: torch.Tensor) -> torch.Tensor:
    u = uniform(seed, at.name, at.start, at.stop, stream=stream, device=probabilities.device)
    return u < probabilities


# --- combining --------------------------------------------------------------------------------

def consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election, mergekit's "sum" method: the elected sign of an element is that of the sum
    of the weighted deltas (+ where the sum is 0); a row takes part where its sign equals it (zeros
    never do). Returns the (n, block) bool mask."""
    total = row_sum(weighted)
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return torch.sign(weighted) == elected


def combine(d: torch.Tensor, weights: Sequence[float], base: torch.Tensor, *, elect: bool,
            normalize: bool, lam: float) -> torch.Tensor:
    """``base + lam * sum_i w_i d_i [/ sum_i w_i]``, with TIES sign election if ``elect``.

    Without election the divisor is the sum of the weights (1 where |sum| < 1e-8); with it, per
    element, the sum of the weights of the rows that agree with the elected sign (1 where 0).
    """
    w = torch.tensor([float(v) for v in weights], dtype=d.dtype, device=d.device)
    weighted = d * w.unsqueeze(1)
    if elect:
        agree = consensus(weighted)
        mixed = row_sum(torch.where(agree, weighted, 0.0))
        divisor = row_sum(agree.to(d.dtype) * w.unsqueeze(1))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = row_sum(weighted)
        divisor = row_sum(w)
        if abs(float(divisor)) < 1e-8:
            divisor = torch.ones((), dtype=d.dtype, device=d.device)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


# --- the generic method ---------------------------------------------------------------------------

def task_vector_parameters(*, normalize: bool, rescale: bool, gamma: bool = False,
                           epsilon: bool = False) -> dict[str, Param]:
    """mergekit 0.1.5's parameters of its generalized task arithmetic methods, with their defaults."""
    params = {
        "int8_mask": Param(False, kind="bool",
                           help="store the sign mask as int8 (a memory option in mergekit; no effect on values)"),
        "normalize": Param(normalize, kind="bool",
                           help="divide the merged delta by the sum of the weights that took part"),
        "rescale": Param(rescale, kind="bool",
                         help="after sparsifying, scale each delta back to its L1 norm before masking"),
        "lambda": Param(1.0, help="scale of the merged delta"),
        "weight": Param(None, per_model=True, required=True,
                        help="weight of each ingredient's task vector (required, as in mergekit)"),
        "density": Param(1.0, per_model=True, low=0.0, high=1.0,
                         help="fraction of each task vector's entries kept"),
    }
    if gamma:
        params["gamma"] = Param(0.01, per_model=True, low=0.0, high=1.0,
                                help="fraction of the largest-magnitude entries dropped as outliers")
    if epsilon:
        params["epsilon"] = Param(0.15, per_model=True, low=0.0, high=1.0,
                                  help="half-width of the keep probabilities around density")
    return params


@dataclass(frozen=True)
class Stats:
    """Per ingredient: the magnitude interval kept (None: all, False: none) and the L1 rescale factor."""

    bounds: tuple[Any, ...]
    factors: tuple[float, ...]


class TaskVectorMerge(MergeMethod):
    """mergekit's generalized task arithmetic; subclasses choose the sparsification and the election.

    ``sparsification``: None, "magnitude" (TIES), "random" (DARE), "magnitude_outliers"
    (breadcrumbs) or "della_magprune" (DELLA); ``elect``: TIES sign election ("sum").
    """

    needs_base = True
    sparsification: ClassVar[str | None] = None
    elect: ClassVar[bool] = False

    # -- helpers
    def _bounds(self, params: TensorParams, n: int, numel: int) -> list[tuple[int, int] | None]:
        dens = params["density"]
        if self.sparsification == "magnitude":
            return [magnitude_bounds(float(dens[i]), numel) for i in range(n)]
        if self.sparsification == "magnitude_outliers":
            gam = params["gamma"]
            return [outlier_bounds(float(dens[i]), float(gam[i]), numel) for i in range(n)]
        return [None] * n

    def _keep(self, i: int, magnitude: torch.Tensor, params: TensorParams, bound: Any,
              at: At) -> torch.Tensor | None:
        """Row i's keep mask on a block (None: all kept), for the blockwise sparsifications."""
        if self.sparsification == "random":
            density = float(params["density"][i])
            if density >= 1:
                return None
            return dare_keep(params.seed, at, i, density, magnitude.device)
        if bound is None:
            return None
        if bound is False:
            return torch.zeros(magnitude.shape, dtype=torch.bool, device=magnitude.device)
        return interval_keep(magnitude, bound)

    # -- the contract
    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        if self.sparsification in (None, "della_magprune"):
            return None
        n, numel = tensor.n, tensor.numel
        name = self.name

        def magnitudes() -> Iterable[torch.Tensor]:
            for _, xs, base in tensor.blocks():
                yield deltas(xs, base, name).abs()

        bounds = self._bounds(params, n, numel)
        targets = rank_targets(bounds)
        values = kth_largest(magnitudes, tensor.dtype, targets) if targets else []
        kept = thresholds(bounds, values)
        factors = [1.0] * n
        rescaled = [i for i in range(n) if self._rescales(i, params, kept[i])]
        if rescaled:
            before, after = ExactSums(n), ExactSums(n)
            for at, xs, base in tensor.blocks():
                mag = deltas(xs, base, name).abs()
                masked = mag.clone()
                for i in rescaled:
                    keep = self._keep(i, mag[i], params, kept[i], at)
                    masked[i] = torch.where(keep, mag[i], 0.0)
                before.add(mag)
                after.add(masked)
            b, a = before.totals(), after.totals()
            for i in rescaled:
                factors[i] = l1_factor(b[i], a[i])
        return Stats(tuple(kept), tuple(factors))

    def _rescales(self, i: int, params: TensorParams, bound: Any) -> bool:
        if not params["rescale"]:
            return False
        if self.sparsification == "random":
            return float(params["density"][i]) < 1
        return bound is not None and bound is not False

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        d = deltas(xs, base, self.name)
        n = d.shape[0]
        if n == 0:
            return base.clone()
        if self.sparsification == "della_magprune":
            d = self._della(d, params, at)
        elif self.sparsification is not None:
            mag = d.abs()
            rows = []
            for i in range(n):
                keep = self._keep(i, mag[i], params, stats.bounds[i], at)
                row = d[i] if keep is None else torch.where(keep, d[i], 0.0)
                if stats.factors[i] != 1.0:
                    row = row * stats.factors[i]
                rows.append(row)
            d = torch.stack(rows)
        return combine(d, params["weight"], base, elect=self.elect,
                       normalize=bool(params["normalize"]), lam=float(params["lambda"]))

    def _della(self, d: torch.Tensor, params: TensorParams, at: At) -> torch.Tensor:
        """DELLA's MagPrune on whole tensors (``whole_tensor``): rank-based random masks per row."""
        if at.start != 0 or at.stop - at.start != d.shape[1]:
            raise ValueError(f"{self.name} needs whole tensors (whole_tensor = True)")
        rows = []
        for i in range(d.shape[0]):
            density, epsilon = float(params["density"][i]), float(params["epsilon"][i])
            if density >= 1:
                rows.append(d[i])
                continue
            if density <= 0:
                rows.append(torch.zeros_like(d[i]))
                continue
            if density + epsilon >= 1 or density - epsilon <= 0:
                raise RecipeError(f"{self.name}: density +/- epsilon must lie in (0, 1), got "
                                  f"density {density}, epsilon {epsilon}")
            mag = d[i].abs()
            probs = della_probabilities(mag, at.shape, density, epsilon)
            keep = della_keep(params.seed, at, i, probs)
            row = torch.where(keep, d[i], 0.0)
            if params["rescale"]:
                sums = ExactSums(2)
                sums.add(torch.stack([mag, row.abs()]))
                factor = l1_factor(*sums.totals())
                if factor != 1.0:
                    row = row * factor
            rows.append(row)
        return torch.stack(rows)
