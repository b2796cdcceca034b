"""nuslerp: slerp between two models' weights or task vectors, per tensor or per row (mergekit's ``nuslerp``)."""

from __future__ import annotations

from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.geometry import combine, gram, task_vectors, group_index, require, spherical_coefficients

NORM_MIN = 1e-7  # norms are clamped to at least this before normalising
EPS = 1e-8  # colinear when 1 - cos² <= EPS²


def _vectors(params: TensorParams) -> int | None:
    if params["nuslerp_flatten"]:
        return None
    return 0 if params["nuslerp_row_wise"] else -1


def _t(params: TensorParams, at_name: str) -> float:
    w = [float(v) for v in require(params, "weight", "nuslerp")]
    if len(w) != 2:
        raise RecipeError(f"nuslerp: merges exactly 2 models besides the base (tensor {at_name})")
    total = w[0] + w[1]
    return 0.5 if abs(total) < 1e-6 else w[1] / total


class NuSlerp(MergeMethod):
    """Slerp of two models with t = w₂/(w₁+w₂) (0.5 when |w₁+w₂| < 1e-6); with a base, of their deltas.

    The vectors: the whole tensor (``nuslerp_flatten``, the default), else the rows (vectors along the last
    dimension), or with ``nuslerp_row_wise`` the vectors along dimension 0 (a matrix's columns);
    ``nuslerp_flatten`` wins over ``nuslerp_row_wise``. Per vector: cos = v₁·v₂ / (max(|v₁|,1e-7)
    max(|v₂|,1e-7)) clamped to [-1, 1]; colinear (1 - cos² <= 1e-16): ``(1-t)v₁ + t v₂``; else
    ``(sin((1-t)θ) v₁ + sin(tθ) v₂) / sin θ``. One statistics pass (the 2x2 Gram matrix per vector in
    float64): O(1) state, O(vectors) per row or column.
    """

    name = "nuslerp"
    reference = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    description = "Spherical interpolation of two models (or their task vectors) by weight, per tensor or per row."
    needs_base = False
    parameters = {
        "weight": Param(None, per_model=True, help="relative weights of the two models (required)"),
        "nuslerp_row_wise": Param(False, kind="bool", help="interpolate the vectors along dimension 0"),
        "nuslerp_flatten": Param(True, kind="bool", help="interpolate the whole tensor as one vector"),
    }

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        t = _t(params, tensor.name)
        if tensor.n != 2:
            raise RecipeError(f"nuslerp: merges exactly 2 models besides the base (tensor {tensor.name})")

        g = gram(tensor, task_vectors, _vectors(params))
        if g.numel() == 0:
            return torch.empty(g.shape[0], 2, dtype=torch.float64)
        norms = torch.sqrt(torch.diagonal(g, dim1=-2, dim2=-1).clamp(min=0)).clamp(min=NORM_MIN)
        cos = (g[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1.0, 1.0)
        ca, cb = spherical_coefficients(cos, t, (1 - cos * cos) <= EPS * EPS)
        return torch.stack([ca, cb], dim=1)

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if xs.shape[0] != 2:
            raise RecipeError(f"nuslerp: merges exactly 2 models besides the base (tensor {at.name})")
        coefs = stats.to(xs.dtype).to(xs.device)
        ids = group_index(at.shape, _vectors(params), at.start, at.stop, xs.device)
        ca, cb = (coefs[0, 0], coefs[0, 1]) if ids is None else (coefs[ids, 0], coefs[ids, 1])
        if base is None:
            return combine((ca, cb), (xs[0], xs[1]))
        return base + combine((ca, cb), (xs[0] - base, xs[1] - base))
