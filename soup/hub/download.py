"""Pull an ingredient from the hub, pinned to one commit.

The revision (branch, tag or sha) is resolved to a commit sha *first*; then only the weights and
the files a soup copies beside them (config, tokenizer, processor, chat templates, remote code and
files the config names: ``soup.io.modelfiles``) of that commit are downloaded, into the standard HF
cache (shared with transformers, reused, and usable offline once cached). Nothing downloaded is
ever imported or run. With ``HF_HUB_OFFLINE=1``
nothing is requested: a pinned sha, or a branch pulled before, is served from the cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import CachedRepoTreeNotFoundError
from huggingface_hub.file_download import repo_folder_name

from soup.errors import HubError
from soup.io.modelfiles import PATTERNS as SUPPORT_PATTERNS, support_files
from soup.hub.errors import RetryPolicy, hub_error, retrying
from soup.hub.specs import SHA, check_repo_id, hub_cache_dir, hub_endpoint, is_offline

__all__ = ["PULL_PATTERNS", "PulledRepo", "pull"]

# what an ingredient needs: weights (+ index), and config, tokenizer, processor files, chat templates,
# remote code (soup.io.modelfiles.PATTERNS; files the configs name are fetched in a second step)
PULL_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    *SUPPORT_PATTERNS,
]
WEIGHTS = re.compile(r"(\.safetensors|(^|/)pytorch_model[^/]*\.bin)$")


@dataclass(frozen=True)
class PulledRepo:
    """An ingredient downloaded from the hub, pinned to one commit."""

    repo_id: str
    revision: str | None  # as asked (branch, tag, sha or None for the default branch)
    commit: str  # the 40-hex commit sha it resolved to
    path: Path  # the snapshot folder in the HF cache
    file_oids: dict[str, str] = field(default_factory=dict)  # file -> git blob oid (sha256 for LFS files)


def pull(repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
         token: str | bool | None = None, cache_dir: str | Path | None = None,
         retry: RetryPolicy | None = None) -> PulledRepo:
    """Download an ingredient's weights, config and tokenizer files at one pinned commit.

    The revision is resolved to a commit sha before anything is downloaded, so a branch that moves
    during the download cannot mix two commits. With ``HF_HUB_OFFLINE=1`` nothing is requested:
    a pinned sha (or a branch seen before) is served from the cache.

    Args:
        repo_id: ``"owner/name"``.
        revision: branch, tag or commit sha; None for the default branch.
        endpoint: hub URL; defaults to ``HF_ENDPOINT``, then https://huggingface.co.
        token: a token, or None for huggingface_hub's usual places (``False``: none).
        cache_dir: the HF hub cache; defaults to ``HF_HUB_CACHE`` / ``HF_HOME/hub``.
        retry: backoff for transient failures (default: 4 tries from 1 s).

    Returns:
        A ``PulledRepo`` with the commit sha, the snapshot folder and the oids of its files.

    Raises:
        HubError: repo or revision not found, no access, no weight files, offline and not cached,
            or the hub kept failing.
    """
    where = f"{repo_id}@{revision}" if revision else repo_id
    check_repo_id(repo_id)
    endpoint, cache = hub_endpoint(endpoint), hub_cache_dir(cache_dir)
    offline = is_offline()
    commit = revision if revision and SHA.match(revision) else None
    try:
        if not offline:
            # resolved here, strictly (retried, never a stale cached answer while the hub is down);
            # HfApi.resolve_revision would fall back to the cached ref on a 5xx or a timeout
            api = HfApi(endpoint=endpoint, token=token)
            commit = retrying(lambda: api.model_info(repo_id, revision=revision).sha, retry)
        def download(patterns: list[str]) -> Path:
            return Path(retrying(lambda: snapshot_download(
                repo_id, revision=commit or revision or constants.DEFAULT_REVISION, cache_dir=cache,
                endpoint=endpoint, token=token, allow_patterns=patterns, local_files_only=offline), retry))

        path = download(PULL_PATTERNS)
        named = support_files(path).missing  # files the configs name (auto_map targets...), if the repo has them
        if named:
            download([_literal(name) for name in named])
    except Exception as err:
        raise hub_error(err, where, token=token, offline=offline) from None
    commit = commit or path.name
    if not offline:
        _remember_ref(cache, repo_id, revision or constants.DEFAULT_REVISION, commit)
    oids = _file_oids(repo_id, commit, path, cache)
    if not any(WEIGHTS.search(name) for name in oids):
        raise HubError(f"hub: {repo_id}@{commit[:12]} has no weight files (*.safetensors or pytorch_model*.bin)")
    return PulledRepo(repo_id=repo_id, revision=revision, commit=commit, path=path, file_oids=oids)


def _literal(name: str) -> str:
    """An allow pattern (fnmatch) matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _remember_ref(cache: str, repo_id: str, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the cache, so an offline pull of the same branch finds the
    commit seen last.

    Why by hand: huggingface_hub writes ``refs/<revision>`` only when it resolves a name itself
    (``snapshot_download(revision="main")``, ``HfApi.resolve_revision``), and both would silently
    reuse a stale cached commit when the hub is down. We resolve strictly and download by sha, so we
    write the ref ourselves, in the cache layout huggingface_hub documents
    (``<cache>/models--owner--name/refs/<revision>`` holding the sha), atomically.
    """
    if revision == commit or ".." in revision.split("/") or revision.startswith("/"):
        return
    ref = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache: offline pulls then need a pinned sha


def _file_oids(repo_id: str, commit: str, path: Path, cache: str) -> dict[str, str]:
    """``{file: oid}`` for the snapshot's files: sha256 for LFS files, the git blob oid otherwise.

    Cache snapshot files link to ``blobs/<etag>``, and the etag is exactly that oid. Without links
    (symlinks disabled), the cached tree listing gives the git blob oid of each file.
    """
    local = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    oids = {}
    for name in local:
        target = Path(os.path.realpath(path / name))
        if target.parent.name == "blobs":
            oids[name] = target.name
    if len(oids) < len(local):
        try:
            tree = {f.path: f.blob_id for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache)}
        except CachedRepoTreeNotFoundError:
            tree = {}
        oids.update({name: tree[name] for name in local if name not in oids and name in tree})
    return oids
