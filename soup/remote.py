"""Transitional alias: the header-only pre-check now lives in ``soup.hub.precheck``.

Kept only until ``soup/inspect.py`` imports ``from .hub.precheck import header_checkpoint``; then delete.
"""

from .hub.precheck import header_checkpoint, precheck

__all__ = ["header_checkpoint", "precheck"]
