"""Merge methods: how the tensors of the ingredients (and a base model) combine — one file each.

``base.MergeMethod`` is the contract (a name, a reference, parameters with defaults, whether a base
model is needed, and the per-tensor math block by block, with first passes for whole-tensor
statistics). ``registry`` finds methods by name (entry-point group ``soup.methods``), ``module:Class``
or ``file.py:Class``.

Imports: torch and ``soup.errors`` only; the engine calls methods, never the other way round.
"""
