"""Choosing: strategies decide which ingredients and weights, scored by evaluators through the scorer.

- ``evaluate``: the ``Evaluator`` contract and loader; ``factory``: the evaluators of a run;
  ``plugins``: one loader for every plug-in kind;
- ``scorer``: candidates built by the engine, scored with a cache (``cache``), in process, over
  devices, or through a queue the caller injects (``soup.workers``);
- ``strategies`` (maximum, average, greedy) and ``search`` (optuna).

Imports: ``soup.merging`` and below; never ``soup.workers``, ``soup.pipeline`` or above.
"""
