"""Never lose a byte: the output is checked, locked and replaced by one mechanism (soup.engine.output), and
every way a process ends (error, Ctrl-C, SIGTERM, SIGHUP, SIGKILL, a full or read-only disk) leaves
the user's files byte-identical and nothing half-written beside the output.

Runs the real CLI, in-process with CliRunner or as a subprocess where signals are involved.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import load_soup, make_state, reference_mean, write_checkpoint
from soup.cli import app
from soup.engine.output import OutputDir

runner = CliRunner()
SOUP = [sys.executable, "-c", "from soup.cli import main; main()"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (and every folder), to prove nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def project(tmp_path):
    """A project folder holding two fine-tunes (one sharded) and a notes file."""
    root = tmp_path / "project"
    write_checkpoint(root / "runs" / "ft-a", make_state(1))
    write_checkpoint(root / "runs" / "ft-b", make_state(2), shards=2)
    (root / "notes.txt").write_text("months of work")
    return root


def merge_cli(*args: str):
    return runner.invoke(app, ["merge", *args, "-q"])


def assert_one_line(res, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in lines[0], lines[0]


# --- 1. nothing the user owns is removed or changed -----------------------------------------------

A, B, FILE = "runs/ft-a", "runs/ft-b", "runs/ft-a/model.safetensors"


@pytest.mark.parametrize("inputs,where,why", [
    ((A, B), ".", "is the working directory"),                    # soup merge a b -o . --overwrite
    ((A, B), A, "is the input"),                                  # an ingredient folder
    ((A, B), "runs", "contains the input"),                       # the folder holding the ingredients
    ((FILE, B), FILE, "is the input"),                            # an ingredient weight file
    ((A, B), FILE, "is inside the input"),                        # a file inside an ingredient folder
    ((A, B), "runs/ft-b/../ft-a/sub", "is inside the input"),     # `..` resolved
    ((A, B), "..", "contains the working directory"),             # an ancestor of the working directory
])
def test_overwrite_never_touches_inputs_or_workdir(project, monkeypatch, inputs, where, why):
    monkeypatch.chdir(project)
    before = snapshot(project.parent)
    res = merge_cli(*inputs, "-o", where, "--overwrite")
    assert_one_line(res, why)
    assert snapshot(project.parent) == before


def test_symlinked_output_resolves_to_the_ingredient(project, monkeypatch):
    monkeypatch.chdir(project)
    (project / "link").symlink_to(project / "runs" / "ft-b")
    before = snapshot(project)
    assert_one_line(merge_cli("runs/ft-a", "runs/ft-b", "-o", "link", "--overwrite"), "is the input")
    assert snapshot(project) == before


def test_only_a_previous_soup_is_replaced(project, monkeypatch):
    monkeypatch.chdir(project)
    (project / "mine").mkdir()
    (project / "mine" / "data.csv").write_text("1,2,3")
    (project / "afile").write_text("x")
    before = snapshot(project)
    assert_one_line(merge_cli("runs/ft-a", "runs/ft-b", "-o", "mine", "--overwrite"), "is not a soup")
    assert_one_line(merge_cli("runs/ft-a", "runs/ft-b", "-o", "afile", "--overwrite"), "is a file")
    assert snapshot(project) == before
    assert merge_cli("runs/ft-a", "runs/ft-b", "-o", "soup", "--weights", "1,0").exit_code == 0
    assert_one_line(merge_cli("runs/ft-a", "runs/ft-b", "-o", "soup"), "already exists", "--overwrite")
    res = merge_cli("runs/ft-a", "runs/ft-b", "-o", "soup", "--overwrite")
    assert res.exit_code == 0, res.output
    got = load_soup(project / "soup")
    ref = reference_mean([make_state(1), make_state(2)], [0.5, 0.5])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert sorted(p.name for p in project.iterdir()) == ["afile", "link", "mine", "notes.txt", "runs", "soup"] \
        if (project / "link").exists() else ["afile", "mine", "notes.txt", "runs", "soup"]


def test_recipe_and_cache_are_protected(project, monkeypatch):
    recipe = project / "runs" / "r.yaml"
    recipe.write_text("ingredients: [ft-a, ft-b]\nstrategy: average\noutput: .\ncache: scores.sqlite\n")
    before = snapshot(project)
    res = runner.invoke(app, ["run", str(recipe), "--overwrite", "-q"])
    assert_one_line(res, "contains the input")
    assert snapshot(project) == before


# --- 2. one writer per output ---------------------------------------------------------------------

def test_a_second_writer_fails_at_once_naming_the_output(project, monkeypatch):
    monkeypatch.chdir(project)
    held = OutputDir(project / "soup").lock()
    try:
        res = merge_cli("runs/ft-a", "runs/ft-b", "-o", "soup")
        assert_one_line(res, "soup", "another soup is writing it", f"pid {os.getpid()}")
        assert not (project / "soup").exists()
    finally:
        held.release()
    assert not list(project.glob(".soup.soup-*"))  # the lock file goes with its holder
    assert merge_cli("runs/ft-a", "runs/ft-b", "-o", "soup").exit_code == 0


def test_concurrent_merges_exactly_one_wins(big_inputs, tmp_path):
    out = tmp_path / "race"
    procs = [subprocess.Popen([*SOUP, "merge", *map(str, big_inputs), "-o", str(out), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1, 1], results
    for rc, stderr in results:
        if rc:
            assert str(out) in stderr and ("another soup is writing it" in stderr or "already exists" in stderr)
            assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".race")) == []


def test_a_dead_writers_lock_is_broken(project):
    """flock is released by the kernel when its holder dies, even by SIGKILL."""
    script = f"from soup.engine.output import OutputDir; import time; OutputDir({str(project / 'soup')!r}).lock(); " \
             "print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    res = runner.invoke(app, ["merge", str(project / "runs/ft-a"), str(project / "runs/ft-b"),
                              "-o", str(project / "soup"), "-q"])
    assert_one_line(res, "another soup is writing it")
    holder.kill()
    holder.wait()
    res = runner.invoke(app, ["merge", str(project / "runs/ft-a"), str(project / "runs/ft-b"),
                              "-o", str(project / "soup"), "-q"])
    assert res.exit_code == 0, res.output
    assert not list(project.glob(".soup.soup-*"))


# --- 3. every way a process ends leaves nothing half-written ---------------------------------------

@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    """Three fp32 ingredients of 96 MB: a merge lasts long enough to be interrupted mid-write."""
    root = tmp_path_factory.mktemp("big")
    paths = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        state = {f"layer{j}.weight": torch.randn(2048, 1536, generator=g) for j in range(8)}
        paths.append(write_checkpoint(root / f"ft{i}", state))
    return paths


def _start_and_wait_for(argv: list[str], ready, timeout: float = 60.0, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never reached the point to interrupt (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.002)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_during_a_merge_leaves_nothing(big_inputs, tmp_path, sig):
    out = tmp_path / "soup"
    proc = _start_and_wait_for([*SOUP, "merge", *map(str, big_inputs), "-o", str(out), "-q"],
                               lambda: any(tmp_path.glob(".soup.soup-tmp-*/model*.safetensors")))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no temp folder, no lock, no output


def test_sigkill_debris_is_removed_by_the_next_run(big_inputs, tmp_path):
    out = tmp_path / "soup"
    proc = _start_and_wait_for([*SOUP, "merge", *map(str, big_inputs), "-o", str(out), "-q"],
                               lambda: any(tmp_path.glob(".soup.soup-tmp-*/model*.safetensors")))
    proc.kill()
    proc.wait()
    debris = sorted(p.name for p in tmp_path.iterdir())
    assert any(".soup-tmp-" in d for d in debris), debris
    res = subprocess.run([*SOUP, "merge", *map(str, big_inputs), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "left by a run that was killed" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]
    got = load_soup(out)
    from safetensors.torch import load_file

    states = [load_file(str(p / "model.safetensors")) for p in big_inputs]
    ref = reference_mean(states, [1 / 3] * 3)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_killed_mid_swap_restores_the_previous_soup(project):
    """A SIGKILL between moving the old soup aside and moving the new one in: the next run puts it back."""
    out = project / "soup"
    assert merge_cli(str(project / "runs/ft-a"), str(project / "runs/ft-b"), "-o", str(out)).exit_code == 0
    before = snapshot(out)
    os.rename(out, project / ".soup.soup-old-deadbeef")  # what the killed run left
    (project / ".soup.soup-tmp-deadbeef").mkdir()
    res = merge_cli(str(project / "runs/ft-a"), str(project / "runs/ft-b"), "-o", str(out), "--weights", "1,0")
    assert_one_line(res, "already exists")  # the restored soup is protected like any other
    assert snapshot(out) == before
    assert not list(project.glob(".soup.soup-*"))


def _command_recipe(tmp_path: Path, inputs) -> tuple[Path, Path]:
    bench = tmp_path / "bench.py"
    pidfile = tmp_path / "bench.pid"
    bench.write_text(textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        assert (Path(sys.argv[1]) / "config.json").exists()
        Path({str(pidfile)!r}).write_text(f"{{os.getpid()}} {{sys.argv[1]}}")
        time.sleep(120)
        print(0.5)
    """))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        ingredients: [{', '.join(str(p) for p in inputs)}]
        strategy: greedy
        evaluator: {{name: command, args: {{cmd: ["{sys.executable}", "{bench}", "{{model}}"]}}}}
        output: {tmp_path / 'out' / 'soup'}
        cache: false
    """))
    return recipe, pidfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its (dead) parent is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sigterm_during_a_command_evaluation_kills_the_benchmark(project, tmp_path):
    recipe, pidfile = _command_recipe(tmp_path, [project / "runs/ft-a", project / "runs/ft-b"])
    proc = _start_and_wait_for([*SOUP, "run", str(recipe), "-q"], pidfile.exists)
    time.sleep(0.2)
    pid, candidate = pidfile.read_text().split()
    assert Path(candidate).is_relative_to(tmp_path / "out")  # candidates live beside the output
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(int(pid)), "the benchmark was orphaned"
    assert not Path(candidate).exists()
    assert not (tmp_path / "out").exists()  # not even the parent folder this run created


def test_sigkill_during_evaluation_then_rerun_cleans_up(project, tmp_path):
    recipe, pidfile = _command_recipe(tmp_path, [project / "runs/ft-a", project / "runs/ft-b"])
    proc = _start_and_wait_for([*SOUP, "run", str(recipe), "-q"], pidfile.exists)
    time.sleep(0.2)
    pid, candidate = pidfile.read_text().split()
    proc.kill()
    proc.wait()
    os.kill(int(pid), signal.SIGKILL)  # SIGKILL cannot be handled: its orphan is the test's to stop
    assert Path(candidate).exists()
    recipe.write_text(recipe.read_text().replace("strategy: greedy", "strategy: average")
                      .replace("evaluator:", "# evaluator:"))
    res = subprocess.run([*SOUP, "run", str(recipe), "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "left by a run that was killed" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["soup"]


# --- 4. environment faults are one line ----------------------------------------------------------

@pytest.fixture
def tiny_mount(tmp_path):
    """A 128 KiB tmpfs mounted by the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_and_leaves_nothing(project, tiny_mount):
    before = snapshot(project)
    res = merge_cli(str(project / "runs/ft-a"), str(project / "runs/ft-b"), "-o", str(tiny_mount / "soup"),
                    "--dtype", "float32")  # 200 KB of float32 on a 128 KiB disk
    assert_one_line(res, "the disk is full")
    assert snapshot(project) == before
    assert list(tiny_mount.iterdir()) == []


def test_read_only_output_is_one_line(project, tiny_mount):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_mount)], check=True)
    res = merge_cli(str(project / "runs/ft-a"), str(project / "runs/ft-b"), "-o", str(tiny_mount / "soup"))
    assert_one_line(res, "read-only")
    assert list(tiny_mount.iterdir()) == []


def test_failed_run_leaves_no_new_parent_folders(project):
    res = merge_cli(str(project / "runs/ft-a"), str(project / "nope"), "-o", str(project / "new/deep/soup"))
    assert_one_line(res, "nope")
    assert not (project / "new").exists()


def test_a_file_where_a_folder_is_expected(project):
    (project / "plain").write_text("x")
    res = merge_cli(str(project / "runs/ft-a"), str(project / "runs/ft-b"), "-o", str(project / "plain" / "soup"))
    assert_one_line(res, "is a file")


# --- 7/8. secrets, literal text, interrupts vs plug-ins ---------------------------------------------

def test_tokens_are_redacted_and_text_printed_literally(project, monkeypatch):
    secret = "hf_NeverPrintMe_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    res = merge_cli(str(project / f"runs/{secret}"), str(project / "runs/ft-b"), "-o", str(project / "o"))
    assert res.exit_code == 1 and secret not in res.output and "***" in res.stderr
    res = merge_cli(str(project / "runs/ft-a"), str(project / "runs/ft-b"), "-o", str(project / "o"),
                    "--rule", ":fire:[red]*=take:nobody")
    assert res.exit_code == 1 and ":fire:[red]*=take:nobody" in res.stderr and "🔥" not in res.stderr


def test_a_plugin_raising_keyboardinterrupt_is_an_error_not_a_stop(project, tmp_path):
    ev = tmp_path / "ev.py"
    ev.write_text("from soup import Evaluator\nclass E(Evaluator):\n"
                  "    def score(self, c):\n        raise KeyboardInterrupt\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"ingredients: [{project / 'runs/ft-a'}, {project / 'runs/ft-b'}]\nstrategy: greedy\n"
                      f"evaluator: {ev}:E\noutput: {tmp_path / 'o'}\ncache: false\n")
    res = runner.invoke(app, ["run", str(recipe), "-q"])
    assert_one_line(res, "E", "KeyboardInterrupt", "ft-a")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.soup-*"))


def test_ctrl_c_during_evaluation_is_exit_130(project, tmp_path):
    recipe, pidfile = _command_recipe(tmp_path, [project / "runs/ft-a", project / "runs/ft-b"])
    proc = _start_and_wait_for([*SOUP, "run", str(recipe), "-q"], pidfile.exists)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted (SIGINT)" in stderr
    assert not (tmp_path / "out").exists()  # not even the parent folder this run created
