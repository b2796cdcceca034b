"""A real, CPU-sized model-soup experiment on scikit-learn's 8x8 digits (nothing downloaded).

The recipe of Wortsman et al. (2022), "Model soups", in miniature:

1. ``load_digits`` (1797 images, 10 classes) is split once per seed into a training *pool*, a
   *validation* split (used to choose the soup) and a *test* split (only reported).
2. One small MLP is *pre-trained* from the seed on a generic subset of the pool.
3. From that shared start it is *fine-tuned* several times on different datasets built from the pool
   (class-imbalanced subsets, shift / noise augmentation, other learning rates and weight decay), so
   the fine-tunes land in different but linearly connected optima: averaging their weights works.
4. One *bad* ingredient is fine-tuned on shuffled labels with a high learning rate; it drags a
   uniform average down, and a greedy soup (ordered by validation accuracy) leaves it out.

``build_ingredients(out)`` writes each fine-tune as an HF-layout folder (``model.safetensors`` +
``config.json``); ``DigitsAccuracy(split="val" | "test", seed=...)`` scores a candidate.

Needs scikit-learn (a dev extra), imported on first use.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EvaluatorError
from .evaluate import Candidate, Evaluator

__all__ = [
    "DigitsAccuracy",
    "DigitsMLP",
    "INGREDIENTS",
    "MODEL_TYPE",
    "accuracy",
    "build_ingredients",
    "load_model",
]

MODEL_TYPE = "soup-digits-mlp"
SIZES = (64, 128, 64, 10)  # input pixels -> hidden -> hidden -> classes
N_VAL = 350  # validation split: chooses the soup
N_TEST = 450  # test split: only reported
N_PRETRAIN = 700  # the generic pre-training subset, drawn from the pool
PRETRAIN_EPOCHS = 20  # AdamW epochs over it
PRETRAIN_LR = 1e-3  # AdamW learning rate


class DigitsMLP(nn.Module):
    """``64 -> 128 -> 64 -> 10`` with GELU, behind a frozen input standardisation.

    The standardisation buffers (``norm.mean``, ``norm.std``, float32, and ``norm.count``, int64: the
    number of images the statistics came from) are set at pre-training and never change afterwards,
    so every ingredient carries the same non-float tensor.
    """

    def __init__(self, sizes: tuple[int, ...] = SIZES) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.norm = _Standardize(sizes[0])
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 64) -> (batch, 10) logits
        return self.net(self.norm(x))


class _Standardize(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # (dim,)
        self.register_buffer("std", torch.ones(dim))  # (dim,)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # images seen, int64 scalar

    def fit(self, x: torch.Tensor) -> None:  # x: (n, dim)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0) + 0.1)  # constant border pixels: keep the scale bounded
        self.count.fill_(x.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Splits:
    pool_x: torch.Tensor  # (n_pool, 64) float32 in [0, 1]
    pool_y: torch.Tensor  # (n_pool,) int64
    val_x: torch.Tensor  # (N_VAL, 64)
    val_y: torch.Tensor  # (N_VAL,)
    test_x: torch.Tensor  # (N_TEST, 64)
    test_y: torch.Tensor  # (N_TEST,)


@lru_cache(maxsize=8)
def _splits(seed: int) -> _Splits:
    """The seeded pool / validation / test split of ``load_digits`` (computed once per seed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dev extra, not a runtime dependency
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(digits.target, dtype=torch.int64)  # (1797,)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, test, pool = order[:N_VAL], order[N_VAL:N_VAL + N_TEST], order[N_VAL + N_TEST:]
    return _Splits(x[pool], y[pool], x[val], y[val], x[test], y[test])


def _split(seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = _splits(seed)
    if split == "val":
        return s.val_x, s.val_y
    if split == "test":
        return s.test_x, s.test_y
    raise ValueError(f"split must be 'val' or 'test', got {split!r}")


def _shift(x: torch.Tensor, g: torch.Generator, *, max_shift: int = 1) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- ingredients


@dataclass(frozen=True)
class _Recipe:
    """How one fine-tune is made from the pool."""

    name: str
    lr: float = 1e-3  # AdamW learning rate
    epochs: int = 20
    weight_decay: float = 0.0
    keep: tuple[float, ...] = (1.0,) * 10  # per-class fraction of the pool kept (class imbalance)
    shift: int = 0  # random pixel shifts up to this many pixels (fresh each epoch)
    noise: float = 0.0  # std of Gaussian pixel noise (fresh each epoch)
    shuffle_labels: bool = False  # the bad ingredient: labels permuted at random


_LOW = (1.0,) * 5 + (0.25,) * 5  # digits 0-4 favoured
_HIGH = (0.25,) * 5 + (1.0,) * 5  # digits 5-9 favoured

INGREDIENTS: tuple[_Recipe, ...] = (  # fixed order; the bad one sits in the middle
    _Recipe("ft-shift", lr=1e-3, epochs=20, shift=1),
    _Recipe("ft-noise", lr=1e-3, epochs=20, noise=0.15),
    _Recipe("ft-low", lr=2e-3, epochs=20, keep=_LOW),
    _Recipe("ft-bad", lr=3e-2, epochs=30, shuffle_labels=True),
    _Recipe("ft-high", lr=2e-3, epochs=20, keep=_HIGH),
    _Recipe("ft-wd", lr=5e-4, epochs=30, weight_decay=0.1),
)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Single-threaded CPU math for the duration (bit-for-bit reproducible, and faster at this size)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator, *, lr: float,
           epochs: int, weight_decay: float = 0.0, shift: int = 0, noise: float = 0.0,
           batch_size: int = 32) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        xe = _shift(x, g, max_shift=shift) if shift else x  # (n, 64)
        if noise:
            xe = (xe + noise * torch.randn(xe.shape, generator=g)).clamp(0, 1)
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            b = perm[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xe[b]), y[b]).backward()
            opt.step()
    model.eval()


def _pretrain(seed: int) -> DigitsMLP:
    s = _splits(seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear initialisation
    model = DigitsMLP()
    idx = torch.randperm(len(s.pool_y), generator=g)[:N_PRETRAIN]
    model.norm.fit(s.pool_x[idx])
    _train(model, s.pool_x[idx], s.pool_y[idx], g, lr=PRETRAIN_LR, epochs=PRETRAIN_EPOCHS)
    return model


def _fine_tune(base: DigitsMLP, recipe: _Recipe, seed: int, index: int) -> DigitsMLP:
    s = _splits(seed)
    g = torch.Generator().manual_seed(seed * 1000 + index + 1)
    model = DigitsMLP(base.sizes)
    model.load_state_dict(base.state_dict())
    keep = torch.tensor(recipe.keep)[s.pool_y]  # (n_pool,) per-sample keep probability
    m = torch.rand(len(s.pool_y), generator=g) < keep
    x, y = s.pool_x[m], s.pool_y[m]
    if recipe.shuffle_labels:
        y = y[torch.randperm(len(y), generator=g)]
    _train(model, x, y, g, lr=recipe.lr, epochs=recipe.epochs, weight_decay=recipe.weight_decay,
           shift=recipe.shift, noise=recipe.noise)
    return model


def _write(folder: Path, model: DigitsMLP, *, seed: int, recipe: _Recipe) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    config = {"model_type": MODEL_TYPE, "sizes": list(model.sizes), "seed": seed,
              "fine_tune": {k: v for k, v in vars(recipe).items() if k != "name"}, "name": recipe.name}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_ingredients(out: str | Path, *, seed: int = 0) -> list[Path]:
    """Pre-train once, fine-tune every recipe in ``INGREDIENTS``, write one folder per fine-tune.

    Args:
        out: the parent folder; ingredient ``name`` goes to ``out/<name>/`` (``model.safetensors``
            with float32 weights and one int64 buffer, plus ``config.json``).
        seed: fixes the data split, the initialisation and every shuffle: the same seed gives
            byte-identical files.

    Returns:
        The ingredient folders, in ``INGREDIENTS`` order (the bad one, ``ft-bad``, in the middle).
    """
    out = Path(out)
    paths = []
    with _one_thread(), torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        base = _pretrain(seed)
        for i, recipe in enumerate(INGREDIENTS):
            model = _fine_tune(base, recipe, seed, i)
            _write(out / recipe.name, model, seed=seed, recipe=recipe)
            paths.append(out / recipe.name)
    return paths


# ----------------------------------------------------------------------------- evaluation


def load_model(folder: str | Path) -> DigitsMLP:
    """The model stored in an ingredient (or soup) folder written in this layout."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = DigitsMLP(tuple(config.get("sizes", SIZES)))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def accuracy(state_dict: Mapping[str, torch.Tensor], split: str, seed: int = 0) -> float:
    """Accuracy in [0, 1] of ``state_dict`` on the ``"val"`` or ``"test"`` split of ``seed``."""
    model = DigitsMLP()
    model.load_state_dict(dict(state_dict))
    x, y = _split(seed, split)
    return _accuracy(model.eval(), x, y)


class DigitsAccuracy(Evaluator):
    """Accuracy on the digits validation or test split (higher is better).

    Args (keyword, from the recipe):
        split: ``"val"`` (for choosing a soup) or ``"test"`` (for reporting); default ``"val"``.
        seed: the seed the ingredients were built with, so that the splits agree; default 0.
    """

    name = "digits-accuracy"
    direction = "maximize"

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.split = str(args.get("split", "val"))
        self.seed = int(args.get("seed", 0))
        if self.split not in ("val", "test"):
            raise EvaluatorError(f"evaluator {self.label}: split must be 'val' or 'test', "
                                 f"got {self.split!r}")
        self._x, self._y = _split(self.seed, self.split)  # computed once per instance
        self._model = DigitsMLP().eval()  # resident, reloaded per candidate

    def score(self, candidate: Candidate) -> float:
        self._model.load_state_dict(candidate.state_dict("cpu"))
        return _accuracy(self._model, self._x, self._y)
