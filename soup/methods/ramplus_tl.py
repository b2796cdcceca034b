"""ramplus_tl: RAM+ (tensor-local): RAM with unique entries scaled by an overlap ratio (mergekit's ``ramplus_tl``)."""

from __future__ import annotations

from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.ram import ram_masks, ram_merge


class RamPlusTL(MergeMethod):
    """RAM where model i's unique entries are scaled by ``λ_i = 1 + r·clamp(ρ_i, 0, alpha)``.

    ρ_i = (model i's nonzero entries that other models share) / max(model i's nonzero entries no other model
    has, epsilon), counted over the whole tensor ("tensor-local"). One statistics pass: 2 integer counts per
    model (O(N) state, exact).
    """

    name = "ramplus_tl"
    reference = "https://arxiv.org/abs/2601.13572"
    description = "RAM+ (tensor-local): RAM with each model's unique entries rescaled by its overlap ratio."
    needs_base = True
    parameters = {
        "r": Param(0.1, help="strength of the rescaling"),
        "alpha": Param(0.2, help="cap on the overlap ratio"),
        "epsilon": Param(1e-5, help="task-vector entries at or below this in magnitude count as zero"),
    }

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        if not tensor.has_base:
            raise RecipeError(f"ramplus_tl: needs a base model (tensor {tensor.name})")
        eps, r, alpha = float(params["epsilon"]), float(params["r"]), float(params["alpha"])
        shared = [0] * tensor.n
        unique = [0] * tensor.n
        for _, xs, base in tensor.blocks():
            _, nonzero, _, solo, overlap = ram_masks(xs, base, eps)
            for i in range(tensor.n):
                shared[i] += int((nonzero[i] & overlap).sum())
                unique[i] += int((nonzero[i] & solo).sum())
        return [1 + r * min(max(s / max(u, eps), 0.0), alpha) for s, u in zip(shared, unique)]

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if base is None:
            raise RecipeError(f"ramplus_tl: needs a base model (tensor {at.name})")
        if xs.shape[0] == 0:
            return base.clone()
        return base + ram_merge(*ram_masks(xs, base, float(params["epsilon"])), scale=stats)
