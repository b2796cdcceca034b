"""Scoring a digits candidate: ``accuracy`` of a state dict, and the ``DigitsAccuracy`` evaluator the
soups use (validation split to choose, test split to report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, Evaluator, mean_score
from soup.demo.data import split as data_split
from soup.demo.model import DigitsMLP

__all__ = ["DigitsAccuracy", "accuracy"]


def accuracy(state_dict: Mapping[str, torch.Tensor], split: str, seed: int = 0) -> float:
    """Accuracy in [0, 1] of ``state_dict`` on the ``"val"`` or ``"test"`` split of ``seed``."""
    model = DigitsMLP()
    model.load_state_dict(dict(state_dict))
    x, y = data_split(seed, split)
    return _accuracy(model.eval(), x, y)


class DigitsAccuracy(Evaluator):
    """Accuracy on the digits validation or test split (higher is better).

    Args (keyword, from the recipe):
        split: ``"val"`` (for choosing a soup) or ``"test"`` (for reporting); default ``"val"``.
        seed: the seed the ingredients were built with, so that the splits agree; default 0.

    Per-example scores (racing): example ``i`` of the split scores 1.0 when classified right, else 0.0;
    the accuracy is their mean.
    """

    name = "digits-accuracy"
    direction = "maximize"
    example_range = (0.0, 1.0)
    score_is_mean = True

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.split = str(args.get("split", "val"))
        self.seed = int(args.get("seed", 0))
        if self.split not in ("val", "test"):
            raise EvaluatorError(f"evaluator {self.label}: split must be 'val' or 'test', "
                                 f"got {self.split!r}")
        self._x, self._y = data_split(self.seed, self.split)  # computed once per instance
        self._model = DigitsMLP().eval()  # resident, reloaded per candidate

    def score(self, candidate: Candidate) -> float:
        return mean_score(self.score_examples(candidate, range(len(self._y))))

    def examples(self) -> int:
        return len(self._y)

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> list[float]:
        self._model.load_state_dict(candidate.state_dict("cpu"))
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return _correct(self._model, self._x[idx], self._y[idx])


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """1.0 per example classified right, 0.0 per example classified wrong."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().tolist()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return mean_score(_correct(model, x, y))
