"""Benchmark soup's TIES, DARE-TIES and Model Stock against mergekit, side by side in one run.

What it does, top to bottom:
  1. builds a base model with bench_merge's ``make_ingredient`` (synthetic Llama layout, HF folder,
     random normal weights) and derives 3 fine-tunes from it: fine-tune j = base + noise, the noise
     ``NOISE_STD / sqrt(2) * (shared + own_j)`` with ``shared`` the same for every fine-tune and
     ``own_j`` its own (standard normals seeded per tensor), computed in float32 and rounded to the
     dtype; the task vectors' pairwise cosine is therefore about 0.5. Cached under --workdir.
  2. per method and repeat, in the same page-cache state (bench_merge's preparation: a scratch file
     written and deleted, then every input read once, i.e. warm): the FLOOR (bench_merge's
     ``floor_once``: one sequential read of the base and the fine-tunes, one write of the output's
     size), then ``soup.merge(FT, out, method=..., base=BASE)`` in bench_merge's engine child (it
     times the call alone; the parent times the whole process and samples VmHWM / RssAnon), then
     ``mergekit-yaml`` with the same method and parameters.
  3. torch-only children (one per interpreter): the baseline of "peak anonymous memory above torch".
  4. on the last repeat, a few output tensors of both compared in units of the output dtype's ulp
     (how many representable values apart), and with an independent float64 reference of the method
     (TIES, Model Stock). DARE-TIES draws different random masks in soup and mergekit: its line
     compares statistics of the merged deltas instead (fraction of entries changed, means).

Run `python benchmarks/bench_methods.py --help`; benchmarks/README.md explains the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import bench_merge as bm  # noqa: E402

N_FINETUNES = 3
NOISE_STD = 0.002  # std of a fine-tune's delta (the weights' std is 0.02: deltas ~10% of the weights)
SHARD_SIZE = "2GB"  # ingredient and output shards (passed to soup as given, to mergekit in bytes)
SEED = 0  # base seed; DARE's seed in both tools
DENSITY, WEIGHT = 0.5, 1.0
METHOD_ENV = "SOUP_BENCH_METHOD"  # how the engine child learns the method and the base
SOUP_TARGET = 300 * 1000 * 1000  # soup's target: peak anonymous memory <= torch-only + 300 MB
MKVENV_PYTHON = Path("/tmp/mkvenv/bin/python")

# name -> (shared parameters, per-model parameters or None); the same values go to soup and mergekit
METHODS: dict[str, tuple[dict, dict | None]] = {
    "ties": ({"normalize": True}, {"density": DENSITY, "weight": WEIGHT}),
    "dare_ties": ({"normalize": True}, {"density": DENSITY, "weight": WEIGHT}),  # rescale: on by default in both
    "model_stock": ({}, None),  # filter_wise off (default in both)
}


# ---------------------------------------------------------------------------------------------------
# the engine child: bench_merge's ENGINE_CHILD calls this (--merge-fn bench_methods:method_merge)


def method_merge(ingredients, out, *, weights=None, **options):
    """soup.merge with the method and base named in $SOUP_BENCH_METHOD (ENGINE_CHILD's weights ignored:
    the per-model weights are in the method's ``models``)."""
    import soup

    spec = json.loads(os.environ[METHOD_ENV])
    return soup.merge(ingredients, out, method=spec["method"], base=spec["base"], seed=spec["seed"], **options)


def soup_method(name: str, n: int) -> dict:
    shared, per_model = METHODS[name]
    out = {"name": name, **shared}
    if per_model:
        out["models"] = [dict(per_model) for _ in range(n)]
    return out


def mergekit_config(name: str, base: Path, finetunes: list[Path], dtype: str) -> str:
    shared, per_model = METHODS[name]
    lines = [f"merge_method: {name}", f"base_model: {base}", "models:"]
    for p in finetunes:
        lines.append(f"  - model: {p}")
        if per_model:
            lines += ["    parameters:"] + [f"      {k}: {v!r}" for k, v in per_model.items()]
    if shared:
        lines += ["parameters:"] + [f"  {k}: {json.dumps(v)}" for k, v in shared.items()]
    lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# fine-tunes derived from the base


def make_finetune(folder: Path, base: Path, dims: bm.LlamaDims, dtype: str, j: int, noise: float) -> None:
    """base + noise/sqrt(2) * (shared + own_j), shard by shard (same files, index and config as the base)."""
    recipe = {"base": json.loads((base / bm.MARKER).read_text()), "finetune": j, "noise": noise}
    marker = folder / bm.MARKER
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    order = {name: i for i, (name, _) in enumerate(dims.tensors())}
    seed = recipe["base"]["seed"]
    for shard in bm.safetensors_files(base):
        tensors = {}
        with safe_open(shard, "pt") as st:
            for name in sorted(st.keys(), key=order.__getitem__):
                x = st.get_tensor(name)
                gens = [torch.Generator().manual_seed((seed * 1_000_003 + order[name]) * 16 + k) for k in (0, j)]
                delta = torch.randn(x.shape, generator=gens[0])
                delta += torch.randn(x.shape, generator=gens[1])
                tensors[name] = delta.mul_(noise / math.sqrt(2)).add_(x.float()).to(getattr(torch, dtype))
                del delta
        tmp = folder / (shard.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / shard.name)
        del tensors
    for extra in ("model.safetensors.index.json", "config.json"):
        shutil.copy(base / extra, folder / extra)
    marker.write_text(json.dumps(recipe))


# ---------------------------------------------------------------------------------------------------
# correctness: distances in ulps, a float64 reference, DARE statistics


def ulp_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s representable values at |x| (float64; the subnormal step near 0)."""
    fi = torch.finfo(dtype)
    x = x.double().abs()
    spacing = torch.ldexp(torch.full_like(x, fi.eps), torch.frexp(x).exponent - 1)
    return torch.where(x < fi.smallest_normal, fi.smallest_normal * fi.eps, spacing)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in ulps of the output dtype at the larger of |a|, |b| (0 where equal)."""
    return (a.double() - b.double()).abs() / ulp_of(torch.maximum(a.double().abs(), b.double().abs()), a.dtype)


def reference(name: str, xs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The method in float64 on a whole tensor (xs: (n, numel), base: (numel,)), from the papers'
    definitions with the parameters of METHODS (weights 1): written here, independent of both tools."""
    xs, base = xs.double(), base.double()
    d = xs - base
    if name == "ties":
        numel = d.shape[1]
        k = max(1, int(DENSITY * numel))  # keep the k largest |delta|; all values equal to the k-th too
        mag = d.abs()
        kth = mag.kthvalue(numel - k + 1, dim=1, keepdim=True).values
        d = torch.where(mag >= kth, d, 0.0)
        elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(d) == elected
        count = agree.sum(0).double()
        return base + torch.where(agree, d, 0.0).sum(0) / torch.where(count == 0, 1.0, count)
    if name == "model_stock":
        n = d.shape[0]
        norms = d.norm(dim=1)
        cos = torch.stack([((d[i] @ d[j]) / max(float(norms[i] * norms[j]), 1e-6)).clamp(-1, 1)
                           for i in range(n) for j in range(i + 1, n)]).mean()
        den = 1 + (n - 1) * cos
        t = 0.0 if abs(float(den)) < 1e-6 else n * cos / den
        return t * xs.mean(0) + (1 - t) * base
    raise ValueError(name)


def sample_names(dims: bm.LlamaDims) -> list[str]:
    last = dims.layers - 1
    return ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
            f"model.layers.{last}.input_layernorm.weight", "model.norm.weight", "lm_head.weight"]


class Distance:
    """Running worst and counts of the differences over the sampled tensors."""

    def __init__(self) -> None:
        self.worst, self.where, self.worst_abs, self.diff, self.over1, self.total = 0.0, "", 0.0, 0, 0, 0

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        u = ulps(a, b)
        m = float(u.max())
        if m > self.worst:
            self.worst, self.where = m, name
        self.worst_abs = max(self.worst_abs, float((a.double() - b.double()).abs().max()))
        self.diff += int((u > 0).sum())
        self.over1 += int((u > 1).sum())
        self.total += u.numel()

    def text(self) -> str:
        where = f" in {self.where.removeprefix('model.')}" if self.worst else ""
        return (f"max {self.worst:.3g} ulp{where} (max |diff| {self.worst_abs:.2e}), "
                f"{100 * self.diff / self.total:.3g}% differ, {100 * self.over1 / self.total:.3g}% by > 1 ulp")


def check_method(name: str, soup_out: Path, mk_out: Path | None, base: Path, finetunes: list[Path],
                 dims: bm.LlamaDims, dtype: str) -> tuple[str, bool]:
    """The correctness line of one method, and whether soup passed (TIES, Model Stock: within one ulp
    of the float64 reference, plus float32 rounding of the work values where the result cancels)."""
    names = sample_names(dims)
    tdtype = getattr(torch, dtype)
    soup_map = bm.open_index(soup_out)
    mk_map = bm.open_index(mk_out) if mk_out is not None else None
    base_map, ft_maps = bm.open_index(base), [bm.open_index(f) for f in finetunes]
    expected = dict(dims.tensors())
    if set(soup_map) != set(expected):
        return f"FAIL soup's tensor names differ ({len(set(soup_map) ^ set(expected))} mismatched)", False
    numel = 0
    if name == "dare_ties":  # different random masks: statistics of out - base instead of values
        stats = {who: [0, 0.0, 0.0] for who in ("soup", "mergekit", "expected")}  # changed, sum d, sum |d|
        for t in names:
            b = bm.load(base_map, t)
            numel += b.numel()
            for who, where in (("soup", soup_map), ("mergekit", mk_map)):
                if where is None:
                    continue
                d = bm.load(where, t).double() - b.double()
                stats[who][0] += int((d != 0).sum())
                stats[who][1] += float(d.sum())
                stats[who][2] += float(d.abs().sum())
        parts = []
        for who in ("soup", "mergekit"):
            if who == "mergekit" and mk_map is None:
                continue
            changed, total, absolute = stats[who]
            parts.append(f"{who}: {100 * changed / numel:.2f}% of entries changed from the base, "
                         f"mean(out-base) {total / numel:+.3e}, mean|out-base| {absolute / numel:.3e}")
        line = (f"random masks differ from mergekit's, so statistics over {len(names)} tensors ({numel} values; "
                f"density {DENSITY} x {len(finetunes)} models: at most {100 * (1 - (1 - DENSITY) ** len(finetunes)):.1f}% "
                f"changed) -- " + "; ".join(parts))
        return line, True
    vs_mk, soup_ref, mk_ref = Distance(), Distance(), Distance()
    within = True
    for t in names:
        s = bm.load(soup_map, t)
        if tuple(s.shape) != expected[t] or s.dtype != tdtype:
            return f"FAIL {t}: {tuple(s.shape)} {s.dtype}, expected {expected[t]} {tdtype}", False
        b = bm.load(base_map, t).reshape(-1)
        xs = torch.stack([bm.load(m, t).reshape(-1) for m in ft_maps])
        ref64 = reference(name, xs, b)
        ref = ref64.to(tdtype)
        s = s.reshape(-1)
        # soup works in float32: allowed, one ulp of the output plus float32 rounding of the work values
        # (matters only where the result cancels to far below the inputs' magnitude)
        work_err = 8 * torch.finfo(torch.float32).eps * (b.double().abs() + xs.double().abs().amax(0))
        within &= bool(((s.double() - ref64).abs() <= ulp_of(ref64, tdtype) + work_err).all())
        del xs, b, ref64, work_err
        numel += s.numel()
        soup_ref.add(t, s, ref)
        if mk_map is not None:
            k = bm.load(mk_map, t).reshape(-1)
            vs_mk.add(t, s, k)
            mk_ref.add(t, k, ref)
    ok = within
    line = f"{len(names)} tensors ({numel} values): "
    if mk_map is not None:
        line += f"soup vs mergekit {vs_mk.text()}; "
    line += (f"soup vs float64 reference {soup_ref.text()} "
             f"({'within' if ok else 'OUTSIDE'} 1 ulp + float32 work error)")
    if mk_map is not None:
        line += f"; mergekit vs float64 reference {mk_ref.text()}"
    return ("ok" if ok else "FAIL") + " -- " + line, ok


# ---------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", default="1GB", help="size of one ingredient (decimal MB/GB, or MiB/GiB)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each measurement; min time, max memory")
    ap.add_argument("--methods", default="ties,dare_ties,model_stock", help="comma-separated, of " + ",".join(METHODS))
    ap.add_argument("--mergekit-python", help="python of a venv with mergekit (default: /tmp/mkvenv/bin/python if "
                    "present, else mergekit-yaml from PATH)")
    ap.add_argument("--no-mergekit", action="store_true", help="soup only")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "soup-bench-methods",
                    help="ingredients are cached here; outputs go here too")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (out-soup-METHOD, out-mergekit-METHOD)")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="memory sampling interval of the children")
    args = ap.parse_args(argv)
    dtype = "bfloat16"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        size, shard_bytes = bm.parse_size(args.size), bm.parse_size(SHARD_SIZE)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    dims = bm.dims_for(size, dtype)
    one_bytes = dims.n_params() * bm.ITEMSIZE[dtype]

    # ingredients: a base from make_ingredient, fine-tunes derived from it (cached)
    args.workdir.mkdir(parents=True, exist_ok=True)
    key = f"llama-h{dims.hidden}-l{dims.layers}-{dtype}-shard{shard_bytes}"
    base = args.workdir / key / f"base-{SEED}"
    finetunes = [args.workdir / key / f"finetune-{SEED}-{j}-noise{NOISE_STD:g}" for j in range(1, N_FINETUNES + 1)]
    missing = [f for f in [base, *finetunes] if not (f / bm.MARKER).exists()]
    need = one_bytes * (len(missing) + 4) + (4 << 30)  # new ingredients, floor scratch, two outputs, recycling
    free = shutil.disk_usage(args.workdir).free
    if need > free:
        log(f"error: needs about {bm.fmt_bytes(need)} free in {args.workdir}, has {bm.fmt_bytes(free)}")
        return 2
    t0 = time.perf_counter()
    log(f"base: {base}")
    bm.make_ingredient(base, dims, dtype, shard_bytes, SEED)
    for j, folder in enumerate(finetunes, 1):
        log(f"fine-tune {j}/{N_FINETUNES}: {folder}")
        make_finetune(folder, base, dims, dtype, j, NOISE_STD)
    if missing:
        log(f"generated {len(missing)} ingredient(s) in {time.perf_counter() - t0:.1f} s")
    files = [f for folder in [base, *finetunes] for f in bm.safetensors_files(folder)]
    in_bytes = sum(f.stat().st_size for f in files)

    # page cache: bench_merge's preparation (scratch file written and deleted, inputs read once: warm)
    buf = memoryview(bytearray(bm.READ_BUF))
    recycle = {"scratch": str(args.workdir / "recycle-scratch.bin"), "bytes": min(2 * one_bytes, 4 << 30),
               "cold": False, "bench_dir": str(BENCH_DIR)}

    def prepare_cache() -> None:
        scratch = Path(recycle["scratch"])
        bm.write_file(scratch, recycle["bytes"], buf)
        scratch.unlink()
        os.sync()
        bm.read_all(files, buf)

    # mergekit: --mergekit-python, else /tmp/mkvenv, else mergekit-yaml on PATH
    if args.mergekit_python is None and MKVENV_PYTHON.exists():
        args.mergekit_python = str(MKVENV_PYTHON)
    mk_args = argparse.Namespace(no_mergekit=args.no_mergekit, mergekit_yaml=None, mergekit_python=args.mergekit_python)
    mk_cmd = bm.find_mergekit(mk_args)
    mk_note = "skipped (--no-mergekit)" if args.no_mergekit else \
        "not found (pass --mergekit-python)" if mk_cmd is None else ""
    mk_py = bm.mergekit_python(mk_args, mk_cmd) if mk_cmd else None
    mk_flags = ["--lazy-unpickle", "--no-cuda", "--out-shard-size", str(shard_bytes), "--no-copy-tokenizer",
                "--quiet", "--random-seed", str(SEED)]
    sample_s = args.sample_ms / 1000

    log("torch-only baseline ...")
    torch_base = {sys.executable: bm.run_child([sys.executable, "-c", bm.TORCH_CHILD], sample_s, bm.child_env())}
    if mk_py and mk_py not in torch_base:
        torch_base[mk_py] = bm.run_child([mk_py, "-c", bm.TORCH_CHILD], sample_s, bm.child_env())

    env = bm.child_env(bm.REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env["PYTHONPATH"]])
    floors: list[tuple[float, float, float]] = []
    soups: dict[str, list[bm.ChildRun]] = {m: [] for m in methods}
    mks: dict[str, list[bm.ChildRun]] = {m: [] for m in methods}
    mk_fail: dict[str, str] = {}
    checks: dict[str, str] = {}
    failed = False
    for r in range(args.repeats):
        for name in methods:  # interleaved: drifting machine load hits every row alike
            tag = f"repeat {r + 1}/{args.repeats}, {name}"
            log(f"{tag}: floor ...")
            prepare_cache()
            floors.append(bm.floor_once(files, one_bytes, args.workdir / "floor-scratch.bin", buf))

            log(f"{tag}: soup ...")
            soup_out = args.workdir / f"out-soup-{name}"
            shutil.rmtree(soup_out, ignore_errors=True)
            spec = {"merge_fn": "bench_methods:method_merge", "ingredients": [str(f) for f in finetunes],
                    "out": str(soup_out), "weights": None, "dtype": dtype, "shard_size": SHARD_SIZE,
                    "prepare": recycle}
            env[METHOD_ENV] = json.dumps({"method": soup_method(name, len(finetunes)), "base": str(base),
                                          "seed": SEED})
            prepare_cache()
            run = bm.run_child([sys.executable, "-c", bm.ENGINE_CHILD, json.dumps(spec)], sample_s, env)
            if run.returncode != 0 or "merge_s" not in run.report:
                log(f"error: the soup child ({name}) exited with {run.returncode}:\n{run.stderr_tail}")
                checks[name] = f"FAIL soup exited with {run.returncode}: " + \
                    (run.stderr_tail.splitlines() or [""])[-1][:200]
                failed = True
            else:
                soups[name].append(run)

            mk_out = args.workdir / f"out-mergekit-{name}"
            mk_done = False
            if mk_cmd and name not in mk_fail:
                log(f"{tag}: mergekit-yaml ...")
                shutil.rmtree(mk_out, ignore_errors=True)
                yml = args.workdir / f"mergekit-{name}.yml"
                yml.write_text(mergekit_config(name, base, finetunes, dtype))
                prepare_cache()
                run = bm.run_child([*mk_cmd, str(yml), str(mk_out), *mk_flags], sample_s, bm.child_env())
                if run.returncode != 0:
                    last = run.stderr_tail.splitlines()[-1][:200] if run.stderr_tail else ""
                    mk_fail[name] = f"failed (exit {run.returncode}) {last}"
                    log(f"mergekit failed:\n{run.stderr_tail}")
                else:
                    mks[name].append(run)
                    mk_done = True

            if r == args.repeats - 1 and soups[name] and name not in checks:
                log(f"{tag}: checking ...")
                checks[name], ok = check_method(name, soup_out, mk_out if mk_done else None, base, finetunes,
                                                dims, dtype)
                failed |= not ok
            if not args.keep:
                shutil.rmtree(soup_out, ignore_errors=True)
                shutil.rmtree(mk_out, ignore_errors=True)

    # report: min time over repeats, max memory
    floor_s = min(rd + wr for rd, wr, _ in floors)
    read_s, write_s = min(rd for rd, _, _ in floors), min(wr for _, wr, _ in floors)
    torch_anon = torch_base[sys.executable].report["RssAnon"]
    mk_torch_anon = torch_base[mk_py].report["RssAnon"] if mk_py else 0
    print(f"soup merge methods benchmark: base + {N_FINETUNES} fine-tunes x {bm.fmt_bytes(one_bytes)} {dtype} "
          f"(Llama: hidden {dims.hidden}, {dims.layers} layers, vocab {dims.vocab}, {len(dims.tensors())} tensors, "
          f"{len(files) // (N_FINETUNES + 1)} shard(s) each); fine-tune = base + N(0, {NOISE_STD:g}) noise "
          f"(half shared between fine-tunes); output shards {SHARD_SIZE}")
    print(f"page cache: warm (all inputs read once before each measurement); repeats: {args.repeats} "
          f"(time: min; memory: max); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}; "
          f"{args.workdir / key}")
    print(f"floor: read {bm.fmt_bytes(in_bytes)} in {read_s:.2f} s ({in_bytes / read_s / 1e9:.2f} GB/s) + write "
          f"{bm.fmt_bytes(one_bytes)} in {write_s:.2f} s ({one_bytes / write_s / 1e9:.2f} GB/s) = {floor_s:.2f} s "
          f"(min of {len(floors)})")
    for py, b in torch_base.items():
        label = "torch-only child" + ("" if py == sys.executable else " (mergekit venv)")
        print(f"{label}: peak anon {bm.fmt_bytes(b.report['RssAnon'])}, peak RSS {bm.fmt_bytes(b.peak_rss)}")
    print()
    hdr = (f"{'method':<12} {'run':<30} {'time s':>7} {'max s':>7} {'cpu s':>7} {'x floor':>8} {'peak RSS':>11} "
           f"{'peak anon':>11} {'anon-torch':>11}  target")
    print(hdr)
    print("-" * len(hdr))

    def row(method, label, times, cpu, rss=None, anon=None, base_anon=None, target=""):
        best = min(times)
        cells = [f"{method:<12}", f"{label:<30}", f"{best:>7.2f}",
                 f"{max(times):>7.2f}" if len(times) > 1 else " " * 7, f"{cpu:>7.2f}", f"{best / floor_s:>7.2f}x",
                 f"{bm.fmt_bytes(rss):>11}" if rss is not None else " " * 11,
                 f"{bm.fmt_bytes(anon):>11}" if anon is not None else " " * 11,
                 f"{bm.fmt_bytes(anon - base_anon):>11}" if anon is not None else " " * 11]
        print((" ".join(cells) + (f"  {target}" if target else "")).rstrip())

    summary = []
    for name in methods:
        s_runs, k_runs = soups[name], mks[name]
        if s_runs:
            anon = max(s.peak_anon for s in s_runs)
            above = anon - torch_anon
            verdict = f"{'meets' if above <= SOUP_TARGET else 'MISSES'} <= +300 MB"
            row(name, "soup.merge() inside child", [s.report["merge_s"] for s in s_runs],
                min(s.report["merge_cpu_s"] for s in s_runs))
            row("", "soup child, whole process", [s.wall for s in s_runs], min(s.cpu for s in s_runs),
                max(s.peak_rss for s in s_runs), anon, torch_anon, verdict)
            after = s_runs[-1].report["after_imports"]
            print(f"{'':<12} {'  soup child after imports':<30} {'':>7} {'':>7} {'':>7} {'':>8} "
                  f"{bm.fmt_bytes(after['VmRSS']):>11} {bm.fmt_bytes(after['RssAnon']):>11} "
                  f"{bm.fmt_bytes(after['RssAnon'] - torch_anon):>11}")
            summary.append(f"{name}: soup {min(s.report['merge_s'] for s in s_runs) / floor_s:.2f}x floor, "
                           f"+{bm.fmt_bytes(above)} anon")
        else:
            print(f"{name:<12} soup failed")
        if k_runs:
            k_anon = max(s.peak_anon for s in k_runs)
            row("" if s_runs else name, "mergekit-yaml, whole process", [s.wall for s in k_runs],
                min(s.cpu for s in k_runs), max(s.peak_rss for s in k_runs), k_anon, mk_torch_anon)
            if s_runs:
                summary[-1] += (f", mergekit {min(s.wall for s in k_runs) / floor_s:.2f}x floor "
                                f"({min(s.wall for s in k_runs) / min(s.wall for s in s_runs):.2f}x soup's process), "
                                f"+{bm.fmt_bytes(k_anon - mk_torch_anon)} anon")
        elif name in mk_fail:
            print(f"{'':<12} mergekit-yaml {mk_fail[name]}")
    print()
    for name in methods:
        if name in checks:
            print(f"check {name}: {checks[name]}")
    if mk_note:
        print(f"mergekit: {mk_note}")
    elif mk_cmd:
        print(f"mergekit command: {' '.join(mk_cmd)} {args.workdir}/mergekit-METHOD.yml OUT {' '.join(mk_flags)}")
        print("mergekit config (ties): " + " | ".join(mergekit_config("ties", Path("BASE"), [Path("FT1")], dtype)
                                                      .strip().splitlines()))
    for name in methods:
        shared, per_model = METHODS[name]
        models = f", 'models': [{per_model}] * {N_FINETUNES}" if per_model else ""
        print(f"soup call ({name}): soup.merge([FT1, FT2, FT3], OUT, method={{'name': '{name}'"
              f"{''.join(f', {k!r}: {v!r}' for k, v in shared.items())}{models}}}, base=BASE, seed={SEED}, "
              f"dtype='{dtype}', shard_size='{SHARD_SIZE}', device='cpu')")
    print("RATIOS: " + " | ".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
