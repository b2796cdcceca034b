"""A real, CPU-sized model-soup experiment on scikit-learn's 8x8 digits (nothing downloaded).

The recipe of Wortsman et al. (2022), "Model soups", in miniature: one small MLP is pre-trained
from a seed, fine-tuned six ways from that shared start (one of them on shuffled labels), and the
maximum, average and greedy soups are cooked with the real strategies; ``soup demo`` prints their
test accuracy.

- ``data``: the seeded pool / validation / test splits of ``load_digits``.
- ``model``: ``DigitsMLP`` and the folder layout (``load_model``).
- ``train``: pre-training, the six fine-tunes (``INGREDIENTS``), ``build_ingredients(out, seed=)``.
- ``evaluator``: ``accuracy`` and ``DigitsAccuracy`` (``split="val" | "test"``, ``seed=``).
- ``run``: ``run_demo`` and the comparison table (``format_rows``).

Needs the ``demo`` extra (scikit-learn): ``pip install 'soup-merge[demo]'``; importing this package
without it raises an ``ImportError`` that says so.
"""

from soup.demo.evaluator import DigitsAccuracy, accuracy
from soup.demo.model import MODEL_TYPE, DigitsMLP, load_model
from soup.demo.run import format_markdown, format_rows, run_demo
from soup.demo.train import INGREDIENTS, build_ingredients

__all__ = ["DigitsAccuracy", "DigitsMLP", "INGREDIENTS", "MODEL_TYPE", "accuracy", "build_ingredients",
           "format_markdown", "format_rows", "load_model", "run_demo"]
