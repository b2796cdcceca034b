"""The resident model shared by in-process evaluators (perplexity, lm-eval): built once from a config
with no weights read and no random initialisation, on one device, in one dtype; every candidate is
then computed straight into it with ``candidate.load_into(model)``."""

from __future__ import annotations

import contextlib
from typing import Any

from soup.errors import EvaluatorError

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "build_model", "release"]

# user-facing dtype names -> torch attribute names
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16"}


def resolve_device(device: str) -> str:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, config: Any, device: str) -> Any:
    """The resident model's torch dtype: as asked, float32 on the CPU, else the config's (bf16 default)."""
    import torch

    if dtype != "auto":
        return getattr(torch, DTYPES[dtype])
    if device.startswith("cpu"):
        return torch.float32
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    cfg = str(cfg).removeprefix("torch.") if cfg is not None else None
    return getattr(torch, cfg if cfg in ("float32", "bfloat16", "float16") else "bfloat16")


def build_model(auto: Any, config: Any, *, dtype: Any, device: str, trust_remote_code: bool, who: str,
                where: str) -> Any:
    """``auto.from_config`` on ``device`` without initialising weights; ties weights again; eval mode.

    ``who`` names the evaluator and ``where`` the config in a one-line EvaluatorError."""
    import torch
    import transformers

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        with _no_init_weights(), torch.device(device):
            model = auto.from_config(config, trust_remote_code=trust_remote_code, **{dtype_kw: dtype})
    except Exception as e:
        raise EvaluatorError(f"{who}: cannot build a model from {where}: {type(e).__name__}: {e}") from e
    if hasattr(model, "tie_weights"):  # skipped with the initialisation: tie lm_head again
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def release(device: str | None) -> None:
    """Return a freed model's cached GPU memory to the driver (nothing to do on the CPU)."""
    if device is not None and device.startswith("cuda"):
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()


def _no_init_weights() -> contextlib.AbstractContextManager:
    """Skip random initialisation (every weight is overwritten anyway), where transformers can."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
