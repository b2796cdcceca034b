"""Exact order statistics and sums of data streamed in blocks, for methods that need a whole-tensor statistic.

A method that needs a statistic of a whole tensor (a magnitude threshold, a quantile, an L1 norm) gets it
from passes over the tensor's blocks, never by loading the tensor. The two exact, order-free reductions
they share are written here once:

- ``radix_select``: the exact k-th smallest value of a row, for several ``(row, k)`` targets at once.
  Radix select on signed, sortable integer keys of the IEEE bit patterns, 16 bits a pass (float32: 2
  passes, float64: 4), with O(targets x 65536) state whatever the data's length.
- ``kth_largest`` (1-based, per row; k may depend on the rows' counts of non-zero values: the task-vector
  family's magnitude thresholds) and ``kth_smallest`` (0-based, one row: arcee_fusion's quantiles) are
  thin wrappers over it.
- ``ExactSums``: correctly rounded sums per row of non-negative values, whatever the block split or order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

__all__ = ["radix_select", "kth_largest", "kth_smallest", "ExactSums", "Targets"]

_DIGIT = 16  # bits per pass
_BINS = 1 << _DIGIT
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}
_WIDTH = {torch.float32: 32, torch.float64: 64}

Targets = Sequence[tuple[int, int]]
"""``(row, k)`` pairs: which order statistic of which row."""


# --- keys: integers that order as the floats do ---------------------------------------------------

def _keys(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Signed int64 keys ordered as the float32/float64 ``values`` are (-0.0 just below +0.0)."""
    if values.dtype != dtype:
        raise TypeError(f"radix select: a block in {values.dtype}, expected {dtype}")
    bits = values.contiguous().view(_INT[dtype])
    # a negative float's magnitude bits order backwards: flip them (xor with the mask), keep the sign bit
    flip = (bits >> (_WIDTH[dtype] - 1)) & ((1 << (_WIDTH[dtype] - 1)) - 1)
    return (bits ^ flip).to(torch.int64)


def _floats(keys: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The values of ``dtype`` whose keys these are (``_keys`` undone), as a 1-D CPU tensor."""
    k = torch.tensor(keys, dtype=torch.int64)
    bits = torch.where(k < 0, k ^ ((1 << (_WIDTH[dtype] - 1)) - 1), k)
    return bits.to(_INT[dtype]).view(dtype)


def _pick(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin of a (65536,) histogram holding its ``rank``-th smallest (0-based), and the rank within it."""
    at_most = counts.cumsum(0)  # at_most[d]: how many fall in bins <= d
    d = int(torch.searchsorted(at_most, torch.tensor([rank], dtype=at_most.dtype), right=True)[0])
    return d, rank - (int(at_most[d - 1]) if d else 0)


# --- the one radix select --------------------------------------------------------------------------

def radix_select(passes: Callable[[], Iterable[torch.Tensor]], dtype: torch.dtype,
                 targets: Targets | Callable[[list[int]], Targets]) -> torch.Tensor:
    """The exact k-th smallest (0-based) value of a row, for each ``(row, k)`` target, as a 1-D CPU tensor.

    ``passes()`` starts a pass over the data and yields blocks of shape (rows, block) in ``dtype``
    (float32 or float64, any sign); every pass yields the same values. ``targets``: ``(row, k)`` pairs
    with ``0 <= k <`` the row's length, or a function of the rows' lengths returning them (called after
    the first pass; ``[]`` when there was no block).

    Each value's key is its bit pattern as a signed integer with a negative float's magnitude bits
    flipped, so that keys order as the values do; the select runs on the keys, 16 bits a pass, high
    digits first. Pass 1: a 65536-bin histogram of the top digit (signed) per row. Each later pass: a
    histogram of the next digit of the values whose higher digits equal the prefix chosen so far, one
    per distinct ``(row, prefix)``. float32: 2 passes; float64: 4. Counts are integers, so the result
    does not depend on the block split or order; equal to ``sorted(row)[k]`` (NaNs aside).

    Raises:
        TypeError: ``dtype`` is not float32/float64, or a block is not in ``dtype``.
        ValueError: a target's row or k is out of range.
    """
    if dtype not in _INT:
        raise TypeError(f"radix select needs float32 or float64 values, not {dtype}")
    shifts = list(range(_WIDTH[dtype] - _DIGIT, -1, -_DIGIT))
    # pass 1: per row, a histogram of the top digit (signed: offset by half the bins)
    hist: torch.Tensor | None = None
    rows = length = 0
    for vals in passes():
        keys = _keys(vals, dtype)
        if hist is None:
            rows, device = keys.shape[0], keys.device
            hist = torch.zeros(rows * _BINS, dtype=torch.int64, device=device)
            offsets = (torch.arange(rows, dtype=torch.int64, device=device) * _BINS + _BINS // 2).unsqueeze(1)
        top = ((keys >> shifts[0]) + offsets).reshape(-1)
        hist.index_add_(0, top, torch.ones_like(top))  # integer counts: exact, order-free
        length += keys.shape[1]
    lengths = [length] * rows
    resolved = list(targets(lengths) if callable(targets) else targets)
    for row, k in resolved:
        if not 0 <= row < rows or not 0 <= k < lengths[row]:
            raise ValueError(f"radix select: rank {k} of row {row} out of range "
                             f"({rows} rows of {length} values)")
    if not resolved:
        return torch.empty(0, dtype=dtype)
    counts = hist.view(rows, _BINS).cpu()
    del hist
    prefixes, ranks = [], []
    for row, k in resolved:
        digit, rank = _pick(counts[row], k)
        prefixes.append(digit - _BINS // 2)
        ranks.append(rank)
    # later passes: the next digit among the values of the row that share the prefix chosen so far
    for shift in shifts[1:]:
        groups = list(dict.fromkeys((row, p) for (row, _), p in zip(resolved, prefixes)))
        slot = {g: i for i, g in enumerate(groups)}
        hist = torch.zeros(len(groups) * _BINS, dtype=torch.int64, device=device)
        for vals in passes():
            keys = _keys(vals, dtype)
            picked = []
            for i, (row, p) in enumerate(groups):
                k = keys[row]
                k = k[(k >> (shift + _DIGIT)) == p]
                picked.append(((k >> shift) & (_BINS - 1)) + i * _BINS)
            idx = torch.cat(picked)
            hist.index_add_(0, idx, torch.ones_like(idx))
        counts = hist.view(len(groups), _BINS).cpu()
        del hist
        for t, (row, _) in enumerate(resolved):
            digit, ranks[t] = _pick(counts[slot[(row, prefixes[t])]], ranks[t])
            prefixes[t] = (prefixes[t] << _DIGIT) | digit
    return _floats(prefixes, dtype)


def kth_largest(passes: Callable[[], Iterable[torch.Tensor]], dtype: torch.dtype,
                targets: Targets | Callable[[list[int]], Targets]) -> list[float]:
    """Exact k-th largest values of non-negative data streamed in blocks, one per target.

    ``passes()`` starts a pass over the data and yields blocks of shape (rows, block) in ``dtype``
    (float32 or float64; all values >= 0, -0.0 counts as 0). ``targets``: ``(row, k)`` pairs, k
    1-based (``1 <= k <=`` the row's length), or a function of the rows' counts of non-zero values
    returning them (read after the first pass, for a k that depends on it). No block: ``[]``.
    ``radix_select`` of the ``(length - k)``-th smallest: 2 passes for float32, 4 for float64.
    """
    calls = itertools.count()
    nonzero: list[torch.Tensor] = []  # the rows' counts of non-zero values, summed over the first pass

    def counting() -> Iterator[torch.Tensor]:
        first = next(calls) == 0
        for vals in passes():
            if first:
                c = (vals != 0).sum(dim=1)
                nonzero.append(c if not nonzero else nonzero.pop() + c)
            yield vals

    def ascending(lengths: list[int]) -> list[tuple[int, int]]:
        if not lengths:
            return []
        wanted = targets(nonzero[0].tolist()) if callable(targets) else targets
        out = []
        for row, k in wanted:
            if not 1 <= k <= lengths[row]:
                raise ValueError(f"radix select: k={k} out of range for a row of {lengths[row]}")
            out.append((row, lengths[row] - k))
        return out

    return [v + 0.0 for v in radix_select(counting, dtype, ascending).tolist()]  # + 0.0: -0.0 as 0.0


def kth_smallest(values: Callable[[], Iterator[torch.Tensor]], ks: Sequence[int],
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """The exact k-th smallest (0-based) of the values, for each k in ``ks``, as 0-d tensors of ``dtype``.

    ``values()`` starts a pass and yields the values block by block (float32 or float64, any shape,
    flattened). ``radix_select`` over one row: 2 passes for float32, 4 for float64, whatever the number
    of values. Equal to ``sorted(all values)[k]`` (NaNs aside).
    """
    out = radix_select(lambda: (v.reshape(1, -1) for v in values()), dtype, [(0, int(k)) for k in ks])
    return list(out.unbind())


# --- exact sums ---------------------------------------------------------------------------------

class ExactSums:
    """Exact sums per row of non-negative values streamed in blocks, whatever their order or split.

    Each value, as float64 (float32 converts exactly), is ``m * 2**(e - 1075)`` with a 53-bit integer
    m; the halves of m are added into int64 buckets per (row, exponent), which is exact and
    order-free (capacity: 2**36 values per bucket). ``totals()`` adds the buckets with Python
    integers and rounds once, so the result is the correctly rounded sum.
    """

    _E = 2048

    def __init__(self, rows: int):
        self.rows = rows
        self.hi: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        """Add a (rows, block) block of non-negative finite values."""
        if self.hi is None:
            self.hi = torch.zeros(self.rows * self._E, dtype=torch.int64, device=values.device)
            self.lo = torch.zeros(self.rows * self._E, dtype=torch.int64, device=values.device)
        if values.dtype == torch.float32:  # the common case, in a third of the operations
            self._add32(values)
            return
        bits = values.to(torch.float64).contiguous().view(torch.int64)
        e = (bits >> 52) & 0x7FF
        m = (bits & ((1 << 52) - 1)) | ((e > 0).to(torch.int64) << 52)
        idx = (e + torch.arange(self.rows, dtype=torch.int64, device=bits.device).unsqueeze(1) * self._E)
        idx = idx.reshape(-1)
        self.hi.index_add_(0, idx, (m >> 26).reshape(-1))
        self.lo.index_add_(0, idx, (m & ((1 << 26) - 1)).reshape(-1))

    def _add32(self, values: torch.Tensor) -> None:
        """float32 values from their own bits: ``m * 2**(max(e, 1) - 150)`` with a 24-bit m (the hidden
        bit set unless subnormal), m added whole into an int64 bucket per (row, e) kept after the float64
        ones (2**39 values per bucket); ``totals`` shifts them into place. Same sums, a third of the work."""
        if self.hi.numel() == self.rows * self._E:  # the float32 buckets, once: 256 per row
            self.hi = torch.cat([self.hi, torch.zeros(self.rows * 256, dtype=torch.int64, device=values.device)])
        bits = values.contiguous().view(torch.int32)  # non-negative: the sign bit is 0
        e = bits >> 23
        m = (bits & ((1 << 23) - 1)) + (e > 0).to(torch.int32) * (1 << 23)
        idx = e + torch.arange(self.rows * self._E, self.rows * (self._E + 256), 256, dtype=torch.int32,
                               device=bits.device).unsqueeze(1)
        self.hi.index_add_(0, idx.reshape(-1), m.reshape(-1).to(torch.int64))

    def totals(self) -> list[float]:
        """The correctly rounded sum of each row (0.0 for a row that saw no block)."""
        if self.hi is None:
            return [0.0] * self.rows
        out = []
        hi = self.hi[: self.rows * self._E].view(self.rows, self._E).tolist()
        lo = self.lo.view(self.rows, self._E).tolist()
        f32 = self.hi[self.rows * self._E:].view(self.rows, 256).tolist() if self.hi.numel() > self.rows * self._E \
            else [[0] * 256 for _ in range(self.rows)]
        for r in range(self.rows):
            total = 0
            for e in range(self._E):
                if hi[r][e] or lo[r][e]:
                    # value * 2**1074 = m << (max(e, 1) - 1), exactly
                    total += ((hi[r][e] << 26) + lo[r][e]) << (max(e, 1) - 1)
            for e in range(256):
                if f32[r][e]:  # float32 value * 2**1074 = m << (max(e, 1) + 924), exactly
                    total += f32[r][e] << (max(e, 1) + 924)
            out.append(total / (1 << 1074))  # int / int: correctly rounded
        return out
