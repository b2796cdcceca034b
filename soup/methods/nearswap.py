"""nearswap: take the other model's value where it is close to the base's (mergekit's ``nearswap``)."""

from __future__ import annotations

from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorParams
from soup.methods.geometry import require

ABSDIFF_MIN = 1e-6


class NearSwap(MergeMethod):
    """Per element: ``w = clamp(t / max(|base - other|, 1e-6), 0, 1)``; ``w·other + (1-w)·base``.

    Elements closer than t take the other model's value; farther ones move towards it by t/|difference|.
    Elementwise: no statistics.
    """

    name = "nearswap"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    description = "Interpolates the base towards one other model where their weights are close (within t)."
    needs_base = True
    parameters = {
        "t": Param(None, help="similarity threshold: differences up to t take the other model's value (required)"),
    }

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        t = float(require(params, "t", self.name, at))
        if base is None or xs.shape[0] != 1:
            raise RecipeError(f"nearswap: merges the base model with exactly one other model (tensor {at.name})")
        other = xs[0]
        weight = (t / (base - other).abs().clamp(min=ABSDIFF_MIN)).clamp(min=0, max=1)
        return weight * other + (1 - weight) * base
