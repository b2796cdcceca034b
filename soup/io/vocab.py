"""Vocabularies: each ingredient's tokenizer read, the soup's vocabulary built, rows matched by token.

Fine-tunes of one base often add tokens (``<image>``, chat or OCR markers), each appending its own ids
and resizing the embeddings, so one string has different ids in different fine-tunes: row i of one
and row i of another are different tokens. Here the rows of *vocabulary-indexed* tensors (input
embeddings, output head, any tensor outside the numbered layers whose first dimension is the
config's ``vocab_size``) are matched by token string, from headers, configs and tokenizer files
alone (nothing of a tensor is read):

- ``read_vocab(folder)``: a checkpoint's tokens and ids: ``tokenizer.json`` through the ``tokenizers``
  library where it is installed (its JSON otherwise), a sentencepiece-only tokenizer through
  ``transformers``, else ``vocab.json`` / ``vocab.txt`` with ``added_tokens.json`` and
  ``tokenizer_config.json``'s ``added_tokens_decoder``.
- ``plan_vocab(checkpoints, mode)``: the soup's vocabulary and, per checkpoint, which of its rows
  each output row is (``VocabPlan.maps``), or None when every vocabulary and row count agree (rows
  then stay matched by position, as they always were). ``mode``: ``union`` (the first ingredient's
  ids kept, every other ingredient's new tokens appended in ingredient order, then id order),
  ``first``, an ingredient's index or name (that ingredient's vocabulary; tokens it lacks are
  dropped), or ``base`` (a merge method's base model's vocabulary).

Rows that are not tokens (the padding of ``resize_token_embeddings(pad_to_multiple_of=...)``) are
matched by position among the checkpoints for which that position is padding too. The soup's row
count is the reference ingredient's, or, when its rows cannot hold the soup's tokens, the tokens'
count rounded up to the ingredients' padding multiple. ``soup.io.vocab_files`` writes the soup's
tokenizer and config; ``soup.engine.vocab`` does the math.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soup.errors import CheckpointError, IncompatibleIngredients, RecipeError

__all__ = ["Vocab", "VocabPlan", "read_vocab", "plan_vocab", "check_vocab_mode", "vocab_indexed_by_name", "TOKENIZER_FILES", "MODES"]

MODES = ("union", "first")
# the files a tokenizer is made of (what the soup's tokenizer is written from)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")
FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")  # an added token's flags
# the last name part of input embeddings and output heads (``model.embed_tokens.weight``)
HEADS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "tok_embeddings", "embed_in", "embed_out", "output", "shared")
_LAYER = re.compile(r"\.\d+\.")  # tensors inside numbered layers are never vocabulary-indexed
MAX_PAD = 128  # the largest padding multiple inferred from the ingredients' row counts


@dataclass
class Vocab:
    """One checkpoint's tokenizer as strings and ids."""

    tokens: dict[str, int]  # every token (the model's vocabulary and the added tokens) -> id
    added: dict[str, dict[str, Any]]  # added tokens: content -> {"id", "special", "lstrip", ...}
    base: dict[str, int] | None  # the model's own vocabulary, added tokens left out (None: not known)
    source: str  # the file it was read from
    ids: set[int] = field(init=False)
    size: int = field(init=False)  # ids in use: the largest id plus one
    by_id: list[str | None] = field(init=False)  # id -> its token (the smaller string when two share an id)

    def __post_init__(self) -> None:
        self.ids = set(self.tokens.values())
        self.size = max(self.ids) + 1 if self.ids else 0
        if self.ids and (min(self.ids) < 0 or self.size > 2 * len(self.ids) + 65536):
            raise ValueError(f"token ids from {min(self.ids)} to {self.size - 1} for {len(self.ids)} tokens")
        self.by_id = [None] * self.size
        for tok, i in self.tokens.items():
            if self.by_id[i] is None or tok < self.by_id[i]:
                self.by_id[i] = tok


@dataclass(eq=False)
class VocabPlan:
    """The soup's vocabulary and where every row of its vocabulary-indexed tensors comes from."""

    tokens: list[str | None]  # output id -> token string (None: an id no token uses)
    origin: list[int | None]  # output id -> the checkpoint whose tokenizer the token comes from
    rows: int  # rows of every vocabulary-indexed tensor of the soup (tokens, then padding)
    names: frozenset[str]  # the vocabulary-indexed tensors
    maps: list[torch.Tensor]  # per checkpoint: (rows,) int64, its row for each output row, -1 where it has none
    sizes: list[int]  # per checkpoint: its row count
    vocabs: list[Vocab]
    roots: list[Path | None]
    reference: int  # the ingredient whose ids the soup keeps (and whose tokenizer files it is written from)
    mode: str | int

    def record(self, labels: Sequence[str]) -> dict[str, Any]:
        """For ``soup.json``: the mode, whose ids, the rows, each added token's id and who added it."""
        own, ref = self.vocabs[:len(labels)], self.vocabs[self.reference].by_id  # the base: the ids all share
        shared = min(_common_prefix(ref, v.by_id, min(len(ref), len(v.by_id))) for v in own)
        added = [{"token": t, "id": i, "from": [labels[k] for k, v in enumerate(own) if v.tokens.get(t, -1) >= shared]}
                 for i, t in enumerate(self.tokens) if t is not None and i >= shared]
        return {"mode": self.mode, "ids_from": labels[self.reference], "rows": self.rows, "added": added}

    def also(self, weights: Sequence[float], n: int, base: int | None = None) -> tuple[int, ...]:
        """Ingredients (of the first ``n``) with a zero weight that must be read anyway: they hold rows
        that no ingredient with a weight holds (nor ``base``, when a method reads one)."""
        held = torch.zeros(self.rows, dtype=torch.bool)
        for i in [i for i in range(n) if weights[i] != 0.0] + ([base] if base is not None else []):
            held |= self.maps[i] >= 0
        return tuple(i for i in range(n) if weights[i] == 0.0 and bool((self.maps[i][~held] >= 0).any()))


def check_vocab_mode(mode: Any, labels: Sequence[str], base: int | None = None) -> int:
    """The reference of ``mode`` (``union``, ``first``, an index, a label; ``base``: index ``base``), or RecipeError."""
    if mode in MODES:
        return 0
    if mode == "base" and "base" not in labels:  # a merge method's base model's vocabulary
        if base is None:
            raise RecipeError("vocab: base is the vocabulary of a merge method's base model, and there is none")
        return base
    if isinstance(mode, str) and mode.isdigit():
        mode = int(mode)
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not 0 <= mode < len(labels):
            raise RecipeError(f"vocab: index {mode} out of range (0..{len(labels) - 1})")
        return mode
    if isinstance(mode, str) and mode in labels:
        return list(labels).index(mode)
    raise RecipeError(f"vocab: {mode!r} is not union, first, an ingredient index or name "
                      f"(have: {', '.join(labels)})")


def vocab_indexed_by_name(name: str) -> bool:
    """True for input embeddings and output heads by name (``*.embed_tokens.weight``, ``lm_head.weight``)."""
    return _head_part(name) in HEADS and not _LAYER.search(name)


def _head_part(name: str) -> str:
    """The module's own name: ``model.embed_tokens.weight`` -> ``embed_tokens``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return parts[-1]


# ---- reading tokenizers ----
_CACHE: dict[tuple, Vocab | None] = {}  # (folder, its tokenizer files' sizes and mtimes) -> Vocab


def read_vocab(root: Path | None) -> Vocab | None:
    """The tokenizer in folder ``root`` as strings and ids, or None when it has no tokenizer files.

    Raises:
        CheckpointError: a tokenizer file that cannot be read (names it).
    """
    if root is None or not Path(root).is_dir():
        return None
    root = Path(root)
    key = (str(root.resolve()),) + tuple((n, s.st_size, s.st_mtime_ns) for n in TOKENIZER_FILES
                                         if (root / n).is_file() and (s := (root / n).stat()))
    if len(key) == 1:
        return None
    if key not in _CACHE:  # strategies merge one set many times: read each tokenizer once
        try:
            _CACHE[key] = _from_tokenizer_json(root) or _from_transformers(root) or _from_files(root)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # files of an unexpected shape
            raise CheckpointError(f"{root}: its tokenizer files cannot be read as a vocabulary ({e!r})") from None
    return _CACHE[key]


def _flags(token: Any, get: Callable[[Any, str], Any]) -> dict[str, Any]:
    return {k: bool(v) for k in FLAGS if (v := get(token, k)) is not None}


def _from_tokenizer_json(root: Path) -> Vocab | None:
    f = root / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        Tokenizer = None
    if Tokenizer is not None:
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:  # the library's own error types: one line naming the file
            raise CheckpointError(f"{f}: not a tokenizer the tokenizers library can read ({e})") from None
        added = {t.content: {"id": i, **_flags(t, getattr)} for i, t in tok.get_added_tokens_decoder().items()}
        return Vocab(dict(tok.get_vocab(with_added_tokens=True)), added, dict(tok.get_vocab(with_added_tokens=False)),
                     str(f))
    data = _json(f)
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        base = {str(p[0]): i for i, p in enumerate(vocab)}
    elif isinstance(vocab, dict):
        base = {str(t): int(i) for t, i in vocab.items()}
    else:
        raise CheckpointError(f"{f}: no model vocabulary (model.vocab) in it")
    added = {a["content"]: {"id": int(a["id"]), **_flags(a, dict.get)} for a in data.get("added_tokens") or []}
    return Vocab({**base, **{t: a["id"] for t, a in added.items()}}, added, base, str(f))


def _from_transformers(root: Path) -> Vocab | None:
    """A tokenizer without ``tokenizer.json`` (sentencepiece, tiktoken), loaded by transformers if installed."""
    if not any((root / n).is_file() for n in ("tokenizer.model", "spiece.model")) and not list(root.glob("*.tiktoken")):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(root))
        tokens = dict(tok.get_vocab())
        decoder = tok.added_tokens_decoder
    except Exception:  # not installed, or a tokenizer it cannot build here: the files are read instead
        return None
    added = {t.content: {"id": int(i), **_flags(t, getattr)} for i, t in decoder.items()}
    return Vocab(tokens, added, {t: i for t, i in tokens.items() if t not in added}, f"{root} (transformers)")


def _from_files(root: Path) -> Vocab | None:
    """``vocab.json`` (BPE) or ``vocab.txt`` (WordPiece) and the added tokens of the other files."""
    if (root / "vocab.json").is_file():
        base = {str(t): int(i) for t, i in _json(root / "vocab.json").items()}
        source = root / "vocab.json"
    elif (root / "vocab.txt").is_file():
        lines = (root / "vocab.txt").read_text(encoding="utf-8").split("\n")
        base = {t: i for i, t in enumerate(lines[:-1] if lines and lines[-1] == "" else lines)}
        source = root / "vocab.txt"
    else:
        return None  # no vocabulary readable without the tokenizer's own code
    added: dict[str, dict[str, Any]] = {}
    if (root / "added_tokens.json").is_file():
        added.update({str(t): {"id": int(i)} for t, i in _json(root / "added_tokens.json").items()})
    config = _json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
    for i, a in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(a, Mapping) and "content" in a:
            added[a["content"]] = {"id": int(i), **_flags(a, dict.get)}
    return Vocab({**base, **{t: a["id"] for t, a in added.items()}}, added, base, str(source))


def _json(f: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not readable JSON ({e})") from None


def read_config(root: Path | None) -> dict[str, Any]:
    """A checkpoint's ``config.json`` ({} when there is none or it is not a JSON object: it is only copied)."""
    f = Path(root) / "config.json" if root is not None else None
    try:
        data = json.loads(f.read_text(encoding="utf-8")) if f is not None and f.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def config_sizes(config: Any, depth: int = 0) -> list[int]:
    """Every ``vocab_size`` of a config, nested ones (``text_config``) included."""
    if not isinstance(config, dict) or depth > 3:
        return []
    own = [v for k, v in config.items() if k == "vocab_size" and isinstance(v, int) and not isinstance(v, bool)]
    return own + [s for v in config.values() for s in config_sizes(v, depth + 1)]


# ---- the soup's vocabulary ----
def plan_vocab(checkpoints: Sequence[Any], mode: str | int = "union", *, n: int | None = None) -> VocabPlan | None:
    """The soup's vocabulary for these checkpoints (the first ``n`` are ingredients; the rest, a
    method's base model, are matched to the soup's vocabulary too), or None when nothing needs matching.

    Raises:
        RecipeError: a bad ``mode``.
        IncompatibleIngredients: tied and untied output heads mixed; row counts that differ where a
            tokenizer is missing; tokenizers that differ by more than added tokens (names the first token).
    """
    n = len(checkpoints) if n is None else n
    labels = [ck.label for ck in checkpoints]
    ref = check_vocab_mode(mode, labels[:n], base=n if n < len(checkpoints) else None)
    configs = [read_config(ck.root) for ck in checkpoints]
    _check_tied(checkpoints, configs)
    sizes = [_rows_of(ck, cfg) for ck, cfg in zip(checkpoints, configs)]
    if any(s is None for s in sizes):
        return None  # no input embeddings found: nothing is vocabulary-indexed
    names = _indexed(checkpoints, sizes)
    if not names:
        return None
    same_rows = len(set(sizes)) == 1
    vocabs, unread = [], None
    for ck in checkpoints:
        try:
            vocabs.append(read_vocab(ck.root))
        except CheckpointError as e:  # fatal only where rows must be matched by token
            vocabs.append(None)
            unread = unread or e
    if same_rows and (any(v is None for v in vocabs) or all(v.tokens == vocabs[0].tokens for v in vocabs)):
        return None  # rows by position, as always: the same vocabulary (or no way to tell)
    if unread is not None:
        raise unread
    for i, v in enumerate(vocabs):
        if v is None:
            other = next(j for j in range(len(sizes)) if sizes[j] != sizes[i])
            name = min(names)
            raise IncompatibleIngredients(
                f"tensor {name}: {sizes[other]} rows in {labels[other]} but {sizes[i]} in {labels[i]}, which has no "
                "tokenizer files (tokenizer.json, vocab.json...) to match its rows to tokens")
    _check_same_base(vocabs, labels, ref)
    tokens, origin = _output_tokens(vocabs, ref, n, union=mode == "union")
    m = _pad_multiple(sizes[:n], vocabs[:n])  # more tokens than the reference's rows: round up to the padding
    rows = sizes[ref] if len(tokens) <= sizes[ref] else -(-len(tokens) // m) * m
    maps = [_row_map(tokens, v, size, rows) for v, size in zip(vocabs, sizes)]
    return VocabPlan(tokens, origin, rows, frozenset(names), maps, sizes, vocabs,
                     [ck.root for ck in checkpoints], ref, mode)


def _check_tied(checkpoints: Sequence[Any], configs: Sequence[dict]) -> None:
    """Tied and untied output heads cannot be souped together: one line saying which and why."""
    heads = [{k for k in ck.tensors if vocab_indexed_by_name(k) and _head_part(k) in ("lm_head", "embed_out", "output")}
             for ck in checkpoints]
    for i, ck in enumerate(checkpoints[1:], 1):
        if heads[i] != heads[0]:
            has, lacks = (0, i) if heads[0] - heads[i] else (i, 0)
            tied = configs[lacks].get("tie_word_embeddings", (configs[lacks].get("text_config") or {})
                                      .get("tie_word_embeddings"))
            if tied:
                head = sorted(heads[has] - heads[lacks])[0]
                raise IncompatibleIngredients(
                    f"{checkpoints[lacks].label} ties its output head to its input embeddings (tie_word_embeddings, "
                    f"no {head}) but {checkpoints[has].label} has its own {head}: a soup of tied and untied "
                    "heads is not defined; untie the first (save it with tie_word_embeddings false) or soup "
                    "tied ones only")


def _rows_of(ck: Any, config: dict) -> int | None:
    """A checkpoint's vocabulary row count: its embeddings' rows, the config's ``vocab_size`` preferred."""
    sizes = config_sizes(config)
    heads = [t.shape[0] for name, t in ck.tensors.items()
             if vocab_indexed_by_name(name) and t.dtype.is_floating_point and len(t.shape) == 2]
    for rows in heads:
        if rows in sizes:
            return rows
    return heads[0] if heads else None


def _indexed(checkpoints: Sequence[Any], sizes: Sequence[int]) -> list[str]:
    """Float tensors outside numbered layers whose first dimension is the vocabulary's rows in every checkpoint."""
    out = []
    for name, t in checkpoints[0].tensors.items():
        if not t.dtype.is_floating_point or not t.shape or _LAYER.search(name):
            continue
        infos = [ck.tensors.get(name) for ck in checkpoints]
        if all(x is not None and x.shape and x.shape[0] == s and x.shape[1:] == t.shape[1:]
               for x, s in zip(infos, sizes)):
            out.append(name)
    return out


def _check_same_base(vocabs: Sequence[Vocab], labels: Sequence[str], ref: int) -> None:
    """Every tokenizer is the reference's base tokenizer plus added tokens: a token of one's own
    vocabulary (not an added token) has the same id in the other, or the tokenizers differ."""
    a = vocabs[ref]
    for i, b in enumerate(vocabs):
        if i == ref:
            continue
        for (x, y, lx, ly) in ((a, b, labels[ref], labels[i]), (b, a, labels[i], labels[ref])):
            if x.base is None:
                continue
            bad = [(tid, tok) for tok, tid in x.base.items() - y.tokens.items() if tok not in x.added]
            if bad:
                tid, tok = min(bad)
                there = f"id {y.tokens[tok]}" if tok in y.tokens else "missing"
                raise IncompatibleIngredients(
                    f"vocabulary: {ly}'s tokenizer is not {lx}'s with tokens added: token {tok!r} is id {tid} in "
                    f"{lx} but {there} in {ly} (a different base tokenizer)")


def _output_tokens(vocabs: Sequence[Vocab], ref: int, n: int, *, union: bool) -> tuple[list, list]:
    """The reference's tokens at their ids, then (union) each other ingredient's new ones, in id order."""
    first = vocabs[ref]
    tokens = list(first.by_id)
    origin: list[int | None] = [ref if t is not None else None for t in tokens]
    if union:
        known = set(first.tokens)
        for k in range(n):
            if k == ref:
                continue
            for _, tok in sorted((i, tok) for tok, i in vocabs[k].tokens.items() if tok not in known):
                if tok not in known:
                    known.add(tok)
                    tokens.append(tok)
                    origin.append(k)
    return tokens, origin


def _pad_multiple(sizes: Sequence[int], vocabs: Sequence[Vocab]) -> int:
    """The padding multiple of padded ingredients (more rows than tokens): the largest power of two
    (at most MAX_PAD) dividing every padded row count; 1 when none is padded."""
    padded = [r for r, v in zip(sizes, vocabs) if r > v.size]
    return min([min(r & -r, MAX_PAD) for r in padded], default=1)


def _common_prefix(a: list, b: list, limit: int) -> int:
    """The length of the longest common prefix of two lists (at most ``limit``), compared in C."""
    differ = list(map(operator.ne, a[:limit], b[:limit]))
    return differ.index(True) if True in differ else len(differ)


def _row_map(tokens: Sequence[str | None], vocab: Vocab, size: int, rows: int) -> torch.Tensor:
    """(rows,) int64: a checkpoint's row for each output row (-1: none). Tokens by string; rows that
    are no token in the soup (padding, unused ids) by position, where the position is no token there either."""
    out = [-1] * rows
    same = _common_prefix(tokens, vocab.by_id, min(size, rows))  # the usual case: the same base vocabulary
    out[:same] = range(same)
    for r in range(same, len(tokens)):
        tok = tokens[r]
        i = vocab.tokens.get(tok) if tok is not None else None
        if i is not None and i < size:
            out[r] = i
        elif tok is None and r < size and r not in vocab.ids:
            out[r] = r
    for r in range(len(tokens), min(rows, size)):
        if r not in vocab.ids:
            out[r] = r
    return torch.tensor(out, dtype=torch.int64)
