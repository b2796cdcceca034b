"""The streaming engine: a plan per tensor, memory-mapped reads, the math block by block, and sinks.

- ``rules``, ``plan``: per-tensor rules and the ``Job`` of every output tensor (from headers only);
- ``stream``, ``prefetch``: tensor views over memory-mapped files, read ahead in a bounded window;
- ``combine``, ``kernel``, ``staging``: the exact blockwise weighted mean (C kernel, torch fallback,
  CUDA staging) and merge methods applied block by block (``soup.methods``);
- ``sinks``, ``writer``, ``output``: where blocks go (a state dict, a resident model, sharded
  safetensors in a locked temp folder renamed into place).

Imports: ``soup.io``, ``soup.methods`` and the base modules; never a stage above (``soup.merging``
runs the engine end to end).
"""
