"""A small Hugging Face Hub look-alike for tests: real HTTP, real commits, real huggingface_hub calls.

``HubStore`` holds repositories in memory with git-like history: every commit gets a 40-hex sha and
its own file map, branches and pull-request refs point at commits. ``HubHandler`` serves the routes
that huggingface_hub 2.x uses for model repos (create, info, tree, paths-info, refs, commits, branch,
preupload, LFS batch/upload/verify, NDJSON commit, resolve with Range), ``list_models`` (author, search,
tag filters; tags come from the model card's front matter) and ``get_collection``, and types its errors with the
``X-Error-Code`` header, as the real hub does. ``running_hub()`` starts it on a free port of
127.0.0.1 in a thread. Clients must use ``HF_HUB_DISABLE_XET=1`` (LFS transfers only) and pass
``endpoint=store.url``.

Test knobs on the store: ``token`` (every API call then needs ``Authorization: Bearer <token>``),
``lfs_threshold`` (bytes from which preupload answers "lfs"), ``fail_next(route, times, status)``
(fault injection), ``requests`` (a log of ``(method, route, status)``) and ``collections``
(``{slug: [repo ids]}``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

import yaml

__all__ = ["HubStore", "HubHandler", "HubHTTPError", "running_hub", "git_blob_oid"]

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
MERGE_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the hub calls a regular file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file's content; LFS files are addressed by sha256 and listed through their pointer."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @cached_property
    def oid(self) -> str:  # git oid of what git stores: the content, or the LFS pointer
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:  # what /resolve reports: sha256 for LFS files, the git oid otherwise
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    prs: list[str] = field(default_factory=list)  # refs/pr/<i+1> -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)


class HubHTTPError(Exception):
    """Raised inside the handler; becomes a JSON error response with an optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubStore:
    """All hub state, guarded by one lock. ``url`` is set once the server is bound."""

    def __init__(self, *, token: str | None = None, lfs_threshold: int = 10 * 1024 * 1024) -> None:
        self.token = token  # if set, API calls need "Authorization: Bearer <token>"
        self.lfs_threshold = lfs_threshold  # preupload answers "lfs" from this size (bytes) on
        self.url = ""
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded through /lfs-upload
        self.collections: dict[str, list[str]] = {}  # slug (owner/title-id) -> model repo ids, in order
        self.requests: list[tuple[str, str, int]] = []  # (method, route, status), in order
        self._faults: dict[str, list[tuple[int, dict]]] = {}  # route -> (status, headers) to answer with, next first
        self._secret = secrets.token_bytes(16)
        self._counter = itertools.count()
        self.lock = threading.RLock()

    # ---- test knobs -------------------------------------------------------------------------
    def fail_next(self, route: str, *, times: int = 1, status: int = 500, headers: dict | None = None) -> None:
        """Answer the next ``times`` requests to ``route`` (e.g. "commit", "info") with ``status`` (and
        ``headers``, e.g. ``{"Retry-After": "1"}``)."""
        with self.lock:
            self._faults.setdefault(route, []).extend([(status, dict(headers or {}))] * times)

    def take_fault(self, route: str) -> tuple[int, dict] | None:
        with self.lock:
            queue = self._faults.get(route)
            return queue.pop(0) if queue else None

    def count(self, route: str, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, r, _ in self.requests if r == route and method in (None, m))

    # ---- reading ----------------------------------------------------------------------------
    def repo(self, repo_id: str) -> Repo:
        try:
            return self.repos[repo_id]
        except KeyError:
            raise HubHTTPError(404, f"Repository {repo_id} not found", "RepoNotFound") from None

    def resolve(self, repo_id: str, revision: str) -> Commit:
        """A branch, ``refs/pr/N`` or full commit sha -> commit (RevisionNotFound otherwise)."""
        repo = self.repo(repo_id)
        sha = repo.branches.get(revision)
        if sha is None and revision.startswith("refs/pr/") and revision[8:].isdigit():
            index = int(revision[8:]) - 1
            sha = repo.prs[index] if 0 <= index < len(repo.prs) else None
        if sha is None and SHA_RE.match(revision) and revision in repo.commits:
            sha = revision
        if sha is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """``{path: bytes}`` at a revision, for assertions."""
        with self.lock:
            return {path: blob.data for path, blob in self.resolve(repo_id, revision).files.items()}

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.lock:
            return self.repo(repo_id).branches[branch]

    # ---- writing ----------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False) -> bool:
        """Create with an initial commit holding ``.gitattributes``; False if it already exists."""
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = Repo(repo_id=repo_id, private=private)
            attributes = Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
            self.commit(repo_id, "main", {".gitattributes": attributes}, [], title="initial commit")
            return True

    def commit(self, repo_id: str, branch: str, adds: dict[str, Blob], deletes: list[str], *,
               title: str, parent: str | None = None, create_pr: bool = False) -> tuple[Commit, int | None]:
        """Apply one commit on top of ``branch`` (or open a PR from it); 412 on a stale ``parent``."""
        with self.lock:
            repo = self.repo(repo_id)
            head = repo.branches.get(branch)
            if head is None and repo.branches:
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and parent != head:
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files) if head else {}
            for path in deletes:
                matched = [p for p in files if p == path or p.startswith(path.rstrip("/") + "/")]
                if not matched:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in matched:
                    del files[p]
            files.update(adds)
            seed = f"{head}\n{title}\n{sorted((p, b.oid) for p, b in files.items())}\n{next(self._counter)}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            commit = repo.commits[sha] = Commit(sha=sha, parent=head, title=title, files=files, date=date)
            if create_pr:
                repo.prs.append(sha)
                return commit, len(repo.prs)
            repo.branches[branch] = sha
            return commit, None

    def sign(self, oid: str) -> str:
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()[:32]


# ------------------------------------------------------------------------------------------------
# route name, method, regex over the raw (still URL-quoted) path
REPO = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [
    ("create_repo", "POST", r"/api/repos/create"),
    ("list_models", "GET", r"/api/models"),
    ("collection", "GET", r"/api/collections/(?P<slug>[^/]+/[^/]+)"),
    ("validate_yaml", "POST", r"/api/validate-yaml"),
    ("info", "GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"),
    ("tree", "GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"),
    ("paths_info", "POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)"),
    ("refs", "GET", rf"/api/models/{REPO}/refs"),
    ("commits", "GET", rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)"),
    ("branch", "POST", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)"),
    ("preupload", "POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"),
    ("commit", "POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"),
    ("lfs_batch", "POST", rf"/{REPO}\.git/info/lfs/objects/batch"),
    ("lfs_verify", "POST", rf"/{REPO}\.git/info/lfs/objects/verify"),
    ("lfs_upload", "PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/(?P<sig>[0-9a-f]+)"),
    ("resolve", "GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
]
NO_AUTH = {"validate_yaml", "lfs_upload"}  # the upload href is pre-signed, like an S3 URL


class HubHandler(BaseHTTPRequestHandler):
    """Routes one request to the store; every response is JSON unless it is file content."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed ACKs
    server: ThreadingHTTPServer  # has a ``store`` attribute

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def store(self) -> HubStore:
        return self.server.store  # type: ignore[attr-defined]

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip(), 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.store.requests.append((self.command, self._route, status))  # before the client can see it
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        self._route = "unknown"
        body = self._read_body()
        raw_path, _, query = self.path.partition("?")
        self._query = parse_qs(query)  # every value of repeated parameters (list_models' filter, expand)
        params = {k: v[-1] for k, v in self._query.items()}
        try:
            for name, route_method, pattern in ROUTES:
                match = re.fullmatch(pattern, raw_path)
                if match and (route_method == method or (name == "resolve" and method == "HEAD")):
                    self._route = name
                    break
            else:
                raise HubHTTPError(404, f"no route for {method} {raw_path}")
            if (fault := self.store.take_fault(name)) is not None:
                raise HubHTTPError(fault[0], f"injected fault on {name}", headers=fault[1])
            if self.store.token is not None and name not in NO_AUTH:
                if self.headers.get("Authorization") != f"Bearer {self.store.token}":
                    raise HubHTTPError(401, "Invalid credentials in Authorization header")
            args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            with self.store.lock:
                getattr(self, f"route_{name}")(body=body, params=params, **args)
        except HubHTTPError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message}, headers)

    def _entry(self, path: str, blob: Blob) -> dict:
        entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        return entry

    def _entries(self, files: dict[str, Blob], prefix: str, recursive: bool) -> list[dict]:
        out: dict[str, dict] = {}
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path[len(prefix) + 1 if prefix else 0:].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                out.setdefault(folder, {"type": "directory", "oid": git_blob_oid(folder.encode()), "path": folder})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                out[path] = self._entry(path, files[path])
        return list(out.values())

    # ---- routes -----------------------------------------------------------------------------
    def route_create_repo(self, *, body: bytes, params: dict) -> None:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.store.url}/{repo_id}"
        if not self.store.create_repo(repo_id, private=private):
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def route_validate_yaml(self, *, body: bytes, params: dict) -> None:
        content = json.loads(body).get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                meta, errors = None, [f"Invalid YAML: {err}"]
            if not errors and not isinstance(meta, dict):
                errors.append("Metadata must be a YAML mapping")
            elif not errors:
                base = meta.get("base_model")
                if base is not None and not (isinstance(base, str) or (
                        isinstance(base, list) and all(isinstance(b, str) and "/" in b for b in base))):
                    errors.append('"base_model" must be a repo id or a list of repo ids')
                if "tags" in meta and not (isinstance(meta["tags"], list)
                                           and all(isinstance(t, str) for t in meta["tags"])):
                    errors.append('"tags" must be a list of strings')
                if meta.get("base_model_relation", "merge") not in MERGE_RELATIONS:
                    errors.append('"base_model_relation" must be one of ' + ", ".join(sorted(MERGE_RELATIONS)))
                if "library_name" in meta and not isinstance(meta["library_name"], str):
                    errors.append('"library_name" must be a string')
        warnings = [] if match else [{"message": "empty or missing yaml metadata in repo card"}]
        status = 400 if errors else 200
        self._json(status, {"errors": [{"message": e} for e in errors], "warnings": warnings})

    def route_list_models(self, *, body: bytes, params: dict) -> None:
        """``HfApi.list_models``: author (exact), search (substring of the id), every ``filter`` tag;
        one page (no Link header)."""
        author, search = params.get("author"), params.get("search", "").lower()
        wanted = set(self._query.get("filter", []))
        out = []
        for repo_id in sorted(self.store.repos):
            repo = self.store.repos[repo_id]
            if "main" not in repo.branches:
                continue
            head = repo.commits[repo.branches["main"]]
            tags = _card_tags(head.files.get("README.md"))
            if (author and repo_id.split("/")[0] != author) or search not in repo_id.lower() or not wanted <= set(tags):
                continue
            out.append({"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                        "sha": head.sha, "private": repo.private, "tags": tags, "lastModified": head.date,
                        "createdAt": repo.commits[next(iter(repo.commits))].date, "likes": 0, "downloads": 0})
        self._json(200, out)

    def route_collection(self, *, body: bytes, params: dict, slug: str) -> None:
        if slug not in self.store.collections:
            raise HubHTTPError(404, f"Collection {slug} not found")
        items = [{"_id": f"{k:024x}", "id": repo_id, "type": "model", "position": k}
                 for k, repo_id in enumerate(self.store.collections[slug])]
        self._json(200, {"slug": slug, "title": slug.split("/")[1], "owner": {"name": slug.split("/")[0]},
                         "items": items, "lastUpdated": "2025-01-01T00:00:00.000Z", "position": 0,
                         "private": False, "theme": "blue", "upvotes": 0})

    def route_info(self, *, body: bytes, params: dict, repo: str, rev: str = "main") -> None:
        commit = self.store.resolve(repo, rev)
        blobs = params.get("blobs") in ("True", "true", "1")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                entry = self._entry(path, blob)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if blob.lfs:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        self._json(200, {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0],
                         "sha": commit.sha, "private": self.store.repo(repo).private, "gated": False,
                         "disabled": False, "lastModified": commit.date, "tags": [], "siblings": siblings})

    def route_tree(self, *, body: bytes, params: dict, repo: str, rev: str, path: str = "") -> None:
        files = self.store.resolve(repo, rev).files
        path = path.strip("/")
        if path and not any(p.startswith(path + "/") for p in files):
            raise HubHTTPError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        self._json(200, self._entries(files, path, params.get("recursive") in ("True", "true", "1")))

    def route_paths_info(self, *, body: bytes, params: dict, repo: str, rev: str) -> None:
        files = self.store.resolve(repo, rev).files
        form = parse_qs(body.decode())
        out = []
        for path in form.get("paths", []):
            if path in files:
                out.append(self._entry(path, files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in files):
                out.append({"type": "directory", "oid": git_blob_oid(path.encode()), "path": path})
        self._json(200, out)

    def route_refs(self, *, body: bytes, params: dict, repo: str) -> None:
        r = self.store.repo(repo)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in r.branches.items()]
        prs = [{"name": f"refs/pr/{i}", "ref": f"refs/pr/{i}", "targetCommit": s} for i, s in enumerate(r.prs, 1)]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def route_commits(self, *, body: bytes, params: dict, repo: str, rev: str) -> None:
        commits, sha = [], self.store.resolve(repo, rev).sha
        while sha is not None:
            c = self.store.repo(repo).commits[sha]
            commits.append({"id": c.sha, "title": c.title, "message": "", "authors": [{"user": "soup"}],
                            "date": c.date})
            sha = c.parent
        self._json(200, commits)

    def route_branch(self, *, body: bytes, params: dict, repo: str, rev: str) -> None:
        r = self.store.repo(repo)
        if rev in r.branches:
            raise HubHTTPError(409, f"Reference refs/heads/{rev} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        r.branches[rev] = self.store.resolve(repo, start).sha
        self._json(200, {})

    def route_preupload(self, *, body: bytes, params: dict, repo: str, rev: str) -> None:
        files = self.store.resolve(repo, rev).files
        out = []
        for f in json.loads(body)["files"]:
            existing = files.get(f["path"])
            out.append({"path": f["path"], "shouldIgnore": False,
                        "uploadMode": "lfs" if f["size"] >= self.store.lfs_threshold else "regular",
                        "oid": existing.etag if existing else None})
        self._json(200, {"files": out, "commitOid": self.store.resolve(repo, rev).sha})

    def route_lfs_batch(self, *, body: bytes, params: dict, repo: str) -> None:
        self.store.repo(repo)
        objects = []
        for obj in json.loads(body)["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.store.lfs_objects:
                upload = f"{self.store.url}/lfs-upload/{obj['oid']}/{self.store.sign(obj['oid'])}"
                verify = f"{self.store.url}/{repo}.git/info/lfs/objects/verify"
                item["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects})

    def route_lfs_upload(self, *, body: bytes, params: dict, oid: str, sig: str) -> None:
        if not hmac.compare_digest(sig, self.store.sign(oid)):
            raise HubHTTPError(403, "bad upload signature")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubHTTPError(400, f"uploaded content does not match sha256 {oid}")
        self.store.lfs_objects[oid] = body
        self._json(200, {})

    def route_lfs_verify(self, *, body: bytes, params: dict, repo: str) -> None:
        obj = json.loads(body)
        data = self.store.lfs_objects.get(obj["oid"])
        if data is None or len(data) != obj["size"]:
            raise HubHTTPError(404, f"LFS object {obj['oid']} not found")
        self._json(200, {})

    def route_commit(self, *, body: bytes, params: dict, repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "first NDJSON line must be the header")
        header, adds, deletes = lines[0]["value"], {}, []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                if len(data) >= self.store.lfs_threshold:
                    raise HubHTTPError(400, f"{value['path']} is larger than 10 MiB: use LFS")
                adds[value["path"]] = Blob(data, lfs=False)
            elif key == "lfsFile":
                data = self.store.lfs_objects.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise HubHTTPError(422, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                adds[value["path"]] = Blob(data, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
            else:
                raise HubHTTPError(400, f"unknown operation {key}")
        create_pr = params.get("create_pr") == "1"
        commit, pr = self.store.commit(repo, rev, adds, deletes, title=header.get("summary", ""),
                                       parent=header.get("parentCommit"), create_pr=create_pr)
        self._json(200, {"commitUrl": f"{self.store.url}/{repo}/commit/{commit.sha}", "commitOid": commit.sha,
                         "success": True,
                         "pullRequestUrl": f"{self.store.url}/{repo}/discussions/{pr}" if pr else None})

    def route_resolve(self, *, body: bytes, params: dict, repo: str, rev: str, path: str) -> None:
        commit = self.store.resolve(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data, size = blob.data, len(blob.data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        status, wanted = 200, self.headers.get("Range")
        if wanted and self.command == "GET":
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", wanted)
            start, end = (m.group(1), m.group(2)) if m else ("", "")
            if start:
                first, last = int(start), min(int(end), size - 1) if end else size - 1
            elif end:
                first, last = max(size - int(end), 0), size - 1
            else:
                first, last = size, -1
            if first > last or first >= size:
                raise HubHTTPError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status, data = 206, data[first:last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._send(status, data, headers, content_type="application/octet-stream")


def _card_tags(readme: Blob | None) -> list[str]:
    """The ``tags`` of a model card's YAML front matter (what the hub lists a model's tags from)."""
    if readme is None:
        return []
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.data.decode("utf-8", "replace"), re.DOTALL)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return []
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


@contextmanager
def running_hub(*, token: str | None = None, lfs_threshold: int = 10 * 1024 * 1024) -> Iterator[HubStore]:
    """Serve a fresh ``HubStore`` on 127.0.0.1:<free port> in a thread; yields the store (``store.url``).

    Args:
        token: if set, every API call must carry ``Authorization: Bearer <token>``.
        lfs_threshold: size in bytes from which the preupload route answers "lfs".

    Returns:
        A context manager; the server stops when it exits.
    """
    store = HubStore(token=token, lfs_threshold=lfs_threshold)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    httpd.daemon_threads = True
    httpd.store = store  # type: ignore[attr-defined]
    store.url = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hubserver",
                              daemon=True)
    thread.start()
    try:
        yield store
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
