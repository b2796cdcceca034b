"""The README's Python example runs as written (on tiny checkpoints made here)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from conftest import make_state, write_checkpoint

README = Path(__file__).parent.parent / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch):
    block = re.search(r"### Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    for i, name in enumerate(["ft-a", "ft-b", "ft-c"]):
        write_checkpoint(tmp_path / "runs" / name, make_state(i))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOUP_CACHE", str(tmp_path / "scores.sqlite"))
    model_a, model_b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    scope = {"model_a": model_a, "model_b": model_b}
    exec(compile(block, str(README), "exec"), scope)
    assert (tmp_path / "runs" / "soup" / "soup.json").exists() and (tmp_path / "runs" / "avg" / "soup.json").exists()
    assert sum(scope["result"].weights.values()) == 1.0
    want = (model_a.weight.float() * 0.5 + model_b.weight.float() * 0.5)
    assert torch.equal(scope["state"]["weight"], want)
