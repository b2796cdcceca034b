"""Vision-language models people soup, built tiny in fixtures: souped, loaded back with their own code.

- a remote-code model (``auto_map`` -> its own ``configuration_*.py`` / ``modeling_*.py``, in the spirit
  of InternLM-XComposer2 with Partial LoRA) loads with ``trust_remote_code=True`` after a soup;
- a two-encoder model (POINTS / MG-LLaVA) whose frozen tower ``soup inspect --diff`` finds;
- transformers' LLaVA (the MG-LLaVA / ParGo family) with its processor, forward on an image + text;
- training-framework files: a DeepSpeed-style ``{"module": ...}`` ``.pt`` with ``module.`` names, the
  wrapper keys, and a malicious pickle that must never run;
- the walkthrough of docs/vlm.md ("Souping vision-language models"), run as written.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import soup
from soup.cli import app

from conftest import reference_mean
from tiny_vlm import build_remote, finetunes, inputs, load_remote

transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")

ROOT = Path(__file__).parent.parent
WALKTHROUGH = ROOT / "docs" / "vlm.md"  # the documentation page "Souping vision-language models"


def _example():
    """examples/tiny_llava.py, imported from its file (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("tiny_llava", ROOT / "examples" / "tiny_llava.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_llava = _example()


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output and len([ln for ln in lines if ln.startswith("error:")]) == 1, res.output
    return next(ln for ln in lines if ln.startswith("error:"))


# ---- remote code ---------------------------------------------------------------------------------------
def test_remote_code_soup_loads_with_trust_remote_code(tmp_path):
    base = build_remote(tmp_path / "base", "xcomposer")
    folders, states = finetunes(base, tmp_path, 3)
    res = soup.merge(folders, tmp_path / "soup", weights=[0.5, 0.3, 0.2])
    out = res.path
    assert {"configuration_tinyvlm.py", "modeling_tinyvlm.py", "config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_tinyvlm.TinyVLMForCausalLM"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                               dtype=torch.float32).eval()
    reference = load_remote(folders[0])
    reference.load_state_dict(reference_mean(states, [0.5, 0.3, 0.2]))
    with torch.no_grad():
        got, want = loaded(**inputs("xcomposer")).logits, reference(**inputs("xcomposer")).logits
        first = load_remote(folders[0])(**inputs("xcomposer")).logits
    assert torch.equal(got, want) and not torch.equal(got, first)


def test_support_files_copied_and_weights_never(tmp_path):
    base = build_remote(tmp_path / "base", "xcomposer")
    (folders, _) = finetunes(base, tmp_path, 2)
    src = folders[0]
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(vision_vocab="extra/vision_vocab.txt", mm_projector="mm_projector.bin", notes="../outside.txt",
               tokenizer_auto="tokenization_tinyvlm.py")
    cfg["auto_map"]["AutoTokenizer"] = ["tokenization_tinyvlm.TinyTokenizer", None]
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "extra").mkdir()
    (src / "extra" / "vision_vocab.txt").write_text("a b c")
    (src / "tokenization_tinyvlm.py").write_text("# a tokenizer\n")
    (src / "ixc_utils.py").write_text("# a helper imported by the modeling code\n")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tools.jinja").write_text("{{ messages }}")
    for name in ("mm_projector.bin", "optimizer.pt", "training_args.bin", "README.md", "soup.json",
                 "pytorch_model.bin.index.json", ".hidden.py", "trainer_state.json", "soup_plot.png"):
        (src / name).write_text("not for the soup")
    out = soup.merge(folders, tmp_path / "soup").path
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"configuration_tinyvlm.py", "modeling_tinyvlm.py", "tokenization_tinyvlm.py", "ixc_utils.py",
            "extra/vision_vocab.txt", "additional_chat_templates/tools.jinja"} <= got
    for never in ("mm_projector.bin", "optimizer.pt", "training_args.bin", ".hidden.py", "trainer_state.json",
                  "soup_plot.png", "pytorch_model.bin.index.json"):
        assert never not in got
    assert (out / "README.md").read_text() != "not for the soup"  # soup's own model card
    assert json.loads((out / "soup.json").read_text())["tensors"]  # soup's own manifest


def test_missing_auto_map_target_is_a_warning(tmp_path):
    base = build_remote(tmp_path / "base", "xcomposer")
    folders, _ = finetunes(base, tmp_path, 2)
    for f in folders:
        (f / "modeling_tinyvlm.py").unlink()
    res = soup.merge(folders, tmp_path / "soup")
    assert any("auto_map names modeling_tinyvlm.py" in w for w in res.warnings)


def test_hub_pull_fetches_remote_code_and_named_files(hub, tmp_path, hf_isolated):
    from soup.hub import pull, push

    base = build_remote(tmp_path / "base", "xcomposer")
    cfg = json.loads((base / "config.json").read_text())
    cfg["vision_vocab"] = "extra/vision_vocab.txt"
    (base / "config.json").write_text(json.dumps(cfg))
    (base / "extra").mkdir()
    (base / "extra" / "vision_vocab.txt").write_text("a b c")
    (base / "optimizer.pt").write_bytes(b"never pulled")
    push(base, "owner/xc", endpoint=hub.url)
    pulled = pull("owner/xc", endpoint=hub.url)
    got = {p.relative_to(pulled.path).as_posix() for p in pulled.path.rglob("*") if p.is_file()}
    assert {"configuration_tinyvlm.py", "modeling_tinyvlm.py", "extra/vision_vocab.txt", "model.safetensors"} <= got
    assert "optimizer.pt" not in got
    out = soup.merge([f"hf://owner/xc@{pulled.commit}", base], tmp_path / "soup", hub=soup.io.ingredients.HubOptions(
        endpoint=hub.url)).path
    assert (out / "modeling_tinyvlm.py").exists() and (out / "extra" / "vision_vocab.txt").exists()


# ---- a two-encoder model: the frozen tower is found, read once, written as its bytes ------------------
def test_two_encoders_frozen_tower_found_and_taken(tmp_path):
    base = build_remote(tmp_path / "base", "points")
    folders, states = finetunes(base, tmp_path, 3, frozen=("general_vit.",))
    res = _cli("inspect", *folders, "--diff", "--quiet")
    assert res.exit_code == 0, res.output
    rows = {ln.split()[1]: ln for ln in res.output.splitlines() if ln.startswith("  ") and "params" in ln}
    assert "identical (frozen)" in rows["general_vit"] and "differs" in rows["vision_encoder"]
    assert "connector" in rows["general_projector"] and "language" in res.output
    assert "--rule 'general_vit.*=take:0'" in res.output
    report = soup.inspect(*folders, diff=True)
    assert report["suggested_rules"] == ["general_vit.*=take:0"]

    res = _cli("merge", *folders, "-o", tmp_path / "soup", "--rule", "general_vit.*=take:0", "-q")
    assert res.exit_code == 0, res.output
    loaded = load_remote(tmp_path / "soup")
    reference = load_remote(folders[0])
    want = reference_mean(states, [1 / 3] * 3)
    want.update({k: v for k, v in states[0].items() if k.startswith("general_vit.")})
    reference.load_state_dict(want)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs("points")).logits, reference(**inputs("points")).logits)
    # without the rule, the engine writes the identical tower as its bytes too: the same soup
    plain = soup.merge(folders, tmp_path / "plain").path
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- LLaVA (transformers): MG-LLaVA and ParGo are of this family ---------------------------------------
def _llava_states(folders):
    return [{k: v.clone() for k, v in transformers.LlavaForConditionalGeneration.from_pretrained(f).state_dict()
             .items()} for f in folders]


def _llava_inputs(folder):
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(folder)
    return processor(images=Image.new("RGB", (8, 8), (200, 30, 30)), text="<image> what is in the image ?",
                     return_tensors="pt")


def test_llava_soup_loads_with_its_processor(tmp_path):
    folders = tiny_llava.write_finetunes(tmp_path)
    states = _llava_states(folders)
    out = soup.merge(folders, tmp_path / "soup", weights=[0.4, 0.4, 0.2]).path
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = _llava_inputs(out)
    assert batch["input_ids"].tolist()[0].count(4) == 4  # the image's 4 patch tokens
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(folders[0]).eval()
    want = reference_mean(states, [0.4, 0.4, 0.2])
    want.update({k: v for k, v in states[0].items() if k.startswith(tiny_llava.FROZEN)})
    reference.load_state_dict(want)
    with torch.no_grad():
        got = model(**batch).logits
        assert torch.equal(got, reference(**batch).logits)
        assert got.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)


# ---- training-framework files ------------------------------------------------------------------------
def test_deepspeed_module_pt_souped_and_loaded(tmp_path):
    folders = tiny_llava.write_finetunes(tmp_path / "hf")
    states = _llava_states(folders)
    pts = []
    for i, st in enumerate(states):  # DeepSpeed's layout, names with DDP's "module." prefix
        pts.append(tmp_path / f"run{i}" / "mp_rank_00_model_states.pt")
        pts[-1].parent.mkdir()
        torch.save({"module": {f"module.{k}": v for k, v in st.items()}, "global_steps": 100 + i,
                    "ds_version": "0.16.0", "param_shapes": [{"x": torch.Size([2])}]}, pts[-1])
    res = _cli("inspect", pts[0])
    assert res.exit_code == 0 and "every tensor name starts with 'module.'" in res.output
    assert "--strip-prefix module." in res.output
    res = _cli("merge", *pts, "-o", tmp_path / "soup", "--strip-prefix", "module.", "-q")
    assert res.exit_code == 0, res.output
    model = tiny_llava.build_model()
    model.load_state_dict(load_file(str(tmp_path / "soup" / "model.safetensors")))  # strict: every name
    reference = tiny_llava.build_model()
    want = reference_mean(states, [1 / 3] * 3)
    want.update({k: v for k, v in states[0].items() if k.startswith(tiny_llava.FROZEN)})
    reference.load_state_dict(want)
    batch = _llava_inputs(folders[0])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, reference(**batch).logits)


def _toy(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"encoder.weight": torch.randn(4, 3, generator=g), "head.weight": torch.randn(2, 4, generator=g)}


def test_wrapper_keys_found_or_chosen(tmp_path):
    files = {}
    for key in ("state_dict", "module", "model"):
        files[key] = tmp_path / f"{key}.pth"
        torch.save({key: _toy(1), "epoch": 3, "meta": {"lr": 1e-4}}, files[key])
    for key, f in files.items():
        assert soup.inspect(f)["tensors"] == 2
    both = tmp_path / "both.pt"
    torch.save({"model": _toy(1), "ema": _toy(2)}, both)
    assert soup.inspect(both)["tensors"] == 2  # "ema" is not a wrapper key: "model" is the only one
    amb = tmp_path / "amb.pt"
    torch.save({"state_dict": _toy(1), "model": _toy(2)}, amb)
    line = _one_line_error(_cli("inspect", amb))
    assert str(amb) in line and "'state_dict', 'model'" in line and "--state-dict-key" in line
    a = soup.merge([soup.Ingredient(str(both), key="ema"), soup.Ingredient(str(amb), key="model")], None)
    assert torch.equal(a.state_dict["encoder.weight"], _toy(2)["encoder.weight"])
    line = _one_line_error(_cli("inspect", both, "--state-dict-key", "nope"))
    assert "no key 'nope'" in line and "'model', 'ema'" in line
    flat = tmp_path / "flat.pt"
    torch.save({"encoder.weight": torch.zeros(4, 3), "step": 3}, flat)
    line = _one_line_error(_cli("inspect", flat))
    assert str(flat) in line and "not a flat state dict" in line
    legacy = tmp_path / "legacy.pt"
    torch.save(_toy(1), legacy, _use_new_zipfile_serialization=False)
    assert "not a zip-format torch checkpoint" in _one_line_error(_cli("inspect", legacy))
    # the same file read another way is another ingredient (scores are cached by fingerprint)
    fp = {k: soup.io.ingredients.resolve(soup.Ingredient(str(both), key=k)).fingerprint for k in ("model", "ema")}
    assert fp["model"] != fp["ema"]


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _toy(1), "payload": _Payload(marker)}, evil)
    good = tmp_path / "good.pt"
    torch.save(_toy(2), good)
    for args in (["inspect", evil], ["merge", good, evil, "-o", tmp_path / "out"], ["inspect", good, evil, "--diff"]):
        line = _one_line_error(_cli(*args))
        assert str(evil) in line and "refused" in line and "open" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_recipe_key_and_strip_prefix(tmp_path):
    for i in range(2):
        torch.save({"module": {f"module.{k}": v for k, v in _toy(i).items()}}, tmp_path / f"r{i}.pt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("ingredients:\n"
                      "  - {path: r0.pt, key: module, strip_prefix: module.}\n"
                      "  - {path: r1.pt, strip_prefix: module.}\n"
                      "strategy: average\noutput: soup\n")
    res = _cli("run", recipe, "--no-cache", "-q")
    assert res.exit_code == 0, res.output
    got = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert set(got) == {"encoder.weight", "head.weight"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingredients:\n  - {path: r0.pt, key: 3}\n  - r1.pt\nstrategy: average\n")
    res = _cli("validate", bad)
    assert res.exit_code == 1 and "ingredients[0].key: must be a string" in res.output


# ---- the walkthrough of docs/vlm.md -------------------------------------------------------------------
def test_docs_vlm_walkthrough_runs(tmp_path, monkeypatch):
    section = WALKTHROUGH.read_text()  # the walkthrough: the page's first bash block, then its first python block
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in shell.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if not line:
            continue
        args = shlex.split(line)
        if args[0] == "python":  # the example script, from the repository
            args = [sys.executable, str(ROOT / args[1]), *args[2:]]
            done = subprocess.run(args, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        else:
            assert args[0] == "soup"
            res = _cli(*args[1:])
            assert res.exit_code == 0, res.output
            outputs.append(res.output)
    assert any("--rule 'vision_tower.*=take:0'" in o for o in outputs)
    scope: dict = {}
    exec(compile(python, str(WALKTHROUGH), "exec"), scope)
    assert scope["logits"].shape[-1] == len(tiny_llava.SPECIAL) + len(tiny_llava.WORDS)
