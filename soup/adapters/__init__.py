"""Low-rank adapters: PEFT adapters and LoRA pairs inside full checkpoints, souped as their deltas B·A.

- ``peft_io``: PEFT adapter folders read and checked; ``lora``: the low-rank math (concatenation,
  truncated SVD with measured errors); ``pairs``: LoRA pairs in full checkpoints (``Plora_A/B``);
- ``merging``: ``adapter_soup()``; ``candidates``: adapter candidates for strategies (one resident
  peft model, loaded in place).

Imports: the engine, ``soup.io``; ``candidates`` uses ``soup.soups`` (the scorer contract).
"""
