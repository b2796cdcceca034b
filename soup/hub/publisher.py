"""Publishing a soup while it is cooked: shards are pre-uploaded as the writer finishes them, then
one commit (shards, index, config/tokenizer files, soup.json, model card, plot) lands on the hub.

The local output is complete and in place before the commit is attempted, so a failed push loses
nothing: ``soup push OUT owner/name`` retries it later.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soup.errors import HubError

__all__ = ["Publisher", "PUSH_OPTIONS"]

PUSH_OPTIONS = ("repo", "revision", "private", "create_pr", "commit_message")


class Publisher:
    """Wraps a ShardUploader for one merge; a Publisher with no target does nothing.

    Args:
        push_to: ``{"repo": "owner/name", "revision", "private", "create_pr", "commit_message"}`` or None;
            ``soup.schedule.watch`` adds ``parent_commit`` and ``previous`` (see ``ShardUploader``).
        endpoint: hub URL (default ``HF_ENDPOINT`` / huggingface.co).
    """

    def __init__(self, push_to: Mapping[str, Any] | None, *, endpoint: str | None = None,
                 token: str | bool | None = None) -> None:
        self.target = dict(push_to) if push_to else None
        self._up = None
        if self.target is not None:
            from soup.hub.upload import ShardUploader

            opts = {k: v for k, v in self.target.items() if k != "repo" and v is not None}
            self._up = ShardUploader(self.target["repo"], endpoint=endpoint, token=token, **opts)

    def start(self) -> None:
        """Check access and read the branch head before anything is merged (fails fast)."""
        if self._up is not None:
            self._up.start()

    @property
    def on_shard(self):
        return self._up.shard_done if self._up is not None else None

    def finish(self, folder: Path) -> Any:
        """Commit the finished folder; a failure names the retry command (the folder stays)."""
        if self._up is None:
            return None
        try:
            return self._up.finish(Path(folder))
        except HubError as e:
            if self.target.get("parent_commit"):  # --if-changed: another soup landed first; the next run looks again
                raise HubError(f"{e} (the soup is complete in {folder})") from None
            raise HubError(f"{e} (the soup is complete in {folder}; retry with: soup push {folder} "
                           f"{self.target['repo']})") from None

    def close(self) -> None:
        if self._up is not None:
            self._up.close()
