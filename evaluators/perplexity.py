"""Perplexity evaluator: token-weighted cross-entropy of a causal LM on a text or chat data set.

One model stays resident for the whole run: the first ``score`` builds the architecture from a
config (no weights read from disk), and every call, the first included, computes the candidate's
weights straight into it (``candidate.load_into(model)``: block by block, no second copy of the
weights). Later candidates cost no model construction and no disk.

Data (``data=``), one example per record:

- ``.txt``: one document per non-empty line (``documents="lines"``), or the whole file as one text
  cut into windows of ``max_length`` tokens (``documents="whole"``). Every token is scored.
- ``.jsonl`` (or ``.json`` holding a list), each record one of:
  ``{"text": ...}``: every token is scored;
  ``{"prompt": ..., "response": ...}`` (or ``"completion"``): the text is ``prompt + response``
  exactly as given (add any separator or template yourself) and only response tokens are scored;
  ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template, and only the assistant turns (with their end-of-turn markers) are scored.

Prompt tokens get the label -100. The loss is ``sum of token losses / number of scored tokens`` over
the whole data set (not a mean of batch means); ``perplexity = exp(loss)``.

Per-example scores (racing, docs/racing.md): example ``i`` is the ``i``-th sequence scored, its score the
mean loss of its scored tokens (lower is better). Their number is known before any candidate when
``model`` or ``tokenizer`` is given; else only once a first candidate is scored, too late for a
strategy to race, so give ``model`` to race. The perplexity is not their mean, so a race that uses
every example is decided on ``score``.

Example::

    ev = PerplexityEvaluator(data="val.jsonl", model="base-model/", max_length=512)
    ev.score(candidate)  # {"loss": 2.31, "perplexity": 10.07, "tokens": 18211.0}
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError
from soup.soups.evaluate import Candidate, Evaluator

from soup.evaluators.perplexity_data import load_records, pad_batch, sequences
from soup.evaluators.resident import DTYPES, build_model, release, resolve_device, resolve_dtype

__all__ = ["PerplexityEvaluator", "load_records"]
class PerplexityEvaluator(Evaluator):
    """Perplexity of each candidate on ``data`` (exp of the mean token cross-entropy); lower is better.

    Args:
        data: the data file (``.txt``, ``.jsonl``, ``.json``; see the module docstring).
        model: a folder with ``config.json`` (and tokenizer files) to build the resident model from;
            default: the first candidate's folder (``candidate.path()``, written once).
        tokenizer: a folder to load the tokenizer from; default: the same folder as the config.
        max_length: longest sequence in tokens; longer documents are truncated (``"whole"``: the
            window size).
        batch_size: sequences per forward pass.
        max_samples: score only the first N records (``"whole"``: the first N windows).
        device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (float32 on cpu; the config's dtype, else bfloat16, on cuda),
            ``"float32"``, ``"bfloat16"``, ``"float16"``.
        documents: for ``.txt`` data: ``"lines"`` or ``"whole"``.
        auto_class: the ``transformers`` auto class that builds the model.
        strict: refuse checkpoint tensors the model does not have (missing weights are always
            refused, except ones tied to a loaded weight, such as a tied ``lm_head``).
        trust_remote_code: passed to ``transformers``.
        primary: the score used for selection and reported as the soup's: ``"perplexity"`` (default;
            the evaluator is named after it) or ``"loss"`` (the mean token loss; same ranking).

    Returns (from ``score``): ``{"loss", "perplexity", "tokens"}``.

    Raises:
        EvaluatorError: bad arguments, an unreadable data file, a checkpoint whose tensors do not
            match the model, or no token to score.
    """

    name = "perplexity"
    version = "1"
    direction = "minimize"
    primary = "perplexity"

    def __init__(self, *, data: str | Path, model: str | Path | None = None,
                 tokenizer: str | Path | None = None, max_length: int = 1024, batch_size: int = 8,
                 max_samples: int | None = None, device: str = "auto", dtype: str = "auto",
                 documents: str = "lines", auto_class: str = "AutoModelForCausalLM",
                 strict: bool = True, trust_remote_code: bool = False,
                 primary: str = "perplexity") -> None:
        super().__init__(data=str(data), model=None if model is None else str(model),
                         tokenizer=None if tokenizer is None else str(tokenizer),
                         max_length=max_length, batch_size=batch_size, max_samples=max_samples,
                         device=device, dtype=dtype, documents=documents, auto_class=auto_class,
                         strict=strict, trust_remote_code=trust_remote_code, primary=primary)
        self.validate(data=data, max_length=max_length, batch_size=batch_size, max_samples=max_samples,
                      documents=documents, dtype=dtype, primary=primary)
        self._records = load_records(data, documents=documents)
        if documents == "lines" and max_samples is not None:
            self._records = self._records[:max_samples]
        if not self._records:
            raise EvaluatorError(f"perplexity: no records in {data}")
        self._data_sha256 = hashlib.sha256(Path(data).read_bytes()).hexdigest()
        self._model: Any = None  # the resident model
        self._tokenizer: Any = None
        self._device: str | None = None

    @classmethod
    def validate(cls, *, data: str | Path, max_length: int = 1024, batch_size: int = 8,
                 max_samples: int | None = None, documents: str = "lines", dtype: str = "auto",
                 primary: str = "perplexity", **_: Any) -> None:
        """The argument values and the data file's presence, checked before any work (see ``Evaluator``)."""
        if primary not in ("loss", "perplexity"):
            raise EvaluatorError(f"perplexity: primary must be 'loss' or 'perplexity', got {primary!r}")
        if not (isinstance(max_length, int) and max_length >= 2):
            raise EvaluatorError(f"perplexity: max_length must be an integer >= 2, got {max_length!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise EvaluatorError(f"perplexity: batch_size must be an integer >= 1, got {batch_size!r}")
        if max_samples is not None and not (isinstance(max_samples, int) and max_samples >= 1):
            raise EvaluatorError(f"perplexity: max_samples must be a positive integer, got {max_samples!r}")
        if documents not in ("lines", "whole"):
            raise EvaluatorError(f"perplexity: documents must be 'lines' or 'whole', got {documents!r}")
        if dtype != "auto" and dtype not in DTYPES:
            raise EvaluatorError(f"perplexity: unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
        if not Path(data).is_file():
            raise EvaluatorError(f"perplexity data file not found: {data}")

    # --- public ---------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The resident ``transformers`` model (None before the first ``score`` and after ``close``)."""
        return self._model

    def identity(self) -> dict[str, Any]:
        """Name, version and arguments, plus the data file's sha256 (a changed file is a new key)."""
        ident = super().identity()
        ident["data_sha256"] = self._data_sha256
        return ident

    def score(self, candidate: Candidate) -> dict[str, float]:
        """Load ``candidate``'s weights into the resident model and score the data.

        Args:
            candidate: the weights to score; its ``state_dict(device)`` is read once.

        Returns:
            ``{"loss": mean token loss, "perplexity": exp(loss), "tokens": scored token count}``.

        Raises:
            EvaluatorError: see the class docstring.
        """
        if self._model is None:
            self._build(candidate)
        seqs = self._seqs
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # longest first: little padding
        values = dict(zip(order, self.score_examples(candidate, order)))
        return self.aggregate([values[i] for i in range(len(seqs))])

    def aggregate(self, values: Sequence[float]) -> dict[str, float]:
        """The score from every sequence's mean token loss: the token-weighted mean loss (``score``
        computes it this way too, so a race that used every sequence needs no second pass)."""
        tokens = [sum(1 for x in labels[1:] if x != -100) for _, labels in self._seqs]
        n_tokens = sum(tokens)
        loss_mean = math.fsum(v * t for v, t in zip(values, tokens)) / n_tokens
        ppl = math.exp(loss_mean) if loss_mean < 700 else math.inf
        return {"loss": loss_mean, "perplexity": ppl, "tokens": float(n_tokens)}

    def examples(self) -> int | None:
        """How many sequences are scored (per-example scores). Known before any candidate when ``model``
        or ``tokenizer`` names the tokenizer's folder (the data is tokenized then, no model built);
        else None until the first ``score`` (the tokenizer comes from the first candidate's folder)."""
        seqs = getattr(self, "_seqs", None)
        if seqs is None and self._model is None and (self.args["tokenizer"] or self.args["model"]):
            import transformers

            folder = self.args["tokenizer"] or self.args["model"]
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    folder, trust_remote_code=self.args["trust_remote_code"])
            except Exception as e:
                raise EvaluatorError(f"perplexity: cannot load the tokenizer from {folder}: "
                                     f"{type(e).__name__}: {e}") from e
            seqs = self._seqs = self._sequences(tokenizer)
        return len(seqs) if seqs else None

    def score_examples(self, candidate: Candidate, indices: Sequence[int]) -> list[float]:
        """The mean token loss of each sequence in ``indices`` (see the module docstring)."""
        import torch

        if self._model is None:
            self._build(candidate)
        key = candidate.key
        if getattr(self, "_loaded_key", None) != key or key.startswith("memory:"):
            self._load_weights(candidate)
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(indices), self.args["batch_size"]):
                group = [self._seqs[i] for i in indices[start:start + self.args["batch_size"]]]
                input_ids, attention, labels = (t.to(self._device) for t in pad_batch(group, self._pad_id))
                logits = self._model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
                targets = labels[:, 1:]  # (b, t-1)
                scored = targets != -100
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                                                         targets.clamp(min=0), reduction="none")  # (b, t-1)
                sums = (loss * scored).double().sum(1)
                out += (sums / scored.sum(1).clamp(min=1)).tolist()
        return out

    def close(self) -> None:
        """Free the resident model, its batches and, on cuda, the cached GPU memory."""
        device, self._model, self._tokenizer = self._device, None, None
        self._loaded_key = None
        release(device)

    # --- building -------------------------------------------------------------------------------

    def _build(self, candidate: Candidate) -> None:
        """Build the tokenizer, the batches and the resident model (weights left uninitialised)."""
        import transformers

        a = self.args
        folder = Path(a["model"]) if a["model"] else candidate.path()
        tok_folder = Path(a["tokenizer"]) if a["tokenizer"] else folder
        device = resolve_device(a["device"])
        try:
            config = transformers.AutoConfig.from_pretrained(
                folder, trust_remote_code=a["trust_remote_code"])
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                tok_folder, trust_remote_code=a["trust_remote_code"])
        except Exception as e:
            raise EvaluatorError(f"perplexity: cannot load config/tokenizer from {folder}: "
                                 f"{type(e).__name__}: {e}") from e
        if not getattr(tokenizer, "is_fast", False):
            raise EvaluatorError(f"perplexity: the tokenizer in {tok_folder} is not a fast "
                                 f"tokenizer; character offsets are needed to mask prompts")
        dtype = resolve_dtype(a["dtype"], config, device)
        self._tokenizer = tokenizer
        self._seqs = self._sequences(tokenizer)  # per-example scores: example i is seqs[i]
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        auto = getattr(transformers, a["auto_class"], None)
        if auto is None or not hasattr(auto, "from_config"):
            raise EvaluatorError(f"perplexity: transformers has no auto class {a['auto_class']!r}")
        model = build_model(auto, config, dtype=dtype, device=device, trust_remote_code=a["trust_remote_code"],
                            who=f"perplexity ({a['auto_class']})", where=f"{folder}/config.json")
        self._model, self._device = model, device

    def _sequences(self, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
        a = self.args
        return sequences(self._records, tokenizer, max_length=a["max_length"], max_samples=a["max_samples"],
                         data=a["data"])

    # --- weights --------------------------------------------------------------------------------

    def _load_weights(self, candidate: Candidate) -> None:
        """Compute ``candidate`` straight into the resident model's tensors (no second copy of the
        weights); a missing weight or a shape that differs is an error naming the tensor."""
        from soup.errors import IncompatibleIngredients

        self._loaded_key = None  # a failed load leaves the model half-written
        try:
            candidate.load_into(self._model, strict=self.args["strict"])
        except IncompatibleIngredients as e:
            raise EvaluatorError(f"perplexity: {candidate.name} does not fit the model: {e}") from e
        self._loaded_key = candidate.key  # per-example batches of one candidate load it once
