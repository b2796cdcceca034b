"""model_stock: from the base towards the fine-tunes' mean, by their deltas' cosine (mergekit's ``model_stock``)."""

from __future__ import annotations

from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.geometry import combine, gram, group_index, task_vectors

NORM_PRODUCT_MIN = 1e-6  # |d_i||d_j| is clamped to at least this before dividing
SINGULAR = 1e-6  # |1 + (N-1) cos| below this: keep the base (t = 0)


def stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """t per vector from the deltas' Gram matrices (groups, N, N), float64.

    cos = mean over pairs i < j of clamp(d_i·d_j / max(|d_i||d_j|, 1e-6), -1, 1); t = N cos / (1 + (N-1) cos),
    or 0 where the denominator is below 1e-6 in magnitude.
    """
    n = g.shape[-1]
    norms = torch.sqrt(torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0))
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = (norms[:, i] * norms[:, j]).clamp(min=NORM_PRODUCT_MIN)
            cosines.append((g[:, i, j] / prod).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0)
    den = 1 + (n - 1) * cos
    singular = den.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))


class ModelStock(MergeMethod):
    """``t·mean(fine-tunes) + (1-t)·base`` with ``t = N cos / (1 + (N-1) cos)`` (Model Stock, N fine-tunes).

    cos is the mean pairwise cosine between the fine-tunes' deltas from the base: over the whole tensor,
    or per row (vectors along the last dimension) with ``filter_wise``. One statistics pass: the deltas'
    Gram matrix in float64, O(N²) state (O(rows·N²) with ``filter_wise``).
    """

    name = "model_stock"
    reference = "https://arxiv.org/abs/2403.19522"
    description = "Model Stock: moves from the base towards the fine-tunes' average by their deltas' agreement."
    needs_base = True
    parameters = {
        "filter_wise": Param(False, kind="bool", help="one ratio per row instead of one per tensor"),
    }

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        if not tensor.has_base or tensor.n < 2:
            raise RecipeError(f"model_stock: needs a base model and at least 2 other models (tensor {tensor.name})")
        vectors = -1 if params["filter_wise"] else None
        g = gram(tensor, task_vectors, vectors)
        return stock_ratio(g) if g.numel() else torch.zeros(g.shape[0], dtype=torch.float64)

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if base is None or xs.shape[0] < 2:
            raise RecipeError(f"model_stock: needs a base model and at least 2 other models (tensor {at.name})")
        t = stats.to(xs.dtype).to(xs.device)
        ids = group_index(at.shape, -1 if params["filter_wise"] else None, at.start, at.stop, xs.device)
        t = t[0] if ids is None else t[ids]
        average = combine([1.0] * xs.shape[0], xs.unbind(0)) / xs.shape[0]
        return t * average + (1 - t) * base
