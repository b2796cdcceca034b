"""PEFT LoRA adapters as soup ingredients: read, resolve each module's scaling, check they fit together.

An adapter is a folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (what
``PeftModel.save_pretrained`` writes). Its tensors are named
``base_model.model.<module>.lora_A.weight`` (A: (r, in)) and ``...lora_B.weight`` (B: (out, r)); any
other tensor (``modules_to_save`` copies such as ``lm_head.weight``, trainable token deltas) is
averaged like an ordinary tensor.

Each module's scaling follows peft's ``LoraModel._create_and_replace`` / ``LoraLayer.update_layer``:
the rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` (the first key ``k`` in the
mapping's order for which the module name matches the regex ``(.*\\.)?(k)$``), else ``r`` /
``lora_alpha``; the scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``. The rank
read from the config must be the rank of the stored A and B.

Ingredients must share the task type, the base model (when both name one) and the LoRA modules
with their shapes; ranks, alphas, patterns and rsLoRA may differ. Every mismatch is one
``IncompatibleIngredients`` line naming the module. Variants whose delta is not ``s * B @ A``
(DoRA, LoRA biases, conv / embedding LoRA, other PEFT types) are refused, naming the field or module.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soup.io.checkpoint import Checkpoint, open_checkpoint
from soup.io.vocab import Vocab, read_vocab, vocab_indexed_by_name
from soup.errors import CheckpointError, IncompatibleIngredients

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraModule", "Adapter", "is_adapter", "open_adapter",
           "check_adapters", "vocab_tensors", "base_tensor", "first_difference", "NOT_BY_TOKEN", "pattern_value"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft puts before the base model's module names
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module of an adapter: its tensors, rank, alpha and scaling (peft's semantics)."""

    name: str  # the base model's module, e.g. "model.layers.0.self_attn.q_proj"
    a: str  # tensor names in the adapter file
    b: str
    rank: int
    alpha: float
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA
    shape: tuple[int, int]  # (out, in): the delta's shape

    @property
    def weight(self) -> str:
        """The base model tensor the delta is added to."""
        return f"{self.name}.weight"


@dataclass
class Adapter:
    """A PEFT LoRA adapter, indexed from its config and safetensors header (no tensor data read)."""

    label: str
    root: Path
    config: dict[str, Any]
    checkpoint: Checkpoint  # the adapter's weight file; ``checkpoint.label`` is ``label``
    modules: dict[str, LoraModule]  # by module name, in file order
    others: list[str] = field(default_factory=list)  # tensors averaged as they are (modules_to_save...)

    @property
    def source(self) -> str:
        return str(self.root)

    def base_name(self, tensor: str) -> str:
        """A tensor's name in the base model (``base_model.model.`` removed)."""
        return tensor[len(PREFIX):] if tensor.startswith(PREFIX) else tensor


def is_adapter(spec: Any) -> bool:
    """True when ``spec`` is a local folder holding ``adapter_config.json``."""
    if not isinstance(spec, (str, os.PathLike)) or str(spec).startswith("hf://"):
        return False
    return (Path(str(spec)) / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the value of the first key whose regex matches the end of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(path: str | Path, *, label: str | None = None) -> Adapter:
    """Index a PEFT LoRA adapter folder.

    Raises:
        CheckpointError: no config or weights, a config soup cannot soup exactly, or a rank that
            does not match the stored tensors (naming the module).
    """
    root = Path(str(path))
    cfg_file, weights = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    try:
        config = json.loads(cfg_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_file}: no such file (not a PEFT adapter folder)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: not a valid adapter config ({e})") from None
    if not weights.is_file():
        raise CheckpointError(f"{root}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG} "
                              "(save the adapter with safe_serialization=True)")
    _check_config(config, cfg_file)
    ck = open_checkpoint(weights, label=label or root.name)
    ck.root, ck.source = root, str(root)
    modules, others = _modules(ck, config, cfg_file)
    return Adapter(ck.label, root, config, ck, modules, others)


def _check_config(config: dict[str, Any], where: Path) -> None:
    """Refuse the PEFT variants whose delta is not ``s * B @ A``, naming the field."""
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{where}: peft_type {kind!r}: only LoRA adapters can be souped")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("layer_replication", "layer replication"),
                      ("target_parameters", "LoRA on parameters")):
        if config.get(key):
            raise CheckpointError(f"{where}: {key} is set: {what} adapters are not supported by adapter soups")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"{where}: {key} must be a mapping of pattern -> value")


def _modules(ck: Checkpoint, config: dict[str, Any], where: Path) -> tuple[dict[str, LoraModule], list[str]]:
    """Pair each module's A and B, with peft's rank, alpha and scaling; the other tensors."""
    halves: dict[str, dict[str, str]] = {}
    others = []
    for name in ck.tensors:
        m = _PAIR.match(name)
        if m is None:
            if re.search(r"\.lora_[A-Za-z_]+", name):  # lora_embedding_A, lora_magnitude_vector, lora_B.bias...
                raise CheckpointError(f"{ck.files[0]}: tensor {name}: this kind of LoRA tensor is not supported "
                                      "(adapter soups handle lora_A/lora_B of linear layers)")
            others.append(name)
            continue
        halves.setdefault(m["module"], {})[m["which"]] = name
    rank_p, alpha_p = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    modules = {}
    for key, pair in halves.items():
        module = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise CheckpointError(f"{ck.files[0]}: module {module}: lora_{missing}.weight is missing")
        a, b = ck.tensors[pair["A"]], ck.tensors[pair["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CheckpointError(f"{ck.files[0]}: module {module}: A {list(a.shape)} and B {list(b.shape)} are not "
                                  "matrices (conv LoRA is not supported)")
        if b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{ck.files[0]}: module {module}: A is {list(a.shape)} but B is {list(b.shape)}: "
                                  "their ranks differ")
        rank, alpha = pattern_value(rank_p, module, r0), pattern_value(alpha_p, module, alpha0)
        if rank != a.shape[0]:
            raise CheckpointError(f"{where}: module {module}: the config gives rank {rank} (r / rank_pattern) but "
                                  f"lora_A has {a.shape[0]} rows")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = LoraModule(module, pair["A"], pair["B"], int(rank), float(alpha), float(scale),
                                     (b.shape[0], a.shape[1]))
    if not modules:
        raise CheckpointError(f"{ck.files[0]}: holds no lora_A/lora_B pairs")
    return modules, others


def check_adapters(adapters: list[Adapter]) -> None:
    """Same task type, base model (when named), LoRA modules and shapes, and other tensors in every adapter.

    Raises:
        IncompatibleIngredients: one line naming the module (or field) and the two adapters.
    """
    _check_vocabularies(adapters)
    first = adapters[0]
    for other in adapters[1:]:
        for key in ("task_type", "fan_in_fan_out", "trainable_token_indices"):
            if first.config.get(key) != other.config.get(key):
                raise IncompatibleIngredients(f"{key}: {first.config.get(key)!r} in {first.label} but "
                                              f"{other.config.get(key)!r} in {other.label}")
        b1, b2 = first.config.get("base_model_name_or_path"), other.config.get("base_model_name_or_path")
        if b1 and b2 and b1 != b2 and _real(first.root, b1) != _real(other.root, b2):
            raise IncompatibleIngredients(f"base_model_name_or_path: {b1!r} in {first.label} but {b2!r} in "
                                          f"{other.label}: adapters of different base models cannot be souped")
        for module in [*first.modules, *(m for m in other.modules if m not in first.modules)]:
            m1, m2 = first.modules.get(module), other.modules.get(module)
            if m1 is None or m2 is None:
                has, lacks = (first, other) if m2 is None else (other, first)
                raise IncompatibleIngredients(f"module {module}: has a LoRA in {has.label} but not in {lacks.label} "
                                              "(target modules differ)")
            if m1.shape != m2.shape:
                raise IncompatibleIngredients(f"module {module}: delta shape {list(m1.shape)} in {first.label} but "
                                              f"{list(m2.shape)} in {other.label}")
        for name in [*first.others, *(n for n in other.others if n not in first.others)]:
            t1, t2 = first.checkpoint.tensors.get(name), other.checkpoint.tensors.get(name)
            if t1 is None or t2 is None:
                has, lacks = (first, other) if t2 is None else (other, first)
                raise IncompatibleIngredients(f"tensor {name} (modules_to_save) is in {has.label} but not in "
                                              f"{lacks.label}")
            if t1.shape != t2.shape:
                raise IncompatibleIngredients(f"tensor {name}: shape {list(t1.shape)} in {first.label} but "
                                              f"{list(t2.shape)} in {other.label}")


NOT_BY_TOKEN = ("adapter soups do not match rows by token: merge each adapter into its base model (peft's "
                "merge_and_unload, its tokenizer saved beside it) and soup those models, whose rows soup matches by "
                "token (docs/vocab.md)")


def vocab_tensors(adapter: Adapter) -> dict[str, int | None]:
    """An adapter's tensors with a row per token, and their rows: copies of the input embeddings or output
    head (``modules_to_save``, and what peft adds when it saw them resized: ``original_module``...), LoRA B
    of an output head; trainable-token deltas (rows of the ids in ``trainable_token_indices``) as None."""
    tensors = adapter.checkpoint.tensors
    out: dict[str, int | None] = {m.b: m.shape[0] for m in adapter.modules.values() if vocab_indexed_by_name(m.weight)}
    for n in adapter.others:
        if "trainable_tokens" in n:
            out[n] = None
        elif tensors[n].shape and vocab_indexed_by_name(base_tensor(n)):
            out[n] = tensors[n].shape[0]
    return out


def base_tensor(name: str) -> str:
    """The base model's tensor an adapter tensor stands for: ``base_model.model.lm_head.modules_to_save.weight``
    and ``base_model.model.lm_head.lora_B.weight`` -> ``lm_head.weight``."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return re.sub(r"\.(lora_B|modules_to_save|original_module|base_layer)(?=\.)", "", name)


def first_difference(a: Vocab, b: Vocab) -> tuple[int, str | None, str | None]:
    """The first id whose token differs between two vocabularies: (id, its token in a, in b)."""
    for i in range(max(a.size, b.size)):
        x, y = (a.by_id[i] if i < a.size else None), (b.by_id[i] if i < b.size else None)
        if x != y:
            return i, x, y
    tok = min(a.tokens.keys() ^ b.tokens.keys())  # one id, two strings: the other string
    return a.tokens.get(tok, b.tokens.get(tok)), a.by_id[a.tokens[tok]] if tok in a.tokens else tok, tok


def _check_vocabularies(adapters: list[Adapter]) -> None:
    """Adapters trained on resized embeddings souped by position only when their vocabularies agree:
    rows per token that differ in number, or tokenizers (saved beside the adapters) that differ where
    such tensors exist, are refused in one line naming the adapter and the tensor."""
    first = adapters[0]
    rows0 = vocab_tensors(first)
    for other in adapters[1:]:
        rows = vocab_tensors(other)
        for name in [n for n in rows0 if rows0[n] is not None and rows.get(n) not in (None, rows0[n])][:1]:
            raise IncompatibleIngredients(f"adapter {other.label}: tensor {name} has {rows[name]} rows but "
                                          f"{rows0[name]} in {first.label} (embeddings resized to another "
                                          f"vocabulary): {NOT_BY_TOKEN}")
        if not (rows0 or rows):
            continue
        v0, v1 = read_vocab(first.root), read_vocab(other.root)
        if v0 is not None and v1 is not None and v0.tokens != v1.tokens:
            i, t0, t1 = first_difference(v0, v1)
            raise IncompatibleIngredients(f"adapter {other.label}: tensor {min(rows or rows0)}: its tokenizer is "
                                          f"not {first.label}'s (id {i} is {t1!r} there, {t0!r} in {first.label}): "
                                          f"{NOT_BY_TOKEN}")


def _real(root: Path, base: str) -> str:
    """A base model path as one string: local folders resolved (relative to the adapter), hub ids as given."""
    p = Path(base).expanduser()
    for candidate in (p, root / p):
        if candidate.exists():
            return os.path.realpath(candidate)
    return base
