"""Push a finished soup to the hub as ONE commit, optionally uploading shards while the merge runs.

- ``push`` uploads an output folder as one commit whose parent is the branch head read at the
  start: if someone else pushed in between, the hub refuses (412) and the user gets a clear error
  instead of a silent overwrite. Remote weight files (shards, indexes) that the folder does not
  have are deleted by the same commit; other remote files are kept.
- ``ShardUploader`` pushes while the merge is still running: each finished shard is pre-uploaded
  (``HfApi.preupload_lfs_files``) in a background thread, and ``finish`` commits them with the
  remaining files.

A push only ever reads the local folder. Transient failures are retried (``errors.retrying``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFile, constants

from soup.errors import HubError, SoupError
from soup.hub.errors import RetryPolicy, hub_error, retrying, status_code
from soup.hub.specs import check_repo_id, hub_endpoint

__all__ = ["PushResult", "ShardUploader", "push"]

# weights and their indexes: a push deletes the remote ones its folder lacks (no stale shards left)
STALE = re.compile(r"(\.safetensors|\.safetensors\.index\.json|(^|/)pytorch_model[^/]*\.bin(\.index\.json)?)$")
SKIP_DIRS = {".git", ".cache"}  # huggingface_hub refuses to commit under these

T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """Where a push landed."""

    repo_url: str
    commit: str  # the new commit's sha
    commit_url: str
    pr_url: str | None = None  # set when the push opened a pull request


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
    between: each shard is pre-uploaded from a hard link the uploader keeps in a folder beside the
    shard's (``FOLDER.upload-*``, removed by ``close``), a path that stays valid when a merge renames its
    temporary folder into place at once, without waiting for the uploads. A shard whose final file
    differs (size or mtime), whose pre-upload failed, or that was too small for LFS is simply uploaded
    by the commit. ``shard_done`` never raises for upload
    problems: the merge goes on and ``finish`` reports them.

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
        parent_commit: the branch head the caller based its work on (``soup run --if-changed`` read the
            previous soup there): ``start`` fails if the branch has moved since, and the commit is made
            against it, so two runs that saw the same soup publish once.
        previous: the previous soup's ``Manifest``: the default commit message then says what changed.
    """

    def __init__(self, repo_id: str, *, revision: str | None = None, private: bool = False,
                 create_pr: bool = False, commit_message: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, retry: RetryPolicy | None = None, max_workers: int = 2,
                 parent_commit: str | None = None, previous: Any = None) -> None:
        check_repo_id(repo_id)
        self.expected, self.previous = parent_commit, previous
        self.repo_id, self.branch = repo_id, revision or constants.DEFAULT_REVISION
        self.where = f"{repo_id}@{self.branch}"  # names the target in errors
        self.private, self.create_pr, self.commit_message = private, create_pr, commit_message
        self.retry, self.token, self.max_workers = retry, token, max_workers
        self.api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
        self.repo_url: str | None = None
        self.parent: str | None = None  # the branch head read by start(): the commit's parent
        self.remote_files: set[str] = set()  # files at ``parent``
        self._shards: dict[str, tuple[CommitOperationAdd, tuple[int, int], Future]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._kept: Path | None = None  # the hard links shards are pre-uploaded from

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
            if self.expected is not None and self.parent != self.expected:
                raise HubError(f"hub: {self.where} moved since {self.expected[:12]} (another soup was published "
                               "first); nothing was pushed")
            if self.parent is not None:
                self.remote_files = self._call(lambda: {f.path for f in self.api.list_repo_tree(
                    self.repo_id, revision=self.parent, recursive=True) if isinstance(f, RepoFile)})
        except Exception as err:
            raise hub_error(err, self.where, token=self.token) from None
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
        op = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(self._keep(path)))
        if sha256 is not None:
            try:  # huggingface_hub hashes lazily (public UploadInfo.sha256 setter): give it the writer's digest
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
        message = self.commit_message or _default_message(folder, len(operations), self.previous)
        try:
            info = self._call(lambda: self.api.create_commit(
                self.repo_id, operations, commit_message=message, revision=self.branch,
                create_pr=self.create_pr, parent_commit=self.parent))
        except Exception as err:
            if status_code(err) == 412 and self.expected is not None:
                raise HubError(f"hub: {self.where} moved since {self.expected[:12]} (another soup was published "
                               "first); nothing was pushed") from None
            if status_code(err) == 412:
                raise HubError(f"hub: {self.where} moved since {(self.parent or '')[:12]} (another push landed "
                               "first); nothing was pushed, re-run soup push") from None
            raise hub_error(err, self.where, token=self.token) from None
        return PushResult(repo_url=self.repo_url, commit=info.oid, commit_url=info.commit_url, pr_url=info.pr_url)

    def close(self) -> None:
        """Stop the background pool (pending pre-uploads are cancelled), remove the kept links; safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._kept is not None:
            shutil.rmtree(self._kept, ignore_errors=True)
            self._kept = None

    def __enter__(self) -> ShardUploader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        return retrying(fn, self.retry)

    def _head(self) -> str | None:
        refs = self._call(lambda: self.api.list_repo_refs(self.repo_id))
        return next((b.target_commit for b in refs.branches if b.name == self.branch), None)

    def _keep(self, path: Path) -> Path:
        """A hard link to ``path`` that outlives a rename of its folder (same inode: same size and mtime);
        ``path`` itself where no link can be made (then a pre-upload may miss a renamed shard, which
        the commit uploads)."""
        try:
            if self._kept is None:
                self._kept = Path(tempfile.mkdtemp(prefix=f"{path.parent.name}.upload-", dir=path.parent.parent))
            link = self._kept / path.name
            link.unlink(missing_ok=True)  # a shard written again
            os.link(path, link)
            return link
        except OSError:
            return path

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
            done = not future.cancelled() and future.exception() is None
            if done and _preuploaded(op) and (stat.st_size, stat.st_mtime_ns) == stamp:
                return op
        return CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))


def _preuploaded(op: CommitOperationAdd) -> bool:
    """Whether ``preupload_lfs_files(..., free_memory=True)`` uploaded ``op`` (an LFS-sized file).

    Why this test: huggingface_hub has no public "uploaded" flag on ``CommitOperationAdd`` (only an
    underscored attribute); its documented contract is that ``free_memory=True`` replaces an uploaded
    operation's content with ``b""``. A file too small for LFS keeps its path, which may be the
    temporary folder's, gone after the rename: it is committed from its final path instead.
    """
    return op.path_or_fileobj == b""


def _folder_files(folder: Path) -> list[Path]:
    """Every file to push, sorted; the folder must exist and hold at least one file."""
    if not folder.is_dir():
        raise HubError(f"hub: nothing to push: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not SKIP_DIRS & set(p.relative_to(folder).parts[:-1]))
    if not files:
        raise HubError(f"hub: nothing to push: {folder} is empty")
    return files


def _default_message(folder: Path, n_files: int, previous: Any = None) -> str:
    """The default commit message from the folder's manifest: "soup: greedy soup of 8 ingredients", or,
    given the ``previous`` soup's manifest, what changed since (``soup.finish.report.format_update``), e.g.
    "+ acme/sft-ocr@abc1234 (0.612); greedy kept 4/7; score 0.618 (+0.004)"."""
    from soup.io.manifest import read

    try:
        manifest = read(folder)
    except SoupError:
        return f"soup: upload {n_files} files"
    if previous is not None:
        from soup.finish.report import format_update

        return format_update(previous, manifest)
    return f"soup: {manifest.method.name} soup of {len(manifest.ingredients)} ingredients"
