"""ram: Reinforced Agent Merging: unique task-vector entries kept whole, shared ones averaged (mergekit's ``ram``)."""

from __future__ import annotations

from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorParams


def ram_masks(xs: torch.Tensor, base: torch.Tensor, epsilon: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors (n, block), where each is nonzero (|.| > epsilon), the count of nonzero ones per
    element (clamped to >= 1), and where exactly one (unique) or several (overlap) are nonzero."""
    tv = xs - base
    nonzero = tv.abs() > epsilon
    count = nonzero.sum(dim=0)
    return tv, nonzero, count.clamp(min=1), count == 1, count > 1


def ram_merge(tv: torch.Tensor, nonzero: torch.Tensor, count: torch.Tensor, unique: torch.Tensor,
              overlap: torch.Tensor, scale: list[float] | None = None) -> torch.Tensor:
    """sum_i over models: tv_i·λ_i where it alone is nonzero, tv_i/count where several are (λ_i = 1 by default)."""
    out: torch.Tensor | None = None
    for i in range(tv.shape[0]):
        kept = tv[i] * nonzero[i]
        solo = kept * unique
        if scale is not None:
            solo = solo * torch.tensor(scale[i], dtype=tv.dtype, device=tv.device)
        term = solo + kept * overlap / count
        out = term if out is None else out + term
    assert out is not None
    return out


class Ram(MergeMethod):
    """Per element, with task vectors tv_i = x_i - base and "nonzero" meaning |tv_i| > epsilon:
    ``base + tv_i`` where model i alone is nonzero, ``base + mean of the nonzero tv_i`` where several are,
    ``base`` where none is. Elementwise: no statistics.
    """

    name = "ram"
    reference = "https://arxiv.org/abs/2601.13572"
    description = "Reinforced Agent Merging: unique task-vector entries kept, shared ones averaged."
    needs_base = True
    parameters = {
        "epsilon": Param(1e-5, help="task-vector entries at or below this in magnitude count as zero"),
    }

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if base is None:
            raise RecipeError(f"ram: needs a base model (tensor {at.name})")
        if xs.shape[0] == 0:
            return base.clone()
        return base + ram_merge(*ram_masks(xs, base, float(params["epsilon"])))
