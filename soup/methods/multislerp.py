"""multislerp: barycentric interpolation of several models on the hypersphere (mergekit's ``multislerp``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.geometry import combine, gram, task_vectors, require


def _weights(params: TensorParams, n: int, name: str) -> torch.Tensor:
    w = torch.tensor([float(v) for v in require(params, "weight", "multislerp")], dtype=torch.float64)
    if w.numel() != n:
        raise RecipeError(f"multislerp: {w.numel()} weights for {n} models (tensor {name})")
    if params["normalize_weights"]:
        if float(w.sum()) == 0.0:
            raise RecipeError(f"multislerp: the weights sum to 0 with normalize_weights: true (tensor {name})")
        w = w / w.sum()
    return w


def multislerp_coefficients(g: torch.Tensor, w: torch.Tensor, eps: float, name: str) -> torch.Tensor:
    """The output as ``sum_j k_j v_j`` (v the task vectors, or the models without a base): k from the Gram matrix.

    u_i = v_i/(|v_i|+eps); M = sum_i w_i u_i; m = M/|M|; T = sum_i w_i (u_i - (u_i·m) m) (the tangent at m);
    r = m cos|T|' + T sin|T|'/|T|' with |T|' = |T| + eps; output = (sum_i w_i |v_i|) r. |M| < eps: for two
    models ``w_1 v_1 + w_2 v_2``, else an error (antipodal inputs whose weights cancel).
    """
    n = g.shape[0]
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0))
    mc = w / (norms + eps)  # M in terms of the v_j
    mean_norm = math.sqrt(max(float(mc @ g @ mc), 0.0))
    if mean_norm < eps:
        if n == 2:
            return w.clone()
        raise RecipeError(
            f"multislerp: the weighted sum of the unit tensors is zero (tensor {name}): antipodal models whose "
            "weights cancel; use different weights")
    mhat = mc / mean_norm
    unit_dots = (g @ mhat) / (norms + eps)  # u_i·m
    tangent = mc - float(w @ unit_dots) * mhat  # sum_i w_i u_i - (sum_i w_i u_i·m) m
    tangent_norm = math.sqrt(max(float(tangent @ g @ tangent), 0.0)) + eps
    r = math.cos(tangent_norm) * mhat + (math.sin(tangent_norm) / tangent_norm) * tangent
    return r * float(w @ norms)


class MultiSlerp(MergeMethod):
    """Barycentric interpolation on the hypersphere of the whole tensors (their task vectors with a base).

    The inputs are projected on the unit sphere, averaged with the weights (``normalize_weights``: divided by
    their sum), projected to the tangent space at that mean, interpolated there and mapped back with the
    exponential map, then scaled by the weighted mean of the inputs' norms. The tangent step cancels
    exactly, so the result is the normalised weighted mean of the unit inputs times the weighted mean norm
    (the float rounding aside). One model: that model. One statistics pass: the N x N Gram matrix in
    float64 (O(N²) state).
    """

    name = "multislerp"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    description = "Barycentric spherical interpolation of several models (or their task vectors)."
    needs_base = False
    parameters = {
        "weight": Param(None, per_model=True, help="each model's weight (required)"),
        "normalize_weights": Param(True, kind="bool", help="divide the weights by their sum"),
        "eps": Param(1e-8, help="added to norms before dividing"),
    }

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        w = _weights(params, tensor.n, tensor.name)
        if tensor.n == 1:
            return None

        if tensor.numel == 0:
            return w
        g = gram(tensor, task_vectors)[0]
        return multislerp_coefficients(g, w, float(params["eps"]), tensor.name)

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        if xs.shape[0] == 1:
            return xs[0].clone()
        k = stats.to(xs.dtype).to(xs.device).unbind(0)
        if base is None:
            return combine(k, xs.unbind(0))
        return combine(k, (x - base for x in xs.unbind(0))) + base
