"""Reading: what the user names -> pinned, header-indexed checkpoints, and what soup writes about them.

- ``ingredients``: folders, weight files, ``hf://`` repos at pinned revisions -> ``Checkpoint``s;
- ``checkpoint``: safetensors / ``.bin`` / ``.pt`` headers, memory-mapped tensors, content fingerprints;
- ``modelfiles``: the non-weight files a checkpoint needs (config, tokenizer, remote code);
- ``components``: tensors grouped into vision towers, connectors, language model... by name;
- ``manifest``: ``soup.json``, its one owner (typed shape, ``read``/``write``);
- ``inspection``: ``soup inspect``.

Imports: the base modules (errors, options, progress, signals) and ``soup.hub``'s download side only.
"""
