"""The one place that creates, replaces and locks a soup's output folder.

Safety is a property of this mechanism, not of the commands that call it:

- **Nothing the user owns is removed.** The destination may be replaced only if it is a previous
  soup (a folder holding a ``soup.json`` written by soup), only with ``overwrite``, and only if
  everything in it is soup's own (``foreign_files``): the shards its manifest lists (at their
  recorded sizes), the index, ``soup.json``, the model card, the plot, an adapter's config and the
  support files a soup copies (``soup.io.modelfiles``). Anything else (a user's notes, a link, a
  folder) is named and the destination refused, untouched. It may not be, contain or sit inside any
  input (ingredients, the recipe, the score cache), nor be the working directory or one of its
  ancestors; symlinks and ``..`` are resolved before comparing. A folder that is not a soup (and
  not empty) is refused even with ``overwrite``.
- **Nothing is created through a dangling link.** An output path (or a folder on its way) that is a
  symbolic link to something missing is refused: soup would otherwise create the link's target,
  wherever it points (``check_place``).
- **One writer per output.** A lock file beside the destination (``.NAME.soup-lock``, held with
  ``flock``, so the kernel releases it when its process dies, however it dies) is taken before any
  work; a second writer fails at once with a line naming the output. Whether the destination may be
  replaced is checked again at commit time, under the lock.
- **Nothing half-written.** The soup is written into ``.NAME.soup-tmp-*`` beside the destination and
  renamed into place once complete (the previous soup is swapped out only then); candidates being
  evaluated live in ``.NAME.soup-work-*``. Both go on any exception (and on SIGTERM/SIGHUP/Ctrl-C,
  see ``soup.signals``). A SIGKILLed run cannot clean up: the next run on the same output, once it
  holds the lock, removes that debris and says so (a previous soup caught mid-swap is put back).
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from soup.errors import SoupError, os_reason
from soup.locks import try_lock
from soup.io.checkpoint import SAFETENSORS_INDEX
from soup.io.manifest import MANIFEST, read as read_manifest
from soup.io.modelfiles import SOUP_OWN, support_files

__all__ = ["OutputDir", "is_soup", "foreign_files", "check_place", "checkpoint_paths", "input_paths"]

# files every soup (or adapter soup) may write beside its shards and the support files it copies
OWN_FILES = {MANIFEST, *SOUP_OWN, SAFETENSORS_INDEX, "adapter_config.json"}


def is_soup(folder: Path) -> bool:
    """True if ``folder`` holds a ``soup.json`` written by soup (a previous soup, replaceable)."""
    try:
        read_manifest(folder)
    except SoupError:  # none, unreadable, corrupt, not shaped like a soup's, or from a newer soup
        return False
    return True


def foreign_files(folder: Path) -> list[str]:
    """What a previous soup's folder holds that soup did not write (relative paths, sorted).

    Soup's own: the shards ``soup.json`` lists (at their recorded sizes), the safetensors index,
    ``soup.json``, the model card, the plot, an adapter soup's config, and the support files a soup
    copies from an ingredient (config, tokenizer, processor, chat templates, remote code:
    ``soup.io.modelfiles.support_files``). Everything else is foreign: other files, links (soup writes
    none), empty folders, sockets.

    Raises:
        SoupError: ``folder`` is not a soup (its ``soup.json`` is missing or unreadable).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    own = OWN_FILES | ({manifest.plot} if manifest.plot else set())
    support = set(support_files(folder).files)
    foreign: list[str] = []
    for top, dirs, files in os.walk(folder):
        here = Path(top)
        rel_top = here.relative_to(folder).as_posix()
        for name in dirs + files:
            path = here / name
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if path.is_symlink():
                foreign.append(rel)
            elif path.is_dir():
                if not any(path.iterdir()):
                    foreign.append(rel + "/")
            elif not path.is_file():
                foreign.append(rel)
            elif rel in manifest.files:
                if path.stat().st_size != manifest.files[rel].size:
                    foreign.append(rel)  # not the shard soup wrote
            elif rel not in own and rel not in support:
                foreign.append(rel)
        dirs[:] = [d for d in dirs if not (here / d).is_symlink()]
    return sorted(foreign)


def check_place(dest: str | Path, *, what: str = "output") -> Path:
    """Refuse a destination soup must never create or replace: the filesystem root, the working
    directory or one of its ancestors, a path under a file, or a path through a symbolic link to
    something missing (soup would create the link's target). Returns the resolved path.

    Raises:
        SoupError: one line naming ``what`` and the given path.
    """
    given = Path(dest)
    _check_links(given, what)
    real = _real(dest)
    cwd = _real(os.getcwd())
    if real == Path(real.anchor):
        raise SoupError(f"{what} {given}: is the root of the filesystem; choose a folder")
    if real == cwd:
        raise SoupError(f"{what} {given}: is the working directory; choose a new folder")
    if cwd.is_relative_to(real):
        raise SoupError(f"{what} {given}: contains the working directory ({cwd}); choose a new folder")
    for parent in real.parents:  # the nearest existing folder on the way must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise SoupError(f"{what} {given}: {parent} is a file, not a folder")
            break
    return real


def _check_links(given: Path, what: str) -> None:
    """Refuse ``given`` if it, or a folder on its way, is a symbolic link whose target is missing."""
    path = Path(os.path.abspath(given.expanduser()))
    for p in (*reversed(path.parents), path):
        if p.is_symlink() and not p.exists():
            target = os.readlink(p)
            raise SoupError(f"{what} {given}: {p} is a symbolic link to {target}, which does not exist; "
                            "soup never creates a link's target: create it or give the real path")


def checkpoint_paths(checkpoints: Iterable[object]) -> list[Path]:
    """The paths an output must keep clear of: each ingredient's folder, files and their link targets."""
    paths: list[Path] = []
    for ck in checkpoints:
        root = getattr(ck, "root", None)
        if root is not None:
            paths.append(Path(root))
        for f in getattr(ck, "files", None) or ():
            paths.append(Path(f))
    return paths


def input_paths(ingredients: Iterable[object]) -> list[Path]:
    """The local paths among ingredient specs (folders, files, opened checkpoints), before resolving."""
    paths: list[Path] = []
    for s in ingredients:
        if isinstance(s, (str, os.PathLike)) and not str(s).startswith("hf://"):  # paths, Ingredients
            paths.append(Path(str(s)))
        elif hasattr(s, "files"):
            paths.extend(checkpoint_paths([s]))
    return paths


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


class OutputDir:
    """A soup's destination: checked at once, locked before any work, replaced atomically.

    Usage (``merge`` does this; ``cook`` locks first so the lock covers evaluation too)::

        out = OutputDir("runs/soup", overwrite=True, protect=["runs/ft-a", "runs/ft-b"])
        out.lock()                      # one writer; removes debris of killed runs
        try:
            with out as tmp:            # the temp folder, removed if the block fails
                write_everything(tmp)
                out.commit()            # checked again, then renamed into place
        finally:
            out.release()

    Raises:
        SoupError: one line saying why the destination is refused or busy.
    """

    def __init__(self, dest: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> None:
        self.given = Path(dest)
        self.dest = _real(dest)
        self.overwrite = overwrite
        self._protected: list[tuple[Path, str]] = []
        self._fd: int | None = None
        self._tmp: Path | None = None
        self._work: Path | None = None
        self._created: list[Path] = []  # parent folders lock() had to create
        self.cleaned: list[str] = []  # debris of dead runs removed by lock(), for the caller to report
        self._check_place()
        self.protect(protect)
        self._check_replaceable(at="start")

    # --- checks ---------------------------------------------------------------------------------

    def protect(self, paths: Iterable[str | Path]) -> None:
        """Refuse the destination if it is, contains or sits inside any of ``paths`` (user inputs)."""
        for p in paths:
            real = _real(p)
            self._protected.append((real, str(p)))
            what = f"input {p}" if str(p) == str(real) else f"input {p} (-> {real})"
            if real == self.dest:
                raise SoupError(f"output {self.given}: is the {what}; choose another output folder")
            if real.is_relative_to(self.dest):
                raise SoupError(f"output {self.given}: contains the {what}; choose another output folder")
            if self.dest.is_relative_to(real):
                raise SoupError(f"output {self.given}: is inside the {what}; choose another output folder")

    def _check_place(self) -> None:
        check_place(self.given)

    def _check_replaceable(self, *, at: str) -> None:
        dest = self.dest
        if not (dest.exists() or dest.is_symlink()):
            return
        if not dest.is_dir():
            raise SoupError(f"output {self.given}: is a file, not a soup folder; soup never replaces it")
        if not any(dest.iterdir()):
            return  # an empty folder becomes the soup
        if not is_soup(dest):
            raise SoupError(f"output {self.given}: exists and is not a soup (no soup.json written by soup); "
                            "soup only ever replaces its own outputs, even with --overwrite")
        if not self.overwrite:
            raise SoupError(f"output {self.given}: already exists"
                            + (" (it appeared while this soup was cooking)" if at == "commit" else "")
                            + " (pass --overwrite to replace it)")
        foreign = foreign_files(dest)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise SoupError(f"output {self.given}: holds files soup did not write ({shown}); --overwrite only "
                            "replaces soup's own files: move them out or choose another output folder")

    # --- lock -----------------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.dest.parent / f".{self.dest.name}.soup-lock"

    def lock(self, warn: Callable[[str], None] | None = None) -> OutputDir:
        """Take the output's lock (or fail at once naming the output); remove debris of dead runs,
        telling ``warn`` (one line each) what was removed or restored."""
        if self._fd is not None:
            return self
        missing = [d for d in (self.dest.parent, *self.dest.parent.parents) if not d.exists()]
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # removed again by release() if the soup never lands
        except OSError as e:
            raise SoupError(f"output {self.given}: cannot create {self.dest.parent} ({os_reason(e)})") from None
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                raise SoupError(f"output {self.given}: cannot create the lock file {self.lock_path} "
                                f"({os_reason(e)})") from None
            if not try_lock(fd):
                owner = _read_owner(fd)
                os.close(fd)
                raise SoupError(f"output {self.given}: another soup is writing it ({owner}); "
                                "wait for it to finish or stop it") from None
            try:  # the holder before us may have removed the file after we opened it: lock the live one
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        try:
            self._clean_debris()
            self._check_replaceable(at="start")
            for note in self.cleaned if warn is not None else ():
                warn(f"{self.given}: {note}")
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove the work folder and the lock file, and release the lock (idempotent)."""
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        if self._fd is not None:
            try:
                os.unlink(self.lock_path)  # while still holding it: waiters see a new inode and retry
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if not self.dest.exists():
            for d in self._created:  # innermost first: folders this run created for nothing
                try:
                    d.rmdir()
                except OSError:
                    break
        self._created = []

    def _clean_debris(self) -> None:
        prefix = f".{self.dest.name}.soup-"
        for p in sorted(self.dest.parent.glob(f"{_glob_escape(prefix)}*")):
            kind = p.name[len(prefix):].split("-")[0]
            if kind not in ("tmp", "old", "work") or p == self.lock_path:
                continue
            if kind == "old" and not self.dest.exists() and is_soup(p):
                os.rename(p, self.dest)  # killed mid-swap: the previous soup goes back
                self.cleaned.append(f"restored the previous soup from {p.name}")
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.cleaned.append(f"removed {p.name}, left by a run that was killed")

    # --- temp folder and commit -----------------------------------------------------------------

    def work_dir(self) -> Path:
        """A scratch folder beside the output (candidates for evaluators), removed by ``release``."""
        if self._work is None:
            self.lock()
            self._work = self.dest.parent / f".{self.dest.name}.soup-work-{uuid.uuid4().hex[:8]}"
            self._work.mkdir()
        return self._work

    def __enter__(self) -> Path:
        self.lock()
        self._tmp = self.dest.parent / f".{self.dest.name}.soup-tmp-{uuid.uuid4().hex[:8]}"
        try:
            self._tmp.mkdir()
        except OSError as e:
            raise SoupError(f"output {self.given}: cannot create a folder in {self.dest.parent} "
                            f"({os_reason(e)})") from None
        return self._tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def commit(self) -> Path:
        """Move the finished temp folder into place (checked again now, under the lock)."""
        if self._fd is None or self._tmp is None:
            raise RuntimeError("commit() outside `with output` or without the lock")
        self._check_replaceable(at="commit")
        old = None
        if self.dest.exists():
            if any(self.dest.iterdir()):
                old = self.dest.parent / f".{self.dest.name}.soup-old-{uuid.uuid4().hex[:8]}"
                os.rename(self.dest, old)
            else:
                os.rmdir(self.dest)
        try:
            os.rename(self._tmp, self.dest)
        except BaseException:
            if old is not None and not self.dest.exists():
                os.rename(old, self.dest)
            raise
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "owner unknown"
    except OSError:
        return "owner unknown"


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
