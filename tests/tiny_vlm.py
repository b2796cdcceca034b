"""Tiny remote-code vision-language models, built offline for tests: their own code, written here.

Two model families, each a ``configuration_tinyvlm.py`` / ``modeling_tinyvlm.py`` pair that
``config.json``'s ``auto_map`` points at (loaded with ``trust_remote_code=True``, as the hub models are):

- ``TinyXComposer`` in the spirit of InternLM-XComposer2: a ViT (``vit``), a projector
  (``vision_proj``) and an InternLM2-style decoder whose projections carry *Partial LoRA*
  (``Plora_A``/``Plora_B``: a low-rank update applied to image tokens only);
- ``TinyPoints`` in the spirit of POINTS / MG-LLaVA: two vision encoders (``general_vit``, frozen
  in fine-tuning, and ``vision_encoder``), a projector each and a Llama-style language model (``llm``).

``build_remote(folder, kind, seed)`` writes the code and a config, builds the model from them and
saves it with ``save_pretrained`` (weights + config + code); ``finetunes(base, root, n, frozen)``
saves ``n`` fine-tunes of it whose parameters under ``frozen`` stay the base's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["CONFIGURATION", "MODELING", "IMAGE_TOKEN", "build_remote", "finetunes", "load_remote", "inputs"]

IMAGE_TOKEN = 63  # the id of the image placeholder token

CONFIGURATION = '''"""Configuration of the tiny test VLMs (remote code)."""
from transformers import PretrainedConfig


class TinyVLMConfig(PretrainedConfig):
    model_type = "tinyvlm"

    def __init__(self, family="xcomposer", vocab_size=64, hidden_size=32, num_layers=2, vision_hidden=16,
                 image_size=8, patch_size=4, lora_rank=4, image_token_id=63, **kwargs):
        self.family = family  # "xcomposer" or "points"
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.vision_hidden = vision_hidden
        self.image_size = image_size
        self.patch_size = patch_size
        self.lora_rank = lora_rank
        self.image_token_id = image_token_id
        super().__init__(**kwargs)
'''

MODELING = '''"""Tiny test VLMs (remote code): an InternLM-XComposer2-like and a POINTS-like model."""
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tinyvlm import TinyVLMConfig


class VisionTower(nn.Module):
    """Patches -> one pre-norm MLP block -> (batch, n_patches, vision_hidden)."""

    def __init__(self, c):
        super().__init__()
        n = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, c.vision_hidden, c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Embedding(n, c.vision_hidden)
        self.norm = nn.LayerNorm(c.vision_hidden)
        self.mlp = nn.Linear(c.vision_hidden, c.vision_hidden)

    def forward(self, pixels):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.weight
        return x + self.mlp(self.norm(x))


class PLoRALinear(nn.Linear):
    """A linear layer with Partial LoRA: the low-rank update applies to image tokens only."""

    def __init__(self, inp, out, rank):
        super().__init__(inp, out, bias=False)
        self.Plora_A = nn.Linear(inp, rank, bias=False)
        self.Plora_B = nn.Linear(rank, out, bias=False)

    def forward(self, x, im_mask=None):
        y = super().forward(x)
        if im_mask is not None:
            y = y + self.Plora_B(self.Plora_A(x)) * im_mask.unsqueeze(-1)
        return y


class Block(nn.Module):
    """Pre-norm causal self-attention (one head) and MLP; Partial LoRA on the projections if asked."""

    def __init__(self, h, rank):
        super().__init__()
        self.attention_norm = nn.LayerNorm(h)
        self.wqkv = PLoRALinear(h, 3 * h, rank) if rank else nn.Linear(h, 3 * h, bias=False)
        self.wo = PLoRALinear(h, h, rank) if rank else nn.Linear(h, h, bias=False)
        self.ffn_norm = nn.LayerNorm(h)
        self.w1 = nn.Linear(h, 2 * h)
        self.w2 = nn.Linear(2 * h, h)

    def forward(self, x, im_mask):
        kw = {"im_mask": im_mask} if isinstance(self.wo, PLoRALinear) else {}
        q, k, v = self.wqkv(self.attention_norm(x), **kw).chunk(3, dim=-1)
        n = x.shape[1]
        causal = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, dim=-1)
        x = x + self.wo(att @ v, **kw)
        return x + self.w2(torch.nn.functional.gelu(self.w1(self.ffn_norm(x))))


class Decoder(nn.Module):
    def __init__(self, c, embed_name, rank):
        super().__init__()
        setattr(self, embed_name, nn.Embedding(c.vocab_size, c.hidden_size))
        self.embed_name = embed_name
        self.layers = nn.ModuleList(Block(c.hidden_size, rank) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size)

    def forward(self, x, im_mask):
        for layer in self.layers:
            x = layer(x, im_mask)
        return self.norm(x)


def projector(c):
    return nn.Sequential(nn.Linear(c.vision_hidden, c.hidden_size), nn.GELU(), nn.Linear(c.hidden_size, c.hidden_size))


class TinyVLMForCausalLM(PreTrainedModel):
    config_class = TinyVLMConfig
    base_model_prefix = "tinyvlm"

    def __init__(self, config):
        super().__init__(config)
        c = config
        if c.family == "xcomposer":  # vit -> vision_proj -> InternLM2-style decoder with Partial LoRA
            self.vit = VisionTower(c)
            self.vision_proj = projector(c)
            self.model = Decoder(c, "tok_embeddings", c.lora_rank)
            self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        else:  # POINTS-like: two encoders, a projector each, a Llama-style language model
            self.general_vit = VisionTower(c)
            self.vision_encoder = VisionTower(c)
            self.general_projector = projector(c)
            self.vision_projector = projector(c)
            self.llm = nn.Module()
            self.llm.model = Decoder(c, "embed_tokens", 0)
            self.llm.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.post_init()

    def image_features(self, pixel_values):
        if self.config.family == "xcomposer":
            return self.vision_proj(self.vit(pixel_values))
        return torch.cat([self.general_projector(self.general_vit(pixel_values)),
                          self.vision_projector(self.vision_encoder(pixel_values))], dim=1)

    def forward(self, input_ids, pixel_values=None, **kwargs):
        decoder = self.model if self.config.family == "xcomposer" else self.llm.model
        x = getattr(decoder, decoder.embed_name)(input_ids)
        im_mask = (input_ids == self.config.image_token_id)
        if pixel_values is not None:
            feats = self.image_features(pixel_values.to(x.dtype))
            x = x.masked_scatter(im_mask.unsqueeze(-1), feats.reshape(-1, x.shape[-1]))
        x = decoder(x, im_mask.to(x.dtype))
        head = self.output if self.config.family == "xcomposer" else self.llm.lm_head
        return CausalLMOutput(logits=head(x))
'''


def write_code(folder: Path, family: str) -> None:
    """The remote code and a config whose ``auto_map`` points at it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tinyvlm.py").write_text(CONFIGURATION)
    (folder / "modeling_tinyvlm.py").write_text(MODELING)
    config = {"model_type": "tinyvlm", "family": family, "architectures": ["TinyVLMForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_tinyvlm.TinyVLMConfig",
                           "AutoModelForCausalLM": "modeling_tinyvlm.TinyVLMForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))


def build_remote(folder: Path, family: str, seed: int = 0) -> Path:
    """A random tiny remote-code VLM saved in ``folder`` (weights, config, code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_code(folder, family)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(folder)
    return folder


def load_remote(folder: Path):
    """The model in ``folder``, loaded with its own code (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def finetunes(base: Path, root: Path, n: int, *, frozen: Sequence[str] = (), scale: float = 0.01
              ) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """``n`` fine-tunes of ``base`` saved under ``root`` (with their code), parameters under ``frozen``
    prefixes left as they are; returns the folders and their state dicts."""
    folders, states = [], []
    for i in range(n):
        model = load_remote(base)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith(tuple(frozen)):
                    p.add_(scale * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ft{i}")
        folders.append(root / f"ft{i}")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return folders, states


def inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """An image and a text holding its placeholder tokens (4 per image for a tower; POINTS has two)."""
    g = torch.Generator().manual_seed(seed)
    n_image = 4 if family == "xcomposer" else 8
    ids = torch.tensor([[1, 5, 9] + [IMAGE_TOKEN] * n_image + [7, 3, 11]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 8, 8, generator=g)}
