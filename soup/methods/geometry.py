"""Shared math of the geometric methods (slerp, nuslerp, multislerp, karcher, model_stock, arcee_fusion, ram).

Everything here works on blocks of flat positions, so a method keeps O(1) state per vector whatever the
tensor's size:

- ``vectors`` (``None``, ``-1`` or ``0``) says which vectors a method measures: the whole tensor as one
  vector, the vectors along the last dimension (rows), or the vectors along dimension 0 (one per index of
  the other dimensions: the columns of a matrix). ``group_count`` / ``group_index`` map flat positions to
  those vectors.
- ``gram`` accumulates, in float64, the dot products of a few vectors per group (norms and cosines) over
  one pass of ``tensor.blocks()``; ``task_vectors`` gives it the models' deltas from the base.
- ``spherical_coefficients`` turns cosines into slerp's two coefficients.
- ``combine`` sums coefficient x row in a fixed order, so a block's output does not depend on how the
  tensor was split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from soup.errors import RecipeError
from soup.methods.base import At, TensorInput, TensorParams

__all__ = [
    "require",
    "group_count",
    "group_index",
    "gram",
    "task_vectors",
    "spherical_coefficients",
    "combine",
]


def require(params: TensorParams, name: str, method: str, at: At | None = None) -> Any:
    """A parameter mergekit requires (no default): its value, or a RecipeError naming it."""
    try:
        value = params[name]
    except KeyError:
        value = None
    if value is None or (isinstance(value, tuple) and any(v is None for v in value)):
        where = f" (tensor {at.name})" if at is not None else ""
        raise RecipeError(f"{method}: parameter {name!r} is required{where}")
    return value


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def group_count(shape: Sequence[int], vectors: int | None) -> int:
    """How many vectors the tensor holds: 1 (whole), its rows (``-1``) or its dim-0 vectors (``0``)."""
    if vectors is None or len(shape) == 0:
        return 1
    numel = _numel(shape)
    if vectors == -1:
        return numel // shape[-1] if shape[-1] else 0
    if vectors == 0:
        return numel // shape[0] if shape[0] else 0
    raise ValueError(f"vectors must be None, -1 or 0, not {vectors!r}")


def group_index(shape: Sequence[int], vectors: int | None, start: int, stop: int,
                device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The vector each flat position of ``[start, stop)`` belongs to (int64), or None for the whole tensor."""
    if vectors is None or len(shape) == 0:
        return None
    idx = torch.arange(start, stop, dtype=torch.int64, device=device)
    if vectors == -1:
        return idx // shape[-1]
    inner = _numel(shape) // shape[0]
    return idx % inner


def gram(tensor: TensorInput, rows: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
         vectors: int | None = None) -> torch.Tensor:
    """Dot products of the rows ``rows(xs, base)`` (k, block) per vector group, accumulated in float64.

    One pass over ``tensor.blocks()``. Returns (groups, k, k) on the CPU, symmetric; groups is 1 for the
    whole tensor. State: groups x k x k float64 (O(1) for the whole tensor, O(rows) per row).
    """
    groups = group_count(tensor.shape, vectors)
    out: torch.Tensor | None = None
    for at, xs, base in tensor.blocks():
        v = rows(xs, base).to(torch.float64)
        k = v.shape[0]
        if out is None:
            out = torch.zeros(groups, k, k, dtype=torch.float64, device=v.device)
        ids = group_index(tensor.shape, vectors, at.start, at.stop, device=v.device)
        if ids is None:
            out[0] += v @ v.T
            continue
        for i in range(k):
            for j in range(i, k):
                s = torch.zeros(groups, dtype=torch.float64, device=v.device)
                s.index_add_(0, ids, v[i] * v[j])
                out[:, i, j] += s
                if j != i:
                    out[:, j, i] += s
    if out is None:  # an empty tensor
        out = torch.zeros(groups, 0, 0, dtype=torch.float64)
    return out.cpu()


def task_vectors(xs: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``xs - base`` in float64 (exact for float32 values), or ``xs`` in float64 without a base: for ``gram``."""
    v = xs.to(torch.float64)
    return v - base.to(torch.float64) if base is not None else v


def spherical_coefficients(cos: torch.Tensor, t: float,
                           linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """slerp's coefficients of the two endpoints, ``sin((1-t)θ)/sin θ`` and ``sin(tθ)/sin θ`` (θ = acos cos).

    Where ``linear`` is set they are ``1-t`` and ``t`` (plain interpolation). float64 in, float64 out.
    """
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    safe = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    ca = torch.where(linear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    cb = torch.where(linear, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return ca, cb


def combine(coefs: Iterable[torch.Tensor | float], rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum_j coefs[j] * rows[j]``, left to right, each product and sum rounded in the rows' dtype.

    A coefficient is a scalar or a per-element tensor (already in the rows' dtype). No matmul: its blocking
    would make a position's result depend on the block's size.
    """
    acc: torch.Tensor | None = None
    for c, r in zip(coefs, rows):
        term = c * r
        acc = term if acc is None else acc + term
    if acc is None:
        raise ValueError("combine: nothing to combine")
    return acc
