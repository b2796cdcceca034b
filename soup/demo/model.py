"""The digits classifier: a small MLP behind a frozen input standardisation, and its folder layout.

An ingredient (or soup) folder holds ``model.safetensors`` (float32 weights and one int64 buffer)
and ``config.json`` (``model_type``, ``sizes``, and how the fine-tune was made).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["MODEL_TYPE", "SIZES", "DigitsMLP", "load_model"]

MODEL_TYPE = "soup-digits-mlp"
SIZES = (64, 128, 64, 10)  # input pixels -> hidden -> hidden -> classes


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


def load_model(folder: str | Path) -> DigitsMLP:
    """The model stored in an ingredient (or soup) folder written in this layout."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = DigitsMLP(tuple(config.get("sizes", SIZES)))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
