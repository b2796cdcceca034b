"""Peak memory of loading a candidate soup into a resident model: ``load_into`` against ``state_dict``.

An evaluator keeps one model resident and loads every candidate into it. With
``model.load_state_dict(candidate.state_dict())`` the whole soup exists twice for a while; with
``candidate.load_into(model)`` it is computed block by block straight into the model's tensors.
Each way runs in a fresh process that samples its anonymous memory (``RssAnon`` in /proc) every
millisecond; the figure is the peak above the process before the model was built, over the model's
size (1.0 = the model alone).

    python benchmarks/bench_load_into.py --size 250MB --ingredients 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import PeakSampler, rss_anon  # noqa: E402

WIDTH = 2048  # each layer is a WIDTH x WIDTH float32 matrix (16 MiB)


def make_model(layers: int):
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])


def child(mode: str, folder: Path, layers: int) -> dict:
    import torch

    import soup
    from soup.soups.scorer import Scorer
    from soup.evaluators.python import PythonEvaluator
    from soup.io.ingredients import resolve_all

    cks = resolve_all(sorted(p for p in folder.iterdir() if p.is_dir()))
    cand = Scorer(cks, [PythonEvaluator(fn=lambda c: 0.0)]).candidate([1 / len(cks)] * len(cks), "uniform soup")
    torch.set_num_threads(1)
    base = rss_anon()
    with PeakSampler() as peak, torch.no_grad():
        model = make_model(layers)
        for p in model.parameters():
            p.zero_()  # touch every page: the resident model is really there
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        t0 = time.perf_counter()
        if mode == "load_into":
            cand.load_into(model)
        else:
            model.load_state_dict(cand.state_dict("cpu"))
        seconds = time.perf_counter() - t0
    ref = soup.merge(cks, None).state_dict
    exact = all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    return {"peak_over_model": (peak.peak - base) / model_bytes, "model_bytes": model_bytes,
            "seconds": seconds, "exact": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="250MB", help="model size (rounded to 16 MiB layers)")
    ap.add_argument("--ingredients", type=int, default=3)
    ap.add_argument("--dir", help="where to write the ingredients (default: a temp folder)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from soup.options import parse_size

    layers = max(1, parse_size(args.size) // (WIDTH * WIDTH * 4))
    if args.child:
        print(json.dumps(child(args.child, Path(args.dir), layers)))
        return
    import torch
    from safetensors.torch import save_file

    root = Path(args.dir or tempfile.mkdtemp(prefix="soup-bench-load-"))
    for i in range(args.ingredients):
        torch.manual_seed(i)
        (root / f"ft{i}").mkdir(parents=True, exist_ok=True)
        save_file(make_model(layers).state_dict(), str(root / f"ft{i}" / "model.safetensors"))
    results = {}
    for mode in ("load_into", "state_dict"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(root), "--size", args.size],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout)
    if args.json:
        print(json.dumps(results))
        return
    mb = results["load_into"]["model_bytes"] / 2**20
    print(f"model {mb:.0f} MiB, {args.ingredients} ingredients; peak anonymous memory over the model size:")
    for mode, r in results.items():
        print(f"  {mode:10s} {r['peak_over_model']:.2f}x  ({r['seconds']:.2f} s, exact: {r['exact']})")


if __name__ == "__main__":
    main()
