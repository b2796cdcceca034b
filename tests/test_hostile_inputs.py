"""Hostile or broken inputs stay inert, and cosmetic steps never cost the soup (issue 25).

Safetensors headers are checked as strictly as the safetensors library checks them (the tests write each
file byte by byte and ask the library too); recipes are parsed with limits (alias expansion, depth,
size); text from files is printed with control characters escaped; FIFOs and device files are refused
without being read; a plot or card that cannot be drawn costs a warning line, never the soup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest
import yaml
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import soup
from conftest import make_state, write_checkpoint
from soup.cli import app
from soup.errors import CheckpointError
from soup.io.checkpoint import open_checkpoint

runner = CliRunner()


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_error_line(res, *needles: str) -> str:
    """The single stderr line of a command that failed with exit 1, checked to contain every needle."""
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- 1. safetensors headers, byte by byte --------------------------------------------------------------


def raw_safetensors(path: Path, header: dict | str, data: bytes = b"") -> Path:
    """An 8-byte little-endian header length, the JSON header, the data: written by hand."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


F16 = b"\0" * 16  # room for four float32
BAD_HEADERS = {
    # the probe's cases: types, not only values
    "float shape": ({"w": entry([16.5], [0, 16])}, F16),
    "whole float shape": ({"w": entry([4.0], [0, 16])}, F16),
    "string shape": ({"w": entry(["16"], [0, 16])}, F16),
    "string shape matching the size": ({"w": entry(["4"], [0, 16])}, F16),
    "boolean dimension": ({"w": entry([True], [0, 4])}, b"\0" * 4),
    "float data_offsets": ({"w": entry([4], [0.0, 16.0])}, F16),
    "exponent data_offsets": ('{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1.6e1]}}', F16),
    "string data_offsets": ({"w": entry([4], ["0", "16"])}, F16),
    "NaN dimension": ('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', F16),
    "null shape": ({"w": entry(None, [0, 16])}, F16),
    "three data_offsets": ({"w": entry([4], [0, 16, 16])}, F16),
    "dtype not a string": ({"w": entry([4], [0, 16], dtype=3)}, F16),
    "entry not an object": ({"w": [1, 2]}, F16),
    "metadata value not a string": ({"__metadata__": {"step": 5}, "w": entry([4], [0, 16])}, F16),
    "metadata not an object": ({"__metadata__": ["pt"], "w": entry([4], [0, 16])}, F16),
    # values
    "negative offset": ({"w": entry([4], [-4, 12])}, F16),
    "negative dimension": ({"w": entry([-4], [0, 16])}, F16),
    "offsets not matching shape x dtype": ({"w": entry([4], [0, 12])}, F16),
    "overlapping ranges": ({"a": entry([4], [0, 16]), "w": entry([4], [0, 16])}, F16),
    "gap between ranges": ({"a": entry([2], [0, 8]), "w": entry([1], [12, 16])}, F16),
    "range past the end of the file": ({"w": entry([8], [0, 32])}, F16),
    "offset past 2**64": ({"w": entry([4], [2**70, 2**70 + 16])}, F16),
    "bytes after the last tensor": ({"w": entry([2], [0, 8])}, F16),
    "overflowing shape": ({"w": entry([2**40, 2**40, 2**40], [0, 16])}, F16),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_a_bad_safetensors_header_is_refused_like_the_library_does(tmp_path, case):
    header, data = BAD_HEADERS[case]
    file = raw_safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(SafetensorError):  # the peer's own parsing refuses the same bytes
        with safe_open(str(file), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(file)
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"{file}: "), line
    if "metadata" not in case:
        assert "tensor w" in line, line  # the tensor at fault is named


def test_a_float_shape_is_refused_in_one_line_by_the_cli(tmp_path):
    file = raw_safetensors(tmp_path / "x.safetensors", {"w": entry([16.5], [0, 64])}, b"\0" * 64)
    res = runner.invoke(app, ["inspect", str(file)])
    one_error_line(res, str(file), "tensor w", "shape")


def test_headers_the_library_accepts_are_still_read(tmp_path):
    """Valid corner cases: a scalar, an empty tensor, metadata, null metadata, padding spaces, any key order."""
    file = raw_safetensors(tmp_path / "ok.safetensors",
                           '{"__metadata__": null, "s": {"shape": [], "data_offsets": [0, 4], "dtype": "F32"},'
                           ' "e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [4, 4]},'
                           ' "w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [4, 12]}}    ', b"\0" * 12)
    with safe_open(str(file), "pt") as f:
        assert sorted(f.keys()) == ["e", "s", "w"]
    ck = open_checkpoint(file)
    assert {n: t.shape for n, t in ck.tensors.items()} == {"s": (), "e": (0, 3), "w": (2, 2)}
    meta = raw_safetensors(tmp_path / "meta.safetensors", {"__metadata__": {"format": "pt"}, "w": entry([4], [0, 16])}, F16)
    assert open_checkpoint(meta).tensors["w"].shape == (4,)


# ---- 2. recipes parsed with limits ---------------------------------------------------------------------


def alias_bomb(indent: str) -> str:
    """The classic: nine levels of nine aliases, 9**9 strings once expanded, in 9 lines."""
    lines = [f'{indent}a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{indent}{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def two(tmp_path):
    for i in range(2):
        write_checkpoint(tmp_path / f"ing{i}", make_state(i, big=240))
    (tmp_path / "ev.py").write_text("def score(c, **kw):\n    return 1.0\n")
    return tmp_path


RECIPE = "ingredients: [ing0, ing1]\nstrategy: average\noutput: out\ncache: false\n"
HOSTILE_RECIPES = {
    # passes validation today, then `soup run` expands it while building the evaluator (GBs, minutes)
    "alias bomb": (RECIPE + "evaluator:\n  name: python\n  args:\n    fn: ./ev.py:score\n    kwargs:\n"
                   + alias_bomb("      "), "alias"),
    "alias bomb at the top": (alias_bomb("") + RECIPE, "alias"),
    "nested lists": (RECIPE.replace("[ing0, ing1]", "[ing0, ing1, " + "[" * 10000 + "]" * 10000 + "]"), "deep"),
    "nested mappings": (RECIPE + "evaluator: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "deep"),
    "recursive alias": (RECIPE + "rules: &r [*r]\n", "recursive"),
    "huge file": (RECIPE + "# " + "x" * 2_000_000 + "\n", "too large"),
    "huge integer": (RECIPE + "shard_size: " + "9" * 100_000 + "\n", "digits"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(HOSTILE_RECIPES))
def test_a_hostile_recipe_is_refused_in_one_line_quickly(two, case, command):
    text, needle = HOSTILE_RECIPES[case]
    recipe = two / "r.yaml"
    recipe.write_text(text)
    t0 = time.monotonic()
    with within(20):
        res = runner.invoke(app, [command, str(recipe)])
    one_error_line(res, str(recipe), needle)
    assert time.monotonic() - t0 < 10 and not (two / "out").exists()


def test_anchors_and_merge_keys_within_the_limits_still_work(two):
    recipe = two / "r.yaml"
    recipe.write_text("ingredients: [&a ing0, *a, {<<: &m {path: ing1}, name: other}]\nstrategy: average\noutput: out\n"
                      "evaluator: {name: python, args: {fn: ./ev.py:score, kwargs: {x: *m}}}\n")
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output


# ---- 3. text from files printed inert ------------------------------------------------------------------

ESCAPES = ("\x1b]0;pwned\x07", "\x1b[2J", "\x9b2J", "\r", "\u202e")


def assert_inert(text: str) -> None:
    for raw in ("\x1b", "\x07", "\x9b", "\r", "\u202e"):
        assert raw not in text, repr(text)


def test_report_prints_escape_sequences_from_a_soup_json_inert(tmp_path):
    from soup.io.manifest import Method, read, write

    paths = [write_checkpoint(tmp_path / f"ing{i}", make_state(i, big=240)) for i in range(2)]
    res = soup.merge(paths, tmp_path / "out")
    m = read(res.path)
    hostile = dataclasses.replace(
        m, method=Method("greedy\x1b[2J", "https://x\x1b]0;pwned\x07", {"tie": "\x9b2J"}),
        ingredients=[dataclasses.replace(i, name=f"{i.name}\x1b]0;pwned\x07", source=f"{i.source}\x1b[2J\r\u202e")
                     for i in m.ingredients], config_from="\x1b[2J", dtype="bfloat16\x1b[31m")
    write(res.path, hostile)  # the code's own writer: as a downloaded soup.json would be
    out = runner.invoke(app, ["report", str(res.path)])
    assert out.exit_code == 0, out.output
    assert_inert(out.stdout)
    assert "\\x1b]0;pwned\\x07" in out.stdout and "\\x1b[2J" in out.stdout  # shown, but as visible escapes
    assert len(out.stdout.splitlines()) == len(soup.finish.report.format_report(m).splitlines())


def test_folder_names_with_escapes_stay_inert_in_the_card_report_and_errors(tmp_path):
    folders = [write_checkpoint(tmp_path / f"ing{i}{e}", make_state(i, big=240)) for i, e in enumerate(ESCAPES[:2])]
    res = runner.invoke(app, ["merge", *map(str, folders), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert_inert(res.output)
    card = (tmp_path / "out" / "README.md").read_text()
    assert_inert(card)
    assert "\\x1b]0;pwned\\x07" in card
    report = runner.invoke(app, ["report", str(tmp_path / "out")])
    assert_inert(report.stdout)
    bad = tmp_path / "bad\x1b]0;pwned\x07.safetensors"
    bad.write_bytes(b"\x01")
    err = runner.invoke(app, ["inspect", str(bad)])
    assert_inert(one_error_line(err, "truncated", "bad\\x1b]0;pwned\\x07"))
    for args, shown in ((["inspect", *map(str, folders)], "ing0\\x1b]0;pwned\\x07"),
                        (["inspect", "--diff", *map(str, folders)], "ing1\\x1b[2J"),
                        (["validate", str(_recipe_naming(tmp_path, folders))], "gone\\x1b[2J")):
        res = runner.invoke(app, args)
        assert_inert(res.stdout + res.stderr)
        assert shown in res.stdout + res.stderr, (args, res.stdout + res.stderr)


def _recipe_naming(tmp_path, folders):
    """A recipe whose ingredients are these folders plus one missing folder with an escape in its name."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"ingredients": [*map(str, folders), str(tmp_path / "gone\x1b[2J")],
                                      "strategy": "average", "output": str(tmp_path / "o2")}))
    return recipe


def test_printable_escapes_controls_and_keeps_text():
    from soup.errors import printable

    assert printable("a\x1b[2Jb\x07c\x00d\x7fe\x9bf") == "a\\x1b[2Jb\\x07c\\x00d\\x7fe\\x9bf"
    assert printable("ß é 中文 🙂\tx\ny") == "ß é 中文 🙂\tx\ny"
    assert printable("a\nb\tc\rd\u202ee", lines=False) == "a\\nb\\tc\\rd\\u202ee"


# ---- 4. FIFOs and device files -------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    return make


def test_a_fifo_weight_file_is_refused_without_blocking(tmp_path, fifo):
    f = fifo(tmp_path / "x.safetensors")
    with within(10), pytest.raises(CheckpointError, match=f"^{f}: .*FIFO"):
        open_checkpoint(f)


def test_a_fifo_model_safetensors_in_a_folder_is_refused_naming_it(tmp_path, fifo):
    f = fifo(tmp_path / "ft" / "model.safetensors")
    with within(10), pytest.raises(CheckpointError, match=f"^{f}: .*FIFO"):
        open_checkpoint(tmp_path / "ft")


def test_a_fifo_shard_named_by_an_index_is_refused_naming_it(tmp_path, fifo):
    folder = write_checkpoint(tmp_path / "ft", make_state(0, big=240), shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    fifo(shard)
    with within(10), pytest.raises(CheckpointError, match=f"^{shard}: .*FIFO"):
        open_checkpoint(folder)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_device_file_is_refused_naming_it(tmp_path, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    with within(10), pytest.raises(CheckpointError, match=f"^{device}: .*device"):
        open_checkpoint(device)
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "model.safetensors").symlink_to(device)  # a link to a device inside a folder
    with within(10), pytest.raises(CheckpointError, match="model.safetensors: .*device"):
        open_checkpoint(tmp_path / "ft")


def test_the_cli_refuses_a_fifo_ingredient_in_one_line(tmp_path, fifo):
    f = fifo(tmp_path / "ft" / "model.safetensors")
    good = write_checkpoint(tmp_path / "good", make_state(0, big=240))
    with within(20):
        res = runner.invoke(app, ["merge", str(good), str(tmp_path / "ft"), "-o", str(tmp_path / "out"), "-q"])
    line = one_error_line(res, str(f), "FIFO")
    assert "None" not in line and not (tmp_path / "out").exists()


# ---- 5. cosmetic steps never cost the soup ----------------------------------------------------------------


def scores(values):
    it = iter(values)
    return lambda candidate: next(it)


@pytest.mark.parametrize("values", [
    [1e308] * 6,
    [1e308, -1e308, 1.0, 1e-300, 1e308, 1.0],
    [-1e308, -1e308, -1.7e308, -1e308, -1e308, -1e308],
    [1e-300, 2e-300, 5e-324, 1e-310, 1e-300, 2e-300],
    [1.0, 1.0 + 1e-15, 1.0, 1.0, 1.0, 1.0],
])
def test_a_greedy_soup_with_extreme_scores_is_written_with_its_plot(tmp_path, values, capsys):
    paths = [write_checkpoint(tmp_path / f"ing{i}", make_state(i, big=240)) for i in range(3)]
    res = soup.greedy_soup(paths, scores(values * 3), out=tmp_path / "out", cache=None)
    assert (res.path / "soup.json").exists() and load_file(str(res.path / "model.safetensors"))
    assert res.manifest.plot == "soup_plot.png" and (res.path / "soup_plot.png").stat().st_size > 0
    assert "warning" not in capsys.readouterr().err
    assert soup.finish.report.format_report(res.manifest)  # the report prints too


def test_a_plot_that_fails_costs_a_warning_line_not_the_soup(tmp_path, capsys, monkeypatch):
    import soup.finish.report as report

    def broken(manifest):
        raise ValueError("arange: cannot compute length\nsecond line")

    monkeypatch.setattr(report, "make_figure", broken)
    paths = [write_checkpoint(tmp_path / f"ing{i}", make_state(i, big=240)) for i in range(3)]
    res = soup.greedy_soup(paths, scores([1.0, 2.0, 3.0, 2.0, 1.0, 3.0]), out=tmp_path / "out", cache=None)
    assert (res.path / "soup.json").exists() and load_file(str(res.path / "model.safetensors"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "plot" in warnings[0] and "arange" in warnings[0], warnings
    written = soup.io.manifest.read(res.path)
    assert written.plot is None and res.manifest.plot is None and not (res.path / "soup_plot.png").exists()
    assert "soup_plot.png" not in (res.path / "README.md").read_text()


def test_a_card_that_fails_costs_a_warning_line_and_leaves_a_minimal_card(tmp_path, capsys, monkeypatch):
    import soup.finish.card as card

    def broken(manifest, **kwargs):
        raise KeyError("nobody wrote this key")

    monkeypatch.setattr(card, "render_model_card", broken)
    paths = [write_checkpoint(tmp_path / f"ing{i}", make_state(i, big=240)) for i in range(2)]
    res = soup.merge(paths, tmp_path / "out")
    assert (res.path / "soup.json").exists() and load_file(str(res.path / "model.safetensors"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "card" in warnings[0] and "nobody wrote this key" in warnings[0], warnings
    text = (res.path / "README.md").read_text()
    assert "soup" in text and "soup.json" in text
    assert any("card" in w for w in res.warnings)
    assert torch.equal(load_file(str(res.path / "model.safetensors"))["model.position_ids"], torch.arange(12))
