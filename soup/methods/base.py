"""The merge-method contract: how the tensors of N ingredients (and maybe a base model) combine.

A strategy decides *which* ingredients and parameters; a merge method decides *how* their tensors
combine. The engine applies one method per tensor, block by block, so memory stays O(block) per
ingredient whatever the tensor's size:

1. ``statistics(tensor, params)`` (optional) makes as many passes over the tensor's blocks as it needs
   (``tensor.blocks()``, each a fresh pass) and returns what the second step needs: a magnitude
   threshold, norms, dot products, cosines. Nothing of the size of the tensor may be kept.
2. ``block(xs, base, params, stats, at)`` computes the output for one block of flat positions
   ``[at.start, at.stop)`` from the ingredients' values there.

Values reach a method in the work dtype (float32 for 16-/8-bit inputs, float64 when any input is
float32 or float64); the engine casts the result to the output dtype and checks it is finite.

A method whose math truly needs the whole tensor (an iterative mean over rows, a rank within a row)
sets ``whole_tensor = True``: ``block`` then gets the whole tensor as one block, one tensor at a time
(memory: N x the largest tensor, documented on the method).

Random methods (``random = True``) draw element i's randomness from ``uniform(seed, at.name, i)``: a
counter-based generator keyed by the seed, the tensor name and the element's flat index, so the bytes
do not depend on the block size or the device.

Methods are plug-ins like strategies and evaluators (``soup.plugins``): the entry-point group
``soup.methods`` (the built-ins are registered there), ``module:Class`` or ``path/to/file.py:Class``.
A new method is one file: a subclass with a name, a reference, its parameters and ``block``.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = ["MergeMethod", "Param", "TensorParams", "TensorInput", "At", "uniform", "uniform_below"]


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as mergekit names it.

    ``per_model``: given per ingredient (``weight``, ``density``), a list of N values once resolved;
    else one value for the whole merge (``lambda``, ``t``). ``kind``: "float", "bool" or "int".
    ``low``/``high``: the valid range (inclusive), checked before any work. ``required``: no default;
    the merge is refused before any work when it is not given (mergekit's required parameters).
    """

    default: Any
    per_model: bool = False
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    help: str = ""
    required: bool = False


@dataclass(frozen=True)
class At:
    """Where a block lies: the tensor's name and shape, and the flat range ``[start, stop)``."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class TensorParams:
    """A method's parameters resolved for one tensor (filters and layer gradients applied).

    ``values``: the global parameters by name; ``per_model``: the per-ingredient parameters by name,
    one value per ingredient (the ingredients this tensor is read from, in order); ``seed``: the
    merge's seed (random methods).
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    per_model: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    seed: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.per_model[name] if name in self.per_model else self.values[name]


@dataclass
class TensorInput:
    """One tensor's inputs, for a method's first passes.

    ``blocks()`` starts a new pass: ``(at, xs, base)`` per block, ``xs`` of shape (n, block) in the
    work dtype, ``base`` (block,) or None. ``n``: the ingredients read; ``numel``; ``dtype``: the work dtype.
    """

    name: str
    shape: tuple[int, ...]
    n: int
    dtype: torch.dtype
    has_base: bool
    _blocks: Callable[[], Iterator[tuple[At, torch.Tensor, torch.Tensor | None]]]

    @property
    def numel(self) -> int:
        k = 1
        for d in self.shape:
            k *= d
        return k

    def blocks(self) -> Iterator[tuple[At, torch.Tensor, torch.Tensor | None]]:
        return self._blocks()


class MergeMethod(ABC):
    """Base class of merge methods: the per-tensor math, one abstract method (``block``).

    Class attributes: ``name`` (mergekit's name where it has one), ``reference`` (a URL the model
    card cites), ``description`` (one line in words, for the card), ``needs_base`` (True: the base
    model is required; False: it is used when given where the method defines it, else not read),
    ``random`` (uses ``uniform``), ``whole_tensor`` (see the module docstring), ``parameters``
    (name -> ``Param``; the per-model ones are ``Param(per_model=True)``).

    Instances are stateless across tensors and may be called from several threads, one tensor each.
    """

    name: ClassVar[str]
    reference: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False
    random: ClassVar[bool] = False
    whole_tensor: ClassVar[bool] = False
    parameters: ClassVar[Mapping[str, Param]] = {}

    def statistics(self, tensor: TensorInput, params: TensorParams) -> Any:
        """First passes over the tensor (``tensor.blocks()``); the result goes to every ``block`` call."""
        return None

    @abstractmethod
    def block(self, xs: torch.Tensor, base: torch.Tensor | None, params: TensorParams, stats: Any,
              at: At) -> torch.Tensor:
        """The output at ``[at.start, at.stop)``: ``xs`` (n, block), ``base`` (block,) or None; returns (block,)."""


def _key(seed: int, name: str) -> int:
    """A 62-bit key from the seed and the tensor name (stable across processes and versions)."""
    digest = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's multipliers


def _bits(seed: int, name: str, start: int, stop: int, stream: int, device: torch.device | str) -> torch.Tensor:
    """53 random bits (int64) per flat index in ``[start, stop)``: splitmix64 (its finaliser with wrapping
    arithmetic, logical shifts by masking) on the index stepped by the golden gamma and keyed by
    (seed, name, stream); computed in place, one scratch tensor."""
    z = torch.arange(start, stop, dtype=torch.int64, device=device)
    z.mul_(0x9E3779B97F4A7C15 - (1 << 64)).add_(_key(seed, f"{name}\0{stream}"))
    t = torch.empty_like(z)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        z.bitwise_xor_(t.bitwise_and_((1 << (64 - shift)) - 1))
        if mult is not None:
            z.mul_(mult - (1 << 64))
    return z.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)


def uniform(seed: int, name: str, start: int, stop: int, *, stream: int = 0,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform values in [0, 1) (float64) for flat indices ``[start, stop)`` of tensor ``name``.

    Counter-based: value i depends only on (seed, name, stream, i), so any block split and any device
    give the same values. ``stream`` separates independent draws (e.g. one per ingredient).
    """
    return _bits(seed, name, start, stop, stream, device).to(torch.float64).mul_(1.0 / (1 << 53))


def uniform_below(p: float, seed: int, name: str, start: int, stop: int, *, stream: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``uniform(...) < p`` exactly, without the float64 values: u = bits / 2^53, so u < p exactly when
    bits < ceil(p * 2^53) (scaling by a power of two is exact)."""
    return _bits(seed, name, start, stop, stream, device) < math.ceil(float(p) * (1 << 53))
