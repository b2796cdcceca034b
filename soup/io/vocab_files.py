"""The soup's tokenizer and config for its vocabulary (``soup.io.vocab.VocabPlan``), written consistently.

Called after the support files of ``--config-from`` are copied (``soup.engine.writer.copy_aux_files``):

- the tokenizer files are the reference ingredient's (the first one for ``union`` and ``first``, the
  chosen one for ``--vocab N|NAME``); with ``union`` every token another ingredient added is appended
  with its output id and its own flags (special, lstrip, rstrip, normalized, single word) to
  ``tokenizer.json``'s ``added_tokens``, ``tokenizer_config.json``'s ``added_tokens_decoder`` and
  special-token lists (``extra_special_tokens`` / ``additional_special_tokens``), ``special_tokens_map.json``
  and ``added_tokens.json``, where the reference has these;
- the chat template stays ``--config-from``'s (its ``chat_template.jinja`` / ``.json`` files, or the
  ``chat_template`` key of its ``tokenizer_config.json``);
- ``config.json``: every ``vocab_size`` (``text_config``'s included) becomes the soup's row count, and
  token ids (``image_token_index``, ``pad_token_id``, ``eos_token_id``...) in it and in
  ``generation_config.json`` are re-mapped to the soup's ids of the same strings.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soup.io.vocab import FLAGS, TOKENIZER_FILES, Vocab, VocabPlan

__all__ = ["write_vocab"]

_SPECIAL_LISTS = ("extra_special_tokens", "additional_special_tokens")


def write_vocab(plan: VocabPlan, folder: Path, config_root: Path | None, *,
                warn: Callable[[str], None] | None = None) -> None:
    """Write the soup's tokenizer files and fix its config in ``folder`` (where ``config_root``'s
    support files were copied)."""
    folder, ref_root = Path(folder), plan.roots[plan.reference]
    if ref_root is None:
        return
    source_config = _load(Path(config_root) / "tokenizer_config.json") if config_root is not None else None
    if config_root is None or Path(ref_root).resolve() != Path(config_root).resolve():
        for name in TOKENIZER_FILES:  # the tokenizer is the vocabulary's; the rest stays config_from's
            (folder / name).unlink(missing_ok=True)
            if (Path(ref_root) / name).is_file():
                shutil.copyfile(Path(ref_root) / name, folder / name)
        _chat_template(folder, config_root, source_config)
    new = [(r, tok, plan.vocabs[k]) for r, (tok, k) in enumerate(zip(plan.tokens, plan.origin))
           if tok is not None and k is not None and k != plan.reference]
    if new:
        _add_tokens(folder, plan, new)
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        if isinstance(data := _load(f), dict):
            _fix_config(data, plan, config_root, name, warn)
            f.write_text(json.dumps(data, indent=2) + "\n")


def _chat_template(folder: Path, config_root: Path | None, source_config: Any) -> None:
    """The reference's ``tokenizer_config.json`` with ``--config-from``'s chat template."""
    f = folder / "tokenizer_config.json"
    data = _load(f)
    if not isinstance(data, dict):
        return
    if isinstance(source_config, dict) and "chat_template" in source_config:
        data["chat_template"] = source_config["chat_template"]
    elif config_root is not None and any((Path(config_root) / n).is_file()
                                         for n in ("chat_template.jinja", "chat_template.json")):
        data.pop("chat_template", None)  # config_from's template file (copied beside) is the one
    f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _entry(vocab: Vocab, tok: str, new_id: int) -> dict[str, Any]:
    """An added token as ``tokenizer.json`` writes it, with its flags from the ingredient that added it."""
    flags = vocab.added.get(tok, {})
    special = bool(flags.get("special", False))
    defaults = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": not special, "special": special}
    return {"id": new_id, "content": tok, **{k: bool(flags.get(k, defaults[k])) for k in FLAGS}}


def _add_tokens(folder: Path, plan: VocabPlan, new: list[tuple[int, str, Vocab]]) -> None:
    entries = [_entry(v, tok, r) for r, tok, v in new]
    f = folder / "tokenizer.json"
    if isinstance(data := _load(f), dict):
        data["added_tokens"] = sorted([*(data.get("added_tokens") or []), *entries], key=lambda a: a["id"])
        f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    specials = [e["content"] for e in entries if e["special"]]
    f = folder / "tokenizer_config.json"
    if isinstance(data := _load(f), dict):
        if isinstance(data.get("added_tokens_decoder"), dict):
            for e in entries:
                data["added_tokens_decoder"][str(e["id"])] = {k: e[k] for k in ("content", *FLAGS)}
        if specials:
            key = next((k for k in _SPECIAL_LISTS if k in data), None)
            if key is None and not (folder / "special_tokens_map.json").is_file():
                key = _SPECIAL_LISTS[0]  # transformers 5 keeps the list here
            given = data.get(key) if key else None
            if isinstance(given, dict):  # named extra special tokens: kept under the names their ingredient gave
                given.update(_named_specials(plan, specials))
            elif key:
                data[key] = [*(given or []), *[t for t in specials if t not in (given or [])]]
        f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    f = folder / "special_tokens_map.json"
    if specials and isinstance(data := _load(f), dict):
        have = [t if isinstance(t, str) else t.get("content") for t in data.get("additional_special_tokens") or []]
        data["additional_special_tokens"] = [*(data.get("additional_special_tokens") or []),
                                             *[t for t in specials if t not in have]]
        f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    f = folder / "added_tokens.json"
    if f.is_file() or not (folder / "tokenizer.json").is_file():  # slow tokenizers keep added tokens here
        data = _load(f) if isinstance(_load(f), dict) else {}
        data.update({e["content"]: e["id"] for e in entries})
        f.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _named_specials(plan: VocabPlan, specials: list[str]) -> dict[str, str]:
    """Named extra special tokens (``{"image_token": "<image>"}``) of the ingredients that added these tokens."""
    out: dict[str, str] = {}
    for root in plan.roots:
        config = _load(Path(root) / "tokenizer_config.json") if root is not None else None
        named = config.get("extra_special_tokens") if isinstance(config, dict) else None
        if isinstance(named, dict):
            out.update({k: v for k, v in named.items() if v in specials and k not in out})
    return out


def _fix_config(data: dict[str, Any], plan: VocabPlan, config_root: Path | None, name: str,
                warn: Callable[[str], None] | None) -> None:
    """``vocab_size`` -> the soup's rows; token ids of ``config_root``'s vocabulary -> the soup's."""
    roots = [Path(r).resolve() if r is not None else None for r in plan.roots]
    at = roots.index(Path(config_root).resolve()) if config_root is not None and \
        Path(config_root).resolve() in roots else plan.reference
    old = {i: t for t, i in plan.vocabs[at].tokens.items()}
    new = {}
    for i, t in enumerate(plan.tokens):
        if t is not None:
            new.setdefault(t, i)
    lost: list[str] = []

    def remap(value: Any) -> Any:
        if isinstance(value, list):
            return [remap(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool) and value in old:
            if old[value] in new:
                return new[old[value]]
            lost.append(old[value])
        return value

    def walk(d: dict[str, Any], depth: int = 0) -> None:
        for k, v in list(d.items()):
            if k == "vocab_size" and v == plan.sizes[at]:
                d[k] = plan.rows
            elif k.endswith(("token_id", "token_ids", "token_index")):
                d[k] = remap(v)
            elif isinstance(v, dict) and depth < 3:
                walk(v, depth + 1)

    walk(data)
    if lost and warn is not None:
        warn(f"{name}: token(s) {', '.join(map(repr, sorted(set(lost))))} are not in the soup's vocabulary "
             "(--vocab): their ids are left as they were")


def _load(f: Path) -> Any:
    """A JSON file's content, or None when it is missing or not JSON (then it is left as it is)."""
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
