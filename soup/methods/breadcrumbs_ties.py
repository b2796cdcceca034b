"""Model breadcrumbs with TIES sign election (mergekit ``breadcrumbs_ties``).

The breadcrumbs mask (drop the ``gamma`` top fraction, keep the next ``density`` fraction of
magnitudes per task vector), then TIES sign election and a weighted sum (``normalize`` off by
default, as in mergekit).
"""

from __future__ import annotations

from soup.methods.sparsify import TaskVectorMerge, task_vector_parameters

__all__ = ["BreadcrumbsTies"]


class BreadcrumbsTies(TaskVectorMerge):
    name = "breadcrumbs_ties"
    reference = "https://arxiv.org/abs/2312.06795"
    description = ("Drops each task vector's largest outliers and smallest entries, then merges "
                   "with TIES sign election.")
    sparsification = "magnitude_outliers"
    elect = True
    parameters = task_vector_parameters(normalize=False, rescale=False, gamma=True)
