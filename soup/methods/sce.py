"""SCE (mergekit ``sce``): select by variance, calculate weights by energy, erase minority signs.

1. Select: where ``select_topk < 1``, keep only the elements whose variance across the task vectors
   (population variance over the ingredients) is among the top ``k = int(select_topk * #nonzero
   variances)`` of the whole tensor; the others are zeroed in every task vector. The k-th largest
   variance is found exactly by radix select in ``statistics``; every element equal to it is kept.
2. Calculate: each ingredient's weight is the mean square of its (selected) task vector over the
   whole tensor, divided by the sum over ingredients (uniform where that sum is below 1e-6). Exact,
   order-independent sums in ``statistics``.
3. Erase: TIES sign election ("sum" of the unweighted task vectors); the agreeing entries are
   averaged with those weights (divisor clamped to >= 1e-6).

No per-model parameters: mergekit's ``sce`` takes no ``weight``. Passes over the tensor: 1 (weights)
plus 2 (float32) or 4 (float64) when ``select_topk < 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.select import ExactSums, kth_largest
from soup.methods.sparsify import consensus, deltas, row_sum

__all__ = ["SCE", "variance"]


def variance(d: torch.Tensor) -> torch.Tensor:
    """Population variance over the ingredients (axis 0), elementwise in the work dtype."""
    n = d.shape[0]
    mean = row_sum(d) / n
    return row_sum((d - mean).square()) / n


@dataclass(frozen=True)
class _Stats:
    select: Any  # None: all elements; False: none; float: keep variance >= this
    weights: tuple[float, ...]


class SCE(MergeMethod):
    name = "sce"
    reference = "https://arxiv.org/abs/2408.07990"
    description = ("Keeps the elements where the fine-tunes vary most, weights each task vector by "
                   "its mean square and averages the entries that agree in sign.")
    needs_base = True
    parameters = {
        "int8_mask": Param(False, kind="bool",
                           help="store the sign mask as int8 (a memory option in mergekit; no effect on values)"),
        "select_topk": Param(1.0, low=0.0, high=1.0,
                             help="fraction of the elements (by variance across task vectors) kept"),
    }

    def _selected(self, d: torch.Tensor, select: Any) -> torch.Tensor:
        if select is None:
            return d
        if select is False:
            return torch.zeros_like(d)
        keep = variance(d) >= select
        return torch.where(keep, d, 0.0)

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        topk = float(params["select_topk"])
        n = tensor.n
        select: Any = None
        if topk <= 0:
            select = False
        elif topk < 1:
            chosen: list[int] = []

            def target(nonzero: list[int]) -> list[tuple[int, int]]:
                chosen.append(int(nonzero[0] * topk))
                return [(0, chosen[0])] if chosen[0] > 0 else []

            def variances():
                for _, xs, base in tensor.blocks():
                    yield variance(deltas(xs, base, self.name)).unsqueeze(0)

            values = kth_largest(variances, tensor.dtype, target)
            select = values[0] if values else False
        squares = ExactSums(n)
        for _, xs, base in tensor.blocks():
            squares.add(self._selected(deltas(xs, base, self.name), select).square())
        means = [s / tensor.numel for s in squares.totals()]
        total = sum(means)
        if abs(total) < 1e-6:
            weights = tuple(1.0 / n for _ in range(n))
        else:
            weights = tuple(m / total for m in means)
        return _Stats(select, weights)

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        d = self._selected(deltas(xs, base, self.name), stats.select)
        w = torch.tensor(list(stats.weights), dtype=d.dtype, device=d.device).unsqueeze(1)
        erased = consensus(d).to(d.dtype) * w
        merged = row_sum(d * erased)
        return base + merged / row_sum(erased).clamp(min=1e-6)
