"""Hub I/O through huggingface_hub: pull ingredients pinned to a commit, push soups in one commit.

- ``pull`` resolves a revision (branch, tag or sha) to a commit sha *first*, then downloads only the
  weight, config, tokenizer and processor files of that commit into the standard HF cache (shared
  with transformers, reused, and usable offline once cached).
- ``push`` uploads a finished output folder as ONE commit whose parent is the branch head read at
  the start: if someone else pushed in between, the hub refuses (412) and the user gets a clear
  error instead of a silent overwrite. Remote weight files (shards, indexes) that the folder does
  not have are deleted by the same commit; other remote files are kept.
- ``ShardUploader`` pushes while the merge is still running: each finished shard is pre-uploaded
  (LFS) in a background thread, and ``finish`` commits them with the remaining files.
- Transient failures (connection errors, 5xx, 429) are retried with exponential backoff; every
  other hub failure becomes one ``HubError`` line that names the repo and revision. Tokens are never
  printed, logged or written; a push only ever reads the local folder.

The endpoint defaults to ``HF_ENDPOINT`` (read at call time), the token to huggingface_hub's usual
places (``HF_TOKEN``, ``hf auth login``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    constants,
    get_cached_repo_tree,
    snapshot_download,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from .errors import HubError

__all__ = ["HUB_PREFIX", "PULL_PATTERNS", "PulledRepo", "PushResult", "RetryPolicy", "ShardUploader",
           "parse_hub_spec", "pull", "push"]

HUB_PREFIX = "hf://"
# what an ingredient needs: weights (+ index), config, tokenizer, processor files, chat templates
PULL_PATTERNS = [
    "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
]
WEIGHTS = re.compile(r"(\.safetensors|(^|/)pytorch_model[^/]*\.bin)$")
# weights and their indexes: a push deletes the remote ones its folder lacks (no stale shards left)
STALE = re.compile(r"(\.safetensors|\.safetensors\.index\.json|(^|/)pytorch_model[^/]*\.bin(\.index\.json)?)$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA = re.compile(r"^[0-9a-f]{40}$")
SKIP_DIRS = {".git", ".cache"}  # huggingface_hub refuses to commit under these
TOKEN_HELP = "check your token (HF_TOKEN or `hf auth login`)"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient hub failures (connection errors, 5xx, 429) are retried."""

    tries: int = 4  # attempts in all, the first included
    base_delay: float = 1.0  # seconds before the first retry; doubles after each
    max_delay: float = 8.0  # cap on one delay


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class PulledRepo:
    """An ingredient downloaded from the hub, pinned to one commit."""

    repo_id: str
    revision: str | None  # as asked (branch, tag, sha or None for the default branch)
    commit: str  # the 40-hex commit sha it resolved to
    path: Path  # the snapshot folder in the HF cache
    file_oids: dict[str, str] = field(default_factory=dict)  # file -> git blob oid (sha256 for LFS files)


@dataclass(frozen=True)
class PushResult:
    """Where a push landed."""

    repo_url: str
    commit: str  # the new commit's sha
    commit_url: str
    pr_url: str | None = None  # set when the push opened a pull request


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``"hf://owner/name@revision"`` -> ``("owner/name", "revision")``; None for a non-hub spec.

    Args:
        spec: an ingredient or output spec; only ``hf://`` specs are hub specs.

    Returns:
        ``(repo_id, revision)`` with ``revision`` None when omitted, or None when ``spec`` does not
        start with ``hf://``.

    Raises:
        HubError: ``spec`` starts with ``hf://`` but is not ``hf://owner/name[@revision]``.
    """
    if not isinstance(spec, str) or not spec.startswith(HUB_PREFIX):
        return None
    repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
    if not REPO_ID.match(repo_id) or (at and not revision.strip()):
        raise HubError(f"hub: invalid hub spec {spec!r}: expected hf://owner/name or hf://owner/name@revision")
    return repo_id, (revision if at else None)


# ---- pull ------------------------------------------------------------------------------------------
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
    _check_repo_id(repo_id)
    endpoint, cache = _endpoint(endpoint), _cache_dir(cache_dir)
    offline = _offline()
    commit = revision if revision and SHA.match(revision) else None
    try:
        if not offline:
            api = HfApi(endpoint=endpoint, token=token)
            info = _retrying(lambda: api.model_info(repo_id, revision=revision), retry)
            commit = info.sha
        path = Path(_retrying(lambda: snapshot_download(
            repo_id, revision=commit or revision or constants.DEFAULT_REVISION, cache_dir=cache,
            endpoint=endpoint, token=token, allow_patterns=PULL_PATTERNS, local_files_only=offline), retry))
    except Exception as err:
        raise _hub_error(err, where, token=token, offline=offline) from None
    commit = commit or path.name
    if not offline:
        _remember_ref(cache, repo_id, revision or constants.DEFAULT_REVISION, commit)
    oids = _file_oids(repo_id, commit, path, cache)
    if not any(WEIGHTS.search(name) for name in oids):
        raise HubError(f"hub: {repo_id}@{commit[:12]} has no weight files (*.safetensors or pytorch_model*.bin)")
    return PulledRepo(repo_id=repo_id, revision=revision, commit=commit, path=path, file_oids=oids)


def _remember_ref(cache: str, repo_id: str, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the cache (``refs/<revision>``), as huggingface_hub does when it
    downloads by name, so an offline pull of the same branch finds the commit seen last."""
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


# ---- push ------------------------------------------------------------------------------------------
def push(folder: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
         create_pr: bool = False, commit_message: str | None = None, endpoint: str | None = None,
         token: str | bool | None = None, retry: RetryPolicy | None = None) -> PushResult:
    """Upload every file of a finished output folder to a hub repo, as one commit.

    The repo is created if needed (and the branch, from the default branch); the commit's parent is
    the branch head read at the start, so a concurrent push makes this one fail rather than
    overwrite it. Remote weight files and indexes the folder lacks are deleted by the same commit.
    The folder is only read.

    Args:
        folder: the soup's output folder.
        repo_id: ``"owner/name"``.
        revision: target branch (default ``main``).
        private: create the repo private (an existing repo keeps its visibility).
        create_pr: open a pull request against the branch instead of committing to it.
        commit_message: defaults to a summary taken from ``soup.json``.
        endpoint: hub URL; defaults to ``HF_ENDPOINT``, then https://huggingface.co.
        token: a token, or None for huggingface_hub's usual places.
        retry: backoff for transient failures.

    Returns:
        A ``PushResult`` (repo URL, commit sha and URL, pull-request URL if any).

    Raises:
        HubError: empty or missing folder, no access, the branch moved since the start, or the
            hub kept failing.
    """
    folder = Path(folder)
    files = _folder_files(folder)
    up = ShardUploader(repo_id, revision=revision, private=private, create_pr=create_pr,
                       commit_message=commit_message, endpoint=endpoint, token=token, retry=retry)
    up.start()
    return up.finish(folder, files=files)


class ShardUploader:
    """Push a soup while it is being written: pre-upload each shard, then commit everything once.

    Usage, in the order a merge runs::

        up = ShardUploader("owner/soup", token=...)
        up.start()                      # create the repo, read the branch head
        up.shard_done(tmp / "model-00001-of-00002.safetensors")   # background LFS upload
        ...
        result = up.finish(final_folder)  # wait, then ONE commit with every file of the folder

    A shard is matched in ``finish`` by its file name, so the folder may have been renamed in
    between; a shard whose final file differs (size or mtime) or whose pre-upload failed is simply
    uploaded again by the commit. ``shard_done`` never raises for upload problems: the merge goes
    on and ``finish`` reports them.

    Args:
        repo_id: ``"owner/name"``.
        revision: target branch (default ``main``).
        private: create the repo private.
        create_pr: open a pull request instead of committing to the branch.
        commit_message: defaults to a summary taken from ``soup.json``.
        endpoint: hub URL; defaults to ``HF_ENDPOINT``.
        token: a token, or None for huggingface_hub's usual places.
        retry: backoff for transient failures.
        max_workers: shards pre-uploaded at the same time.
    """

    def __init__(self, repo_id: str, *, revision: str | None = None, private: bool = False,
                 create_pr: bool = False, commit_message: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, retry: RetryPolicy | None = None, max_workers: int = 2) -> None:
        _check_repo_id(repo_id)
        self.repo_id, self.branch = repo_id, revision or constants.DEFAULT_REVISION
        self.where = f"{repo_id}@{self.branch}"  # names the target in errors
        self.private, self.create_pr, self.commit_message = private, create_pr, commit_message
        self.retry, self.token, self.max_workers = retry, token, max_workers
        self.api = HfApi(endpoint=_endpoint(endpoint), token=token)
        self.repo_url: str | None = None
        self.parent: str | None = None  # the branch head read by start(): the commit's parent
        self.remote_files: set[str] = set()  # files at ``parent``
        self._shards: dict[str, tuple[CommitOperationAdd, tuple[int, int], Future]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Create the repo if needed, create the branch if missing, and read its head.

        Raises:
            HubError: no access (bad token, no write permission) or the hub kept failing.
        """
        try:
            self.repo_url = str(self._call(lambda: self.api.create_repo(
                self.repo_id, private=self.private, exist_ok=True, repo_type="model")))
            self.parent = self._head()
            if self.parent is None and self.branch != constants.DEFAULT_REVISION:
                self._call(lambda: self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True))
                self.parent = self._head()
            if self.parent is not None:
                self.remote_files = self._call(lambda: {f.path for f in self.api.list_repo_tree(
                    self.repo_id, revision=self.parent, recursive=True) if isinstance(f, RepoFile)})
        except Exception as err:
            raise _hub_error(err, self.where, token=self.token) from None
        self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="soup-upload")

    def shard_done(self, path: Path, sha256: str | None = None) -> None:
        """Start pre-uploading a finished shard in the background (its final name is ``path.name``).

        Args:
            path: the shard file; it must not change afterwards.
            sha256: its hex digest, when the writer already computed it (saves hashing it again).
        """
        if self._pool is None:
            raise RuntimeError("ShardUploader.shard_done() called before start()")
        path = Path(path)
        stat = path.stat()
        op = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        if sha256 is not None:
            try:  # huggingface_hub hashes lazily; give it the digest the writer computed
                op.upload_info.sha256 = bytes.fromhex(sha256)
            except AttributeError:  # an older huggingface_hub without the setter: it hashes itself
                pass
        self._shards[path.name] = (op, (stat.st_size, stat.st_mtime_ns), self._pool.submit(self._preupload, op))

    def finish(self, folder: Path, *, files: list[Path] | None = None) -> PushResult:
        """Wait for the pre-uploads, then commit every file of ``folder`` in ONE commit.

        The same commit deletes remote weight files and indexes that ``folder`` does not have.

        Args:
            folder: the finished output folder (may be the renamed temporary folder).
            files: the files to commit (default: every file under ``folder``).

        Returns:
            A ``PushResult``.

        Raises:
            HubError: the branch moved since ``start()``, no access, or the hub kept failing.
        """
        if self.repo_url is None:
            raise RuntimeError("ShardUploader.finish() called before start()")
        folder = Path(folder)
        files = _folder_files(folder) if files is None else files
        try:
            operations: list = [self._operation(folder, path) for path in files]
        finally:
            self.close()
        names = {op.path_in_repo for op in operations}
        operations += [CommitOperationDelete(path_in_repo=p) for p in sorted(self.remote_files - names)
                       if STALE.search(p)]
        message = self.commit_message or _default_message(folder, len(operations))
        try:
            info = self._call(lambda: self.api.create_commit(
                self.repo_id, operations, commit_message=message, revision=self.branch,
                create_pr=self.create_pr, parent_commit=self.parent))
        except HfHubHTTPError as err:
            if err.response is not None and err.response.status_code == 412:
                raise HubError(f"hub: {self.where} moved since {(self.parent or '')[:12]} (another push landed "
                               "first); nothing was pushed, re-run soup push") from None
            raise _hub_error(err, self.where, token=self.token) from None
        except Exception as err:
            raise _hub_error(err, self.where, token=self.token) from None
        return PushResult(repo_url=self.repo_url, commit=info.oid, commit_url=info.commit_url, pr_url=info.pr_url)

    def close(self) -> None:
        """Stop the background pool (pending pre-uploads are cancelled); safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ShardUploader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        return _retrying(fn, self.retry)

    def _head(self) -> str | None:
        refs = self._call(lambda: self.api.list_repo_refs(self.repo_id))
        return next((b.target_commit for b in refs.branches if b.name == self.branch), None)

    def _preupload(self, op: CommitOperationAdd) -> None:
        # LFS-sized files are hashed and uploaded now; free_memory drops the file reference, so the
        # commit needs only their sha256 and size. Smaller files stay for the commit itself.
        self._call(lambda: self.api.preupload_lfs_files(
            self.repo_id, additions=[op], revision=self.branch, create_pr=self.create_pr, free_memory=True))

    def _operation(self, folder: Path, path: Path) -> CommitOperationAdd:
        """The commit operation for one file: the pre-uploaded one when still valid, else a new one."""
        name = path.relative_to(folder).as_posix()
        shard = self._shards.get(name)
        if shard is not None:
            op, stamp, future = shard
            stat = path.stat()
            uploaded = not future.cancelled() and future.exception() is None and op._is_uploaded
            if uploaded and (stat.st_size, stat.st_mtime_ns) == stamp:
                return op
        return CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))


# ---- helpers -----------------------------------------------------------------------------------------
def _retrying(fn: Callable[[], T], policy: RetryPolicy | None) -> T:
    """Call ``fn``; retry transient failures with exponential backoff, re-raise anything else."""
    policy = policy or DEFAULT_RETRY
    delay = policy.base_delay
    for attempt in range(1, max(policy.tries, 1) + 1):
        try:
            return fn()
        except Exception as err:
            if attempt >= policy.tries or not _transient(err):
                raise
        time.sleep(delay)
        delay = min(delay * 2, policy.max_delay)
    raise AssertionError("unreachable")


def _causes(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # __cause__/__context__ may form a cycle
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _transient(err: BaseException) -> bool:
    """A connection error, a 5xx or a 429 anywhere in the exception chain."""
    for e in _causes(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        if isinstance(e, httpx2.TransportError) and not isinstance(e, httpx2.ProxyError):
            return True
        status = _status(e)
        if status is not None:
            return status >= 500 or status == 429
    return False


def _hub_error(err: BaseException, where: str, *, token: str | bool | None = None,
               offline: bool = False) -> HubError:
    """One clear line for a failed hub call; never contains the token."""
    if isinstance(err, HubError):
        return err
    status = next((s for s in map(_status, _causes(err)) if s is not None), None)
    kinds = [type(e) for e in _causes(err)]
    if offline and status is None:
        msg = (f"hub: {where} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloads; "
               "pull it once online (pinned to a sha)")
    elif any(issubclass(k, GatedRepoError) for k in kinds):
        msg = f"hub: {where} is gated: accept its conditions on the hub, then {TOKEN_HELP}"
    elif status == 401:
        msg = f"hub: 401 Unauthorized for {where}: {TOKEN_HELP}"
    elif status == 403:
        msg = f"hub: 403 Forbidden for {where}: your token cannot access or write to it; {TOKEN_HELP}"
    elif any(issubclass(k, RevisionNotFoundError) for k in kinds):
        msg = f"hub: revision not found: {where}"
    elif any(issubclass(k, RepositoryNotFoundError) for k in kinds):
        msg = f"hub: repository not found: {where} (if it is private or gated, {TOKEN_HELP})"
    elif any(issubclass(k, RemoteEntryNotFoundError) for k in kinds):
        msg = f"hub: file not found in {where}: {_first_line(err)}"
    elif status is not None and (status >= 500 or status == 429):
        msg = f"hub: {status} server error for {where}, still failing after retries; try again later"
    elif any(issubclass(k, httpx2.TransportError) for k in kinds):
        msg = f"hub: cannot reach the hub for {where} ({type(err).__name__}), still failing after retries"
    elif any(issubclass(k, (OfflineModeIsEnabled, LocalEntryNotFoundError)) for k in kinds):
        msg = f"hub: {where} is not in the local cache and the hub cannot be used: {_first_line(err)}"
    elif isinstance(err, ValueError) and "README.md" in str(err):
        msg = f"hub: the model card of {where} was rejected: {' '.join(str(err).split()[:40])}"
    elif status is not None:
        msg = f"hub: HTTP {status} for {where}: {_first_line(err)}"
    else:
        msg = f"hub: {where}: {type(err).__name__}: {_first_line(err)}"
    return HubError(_scrub(msg, token))


def _first_line(err: BaseException) -> str:
    server = getattr(err, "server_message", None)
    text = server or str(err) or type(err).__name__
    return " ".join(text.strip().splitlines()[:1])[:300]


def _scrub(text: str, token: str | bool | None) -> str:
    """Remove any token (explicit, ``HF_TOKEN`` or the saved login) from a message."""
    secrets = [token if isinstance(token, str) else None, os.environ.get("HF_TOKEN")]
    try:
        secrets.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except OSError:
        pass
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id):
        raise HubError(f"hub: invalid repo id {repo_id!r}: expected owner/name")


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _cache_dir(cache_dir: str | Path | None) -> str:
    """explicit > ``HF_HUB_CACHE`` > ``HF_HOME/hub`` (read now, not at import) > huggingface_hub's."""
    if cache_dir is not None:
        return str(cache_dir)
    home = os.environ.get("HF_HOME")
    return os.environ.get("HF_HUB_CACHE") or (os.path.join(home, "hub") if home else constants.HF_HUB_CACHE)


def _offline() -> bool:
    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _folder_files(folder: Path) -> list[Path]:
    """Every file to push, sorted; the folder must exist and hold at least one file."""
    if not folder.is_dir():
        raise HubError(f"hub: nothing to push: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not SKIP_DIRS & set(p.relative_to(folder).parts[:-1]))
    if not files:
        raise HubError(f"hub: nothing to push: {folder} is empty")
    return files


def _default_message(folder: Path, n_files: int) -> str:
    try:
        manifest = json.loads((folder / "soup.json").read_text())
        method = manifest["method"]["name"]
        n = len(manifest.get("ingredients") or [])
        return f"soup: {method} soup of {n} ingredients"
    except (OSError, ValueError, KeyError, TypeError):
        return f"soup: upload {n_files} files"
