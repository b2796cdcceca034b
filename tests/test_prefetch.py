"""Reading ahead (soup.engine.prefetch) and the two-thread shard writer: what is read, when, and that the
bytes written and hashed are the soup's."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

import soup
from soup.io.ingredients import resolve_all
from soup.engine.plan import build_plan
from soup.engine.prefetch import Prefetcher, plan_ranges
from soup.engine.rules import parse_rules
from soup.engine.writer import _HashingWriter

from conftest import load_soup, reference_mean


def _plan(paths, rules=()):
    cks = resolve_all(paths)
    return cks, build_plan(cks, rules=parse_rules(rules))


def _consumed_by_engine(cks, jobs) -> int:
    """Input bytes the engine reports for ``jobs`` (per job: numel x the sources' item sizes)."""
    total = 0
    for job in jobs:
        srcs = range(len(cks)) if job.kind == "copy" else job.sources()
        total += job.numel * sum(cks[i].tensors[job.name].dtype.itemsize for i in srcs)
    return total


def test_ranges_cover_exactly_the_bytes_the_jobs_read_in_order(make_ingredients):
    paths, _ = make_ingredients(3, shards=2, big=300_000)
    cks, plan = _plan(paths, ["*vision_tower*=take:1"])
    ranges = plan_ranges(cks, plan.jobs, chunk=64 << 10)
    assert [r.due for r in ranges] == sorted(r.due for r in ranges)
    assert ranges[-1].due == _consumed_by_engine(cks, plan.jobs)
    # per file: the ranges are exactly the byte ranges of the tensors the jobs read, no more
    got: dict[Path, list[tuple[int, int]]] = {}
    for r in ranges:
        assert 0 < r.nbytes <= 64 << 10
        got.setdefault(r.file, []).append((r.offset, r.offset + r.nbytes))
    want: dict[Path, set[tuple[int, int]]] = {}
    for job in plan.jobs:
        srcs = range(len(cks)) if job.kind == "copy" else job.sources()
        for i in srcs:
            t = cks[i].tensors[job.name]
            if t.numel:
                want.setdefault(t.file, set()).add((t.offset, t.offset + t.nbytes))
    for file, spans in got.items():
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        covered = {(a, b) for a, b in merged}
        # adjacent tensors in one file merge into one span: compare byte sets
        assert _bytes(covered) == _bytes(want[file])
    # the take rule: only ingredient 1's vision tower is read
    tower = [n for n in cks[0].tensors if "vision_tower" in n]
    for i in (0, 2):
        for n in tower:
            t = cks[i].tensors[n]
            assert not any(r.file == t.file and t.offset <= r.offset < t.offset + t.nbytes for r in ranges)


def _bytes(spans) -> set[int]:
    return {x for a, b in spans for x in range(a, b)}


def test_memory_and_bin_inputs_have_no_ranges(make_ingredients, tmp_path):
    paths, states = make_ingredients(2, fmt="bin")
    cks, plan = _plan(paths)
    assert plan_ranges(cks, plan.jobs) == []
    cks, plan = _plan([states[0], states[1]])
    assert plan_ranges(cks, plan.jobs) == []


class _Recorder(Prefetcher):
    """Records, for each range read, how many bytes the consumer had used when it was taken."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.log: list[tuple[int, int]] = []  # (due, consumed when read)
        self.lock = threading.Lock()

    def _read(self, null, fd, r):
        with self.lock:
            self.log.append((r.due, self._consumed))
        return super()._read(null, fd, r)


def test_reads_stay_within_the_window_and_all_are_read(make_ingredients):
    paths, _ = make_ingredients(3, big=400_000)
    cks, plan = _plan(paths)
    ranges = plan_ranges(cks, plan.jobs, chunk=32 << 10)
    window = 200 << 10
    total = ranges[-1].due
    with _Recorder(ranges, window=window, threads=3) as p:
        consumed = 0
        while consumed < total:  # a consumer using 16 KiB at a time, slower than the readers
            step = min(16 << 10, total - consumed)
            consumed += step
            p.consumed(step)
            threading.Event().wait(0.0005)
        deadline = threading.Event()
        for _ in range(1000):  # the last ranges are read once they are in the window
            if len(p.log) == len(ranges):
                break
            deadline.wait(0.01)
    assert sorted(d for d, _ in p.log) == [r.due for r in ranges]
    assert all(due - used <= window for due, used in p.log)
    assert p.read == sum(r.nbytes for r in ranges)  # every byte was really read (sendfile)


def test_close_stops_the_readers_when_the_consumer_stops_early(make_ingredients):
    paths, _ = make_ingredients(2, big=400_000)
    cks, plan = _plan(paths)
    ranges = plan_ranges(cks, plan.jobs, chunk=16 << 10)
    p = Prefetcher(ranges, window=64 << 10, threads=2)
    with pytest.raises(RuntimeError):
        with p:
            p.consumed(32 << 10)
            raise RuntimeError("the merge failed")
    assert not any(t.is_alive() for t in p._threads)
    assert p.read < sum(r.nbytes for r in ranges)  # stopped at the window, not read to the end


def test_a_vanished_file_is_left_to_the_math(make_ingredients, tmp_path):
    paths, _ = make_ingredients(2)
    cks, plan = _plan(paths)
    ranges = plan_ranges(cks, plan.jobs)
    moved = [type(r)(r.due, tmp_path / "gone.safetensors", r.offset, r.nbytes) for r in ranges]
    with Prefetcher(moved, window=1 << 30, threads=2) as p:
        p.consumed(ranges[-1].due)
    assert p.read == 0  # advice only: nothing raised


def test_merge_with_read_ahead_is_the_definition(make_ingredients, tmp_path, monkeypatch):
    import soup.engine.prefetch as prefetch

    monkeypatch.setattr(prefetch, "CHUNK", 4 << 10)  # many small reads racing the math
    paths, states = make_ingredients(3, shards=2, big=300_000)
    res = soup.merge(paths, tmp_path / "out", weights=[0.5, 0.3, 0.2])
    got, ref = load_soup(res.path), reference_mean(states, [0.5, 0.3, 0.2])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_blocks_computed_in_the_write_buffer_are_not_copied(tmp_path):
    w = _HashingWriter(block_bytes=64, depth=2)
    try:
        w.open(tmp_path / "f.bin", b"")
        first = w.reserve(torch.bfloat16, 8)  # 16 bytes of the buffer being filled
        first.copy_(torch.arange(8, dtype=torch.bfloat16))
        w.write(first)  # committed in place
        w.write(torch.tensor([1], dtype=torch.uint8))  # an odd byte: the next bf16 room is misaligned
        assert w.reserve(torch.bfloat16, 4) is None
        w.write(torch.tensor([2], dtype=torch.uint8))
        again = w.reserve(torch.float32, 20)  # 80 bytes: more than a buffer
        assert again is None
        late = w.reserve(torch.float32, 12)  # 48 bytes do not fit after 18: a new buffer
        late.copy_(torch.full((12,), 0.5))
        abandoned = w.reserve(torch.bfloat16, 1)  # reserved, then not used: nothing is written
        w.write(late)
        assert abandoned is not None
        digest = w.close_file()
    finally:
        w.shutdown()
    data = (torch.arange(8, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes() + bytes([1, 2])
            + torch.full((12,), 0.5).view(torch.uint8).numpy().tobytes())
    assert (tmp_path / "f.bin").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_hashing_writer_writes_and_hashes_every_byte(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = _HashingWriter(block_bytes=1000, depth=2)  # many hand-overs, few buffers
    digests, want = [], []
    try:
        for k in range(3):
            path = tmp_path / f"f{k}.bin"
            header = f"header {k}".encode()
            w.open(path, header)
            data = header
            for n in (1, 999, 1000, 1001, 4321, 0, 7):
                block = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g)
                w.write(block.view(torch.uint8))
                data += block.numpy().tobytes()
            digests.append(w.close_file())
            want.append((path, data))
    finally:
        w.shutdown()
    for digest, (path, data) in zip(digests, want):
        assert path.read_bytes() == data
        assert digest == hashlib.sha256(data).hexdigest()


def test_hashing_writer_reports_a_write_error_at_the_last_file(tmp_path):
    w = _HashingWriter(block_bytes=64)
    try:
        w.open(tmp_path / "missing-folder" / "f.bin", b"h")  # cannot be created
        with pytest.raises(soup.SoupError, match="writing the soup failed: .*missing-folder"):
            w.write(torch.zeros(10, dtype=torch.uint8))  # fits in the first buffer: no hand-over yet
            w.close_file()  # the error surfaces here at the latest, never a digest
    finally:
        w.shutdown()


def test_in_memory_sinks_take_blocks_computed_in_place():
    from soup.engine.plan import Job
    from soup.engine.sinks import _Filling

    filling, flat = _Filling(), torch.zeros(10)
    job = Job(name="w", shape=(10,), kind="mean", out_dtype=torch.float32, weights=(1.0,))
    seen = []

    def produce(_job):
        assert filling.reserve(torch.bfloat16, 4) is None  # another dtype: computed elsewhere, copied
        room = filling.reserve(torch.float32, 4)
        room.fill_(1.0)
        seen.append(room.data_ptr() == flat.data_ptr())
        yield room  # already in place
        yield torch.full((6,), 2.0)  # copied

    filling.fill(flat, job, produce)
    assert seen == [True] and flat.tolist() == [1.0] * 4 + [2.0] * 6
    assert filling.reserve(torch.float32, 1) is None  # outside ``fill``


def test_merge_into_a_mapping_computes_in_place_and_is_the_definition(make_ingredients):
    paths, states = make_ingredients(3, big=300_000)
    target = {k: torch.empty_like(v) for k, v in states[0].items()}
    soup.merge(paths, target, weights=[0.2, 0.3, 0.5])
    ref = reference_mean(states, [0.2, 0.3, 0.5])
    assert all(torch.equal(target[k], ref[k]) for k in ref)


def test_readers_stop_quietly_where_sendfile_is_refused(make_ingredients, monkeypatch):
    import os

    paths, _ = make_ingredients(2)
    cks, plan = _plan(paths)
    ranges = plan_ranges(cks, plan.jobs, chunk=4 << 10)
    calls = []

    def refused(*args):
        calls.append(args)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", refused)
    with Prefetcher(ranges, window=1 << 30, threads=2) as p:
        for _ in range(200):
            if not any(t.is_alive() for t in p._threads):
                break  # both readers gave up
            threading.Event().wait(0.01)
    assert p.read == 0 and len(calls) == 2  # one refusal per thread, then no more attempts
    assert p._next < len(ranges)  # the rest was never tried


def test_released_pages_read_back_the_same(make_ingredients):
    from soup.engine.stream import TensorReader

    paths, states = make_ingredients(1, big=400_000)
    ck = resolve_all(paths)[0]
    reader = TensorReader(ck)
    try:
        name = "model.layers.0.mlp.up_proj.weight"
        view = reader.view(name)
        before = view.clone()
        reader.release(name, drop=True)  # unmapped and evicted: the view faults the file in again
        assert torch.equal(view, before) and torch.equal(view, states[0][name].reshape(-1))
    finally:
        del view
        reader.close()


def test_merge_evicting_what_it_read_is_the_definition(make_ingredients, tmp_path, monkeypatch):
    import soup.merging as engine

    monkeypatch.setattr(engine, "available_memory", lambda: 0)  # as if the inputs were larger than RAM
    released = []
    real = engine.TensorReader.release
    monkeypatch.setattr(engine.TensorReader, "release",
                        lambda self, name, drop=False: (released.append(drop), real(self, name, drop=drop)))
    paths, states = make_ingredients(3, shards=2, big=300_000)
    res = soup.merge(paths, tmp_path / "out", weights=[0.5, 0.3, 0.2])
    got, ref = load_soup(res.path), reference_mean(states, [0.5, 0.3, 0.2])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert released and all(released)
