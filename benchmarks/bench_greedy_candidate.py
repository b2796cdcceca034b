"""Per-candidate cost of greedy soup: build one candidate "pool + x" into a resident model.

A greedy candidate is the uniform soup of the pool and the new ingredient x, built exactly as the soup
is written (one construction: the weighted mean of every member, in the accumulation dtype) and
computed by ``candidate.load_into(model)`` straight into the evaluator's resident model. Its floor is
reading every member once (k + 1 inputs); the rest is the math and memory traffic. (Until soup 0.1's
running sums were retired, a candidate was ``S/(k+1) + x/(k+1)`` from a float32 sum S of the pool:
one pass over x, but other bytes than the soup written, and a model-sized sum held in memory.) This
script, top to bottom:

  1. builds --ingredients synthetic Llama-layout checkpoints (benchmarks/bench_merge.py's generator,
     cached under --workdir and reused);
  2. in a fresh child process: a resident model (one tensor per checkpoint tensor, the ingredients'
     dtype, on --device) and a scorer over the ingredients;
  3. per repeat and page-cache state (warm: the inputs read just before; cold: the page cache dropped,
     or where that is refused their pages evicted with posix_fadvise(DONTNEED)): the time to read
     every member once, plain sequential reads, and the time to build and load the candidate;
     the child samples its anonymous memory (RssAnon) every millisecond;
  4. prints the ratios with the targets beside them: warm <= 4x the read, cold <= 1.5x, and peak
     anonymous memory against the model (the rest is the engine's blocks).

    python benchmarks/bench_greedy_candidate.py --size 1GB --ingredients 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge import (ITEMSIZE, dims_for, drop_caches, fmt_bytes, make_ingredient, parse_size,  # noqa: E402
                         safetensors_files)
from memory import PeakSampler, rss_anon  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
TARGET_WARM, TARGET_COLD = 4.0, 1.5


def read_once(files: list[Path]) -> tuple[float, float]:
    """(wall, CPU) seconds to read the files once, sequentially, into a reused 64 MiB buffer."""
    buf = memoryview(bytearray(64 << 20))
    t, c = time.perf_counter(), time.process_time()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t, time.process_time() - c


def evict(files: list[Path]) -> str:
    """Make the files cold: drop the page cache, or evict their pages; returns how."""
    why = drop_caches()
    if why is None:
        return "drop_caches"
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return f"posix_fadvise(DONTNEED) ({why})"


def child(args: argparse.Namespace) -> dict:
    import torch

    import soup  # noqa: F401  (imports before the baseline)
    from soup.evaluators.python import PythonEvaluator
    from soup.io.ingredients import resolve_all
    from soup.soups.scorer import Scorer

    folders = [Path(p) for p in args.folders]
    base = rss_anon()
    cks = resolve_all(folders)
    new = len(cks) - 1
    model = {n: torch.zeros(t.shape, dtype=t.dtype, device=args.device) for n, t in cks[0].tensors.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in model.values())
    scorer = Scorer(cks, [PythonEvaluator(fn=lambda c: 0.0)], devices=[args.device])
    files = [f for folder in folders for f in safetensors_files(folder)]  # every member is read
    rows = []
    for r in range(args.repeats):
        for state in (["warm", "cold"] if args.cold else ["warm"]):
            how = "page cache warm"
            if state == "cold":
                how = evict(files)
            else:
                read_once(files)
            read_s, read_cpu = read_once(files)
            if state == "cold":
                evict(files)
            cand = scorer.candidate([1.0 / len(cks)] * len(cks), f"pool+{new}")
            if args.device != "cpu":
                torch.cuda.synchronize()
            with PeakSampler() as peak:  # (its thread's CPU time is in build_cpu: a few %)
                t, c = time.perf_counter(), time.process_time()
                cand.load_into(model)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                build_s, build_cpu = time.perf_counter() - t, time.process_time() - c
            rows.append({"state": state, "how": how, "read_s": read_s, "build_s": build_s, "read_cpu": read_cpu,
                         "build_cpu": build_cpu, "peak_anon_above_base": peak.peak - base})
    return {"model_bytes": model_bytes, "inputs_bytes": sum(p.stat().st_size for p in files), "rows": rows,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ingredients", type=int, default=3, help="pool of ingredients - 1, plus the new one (>= 2)")
    ap.add_argument("--size", default="1GB", help="size of one ingredient (decimal MB/GB, or MiB/GiB)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(ITEMSIZE), help="ingredient dtype")
    ap.add_argument("--shard-size", default="2GB", help="shard size of the ingredients")
    ap.add_argument("--device", default="cpu", help="where the resident model lives (cpu, cuda)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per cache state; the minimum is reported")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache measurement")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "soup-bench-greedy",
                    help="where ingredients are generated (reused between runs)")
    ap.add_argument("--json", type=Path, help="also write the raw measurements to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folders", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return 0
    if args.ingredients < 2:
        ap.error("--ingredients must be at least 2 (a pool and a new ingredient)")
    dims = dims_for(parse_size(args.size), args.dtype)
    shard = parse_size(args.shard_size)
    folders = []
    t = time.perf_counter()
    for i in range(args.ingredients):
        folder = args.workdir / f"llama-h{dims.hidden}-l{dims.layers}-{args.dtype}-shard{shard}" / f"ing{i}"
        make_ingredient(folder, dims, args.dtype, shard, seed=i)
        folders.append(folder)
    print(f"ingredients ready in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cmd = [sys.executable, __file__, "--child", "--device", args.device,
           "--repeats", str(args.repeats), "--folders", *map(str, folders)] + ([] if args.cold else ["--no-cold"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return 1
    out = json.loads(next(line for line in res.stdout.splitlines() if line.startswith(RESULT_TAG))[len(RESULT_TAG):])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    report(args, out)
    return 0


def report(args: argparse.Namespace, out: dict) -> None:
    print(f"greedy candidate benchmark: pool of {args.ingredients - 1} + 1 new, {fmt_bytes(out['inputs_bytes'])} "
          f"of {args.dtype} inputs in all; resident model on {args.device}; one construction (every member "
          f"read); {os.cpu_count()} CPUs, {out['threads']} torch threads; best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    print(f"{'cache':<6} {'read inputs s':>14} {'candidate s':>12} {'ratio':>7} {'target':>7}  "
          f"{'read cpu s':>10} {'cand. cpu s':>11}  how")
    for state, target in (("warm", TARGET_WARM), ("cold", TARGET_COLD)):
        rows = [r for r in out["rows"] if r["state"] == state]
        if not rows:
            continue
        read, build = min(r["read_s"] for r in rows), min(r["build_s"] for r in rows)
        read_cpu, build_cpu = min(r["read_cpu"] for r in rows), min(r["build_cpu"] for r in rows)
        ratio = build / read
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"{state:<6} {read:>14.3f} {build:>12.3f} {ratio:>6.2f}x {target:>6.1f}x  {read_cpu:>10.3f} "
              f"{build_cpu:>11.3f}  {verdict}; {rows[0]['how']}")
    peak = max(r["peak_anon_above_base"] for r in out["rows"])
    floor = out["model_bytes"]
    print()
    print(f"peak anonymous memory above imports: {fmt_bytes(peak)} = model {fmt_bytes(out['model_bytes'])} "
          f"+ {fmt_bytes(peak - floor)} (target: model + O(block))")


if __name__ == "__main__":
    sys.exit(main())
