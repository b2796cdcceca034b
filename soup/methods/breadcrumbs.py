"""Model breadcrumbs (mergekit ``breadcrumbs``): drop the outliers and the small entries.

Per task vector over the whole tensor: drop the ``int(gamma * numel)`` largest magnitudes (fewer
when needed to keep the target), keep the next ``int(density * numel)``, drop the rest (two exact
thresholds by radix select; entries equal to a threshold are kept). Then a weighted sum
(``normalize`` and ``rescale`` off by default).
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["Breadcrumbs"]


class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    reference = "https://arxiv.org/abs/2312.06795"
    description = ("Drops each task vector's largest outliers and its smallest entries, then adds "
                   "their weighted sum to the base.")
    sparsification = "magnitude_outliers"
    elect = False
    parameters = task_vector_parameters(normalize=False, rescale=False, gamma=True)
