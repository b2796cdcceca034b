"""DELLA without sign election (mergekit ``della_linear``).

DELLA's rank-based random drop and L1 rescale (default on), then a plain weighted sum
(``normalize`` off by default). ``whole_tensor = True`` as for ``della``.
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["DellaLinear"]


class DellaLinear(TaskVectorMerge):
    name = "della_linear"
    reference = "https://arxiv.org/abs/2406.11617"
    description = ("Drops task-vector entries at random, the smaller ones more often, rescales, and "
                   "adds their weighted sum to the base.")
    sparsification = "della_magprune"
    elect = False
    random = True
    whole_tensor = True
    parameters = task_vector_parameters(normalize=False, rescale=True, epsilon=True)
