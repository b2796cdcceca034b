"""What a hub reference means: ``hf://`` specs, repo ids, and where the hub and its cache are.

``hf://owner/name@revision`` names an ingredient or a push target. The endpoint, the cache folder
and offline mode are read when a call is made (not at import), so a test or a long-lived process
can change ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE`` or ``HF_HUB_OFFLINE`` between calls.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants

from soup.errors import HubError

__all__ = ["HUB_PREFIX", "check_repo_id", "hub_cache_dir", "hub_endpoint", "is_offline", "parse_hub_spec"]

HUB_PREFIX = "hf://"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MODEL_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")  # gpt2: a canonical model
SHA = re.compile(r"^[0-9a-f]{40}$")  # a full commit sha: already pinned


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``"hf://owner/name@revision"`` -> ``("owner/name", "revision")``; None for a non-hub spec. A model
    without an owner (``hf://gpt2``: the hub's canonical models) is ``("gpt2", revision)``.

    Args:
        spec: an ingredient or output spec; only ``hf://`` specs are hub specs.

    Returns:
        ``(repo_id, revision)`` with ``revision`` None when omitted, or None when ``spec`` does not
        start with ``hf://``.

    Raises:
        HubError: ``spec`` starts with ``hf://`` but is not ``hf://[owner/]name[@revision]``.
    """
    if not isinstance(spec, str) or not spec.startswith(HUB_PREFIX):
        return None
    repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
    if not MODEL_ID.match(repo_id) or (at and not revision.strip()):
        raise HubError(f"hub: invalid hub spec {spec!r}: expected hf://owner/name, hf://name (a canonical model) "
                       "or either @revision")
    return repo_id, (revision if at else None)


def check_repo_id(repo_id: str) -> None:
    """Raise ``HubError`` unless ``repo_id`` is ``owner/name``."""
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise HubError(f"hub: invalid repo id {repo_id!r}: expected owner/name")


def hub_endpoint(endpoint: str | None = None) -> str:
    """explicit > ``HF_ENDPOINT`` (read now) > huggingface_hub's default, without a trailing slash."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir(cache_dir: str | Path | None = None) -> str:
    """explicit > ``HF_HUB_CACHE`` > ``HF_HOME/hub`` (read now, not at import) > huggingface_hub's."""
    if cache_dir is not None:
        return str(cache_dir)
    home = os.environ.get("HF_HOME")
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as the environment says now."""
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
