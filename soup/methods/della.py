"""DELLA (mergekit ``della``): MagPrune random drop by magnitude rank, then TIES election.

Per task vector and per row (axis 1 of the tensor; a 1-D tensor is one row), entries are ranked by
magnitude and kept with probability rising linearly from ``density - epsilon`` (smallest) to
``density + epsilon`` (largest); with ``rescale`` (default on) the kept delta is scaled back to the
L1 norm of the unmasked one; then TIES sign election, normalised by the weights that agree
(``normalize`` default on). Ranks need whole rows, so ``whole_tensor = True``: memory is
(N + a few) x the tensor, one tensor at a time.
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["Della"]


class Della(TaskVectorMerge):
    name = "della"
    reference = "https://arxiv.org/abs/2406.11617"
    description = ("Drops task-vector entries at random, the smaller ones more often, rescales, "
                   "then merges with TIES sign election.")
    sparsification = "della_magprune"
    elect = True
    random = True
    whole_tensor = True
    parameters = task_vector_parameters(normalize=True, rescale=True, epsilon=True)
