"""mergekit configuration files, run as they are: ``soup run mergekit.yml -o OUT``.

A mergekit config (recognised by its ``merge_method`` key) becomes the soup recipe that makes the
same merge: ``models`` are the ingredients (a model that is also the ``base_model`` is the base, not
an ingredient, for methods on task vectors; for methods without a base, such as linear, it stays a
model, as in mergekit), each model's ``parameters`` its per-model method parameters, the top-level
``parameters`` the method's global ones, ``out_dtype`` (else ``dtype``) the output dtype, and
``tokenizer_source`` the model whose tokenizer and config are copied (default: the base model, as
in mergekit). Model names that are not
local folders are hub repos (``hf://owner/name``, ``owner/name@revision`` pinned as given).

``tokenizer_source: union`` is soup's ``vocab: union`` (every model's tokens; rows souped by token
string, the first model's ids kept, so added tokens may get other ids than mergekit gives them), ``base``
keeps the base model's vocabulary (``vocab: base``; with the base among the models, as for linear, that
model's: ``vocab: N``), and a model's name keeps that model's vocabulary (``vocab: N``). What soup does
not do is refused in one line naming the key: ``slices`` (layer ranges: a change of architecture),
``passthrough``, the ``tokenizer:`` section, and any key mergekit does not define. mergekit's ``dtype`` is its compute dtype;
soup computes in float32 (float64 for float32 inputs) whatever it says, so results agree within one
rounding of the output dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soup.errors import RecipeError
from soup.methods.registry import load_method

__all__ = ["is_mergekit_config", "from_mergekit"]

_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
         "slices", "tokenizer", "chat_template", "name", "modules"}
_UNSUPPORTED = {
    "slices": "slices (layer ranges from several models) change the architecture; soup merges models of one "
              "architecture: list the models under models:",
    "modules": "modules: per-module configurations are not supported; use parameters with filters",
    "tokenizer": "tokenizer: merged vocabularies are not supported yet; use tokenizer_source: base or a model",
}
_DTYPES = {"bfloat16", "float16", "float32", "float64", "bf16", "fp16", "fp32", "fp64"}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, Mapping) and "merge_method" in data


def from_mergekit(data: Mapping[str, Any], *, base: Path) -> dict[str, Any]:
    """The soup recipe (a mapping for ``soup.recipe.parse_recipe``) of a mergekit config.

    Raises:
        RecipeError: a key soup does not support or mergekit does not define, a bad models list.
    """
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise RecipeError(f"mergekit config: unknown key(s) {', '.join(unknown)} (mergekit's keys: "
                          f"{', '.join(sorted(_KEYS))})")
    for key, why in _UNSUPPORTED.items():
        if data.get(key) is not None:
            raise RecipeError(f"mergekit config: {why}")
    if data.get("chat_template") not in (None, "auto"):
        raise RecipeError("mergekit config: chat_template: only auto (the tokenizer source's own) is supported")
    method = data["merge_method"]
    if method == "passthrough":
        raise RecipeError("mergekit config: merge_method passthrough changes the architecture; soup does not "
                          "implement it")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError("mergekit config: models: a non-empty list of {model: NAME, parameters: {...}}")
    base_name = _model_name(data.get("base_model"), "base_model") if data.get("base_model") is not None else None
    needs_base = load_method(method).needs_base
    base_listed = False
    ingredients, per_model, names = [], [], []
    for k, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise RecipeError(f"mergekit config: models[{k}]: expected {{model: NAME, parameters: {{...}}}}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"mergekit config: models[{k}]: unknown key(s) {', '.join(extra)}")
        name = _model_name(entry["model"], f"models[{k}].model")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise RecipeError(f"mergekit config: models[{k}].parameters: expected a mapping")
        if name == base_name and needs_base:
            continue  # the base model listed among the models: it is the base, not an ingredient
        if name == base_name:
            base_listed = True  # a method without a base (linear, karcher...): mergekit averages it as a model
        ingredients.append(_source(name, base))
        names.append(name)
        per_model.append(dict(params))
    if not ingredients:
        raise RecipeError("mergekit config: models: no model besides the base_model")
    global_params = data.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise RecipeError("mergekit config: parameters: expected a mapping")
    chosen: dict[str, Any] = {"name": method, **global_params}
    if any(per_model):
        chosen["models"] = per_model
    if base_name is not None and not base_listed:  # listed: an ingredient already, never counted twice
        chosen["base"] = _source(base_name, base)
    recipe: dict[str, Any] = {"ingredients": ingredients, "strategy": "average", "method": chosen}
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype is not None:
        if out_dtype not in _DTYPES:
            raise RecipeError(f"mergekit config: out_dtype: {out_dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
        recipe["dtype"] = out_dtype
    if data.get("dtype") in ("float32", "fp32", "float64", "fp64"):
        recipe["accumulate"] = "float64" if data["dtype"] in ("float64", "fp64") else "auto"
    source = data.get("tokenizer_source")
    if source is None and base_name is not None and "base" in chosen:
        recipe["config_from"] = recipe["vocab"] = "base"  # mergekit's default: the base model's tokenizer
    elif source is not None:
        if source == "union":  # every model's tokens, rows souped by token string (soup.io.vocab)
            recipe["vocab"] = "union"
            return recipe
        if source == "base" and base_listed:
            source = base_name  # the base is an ingredient here
        if source == "base":
            if base_name is None:
                raise RecipeError("mergekit config: tokenizer_source: base, but there is no base_model")
            recipe["config_from"] = recipe["vocab"] = "base"  # the base's tokens only, as in mergekit
            return recipe
        if source not in names:
            raise RecipeError(f"mergekit config: tokenizer_source: {source!r} is none of the models")
        recipe["config_from"] = names.index(source)
        recipe["vocab"] = names.index(source)  # that model's vocabulary, when the models' differ
    return recipe


def _model_name(value: Any, where: str) -> str:
    if isinstance(value, Mapping):  # mergekit's long form {model: {path: ...}} or {model: NAME, lora: ...}
        if set(value) - {"model", "path"}:
            raise RecipeError(f"mergekit config: {where}: LoRA-on-model references are not supported "
                              f"({', '.join(sorted(value))})")
        value = value.get("path") or value.get("model")
    if not isinstance(value, str) or not value:
        raise RecipeError(f"mergekit config: {where}: expected a model path or hub id, got {value!r}")
    return value


def _source(name: str, base: Path) -> str:
    """A local folder (relative to the config) when it exists, else a hub repo (``hf://owner/name``)."""
    local = Path(name).expanduser()
    local = local if local.is_absolute() else base / local
    if local.exists() or name.startswith((".", "/", "~")):
        return str(local)
    return name if name.startswith("hf://") else f"hf://{name}"
