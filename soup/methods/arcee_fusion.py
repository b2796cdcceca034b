"""arcee_fusion: take the other model's changes only where they matter most (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, TensorInput, TensorParams
from soup.methods.geometry import group_count, group_index
from soup.methods.select import kth_smallest

PROB_EPS = 1e-8  # added to the softmax probabilities before the KL divergence
QUANTILES = (1, 2, 3)  # quartiles, in quarters


class ArceeFusion(MergeMethod):
    """``base + (other - base)·[importance >= threshold]``, importance = |other - base| · KL(row).

    KL(row) = sum_j p_j log(p_j/q_j) over the row (the vectors along the last dimension; the whole tensor if
    1-D), with p = softmax(other row) + 1e-8 and q = softmax(base row) + 1e-8. threshold = median +
    1.5·(q3 - q1) of the importances over the whole tensor, a quantile q being the sorted values' element
    floor(q·(numel-1)).

    Memory: statistics passes only, O(rows) state. Passes: the rows' maxima, their sums of exponentials,
    the rows' KL (float64), then the exact quartiles by radix selection (2 passes for float32 work values,
    4 for float64; three 65,536-bin histograms).
    """

    name = "arcee_fusion"
    reference = "https://arcee.ai"
    description = "Arcee Fusion: keeps the other model's changes whose importance is an outlier (median + 1.5 IQR)."
    needs_base = True
    parameters = {}

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        if not tensor.has_base or tensor.n != 1:
            raise RecipeError(
                f"arcee_fusion: merges the base model with exactly one other model (tensor {tensor.name})")
        if tensor.numel == 0:
            return None
        shape, rows = tensor.shape, group_count(tensor.shape, -1)

        def ids_of(at: At, device: torch.device) -> torch.Tensor:
            ids = group_index(shape, -1, at.start, at.stop, device)
            return torch.zeros(at.stop - at.start, dtype=torch.int64, device=device) if ids is None else ids

        def pairs():  # (row ids, other, base) as float64, per block, on the blocks' device
            for at, xs, base in tensor.blocks():
                yield ids_of(at, xs.device), xs[0].to(torch.float64), base.to(torch.float64)

        maxima = sums = kl = None
        for ids, x, b in pairs():
            if maxima is None:
                maxima = torch.full((2, rows), -math.inf, dtype=torch.float64, device=x.device)
            maxima[0].scatter_reduce_(0, ids, x, "amax")
            maxima[1].scatter_reduce_(0, ids, b, "amax")
        for ids, x, b in pairs():
            if sums is None:
                sums = torch.zeros(2, rows, dtype=torch.float64, device=x.device)
            sums[0].index_add_(0, ids, torch.exp(x - maxima[0][ids]))
            sums[1].index_add_(0, ids, torch.exp(b - maxima[1][ids]))
        lse = maxima + torch.log(sums)
        for ids, x, b in pairs():
            if kl is None:
                kl = torch.zeros(rows, dtype=torch.float64, device=x.device)
            p = torch.exp(x - lse[0][ids]) + PROB_EPS
            q = torch.exp(b - lse[1][ids]) + PROB_EPS
            kl.index_add_(0, ids, p * torch.log(p / q))
        kl = kl.to(tensor.dtype)

        def importances():
            for at, xs, base in tensor.blocks():
                yield (xs[0] - base).abs() * kl.to(xs.device)[ids_of(at, xs.device)]

        last = tensor.numel - 1
        q1, median, q3 = kth_smallest(importances, [last * k // 4 for k in QUANTILES], tensor.dtype)
        return kl, median + 1.5 * (q3 - q1)

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if base is None or xs.shape[0] != 1:
            raise RecipeError(f"arcee_fusion: merges the base model with exactly one other model (tensor {at.name})")
        if stats is None:
            return xs[0].clone()
        kl, threshold = stats
        ids = group_index(at.shape, -1, at.start, at.stop, xs.device)
        kl = kl.to(xs.device)
        row_kl = kl[0] if ids is None else kl[ids]
        importance = (xs[0] - base).abs() * row_kl
        mask = (importance >= threshold.to(xs.device)).to(xs.dtype)
        return base + (xs[0] - base) * mask
