"""One exception tree for everything soup reports to a user.

Every error carries a one-line message that names the file, tensor or field at fault; the CLI prints
that line and exits 1. Anything that is not a ``SoupError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = [
    "SoupError",
    "RecipeError",
    "CheckpointError",
    "IncompatibleIngredients",
    "EvaluatorError",
    "HubError",
    "redact",
    "printable",
    "os_error_line",
    "os_reason",
    "secrets",
]


class SoupError(Exception):
    """Base class: a problem with the user's inputs or environment, reported as one line."""


class RecipeError(SoupError):
    """A recipe, rule or option is invalid (names the field path)."""


class CheckpointError(SoupError):
    """An ingredient checkpoint is missing, truncated or corrupt (names the file and tensor)."""


class IncompatibleIngredients(SoupError):
    """Ingredients disagree on tensor names, shapes or dtypes (names the tensor)."""


class EvaluatorError(SoupError):
    """An evaluator crashed, timed out or returned a non-finite score (names the candidate)."""


class HubError(SoupError):
    """A hub request failed: authentication, missing repo or revision, stale parent commit."""


def secrets() -> list[str]:
    """Hub tokens this process can see (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, the stored login)."""
    import os
    from pathlib import Path

    found = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import constants

        found.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except (OSError, ImportError, AttributeError):
        pass
    return [s for s in found if s and len(s) >= 4]


def redact(text: str, *extra: str | None) -> str:
    """``text`` with every known token (and ``extra`` secrets) replaced by ``***``.

    Used on everything soup prints or writes that may carry foreign text (a plug-in's exception, a
    server's message): a token must never reach a terminal, a log or a manifest.
    """
    import re

    for secret in sorted({*secrets(), *(e for e in extra if e and len(e) >= 4)}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)


# C0 controls but newline and tab, DEL, C1 controls (0x9b is a CSI to some terminals), bidi overrides
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_LINE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NAMED = {0x0a: "\\n", 0x09: "\\t", 0x0d: "\\r"}


def printable(text: str, *, lines: bool = True) -> str:
    """``text`` with control characters written as visible escapes (ESC -> ``\\x1b``, U+202E -> ``\\u202e``).

    Used on text that came from files (names, sources, messages, metadata, soup.json fields) before it
    reaches a terminal or a card: an escape sequence in a downloaded file must not clear the screen or
    retitle the terminal. ``lines``: keep newlines and tabs (False escapes them too: one table cell).
    """
    def escape(m: re.Match) -> str:
        c = ord(m.group())
        return _NAMED.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")

    return (_CONTROLS if lines else _LINE_CONTROLS).sub(escape, text)


def os_error_line(e: OSError, what: str = "") -> str:
    """One line for an environment fault (disk full, read-only, permission, a file for a folder...)."""
    import errno

    hints = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file is where a folder is expected",
             errno.EISDIR: "a folder is where a file is expected",
             errno.EMFILE: "too many open files (raise `ulimit -n`)", errno.ENFILE: "too many open files"}
    where = e.filename if e.filename is not None else what
    reason = hints.get(e.errno, e.strerror or str(e) or type(e).__name__)
    return f"{where}: {reason}" if where else str(reason)


def os_reason(e: OSError) -> str:
    """The reason part of ``os_error_line`` (no file name)."""
    return os_error_line(OSError(e.errno, e.strerror))
