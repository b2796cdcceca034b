"""Task arithmetic (mergekit ``task_arithmetic``): add the weighted sum of the task vectors to the base.

``out = base + lambda * sum_i w_i (x_i - base)``, divided by ``sum_i w_i`` when ``normalize``.
Elementwise. ``density`` and ``rescale`` are accepted as in mergekit, where this method ignores them.
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["TaskArithmetic"]


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"
    reference = "https://arxiv.org/abs/2212.04089"
    description = "Adds the weighted sum of the fine-tunes' task vectors (fine-tune minus base) to the base model."
    sparsification = None
    elect = False
    parameters = task_vector_parameters(normalize=False, rescale=False)
