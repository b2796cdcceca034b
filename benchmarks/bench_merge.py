"""Benchmark soup.merge against the I/O floor and against mergekit, side by side in one run.

What it does, top to bottom:
  1. builds N synthetic ingredients with a Llama-style tensor layout (embed_tokens, per-layer
     q/k/v/o_proj, gate/up/down_proj, two layernorms, norm, lm_head) as HF folders: sharded
     safetensors + model.safetensors.index.json + a LlamaConfig config.json. Tensors are written one by
     one in row chunks, so generating needs little memory. Folders are cached under --workdir and reused
     when the parameters match (a marker file is written last).
  2. measures the FLOOR: one plain sequential read of every input file into a reused buffer plus one
     write of a file the size of the output, in the same page-cache state as the merges; and a
     PARALLEL READ of every input (8 threads x 16 MiB preads): the cold-cache yardstick.
  3. runs soup.merge in a child process; the child times soup.merge(...) itself, after its imports.
     The parent times the whole child (imports included) and samples VmHWM / RssAnon from
     /proc/<pid>/status every --sample-ms.
  4. measures a child that only imports torch: the baseline for "anonymous memory above torch".
  5. if mergekit is available, runs mergekit-yaml with a linear merge of the same inputs the same way.
  6. checks a few output tensors against an fp32 weighted mean, then prints a table and a line of ratios.

Run `python benchmarks/bench_merge.py --help`; benchmarks/README.md explains the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000  # Llama-2 vocabulary; hidden size and layer count are derived from --size
CHUNK_ELEMS = 16 * 1024 * 1024  # elements generated per write while building ingredients
READ_BUF = 64 * 1024 * 1024  # reused buffer of the floor's read and write
ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
MARKER = "bench-ingredient.json"  # written last into each ingredient folder: its presence means complete
RESULT_TAG = "BENCH_RESULT "  # prefix of the one stdout line a child reports on


# ---------------------------------------------------------------------------------------------------
# sizes


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000 (decimal, as Hugging Face reads shard sizes); '2GiB' -> binary; '123' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256MB, 1GB, 2GiB)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


# ---------------------------------------------------------------------------------------------------
# synthetic ingredients


@dataclass(frozen=True)
class LlamaDims:
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size of the SwiGLU MLP
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (grouped-query attention, as in Llama 3 / Qwen2)
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order a Hugging Face checkpoint stores them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self, dtype: str) -> dict:
        """A LlamaConfig as config.json, so transformers and mergekit accept the folder."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "initializer_range": 0.02,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "torch_dtype": dtype,
            "dtype": dtype,
        }


def dims_for(target_bytes: int, dtype: str) -> LlamaDims:
    """The widest Llama shape with >= 16 layers (embeddings <= 1/3 of the model) near target_bytes."""
    n = target_bytes / ITEMSIZE[dtype]

    def shape(h: int, layers: int = 1) -> LlamaDims:
        head_dim = 64 if h <= 1024 else 128
        heads = h // head_dim
        inter = math.ceil(8 * h / 3 / 256) * 256  # Llama rounding: 4096 -> 11008
        return LlamaDims(h, inter, layers, heads, max(1, heads // 4))

    for h in (4096, 3072, 2560, 2048, 1536, 1280, 1024, 768, 512, 384, 256):
        one = shape(h)
        per_layer = one.n_params() - shape(h, 0).n_params()
        fixed = shape(h, 0).n_params()
        if h == 256 or (fixed <= n / 3 and 16 * per_layer <= n - fixed):
            return shape(h, max(1, round((n - fixed) / per_layer)))
    raise AssertionError


def plan_shards(tensors, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in file order; a shard closes before the tensor that would push it past shard_bytes."""
    shards, cur, cur_bytes = [], [], 0
    for name, shp in tensors:
        nbytes = math.prod(shp) * itemsize
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shp))
        cur_bytes += nbytes
    shards.append(cur)
    return shards


def write_shard(path: Path, entries, dtype: str, gen: torch.Generator) -> None:
    """Write one safetensors file tensor by tensor (header first), through a temp file and a rename."""
    itemsize, tdtype = ITEMSIZE[dtype], getattr(torch, dtype)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shp in entries:
        nbytes = math.prod(shp) * itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shp in entries:
            rows, cols = (shp[0], shp[1]) if len(shp) == 2 else (1, shp[0])
            step = max(1, CHUNK_ELEMS // cols)
            for r in range(0, rows, step):
                chunk = torch.empty((min(step, rows - r), cols), dtype=tdtype)
                if len(shp) == 1:  # norm weights sit near 1
                    chunk.normal_(1.0, 0.02, generator=gen)
                else:
                    chunk.normal_(0.0, 0.02, generator=gen)
                f.write(chunk.view(torch.uint8).numpy())
    os.replace(tmp, path)


def make_ingredient(folder: Path, dims: LlamaDims, dtype: str, shard_bytes: int, seed: int) -> None:
    """One HF folder with random, seeded weights; skipped when a complete one with the same recipe exists."""
    recipe = {"dims": dims.__dict__, "dtype": dtype, "shard_bytes": shard_bytes, "seed": seed}
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards = plan_shards(dims.tensors(), ITEMSIZE[dtype], shard_bytes)
    weight_map, total = {}, 0
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / fname, entries, dtype, gen)
        for name, shp in entries:
            weight_map[name] = fname
            total += math.prod(shp) * ITEMSIZE[dtype]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(dims.config(dtype), indent=2))
    marker.write_text(json.dumps(recipe))


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------
# page cache and the floor


def read_all(files: list[Path], buf: memoryview) -> int:
    """Plain sequential read of every file into one reused buffer; returns bytes read."""
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def read_parallel(files: list[Path], threads: int = 8, chunk: int = 16 << 20) -> int:
    """Every file read once by ``threads`` threads at a time, in 16 MiB preads taken in file order:
    the most a disk serves with several requests in flight (the cold-cache floor). Returns bytes read."""
    import threading

    work = [(p, off, min(chunk, size - off)) for p in files for size in [p.stat().st_size]
            for off in range(0, size, chunk)]
    lock, total, nxt = threading.Lock(), [0], [0]

    def run() -> None:
        buf = bytearray(chunk)
        fds: dict[Path, int] = {}
        try:
            while True:
                with lock:
                    if nxt[0] >= len(work):
                        return
                    p, off, n = work[nxt[0]]
                    nxt[0] += 1
                fd = fds.get(p) or fds.setdefault(p, os.open(p, os.O_RDONLY))
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
                with lock:
                    total[0] += got
        finally:
            for fd in fds.values():
                os.close(fd)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return total[0]


def write_file(path: Path, nbytes: int, buf: memoryview) -> None:
    """Write nbytes from the buffer into a new file (no fsync, like the merges)."""
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(buf[: min(left, len(buf))])


def drop_caches() -> str | None:
    """Drop the page cache; returns why not when it cannot."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def parallel_read_once(files: list[Path]) -> float:
    """Seconds to read every input once with several reads in flight (``read_parallel``)."""
    t0 = time.perf_counter()
    read_parallel(files)
    return time.perf_counter() - t0


def floor_once(files: list[Path], out_bytes: int, scratch: Path, buf: memoryview) -> tuple[float, float, float]:
    """(read seconds, write seconds, CPU seconds of both) of the I/O floor: a sequential read, a write."""
    c0, t0 = time.process_time(), time.perf_counter()
    read_all(files, buf)
    t1 = time.perf_counter()
    write_file(scratch, out_bytes, buf)
    t2, c2 = time.perf_counter(), time.process_time()
    scratch.unlink()
    return t1 - t0, t2 - t1, c2 - c0


# ---------------------------------------------------------------------------------------------------
# children: timed and sampled from outside


@dataclass
class ChildRun:
    wall: float  # seconds from spawn to reap, imports included
    cpu: float  # user + system CPU seconds of the child (wait4), robust to other load on the machine
    peak_rss: int  # bytes; highest sampled VmHWM (the kernel's high-water mark of this program's RSS)
    peak_anon: int  # bytes; highest sampled RssAnon
    samples: int
    returncode: int
    report: dict = field(default_factory=dict)  # the child's BENCH_RESULT line, if any
    stderr_tail: str = ""


def _status_kb(pid: int) -> tuple[int, int] | None:
    """(VmHWM, RssAnon) in kB, or None once the process is gone or a zombie.

    VmHWM, unlike wait4's ru_maxrss, starts over at exec: ru_maxrss also counts the parent's memory
    the child shared between fork and exec, which made a torch-only child look as big as this script.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    hwm = re.search(rb"^VmHWM:\s+(\d+)", text, re.MULTILINE)
    anon = re.search(rb"^RssAnon:\s+(\d+)", text, re.MULTILINE)
    return (int(hwm.group(1)), int(anon.group(1))) if hwm and anon else None


def run_child(cmd: list[str], sample_s: float, env: dict | None = None) -> ChildRun:
    """Run cmd, sampling its memory until it exits; stdout/stderr go to temp files (no pipe stalls)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        peak_rss, peak_anon, samples = 0, 0, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            kb = _status_kb(proc.pid)
            if kb:
                peak_rss, peak_anon, samples = max(peak_rss, kb[0]), max(peak_anon, kb[1]), samples + 1
            time.sleep(sample_s)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    report = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            report = json.loads(line[len(RESULT_TAG):])
    return ChildRun(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss=peak_rss * 1024,
        peak_anon=peak_anon * 1024,
        samples=samples,
        returncode=proc.returncode,
        report=report,
        stderr_tail="\n".join((stderr + stdout).strip().splitlines()[-25:]),
    )


# Runs in the engine's child: imports, clears the output, then times the merge call alone.
ENGINE_CHILD = r"""
import importlib, json, re, shutil, sys, time
spec = json.loads(sys.argv[1])
module, _, attr = spec["merge_fn"].partition(":")
merge = getattr(importlib.import_module(module), attr or "merge")
import torch
def status():
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024 for k in ("VmRSS", "RssAnon")}
shutil.rmtree(spec["out"], ignore_errors=True)
prep = spec.get("prepare")
if prep:  # the parent's prepare_cache, repeated here after the imports (see prepare_cache)
    import os, pathlib
    sys.path.insert(0, prep["bench_dir"])
    from bench_merge import drop_caches, write_file
    buf = memoryview(bytearray(1 << 20))  # small: the child's anonymous memory is measured
    write_file(pathlib.Path(prep["scratch"]), prep["bytes"], buf)
    os.unlink(prep["scratch"])
    os.sync()
    if prep["cold"]:
        drop_caches()
    del buf
after_imports = status()
c0, t0 = time.process_time(), time.perf_counter()
result = merge(spec["ingredients"], spec["out"], weights=spec["weights"], dtype=spec["dtype"],
               shard_size=spec["shard_size"], device="cpu", overwrite=True)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print("BENCH_RESULT " + json.dumps({"merge_s": seconds, "merge_cpu_s": cpu, "after_imports": after_imports,
                                    "path": str(getattr(result, "path", spec["out"]))}), flush=True)
"""

# Runs in the baseline child: only `import torch`, then reports its own memory.
TORCH_CHILD = r"""
import json, re, time
t0 = time.perf_counter()
import torch
t = time.perf_counter() - t0
text = open("/proc/self/status").read()
mem = {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024 for k in ("VmRSS", "RssAnon")}
print("BENCH_RESULT " + json.dumps({"import_s": t, **mem}), flush=True)
"""


def child_env(extra_path: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), os.environ.get("PYTHONPATH")]))
    return env


def find_mergekit(args) -> list[str] | None:
    """The mergekit-yaml command line prefix, or None when mergekit is not available."""
    if args.no_mergekit:
        return None
    if args.mergekit_yaml:
        return [args.mergekit_yaml]
    if args.mergekit_python:
        return [args.mergekit_python, "-m", "mergekit.scripts.run_yaml"]
    found = shutil.which("mergekit-yaml")
    return [found] if found else None


def mergekit_python(args, mk_cmd: list[str]) -> str:
    """The interpreter mergekit runs under (for its torch-only baseline)."""
    if args.mergekit_python:
        return args.mergekit_python
    first = Path(mk_cmd[0]).read_text(errors="replace").splitlines()[0] if Path(mk_cmd[0]).is_file() else ""
    return first[2:].strip() if first.startswith("#!") else sys.executable


def mergekit_config(ingredients: list[Path], weights: list[float], dtype: str) -> str:
    lines = ["merge_method: linear", f"dtype: {dtype}", "models:"]
    for p, w in zip(ingredients, weights):
        lines += [f"  - model: {p}", "    parameters:", f"      weight: {w!r}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# correctness check on a few tensors


def open_index(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for f in safetensors_files(folder):
        with safe_open(f, "pt") as st:
            out.update({k: f for k in st.keys()})
    return out


def load(where: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(where[name], "pt") as st:
        return st.get_tensor(name)


def check_output(out: Path, ingredients: list[Path], weights: list[float], dims: LlamaDims, dtype: str) -> str:
    """Names, shapes and dtypes of all tensors; values of a few against an fp32 weighted mean."""
    got = open_index(out)
    expected = dict(dims.tensors())
    if set(got) != set(expected):
        return f"FAIL tensor names differ: {len(set(got) ^ set(expected))} mismatched"
    tdtype = getattr(torch, dtype)
    last = dims.layers - 1
    sample = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last}.input_layernorm.weight",
              "model.norm.weight", "lm_head.weight"]
    inputs = [open_index(p) for p in ingredients]
    worst = 0.0
    for name in sample:
        t = load(got, name)
        if tuple(t.shape) != expected[name] or t.dtype != tdtype:
            return f"FAIL {name}: {tuple(t.shape)} {t.dtype}, expected {expected[name]} {tdtype}"
        ref, magnitude = torch.zeros(t.shape), torch.zeros(t.shape)  # fp32 sum of w*x and of |w*x|
        for w, m in zip(weights, inputs):
            term = load(m, name).float().mul_(w)
            ref += term
            magnitude += term.abs_()
        # allowed: one step of the output dtype at ref (rounding; subnormal steps near zero)
        # plus the error of summing in another order in fp32
        fi = torch.finfo(tdtype)
        tol = fi.eps * ref.abs() + fi.smallest_normal * fi.eps + 4 * torch.finfo(torch.float32).eps * magnitude
        worst = max(worst, ((t.float() - ref).abs() / tol).max().item())
    verdict = "ok" if worst <= 1.0 else "FAIL"
    return f"{verdict} ({len(got)} tensors, {len(sample)} compared to an fp32 weighted mean: " \
           f"max error {worst:.2f} of tolerance)"


# ---------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ingredients", type=int, default=3, help="number of ingredients")
    ap.add_argument("--size", default="256MB", help="size of one ingredient (decimal MB/GB, or MiB/GiB)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(ST_DTYPES), help="ingredient and output dtype")
    ap.add_argument("--shard-size", default="2GB", help="shard size of ingredients and outputs")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "soup-bench",
                    help="ingredients are cached here (reused when parameters match); outputs go here too")
    ap.add_argument("--seed", type=int, default=0, help="ingredient i uses seed + i")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the minimum is reported")
    ap.add_argument("--large", action="store_true",
                    help="models larger than RAM: 4 x 8 GB bfloat16 in 5 GB shards, cold cache (needs ~45 GB of disk)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (needs root)")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="memory sampling interval of the children")
    ap.add_argument("--merge-fn", default="soup:merge",
                    help="module:function the engine child calls (to benchmark a stand-in)")
    ap.add_argument("--mergekit-python", help="python of a venv with mergekit installed")
    ap.add_argument("--mergekit-yaml", help="path of a mergekit-yaml executable (default: from PATH)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit even if it is installed")
    ap.add_argument("--no-check", action="store_true", help="skip checking output tensors")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs in --workdir")
    ap.add_argument("--json", type=Path, help="also write every raw measurement to this JSON file")
    args = ap.parse_args(argv)
    if args.large:  # issue 13: 4 ingredients of 8 GB on a 24 GB machine, from a cold page cache
        args.ingredients, args.size, args.shard_size, args.dtype, args.cold = 4, "8GB", "5GB", "bfloat16", True

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.ingredients < 1 or args.repeats < 1:
        ap.error("--ingredients and --repeats must be >= 1")
    try:
        size, shard_bytes = parse_size(args.size), parse_size(args.shard_size)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    dims = dims_for(size, args.dtype)
    itemsize = ITEMSIZE[args.dtype]
    one_bytes = dims.n_params() * itemsize
    weights = [1.0 / args.ingredients] * args.ingredients

    # ingredients (cached per shape, dtype, shard size and seed; ingredient i is shared across N)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    key = f"llama-h{dims.hidden}-l{dims.layers}-{args.dtype}-shard{shard_bytes}"
    folders = [args.workdir / key / f"ingredient-{args.seed + i}" for i in range(args.ingredients)]
    missing = [f for f in folders if not (f / MARKER).exists()]
    need = one_bytes * (len(missing) + 2) + (4 << 30)  # new ingredients, floor scratch, an output, recycling
    if need > free:
        log(f"error: needs about {fmt_bytes(need)} free in {args.workdir}, has {fmt_bytes(free)}")
        return 2
    t0 = time.perf_counter()
    for i, folder in enumerate(folders):
        log(f"ingredient {i + 1}/{len(folders)}: {folder}")
        make_ingredient(folder, dims, args.dtype, shard_bytes, args.seed + i)
    if missing:
        log(f"generated {len(missing)} ingredient(s) in {time.perf_counter() - t0:.1f} s")
    files = [f for folder in folders for f in safetensors_files(folder)]
    in_bytes = sum(f.stat().st_size for f in files)

    # page-cache state, the same before every measurement
    cache_note = "warm (all inputs read once before each measurement)"
    if args.cold:
        why = drop_caches()
        cache_note = "cold (page cache dropped before each measurement)" if why is None else \
            f"warm: --cold failed to drop caches ({why})"
        args.cold = why is None
    buf = memoryview(bytearray(READ_BUF))

    recycle = {"scratch": str(args.workdir / "recycle-scratch.bin"), "bytes": min(2 * one_bytes, 4 << 30),
               "cold": args.cold, "bench_dir": str(Path(__file__).resolve().parent)}

    def prepare_cache() -> None:
        # Write and delete a scratch file twice the output's size, so that every measurement writes
        # into recycled page-cache pages: on a VM the first touch of never-used guest memory is slow
        # (0.3-0.5 GB/s here against ~4 GB/s), which would otherwise hit whichever step runs first.
        # The kernel hands freed pages back to the host after ~2 s, so the engine child repeats this
        # after its imports (1.5 s and more), right before the timed merge, as the floor does here:
        # measured without that, the same cold merge took 4.4-5.2 s and 6-7 s of CPU, against 1.5-1.7 s
        # and 2.2-2.5 s when the cache was dropped after the imports.
        scratch = Path(recycle["scratch"])
        write_file(scratch, recycle["bytes"], buf)
        scratch.unlink()
        os.sync()  # no dirty pages of an earlier step left to slow this one down
        if args.cold:
            drop_caches()
        else:
            read_all(files, buf)

    soup_out = args.workdir / "out-soup"
    mk_out = args.workdir / "out-mergekit"
    mk_cmd = find_mergekit(args)
    mk_note = "not found (install it and pass --mergekit-python or --mergekit-yaml)" if mk_cmd is None else ""
    if args.no_mergekit:
        mk_note = "skipped (--no-mergekit)"
    sample_s = args.sample_ms / 1000

    # torch-only baselines (one per interpreter)
    log("torch-only baseline ...")
    torch_base = {sys.executable: run_child([sys.executable, "-c", TORCH_CHILD], sample_s, child_env())}
    mk_py = mergekit_python(args, mk_cmd) if mk_cmd else None
    if mk_py and mk_py not in torch_base:
        torch_base[mk_py] = run_child([mk_py, "-c", TORCH_CHILD], sample_s, child_env())

    floors, preads, soups, mks = [], [], [], []
    checks: dict[str, str] = {}
    mk_yaml = args.workdir / "mergekit-linear.yml"
    mk_yaml.write_text(mergekit_config(folders, weights, args.dtype))
    spec = {"merge_fn": args.merge_fn, "ingredients": [str(f) for f in folders], "out": str(soup_out),
            "weights": weights, "dtype": args.dtype, "shard_size": args.shard_size, "prepare": recycle}
    for r in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
        log(f"repeat {r + 1}/{args.repeats}: floor ...")
        prepare_cache()
        floors.append(floor_once(files, one_bytes, args.workdir / "floor-scratch.bin", buf))
        prepare_cache()
        preads.append(parallel_read_once(files))

        log(f"repeat {r + 1}/{args.repeats}: soup.merge ({args.merge_fn}) ...")
        shutil.rmtree(soup_out, ignore_errors=True)
        prepare_cache()
        run = run_child([sys.executable, "-c", ENGINE_CHILD, json.dumps(spec)], sample_s, child_env(REPO_ROOT))
        if run.returncode != 0 or "merge_s" not in run.report:
            log(f"error: the soup child exited with {run.returncode}:\n{run.stderr_tail}")
            return 1
        soups.append(run)
        if r == args.repeats - 1 and not args.no_check:
            log("checking the soup ...")
            checks["soup"] = check_output(soup_out, folders, weights, dims, args.dtype)
        if not args.keep:
            shutil.rmtree(soup_out, ignore_errors=True)

        if mk_cmd:
            log(f"repeat {r + 1}/{args.repeats}: mergekit-yaml ...")
            shutil.rmtree(mk_out, ignore_errors=True)
            prepare_cache()
            cmd = [*mk_cmd, str(mk_yaml), str(mk_out), "--lazy-unpickle", "--no-cuda",
                   "--out-shard-size", str(shard_bytes), "--no-copy-tokenizer", "--quiet"]
            mk_cmdline = cmd
            run = run_child(cmd, sample_s, child_env())
            if run.returncode != 0:
                last_line = run.stderr_tail.splitlines()[-1][:200] if run.stderr_tail else ""
                mk_note = f"failed (exit {run.returncode}) {last_line}"
                log(f"mergekit failed:\n{run.stderr_tail}")
                mk_cmd = None
            else:
                mks.append(run)
                if r == args.repeats - 1 and not args.no_check:
                    log("checking mergekit's output ...")
                    checks["mergekit"] = check_output(mk_out, folders, weights, dims, args.dtype)
            if not args.keep:
                shutil.rmtree(mk_out, ignore_errors=True)


    # report: min time over repeats (max alongside), max memory over repeats
    floor_s = min(r + w for r, w, _ in floors)
    floor_cpu = min(c for _, _, c in floors)
    soup_anon = max(s.peak_anon for s in soups)
    torch_anon = torch_base[sys.executable].report["RssAnon"]
    soup_wall, soup_cpu = min(s.wall for s in soups), min(s.cpu for s in soups)
    print(f"soup merge benchmark: {args.ingredients} x {fmt_bytes(one_bytes)} {args.dtype} ingredients "
          f"(Llama: hidden {dims.hidden}, {dims.layers} layers, vocab {dims.vocab}, "
          f"{len(dims.tensors())} tensors, {len(files) // len(folders)} shard(s) each), "
          f"shard size {args.shard_size}")
    print(f"page cache: {cache_note}; repeats: {args.repeats} (time: min, max; cpu: min; memory: max); "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}; {args.workdir / key}")
    print()
    hdr = (f"{'measurement':<36} {'time s':>7} {'max s':>7} {'cpu s':>7} {'x floor':>8} "
           f"{'peak RSS':>11} {'peak anon':>11} {'anon-torch':>11}")
    print(hdr)
    print("-" * len(hdr))

    def row(label, times=(), cpu=None, rss=None, anon=None, base=None, vs_floor=True):
        blank = lambda width: " " * width  # noqa: E731
        best = min(times) if times else None
        cells = [f"{label:<36}",
                 f"{best:>7.2f}" if times else blank(7),
                 f"{max(times):>7.2f}" if len(times) > 1 else blank(7),
                 f"{cpu:>7.2f}" if cpu is not None else blank(7),
                 f"{best / floor_s:>7.2f}x" if times and vs_floor else blank(8),
                 f"{fmt_bytes(rss):>11}" if rss is not None else blank(11),
                 f"{fmt_bytes(anon):>11}" if anon is not None else blank(11),
                 f"{fmt_bytes(anon - base):>11}" if anon is not None and base is not None else blank(11)]
        print(" ".join(cells).rstrip())

    read_s, write_s = min(r for r, _, _ in floors), min(w for _, w, _ in floors)
    row(f"floor read {fmt_bytes(in_bytes)} ({in_bytes / read_s / 1e9:.2f} GB/s)", [r for r, _, _ in floors],
        vs_floor=False)
    row(f"floor write {fmt_bytes(one_bytes)} ({one_bytes / write_s / 1e9:.2f} GB/s)", [w for _, w, _ in floors],
        vs_floor=False)
    row("floor = read + write", [r + w for r, w, _ in floors], floor_cpu)
    pread_s = min(preads)
    row(f"read in parallel (8 x 16 MiB) ({in_bytes / pread_s / 1e9:.2f} GB/s)", preads, vs_floor=False)
    row("soup.merge() inside child", [s.report["merge_s"] for s in soups],
        min(s.report["merge_cpu_s"] for s in soups))
    row("soup child, whole process", [s.wall for s in soups], soup_cpu, max(s.peak_rss for s in soups),
        soup_anon, torch_anon)
    after = soups[-1].report["after_imports"]
    row("  soup child after imports", (), None, after["VmRSS"], after["RssAnon"], torch_anon)
    for py, base in torch_base.items():
        label = "torch-only child" + ("" if py == sys.executable else " (mergekit venv)")
        row(label, [base.wall], base.cpu, base.peak_rss, base.report["RssAnon"], vs_floor=False)
    if mks:
        mk_anon = max(s.peak_anon for s in mks)
        mk_wall, mk_cpu = min(s.wall for s in mks), min(s.cpu for s in mks)
        mk_torch_anon = torch_base[mk_py].report["RssAnon"]
        row("mergekit-yaml linear, whole process", [s.wall for s in mks], mk_cpu, max(s.peak_rss for s in mks),
            mk_anon, mk_torch_anon)
    print()
    for who, verdict in checks.items():
        print(f"check {who}: {verdict}")
    if mk_note:
        print(f"mergekit: {mk_note}")
    if mks:
        print(f"mergekit command: {' '.join(mk_cmdline)}")

    merge_s = min(s.report["merge_s"] for s in soups)
    ratios = [f"soup.merge/floor {merge_s / floor_s:.2f}x",
              f"soup.merge/parallel read {merge_s / pread_s:.2f}x",
              f"soup process/floor {soup_wall / floor_s:.2f}x",
              f"soup anon above torch {fmt_bytes(soup_anon - torch_anon)} "
              f"({(soup_anon - torch_anon) / one_bytes:.2f} x one ingredient)"]
    if mks:
        ratios += [f"mergekit/soup wall {mk_wall / soup_wall:.2f}x (cpu {mk_cpu / soup_cpu:.2f}x)",
                   f"mergekit anon above torch {fmt_bytes(mk_anon - mk_torch_anon)} "
                   f"({(mk_anon - mk_torch_anon) / max(1, soup_anon - torch_anon):.1f}x soup's)"]
    print("RATIOS: " + " | ".join(ratios))

    if args.json:
        raw = {"args": {k: str(v) for k, v in vars(args).items()}, "dims": dims.__dict__,
               "ingredient_bytes": one_bytes, "input_bytes": in_bytes, "cache": cache_note,
               "floor_read_s": [r for r, _, _ in floors], "floor_write_s": [w for _, w, _ in floors],
               "floor_cpu_s": [c for _, _, c in floors], "parallel_read_s": preads,
               "ingredients": args.ingredients, "dtype": args.dtype,
               "soup": [s.__dict__ for s in soups], "mergekit": [s.__dict__ for s in mks],
               "torch_only": {py: b.__dict__ for py, b in torch_base.items()}, "checks": checks}
        args.json.write_text(json.dumps(raw, indent=2))
    return 1 if checks.get("soup", "ok").startswith("FAIL") else 0

if __name__ == "__main__":
    sys.exit(main())
