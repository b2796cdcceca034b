"""karcher: the Karcher (Riemannian) mean of the models on the unit hypersphere (mergekit's ``karcher``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from soup.methods.base import At, MergeMethod, Param, TensorInput, TensorParams
from soup.methods.geometry import combine, gram


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean, times the mean norm, as ``sum_j k_j x_j``: k from the models' Gram matrix (N, N).

    Equal weights 1/N. Units u_i = x_i/|x_i|; the models with |x_i| <= tol are left out of the mean (their
    weights renormalised over the others). Start: the normalised weighted mean of the units (the first
    unit if its norm is < tol). Each iteration: tangent T = sum_i a_i θ_i/sin θ_i (u_i - cos θ_i m) over
    the units with θ_i = acos(m·u_i) >= tol; stop when |T| < tol; m <- cos|T| m + sin|T| T/|T|, then
    renormalised. Output: (sum_i |x_i|/N) m. The mean stays in the span of the units, so the iteration
    runs on its coefficients, with dot products taken from the Gram matrix.
    """
    n = g.shape[0]
    norms = torch.sqrt(torch.diagonal(g).clamp(min=0))
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    alphas = torch.zeros(n, dtype=torch.float64)
    alphas[valid] = 1.0 / len(valid)
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    units = g * inv[:, None] * inv[None, :]  # u_i·u_j

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean = alphas.clone()  # coefficients of the mean on the units
    mean_norm = norm(mean)
    if mean_norm < tol:
        mean = torch.zeros(n, dtype=torch.float64)
        mean[valid[0]] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)  # m·u_i
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            step = float(alphas[i]) * theta / math.sin(theta)
            tangent = tangent - step * float(dots[i]) * mean
            tangent[i] += step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float(norms.sum()) / n
    return scale * mean * inv


class Karcher(MergeMethod):
    """The Karcher mean on the unit sphere of the whole tensors (equal weights), scaled by their mean norm.

    A base model, when given, is averaged as one more model, after the others: mergekit's contract ignores
    the base's role and adds a config's ``base_model`` to the inputs. Memory: the iterations only need dot products, so they run on an N x N Gram matrix from one statistics
    pass (float64, O(N²) state); no whole-tensor copy.
    """

    name = "karcher"
    reference = "https://arxiv.org/abs/2603.04972"
    description = "Karcher (Riemannian) mean of the models' weights on the hypersphere."
    needs_base = False
    parameters = {
        "max_iter": Param(10, kind="int", help="most iterations of the Karcher mean"),
        "tol": Param(1e-5, help="convergence tolerance (and the smallest norm and angle taken into account)"),
    }

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        n = tensor.n + int(tensor.has_base)
        if n == 1:
            return None
        if tensor.numel == 0:
            return torch.zeros(n, dtype=torch.float64)
        g = gram(tensor, lambda xs, base: xs if base is None else torch.cat([xs, base[None]]))[0]
        return karcher_coefficients(g, int(params["max_iter"]), float(params["tol"]))

    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        points = list(xs.unbind(0)) + ([] if base is None else [base])  # the base model last, when given
        if len(points) == 1:
            return points[0].clone()
        return combine(stats.to(xs.dtype).to(xs.device).unbind(0), points)
