"""Hub I/O on huggingface_hub's public API: pull ingredients pinned to a commit, push soups in one commit.

- ``specs``: ``hf://owner/name@revision`` parsing, repo-id checks, endpoint / cache / offline
  settings (read at call time: ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``).
- ``pull``: resolve a revision to a commit sha first, then download only weights, config, tokenizer
  and processor files of that commit into the standard HF cache.
- ``push``: ``push`` a finished folder as ONE commit against the branch head read at the start (a
  concurrent push fails clearly, never overwrites); ``ShardUploader`` pre-uploads shards while the
  merge still runs.
- ``precheck``: read hub ingredients' tensor tables from their safetensors headers and check them
  before anything is downloaded (imported on its own: ``from soup.hub.precheck import precheck``).
- ``errors``: transient failures (connection errors, 5xx, 429) are retried with backoff; every other
  failure is one ``HubError`` line naming the repo and revision. Tokens (huggingface_hub's usual
  places: ``HF_TOKEN``, ``hf auth login``) are never printed, logged or written.
"""

from typing import Any

from soup.io.ingredients import HubOptions

__all__ = ["HubOptions", "HUB_PREFIX", "PULL_PATTERNS", "PulledRepo", "PushResult", "RetryPolicy", "ShardUploader",
           "parse_hub_spec", "pull", "push"]


def __getattr__(name: str) -> Any:
    """The names that need huggingface_hub, imported on first use: importing a submodule that does not
    (``soup.hub.publisher`` with no target) never loads the hub client."""
    if name in ("HUB_PREFIX", "parse_hub_spec"):
        from soup.hub import specs

        return getattr(specs, name)
    if name == "RetryPolicy":
        from soup.hub.errors import RetryPolicy

        return RetryPolicy
    if name in ("PULL_PATTERNS", "PulledRepo", "pull"):
        from soup.hub import download

        return getattr(download, name)
    if name in ("PushResult", "ShardUploader", "push"):
        from soup.hub import upload

        return getattr(upload, name)
    raise AttributeError(f"module 'soup.hub' has no attribute {name!r}")
