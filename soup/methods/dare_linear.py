"""DARE with a plain weighted sum (mergekit ``dare_linear``).

As ``dare_ties`` without the sign election: random drop with keep probability ``density``, L1
rescale (default on), weighted sum of the task vectors (``normalize`` off by default).
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["DareLinear"]


class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    reference = "https://arxiv.org/abs/2311.03099"
    description = ("Randomly drops task-vector entries, rescales the rest to the original L1 norm, "
                   "and adds their weighted sum to the base.")
    sparsification = "random"
    elect = False
    random = True
    parameters = task_vector_parameters(normalize=False, rescale=True)
