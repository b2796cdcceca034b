"""DARE with TIES sign election (mergekit ``dare_ties``).

Each task vector entry is kept with probability ``density`` (``uniform(seed, name, i, stream=model)
< density``), then with ``rescale`` (default on) the kept delta is scaled back to the L1 norm of
the whole unmasked delta (mergekit 0.1.5's rescale; about ``1/density``), then TIES sign election
and a weighted sum (``normalize`` off by default). The L1 norms take one pass in ``statistics``.
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["DareTies"]


class DareTies(TaskVectorMerge):
    name = "dare_ties"
    reference = "https://arxiv.org/abs/2311.03099"
    description = ("Randomly drops task-vector entries, rescales the rest to the original L1 norm, "
                   "then merges with TIES sign election.")
    sparsification = "random"
    elect = True
    random = True
    parameters = task_vector_parameters(normalize=False, rescale=True)
