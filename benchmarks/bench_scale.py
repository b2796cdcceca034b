"""Issue 13's figures in one run, each beside its target: the engine warm and cold, models larger than
RAM (``--large``), and the per-candidate cost of greedy soup.

It runs the two benchmarks that measure them, one after the other, each in its own processes and
page-cache state, and collects their JSON:

  1. ``bench_merge.py`` warm (inputs read once before): soup.merge <= 1.3 x the I/O floor (a plain
     sequential read of the inputs + a write of the output);
  1. ``bench_merge.py --cold`` (page cache dropped): soup.merge <= 1.3 x the time to read every
     input once with several reads in flight (8 threads x 16 MiB preads: the best the disk does);
  2. with ``--large``, ``bench_merge.py --large``: 4 x 8 GB bf16 on this machine, cold: time <= 1.3 x
     that read, peak anonymous memory <= torch-only + 300 MB, and mergekit on the same inputs in the
     same run (its time and memory, or how it failed);
  4. ``bench_greedy_candidate.py``: building one greedy candidate into a resident model, against
     reading the new ingredient once: warm <= 4 x, cold <= 1.5 x; peak memory = model + O(block)
     (the candidate is built straight into the resident model; running sums were retired).

Cold measurements drop the page cache (root only); where that is refused the run says so.

    python benchmarks/bench_scale.py                      # 3 x 1 GB, about 3 minutes
    python benchmarks/bench_scale.py --large --mergekit-python /tmp/mkvenv/bin/python   # + 4 x 8 GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def _run(script: str, args: list[str], out: Path) -> dict | None:
    """Run a benchmark script with ``--json out``; its report goes to our stderr. None if it failed."""
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
    print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(res.stdout)
    if res.returncode != 0 or not out.exists():
        print(f"  exited with {res.returncode}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def _merge_figures(raw: dict) -> dict:
    soups = raw["soup"]
    merge_s = min(s["report"]["merge_s"] for s in soups)
    torch_anon = next(iter(raw["torch_only"].values()))["report"]["RssAnon"]
    fig = {"merge_s": merge_s,
           "floor_s": min(r + w for r, w in zip(raw["floor_read_s"], raw["floor_write_s"])),
           "parallel_read_s": min(raw["parallel_read_s"]),
           "anon_above_torch": max(s["peak_anon"] for s in soups) - torch_anon,
           "check": raw["checks"].get("soup", "not checked"), "cache": raw["cache"]}
    mks = raw.get("mergekit") or []
    if mks:
        mk_py = [py for py in raw["torch_only"] if py != sys.executable]
        base = raw["torch_only"][mk_py[0] if mk_py else sys.executable]["report"]["RssAnon"]
        fig["mergekit"] = {"wall_s": min(m["wall"] for m in mks), "anon_above_torch": max(m["peak_anon"] for m in mks) - base,
                           "check": raw["checks"].get("mergekit", "not checked")}
    fig["soup_wall_s"] = min(s["wall"] for s in soups)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ingredients", type=int, default=3, help="ingredients of the warm/cold merge and greedy runs")
    ap.add_argument("--size", default="1GB", help="size of one ingredient of those runs")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each measurement (minimum reported)")
    ap.add_argument("--large", action="store_true", help="also 4 x 8 GB from a cold cache (~45 GB of disk, minutes)")
    ap.add_argument("--mergekit-python", help="python of a venv with mergekit (run side by side when given)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "soup-bench")
    args = ap.parse_args(argv)

    common = ["--ingredients", str(args.ingredients), "--size", args.size, "--repeats", str(args.repeats),
              "--workdir", str(args.workdir)]
    mk = ["--mergekit-python", args.mergekit_python] if args.mergekit_python else ["--no-mergekit"]
    rows: list[tuple[str, str, str, str, bool | None]] = []  # point, what, figure, target, met
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        warm = _run("bench_merge.py", [*common, *mk], t / "warm.json")
        cold = _run("bench_merge.py", [*common, "--cold", "--no-mergekit"], t / "cold.json")
        large = _run("bench_merge.py", ["--large", "--repeats", "1", "--workdir", str(args.workdir), *mk],
                     t / "large.json") if args.large else None
        greedy = _run("bench_greedy_candidate.py", ["--ingredients", str(args.ingredients), "--size", args.size,
                                                    "--repeats", str(args.repeats)], t / "greedy.json")

    size = f"{args.ingredients} x {args.size}"
    if warm:
        f = _merge_figures(warm)
        r = f["merge_s"] / f["floor_s"]
        rows.append(("1", f"warm {size}: soup.merge / floor", f"{f['merge_s']:.2f} s / {f['floor_s']:.2f} s = {r:.2f}x",
                     "<= 1.3x", r <= 1.3))
        if "mergekit" in f:
            m = f["mergekit"]
            rows.append(("1", f"warm {size}: mergekit / soup (whole processes)",
                         f"{m['wall_s']:.2f} s / {f['soup_wall_s']:.2f} s = {m['wall_s'] / f['soup_wall_s']:.2f}x",
                         "(for reference)", None))
    if cold:
        f = _merge_figures(cold)
        r = f["merge_s"] / f["parallel_read_s"]
        rows.append(("1", f"cold {size}: soup.merge / parallel read",
                     f"{f['merge_s']:.2f} s / {f['parallel_read_s']:.2f} s = {r:.2f}x", "<= 1.3x", r <= 1.3))
        if not f["cache"].startswith("cold"):
            rows.append(("1", "  (the page cache could not be dropped: this row is warm)", "", "", None))
    if large:
        f = _merge_figures(large)
        r = f["merge_s"] / f["parallel_read_s"]
        rows.append(("2", "large 4 x 8 GB cold: soup.merge / parallel read",
                     f"{f['merge_s']:.1f} s / {f['parallel_read_s']:.1f} s = {r:.2f}x", "<= 1.3x", r <= 1.3))
        a = f["anon_above_torch"]
        rows.append(("2", "large: soup peak anonymous memory above torch", f"{a / MiB:.0f} MiB", "<= 300 MB",
                     a <= 300e6))
        rows.append(("2", "large: soup output check", f["check"][:60], "ok", f["check"].startswith("ok")))
        if "mergekit" in f:
            m = f["mergekit"]
            rows.append(("2", "large: mergekit time, peak anon above torch",
                         f"{m['wall_s']:.1f} s ({m['wall_s'] / f['soup_wall_s']:.2f}x soup's process), "
                         f"{m['anon_above_torch'] / MiB:.0f} MiB", "(side by side)", None))
        elif args.mergekit_python:
            rows.append(("2", "large: mergekit", "failed: see its output above", "(side by side)", None))
    if greedy:
        for state, target in (("warm", 4.0), ("cold", 1.5)):
            rs = [r for r in greedy["rows"] if r["state"] == state]
            if rs:
                read, build = min(r["read_s"] for r in rs), min(r["build_s"] for r in rs)
                rows.append(("4", f"greedy candidate {state}: build+load / read members once",
                             f"{build:.2f} s / {read:.2f} s = {build / read:.2f}x", f"<= {target}x", build / read <= target))
        peak = max(r["peak_anon_above_base"] for r in greedy["rows"])
        rows.append(("4", "greedy candidate: peak anon - the resident model",
                     f"{(peak - greedy['model_bytes']) / MiB:.0f} MiB (model {greedy['model_bytes'] / MiB:.0f} MiB)",
                     "O(block)", None))

    print(f"issue 13 at scale: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; details of each run above (stderr)")
    print(f"{'pt':<3} {'measurement':<52} {'figure':<48} {'target':<15} verdict")
    for point, what, figure, target, met in rows:
        verdict = "" if met is None else ("met" if met else "MISSED")
        print(f"{point:<3} {what:<52} {figure:<48} {target:<15} {verdict}")
    failed = [name for name, raw in (("warm", warm), ("cold", cold), ("greedy", greedy)) if raw is None]
    if args.large and large is None:
        failed.append("large")
    if failed:
        print(f"failed runs: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
