"""The non-weight files a checkpoint needs beside its weights: which a soup copies, which a pull fetches.

A fine-tune loads with ``from_pretrained`` only if its companions travel with the weights: config and
generation config, tokenizer and processor files, chat templates and, for remote-code models
(``auto_map`` in ``config.json``: InternLM-XComposer2, POINTS, ...), the ``configuration_*.py`` /
``modeling_*.py`` files shipped beside the weights. ``support_files(folder)`` lists them:

- names matching ``PATTERNS`` at the top of the folder (config, tokenizer, processor and
  chat-template files, every ``*.py``), and ``additional_chat_templates/*.jinja``;
- every ``auto_map`` target of the config files (``modeling_x.Class`` -> ``modeling_x.py``);
- any other file a config names by a relative path (``"image_processor_file": "clip.json"``).

Never listed, even when a config names them: weight files and pickles (``*.safetensors``, ``*.bin``,
``*.pt``, ...), index files, hidden files, and soup's own files (``soup.json``, the ``README.md``
model card, ``soup_plot.png``), which every soup writes for itself. Soup never imports or runs any
of these files; it copies them. A hub pull fetches the same set: ``PATTERNS`` with the weights, then
what the downloaded configs name (``missing``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["PATTERNS", "SupportFiles", "support_files", "is_excluded"]

# fnmatch patterns on paths relative to the checkpoint folder (the hub's allow_patterns syntax)
PATTERNS = (
    "config.json", "generation_config.json",  # the model
    "*.py",  # remote code: configuration_*.py, modeling_*.py, processing_*.py, tokenization_*.py
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
    "*.tiktoken",  # tokenizers (tokenizer.json, tokenizer_config.json, sentencepiece, tiktoken)
    "*processor_config.json",  # preprocessor_config.json, processor_config.json, video_...
    "chat_template.json", "chat_template.jinja", "additional_chat_templates/*.jinja",
)
# files whose JSON may name other files (auto_map targets, tokenizer or processor files)
SCANNED = ("config.json", "tokenizer_config.json", "*processor_config.json")
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
                   ".pkl", ".pickle", ".npy", ".npz", ".ot", ".tflite"}
SOUP_OWN = {"soup.json", "README.md", "soup_plot.png"}  # written by every soup for itself
# what a config may name by path: small text files, never weights
NAMED_SUFFIXES = {".json", ".py", ".jinja", ".txt", ".model", ".tiktoken", ".yaml", ".yml", ".vocab", ".spm"}
MAX_SCANNED = 8 << 20  # bytes; larger JSON files are data, not configs


@dataclass
class SupportFiles:
    """What a checkpoint folder holds beside its weights."""

    files: list[str] = field(default_factory=list)  # relative posix paths, present, to copy
    missing: list[str] = field(default_factory=list)  # named by a config but not in the folder
    missing_code: list[str] = field(default_factory=list)  # auto_map targets among ``missing``


def is_excluded(name: str) -> bool:
    """True for files a soup never copies: weights, pickles, indexes, hidden files, soup's own."""
    path = PurePosixPath(name)
    return (path.suffix.lower() in WEIGHT_SUFFIXES or name.endswith(".index.json") or name in SOUP_OWN
            or any(part.startswith(".") for part in path.parts))


def support_files(root: Path) -> SupportFiles:
    """The non-weight files ``root`` (a checkpoint folder) needs, and what its configs name but lack."""
    root = Path(root)
    top = [p.name for p in root.iterdir() if p.is_file()] if root.is_dir() else []
    templates = root / "additional_chat_templates"
    if templates.is_dir():
        top += [f"{templates.name}/{p.name}" for p in templates.iterdir() if p.is_file()]
    files = {n for n in top if _matches(n, PATTERNS) and not is_excluded(n)}
    code, named = set(), set()
    for name in sorted(n for n in files if _matches(n, SCANNED)):
        data = _read_json(root / name)
        code |= _auto_map_files(data.get("auto_map") if isinstance(data, dict) else None)
        named |= set(_named_paths(data))
    out = SupportFiles(files=sorted(files))
    for name in sorted((code | named) - files):
        if is_excluded(name):
            continue
        if (root / name).is_file():
            out.files.append(name)
        else:
            out.missing.append(name)
            if name in code:
                out.missing_code.append(name)
    return out


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _read_json(file: Path) -> Any:
    try:
        if file.stat().st_size > MAX_SCANNED:
            return None
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable config is the loader's problem; it is still copied


def _auto_map_files(auto_map: Any) -> set[str]:
    """``{"AutoModel": "modeling_x.Cls", "AutoTokenizer": ["tok_x.T", null]}`` -> ``{"modeling_x.py", "tok_x.py"}``.

    References to another repo (``owner/repo--modeling_x.Cls``) are fetched by transformers from
    that repo, not from this folder.
    """
    refs: list[Any] = []
    for value in (auto_map.values() if isinstance(auto_map, dict) else ()):
        refs.extend(value if isinstance(value, list) else [value])
    out = set()
    for ref in refs:
        if isinstance(ref, str) and "--" not in ref and "." in ref:
            module = ref.rsplit(".", 1)[0]
            if module and all(part.isidentifier() for part in module.split(".")):
                out.add(module.replace(".", "/") + ".py")
    return out


def _named_paths(value: Any) -> list[str]:
    """Relative paths to small text files found among a config's string values (at any depth)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _named_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _named_paths(v)]
    if not isinstance(value, str):
        return []
    text = value.strip().removeprefix("./")
    if not text or len(text) > 200 or text.startswith(("/", "~")) or "://" in text or "\\" in text:
        return []
    path = PurePosixPath(text)
    if any(part in ("", ".", "..") for part in text.split("/")) or path.suffix.lower() not in NAMED_SUFFIXES:
        return []
    return [text]
