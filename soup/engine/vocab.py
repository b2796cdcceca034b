"""Vocabulary-indexed tensors souped by token, block by block (``Job.rows``: ``soup.io.vocab.VocabPlan``).

Row r of the soup's embeddings (or output head) is token r of the soup's vocabulary. For a block of
output rows, each ingredient's rows of the same token strings are gathered (``index_select`` on the
memory-mapped tensor: only those rows are read) and combined; memory is one block per input.

- **Weighted mean** (``mean``; a take is the one-hot mean): each row is the weighted mean of the
  rows of the ingredients that have the token, their weights rescaled to the sum of all the weights
  (renormalised among them). A row every weighted ingredient has uses the weights as given, so the
  arithmetic is the engine's definition (``acc = x_0 w_0; acc += x_i w_i``, in the accumulation
  dtype). A token that only zero-weight ingredients have (a greedy soup that left out the one that
  added it) is their equal-weight mean: the soup's vocabulary is the same for every candidate. A row
  nobody has (padding beyond every ingredient's) is zero.
- **Merge methods**: the method runs on the rows of the tokens the base model has (without a base:
  the tokens every weighted ingredient has), gathered into a tensor of those rows in output order;
  an ingredient that lacks one of these tokens contributes the base's row (a zero task vector).
  Tokens the base lacks have no task vector: their rows are the weighted mean of the ingredients
  that have them, the method's per-model weights normalised to 1 among those.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from soup.engine.apply import method_blocks
from soup.engine.plan import Job
from soup.errors import CheckpointError

__all__ = ["row_blocks"]


def row_blocks(job: Job, views: Sequence[torch.Tensor | None], *, work: torch.dtype, step: int,
               device: torch.device, out_buf: Callable[[torch.dtype, int], torch.Tensor],
               where: Callable[[int, str], str], labels: Sequence[str]) -> Iterator[torch.Tensor]:
    """Yield ``job``'s output as consecutive 1-D blocks of whole rows (valid until the next one)."""
    rows = job.shape[0]
    if rows == 0:
        return
    width = job.numel // rows
    reads = list(job.reads(len(views)))
    mats = {i: views[i].reshape(-1, width) for i in reads}  # (rows of checkpoint i, width)
    holders = [i for i in reads if i != job.base or job.kind != "method"]
    per = max(1, step // max(1, width))  # rows per block
    in_method, pull = None, None
    if job.kind == "method":
        in_method, pull = _method_rows(job, mats, work=work, step=step, device=device, where=where, labels=labels)
    for r0 in range(0, rows, per):
        r1 = min(r0 + per, rows)
        n = (r1 - r0) * width
        out = out_buf(job.out_dtype, n)
        if out.numel() != n:
            out = torch.empty(n, dtype=job.out_dtype, device=out.device)
        out2 = out.view(r1 - r0, width)
        picked = in_method[r0:r1] if in_method is not None else torch.zeros(r1 - r0, dtype=torch.bool)
        if bool(picked.any()):
            vals = torch.empty(int(picked.sum()) * width, dtype=job.out_dtype)
            pull(vals)
            out2[picked.to(out.device)] = vals.view(-1, width).to(out.device)
        rest = (~picked).nonzero().squeeze(1) + r0
        if rest.numel():
            acc = _mean_rows(job, mats, holders, rest, work=work, device=device, where=where, labels=labels,
                             normalise=job.kind == "method")
            part = acc.to(job.out_dtype)
            if not _finite(part):
                bad = int((~torch.isfinite(part.float())).nonzero()[0, 0])
                raise CheckpointError(f"tensor {job.name}: the weighted mean overflows "
                                      f"{str(job.out_dtype).removeprefix('torch.')} in row {int(rest[bad])} "
                                      f"(value {float(acc[bad].abs().max()):.6g})")
            if rest.numel() == r1 - r0:
                out2.copy_(part)
            else:
                out2[(rest - r0).to(out.device)] = part.to(out.device)
        yield out


def _mean_rows(job: Job, mats, holders: Sequence[int], rows: torch.Tensor, *, work: torch.dtype,
               device: torch.device, where, labels, normalise: bool) -> torch.Tensor:
    """(len(rows), width) in ``work``: each output row the weighted mean of the holders' rows of its token.

    ``normalise``: weights scaled to sum to 1 among the holders (a method's tokens without a task
    vector); else to the sum of every weight (a row every weighted ingredient holds: as given).
    """
    maps = torch.stack([job.rows.maps[i][rows] for i in holders])  # (m, k) source rows, -1: none
    held = maps >= 0
    w = torch.tensor([job.weights[i] if i < len(job.weights) else 0.0 for i in holders], dtype=torch.float64)
    weighted = held & (w != 0)[:, None]
    W = torch.where(weighted, w[:, None], torch.zeros((), dtype=torch.float64))  # (m, k)
    got = W.sum(0)
    total = math.fsum(float(x) for x in w)
    every = (weighted == (w != 0)[:, None]).all(0)  # rows every weighted ingredient holds
    if normalise:
        W = W / torch.where(got != 0, got, torch.ones((), dtype=torch.float64))
    elif total != 0:
        got = torch.where(every | (got == 0), torch.full((), total, dtype=torch.float64), got)
        W = W / got * total  # (w / got) * total: a lone holder's weight is exactly the total
    orphan = ~weighted.any(0)  # tokens only zero-weight ingredients hold: their equal-weight mean
    if bool(orphan.any()):
        count = held.sum(0).clamp(min=1).to(torch.float64)
        W = torch.where(orphan[None, :] & held, 1.0 / count[None, :], W)
    acc = torch.zeros((len(rows), mats[holders[0]].shape[1]), dtype=work, device=device)
    for j, i in enumerate(holders):
        pos = (W[j] != 0).nonzero().squeeze(1)
        if not pos.numel():
            continue
        x = mats[i].index_select(0, maps[j, pos]).to(device=device, dtype=work)  # (p, width)
        x.mul_(W[j, pos].to(device=device, dtype=work)[:, None])
        acc.index_add_(0, pos.to(device), x)
    if not _finite(acc):
        _trace(job, mats, holders, maps, W, acc, rows, where, labels)
    return acc


def _trace(job: Job, mats, holders, maps, W, acc, rows, where, labels) -> None:
    """A non-finite row: the ingredient row that holds one, or the mean's own overflow."""
    for j, i in enumerate(holders):
        for p in (W[j] != 0).nonzero().squeeze(1).tolist():
            x = mats[i][int(maps[j, p])]
            if not _finite(x):
                raise CheckpointError(f"{where(i, job.name)}: tensor {job.name}: non-finite value in row "
                                      f"{int(maps[j, p])} (ingredient {labels[i]})")
    bad = int((~torch.isfinite(acc)).nonzero()[0, 0])
    raise CheckpointError(f"tensor {job.name}: the weighted mean overflows {str(acc.dtype).removeprefix('torch.')} "
                          f"in row {int(rows[bad])}")


def _method_rows(job: Job, mats, *, work, step, device, where, labels):
    """The rows a method computes (a (rows,) mask) and ``pull(into)``, which fills ``into`` with the
    method's next values, row after row of those rows."""
    plan, srcs, base = job.rows, job.sources(), job.base
    width = job.numel // job.shape[0]
    if base is not None:
        picked = plan.maps[base] >= 0
    else:
        picked = torch.stack([plan.maps[i] >= 0 for i in srcs]).all(0)
    at = picked.nonzero().squeeze(1)  # (K,) output rows, in order
    if not at.numel():
        return picked, None
    fill = (mats[base], plan.maps[base][at]) if base is not None else None
    views: list = [None] * (max(mats) + 1)
    for i in srcs:
        views[i] = _Gathered(mats[i], plan.maps[i][at], fill, width, work)
    if base is not None:
        views[base] = _Gathered(mats[base], plan.maps[base][at], None, width, work)
    inner = dataclasses.replace(job, shape=(int(at.numel()), *job.shape[1:]), rows=None, also=())
    blocks = method_blocks(inner, views, work=work, step=step, device=device, where=where, labels=labels,
                           out_buf=lambda dt, k: torch.empty(k, dtype=dt))
    state = {"block": torch.empty(0), "pos": 0}

    def pull(into: torch.Tensor) -> None:
        got = 0
        while got < into.numel():
            if state["pos"] == state["block"].numel():
                state["block"], state["pos"] = next(blocks), 0
            k = min(into.numel() - got, state["block"].numel() - state["pos"])
            into[got:got + k].copy_(state["block"][state["pos"]:state["pos"] + k])
            got, state["pos"] = got + k, state["pos"] + k

    return picked, pull


class _Gathered:
    """One checkpoint's rows for the method's tokens as a flat tensor, sliced like the engine's views;
    rows it lacks (-1) come from ``fill`` (the base model's rows of those tokens)."""

    def __init__(self, mat: torch.Tensor, idx: torch.Tensor, fill, width: int, dtype: torch.dtype) -> None:
        self.mat, self.idx, self.fill, self.width, self.dtype = mat, idx, fill, width, dtype

    def __getitem__(self, s: slice) -> torch.Tensor:
        r0, r1 = s.start // self.width, -(-s.stop // self.width)
        idx = self.idx[r0:r1]
        own = idx >= 0
        out = torch.empty((r1 - r0, self.width), dtype=self.dtype)
        if bool(own.all()):
            out.copy_(self.mat.index_select(0, idx))
        else:
            out[own] = self.mat.index_select(0, idx[own]).to(self.dtype)
            mat, fidx = self.fill
            out[~own] = mat.index_select(0, fidx[r0:r1][~own]).to(self.dtype)
        return out.view(-1)[s.start - r0 * self.width:s.stop - r0 * self.width]


def _finite(t: torch.Tensor) -> bool:
    if t.dtype.itemsize == 1:
        t = t.float()
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())
