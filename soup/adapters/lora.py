"""Low-rank math for adapter soups: a LoRA is souped as its delta, never as its factors.

A LoRA module adds ``s * B @ A`` to a weight (``A``: (r, in), ``B``: (out, r), ``s`` its scaling).
The soup of N such modules with weights ``w_i`` is the weighted sum of their deltas

    D = sum_i w_i * s_i * B_i @ A_i                      # (out, in)

which is *not* ``mean(B) @ mean(A)``: that product adds the cross terms ``B_i @ A_j`` (i != j).
Three exact or measured ways to write ``D`` back:

- ``delta``: ``D`` itself (merged into a base weight: ``W = W0 + D``), one module at a time;
- ``concat``: ``D`` as one LoRA of rank ``sum_i r_i``, exactly: ``A = [A_1; ...; A_N]`` stacked
  over rows and ``B = [w_1 s_1 B_1, ..., w_N s_N B_N]`` side by side, so ``B @ A = D`` and the
  scaling is 1;
- ``truncate``: the best rank-k approximation of ``D`` (Eckart-Young), computed from the factors
  without ever forming ``D``: QR of the stacked factors, an SVD of the small (R, R) core. The
  relative Frobenius error ``||D - B_k A_k|| / ||D||`` is measured on the factors as written (in
  their output dtype), again through small QRs (``lowrank_norm``), so it is exact, not an estimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Term", "delta", "concat", "truncate", "lowrank_norm", "relative_error"]

Term = tuple[torch.Tensor, torch.Tensor, float]  # (A: (r, in), B: (out, r), coefficient w_i * s_i)


def delta(terms: Sequence[Term], *, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """``sum_i c_i * B_i @ A_i`` as one (out, in) tensor in ``dtype`` (each product in ``dtype``)."""
    out = None
    for a, b, c in terms:
        prod = b.to(device=device, dtype=dtype) @ a.to(device=device, dtype=dtype)  # (out, in)
        prod.mul_(c)
        out = prod if out is None else out.add_(prod)
    if out is None:
        raise ValueError("delta of no terms")
    return out


def concat(terms: Sequence[Term], *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rank-concatenated LoRA ``(A, B)`` of ``terms``: ``B @ A == sum_i c_i B_i @ A_i``.

    ``c_i`` is folded into ``B_i`` (computed in float32, or float64 for float64 output), so the
    written adapter's scaling is 1. Shapes: A (sum r_i, in), B (out, sum r_i).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    a = torch.cat([t[0].to(work) for t in terms], dim=0).to(dtype)
    b = torch.cat([t[1].to(work) * t[2] for t in terms], dim=1).to(dtype)
    return a, b


def _stack(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 factors (B_cat, A_cat) of the sum, coefficients folded into B."""
    a = torch.cat([t[0].to(torch.float64) for t in terms], dim=0)  # (R, in)
    b = torch.cat([t[1].to(torch.float64) * t[2] for t in terms], dim=1)  # (out, R)
    return b, a


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||B @ A||_F`` without forming the product: ``||R_b R_a^T||`` from the QRs of B and A^T."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    if b.shape[1] == 0:
        return 0.0
    rb = torch.linalg.qr(b, mode="r")[1]  # (R, R) when out >= R
    ra = torch.linalg.qr(a.T, mode="r")[1]
    return float(torch.linalg.matrix_norm(rb @ ra.T))


def relative_error(terms: Sequence[Term], b_k: torch.Tensor, a_k: torch.Tensor) -> float:
    """``||D - B_k A_k||_F / ||D||_F`` for ``D`` the sum of ``terms``, measured exactly from the factors
    (0 when ``D`` is 0 and so is the approximation)."""
    b, a = _stack(terms)
    whole = lowrank_norm(b, a)
    rest = lowrank_norm(torch.cat([b, -b_k.to(torch.float64)], dim=1), torch.cat([a, a_k.to(torch.float64)], dim=0))
    return rest / whole if whole > 0 else (0.0 if rest == 0 else float("inf"))


def truncate(terms: Sequence[Term], rank: int, *, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` LoRA ``(A_k, B_k)`` of the summed delta, and its measured relative error.

    ``sqrt(S)`` is split between the factors so both keep the same scale. The rank is
    ``min(rank, sum r_i, out, in)``: a larger request is the exact delta at its own rank.
    """
    b, a = _stack(terms)  # D = b @ a, (out, R) @ (R, in)
    qb, rb = torch.linalg.qr(b)  # (out, R'), (R', R)
    qa, ra = torch.linalg.qr(a.T)  # (in, R''), (R'', R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # the (R', R'') core holds every singular value of D
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b_k = ((qb @ u[:, :k]) * root).to(dtype)  # (out, k)
    a_k = (root[:, None] * (vh[:k] @ qa.T)).to(dtype)  # (k, in)
    return a_k, b_k, relative_error(terms, b_k, a_k)
