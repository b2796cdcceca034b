"""slerp: spherical interpolation between the base model and one other model (mergekit's ``slerp``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.geometry import combine, gram, require, spherical_coefficients

DOT_THRESHOLD = 0.9995  # |cos| above this: plain linear interpolation (mergekit's threshold)
NORM_EPS = 1e-8  # a norm at or below this counts as 1 when measuring the angle


def slerp_coefficients(g: torch.Tensor, t: float) -> tuple[float, float]:
    """The coefficients of (base, other) from their float64 Gram matrix (2, 2)."""
    na, nb = math.sqrt(float(g[0, 0])), math.sqrt(float(g[1, 1]))
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    cos = torch.tensor(float(g[0, 1]) / (na * nb), dtype=torch.float64).clamp(-1.0, 1.0)
    ca, cb = spherical_coefficients(cos, t, cos.abs() > DOT_THRESHOLD)
    return float(ca), float(cb)


class Slerp(MergeMethod):
    """``sin((1-t)θ)/sin θ · base + sin(tθ)/sin θ · other``, θ the angle between the two whole tensors.

    The angle is measured on the tensors normalised by their norms (a norm <= 1e-8 counts as 1); the
    coefficients then apply to the tensors themselves (norms are not interpolated). When ``|cos θ| >
    0.9995`` (near-parallel or near-antiparallel) it falls back to ``(1-t)·base + t·other``. t = 0 is the
    base model. One statistics pass (|base|², |other|², base·other in float64): O(1) state.
    """

    name = "slerp"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    description = "Spherical linear interpolation between the base model and one other model."
    needs_base = True
    parameters = {
        "t": Param(None, help="interpolation factor: 0 is the base model, 1 the other (required)"),
    }

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        t = float(require(params, "t", self.name))
        if tensor.n != 1 or not tensor.has_base:
            raise RecipeError(f"slerp: merges the base model with exactly one other model (tensor {tensor.name})")
        if tensor.numel == 0:
            return (1.0 - t, t)
        return slerp_coefficients(gram(tensor, lambda xs, base: torch.stack([base, xs[0]]))[0], t)

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if base is None or xs.shape[0] != 1:
            raise RecipeError(f"slerp: merges the base model with exactly one other model (tensor {at.name})")
        ca, cb = (torch.tensor(c, dtype=xs.dtype, device=xs.device) for c in stats)
        return combine((ca, cb), (base, xs[0]))
