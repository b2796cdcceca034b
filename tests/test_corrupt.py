"""Bad inputs through the CLI: exit 1, one line naming the file/tensor, no output folder left behind."""

from __future__ import annotations

import json
import struct

import pytest
from typer.testing import CliRunner

import soup
from soup.cli import app

from conftest import make_state, write_checkpoint

runner = CliRunner()


def _merge(tmp_path, *paths):
    res = runner.invoke(app, ["merge", *map(str, paths), "-o", str(tmp_path / "out"), "-q"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") or p.name == "out"]
    return res, leftovers


def _one_error_line(res):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    a = write_checkpoint(tmp_path / "a", make_state(1))
    b = write_checkpoint(tmp_path / "b", make_state(2), shards=2)
    return a, b


def test_truncated_file(tmp_path, pair):
    a, b = pair
    f = a / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    res, left = _merge(tmp_path, a, b)
    line = _one_error_line(res)
    assert res.exit_code == 1 and str(f) in line and "truncated" in line and not left


def test_truncated_header(tmp_path, pair):
    a, b = pair
    f = a / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    res, left = _merge(tmp_path, a, b)
    assert res.exit_code == 1 and str(f) in _one_error_line(res) and not left


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_header_offsets_do_not_match_file(tmp_path, pair):
    a, b = pair
    f = a / "model.safetensors"

    def shift(h):
        s, e = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [s + 2, e + 2]

    _rewrite_header(f, shift)
    res, left = _merge(tmp_path, a, b)
    line = _one_error_line(res)
    assert res.exit_code == 1 and str(f) in line and "model.norm.weight" in line and not left


def test_unknown_dtype(tmp_path, pair):
    a, b = pair
    f = a / "model.safetensors"
    _rewrite_header(f, lambda h: h["model.norm.weight"].update(dtype="Q7"))
    res, left = _merge(tmp_path, a, b)
    line = _one_error_line(res)
    assert res.exit_code == 1 and "model.norm.weight" in line and "unknown dtype 'Q7'" in line and not left


def test_index_names_missing_file(tmp_path, pair):
    a, b = pair
    (b / "model-00002-of-00002.safetensors").unlink()
    res, left = _merge(tmp_path, a, b)
    line = _one_error_line(res)
    assert res.exit_code == 1 and "model.safetensors.index.json" in line
    assert "model-00002-of-00002.safetensors" in line and not left


def test_index_names_missing_tensor(tmp_path, pair):
    a, b = pair
    idx = b / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.ghost"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    res, left = _merge(tmp_path, a, b)
    line = _one_error_line(res)
    assert res.exit_code == 1 and "model.ghost" in line and "model-00001-of-00002.safetensors" in line and not left


def test_non_finite_value(tmp_path, pair):
    a, _ = pair
    st = make_state(3)
    st["model.layers.0.mlp.up_proj.weight"][5, 3] = float("nan")
    c = write_checkpoint(tmp_path / "c", st)
    res, left = _merge(tmp_path, a, c)
    line = _one_error_line(res)
    assert res.exit_code == 1 and str(c / "model.safetensors") in line
    assert "model.layers.0.mlp.up_proj.weight" in line and "non-finite" in line and not left


def test_corrupt_bin(tmp_path):
    a = write_checkpoint(tmp_path / "a", make_state(1), fmt="bin")
    b = write_checkpoint(tmp_path / "b", make_state(2), fmt="bin")
    f = b / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    res, left = _merge(tmp_path, a, b)
    assert res.exit_code == 1 and str(f) in _one_error_line(res) and not left


def test_missing_path_and_empty_folder(tmp_path, pair):
    a, _ = pair
    (tmp_path / "empty").mkdir()
    res, left = _merge(tmp_path, a, tmp_path / "empty")
    assert res.exit_code == 1 and "no weights found" in _one_error_line(res) and not left
    res, left = _merge(tmp_path, a, tmp_path / "nope")
    assert res.exit_code == 1 and "nope: no such file" in _one_error_line(res)


def test_usage_errors_exit_2(tmp_path, pair):
    a, b = pair
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--weights", "x,y"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["merge", str(a)])
    assert res.exit_code == 2


def test_interrupted_write_leaves_nothing(tmp_path, pair, monkeypatch):
    a, b = pair
    out = tmp_path / "out"

    def boom(path, sha256):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        soup.merge([a, b], out, shard_size=500, on_shard=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # an existing destination survives a failed overwrite untouched
    soup.merge([a, b], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        soup.merge([a, b], out, overwrite=True, shard_size=500, on_shard=boom)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_cli_merge_and_inspect_output(tmp_path, pair):
    a, b = pair
    res = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--weights", "1,3",
                              "--rule", "model.vision_tower.*=take:1", "--dtype", "float32", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(str(tmp_path / "out"))
    m = json.loads((tmp_path / "out" / "soup.json").read_text())
    assert [i["weight"] for i in m["ingredients"]] == [0.25, 0.75] and m["dtype"] == "float32"
    got = soup.inspect(tmp_path / "out")
    assert got["dtypes"] == {"float32": 8, "int64": 1, "bool": 1}
    res = runner.invoke(app, ["inspect", str(a), str(tmp_path / "out")])
    assert res.exit_code == 1 and "compatible: no (8 tensor(s) differ)" in res.stdout
    res = runner.invoke(app, ["inspect", str(a), str(b), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["compatible"] is True
