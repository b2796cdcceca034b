"""Scheduled merging: ``changes`` (what changed since the published soup: ``--if-changed``), ``watch``
(``soup watch``: a tick loop) and ``webhooks`` (hub and MLflow registry events that trigger a tick).

``changes`` sits below ``soup.run``; ``watch`` and ``webhooks`` above it.
"""
