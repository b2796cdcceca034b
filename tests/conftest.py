"""Shared fixtures: tiny real checkpoints written to tmp_path (safetensors, sharded, .bin), the
reference mean (the soup's definition), and a hub-compatible HTTP server on 127.0.0.1 with isolated HF settings."""

from __future__ import annotations

import json
import os
import tempfile
import sys
from pathlib import Path

# third-party progress bars and chatter off for the whole session, set before those libraries are imported
# (huggingface_hub, tqdm and transformers read them once): test output shows results, not bars
os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                  TRANSFORMERS_VERBOSITY="error", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from hubserver import running_hub

TOKEN = "hf_SecretTestToken_123456"  # the token the auth_hub fixture requires


def make_state(seed: int, dtype: torch.dtype = torch.bfloat16, *, big: int = 50_000) -> dict[str, torch.Tensor]:
    """A small multi-part model: vision tower, projector, LLM layers, an integer buffer."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    return {
        "model.vision_tower.patch_embed.weight": r(16, 3, 4, 4),
        "model.vision_tower.norm.weight": r(16),
        "model.mm_projector.weight": r(24, 16),
        "model.layers.0.self_attn.q_proj.weight": r(24, 24),
        "model.layers.0.mlp.up_proj.weight": r(big // 24, 24),
        "model.layers.0.mlp.up_proj.lora_A.weight": r(4, 24),
        "model.norm.weight": r(24),
        "model.scalar": r(),
        "model.position_ids": torch.arange(12, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
    }


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], *, shards: int = 1, fmt: str = "safetensors",
                     config: dict | None = None) -> Path:
    """Write ``state`` in HF layout: single file or ``shards`` shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"

    def save(sd, path):
        if fmt == "safetensors":
            save_file(sd, str(path), metadata={"format": "pt"})
        else:
            torch.save(sd, path)

    if shards == 1:
        save(state, folder / f"{base}.{ext}")
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"{base}-{s + 1:05d}-of-{shards:05d}.{ext}"
            save({k: state[k].contiguous() for k in part}, folder / fname)
            weight_map.update({k: fname for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{base}.{ext}.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy", "torch_dtype": "bfloat16"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_size": 4}))
    return folder


SYSTEM_TMP = tempfile.gettempdir()  # before any test points tempfile at its own folder


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_modules(tmp_path_factory):
    """Remote code (``trust_remote_code``) is imported from one modules cache in a temp folder for the
    whole session: never the user's ``~/.cache/huggingface/modules``, and never a folder that a
    later test replaces while ``transformers_modules`` stays imported (tests then failed by order)."""
    try:
        import transformers.dynamic_module_utils as dmu
    except ImportError:
        yield
        return
    cache = tmp_path_factory.mktemp("hf_modules")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_MODULES_CACHE", str(cache))
    mp.setattr(dmu, "HF_MODULES_CACHE", str(cache))
    mp.syspath_prepend(str(cache))
    yield
    mp.undo()
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]


@pytest.fixture
def make_ingredients(tmp_path):
    """``make_ingredients(n, dtype=..., shards=..., fmt=...)`` -> (paths, states)."""

    def make(n: int = 3, *, dtype=torch.bfloat16, shards: int = 1, fmt: str = "safetensors", big: int = 50_000):
        paths, states = [], []
        for i in range(n):
            st = make_state(100 + i, dtype, big=big)
            paths.append(write_checkpoint(tmp_path / f"ing{i}", st, shards=shards, fmt=fmt))
            states.append(st)
        return paths, states

    return make


def reference_mean(states, weights, out_dtype=None, acc=None):
    """The definition: acc = x0*w0; acc = acc + xi*wi (each in ``acc`` dtype); cast back.

    ``acc`` None (the default, "auto"): per tensor, float64 when any input read (weight not 0) is
    float32 or float64, else float32 — at least twice the inputs' mantissa."""
    ref = {}
    for name, t0 in states[0].items():
        if not t0.is_floating_point():
            ref[name] = t0
            continue
        wide = any(st[name].dtype in (torch.float32, torch.float64) for st, w in zip(states, weights) if w)
        dtype = acc or (torch.float64 if wide else torch.float32)
        total = states[0][name].to(dtype) * weights[0]
        for st, w in zip(states[1:], weights[1:]):
            total = total + st[name].to(dtype) * w
        ref[name] = total.to(out_dtype or t0.dtype)
    return ref


def load_soup(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# ---- hub fixtures: a hub-compatible HTTP server on 127.0.0.1 (tests/hubserver.py) ----
@pytest.fixture
def hf_isolated(tmp_path, monkeypatch):
    """HF home, cache and token file in tmp_path; LFS (no Xet); online; no ambient token or endpoint."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these at import time: patch the constants too
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    return home / "hub"


@pytest.fixture
def hub():
    """An open hub (no token needed) on 127.0.0.1:<free port>; yields its ``HubStore``."""
    with running_hub() as store:
        yield store


@pytest.fixture
def auth_hub():
    """A hub that requires ``Authorization: Bearer TOKEN`` on every API call."""
    with running_hub(token=TOKEN) as store:
        yield store


@pytest.fixture(autouse=True)
def _private_score_cache(tmp_path, tmp_path_factory, monkeypatch):
    """No test writes to the user's score cache, or to the system temp folder: candidates, command
    evaluators' output folders and child processes (``TMPDIR``) use one inside the test's own."""
    monkeypatch.setenv("SOUP_CACHE", str(tmp_path / "default-scores.sqlite"))
    private = tmp_path_factory.mktemp("systmp")  # beside the test's folder: its listing stays its own
    monkeypatch.setenv("TMPDIR", str(private))
    monkeypatch.setattr(tempfile, "tempdir", str(private))


# ---- a throwaway PostgreSQL server (Debian's postgresql package; .ci/run installs it) ----
def _pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's /usr/lib/postgresql/N/bin (newest), else PATH."""
    import shutil

    def version(p: Path) -> int:
        return int(p.parts[-3]) if p.parts[-3].isdigit() else 0

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=version)
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which and (Path(which).parent / "initdb").exists() else None


@pytest.fixture(scope="session")
def _pg_cluster():
    """initdb + pg_ctl start on 127.0.0.1:<free port>, in a temp folder; as the ``postgres`` OS user
    when run as root (PostgreSQL refuses root). Yields ``(host, port, superuser)``; stopped at the end."""
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _pg_bin()
    missing = "PostgreSQL's initdb/pg_ctl not found" if bindir is None else None
    try:
        import psycopg  # noqa: F401  (the driver the storage and cache URLs use)
    except ImportError:
        missing = missing or "psycopg is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: .ci/run installs it; PostgreSQL tests must not be skipped in CI")
        pytest.skip(missing)
    root = Path(tempfile.mkdtemp(prefix="soup-pg-", dir=SYSTEM_TMP))  # not under a root-only pytest tmp folder
    user = None
    if os.geteuid() == 0:
        name = "postgres"
        try:
            pwd.getpwnam(name)
        except KeyError:
            name = "nobody"
        user = name
        root.chmod(0o755)
        shutil.chown(root, user=name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = root / "data", root / "server.log"

    def run(*cmd: str) -> None:
        res = subprocess.run(cmd, user=user, cwd=root, capture_output=True, text=True, timeout=120)
        if res.returncode:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stdout}{res.stderr}{server_log}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "soup", "-A", "trust", "-E", "UTF8", "--locale=C")
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        try:
            yield "127.0.0.1", port, "soup"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres(_pg_cluster):
    """A fresh database on the throwaway server: yields its SQLAlchemy URL (``postgresql+psycopg://``)."""
    import uuid

    import psycopg

    host, port, user = _pg_cluster
    name = f"soup_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
