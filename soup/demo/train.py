"""The ingredients: one pre-training from the seed, then six fine-tunes from that shared start.

The recipe of Wortsman et al. (2022), "Model soups", in miniature: each fine-tune sees a different
dataset built from the pool (class-imbalanced subsets, shift / noise augmentation, other learning
rates and weight decay), so they land in different but linearly connected optima and averaging
their weights works. One *bad* ingredient (``ft-bad``) is fine-tuned on shuffled labels with a high
learning rate: it drags a uniform average down, and a greedy soup leaves it out.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from soup.demo.data import shift, splits
from soup.demo.model import MODEL_TYPE, DigitsMLP

__all__ = ["INGREDIENTS", "FineTune", "build_ingredients"]

N_PRETRAIN = 700  # the generic pre-training subset, drawn from the pool
PRETRAIN_EPOCHS = 20  # AdamW epochs over it
PRETRAIN_LR = 1e-3  # AdamW learning rate


@dataclass(frozen=True)
class FineTune:
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

INGREDIENTS: tuple[FineTune, ...] = (  # fixed order; the bad one sits in the middle
    FineTune("ft-shift", lr=1e-3, epochs=20, shift=1),
    FineTune("ft-noise", lr=1e-3, epochs=20, noise=0.15),
    FineTune("ft-low", lr=2e-3, epochs=20, keep=_LOW),
    FineTune("ft-bad", lr=3e-2, epochs=30, shuffle_labels=True),
    FineTune("ft-high", lr=2e-3, epochs=20, keep=_HIGH),
    FineTune("ft-wd", lr=5e-4, epochs=30, weight_decay=0.1),
)


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
           epochs: int, weight_decay: float = 0.0, shift_px: int = 0, noise: float = 0.0,
           batch_size: int = 32) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        xe = shift(x, g, max_shift=shift_px) if shift_px else x  # (n, 64)
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
    s = splits(seed)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear initialisation
    model = DigitsMLP()
    idx = torch.randperm(len(s.pool_y), generator=g)[:N_PRETRAIN]
    model.norm.fit(s.pool_x[idx])
    _train(model, s.pool_x[idx], s.pool_y[idx], g, lr=PRETRAIN_LR, epochs=PRETRAIN_EPOCHS)
    return model


def _fine_tune(base: DigitsMLP, recipe: FineTune, seed: int, index: int) -> DigitsMLP:
    s = splits(seed)
    g = torch.Generator().manual_seed(seed * 1000 + index + 1)
    model = DigitsMLP(base.sizes)
    model.load_state_dict(base.state_dict())
    keep = torch.tensor(recipe.keep)[s.pool_y]  # (n_pool,) per-sample keep probability
    m = torch.rand(len(s.pool_y), generator=g) < keep
    x, y = s.pool_x[m], s.pool_y[m]
    if recipe.shuffle_labels:
        y = y[torch.randperm(len(y), generator=g)]
    _train(model, x, y, g, lr=recipe.lr, epochs=recipe.epochs, weight_decay=recipe.weight_decay,
           shift_px=recipe.shift, noise=recipe.noise)
    return model


def _write(folder: Path, model: DigitsMLP, *, seed: int, recipe: FineTune) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    config = {"model_type": MODEL_TYPE, "sizes": list(model.sizes), "seed": seed,
              "fine_tune": {k: v for k, v in vars(recipe).items() if k != "name"}, "name": recipe.name}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
