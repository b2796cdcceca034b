"""Perplexity data: parse a data file into records and records into token ids with labels.

Formats (one example per record), as the perplexity evaluator documents them: ``.txt`` (one document
per line, or the whole file cut into windows), ``.jsonl``/``.json`` records ``{"text"}``, ``{"prompt",
"response"}`` (only the response scored) or ``{"messages"}`` (rendered with the tokenizer's chat
template; only the assistant turns scored). Prompt tokens get the label -100.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soup.errors import EvaluatorError

__all__ = ["Record", "load_records", "sequences", "pad_batch"]


# a parsed record: ("text", text) | ("pair", prompt, response) | ("chat", messages)
Record = tuple


def load_records(path: str | Path, *, documents: str = "lines") -> list[Record]:
    """Parse a data file into records (see the module docstring for the formats).

    Args:
        path: a ``.txt``, ``.jsonl`` or ``.json`` file.
        documents: for ``.txt``: ``"lines"`` (one document per non-empty line) or ``"whole"``.

    Returns:
        A list of ``("text", str)``, ``("pair", prompt, response)``, ``("chat", messages)`` or, for
        ``documents="whole"``, one ``("whole", str)``.

    Raises:
        EvaluatorError: the file is missing, unreadable, or a record has none of the known fields.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluatorError(f"perplexity data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluatorError(f"cannot read perplexity data {path}: {e}") from e
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise EvaluatorError(f"{path}: invalid JSON: {e}") from e
            if not isinstance(rows, list):
                raise EvaluatorError(f"{path}: expected a JSON list of records")
            numbered = [(i + 1, row) for i, row in enumerate(rows)]
        else:
            numbered = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        numbered.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise EvaluatorError(f"{path}:{lineno}: invalid JSON: {e}") from e
        return [_record(row, f"{path}:{n}") for n, row in numbered]
    if documents == "whole":
        return [("whole", text)] if text.strip() else []
    return [("text", line) for line in text.splitlines() if line.strip()]


def _record(row: Any, where: str) -> Record:
    if not isinstance(row, Mapping):
        raise EvaluatorError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("messages"), list):
        for m in row["messages"]:
            if not (isinstance(m, Mapping) and "role" in m and "content" in m):
                raise EvaluatorError(f"{where}: each message needs 'role' and 'content'")
        return ("chat", [dict(m) for m in row["messages"]])
    response = row.get("response", row.get("completion"))
    if isinstance(row.get("prompt"), str) and isinstance(response, str):
        return ("pair", row["prompt"], response)
    if isinstance(row.get("text"), str):
        return ("text", row["text"])
    raise EvaluatorError(f"{where}: a record needs 'text', 'prompt'+'response' or 'messages'; "
                         f"got keys {sorted(row)}")


def sequences(records: list[Record], tokenizer: Any, *, max_length: int, max_samples: int | None,
              data: Any) -> list[tuple[list[int], list[int]]]:
    """Each scored sequence's ``(token ids, labels)``, in the records' order: example ``i`` of the
    per-example scores. Sequences with nothing to predict are left out; none at all is an error."""
    seqs: list[tuple[list[int], list[int]]] = []
    for record in records:
        if record[0] == "whole":
            ids = tokenizer(record[1], add_special_tokens=True)["input_ids"]
            seqs += [(ids[i:i + max_length], ids[i:i + max_length]) for i in range(0, len(ids), max_length)]
            if max_samples is not None:
                seqs = seqs[:max_samples]
        else:
            ids, labels = _encode(tokenizer, record)
            seqs.append((ids[:max_length], labels[:max_length]))
    seqs = [s for s in seqs if any(x != -100 for x in s[1][1:])]  # something to predict
    if not seqs:
        raise EvaluatorError(f"perplexity: no token to score in {data} "
                             f"(responses empty or truncated away by max_length={max_length})")
    return seqs


def pad_batch(group: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    """``(input_ids, attention, labels)`` of sequences, right-padded to the longest (CPU tensors)."""
    import torch

    width = max(len(ids) for ids, _ in group)
    input_ids = torch.full((len(group), width), pad, dtype=torch.long)
    attention = torch.zeros((len(group), width), dtype=torch.long)
    labels = torch.full((len(group), width), -100, dtype=torch.long)
    for row, (ids, lab) in enumerate(group):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, :len(lab)] = torch.tensor(lab)
    return input_ids, attention, labels


def _encode(tokenizer: Any, record: Record) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not scored) of one record."""
    kind = record[0]
    if kind == "text":
        ids = tokenizer(record[1], add_special_tokens=True)["input_ids"]
        return ids, list(ids)
    if kind == "pair":
        text, spans, special = record[1] + record[2], [(len(record[1]), len(record[1] + record[2]))], True
    else:
        text, spans = _render_chat(tokenizer, record[1])
        special = False  # chat templates write their own special tokens
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels, prev = [], False
    for tok_id, (s, e) in zip(ids, enc["offset_mapping"]):
        # a zero-width (added special) token goes with the token before it
        scored = prev if s == e else any(s < b and e > a for a, b in spans)
        labels.append(tok_id if scored else -100)
        prev = scored
    return ids, labels


def _render_chat(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvaluatorError("perplexity: 'messages' data needs a tokenizer with a chat template")

    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    try:
        full = render(messages)
        spans, consistent = [], True
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = render(messages[:i], True), render(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                consistent = False
                break
            spans.append((len(before), len(upto)))
        if not consistent:  # e.g. templates that rewrite earlier turns: score the last turn only
            spans = []
            if messages[-1]["role"] == "assistant":
                before = render(messages[:-1], True)
                if full.startswith(before):
                    spans = [(len(before), len(full))]
            if not spans:
                raise EvaluatorError("perplexity: the chat template does not render the conversation "
                                     "as a prefix of itself; cannot find the assistant tokens")
    except EvaluatorError:
        raise
    except Exception as e:
        raise EvaluatorError(f"perplexity: the chat template failed: {type(e).__name__}: {e}") from e
    return full, spans
