"""The parts of a (vision-)language model, from tensor names alone, and the rules a frozen part suggests.

A soup of SFT runs should read a frozen vision tower once (``take:0``), but the user should not need to
know the tensor names for that. ``group`` sorts tensors into components:

- **vision**: a vision tower (``vision_tower``, ``vision_model``, ``visual_encoder``, ``vit``,
  ``general_vit``...); each tower is its own component (POINTS and MG-LLaVA have two);
- **connector**: projector, connector, abstractor, resampler (``multi_modal_projector``,
  ``mm_projector``, ``visual_abstractor``, ``vision_proj``...);
- **embeddings** and **head**: token embeddings (``embed_tokens``, ``tok_embeddings``, ``wte``) and the
  output head (``lm_head``, ``output``) outside the vision parts;
- **lora**: LoRA-style pairs (``lora_A``/``lora_B``, InternLM-XComposer2's ``Plora_A``/``Plora_B``),
  wherever they sit;
- **language**: everything else (the decoder layers, norms, a modality-adaptive K/V of mPLUG-Owl2).

A name is read left to right up to its first number (the inside of a repeated block says nothing
about the part it belongs to); the first part that names a kind decides, and the component is the
name up to that part, so its rule pattern is ``PREFIX.*``. Tensors the rules cannot place are the
language model's. ``suggest_rules`` turns components identical in every ingredient into
``PATTERN=take:0`` rules, checking that no pattern catches a tensor that differs.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from soup.io.checkpoint import TensorInfo

__all__ = ["Component", "KINDS", "classify", "group", "suggest_rules"]

KINDS = ("vision", "connector", "embeddings", "language", "head", "lora")  # display order
_LORA = re.compile(r"^(.*lora)_(a|b|down|up|embedding_a|embedding_b|magnitude_vector)$", re.IGNORECASE)
_PART_KINDS = (  # checked in this order for each part: a "visual_abstractor" is a connector
    ("embeddings", re.compile(r"^(embed_tokens|tok_embeddings|wte|word_embeddings|embed_in)$")),
    ("head", re.compile(r"^(lm_head|output|embed_out|head)$")),
    ("connector", re.compile(r"projector|abstractor|connector|resampler|q_?former|perceiver|aligner|"
                             r"merger|^mm_|^mlp1$|^proj$|_proj$|pargo", re.IGNORECASE)),
    ("vision", re.compile(r"vision|visual|(^|_)vit(_|$)|^clip|siglip|^eva|convnext|dino|"
                          r"image_(encoder|tower)|img_encoder", re.IGNORECASE)),
)


@dataclass
class Component:
    """One part of a model: its kind, a readable name, the globs that select it, and its tensors."""

    kind: str  # one of KINDS
    name: str  # "vision_tower", "language model", "Plora_* pairs"
    patterns: list[str] = field(default_factory=list)  # rule globs covering its tensors
    tensors: list[str] = field(default_factory=list)
    parameters: int = 0
    bytes: int = 0


def classify(name: str) -> tuple[str, str, str]:
    """``(kind, component, pattern)`` of one tensor name.

    >>> classify("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
    ('vision', 'model.vision_tower', 'model.vision_tower.*')
    """
    parts = name.split(".")
    for part in parts:
        m = _LORA.match(part)
        if m:
            family = m.group(1)
            return "lora", f"{family}_* pairs", f"*.{_glob_escape(family)}_*"
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            break
        for kind, pattern in _PART_KINDS:
            if pattern.search(part):
                prefix = ".".join(parts[:i + 1])
                return kind, prefix, f"{_glob_escape(prefix)}.*"
    return "language", "language model", _module_pattern(parts, name)


def _module_pattern(parts: list[str], name: str) -> str:
    """The glob of a language-model tensor's module: up to its first number (``model.layers.*``), or
    its parent (``model.norm.*``); a name with no module deeper than the root is matched exactly."""
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return f"{_glob_escape('.'.join(parts[:i]))}.*"
    if len(parts) >= 3:
        return f"{_glob_escape('.'.join(parts[:-1]))}.*"
    return _glob_escape(name)


def group(tensors: Mapping[str, TensorInfo]) -> list[Component]:
    """The components of a checkpoint's tensor table, in ``KINDS`` order, then by first tensor."""
    found: dict[tuple[str, str], Component] = {}
    for name, info in tensors.items():
        kind, label, pattern = classify(name)
        comp = found.setdefault((kind, label), Component(kind, label))
        if pattern not in comp.patterns:
            comp.patterns.append(pattern)
        comp.tensors.append(name)
        comp.parameters += info.numel
        comp.bytes += info.nbytes
    return sorted(found.values(), key=lambda c: KINDS.index(c.kind))  # stable: first seen first


def suggest_rules(components: Sequence[Component], identical: Collection[str],
                  names: Iterable[str]) -> list[str]:
    """``PATTERN=take:0`` for every component whose tensors are all in ``identical``.

    A pattern is suggested only if every tensor of ``names`` it matches is identical; otherwise the
    component's tensors under it are named one by one, so no rule ever catches a tensor that differs
    (which ``take:0`` would copy instead of averaging).
    """
    names = list(names)
    rules: list[str] = []
    for comp in components:
        if not comp.tensors or not all(t in identical for t in comp.tensors):
            continue
        for pattern in comp.patterns:
            if all(n in identical for n in names if fnmatchcase(n, pattern)):
                chosen = [pattern]
            else:
                chosen = [_glob_escape(t) for t in comp.tensors if fnmatchcase(t, pattern)]
            rules.extend(f"{p}=take:0" for p in chosen if f"{p}=take:0" not in rules)
    return rules


def _glob_escape(text: str) -> str:
    """``text`` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
