"""The digits data: scikit-learn's 8x8 ``load_digits`` (1797 images, 10 classes, bundled: nothing is
downloaded), split once per seed into a training *pool*, a *validation* split (chooses the soup) and
a *test* split (only reported), plus the pixel-shift augmentation some fine-tunes use.

scikit-learn is the ``demo`` extra (``pip install 'soup-merge[demo]'``), not a dependency of soup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

try:
    from sklearn.datasets import load_digits
except ImportError as e:  # the demo extra, not a runtime dependency of soup
    raise ImportError("the digits demo needs scikit-learn, which is not installed: "
                      "pip install 'soup-merge[demo]'", name="sklearn") from e

__all__ = ["N_TEST", "N_VAL", "Splits", "shift", "split", "splits"]

N_VAL = 350  # validation split: chooses the soup
N_TEST = 450  # test split: only reported


@dataclass(frozen=True)
class Splits:
    pool_x: torch.Tensor  # (n_pool, 64) float32 in [0, 1]
    pool_y: torch.Tensor  # (n_pool,) int64
    val_x: torch.Tensor  # (N_VAL, 64)
    val_y: torch.Tensor  # (N_VAL,)
    test_x: torch.Tensor  # (N_TEST, 64)
    test_y: torch.Tensor  # (N_TEST,)


@lru_cache(maxsize=8)
def splits(seed: int) -> Splits:
    """The seeded pool / validation / test split of ``load_digits`` (computed once per seed)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(digits.target, dtype=torch.int64)  # (1797,)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, test, pool = order[:N_VAL], order[N_VAL:N_VAL + N_TEST], order[N_VAL + N_TEST:]
    return Splits(x[pool], y[pool], x[val], y[val], x[test], y[test])


def split(seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of the ``"val"`` or ``"test"`` split of ``seed``."""
    s = splits(seed)
    if name == "val":
        return s.val_x, s.val_y
    if name == "test":
        return s.test_x, s.test_y
    raise ValueError(f"split must be 'val' or 'test', got {name!r}")


def shift(x: torch.Tensor, g: torch.Generator, *, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in [-max_shift, max_shift], zero-filled."""
    img = x.view(-1, 8, 8)  # (n, 8, 8)
    out = torch.zeros_like(img)
    d = torch.randint(-max_shift, max_shift + 1, (len(img), 2), generator=g)  # (n, 2)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            m = (d[:, 0] == dy) & (d[:, 1] == dx)
            if m.any():
                out[m] = torch.roll(img[m], shifts=(dy, dx), dims=(1, 2))
                if dy > 0:
                    out[m, :dy] = 0
                elif dy < 0:
                    out[m, dy:] = 0
                if dx > 0:
                    out[m, :, :dx] = 0
                elif dx < 0:
                    out[m, :, dx:] = 0
    return out.view(-1, 64)
