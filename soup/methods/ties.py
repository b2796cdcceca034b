"""TIES merging (mergekit ``ties``): trim, elect sign, disjoint merge.

Each task vector keeps its ``k = max(1, int(density * numel))`` largest magnitudes over the whole
tensor (a threshold found by exact radix select in ``statistics``; every entry equal to the
threshold is kept); the sign of each element is elected by the sum of the weighted deltas; the
weighted deltas that agree are summed and, with ``normalize`` (default on), divided by the sum of
their weights. Two passes over the tensor for float32 work values, four for float64, one more with
``rescale``.
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["Ties"]


class Ties(TaskVectorMerge):
    name = "ties"
    reference = "https://arxiv.org/abs/2306.01708"
    description = ("Keeps each task vector's largest-magnitude entries, elects a sign per weight and "
                   "averages the entries that agree with it.")
    sparsification = "magnitude"
    elect = True
    parameters = task_vector_parameters(normalize=True, rescale=False)
