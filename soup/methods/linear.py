"""linear: the weighted mean of the ingredients (mergekit's ``linear``, "model soups")."""

from __future__ import annotations

from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorParams
from soup.methods.geometry import combine, require


class Linear(MergeMethod):
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``): elementwise, no statistics.

    mergekit's contract ignores the base model's role: a ``base_model`` named in a mergekit config is
    merged as one more input with its own weight. Here ``base`` is not read; list the base model among the
    ingredients to include it.
    """

    name = "linear"
    reference = "https://arxiv.org/abs/2203.05482"
    description = "Weighted average of the ingredients' weights (a model soup)."
    needs_base = False
    parameters = {
        "weight": Param(None, per_model=True, help="each ingredient's weight (required)"),
        "normalize": Param(True, kind="bool", help="divide by the sum of the weights"),
    }

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        weights = torch.tensor([float(w) for w in require(params, "weight", self.name, at)],
                               dtype=xs.dtype, device=xs.device)
        out = combine(weights.unbind(0), xs.unbind(0))
        if params["normalize"]:
            total = weights.sum()
            if float(total) == 0.0:
                raise RecipeError(f"linear: the weights sum to 0 with normalize: true (tensor {at.name})")
            out = out / total
        return out
