"""The soup you score is the soup you ship: one candidate construction for every strategy, every
number of evaluators and every merge option, checked on bytes.

An evaluator that hashes every tensor it is given records what was scored; the soup written to disk
is hashed the same way; the score reported as the soup's must be the score of those bytes.
"""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from safetensors.torch import load_file

from soup.errors import RecipeError
from soup.pipeline import average_soup, greedy_soup, maximum_soup, search_soup
from soup.soups.evaluate import Evaluator

from conftest import make_state, write_checkpoint


def digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Hashing(Evaluator):
    """Scores a candidate by a pseudo-random function of its bytes (so greedy keeps some and rejects
    some) and records the hash of everything it was given. One instance per device."""

    name = "hashing"
    seen: dict[str, tuple[str, float]] = {}  # candidate name -> (bytes hash, score)
    lock = threading.Lock()

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device=device)
        self.device = device

    def score(self, candidate):
        h = digest(candidate.state_dict(self.device))
        value = int(h[:8], 16) / 0xFFFFFFFF
        with Hashing.lock:
            Hashing.seen[candidate.name] = (h, value)
        return value


@pytest.fixture
def family(tmp_path):
    """Five fine-tunes in fp32 and bf16 (mixed_float: one of each), and a base for methods."""
    def make(dtype):
        base = write_checkpoint(tmp_path / f"base-{dtype}", make_state(0, dtype, big=3000))
        paths = []
        for i in range(5):
            st = make_state(0, torch.float32, big=3000)
            g = torch.Generator().manual_seed(i)
            st = {k: ((v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v)
                  for k, v in st.items()}
            paths.append(write_checkpoint(tmp_path / f"ft{i}-{dtype}", st))
        return base, paths
    return make


def _written(path) -> str:
    return digest(load_file(str(path / "model.safetensors")))


STRATEGIES = ["average", "maximum", "greedy-1", "greedy-3", "search"]
FP32, BF16 = torch.float32, torch.bfloat16
# every strategy with the defaults and with a merge method, on both dtypes; every other option where it
# matters (accumulation of fp32 inputs; strict and a seeded method on bf16) with one and three evaluators
CASES = ([(s, d, {}) for s in STRATEGIES for d in (FP32, BF16)]
         + [(s, d, {"method": {"name": "ties", "density": 0.5}}) for s in STRATEGIES for d in (FP32, BF16)]
         + [(s, FP32, {"accumulate": a}) for s in ("average", "greedy-1", "greedy-3") for a in ("float32", "float64")]
         + [(s, BF16, o) for s in ("maximum", "greedy-1", "greedy-3")
            for o in ({"strict": True}, {"method": {"name": "dare_linear", "density": 0.7}})])


@pytest.mark.parametrize("strategy, dtype, options", CASES,
                         ids=[f"{s}-{str(d)[6:]}-{'-'.join(map(str, o.values())) or 'default'}" for s, d, o in CASES])
def test_the_score_reported_is_the_score_of_the_bytes_written(tmp_path, family, dtype, options, strategy):
    base, paths = family(dtype)
    if "method" in options:
        options = dict(options, base=base)
    Hashing.seen = {}
    out = tmp_path / "soup"
    common = dict(out=out, cache=None, **options)
    if strategy == "average":
        res = average_soup(paths, Hashing, **common)
    elif strategy == "maximum":
        res = maximum_soup(paths, Hashing, p=2, **common)
    elif strategy.startswith("greedy"):
        res = greedy_soup(paths, Hashing, devices=["cpu"] * int(strategy[-1]), **common)
    else:
        res = search_soup(paths, Hashing, n_trials=6, **common)
    written = _written(out)
    assert res.soup_score is not None
    scored = {h for h, v in Hashing.seen.values() if v == res.soup_score.value}
    assert written in scored, (strategy, options)


def test_greedy_on_one_and_three_evaluators_gives_the_evaluator_the_same_bytes(tmp_path, family):
    """Same members, same bytes: the speculative rounds build candidates as the sequential steps do."""
    _, paths = family(torch.bfloat16)
    runs = {}
    for w in (1, 3):
        Hashing.seen = {}
        res = greedy_soup(paths, Hashing, devices=["cpu"] * w, out=tmp_path / f"w{w}", cache=None)
        runs[w] = (res, dict(Hashing.seen), _written(tmp_path / f"w{w}"))
    (one, seen1, wrote1), (three, seen3, wrote3) = runs[1], runs[3]
    assert one.weights == three.weights and wrote1 == wrote3
    by_bytes1 = {h for h, _ in seen1.values()}
    assert by_bytes1 <= {h for h, _ in seen3.values()}  # every sequential candidate is among W=3's


def test_mixed_float_normalize_and_average_weights_reach_candidates(tmp_path, family):
    """mixed_float on fp32 + bf16 ingredients evaluates (it used to fail at the first evaluation);
    normalize=False with weights [2, 1] is 2x + y, in the candidate and in the soup."""
    _, fp32 = family(torch.float32)
    _, bf16 = family(torch.bfloat16)
    Hashing.seen = {}
    res = greedy_soup([fp32[0], bf16[1], fp32[2]], Hashing, mixed_float=True, out=tmp_path / "mixed", cache=None)
    assert _written(tmp_path / "mixed") in {h for h, v in Hashing.seen.values() if v == res.soup_score.value}

    Hashing.seen = {}
    res = average_soup(fp32[:2], Hashing, weights=[2, 1], normalize=False, out=tmp_path / "raw", cache=None)
    got = load_file(str(tmp_path / "raw" / "model.safetensors"))
    a, b = (load_file(str(p / "model.safetensors")) for p in fp32[:2])
    name = "model.norm.weight"
    assert torch.allclose(got[name].double(), 2 * a[name].double() + b[name].double(), rtol=1e-6)
    assert _written(tmp_path / "raw") == Hashing.seen["average soup"][0]


@pytest.mark.parametrize("sums", ["auto", "device", "memory", "disk"])
def test_greedy_sums_option_is_accepted_and_changes_nothing(tmp_path, family, sums):
    """Recipes written for running sums keep working: ``sums`` no longer changes how candidates are built."""
    _, paths = family(torch.bfloat16)
    Hashing.seen = {}
    ref = greedy_soup(paths, Hashing, cache=None, out=tmp_path / "ref")
    got = greedy_soup(paths, Hashing, cache=None, sums=sums, out=tmp_path / sums)
    assert got.weights == ref.weights and _written(tmp_path / sums) == _written(tmp_path / "ref")


def test_bad_sums_value():
    from soup.soups.strategies import make_strategy

    with pytest.raises(RecipeError, match="strategy.sums: 'gpu' must be one of auto, device, memory, disk"):
        make_strategy("greedy", sums="gpu")


def test_benchmark_memory_is_model_plus_blocks(tmp_path):
    """benchmarks/bench_greedy_candidate.py, small and warm only: a candidate computed into a resident
    model allocates no more than a few blocks besides the model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parent.parent / "benchmarks" / "bench_greedy_candidate.py"
    res = subprocess.run([sys.executable, str(bench), "--size", "32MB", "--repeats", "1", "--no-cold",
                          "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    peak = max(row["peak_anon_above_base"] for row in r["rows"])
    assert peak < r["model_bytes"] + (48 << 20), r
    assert "peak anonymous memory" in res.stdout


EVALUATOR = '''
from soup.soups.evaluate import Evaluator

class Target(Evaluator):
    {extra}
    def score(self, candidate):
        with open({log!r}, "a") as f:
            f.write({tag!r} + "\\n")
        return {value}
'''


def _evaluator_file(path, log, tag, value=1.0, extra="pass"):
    path.write_text(EVALUATOR.format(log=str(log), tag=tag, value=value, extra=extra))
    return f"{path}:Target"


def test_evaluators_are_cached_by_the_code_they_run(tmp_path, family):
    """Two files with one class name never share scores; an edited evaluator is evaluated afresh; a
    class that opts out (code_in_key = False) keeps its scores across edits."""
    _, paths = family(torch.bfloat16)
    cache, log = tmp_path / "scores.sqlite", tmp_path / "log.txt"

    def run(spec, tag):
        before = log.read_text().splitlines().count(tag) if log.exists() else 0
        average_soup(paths[:2], spec, cache=str(cache))  # in memory: only the evaluations matter here
        return log.read_text().splitlines().count(tag) - before

    a = _evaluator_file(tmp_path / "ev_a.py", log, "a")
    b = _evaluator_file(tmp_path / "ev_b.py", log, "b")
    assert run(a, "a") == 1
    assert run(b, "b") == 1  # same class name, another file: evaluated, not served a's score
    assert run(a, "a") == 0  # unchanged: from the cache
    _evaluator_file(tmp_path / "ev_a.py", log, "a", value=2.0)  # edited
    assert run(a, "a") == 1
    pinned = _evaluator_file(tmp_path / "ev_p.py", log, "p", extra="code_in_key = False")
    assert run(pinned, "p") == 1
    _evaluator_file(tmp_path / "ev_p.py", log, "p", value=3.0, extra="code_in_key = False")
    assert run(pinned, "p") == 0  # opted out: the old score is kept on purpose


def test_an_ingredient_rewritten_at_the_same_size_mid_run_stops_the_run(tmp_path, family):
    """A training job saving again (same size, new bytes) while candidates are evaluated: the run stops
    with one line naming the file, nothing is written, and no score is cached for bytes that are gone."""
    from soup.errors import CheckpointError
    from soup.soups.cache import ScoreCache

    _, paths = family(torch.bfloat16)
    victim = paths[1] / "model.safetensors"
    calls = []

    def evaluator(candidate):
        calls.append(candidate.name)
        if len(calls) == 2:  # the second evaluation: ingredient 1 is saved again, same size
            data = bytearray(victim.read_bytes())
            data[-4:] = bytes(4) if data[-4:] != bytes(4) else b"\x01\x00\x00\x00"
            tmp = victim.with_suffix(".tmp")
            tmp.write_bytes(bytes(data))
            tmp.replace(victim)  # as a training job's atomic save would
        return float(len(calls))

    store = tmp_path / "scores.sqlite"
    with pytest.raises(CheckpointError, match=r"ft1-torch.bfloat16/model.safetensors: was rewritten while soup was reading"):
        greedy_soup(paths, evaluator, cache=str(store), out=tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
    cached = ScoreCache(str(store))
    try:
        assert cached.count() == 1  # the first score only: the second belonged to bytes now gone
    finally:
        cached.close()


def test_two_checkpoints_with_one_header_size_and_time_have_different_fingerprints(tmp_path):
    """Files saved within one clock tick (or copied with their times kept) share name, size, mtime and
    header: the fingerprint also reads samples of their data, so their scores are never shared."""
    import os

    from safetensors.torch import save_file

    from soup.io.checkpoint import open_checkpoint

    paths = []
    for i in range(2):
        folder = tmp_path / f"ft{i}"
        folder.mkdir()
        save_file({"w": torch.full((64, 1024), float(i))}, str(folder / "model.safetensors"))
        paths.append(folder / "model.safetensors")
    stamp = paths[0].stat().st_mtime_ns
    for p in paths:
        os.utime(p, ns=(stamp, stamp))
    a, b = (open_checkpoint(p.parent) for p in paths)
    raw = [p.read_bytes() for p in paths]
    header = 8 + int.from_bytes(raw[0][:8], "little")
    assert raw[0][:header] == raw[1][:header] and len(raw[0]) == len(raw[1])  # one header, one size
    assert a.fingerprint != b.fingerprint
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "model.safetensors").write_bytes(paths[0].read_bytes())
    os.utime(twin / "model.safetensors", ns=(stamp, stamp))
    assert open_checkpoint(twin).fingerprint == a.fingerprint  # the same bytes: the same soup, the same scores


def test_a_changed_chat_template_or_config_beside_the_weights_is_scored_afresh(tmp_path):
    """The cache key names the files a candidate carries beside its weights (config, tokenizer, chat
    template: its config source's), which an evaluator reads as much as the weights: an edited template
    is never answered with the old template's score; the other ingredients' scores stay cached."""
    import json

    from soup.soups.cache import ScoreCache

    paths = [write_checkpoint(tmp_path / f"ft{i}", make_state(i)) for i in range(3)]
    for p in paths:
        (p / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    seen: list[tuple[str, str]] = []

    def by_template(candidate):  # the template's length counts: a stale score would be visible
        template = json.loads((candidate.path() / "tokenizer_config.json").read_text())["chat_template"]
        seen.append((candidate.name, template))
        return len(template) + float(candidate.state_dict("cpu")["model.norm.weight"].float().mean())

    cache = ScoreCache(tmp_path / "scores.db")
    first = maximum_soup(paths, by_template, p=1, cache=cache, out=tmp_path / "a")
    assert len(seen) == 3
    (paths[1] / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | tojson }}"}))
    seen.clear()
    second = maximum_soup(paths, by_template, p=1, cache=cache, out=tmp_path / "b")
    assert seen == [("ft1", "{{ messages | tojson }}")]  # only ft1 again, with its new template
    assert second.scores["ft1"] == pytest.approx(first.scores["ft1"] + len(" | tojson"))
    assert second.scores["ft0"] == first.scores["ft0"] and second.scores["ft2"] == first.scores["ft2"]
